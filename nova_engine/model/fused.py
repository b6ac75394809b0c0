"""Fused elementwise chains of the local layer spec: RMSNorm and SwiGLU through torch.compile
(inductor: C++/OpenMP loops on CPU, Triton on GPU), as megatron fuses its own bias-SwiGLU
with `jit_fuser` (torch.compile) on GPU.

Eager, an RMSNorm is ~5 passes over the activations forward and ~8 backward (pow, mean, add,
rsqrt, mul, mul, and their gradients), a SwiGLU 2 forward and 4 backward plus the cat that
joins the two halves' gradients; compiled, each is one read and one write per direction
(what that saves per step: `benchmarks/bench_vs_peers.py`, rows `nova` vs `nova_fused`).

The math is the eager modules' (`nova_engine.model.norm.NovaRMSNorm`: HF's LlamaRMSNorm,
normalize in fp32 and cast back, then scale; SwiGLU silu(x1) * x2 over the two halves of
fc1's output). Compiled once per process and dtype (dynamic shapes: any token count): the
first step pays the compile (seconds with a warm inductor cache, longer cold).
Switched on by `train.fuse_elementwise` (off by default: short CPU runs and the tests would
spend more time compiling than they save).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from nova_engine.model.norm import compiled_rms_norm


def swiglu(x: torch.Tensor) -> torch.Tensor:
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * up


@cache
def _compiled_swiglu() -> Callable[..., torch.Tensor]:
    return torch.compile(swiglu, dynamic=True)


_COMPILED: dict[str, Callable[[], Callable[..., torch.Tensor]]] = {
    "rms_norm": compiled_rms_norm,  # NovaRMSNorm(fused=True) calls the same one
    "swiglu": _compiled_swiglu,
}


def compiled(name: str) -> Callable[..., torch.Tensor]:
    """The torch.compile'd function `name` ("rms_norm" | "swiglu"), built once."""
    return _COMPILED[name]()


class NovaSwiGLU(torch.nn.Module):
    """The MLP activation module of the fused local spec (megatron builds it from the
    layer spec's `activation_func` when `use_te_activation_func` is set): fc1's [.., 2f]
    output -> silu(first half) * second half, compiled."""

    def __init__(self, config: TransformerConfig, **_: object):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return compiled("swiglu")(x)
