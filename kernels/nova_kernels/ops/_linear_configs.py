"""Launch configs of the linear_logprobs Triton kernels: a deterministic selector.

A launch's config is a pure function of (kernel, input dtype class, shape class):
- dtype class: "fp32" (the FMA path, `CAST_FP32`, ieee dot: small tiles) or "16bit" (bf16 and
  fp16 on the tensor cores);
- shape class: the vocab width of the launch (Vp for the forward statistics kernel, the
  chunk's n_cols for the backward dlogits kernel) bucketed into "narrow" (< 128 columns: tiny
  vocabularies, the last partial chunk) and "wide"; never the token count N.
So every process picks the same config for the same launch (the reduction order inside a
tile, and the numbers, of a resumed run equal the first run's), and there are at most
2 kernels x 2 dtype classes x 2 shape classes configs, however many distinct N and backward
chunk widths a run sees (a timing autotuner keyed on n_cols re-benchmarked every config for
each of ~1000 chunk widths).

`NOVA_AUTOTUNE=1` switches to Triton's timing autotuner over the same spill-free candidates
(keyed on H and the argument dtypes only): possibly faster, NOT resume-exact (the pick can
differ between processes, and with it the summation order of the logsumexp).

Every config here compiles for sm_90 and sm_80 without a register spill and within shared
memory: tests/kernels/test_aot_compile.py checks each of them (nova_kernels._aot), and
benchmarks/aot_compile.py records registers / shared memory in
benchmarks/results/aot_compile.csv. The register counts in the comments are sm_90 / sm_80
with entropy (the heavier variant) at the time of writing. The wide defaults are the largest
spill-free tiles; they are not timed on a GPU yet.
"""

from __future__ import annotations

import os

import torch
import triton

SHAPE_CLASSES = ("narrow", "wide")
_NARROW_COLS = 128  # launches over fewer vocab columns than this are "narrow"

# (BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages) per (kernel, dtype class, shape class)
_TABLE = {
    ("fwd", "16bit", "wide"): (64, 128, 32, 8, 3),  # 173 / 213 registers
    ("fwd", "16bit", "narrow"): (64, 64, 16, 4, 4),  # 168 / 168
    ("bwd", "16bit", "wide"): (128, 128, 16, 8, 4),  # 176 / 174
    ("bwd", "16bit", "narrow"): (64, 64, 16, 4, 4),  # 127 / 128
    ("fwd", "fp32", "wide"): (32, 128, 16, 8, 2),  # 160 / 186
    ("fwd", "fp32", "narrow"): (32, 64, 32, 8, 2),  # 145 / 110
    ("bwd", "fp32", "wide"): (32, 128, 16, 8, 2),  # 100 / 128
    ("bwd", "fp32", "narrow"): (32, 64, 32, 8, 2),  # 92 / 80
}
# further NOVA_AUTOTUNE=1 candidates (the table's own entries are candidates too)
_AUTOTUNE_EXTRA = {
    ("fwd", "16bit"): [(128, 64, 32, 8, 3), (128, 128, 16, 8, 4)],  # 206/210, 224/237
    ("bwd", "16bit"): [(64, 128, 32, 8, 3), (128, 64, 32, 8, 3)],  # 155/173, 156/174
    ("fwd", "fp32"): [(64, 64, 16, 8, 2), (32, 64, 16, 4, 2)],  # 158/182, 186/168
    ("bwd", "fp32"): [(64, 64, 16, 8, 2), (32, 64, 16, 4, 2)],  # 102/128, 126/128
}
# the interpreter: fixed small tiles (it runs every program in numpy)
INTERP_META = {"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_K": 32}

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_class(dtype: torch.dtype | str) -> str:
    """The dtype class, "fp32" or "16bit", of a torch dtype or a name ("fp32" | "bf16" | "fp16")."""
    name = _DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, torch.dtype) else dtype
    if name not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"linear_logprobs Triton kernels: unsupported input dtype {dtype}")
    return "fp32" if name == "fp32" else "16bit"


def shape_class(n_cols: int) -> str:
    """The bucket of a launch's vocab width (Vp forward, the chunk's n_cols backward)."""
    return "narrow" if n_cols < _NARROW_COLS else "wide"


def selector_key(name: str, dtype: torch.dtype | str, n_cols: int) -> tuple[str, str, str]:
    """(kernel, dtype class, shape class): everything the selected config depends on."""
    if name not in ("fwd", "bwd"):
        raise ValueError(f"linear_logprobs kernel {name!r}: expected 'fwd' or 'bwd'")
    return name, dtype_class(dtype), shape_class(n_cols)


def _config(entry: tuple[int, int, int, int, int]) -> triton.Config:
    bn, bv, bk, warps, stages = entry
    return triton.Config(
        {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=warps, num_stages=stages
    )


def config_for_class(name: str, dtype: torch.dtype | str, cls: str) -> triton.Config:
    """The table's config of one shape class (for nova_kernels._aot)."""
    return _config(_TABLE[(name, dtype_class(dtype), cls)])


def select(name: str, dtype: torch.dtype | str, n_cols: int) -> triton.Config:
    """The config of one launch: a pure function of `selector_key`."""
    return _config(_TABLE[selector_key(name, dtype, n_cols)])


def autotune_configs(name: str, dtype: torch.dtype | str) -> list[triton.Config]:
    """The NOVA_AUTOTUNE=1 candidates of a kernel and dtype class (all spill-free)."""
    cls = dtype_class(dtype)
    entries = [_TABLE[(name, cls, s)] for s in SHAPE_CLASSES] + _AUTOTUNE_EXTRA[(name, cls)]
    return [_config(e) for e in dict.fromkeys(entries)]


def autotune_enabled() -> bool:
    """NOVA_AUTOTUNE=1: time the candidates per process (not resume-exact)."""
    return os.environ.get("NOVA_AUTOTUNE", "0").strip() == "1"


def dot_flags(dtype: torch.dtype | str, interpreting: bool = False) -> dict:
    """CAST_FP32 / DOT_PRECISION constexprs of both kernels for an input dtype (the
    interpreter's tl.dot is wrong on bf16: it always casts to fp32)."""
    fp32 = dtype_class(dtype) == "fp32"
    return {"CAST_FP32": interpreting or fp32, "DOT_PRECISION": "ieee" if fp32 else "tf32"}
