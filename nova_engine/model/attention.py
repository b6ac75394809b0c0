"""Core attention for the megatron layer spec: padded (sbhd) and packed (thd) batches.

megatron's local `DotProductAttention` refuses `packed_seq_params`; this module replaces it
in every Nova layer spec. It receives q/k/v after the QKV projection and RoPE (megatron's
SelfAttention applies RoPE per sample when `packed_seq_params` carries cu_seqlens, so
positions restart at every sample) and returns the context in the shape megatron expects.

Backends, picked per call:
- packed (thd), CUDA: `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10; its causal
  flag changed from `is_causal=True` (2.10/2.11) to `window_size=(-1, 0)` (2.12+), and
  `enable_gqa` appeared in 2.12 — both handled), else flash-attn's varlen function when
  importable: flash-attn 3 (`flash_attn_interface`, Hopper) first, else 2.x (`flash_attn`),
  called by the installed function's own signature (3.x has no dropout_p, and some 3.x
  builds return (out, softmax_lse)), else the SDPA path below.
- packed (thd), CPU with AVX2 or AVX-512, fp32, head dim 8/16/32/64/96/128/256: Nova's C++
  kernel (`nova_engine._C.packed_attention_fwd/bwd`, csrc/attention.cpp): flash-style
  blocks per (segment, KV head) straight on the [T, heads, hn] layout, the query heads of a
  GQA group stacked so each K/V block serves all of them, nothing computed above the
  diagonal or across segments, log-sum-exp saved and P recomputed in backward. On a 2-core
  CPU with AVX-512, fwd+bwd of 4 query / 2 KV heads x 32: 2.4x ATen's CPU flash attention on
  the same segments for 256-token samples, 2.3x at 512, 1.5x at 4k
  (benchmarks/bench_packed_attention.py).
- packed (thd), other CPU dtypes and head dims (and fp32 on CUDA): segments grouped by
  length, one SDPA call with is_causal per group over [n, heads, L, hn] (shorter members
  right-padded, which never reaches their real tokens): cost and memory grow with the sum
  of the segments' squares, never with T^2 (`_plan` picks the groups by a cost model;
  cached per length tuple). One autograd function writes each group's output and q/k/v
  gradients straight into the [T, ...] results (every token is in one group), so backward
  does no per-group [T]-sized zero-fill and add, as autograd through slices / gathers
  would.
- padded (sbhd): SDPA, causal with the mask aligned bottom-right, so the same call serves
  a full forward, a prefill and decoding against megatron's KV cache (`padded_attention`).
  With an explicit mask (left-padded prompts) and GQA, K/V are expanded to the query heads
  off the CPU (`gqa_sdpa`): CUDA's memory-efficient / cuDNN kernels take a mask but not
  enable_gqa, and SDPA with both falls to the math backend, which materializes fp32
  [B, heads, S, K] scores (8.6 GB per layer call at 64 rows x 8 heads x 2048^2).

Shapes (np = query heads per TP rank, ng = KV groups per TP rank, hn = head dim):
  sbhd: q [S, B, np, hn], k/v [S, B, ng, hn] -> [S, B, np*hn]
  thd:  q [T, np, hn],    k/v [T, ng, hn]    -> [T, np*hn]
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from nova_engine import _C
from nova_engine.model.rope import apply_packed_rope
from nova_kernels._sync import host_sync_ok

if TYPE_CHECKING:
    from nova_engine.model.kv_cache import LayerKVCache


@lru_cache(maxsize=1)
def _flash_varlen_api() -> tuple[Callable[..., object], frozenset[str]] | None:
    """flash-attn's varlen function and its parameter names: flash-attn 3
    (`flash_attn_interface`) first, else 2.x (`flash_attn`); None when neither imports."""
    for module in ("flash_attn_interface", "flash_attn"):
        try:
            fn = importlib.import_module(module).flash_attn_varlen_func
        except Exception:  # noqa: BLE001 - optional accelerator
            continue
        params = inspect.signature(fn).parameters.values()
        return fn, frozenset("**" if p.kind is p.VAR_KEYWORD else p.name for p in params)
    return None


def _flash_varlen_kwargs(params: frozenset[str], scale: float) -> dict[str, object]:
    """Keyword arguments of a causal call for a flash-attn varlen signature (2.x: dropout_p,
    softmax_scale, causal; 3.x: no dropout_p); RuntimeError when the signature lacks one."""
    kwargs: dict[str, object] = {"softmax_scale": scale, "causal": True}
    if "dropout_p" in params:
        kwargs["dropout_p"] = 0.0
    missing = [name for name in kwargs if name not in params]
    if missing and "**" not in params:
        raise RuntimeError(
            f"flash-attn's flash_attn_varlen_func has no {missing} parameter: unsupported "
            f"flash-attn version (parameters {sorted(params)})"
        )
    return kwargs


def _flash_varlen(api, q, k, v, cu: torch.Tensor, max_len: int, scale: float) -> torch.Tensor:
    """Causal varlen attention through flash-attn 2.x or 3.x: the seven leading positional
    arguments (q, k, v, cu_seqlens_q/k, max_seqlen_q/k) are common to both, the rest go by
    the installed signature (GQA is native in both); a (out, softmax_lse) return (some 3.x
    builds) is unwrapped."""
    fn, params = api
    out = fn(q, k, v, cu, cu, max_len, max_len, **_flash_varlen_kwargs(params, scale))
    return out[0] if isinstance(out, tuple) else out


# torch.nn.attention.varlen.varlen_attn: out, or (out, aux) when aux is requested
_VarlenAttn = Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]


@lru_cache(maxsize=1)
def _varlen_api() -> tuple[_VarlenAttn, set[str]] | None:
    """torch.nn.attention.varlen.varlen_attn and its keyword names, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:  # noqa: BLE001 - torch < 2.10
        return None
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


