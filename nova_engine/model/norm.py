"""RMSNorm for the local layer spec, numerically identical to Hugging Face's LlamaRMSNorm /
Qwen2RMSNorm (normalize in fp32, cast back, then scale), and usable with sequence
parallelism (torch's RMSNorm wrapper in megatron refuses SP): its weight is marked
`sequence_parallel` so megatron's finalize_model_grads all-reduces its gradient over TP.
`fused=True`: the same math through torch.compile (`compiled_rms_norm`, which
nova_engine.model.fused hands out with its other fused chains; this module imports nothing of
it)."""

from __future__ import annotations

from functools import cache

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm math: normalize in fp32, cast back to x's dtype, then scale."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


@cache
def compiled_rms_norm():
    """`rms_norm` through torch.compile (dynamic shapes: any token count), built once."""
    return torch.compile(rms_norm, dynamic=True)


class NovaRMSNorm(torch.nn.Module):
    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-6,
        fused: bool = False,
        **_: object,
    ):
        super().__init__()
        self.eps, self.fused = eps, fused
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:  # the same math, one compiled loop
            return compiled_rms_norm()(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)
