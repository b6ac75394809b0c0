"""The KV cache of one batch, held in Nova's core attention for the duration of a generate
call, and the per-row RoPE positions that go with it.

Why not megatron's `StaticInferenceContext` cache: its attention stores keys before RoPE
and re-applies RoPE to every cached key at every step (`_adjust_key_value_for_inference`
returns the whole cache and `apply_rotary_pos_emb` runs on it; only the CUDA flash-decode
kernel path avoids that), an O(K) elementwise pass per layer and step that dominated a
decode step on CPU when profiled (benchmarks/bench_generate.py times decoding). Here
megatron's attention runs as in a plain forward over the step's new positions only (QKV,
RoPE of the new q/k), and
the core attention (`NovaCoreAttention.decode_cache`) appends the new k/v to this cache and
attends over it. megatron's static-context path stays correct with Nova's core attention
(tests/engine/test_decode_attention.py); the generate loop uses this one.

The per-layer pieces (`DecodeState`, `LayerKVCache`) live in nova_engine.model.kv_cache:
attention holds them, so they are a model concern; this module builds and drives them.

Layout: per layer k/v [B, ng, K, hn] (SDPA's [batch, heads, keys, dim], so a step's keys
are a prefix view, no copy). Prompts are left-padded: row b's first `pad[b]` slots are
padding that no query sees (a padding query sees itself only, so it stays finite).
Positions are per row: position = slot - pad[b], so each token has its true position.
The prefill runs in groups of rows (`begin_prefill`): a group writes its slots
P - P_group .. P - 1 and attends among its own new positions only (the slots before are
padding for it); decode steps (`begin_step`) then run every row over slots 0 .. o + S - 1.

Any attention implementation: megatron's attention only hands q/k/v of the step to its core
attention, so a layer whose core attention is not Nova's (Transformer Engine's spec, whose
DotProductAttention would attend over the step's own positions and ignore the cache) gets a
parameter-free `NovaCoreAttention` in its place for the call, restored afterwards; megatron's
fused RoPE (apply_rope_fusion, whose kernel takes one position per slot, not per row) is off
for the call too. A layer that has no core attention to replace is refused in one line.

Legend: B rows, ng KV groups per TP rank, np query heads per TP rank, K cache slots,
S new positions of a step, o slots filled before the step, hn head dim, d RoPE dim.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from megatron.core.transformer.enums import AttnMaskType

from nova_engine.model.attention import NovaCoreAttention
from nova_engine.model.kv_cache import DecodeState, LayerKVCache

if TYPE_CHECKING:
    from nova_engine.model.build import NovaGPTModel


def decode_core_attention(attn: torch.nn.Module, where: str) -> NovaCoreAttention:
    """The core attention that holds a layer's cache: the layer's own when it is Nova's,
    else a parameter-free stand-in with the same softmax scale (TE's spec, any other
    implementation: it would ignore the cache). ValueError when the layer has none."""
    core = getattr(attn, "core_attention", None)
    if isinstance(core, NovaCoreAttention):
        return core
    cfg = getattr(attn, "config", None)
    if core is None or cfg is None or not hasattr(attn, "num_query_groups_per_partition"):
        raise ValueError(
            f"generation: {where} ({type(attn).__name__}) has no megatron core attention to "
            f"hold the KV cache; build the model with Nova's or Transformer Engine's layer spec"
        )
    stand_in = NovaCoreAttention(
        cfg, attn.layer_number, AttnMaskType.causal, "self", softmax_scale=cfg.softmax_scale
    )
    return stand_in.to(next(attn.parameters()).device)


class BatchCache:
    """The caches of every layer of this rank's chunks for one batch, installed in their
    core attention (Nova's, swapped in where the layer has another: see the module
    docstring) and the per-row RoPE in their rotary module while active."""

    def __init__(self, models: Sequence[NovaGPTModel], pads_B: torch.Tensor, slots: int):
        self.models = models
        m0 = models[0]
        self.state = DecodeState(pads_B, slots, m0.rotary_pos_emb.inv_freq)
        self.layers: list[tuple[NovaCoreAttention, LayerKVCache]] = []
        # (attention module, its own core attention) of layers that get a stand-in
        self.swapped: list[tuple[torch.nn.Module, torch.nn.Module]] = []
        for m in models:
            for i, layer in enumerate(m.decoder.layers):
                attn = layer.self_attention
                core = decode_core_attention(attn, f"layer {i}")
                if core is not attn.core_attention:
                    self.swapped.append((attn, core))
                cache = LayerKVCache(
                    self.state, len(pads_B), attn.num_query_groups_per_partition,
                    attn.hidden_size_per_attention_head, m.config.params_dtype,
                )  # fmt: skip
                self.layers.append((core, cache))

    @contextlib.contextmanager
    def installed(self) -> Iterator[DecodeState]:
        own = [(attn, attn.core_attention) for attn, _ in self.swapped]
        fused = [(m.config, m.config.apply_rope_fusion) for m in self.models]
        for attn, stand_in in self.swapped:
            attn.core_attention = stand_in
        for core, cache in self.layers:
            core.decode_cache = cache
        for m in self.models:
            m.rotary_pos_emb.forward = self.state.rope  # instance attribute: __call__ uses it
            m.config.apply_rope_fusion = False  # per-row positions: megatron's unfused RoPE
        try:
            yield self.state
        finally:
            for core, _ in self.layers:
                core.decode_cache = None
            for attn, core in own:
                attn.core_attention = core
            for config, was in fused:
                config.apply_rope_fusion = was
            for m in self.models:
                m.rotary_pos_emb.__dict__.pop("forward", None)

    def keep_rows(self, keep_B: torch.Tensor) -> None:
        """Drop finished rows (their cache slots are copied out)."""
        self.state.keep_rows(keep_B)
        for _, cache in self.layers:
            cache.keep_rows(keep_B)

    def copy_rows(self, src_R: torch.Tensor, dst_R: torch.Tensor, slots: int) -> None:
        """Rows dst take the first `slots` cache slots of rows src (a shared prompt)."""
        for _, cache in self.layers:
            cache.copy_rows(src_R, dst_R, slots)

    @property
    def nbytes(self) -> int:
        return sum(c.k_BGKH.nbytes + c.v_BGKH.nbytes for _, c in self.layers)
