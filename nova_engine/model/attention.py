"""Core attention for the megatron layer spec: padded (sbhd) and packed (thd) batches.

megatron's local `DotProductAttention` refuses `packed_seq_params`; this module replaces it
in every Nova layer spec. It receives q/k/v after the QKV projection and RoPE (megatron's
SelfAttention applies RoPE per sample when `packed_seq_params` carries cu_seqlens, so
positions restart at every sample) and returns the context in the shape megatron expects.

Backends, picked per call:
- packed (thd), CUDA: `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10; its causal
  flag changed from `is_causal=True` (2.10/2.11) to `window_size=(-1, 0)` (2.12+), and
  `enable_gqa` appeared in 2.12 — both handled), else flash-attn's `flash_attn_varlen_func`
  when importable, else the SDPA path below.
- packed (thd), CPU: SDPA with a block-diagonal causal mask built from cu_seqlens
  (token i may attend to j iff same segment and j <= i). O(T^2) memory: a CPU/test path.
- padded (sbhd): SDPA with is_causal (right padding never influences real tokens).

Shapes (np = query heads per TP rank, ng = KV groups per TP rank, hn = head dim):
  sbhd: q [S, B, np, hn], k/v [S, B, ng, hn] -> [S, B, np*hn]
  thd:  q [T, np, hn],    k/v [T, ng, hn]    -> [T, np*hn]
"""

from __future__ import annotations

import inspect
import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

try:  # optional accelerator
    from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
except Exception:  # noqa: BLE001
    flash_attn_varlen_func = None


@lru_cache(maxsize=1)
def _varlen_api() -> tuple[object, set[str]] | None:
    """torch.nn.attention.varlen.varlen_attn and its keyword names, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:  # noqa: BLE001 - torch < 2.10
        return None
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


def block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[T, T] bool mask, True where query i may attend to key j (same segment, j <= i)."""
    pos = torch.arange(total, device=cu_seqlens.device)
    seg = torch.searchsorted(cu_seqlens[1:].to(torch.int64), pos, right=True)
    same = seg[:, None] == seg[None, :]
    return same & (pos[None, :] <= pos[:, None])


def _varlen_torch(q, k, v, cu, max_len, scale):
    api = _varlen_api()
    if api is None:
        return None
    fn, params = api
    kwargs: dict[str, object] = {"scale": scale}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return fn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def packed_attention(
    q_TNH: torch.Tensor,
    k_TGH: torch.Tensor,
    v_TGH: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention within each segment of a packed batch; returns [T, np, hn]."""
    cu = cu_seqlens.to(device=q_TNH.device, dtype=torch.int32)
    if q_TNH.is_cuda and q_TNH.dtype in (torch.float16, torch.bfloat16):
        out = _varlen_torch(q_TNH, k_TGH, v_TGH, cu, int(max_seqlen), scale)
        if out is not None:
            return out
        if flash_attn_varlen_func is not None:
            return flash_attn_varlen_func(
                q_TNH,
                k_TGH,
                v_TGH,
                cu,
                cu,
                max_seqlen,
                max_seqlen,
                softmax_scale=scale,
                causal=True,
            )
    total = q_TNH.shape[0]
    mask_TT = block_causal_mask(cu, total)
    # SDPA wants [B, heads, T, hn]
    q, k, v = (t.permute(1, 0, 2).unsqueeze(0) for t in (q_TNH, k_TGH, v_TGH))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask_TT, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out.squeeze(0).permute(1, 0, 2)


class NovaCoreAttention(MegatronModule):
    """Drop-in core attention (same constructor as megatron's DotProductAttention)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("NovaCoreAttention does not implement context parallelism")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"NovaCoreAttention is causal-only, got {attn_mask_type}")
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported")
        if self.training and self.dropout_p > 0:
            raise ValueError("attention dropout is not supported (Llama/Qwen2 train without it)")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
            out = packed_attention(
                query, key, value, cu, packed_seq_params.max_seqlen_q, self.softmax_scale
            )
            return out.reshape(out.shape[0], -1)
        # sbhd: [S, B, heads, hn] -> [B, heads, S, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1]
        )
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
