"""The unit the data path hands to the packer.

A `Sample` is one tokenized sequence with its loss mask (1 where the token is a training
target, i.e. assistant tokens). A `PairSample` is a (chosen, rejected) preference pair: the
packing unit of DPO and reward-model training (both halves land in the same micro-batch).
`index` is the sample's position in its data set (stable across epochs and resumes; the DPO
reference cache and the packer's sample index use it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Sample:
    tokens: np.ndarray  # [L] int64 token ids
    loss_mask: np.ndarray  # [L] bool/uint8, 1 = this token is a target (predicted from its prefix)
    index: int = -1

    def __post_init__(self) -> None:
        self.tokens = np.asarray(self.tokens, dtype=np.int64)
        self.loss_mask = np.asarray(self.loss_mask, dtype=np.uint8)
        if self.tokens.ndim != 1 or self.tokens.shape != self.loss_mask.shape:
            raise ValueError(
                f"Sample {self.index}: tokens {self.tokens.shape} and loss_mask "
                f"{self.loss_mask.shape} must be 1-D and of equal length"
            )

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class PairSample:
    chosen: Sample
    rejected: Sample
    index: int = -1
    margin: float = 1.0  # preference strength (Scaled BT uses m in {1,2,3}); 1 for plain pairs

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)