def block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[T, T] bool mask, True where query i may attend to key j (same segment, j <= i).
    A reference for tests: the packed path never builds it (its cost is the square of T)."""
    pos = torch.arange(total, device=cu_seqlens.device)
    seg = torch.searchsorted(cu_seqlens[1:].to(torch.int64), pos, right=True)
    same = seg[:, None] == seg[None, :]
    return same & (pos[None, :] <= pos[:, None])


# Cost model of one SDPA call over n segments padded to length L, in units of one query-key
# pair of one head: _CALL_COST + n * (L^2 / 2 + _ROW_COST * L). Calibrated on a 2-core CPU
# (fwd+bwd, 4 heads x 32): a call's fixed cost ~ attention over a 96-token segment.
_CALL_COST = 4096.0
_ROW_COST = 48.0


@dataclass(frozen=True)
class _Group:
    """Segments run through one SDPA call: padded to `length` (right padding, is_causal)."""

    length: int
    count: int
    view_start: int  # >= 0: the segments are adjacent, all `length` long: a view of q/k/v
    gather_nL: torch.Tensor | None  # [n*L] token ids (clamped to each segment's last token)
    keep_rows: torch.Tensor | None  # [<= n*L] rows of the group's [n*L] that are real tokens
    real_rows: torch.Tensor | None  # [len(keep_rows)] the token id of each of those rows


@dataclass(frozen=True)
class _Plan:
    groups: tuple[_Group, ...]


def _partition(lengths_sorted: np.ndarray) -> list[int]:
    """Optimal split points of descending lengths into contiguous groups under the cost model
    (a group's padded length is its first, longest member). O(n^2) vectorized DP."""
    n = len(lengths_sorted)
    L = lengths_sorted.astype(np.float64)
    per_seg = L * L / 2 + _ROW_COST * L  # cost of one segment padded to L (L = group head)
    best = np.zeros(n + 1)
    cut = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):  # best[i]: segments 0..i-1 grouped; last group j..i-1
        j = np.arange(i)
        cost = best[:i] + _CALL_COST + (i - j) * per_seg[:i]
        k = int(np.argmin(cost))
        best[i], cut[i] = cost[k], k
    bounds, i = [], n
    while i > 0:
        bounds.append(i)
        i = int(cut[i])
    return [0] + bounds[::-1]


