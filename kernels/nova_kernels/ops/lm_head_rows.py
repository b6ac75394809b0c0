"""Row pass of the fused 3-GEMM LM heads (`linear_cross_entropy`, `linear_pair_logprobs`): one
chunk of logits, its softmax statistics combined over the TP group, and dlogits formed in place
on the chunk, with the GEMMs and the grad_W accumulation that go around it.

    ch = LogitsChunk(h_nH, w_VpH, tgt_n, backend, tp_group, tp)   # GEMM 1 + row statistics
    ch.logp                                  # [n] log p(target) (rows with a target)
    dz = ch.dlogits(c_n, dtype)              # dz = c (p - 1_t), in place on the chunk
    grad_h[rows] = gemm(dz, w, dtype)        # GEMM 2
    gw.add(dz, h_nH)                         # GEMM 3, grad_W accumulated in fp32 over chunks

Legend: n rows of the chunk, H hidden, Vp this rank's vocab shard (`linear_logprobs`), z the
chunk's logits [n, Vp], t the target column local to the shard (-1: elsewhere or ignored),
c [n] the per-row coefficient of dz (SFT: the token weight; a pair head: -d loss / d logp_t).

Numerics contract of every LM head on GPU (this module, `linear_logprobs`' Triton kernels):
GEMM operands in the input dtype (bf16), fp32 accumulation, fp32 logits (GEMM 1 writes fp32:
cuBLAS `mm(out_dtype=float32)`, never a bf16 rounding of the logits), fp32 row statistics (max,
sum-exp, target logit; combined exactly over TP), dz rounded once to the operand dtype for
GEMMs 2 and 3, grad_W accumulated in fp32 across row chunks (cuBLAS `addmm(out_dtype=float32)`
into an fp32 buffer) and rounded once to W's dtype at the end. On CPU the torch backend runs
the GEMMs in fp32 (`_compute_dtype`), as before; the Triton backend under the interpreter
emulates the GPU contract (bf16 operands, fp32 products) so tests see the GPU numerics.

Triton row kernel (`_rows_kernel`, one program per row, vocab tiles of BLOCK_V columns):
  STATS  online max m, s = sum exp(z - m) and the target logit -> stats [3, n] fp32;
  DZ     dz_j = c (exp(z_j - M) / S - 1[j = t]) from the TP-combined (M, S), written over the
         row's own bytes: an fp32 dz in place; a bf16/fp16 dz into the first half of the row's
         fp32 bytes (row stride 2 Vp elements of the narrow dtype, which cuBLAS takes as its
         leading dimension), so the chunk needs no second workspace. Tile k's narrow stores land
         on fp32 elements the row's earlier tiles and tile k itself have read; a barrier between
         a tile's loads and its stores keeps every warp's reads ahead of the other warps' writes.
  STATS and DZ in one launch when the coefficients are known before the statistics and there
  is no TP (SFT at tp = 1): the row is read twice, written once.
The torch backend does the same with torch ops (exp(z - m) in place, scatter for the target).
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from .._backend import interpreting
from .._common import _acc_dtype, empty
from .._vocab_parallel import _tp_combine
from .linear_logprobs import _budget, _compute_dtype

_HALF = (torch.bfloat16, torch.float16)
_log = logging.getLogger(__name__)

# GPU launch table of `_rows_kernel` (read by the AOT compile check): the widest vocab tile and
# its warps; narrower vocab shards use the next power of two >= Vp with the warps below.
_GPU_BLOCK_V = 8192
_GPU_WARPS = {8192: 16, 4096: 8, 2048: 8, 1024: 4}  # smaller tiles: 4 warps
_INTERP_BLOCK_V = 512  # interpreter: several tiles per row at test shapes (V = 1000)
# GPU row chunks: GEMM 3 reads and writes the fp32 grad_W once per chunk, so its K (the chunk's
# rows) must be large for the GEMM to stay compute-bound; the fp32 logits chunk may take this
# many times the `linear_logprobs` workspace budget (1 GiB at the default budget).
_GPU_CHUNK_SCALE = 4


# ----------------------------------------------------------------------------- Triton kernel


@triton.jit
def _bf16_rne(x):
    """fp32 -> bf16 rounded to nearest even by bit arithmetic (the interpreter truncates)."""
    b = x.to(tl.uint32, bitcast=True)
    b = b + 0x7FFF + ((b >> 16) & 1)
    return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _rows_kernel(
    z_ptr,  # [n, Vp] fp32 logits of the chunk, row stride stride_z
    dz_ptr,  # [n, Vp] out (DZ): dz over the same bytes as z (row r at z's row r), stride_dz
    tgt_ptr,  # [n] int64 target column local to the shard, -1 elsewhere / ignored
    c_ptr,  # [n] fp32 coefficient of dz (read when DZ)
    stats_ptr,  # [3, n] fp32 out (STATS): max m, sum exp(z - m), target logit (0 if none)
    comb_ptr,  # [2, n] fp32 in (DZ without STATS): the TP-combined max M and sum-exp S
    n,
    Vp,
    stride_z,
    stride_dz,
    BLOCK_V: tl.constexpr,
    STATS: tl.constexpr,
    DZ: tl.constexpr,
    NARROW: tl.constexpr,  # dz narrower than z (bf16/fp16 over fp32): stores trail a barrier
    RNE_BF16: tl.constexpr,  # interpreter with a bf16 dz: round by bits
):
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_z
    tgt = tl.load(tgt_ptr + row)
    cols0 = tl.arange(0, BLOCK_V)
    if STATS:
        m = tl.max(tl.full([BLOCK_V], -1.0e30, tl.float32), axis=0)
        s = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
        for v0 in range(0, Vp, BLOCK_V):
            cols = v0 + cols0
            x = tl.load(z_row + cols, mask=cols < Vp, other=-1.0e30)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        t = tl.load(z_row + tl.maximum(tgt, 0))
        t = tl.where(tgt >= 0, t, 0.0)
        tl.store(stats_ptr + row, m)
        tl.store(stats_ptr + n + row, s)
        tl.store(stats_ptr + 2 * n + row, t)
    if DZ:
        if STATS:
            M = m
            S = s
        else:
            M = tl.load(comb_ptr + row)
            S = tl.load(comb_ptr + n + row)
        c = tl.load(c_ptr + row)
        k = c / S
        dz_row = dz_ptr + row.to(tl.int64) * stride_dz
        for v0 in range(0, Vp, BLOCK_V):
            cols = v0 + cols0
            ok = cols < Vp
            x = tl.load(z_row + cols, mask=ok, other=0.0)
            if NARROW:
                tl.debug_barrier()  # all warps have read this tile before any narrow store
            dz = tl.exp(x - M) * k - tl.where(cols == tgt, c, 0.0)
            if RNE_BF16:
                tl.store(dz_row + cols, _bf16_rne(dz), mask=ok)
            else:
                tl.store(dz_row + cols, dz.to(dz_ptr.dtype.element_ty), mask=ok)


def _launch_meta(vp: int) -> dict:
    """BLOCK_V and num_warps of `_rows_kernel` for a vocab shard of vp columns."""
    if interpreting():
        return {"BLOCK_V": min(_INTERP_BLOCK_V, triton.next_power_of_2(max(vp, 16)))}
    block = min(_GPU_BLOCK_V, triton.next_power_of_2(max(vp, 16)))
    return {"BLOCK_V": block, "num_warps": _GPU_WARPS.get(block, 4)}


def _dz_view(z_nV: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The [n, Vp] dz view over z's own bytes: z itself (same dtype), else the first half of
    each fp32 row reinterpreted as `dtype` (row stride 2 Vp)."""
    if dtype == z_nV.dtype:
        return z_nV
    return z_nV.view(dtype)[:, : z_nV.shape[1]]


