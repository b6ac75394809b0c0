"""Fused vocab-parallel log-probs: log p(target) per token (and entropy) from the last hidden
states and this rank's LM-head shard, forward and backward, without an [N, V] tensor.

    logp, ent = linear_logprobs(hidden_NH, w_VpH, targets_N, tp_group=g, return_entropy=True)

Legend: N tokens (rows), H hidden size, V global vocab, Vp = V / tp the vocab shard of this
rank (rows rank*Vp ... rank*Vp+Vp-1 of the full LM head, as megatron's VocabParallelEmbedding
pads the vocab to a multiple of tp), S vocab splits of the Triton forward, Nc x Vc one chunk of
the bounded workspace. z = hidden @ W.T are the logits (never materialized beyond a chunk).

Math. lse = log sum_j exp z_j; logp_t = z_t - lse; p_j = exp(z_j - lse); mu = E_p[z];
entropy S = lse - mu. d logp_t / dz_j = 1[j=t] - p_j; dS/dz_j = -p_j (z_j - mu). With upstream
grads g (log-probs) and e (entropy): dz_j = g (1[j=t] - p_j) - e p_j (z_j - mu);
grad_hidden = dz @ W, grad_W = dz.T @ hidden. With a temperature T (`temperature=`, RL at the
sampling temperature) z = hidden @ W.T / T throughout: the kernels scale the fp32 logit tile
by 1/T, and dz w.r.t. the raw logits gets the extra factor 1/T (folded into dz).

Forward. Each rank reduces its shard to per-row statistics with an online logsumexp over
vocab tiles: running max m, s = sum exp(z - m), a = sum exp(z - m)(z - m) (for the entropy:
shifted so that no cancellation occurs), t = the target logit when the target lies in the
shard (else 0). Partial statistics (Triton vocab splits, then TP ranks) combine exactly:
M = max m_r; s = sum s_r e^(m_r-M); a = sum e^(m_r-M) (a_r + (m_r - M) s_r); t = sum t_r,
i.e. one all_reduce(MAX) and one all_reduce(SUM) of [3, N] over the TP group. Then
lse = M + log s and mu = M + a / s. Only lse and mu ([N] fp32 each) are saved.

Backward recomputes the logits chunk by chunk (vocab chunks of Vc columns outer, row chunks of
Nc rows inner, Nc*Vc <= _WORKSPACE_ELEMS) and writes dz for the chunk into a bounded workspace;
the two gradient GEMMs of the chunk (grad_hidden[rows] += dz @ W[cols] in an fp32 accumulator,
grad_W[cols] = dz.T @ hidden[rows]) go to torch.mm, i.e. cuBLAS on GPU, which is at the GEMM
floor already (the Triton kernel fuses what cuBLAS cannot: the recompute with the softmax
derivative). So the "triton" backend = Triton forward-statistics kernel + Triton dlogits kernel +
cuBLAS gradient GEMMs; the "torch" backend does the same loop with torch ops (production on CPU).

Memory: O(N*H + Vp*H) (the fp32 grad_hidden accumulator is N*H*4 bytes) plus the workspace
(_WORKSPACE_ELEMS elements of dz, and for the torch path a few fp32 chunks of the same size;
_CPU_WORKSPACE_ELEMS on CPU).

Performance note (the H100 bar "fwd+bwd <= 1.15 x three N*H*V GEMMs"). Per-token log-probs
with an arbitrary upstream gradient cost 4 GEMMs here: the forward must finish the logsumexp
over the whole vocab before any p_j is known, so dz cannot be formed in the forward pass without
either holding [N, V] logits or knowing the upstream gradient in advance: 4/3 = 1.33 > 1.15 by
construction. When the upstream gradient IS known at forward time (SFT's weighted token sum),
`nova_kernels.linear_cross_entropy` forms the grads in the forward pass in 3 GEMMs.

Sequence parallel: with `sequence_parallel=True` hidden is this rank's [N/tp, H] slice of the
sequence dimension; the function all-gathers it (rank-major, as megatron) in forward and
again in backward (nothing gathered is saved), and reduce-scatters grad_hidden. Without SP and
tp > 1 hidden is replicated and grad_hidden is all-reduced over the TP group: the function
replaces megatron's ColumnParallelLinear output layer + vocab_parallel_cross_entropy. targets
and outputs are always the full [N] rows (replicated over the TP group).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import interpreting, resolve_backend
from .._common import _acc_dtype, empty
from .._vocab_parallel import (
    _check,
    _local_targets,
    _reduce_grad_hidden,
    _sp_gather,
    _tp_combine,
    _tp_info,
)
from . import _linear_configs as _cfg

_NEG = -1.0e30  # finite "-inf" for running maxima: keeps (-inf) * 0 NaNs out of the rescaling
_WORKSPACE_ELEMS = 1 << 26  # bound on one chunk of logits / dlogits (elements), 128 MiB in bf16
_CPU_WORKSPACE_ELEMS = 1 << 22  # on CPU (16 MiB fp32 chunks are plenty for a CPU GEMM)
_MIN_VCHUNK = 1024  # narrowest vocab chunk before rows are chunked too (GEMM efficiency)


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _logits_tile(
    h_ptr,  # [N, H] hidden rows, row stride stride_h, unit column stride
    w_ptr,  # [V, H] weight rows, row stride stride_w
    rows64,  # [BLOCK_N] int64 row ids
    row_ok,  # [BLOCK_N] bool
    cols64,  # [BLOCK_V] int64 vocab ids (rows of w)
    col_ok,  # [BLOCK_V] bool
    H,
    stride_h,
    stride_w,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CAST_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """z = h[rows] @ w[cols].T as a [BLOCK_N, BLOCK_V] fp32 tile, accumulated over H in
    BLOCK_K steps (masked rows / columns read as 0)."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        hb = tl.load(
            h_ptr + rows64[:, None] * stride_h + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        wb = tl.load(
            w_ptr + cols64[None, :] * stride_w + ks[:, None],
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if CAST_FP32:
            hb = hb.to(tl.float32)
            wb = wb.to(tl.float32)
        acc = tl.dot(hb, wb, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _fwd_stats_kernel(
    h_ptr,  # [N, H] hidden, input dtype, row stride stride_h, unit column stride
    w_ptr,  # [Vp, H] weight shard, row stride stride_w
    tgt_ptr,  # [N] int64 target id local to the shard, -1 when elsewhere / ignored
    m_ptr,  # [S, N] fp32 out: running max of each vocab split
    s_ptr,  # [S, N] fp32 out: sum exp(z - m)
    a_ptr,  # [S, N] fp32 out: sum exp(z - m) (z - m) (written only WITH_ENTROPY)
    t_ptr,  # [S, N] fp32 out: target logit when in the split, else 0
    N,
    H,
    Vp,
    stride_h,
    stride_w,
    INV_T,  # fp32 1 / temperature: z = (h @ W.T) * INV_T
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    CAST_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    cols_per_split = tl.cdiv(tl.cdiv(Vp, n_splits), BLOCK_V) * BLOCK_V
    v_begin = pid_s * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, Vp)

    m = tl.full([BLOCK_N], -1.0e30, tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    a = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        cols64 = cols.to(tl.int64)
        acc = _logits_tile(
            h_ptr,
            w_ptr,
            rows64,
            row_ok,
            cols64,
            col_ok,
            H,
            stride_h,
            stride_w,
            BLOCK_N,
            BLOCK_V,
            BLOCK_K,
            CAST_FP32,
            DOT_PRECISION,
        )
        z = tl.where(col_ok[None, :], acc * INV_T, -1.0e30)  # finite: no 0 * inf below
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        d = z - m_new[:, None]
        e = tl.exp(d)
        if WITH_ENTROPY:
            a = alpha * (a + (m - m_new) * s) + tl.sum(e * d, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        hit = (cols[None, :] == tgt[:, None]) & col_ok[None, :]
        t += tl.sum(tl.where(hit, z, 0.0), axis=1)
        m = m_new
    out = pid_s * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(t_ptr + out, t, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(a_ptr + out, a, mask=row_ok)


@triton.jit
def _bwd_dlogits_kernel(
    h_ptr,  # [Nc, H] hidden rows of the chunk, row stride stride_h
    w_ptr,  # [Vc, H] weight rows of the chunk, row stride stride_w
    tgt_ptr,  # [Nc] int64 shard-local target id, -1 when elsewhere / ignored
    lse_ptr,  # [Nc] fp32 global logsumexp
    mu_ptr,  # [Nc] fp32 global E_p[z] (read only WITH_ENTROPY)
    glp_ptr,  # [Nc] fp32 upstream grad of logp (0 on ignored rows)
    gent_ptr,  # [Nc] fp32 upstream grad of entropy (read only WITH_ENTROPY)
    dz_ptr,  # [Nc, Vc] out: dlogits, workspace dtype, row stride stride_dz
    n_rows,
    n_cols,
    col0,
    H,
    stride_h,
    stride_w,
    stride_dz,
    INV_T,  # fp32 1 / temperature
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    CAST_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    acc = _logits_tile(
        h_ptr,
        w_ptr,
        rows64,
        row_ok,
        cols64,
        col_ok,
        H,
        stride_h,
        stride_w,
        BLOCK_N,
        BLOCK_V,
        BLOCK_K,
        CAST_FP32,
        DOT_PRECISION,
    )
    acc = acc * INV_T  # the tempered logits
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    glp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    p = tl.exp(acc - lse[:, None])
    dz = tl.where((cols[None, :] + col0) == tgt[:, None], glp[:, None], 0.0) - glp[:, None] * p
    if WITH_ENTROPY:
        mu = tl.load(mu_ptr + rows, mask=row_ok, other=0.0)
        gent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
        dz -= gent[:, None] * p * (acc - mu[:, None])
    dz = dz * INV_T  # d/d(raw logits) = d/d(tempered logits) / T
    tl.store(
        dz_ptr + rows64[:, None] * stride_dz + cols64[None, :],
        dz.to(dz_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


_TUNED: dict[tuple[str, str], object] = {}  # NOVA_AUTOTUNE=1 wrappers per (kernel, dtype class)


def _kernel(name: str, dtype: torch.dtype, n_cols: int):
    """(kernel, meta-params) of one launch over n_cols vocab columns: the interpreter's fixed
    tiles; by default the deterministic selector's config (a pure function of the kernel, the
    dtype class and the bucketed vocab width, never N: see ._linear_configs); with
    NOVA_AUTOTUNE=1 Triton's timing autotuner over the same spill-free candidates, keyed on H
    (not resume-exact)."""
    base = {"fwd": _fwd_stats_kernel, "bwd": _bwd_dlogits_kernel}[name]
    if interpreting():
        return base, dict(_cfg.INTERP_META)
    if _cfg.autotune_enabled():
        key = (name, _cfg.dtype_class(dtype))
        if key not in _TUNED:
            _TUNED[key] = triton.autotune(_cfg.autotune_configs(name, dtype), key=["H"])(base)
        return _TUNED[key], {}
    cfg = _cfg.select(name, dtype, n_cols)
    return base, {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _dot_flags(x: torch.Tensor) -> dict:
    return _cfg.dot_flags(x.dtype, interpreting())


# ----------------------------------------------------------------------------- launchers


def _triton_stats(h_NH, w_VpH, tgt_N, with_entropy, inv_t=1.0):
    """Per-row (m, s, a, t) of the logits times inv_t over this shard: Triton vocab splits,
    merged here. -> 4 x [N] fp32"""
    N, H = h_NH.shape
    Vp = w_VpH.shape[0]
    kernel, meta = _kernel("fwd", h_NH.dtype, Vp)
    if interpreting() or not h_NH.is_cuda:
        n_splits = min(2, triton.cdiv(Vp, 64))
    else:  # enough programs to fill the GPU when N is small
        sms = torch.cuda.get_device_properties(h_NH.device).multi_processor_count
        n_splits = max(1, min(triton.cdiv(Vp, 1024), triton.cdiv(2 * sms, triton.cdiv(N, 128))))
    stats = empty(4, n_splits, N, device=h_NH.device, dtype=torch.float32)
    grid = lambda META: (triton.cdiv(N, META["BLOCK_N"]), n_splits)
    kernel[grid](
        h_NH,
        w_VpH,
        tgt_N,
        stats[0],
        stats[1],
        stats[2],
        stats[3],
        N,
        H,
        Vp,
        h_NH.stride(0),
        w_VpH.stride(0),
        float(inv_t),
        WITH_ENTROPY=with_entropy,
        **_dot_flags(h_NH),
        **meta,
    )
    if not with_entropy:
        stats[2].zero_()
    return _merge(stats[0], stats[1], stats[2], stats[3])


def _triton_dlogits(
    h_nH, w_vH, tgt_n, col0, lse_n, mu_n, glp_n, gent_n, with_entropy, ws, inv_t=1.0
):
    """dz (w.r.t. the raw logits) for one chunk, written into the workspace view ws [n, v]
    and returned."""
    n_rows, H = h_nH.shape
    n_cols = w_vH.shape[0]
    kernel, meta = _kernel("bwd", h_nH.dtype, n_cols)
    grid = lambda META: (triton.cdiv(n_rows, META["BLOCK_N"]), triton.cdiv(n_cols, META["BLOCK_V"]))
    kernel[grid](
        h_nH,
        w_vH,
        tgt_n,
        lse_n,
        mu_n,
        glp_n,
        gent_n,
        ws,
        n_rows,
        n_cols,
        col0,
        H,
        h_nH.stride(0),
        w_vH.stride(0),
        ws.stride(0),
        float(inv_t),
        WITH_ENTROPY=with_entropy,
        **_dot_flags(h_nH),
        **meta,
    )
    return ws


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """GEMM dtype of the chunked paths: the input dtype on GPU, fp32 on CPU (no fast bf16 GEMM
    on most CPUs, and it keeps the CPU path at fp32 accuracy); fp64 stays fp64."""
    return x.dtype if x.is_cuda or x.dtype == torch.float64 else torch.float32


def _budget(device: torch.device) -> int:
    return (
        _WORKSPACE_ELEMS if device.type == "cuda" else min(_WORKSPACE_ELEMS, _CPU_WORKSPACE_ELEMS)
    )


def _chunks(n: int, vp: int, budget: int) -> tuple[int, int]:
    """(Nc, Vc) with Nc * Vc <= budget (or one minimal chunk when that is smaller)."""
    if n * vp <= budget:
        return max(n, 1), max(vp, 1)
    vc = min(vp, max(_MIN_VCHUNK, budget // max(n, 1)))
    return max(1, min(n, budget // vc)), vc


def _merge(m_SN, s_SN, a_SN, t_SN):
    """Combine per-split statistics [S, N] (or already [N]) into [N]. See module docstring."""
    if m_SN.dim() == 1:
        return m_SN, s_SN, a_SN, t_SN
    M = m_SN.amax(0)
    scale = torch.exp(m_SN - M)
    s = (s_SN * scale).sum(0)
    a = (scale * (a_SN + (m_SN - M) * s_SN)).sum(0)
    return M, s, a, t_SN.sum(0)


def _torch_stats(h_NH, w_VpH, tgt_N, with_entropy, inv_t=1.0):
    """Chunked PyTorch statistics of the logits times inv_t over this shard (online
    logsumexp). -> 4 x [N] fp32"""
    N, Vp = h_NH.shape[0], w_VpH.shape[0]
    nc, vc = _chunks(N, Vp, _budget(h_NH.device))
    cdt, acc = _compute_dtype(h_NH), _acc_dtype(h_NH)
    m = torch.full((N,), _NEG, device=h_NH.device, dtype=acc)
    s, a, t = (torch.zeros(N, device=h_NH.device, dtype=acc) for _ in range(3))
    for c0 in range(0, Vp, vc):
        w_c = w_VpH[c0 : c0 + vc].to(cdt)
        for r0 in range(0, N, nc):
            r = slice(r0, r0 + nc)
            z = (h_NH[r].to(cdt) @ w_c.T).to(acc)  # [nc, vc]
            if inv_t != 1.0:
                z.mul_(inv_t)
            m_new = torch.maximum(m[r], z.amax(1))
            alpha = torch.exp(m[r] - m_new)
            tl_ = tgt_N[r] - c0
            hit = (tl_ >= 0) & (tl_ < z.shape[1])
            t[r] += torch.where(hit, z.gather(1, tl_.clamp(0, z.shape[1] - 1)[:, None])[:, 0], 0.0)
            d = z.sub_(m_new[:, None])
            e = torch.exp(d)
            if with_entropy:
                a[r] = alpha * (a[r] + (m[r] - m_new) * s[r]) + (e * d).sum(1)
            s[r] = alpha * s[r] + e.sum(1)
            m[r] = m_new
    return m, s, a, t


def _torch_dlogits(
    h_nH, w_vH, tgt_n, col0, lse_n, mu_n, glp_n, gent_n, with_entropy, ws, inv_t=1.0
):
    """dz (w.r.t. the raw logits) for one chunk with torch ops ([n, v] in the compute dtype;
    ws unused)."""
    cdt = _compute_dtype(h_nH)
    z = (h_nH.to(cdt) @ w_vH.to(cdt).T).to(lse_n.dtype)
    if inv_t != 1.0:
        z.mul_(inv_t)
    p = torch.exp(z - lse_n[:, None])
    if with_entropy:
        dz = p * (z.sub_(mu_n[:, None])).mul_(gent_n[:, None])
        dz.add_(p * glp_n[:, None]).neg_()
    else:
        dz = p.mul_(-glp_n[:, None])
    tl_ = tgt_n - col0
    hit = (tl_ >= 0) & (tl_ < z.shape[1])  # masked scatter: no host sync per chunk
    tcol = tl_.clamp(0, z.shape[1] - 1)[:, None]
    dz.scatter_add_(1, tcol, torch.where(hit, glp_n, 0.0)[:, None].to(dz.dtype))
    if inv_t != 1.0:
        dz.mul_(inv_t)
    return dz.to(cdt)


_STATS = {"triton": _triton_stats, "torch": _torch_stats}
_DLOGITS = {"triton": _triton_dlogits, "torch": _torch_dlogits}


def _grads(
    h_NH, w_VpH, tgt_N, lse_N, mu_N, glp_N, gent_N, with_entropy, backend, need_h, need_w,
    inv_t=1.0,
):  # fmt: skip
    """grad_hidden [N, H] fp32 (or None), grad_W [Vp, H] in W's dtype (or None); lse / mu
    are those of the tempered logits z * inv_t, and the 1/T of the chain rule is folded into
    dz (grad_hidden = (dz/T) @ W, grad_W = (dz/T).T @ hidden)."""
    N, H = h_NH.shape
    Vp = w_VpH.shape[0]
    nc, vc = _chunks(N, Vp, _budget(h_NH.device))
    cdt, acc = _compute_dtype(h_NH), _acc_dtype(h_NH)
    dev = h_NH.device
    grad_h = torch.zeros(N, H, device=dev, dtype=acc) if need_h else None
    grad_w = torch.empty_like(w_VpH) if need_w else None
    ws = empty(nc * vc, device=dev, dtype=cdt) if backend == "triton" else None
    mu_N = mu_N if with_entropy else lse_N  # placeholders: the kernel does not read them
    gent_N = gent_N if with_entropy else glp_N
    for c0 in range(0, Vp, vc):
        w_c = w_VpH[c0 : c0 + vc]
        w_cc = w_c.to(cdt)
        gw = None
        for r0 in range(0, N, nc):
            r = slice(r0, r0 + nc)
            h_r = h_NH[r]
            n, v = h_r.shape[0], w_c.shape[0]
            ws_view = ws[: n * v].view(n, v) if ws is not None else None
            dz = _DLOGITS[backend](
                h_r,
                w_c,
                tgt_N[r],
                c0,
                lse_N[r],
                mu_N[r],
                glp_N[r],
                gent_N[r],
                with_entropy,
                ws_view,
                inv_t,
            )
            if grad_h is not None:
                if cdt == acc:
                    grad_h[r].addmm_(dz, w_cc)
                else:
                    grad_h[r] += (dz @ w_cc).to(acc)
            if need_w:
                part = dz.T @ h_r.to(cdt)
                gw = part.to(acc) if gw is None else gw.add_(part)
        if grad_w is not None:
            assert gw is not None  # N >= 1: every row chunk added its part
            grad_w[c0 : c0 + vc] = gw
    return grad_h, grad_w


# ----------------------------------------------------------------------------- autograd


class LinearLogprobsFunction(torch.autograd.Function):
    """(hidden, weight, targets) -> (logp [N] fp32, entropy [N] fp32 or an empty tensor)."""

    @staticmethod
    def forward(
        ctx, hidden, weight, targets, tp_group, ignore_index, with_entropy, sp, backend, inv_t
    ):
        tp, rank = _tp_info(tp_group)
        sp = bool(sp) and tp > 1
        h_NH = (_sp_gather(hidden, tp_group, tp) if sp else hidden).contiguous()
        w_VpH = weight.contiguous()
        vp = w_VpH.shape[0]
        tgt_N = _local_targets(targets, rank * vp, vp, ignore_index)
        m, s, a, t = _STATS[backend](h_NH, w_VpH, tgt_N, with_entropy, inv_t)
        m, s, a, t = _tp_combine(m, s, a, t, tp_group, tp, with_entropy)
        lse = m + torch.log(s)
        valid = targets != ignore_index
        logp = torch.where(valid, t - lse, 0.0)
        if with_entropy:
            # S = lse - mu = (m + log s) - (m + a/s): subtracting the two large terms cancels
            # catastrophically at large logits (|m| ~ 100: ~1% relative error on low-entropy
            # rows), so form S from the small terms directly.
            mu = m + a / s
            ent = torch.where(valid, torch.log(s) - a / s, 0.0)
        else:
            mu = ent = lse.new_empty(0)
            ctx.mark_non_differentiable(ent)
        ctx.save_for_backward(hidden if sp else h_NH, w_VpH, tgt_N, valid, lse, mu)
        ctx.cfg = (tp_group, tp, sp, with_entropy, backend, inv_t)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, w_VpH, tgt_N, valid, lse, mu = ctx.saved_tensors
        tp_group, tp, sp, with_entropy, backend, inv_t = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return (None,) * 9
        h_NH = _sp_gather(hidden, tp_group, tp) if sp else hidden
        zero = torch.zeros_like(lse)
        glp = torch.where(valid, g_logp.to(lse.dtype), 0.0) if g_logp is not None else zero
        use_ent = with_entropy and g_ent is not None
        gent = torch.where(valid, g_ent.to(lse.dtype), 0.0) if use_ent else None
        grad_h, grad_w = _grads(
            h_NH,
            w_VpH,
            tgt_N,
            lse,
            mu if use_ent else None,
            glp,
            gent,
            use_ent,
            backend,
            need_h,
            need_w,
            inv_t,
        )
        if need_h:
            grad_h = _reduce_grad_hidden(grad_h.to(hidden.dtype), tp_group, tp, sp)
        return grad_h, grad_w, None, None, None, None, None, None, None


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group=None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    sequence_parallel: bool = False,
    backend: str | None = None,
    temperature: float = 1.0,
):
    """log p(targets) per token from hidden states and this rank's LM-head vocab shard.

    hidden: [N, H] (with sequence_parallel: this rank's [N/tp, H] rows), bf16/fp16/fp32.
    weight: [Vp, H] this rank's contiguous vocab shard (global rows rank*Vp ... rank*Vp+Vp-1),
        same dtype as hidden. tp_group: the tensor-parallel group (None: no TP).
    targets: [N] global vocab ids (int), ignore_index rows give logp = 0 (and entropy = 0) and
        no gradient. Ids must lie in [0, tp*Vp) otherwise.
    Returns logp [N] fp32, or (logp, entropy) [N] fp32 each with return_entropy; both are
    differentiable w.r.t. hidden and weight (grads in their dtypes). fp64 inputs run the torch
    path in fp64 and return fp64 (for gradchecks and high-precision references); asking for
    the Triton backend with fp64 inputs is an error, the default backend picks torch for them.
    backend: "triton" | "torch" | None (NOVA_KERNELS, else triton on CUDA / torch on CPU).
    temperature: T > 0; log-probs, entropy and grads are those of log_softmax(z / T) (the
        logits scaled inside the kernels, no second pass; the sampling distribution of an RL
        policy at temperature T). T = 1 is bit-identical to the untempered op.
    """
    if not (temperature > 0.0 and temperature < float("inf")):
        raise ValueError(f"linear_logprobs: temperature={temperature}, expected a finite T > 0")
    if hidden.dtype == torch.float64:
        if backend == "triton":
            raise ValueError("linear_logprobs: fp64 inputs run on the torch backend only")
        backend = "torch"
    backend = resolve_backend(backend)
    tp, _ = _tp_info(tp_group)
    _check(hidden, weight, targets, sequence_parallel and tp > 1, tp)
    logp, ent = LinearLogprobsFunction.apply(
        hidden, weight, targets, tp_group, ignore_index, return_entropy, sequence_parallel,
        backend, 1.0 / float(temperature),
    )  # fmt: skip
    return (logp, ent) if return_entropy else logp