@lru_cache(maxsize=64)
def _plan(lengths: tuple[int, ...], device: torch.device) -> _Plan:
    """Group the segments of a packed batch (lengths in packed order) for batched SDPA."""
    lens = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    live = np.flatnonzero(lens > 0)
    by_len = live[np.argsort(-lens[live], kind="stable")]
    bounds = _partition(lens[by_len])
    groups = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        segs = np.sort(by_len[a:b])
        L = int(lens[segs].max())
        tok_nL = starts[segs][:, None] + np.arange(L)[None, :]
        keep_nL = np.arange(L)[None, :] < lens[segs][:, None]
        adjacent = bool(keep_nL.all()) and bool((np.diff(starts[segs]) == L).all())
        if adjacent:
            groups.append(_Group(L, len(segs), int(starts[segs[0]]), None, None, None))
            continue
        last = (starts[segs] + lens[segs] - 1)[:, None]
        gather = np.minimum(tok_nL, last).reshape(-1)
        keep = np.flatnonzero(keep_nL.reshape(-1))
        groups.append(
            _Group(
                L,
                len(segs),
                -1,
                *(torch.from_numpy(x).to(device) for x in (gather, keep, gather[keep])),
            )
        )
    return _Plan(tuple(groups))


def _group_inputs(g: _Group, ts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The group's rows of each [T, heads, hn] tensor as [n, heads, L, hn] (a view when the
    group's segments are adjacent and equal, else gathered, padding clamped to real rows)."""
    if g.view_start >= 0:
        rows = slice(g.view_start, g.view_start + g.count * g.length)
        ts = tuple(t[rows] for t in ts)
    else:
        assert g.gather_nL is not None
        ts = tuple(t.index_select(0, g.gather_nL) for t in ts)
    return tuple(t.unflatten(0, (g.count, g.length)).transpose(1, 2) for t in ts)


def _scatter_rows(dst_TNH: torch.Tensor, g: _Group, src_nNLH: torch.Tensor) -> None:
    """Write the real rows of a group's [n, heads, L, hn] result into dst [T, heads, hn]."""
    src = src_nNLH.transpose(1, 2).flatten(0, 1)  # [n*L, heads, hn]
    if g.view_start >= 0:
        dst_TNH[g.view_start : g.view_start + g.count * g.length] = src
    else:
        assert g.keep_rows is not None and g.real_rows is not None
        dst_TNH.index_copy_(0, g.real_rows, src.index_select(0, g.keep_rows))


def _sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


class _GroupedCausalAttention(torch.autograd.Function):
    """Per-group SDPA with the groups' results and gradients written straight into [T, ...]
    outputs: every token belongs to exactly one group, so nothing is summed, no [T]-sized
    zero tensor is made per group (what slicing / gathering under autograd would do) and
    padding rows get no gradient (their output gradient is 0 and no real query sees them:
    they sit after their segment's last token)."""

    @staticmethod
    def forward(ctx, q_TNH, k_TGH, v_TGH, plan, scale):
        out = q_TNH.new_empty(q_TNH.shape)
        graphs = []
        for g in plan.groups:
            q, k, v = (t.detach().requires_grad_() for t in _group_inputs(g, (q_TNH, k_TGH, v_TGH)))
            with torch.enable_grad():
                o = _sdpa(q, k, v, scale)
            leaves = (q, k, v)
            _scatter_rows(out, g, o.detach())
            graphs.append((leaves, o))
        ctx.plan, ctx.graphs = plan, graphs
        ctx.shapes = (q_TNH.shape, k_TGH.shape, v_TGH.shape)
        return out

    @staticmethod
    def backward(ctx, go_TNH):
        grads = [go_TNH.new_empty(shape) for shape in ctx.shapes]  # every row written below
        go_TNH = go_TNH.contiguous()
        for g, (leaves, o) in zip(ctx.plan.groups, ctx.graphs):
            if g.view_start >= 0:
                (go,) = _group_inputs(g, (go_TNH,))
            else:  # padding rows of the group get a zero output gradient
                flat = go_TNH.new_zeros(g.count * g.length, *go_TNH.shape[1:])
                flat.index_copy_(0, g.keep_rows, go_TNH.index_select(0, g.real_rows))
                go = flat.unflatten(0, (g.count, g.length)).transpose(1, 2)
            for dst, d in zip(grads, torch.autograd.grad(o, leaves, go)):
                _scatter_rows(dst, g, d)
        ctx.graphs = None
        return grads[0], grads[1], grads[2], None, None


def _grouped_causal_attention(
    q_TNH, k_TGH, v_TGH, cu: torch.Tensor, scale: float, cu_host: Sequence[int] | None = None
):
    """Causal attention per segment at the cost of the sum of the segments' squares: segments
    grouped by length (`_plan`), each group one SDPA call over [n, heads, L, hn] with
    is_causal (right padding of shorter members never reaches their real tokens). The plan is
    host arithmetic on `cu_host` (the batch's host boundaries); without it cu is read back."""
    cu_list = _full_boundaries(cu, q_TNH.shape[0], cu_host)
    lengths = tuple(b - a for a, b in zip(cu_list[:-1], cu_list[1:]))
    plan = _plan(lengths, q_TNH.device)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q_TNH, k_TGH, v_TGH)):
        return _GroupedCausalAttention.apply(q_TNH, k_TGH, v_TGH, plan, scale)
    out = q_TNH.new_empty(q_TNH.shape)
    for g in plan.groups:
        q, k, v = _group_inputs(g, (q_TNH, k_TGH, v_TGH))
        _scatter_rows(out, g, _sdpa(q, k, v, scale))
    return out