def _triton_rows(z_nV, tgt_n, c_n=None, comb=None, *, stats: bool, dz_dtype=None):
    """Launch `_rows_kernel` on one chunk: -> (stats [3, n] fp32 or None, dz view or None)."""
    n, vp = z_nV.shape
    dev = z_nV.device
    st = empty(3, n, device=dev, dtype=torch.float32) if stats else None
    dz = _dz_view(z_nV, dz_dtype) if dz_dtype is not None else None
    if n == 0:
        return st, dz
    dummy = z_nV
    _rows_kernel[(n,)](
        z_nV,
        dz if dz is not None else dummy,
        tgt_n,
        c_n if c_n is not None else dummy,
        st if st is not None else dummy,
        comb if comb is not None else dummy,
        n,
        vp,
        z_nV.stride(0),
        dz.stride(0) if dz is not None else 0,
        STATS=stats,
        DZ=dz is not None,
        NARROW=dz is not None and dz.dtype != z_nV.dtype,
        RNE_BF16=interpreting() and dz_dtype == torch.bfloat16,
        **_launch_meta(vp),
    )
    return st, dz


# ----------------------------------------------------------------------------- GEMMs

_NO_OUT_DTYPE: set[str] = set()  # torch ops without the out_dtype overload here (fallbacks)


