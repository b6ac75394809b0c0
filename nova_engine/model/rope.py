"""Rotary position embedding for packed batches: one pass over all T tokens at their own
positions, instead of megatron's per-segment loop.

megatron applies RoPE to a packed (thd) batch segment by segment: per segment and per layer
a split, a slice of the frequency table, a rotate-half (chunk, neg, cat), two products and a
cat, each mirrored in backward (slice_backward zero-fills the whole table). Its cost grows
with the number of samples in a micro-batch, not with its tokens. Here the table is built
once per forward from the batch's position ids (they restart at 0 in every segment) and
shared by every layer, and each of q and k is rotated by one autograd function:

    out = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]
    dx  = g * cos + rotate_half^T(g * sin), rotate_half^T([y1, y2]) = [y2, -y1]

Backward needs only the (shared) cos/sin table, not x. Values are megatron's: the
frequencies are position * inv_freq (megatron's outer product), cos/sin taken in fp32 and
cast to the activations' dtype, the two halves of the table equal (non-interleaved RoPE).

Shapes: x [T, heads, hn]; cos/sin [T, 1, hn] in x's dtype.
"""

from __future__ import annotations

import torch


def packed_rope_table(
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    dtype: torch.dtype,
    interpolation: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [T, 1, hn] of the tokens' positions (position_ids of any shape, T elements;
    inv_freq [hn/2]); `interpolation`: megatron's seq_len_interpolation_factor."""
    pos = position_ids.reshape(-1).to(device=inv_freq.device, dtype=inv_freq.dtype)
    if interpolation is not None:
        pos = pos * (1 / interpolation)
    freqs = pos[:, None] * inv_freq[None, :]  # [T, hn/2], megatron's torch.outer
    freqs = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    return torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)


class _PackedRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        half = x.shape[-1] // 2
        out = x * cos
        out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
        out[..., half:].addcmul_(x[..., :half], sin[..., half:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        half = g.shape[-1] // 2
        dx = g * cos
        dx[..., :half].addcmul_(g[..., half:], sin[..., half:])
        dx[..., half:].addcmul_(g[..., :half], sin[..., :half], value=-1)
        return dx, None, None


def apply_packed_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, hn] by the table (cos, sin) [T, 1, hn] of `packed_rope_table`."""
    if x.shape[-1] % 2 or cos.shape[-1] != x.shape[-1] or cos.shape[0] != x.shape[0]:
        raise ValueError(
            f"apply_packed_rope: x {tuple(x.shape)} vs table {tuple(cos.shape)}: expected "
            "[T, heads, hn] and [T, 1, hn] with an even hn"
        )
    return _PackedRope.apply(x, cos, sin)