def _full_boundaries(
    cu: torch.Tensor, total: int, cu_host: Sequence[int] | None = None
) -> list[int]:
    """cu_seqlens as a list from 0 to `total`: tokens before cu[0] or after cu[-1] (legal,
    never in Nova's own batches) form segments of their own. `cu_host` (the same boundaries
    on the host, `PackedBatch.cu_seqlens_host`) spares reading cu back (a sync on a GPU)."""
    cu_list = [int(x) for x in cu_host] if cu_host is not None else cu.tolist()
    if not cu_list or cu_list[0] > 0:
        cu_list.insert(0, 0)
    if cu_list[-1] < total:
        cu_list.append(total)
    return cu_list


# The CPU kernel's instruction-set build: "" = the best this CPU runs (x86-64-v4 with
# AVX-512, else x86-64-v3 with AVX2 + FMA). Without either (the portable "baseline" build,
# far slower than AVX2) the grouped SDPA path is faster and is used instead. Tests set
# this to run each build.
_CPU_KERNEL_ISA = ""


@lru_cache(maxsize=1)
def _cpu_kernel_vectorized() -> bool:
    return _C.attention_isas()[-1] != "baseline"


def _use_cpu_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (
        q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype == torch.float32
        and _C.attention_supports_dim(q.shape[-1])
        and (bool(_CPU_KERNEL_ISA) or _cpu_kernel_vectorized())
    )


class _CpuPackedAttention(torch.autograd.Function):
    """Nova's C++ CPU kernel (csrc/attention.cpp) as an autograd function: q [T, np, hn],
    k/v [T, ng, hn] fp32, cu [S + 1] int64 from 0 to T. Saves q, k, v, out and the
    per-(head, token) log-sum-exp [np, T]; the backward recomputes P block by block."""

    @staticmethod
    def forward(ctx, q, k, v, cu, scale):
        q, k, v = (t.detach().contiguous() for t in (q, k, v))
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[1], q.shape[0])
        threads = torch.get_num_threads()
        with host_sync_ok("CPU attention kernel: takes host arrays by design"):
            _C.packed_attention_fwd(
                q.numpy(), k.numpy(), v.numpy(), cu.numpy(), scale, out.numpy(), lse.numpy(),
                threads, _CPU_KERNEL_ISA,
            )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, cu)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse, cu = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        with host_sync_ok("CPU attention kernel: takes host arrays by design"):
            _C.packed_attention_bwd(
                q.numpy(), k.numpy(), v.numpy(), out.numpy(), lse.numpy(), dout.numpy(),
                cu.numpy(), ctx.scale, dq.numpy(), dk.numpy(), dv.numpy(), torch.get_num_threads(),
                _CPU_KERNEL_ISA,
            )  # fmt: skip
        return dq, dk, dv, None, None


