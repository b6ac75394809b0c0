"""The layer-level KV cache that Nova's core attention (nova_engine.model.attention) attends
over while a generate call is active: `DecodeState` (what every layer's cache shares: slots
filled, row padding, the step's mask and RoPE angles) and `LayerKVCache` (one layer's k/v).
It is a model concern: attention holds it; nova_engine.generate.kv_cache builds one per layer
for a batch (`BatchCache`) and drives the prefill and decode steps (see its docstring for the
layout and why not megatron's inference context).

Legend: B rows, ng KV groups per TP rank, np query heads per TP rank, K cache slots,
S new positions of a step, o slots filled before the step, hn head dim, d RoPE dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nova_engine.model.attention import gqa_sdpa


class DecodeState:
    """What every layer's cache shares: slots filled, row padding, the step's mask and the
    RoPE angles of the step's positions."""

    def __init__(self, pads_B: torch.Tensor, slots: int, inv_freq: torch.Tensor):
        self.device = inv_freq.device
        self.pads_B = pads_B.to(self.device)
        self.has_pad = bool((pads_B > 0).any())
        self.slots = slots
        self.inv_freq = inv_freq
        self.filled = 0  # o
        self.step_len = 0  # S
        self.rows_R: torch.Tensor | None = None  # a prefill group's rows (None: all rows)
        self.start = 0  # the group's first slot
        self.mask_B1SK: torch.Tensor | None = None
        self.causal = False
        self.emb_SB1D: torch.Tensor | None = None
        # sliced at each one-token step: which slots hold real tokens ([B, 1, 1, K]) and,
        # from `end_prefill`, the angles of every decode slot of every row
        self.real_B11K = (torch.arange(slots, device=self.device) >= self.pads_B[:, None])[
            :, None, None, :
        ]
        self.decode_start = slots
        self.emb_TB1D = self._table(torch.arange(0, device=self.device), self.pads_B)

    def _table(self, slot_S: torch.Tensor, pads_B: torch.Tensor) -> torch.Tensor:
        pos_SB = (slot_S[:, None] - pads_B[None, :]).clamp_min(0)
        f = pos_SB.to(self.inv_freq.dtype)[..., None] * self.inv_freq  # as megatron: p * f
        return torch.cat((f, f), dim=-1)[:, :, None, :]

    def _angles(self, slot_S: torch.Tensor, pads_B: torch.Tensor) -> None:
        self.emb_SB1D = self._table(slot_S, pads_B)

    def begin_prefill(self, rows_R: torch.Tensor, start: int, s: int) -> None:
        """A prefill group: rows `rows_R` take slots start..start+S-1 (their prompts end at
        the last prompt slot, every slot before `start` is padding for them), attending only
        among themselves (the group's own left padding masked)."""
        self.rows_R, self.start, self.step_len = rows_R, start, s
        slot_S = torch.arange(start, start + s, device=self.device)
        pads_R = self.pads_B.index_select(0, rows_R)
        self._angles(slot_S, pads_R)
        self.causal, self.mask_B1SK = True, None
        if bool((pads_R > start).any()):
            key_S = slot_S
            allowed = key_S[None, :] <= slot_S[:, None]
            real = key_S[None, :] >= pads_R[:, None]
            own = key_S[None, :] == slot_S[:, None]
            self.causal = False
            self.mask_B1SK = ((allowed[None] & real[:, None, :]) | own[None])[:, None]

    def end_prefill(self, prompt_slots: int) -> None:
        self.rows_R = None
        self.filled = self.decode_start = prompt_slots
        self.emb_TB1D = self._table(
            torch.arange(prompt_slots, self.slots, device=self.device), self.pads_B
        )

    def begin_step(self, s: int) -> None:
        """Prepare the mask and the RoPE angles of the next S positions of every row."""
        o, k = self.filled, self.filled + s
        if k > self.slots:
            raise RuntimeError(f"KV cache of {self.slots} slots cannot take {k}")
        self.step_len = s
        self.causal = False
        if s == 1:  # one query per row: every real key
            self.mask_B1SK = self.real_B11K[..., :k] if self.has_pad else None
            t = o - self.decode_start
            if t >= 0:
                self.emb_SB1D = self.emb_TB1D[t : t + 1]
            else:
                self._angles(torch.arange(o, k, device=self.device), self.pads_B)
            return
        slot_S = torch.arange(o, k, device=self.device)
        self._angles(slot_S, self.pads_B)
        self.mask_B1SK = None
        if not self.has_pad and o == 0:
            self.causal = True  # a prefill without padding: SDPA's causal mask
            return
        key_K = torch.arange(k, device=self.device)
        allowed_SK = key_K[None, :] <= slot_S[:, None]
        real_BK = key_K[None, :] >= self.pads_B[:, None]
        own_SK = key_K[None, :] == slot_S[:, None]
        self.mask_B1SK = ((allowed_SK[None] & real_BK[:, None, :]) | own_SK[None])[:, None]

    def end_step(self) -> None:
        self.filled += self.step_len

    def rope(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        """Stands in for megatron's RotaryEmbedding.forward: [S, B, 1, d] angles of the
        step's positions (megatron's own table is [S, 1, 1, d], one position per slot)."""
        if max_seq_len != self.step_len or offset:
            raise RuntimeError(
                f"RoPE asked for {max_seq_len} positions, the step has {self.step_len}"
            )
        return self.emb_SB1D

    def keep_rows(self, keep_B: torch.Tensor) -> None:
        self.pads_B = self.pads_B.index_select(0, keep_B)
        self.has_pad = bool((self.pads_B > 0).any())
        self.emb_TB1D = self.emb_TB1D.index_select(1, keep_B)
        self.real_B11K = self.real_B11K.index_select(0, keep_B)


class LayerKVCache:
    """One layer's k/v [B, ng, K, hn]; `attend` is what NovaCoreAttention calls."""

    def __init__(self, state: DecodeState, rows: int, groups: int, head_dim: int, dtype):
        self.state = state
        shape = (rows, groups, state.slots, head_dim)
        # zeros: a prefill group leaves the slots before its start unwritten, and a masked
        # key still enters SDPA's product as 0 x value (NaN garbage would poison the row)
        self.k_BGKH = torch.zeros(shape, dtype=dtype, device=state.device)
        self.v_BGKH = torch.zeros(shape, dtype=dtype, device=state.device)

    def attend(self, q_SBNH, k_SBGH, v_SBGH, scale: float) -> torch.Tensor:
        """Append the step's k/v [S, B, ng, hn]; attention of q [S, B, np, hn] over the
        filled cache -> [S, B, np*hn]."""
        st = self.state
        s = q_SBNH.shape[0]
        if st.rows_R is not None:  # a prefill group: store, attend among the new positions
            k_BGSH, v_BGSH = k_SBGH.permute(1, 2, 0, 3), v_SBGH.permute(1, 2, 0, 3)
            self.k_BGKH[st.rows_R, :, st.start : st.start + s] = k_BGSH
            self.v_BGKH[st.rows_R, :, st.start : st.start + s] = v_BGSH
            # masked GQA: K/V expanded on GPU, never SDPA's fp32-score math fallback
            out = gqa_sdpa(
                q_SBNH.permute(1, 2, 0, 3), k_BGSH, v_BGSH, scale, attn_mask=st.mask_B1SK,
                is_causal=st.causal,
            )  # fmt: skip
            return out.permute(2, 0, 1, 3).reshape(s, q_SBNH.shape[1], -1)
        o = st.filled
        k = o + s
        self.k_BGKH[:, :, o:k] = k_SBGH.permute(1, 2, 0, 3)
        self.v_BGKH[:, :, o:k] = v_SBGH.permute(1, 2, 0, 3)
        b, g = q_SBNH.shape[1], self.k_BGKH.shape[1]
        if s == 1:
            # one position: the query heads of a KV group become that group's "query rows"
            # ([B, ng, np/ng, hn]; megatron orders query heads group by group), which SDPA
            # runs faster on CPU than enable_gqa (decode at B 32, K 640: benchmarks/)
            q = q_SBNH.reshape(b, g, -1, q_SBNH.shape[-1])
            out = F.scaled_dot_product_attention(
                q, self.k_BGKH[:, :, :k], self.v_BGKH[:, :, :k], attn_mask=st.mask_B1SK,
                scale=scale,
            )  # fmt: skip
            return out.reshape(1, b, -1)
        q = q_SBNH.permute(1, 2, 0, 3)
        out = gqa_sdpa(
            q, self.k_BGKH[:, :, :k], self.v_BGKH[:, :, :k], scale, attn_mask=st.mask_B1SK,
            is_causal=st.causal,
        )  # fmt: skip
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def keep_rows(self, keep_B: torch.Tensor) -> None:
        self.k_BGKH = self.k_BGKH.index_select(0, keep_B)
        self.v_BGKH = self.v_BGKH.index_select(0, keep_B)

    def copy_rows(self, src_R: torch.Tensor, dst_R: torch.Tensor, slots: int) -> None:
        self.k_BGKH[dst_R, :, :slots] = self.k_BGKH[src_R, :, :slots]
        self.v_BGKH[dst_R, :, :slots] = self.v_BGKH[src_R, :, :slots]