def _no_out_dtype(op: str, err: Exception) -> None:
    _NO_OUT_DTYPE.add(op)
    _log.warning("torch.%s(out_dtype=float32) unavailable (%s): slower fp32 fallback", op, err)


def gemm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b accumulated in fp32 (fp64 for fp64), returned in out_dtype. CUDA half operands:
    cuBLAS with fp32 output where asked (`mm(out_dtype=float32)`); CPU half operands: an fp32
    GEMM of the exactly widened operands (the GPU's products, in fp32)."""
    if a.dtype not in _HALF:
        return (a @ b).to(out_dtype)
    if not a.is_cuda:
        return (a.float() @ b.float()).to(out_dtype)
    if out_dtype == a.dtype:
        return a @ b
    if "mm" not in _NO_OUT_DTYPE:
        try:
            return torch.mm(a, b, out_dtype=out_dtype)
        except (TypeError, RuntimeError) as e:
            _no_out_dtype("mm", e)
    return (a.float() @ b.float()).to(out_dtype)  # exact fp32 logits without the overload


def gemm_acc_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc fp32 (or fp64) and a, b in the operand dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif not a.is_cuda:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
    else:
        if "addmm" not in _NO_OUT_DTYPE:
            try:
                torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
                return
            except (TypeError, RuntimeError) as e:
                _no_out_dtype("addmm", e)
        acc.add_(gemm(a, b, acc.dtype))


class GradWeight:
    """grad_W [Vp, H] of one head call: one chunk -> one GEMM in W's dtype (rounded once);
    several -> an fp32 (fp64) buffer that every chunk's GEMM 3 adds into, cast once at the end."""

    def __init__(self, vp: int, h: int, dtype, device, n_chunks: int, acc):
        self.dtype, self.single = dtype, n_chunks <= 1
        self.buf: torch.Tensor | None = (
            None if self.single else torch.zeros(vp, h, device=device, dtype=acc)
        )
        self.out: torch.Tensor | None = None

    def add(self, dz_nV: torch.Tensor, h_nH: torch.Tensor) -> None:
        if self.single and self.out is None:
            self.out = gemm(dz_nV.T, h_nH, self.dtype)
        elif self.single:  # a second chunk after all (the caller's count was low)
            assert self.out is not None
            self.buf, self.single = self.out.to(_acc_dtype(self.out)), False
            gemm_acc_(self.buf, dz_nV.T, h_nH)
        else:
            assert self.buf is not None
            gemm_acc_(self.buf, dz_nV.T, h_nH)

    def result(self, like: torch.Tensor) -> torch.Tensor:
        if self.single:
            return self.out if self.out is not None else torch.zeros_like(like)
        assert self.buf is not None
        return self.buf.to(self.dtype)


def operand_dtype(x: torch.Tensor, backend: str) -> torch.dtype:
    """GEMM operand dtype: the input dtype for the Triton backend (the GPU contract, emulated
    on CPU) and on GPU; the torch backend on CPU computes in fp32 (`_compute_dtype`)."""
    return x.dtype if backend == "triton" else _compute_dtype(x)


def rows_per_chunk(device: torch.device, vp: int) -> int:
    """Rows of one logits chunk [rows, vp] fp32: the `linear_logprobs` budget on CPU, on GPU
    `_GPU_CHUNK_SCALE` times it, in multiples of 128 rows (GEMM tiles)."""
    if device.type != "cuda":
        return max(1, _budget(device) // max(vp, 1))
    rows = max(1, _budget(device) * _GPU_CHUNK_SCALE // max(vp, 1))
    return rows - rows % 128 if rows >= 256 else rows


# ----------------------------------------------------------------------------- chunk


class LogitsChunk:
    """z = h @ W.T of one row chunk (GEMM 1, fp32), its TP-combined statistics, and dz formed
    in place on it. `coef` (tp = 1, Triton): dz is formed in the same launch as the statistics.
    logp [n]: z_t - M - log S (meaningful on rows whose target is a real token)."""

    def __init__(self, h_nH, w_VpH, tgt_n, backend, tp_group, tp, coef=None):
        acc = _acc_dtype(h_nH)
        z = gemm(h_nH, w_VpH.T, acc)  # GEMM 1: [n, Vp] fp32 (fp64 for fp64)
        self.backend, self.tgt = backend, tgt_n
        self.z: torch.Tensor | None = z  # the logits chunk, until dz is formed over it
        self.e: torch.Tensor | None = None  # torch path: exp(z - m), in place on z
        self.dz: torch.Tensor | None = None  # dz formed with the statistics (one launch)
        if backend == "triton":
            dz_dtype = h_nH.dtype if coef is not None and tp == 1 else None
            c = coef.to(torch.float32).contiguous() if dz_dtype is not None else None
            st, self.dz = _triton_rows(z, tgt_n, c, stats=True, dz_dtype=dz_dtype)
            m, s, t = st[0], st[1], st[2]
        else:
            self.hit, self.tcol = tgt_n >= 0, tgt_n.clamp(min=0)[:, None]
            t = torch.where(self.hit, z.gather(1, self.tcol)[:, 0], 0.0)
            m = z.amax(1)
            self.e = z.sub_(m[:, None]).exp_()  # exp(z - m), in place
            s = self.e.sum(1)
            self.m = m
        M, S, _, T = _tp_combine(m, s, t, t, tp_group, tp, False)
        self.M, self.S = M, S
        self.logp = T - M - torch.log(S)

    def dlogits(self, coef: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """dz = coef (p - 1_t) [n, Vp] in `dtype`, over the chunk's own memory (once)."""
        if self.dz is not None:  # formed with the statistics
            dz, self.dz, self.z = self.dz, None, None
            return dz
        if self.backend == "triton":
            comb = torch.stack([self.M, self.S]).to(torch.float32)
            c = coef.to(torch.float32).contiguous()
            assert self.z is not None, "dlogits is formed once per chunk"
            _, dz = _triton_rows(self.z, self.tgt, c, comb, stats=False, dz_dtype=dtype)
            self.z = None
            return dz
        assert self.e is not None, "dlogits is formed once per chunk"
        acc = self.e.dtype
        dz = self.e.mul_((coef.to(acc) * torch.exp(self.m - self.M) / self.S)[:, None])
        dz.scatter_add_(1, self.tcol, torch.where(self.hit, -coef.to(acc), 0.0)[:, None])
        self.e = self.z = None
        return dz.to(dtype)
