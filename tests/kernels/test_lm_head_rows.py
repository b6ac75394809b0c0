"""The row pass of the fused LM heads (nova_kernels.ops.lm_head_rows): the Triton row kernel's
statistics and in-place dz against float64 torch on odd shapes (fp32 dz in place, bf16 / fp16
dz over the first half of each fp32 row), statistics and dz in one launch equal to two
launches, the torch chunk path equal to the Triton one; grad_W accumulated in fp32 across
chunks (a bf16 accumulation would fail the bound), GEMM 1 logits not rounded to bf16."""

from __future__ import annotations

import pytest
import torch

from nova_kernels._testing import assert_verbose_allclose
from nova_kernels.ops import lm_head_rows as lhr


def _chunk(n, vp, seed, device):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, vp, generator=g) * 3).to(device)
    tgt = torch.randint(0, vp, (n,), generator=g)
    tgt[torch.randperm(n, generator=g)[:4]] = -1  # target on another shard / ignored
    c = torch.randn(n, generator=g)
    return z, tgt.to(device), c.to(device)


def _ref_stats(z, tgt):
    z = z.double().cpu()
    tgt = tgt.cpu()
    m = z.amax(1)
    s = torch.exp(z - m[:, None]).sum(1)
    t = torch.where(tgt >= 0, z.gather(1, tgt.clamp(min=0)[:, None])[:, 0], 0.0)
    return m, s, t


def _ref_dz(z, tgt, c):
    z, tgt, c = z.double().cpu(), tgt.cpu(), c.double().cpu()
    m, s, _ = _ref_stats(z, tgt)
    p = torch.exp(z - m[:, None]) / s[:, None]
    onehot = torch.zeros_like(z).scatter_(1, tgt.clamp(min=0)[:, None], 1.0)
    onehot *= (tgt >= 0).double()[:, None]
    return c[:, None] * (p - onehot)


@pytest.mark.parametrize("n,vp", [(37, 1000), (5, 256), (3, 17)])
def test_row_stats(n, vp, device):
    z, tgt, _ = _chunk(n, vp, seed=n + vp, device=device)
    st, _ = lhr._triton_rows(z, tgt, stats=True)
    for i, (name, e) in enumerate(zip(["max", "sumexp", "target"], _ref_stats(z, tgt))):
        assert_verbose_allclose(st[i], e, rtol=2e-6, atol=1e-6, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,vp", [(37, 1000), (4, 333)])
def test_dz_in_place(dtype, n, vp, device):
    """dz over the chunk's own bytes: separate launch (statistics given) and one launch with
    the statistics; both equal the float64 dz rounded once to `dtype`."""
    z, tgt, c = _chunk(n, vp, seed=vp, device=device)
    want = _ref_dz(z, tgt, c)
    m, s, _ = _ref_stats(z, tgt)
    comb = torch.stack([m, s]).float().to(device)
    z1, z2 = z.clone(), z.clone()
    _, dz1 = lhr._triton_rows(z1, tgt, c, comb, stats=False, dz_dtype=dtype)
    _, dz2 = lhr._triton_rows(z2, tgt, c, stats=True, dz_dtype=dtype)
    assert dz1.dtype == dtype and dz1.data_ptr() == z1.data_ptr(), "dz over z's memory"
    ulp = {torch.float32: 2e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    for name, dz in (("dz", dz1), ("fused dz", dz2)):
        assert_verbose_allclose(dz, want, rtol=ulp, atol=1e-7, name=f"{name} {dtype}")
    if dtype != torch.float32:  # rounded to nearest (the interpreter's own cast truncates)
        rounded = want.to(dtype)
        close = (dz1.cpu().double() - rounded.double()).abs() <= rounded.double().abs() * 1e-6
        assert close.float().mean() > 0.99, "dz is not round-to-nearest"


def test_torch_and_triton_chunks_agree(device):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(29, 40, generator=g).to(device)
    w = (torch.randn(700, 40, generator=g) / 40**0.25).to(device)
    tgt = torch.randint(-1, 700, (29,), generator=g).to(device)
    c = torch.randn(29, generator=g).to(device)
    out = {}
    for backend in ("torch", "triton"):
        for fused in (False, True):
            ch = lhr.LogitsChunk(h, w, tgt, backend, None, 1, c if fused else None)
            out[backend, fused] = (ch.logp, ch.dlogits(c, torch.float32))
    for key, (lp, dz) in out.items():
        assert_verbose_allclose(lp, out["torch", False][0], rtol=1e-5, atol=1e-5, name=f"{key}")
        assert_verbose_allclose(dz, out["torch", False][1], rtol=1e-5, atol=1e-6, name=f"{key}")


def test_grad_weight_accumulates_in_fp32(device):
    """16 chunks of bf16 dz.T @ h into grad_W: the fp32 accumulator rounds once, so every
    element is within one bf16 rounding of the float64 sum (a bf16 running sum is not)."""
    g = torch.Generator().manual_seed(0)
    dz = torch.randn(16 * 8, 96, generator=g).to(torch.bfloat16)
    h = torch.randn(16 * 8, 40, generator=g).to(torch.bfloat16)
    want = dz.double().T @ h.double()
    gw = lhr.GradWeight(96, 40, torch.bfloat16, device, 16, torch.float32)
    naive = torch.zeros(96, 40, dtype=torch.bfloat16)
    for r in range(0, 128, 8):
        gw.add(dz[r : r + 8].to(device), h[r : r + 8].to(device))
        naive += (dz[r : r + 8].float().T @ h[r : r + 8].float()).to(torch.bfloat16)
    got = gw.result(naive).cpu()
    assert got.dtype == torch.bfloat16
    bound = want.abs() * 2**-8 + 1e-6  # half an ulp of bf16, relative
    assert bool(((got.double() - want).abs() <= bound).all()), "grad_W not rounded once"
    assert not bool(((naive.double() - want).abs() <= bound).all()), "test cannot fail"
    one = lhr.GradWeight(96, 40, torch.bfloat16, device, 1, torch.float32)
    one.add(dz.to(device), h.to(device))
    assert bool(((one.result(naive).cpu().double() - want).abs() <= bound).all())


def test_gemm_logits_fp32(device):
    """GEMM 1 returns fp32 logits of bf16 operands (not a bf16 rounding of them)."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(33, 64, generator=g).to(torch.bfloat16)
    b = torch.randn(64, 50, generator=g).to(torch.bfloat16)
    want = a.double() @ b.double()
    z = lhr.gemm(a.to(device), b.to(device), torch.float32).cpu()
    assert z.dtype == torch.float32
    assert_verbose_allclose(z, want, rtol=1e-5, atol=1e-4, name="fp32 logits")
    assert (want.float().to(torch.bfloat16).double() - want).abs().max() > 1e-3  # can fail


def test_rows_per_chunk():
    cpu = torch.device("cpu")
    assert lhr.rows_per_chunk(cpu, 1000) == lhr._budget(cpu) // 1000
    assert lhr.rows_per_chunk(cpu, 10**9) == 1
    gpu = lhr.rows_per_chunk(torch.device("cuda"), 128256)
    assert gpu % 128 == 0 and 1024 <= gpu and gpu * 128256 <= 4 * lhr._budget(torch.device("cuda"))
