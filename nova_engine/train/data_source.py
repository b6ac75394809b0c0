"""Data sources: where a loop's batches come from, with a checkpointable position.

A `DataSource` hands the loop one batch per data step (`next_batch()`: this rank's share,
already on the device) and saves/restores its position and RNG (`state_dict()`), so a
resumed run reads exactly the batches the uninterrupted run would have. Today's source is
`PackedDataSource`: a static list of Samples / PairSamples in seeded, shuffled epochs
(SFT, DPO, RM). A rollout source (RLVR: prompts -> the policy generates -> verifiers score)
implements the same protocol.

`PackedDataSource`: per epoch a seeded permutation of the samples (the same on every rank and
every layout), `global_batch_size` sequences per step, dealt to the DP ranks by `deal()`
(balanced by tokens, deterministic per (seed, step)), each rank's share packed
(first-fit decreasing) into micro-batches of at most `micro_batch_tokens` tokens. A step's
data depends only on (seed, step), so the batches do not depend on the layout: per-step
losses agree across TP/PP/DP up to fp32 summation order. A rank dealt no sequence (fewer
sequences than DP ranks, e.g. the short last batch of an epoch) gets one all-padding
micro-batch: it joins every collective with zero loss, zero counts and zero gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from nova_engine.data.balance import deal
from nova_engine.data.packing import PackedBatch, PackingPlan
from nova_engine.data.sample import PairSample
from nova_engine.logging import get_logger

if TYPE_CHECKING:
    from nova_engine.parallel.state import ParallelState

logger = get_logger(__name__)


class DataSource(Protocol):
    """What a loop reads batches from."""

    total_steps: int
    """Data steps of the run."""
    position: int
    """Data steps consumed so far (the next batch is step `position`)."""

    def next_batch(self) -> Any:
        """This rank's share of step `position` (then position += 1)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Position and RNG (JSON-able / torch-saveable)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class PackedDataSource:
    """Steps of `global_batch_size` sequences (Samples or PairSamples) -> this rank's packed
    micro-batches (see the module docstring).

    Args:
        samples: the data set (Sample or PairSample list; index order = file order).
        global_batch_size: sequences (pairs) per step over all DP ranks.
        micro_batch_tokens: token capacity of one packed micro-batch.
        ps: the layout (dp size/rank; tp for padding; pp > 1 pads every micro-batch to
            exactly micro_batch_tokens, which the pipeline schedules need; device).
        seed, shuffle: per-epoch permutation seed / whether to shuffle at all.
        epochs, max_steps: the run length (max_steps wins when set; epochs then wrap).
    """

    def __init__(
        self,
        samples: Sequence[Any],
        *,
        global_batch_size: int,
        micro_batch_tokens: int,
        ps: ParallelState,
        seed: int = 1234,
        shuffle: bool = True,
        epochs: int = 1,
        max_steps: int | None = None,
        pad_id: int = 0,
    ):
        if not samples:
            raise ValueError("data source: no samples (empty data set after tokenization?)")
        self.samples = list(samples)
        self.gbs, self.mbt, self.ps = global_batch_size, micro_batch_tokens, ps
        self.seed, self.shuffle, self.pad_id = seed, shuffle, pad_id
        self.steps_per_epoch = math.ceil(len(self.samples) / global_batch_size)
        self.total_steps = max_steps or epochs * self.steps_per_epoch
        self.fixed_length = ps.pp > 1
        self.position = 0
        if micro_batch_tokens % ps.tp:
            raise ValueError(
                f"train.micro_batch_tokens={micro_batch_tokens} must be a multiple of tp={ps.tp}"
            )
        self._perm: tuple[int, np.ndarray] | None = None

    # -- the DataSource protocol ---------------------------------------------------------

    def next_batch(self) -> list[PackedBatch]:
        mbs = self.rank_microbatches(self.position)
        self.position += 1
        return mbs

    def state_dict(self) -> dict[str, Any]:
        """Position and RNG: the permutations are pure functions of (seed, epoch), so the
        seed is the whole RNG state; the rest identifies the data set for a resume check."""
        return {
            "position": self.position,
            "rng": {"seed": self.seed, "shuffle": self.shuffle},
            "num_samples": len(self.samples),
            "global_batch_size": self.gbs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("rng", "num_samples", "global_batch_size"):
            if state.get(key) != mine[key]:
                logger.warning(
                    "data source %s changed since the checkpoint: %s -> %s (the resumed run "
                    "reads other batches than the interrupted one)",
                    key, state.get(key), mine[key],
                )  # fmt: skip
        self.position = int(state["position"])

    # -- batches -------------------------------------------------------------------------

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            n = len(self.samples)
            perm = np.arange(n)
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm = (epoch, perm)
        return self._perm[1]

    def step_samples(self, step: int) -> list[Any]:
        """The global batch of `step` (0-based), in order."""
        epoch, k = divmod(step, self.steps_per_epoch)
        ids = self._order(epoch)[k * self.gbs : (k + 1) * self.gbs]
        return [self.samples[int(i)] for i in ids]

    def pack(self, samples: Sequence[Any]) -> list[PackedBatch]:
        """Pack `samples` into micro-batches (at least one: an all-padding batch when empty)."""
        pad: dict[str, Any] = {"pad_id": self.pad_id}
        if self.fixed_length:
            pad["pad_to_length"] = self.mbt
        else:
            pad["pad_to_multiple"] = self.ps.tp
        if not samples:
            length = self.mbt if self.fixed_length else self.ps.tp * 8
            pairs = isinstance(self.samples[0], PairSample)
            make = PackedBatch.from_pairs if pairs else PackedBatch.from_samples
            return [make([], pad_id=self.pad_id, pad_to_length=length)]
        plan = PackingPlan.from_samples(list(samples), self.mbt)
        return [plan.make_batch(list(samples), ids, **pad) for ids in plan.result.bins()]

    def rank_microbatches(self, step: int) -> list[PackedBatch]:
        """This DP rank's micro-batches of `step`, on the layout's device."""
        mine = deal(self.step_samples(step), self.ps.dp, self.ps.dp_rank, seed=self.seed, step=step)
        return [mb.to(self.ps.device) for mb in self.pack(mine)]
