"""Types of the C++ extension nova_engine._C (csrc/bindings.cpp, csrc/decontam_bindings.cpp,
csrc/attention_bindings.cpp).
Keep in step with the pybind11 signatures there."""

import numpy as np
import numpy.typing as npt

def pack(
    lengths: npt.NDArray[np.int64],
    capacity: int,
    algorithm: str,
    max_seqs_per_bin: int = 0,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """lengths [n] int64 -> (bin_offsets [num_bins + 1], items [n]) int64."""

class NgramIndex:
    """Exact word n-gram index of eval items: add(), build(threshold), then scan()."""

    def __init__(self, n: int, drop: list[int], space: list[int]) -> None: ...
    def add(self, texts: list[str | bytes]) -> None: ...
    def build(self, threshold: float) -> None: ...
    @property
    def n(self) -> int: ...
    @property
    def built(self) -> bool: ...
    @property
    def num_distinct_grams(self) -> int: ...
    def __len__(self) -> int: ...
    def gram_counts(self) -> npt.NDArray[np.int64]: ...
    def need(self) -> npt.NDArray[np.int64]: ...
    def short_lengths(self) -> list[int]: ...
    def scan(
        self, texts: list[str | bytes]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Training texts [B] -> (offsets [B+1], eval_ids [M], counts [M]) int64."""
    def word_hashes(self, text: bytes) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]: ...

def attention_supports_dim(head_dim: int) -> bool: ...
def attention_isas() -> list[str]:
    """The instruction-set builds of the CPU attention this CPU runs, best last."""

def packed_attention_fwd(
    q: npt.NDArray[np.float32],
    k: npt.NDArray[np.float32],
    v: npt.NDArray[np.float32],
    cu_seqlens: npt.NDArray[np.int64],
    scale: float,
    out: npt.NDArray[np.float32],
    lse: npt.NDArray[np.float32],
    threads: int,
    isa: str = "",
) -> None:
    """q [T,N,D], k, v [T,G,D], cu_seqlens [S+1] (0 .. T) -> writes out [T,N,D], lse [N,T]."""

def packed_attention_bwd(
    q: npt.NDArray[np.float32],
    k: npt.NDArray[np.float32],
    v: npt.NDArray[np.float32],
    out: npt.NDArray[np.float32],
    lse: npt.NDArray[np.float32],
    dout: npt.NDArray[np.float32],
    cu_seqlens: npt.NDArray[np.int64],
    scale: float,
    dq: npt.NDArray[np.float32],
    dk: npt.NDArray[np.float32],
    dv: npt.NDArray[np.float32],
    threads: int,
    isa: str = "",
) -> None:
    """Backward of packed_attention_fwd: writes dq [T,N,D], dk, dv [T,G,D]."""