def _cpu_kernel_attention(q_TNH, k_TGH, v_TGH, cu: torch.Tensor, scale: float, cu_host=None):
    with host_sync_ok("CPU attention kernel: cu lives on the host (CPU-only path)"):
        cu64 = torch.tensor(_full_boundaries(cu, q_TNH.shape[0], cu_host), dtype=torch.int64)
    return _CpuPackedAttention.apply(q_TNH, k_TGH, v_TGH, cu64, float(scale))


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
    cu_seqlens_host: Sequence[int] | None = None,
) -> torch.Tensor:
    """Causal attention within each segment of a packed batch; returns [T, np, hn].
    max_seqlen (a host int) and cu_seqlens_host (the boundaries as host ints, optional)
    come with the batch: no path reads cu_seqlens back when they are given."""
    cu = cu_seqlens.to(device=q_TNH.device, dtype=torch.int32)
    if q_TNH.is_cuda and q_TNH.dtype in (torch.float16, torch.bfloat16):
        out = _varlen_torch(q_TNH, k_TGH, v_TGH, cu, int(max_seqlen), scale)
        if out is not None:
            return out
        flash = _flash_varlen_api()
        if flash is not None:
            return _flash_varlen(flash, q_TNH, k_TGH, v_TGH, cu, int(max_seqlen), scale)
    if _use_cpu_kernel(q_TNH, k_TGH, v_TGH):
        return _cpu_kernel_attention(q_TNH, k_TGH, v_TGH, cu, scale, cu_seqlens_host)
    return _grouped_causal_attention(q_TNH, k_TGH, v_TGH, cu, scale, cu_seqlens_host)


# mask types megatron may pass to a causal decoder layer: its own (causal / padding_causal),
# causal_bottom_right, and no_mask, which its KV-cache path passes for every step after the
# prompt (its kernels align a causal mask top-left, which would hide the cache from the query)
_CAUSAL_TYPES = (
    AttnMaskType.causal,
    AttnMaskType.padding_causal,
    AttnMaskType.causal_bottom_right,
    AttnMaskType.no_mask,
)


def gqa_sdpa(
    q_BNSH: torch.Tensor,
    k_BGKH: torch.Tensor,
    v_BGKH: torch.Tensor,
    scale: float,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    expand: bool | None = None,
) -> torch.Tensor:
    """SDPA over q [B, np, S, hn], k/v [B, ng, K, hn] (query head h uses KV group h // (np/ng),
    megatron's order). With a mask and GQA, `expand` (None: off the CPU) repeats K/V to the
    query heads instead of passing enable_gqa: SDPA's fused CUDA kernels that take a mask do
    not take enable_gqa, and the math fallback materializes the fp32 scores. On the CPU the
    call is SDPA's enable_gqa as before (CPU numerics unchanged)."""
    gqa = q_BNSH.shape[1] != k_BGKH.shape[1]
    if expand is None:
        expand = q_BNSH.device.type != "cpu"
    if gqa and attn_mask is not None and expand:
        rep = q_BNSH.shape[1] // k_BGKH.shape[1]
        k_BGKH, v_BGKH = (t.repeat_interleave(rep, dim=1) for t in (k_BGKH, v_BGKH))
        gqa = False
    return F.scaled_dot_product_attention(
        q_BNSH, k_BGKH, v_BGKH, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
        enable_gqa=gqa,
    )  # fmt: skip


