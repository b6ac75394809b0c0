"""Run a megatron model chunk on a packed batch (THD layout, no padding FLOPs).

A `PackedBatch` of T tokens goes in as a [1, T] "batch" with `PackedSeqParams` carrying its
cu_seqlens: megatron's attention then applies RoPE per segment (positions restart at every
sample) and Nova's core attention keeps every token inside its own segment. The padding at
the end of a batch is a segment of its own, so it never reaches a real token.

Outputs: logits [1, T, V/tp] — or, with `model.return_hidden`, final hidden states
[T, 1, H] ([T/tp, 1, H] under sequence parallelism; T must then be a multiple of tp).
On non-first pipeline stages the input comes from the previous stage (megatron's
set_input_tensor); the token ids are still passed and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from nova_engine.data.packing import PackedBatch


@dataclass
class NovaPackedSeqParams(PackedSeqParams):
    """megatron's PackedSeqParams plus the RoPE table of the batch's tokens: the model fills
    `rope` ((cos, sin) [T, 1, hn], `nova_engine.model.rope`) once per forward and Nova's core
    attention rotates q and k with it, instead of megatron's per-segment RoPE."""

    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    cu_seqlens_host: tuple[int, ...] | None = None
    """cu_seqlens as host ints (`PackedBatch.cu_seqlens_host`): attention plans from them
    instead of reading the device tensor back (no stream sync per layer)."""


def packed_seq_params(batch: PackedBatch) -> NovaPackedSeqParams:
    cu = batch.cu_seqlens.to(torch.int32)
    return NovaPackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=int(batch.max_seqlen),
        max_seqlen_kv=int(batch.max_seqlen),
        cu_seqlens_host=batch.cu_seqlens_host,
    )


def packed_forward(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """One forward of `model` (a chunk, possibly DDP-wrapped) over `batch`."""
    tokens = batch.tokens.unsqueeze(0)
    positions = batch.position_ids.unsqueeze(0)
    return model(tokens, positions, attention_mask=None, packed_seq_params=packed_seq_params(batch))