def padded_attention(
    q_SBNH: torch.Tensor,
    k_KBGH: torch.Tensor,
    v_KBGH: torch.Tensor,
    scale: float,
    mask_type: AttnMaskType = AttnMaskType.causal,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of a padded batch, also against a KV cache; returns [S, B, np*hn].

    q [S, B, np, hn] holds the newest S positions of the K keys in k/v [K, B, ng, hn]
    (S == K: a full forward or a prefill; S < K: decoding against a KV cache). Query i sits
    at key position K - S + i and sees the keys j <= K - S + i: the causal mask aligned
    bottom-right, which is SDPA's is_causal when S == K and every cached key for a one-token
    query. `mask_type` must be one a causal layer can receive (causal, padding_causal,
    causal_bottom_right, or no_mask, which megatron's KV-cache path passes after the prompt:
    for a one-token query it is the same mask, for a few-token query the layer stays causal).

    attention_mask (optional, megatron's convention: bool, True = masked out) broadcasts to
    [B, 1, S, K]; a mask over a longer cache ([..., >= K]) is cut to the first K keys and,
    when it has more than S query rows, to rows K-S..K. Left padding is masked this way; a
    query always sees its own position, so a padding row that sees nothing else stays finite
    (a NaN there would reach real tokens through 0 * NaN in the next layer's attention).
    """
    if mask_type not in _CAUSAL_TYPES:
        raise ValueError(f"NovaCoreAttention is causal-only, got mask type {mask_type}")
    s, b, kl = q_SBNH.shape[0], q_SBNH.shape[1], k_KBGH.shape[0]
    if s > kl:
        raise ValueError(f"query of {s} positions against {kl} keys: expected S <= K")
    # [S, B, heads, hn] -> [B, heads, S, hn]
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q_SBNH, k_KBGH, v_KBGH))
    gqa = q.shape[1] != k.shape[1]
    if attention_mask is None and (s == kl or s == 1):
        # full forward / prefill: top-left is bottom-right; one query: every key is visible
        out = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1, scale=scale, enable_gqa=gqa)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
    qpos = torch.arange(kl - s, kl, device=q.device)
    kpos = torch.arange(kl, device=q.device)
    allowed = kpos[None, :] <= qpos[:, None]  # [S, K]
    if attention_mask is not None:
        m = attention_mask.to(device=q.device, dtype=torch.bool)
        while m.dim() < 4:
            m = m.unsqueeze(0)
        if m.shape[-1] < kl:
            raise ValueError(f"attention_mask covers {m.shape[-1]} keys, expected >= {kl}")
        m = m[..., :kl]
        if m.shape[-2] not in (1, s):
            if m.shape[-2] < kl:
                raise ValueError(
                    f"attention_mask has {m.shape[-2]} query rows, expected 1, {s} or >= {kl}"
                )
            m = m[..., kl - s : kl, :]
        allowed = (allowed & ~m) | (kpos[None, :] == qpos[:, None])
    out = gqa_sdpa(q, k, v, scale, attn_mask=allowed)
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)


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
        self.attn_mask_type = attn_mask_type
        # set for the duration of a generation call (nova_engine.model.kv_cache): an
        # object whose attend(q, k, v, scale) appends k/v of the new positions to this
        # layer's cache and attends over the whole cache
        self.decode_cache: LayerKVCache | None = None
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
            cu_host = None
            if cu is None:  # the batch's own boundaries: their host copy when it carries one
                cu = packed_seq_params.cu_seqlens_q
                cu_host = getattr(packed_seq_params, "cu_seqlens_host", None)
            rope = getattr(packed_seq_params, "rope", None)
            if rope is not None:  # Nova's packed RoPE (megatron's was switched off)
                query, key = (apply_packed_rope(t, *rope) for t in (query, key))
            out = packed_attention(
                query, key, value, cu, packed_seq_params.max_seqlen_q, self.softmax_scale, cu_host
            )
            return out.reshape(out.shape[0], -1)
        if self.decode_cache is not None:
            return self.decode_cache.attend(query, key, value, self.softmax_scale)
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        return padded_attention(query, key, value, self.softmax_scale, mask_type, attention_mask)
