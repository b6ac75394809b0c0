"""Masked whitening: Triton (interpreter on CPU) and torch paths against verl's formula in
float64 (nova_kernels.reference), the statistics of the result by definition, and the
composition with a data-parallel all-reduce supplied by the caller (k identical ranks; two
ranks with different shards, one of them empty) against the single process over the
concatenation. No host sync on the torch path; the same bits on every run."""

from __future__ import annotations

import pytest
import torch

from nova_kernels import whiten
from nova_kernels._sync import forbid_host_sync
from nova_kernels._testing import assert_verbose_allclose
from nova_kernels.reference import whiten_reference

BACKENDS = ["triton", "torch"]
MASK_DTYPES = [torch.bool, torch.float32, torch.int64]
TOL = dict(rtol=1e-5, atol=1e-5)


def make_inputs(shape, seed, mask_dtype=torch.bool, keep=0.6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3 + 1.5
    m = torch.rand(shape, generator=g) < keep
    return x, m.to(mask_dtype)


def check(out, ref, name):
    assert out.dtype == torch.float32
    assert_verbose_allclose(out.cpu(), ref, name=name, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(7, 53), (3, 1000), (37,), (4097,), (0,)])
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_whiten_matches_loop(backend, shape, shift_mean, mask_dtype, device):
    x, m = make_inputs(shape, sum(shape) + 1, mask_dtype)
    out = whiten(x.to(device), m.to(device), shift_mean=shift_mean, backend=backend)
    assert out.shape == x.shape and out.device.type == torch.device(device).type
    check(out, whiten_reference(x.double(), m, shift_mean), "whitened")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", [0.0, 1e-9, 1.0])
def test_whiten_degenerate_masks(backend, keep, device):
    """No masked element (mean 0, variance 0: x * rsqrt(eps)), exactly one (Bessel factor 1,
    variance ~0), or all of them. Outputs reach 1e4 here: the tolerance scales with them
    (fp32 cannot hold mean = x / (1 + 1e-8) apart from x; float64 can)."""
    x, m = make_inputs((5, 31), 3, keep=keep)
    m[0, 0] = keep > 0
    out = whiten(x.to(device), m.to(device), backend=backend).cpu()
    ref = whiten_reference(x.double(), m)
    scale = float(ref.abs().max())
    assert_verbose_allclose(out, ref, rtol=1e-5, atol=1e-5 * scale, name=f"keep={keep}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_whiten_masked_stats_are_standard(backend, device):
    """Over the masked elements the result has mean 0 and unbiased variance ~1."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 71, generator=g).exp()
    m = (torch.rand(5, 71, generator=g) > 0.5).float()
    for out in (
        whiten(x.to(device), m.to(device), backend=backend),
        whiten_reference(x.double(), m),
    ):
        out = out.cpu()[m.bool()].double()
        assert abs(out.mean().item()) < 1e-5
        assert abs(out.var().item() - 1.0) < 1e-4


def _k_ranks(k):
    """k identical ranks: a sum all-reduce multiplies by k."""

    def reduce(t, op):
        assert op == "sum"
        t.mul_(k)

    return reduce


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [2, 5])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_reduce_over_identical_ranks(backend, k, shift_mean, device):
    """k ranks with the same elements = one process over the k-fold concatenation (the
    Bessel factor n / (n - 1) changes with n: the result is not the one-rank result)."""
    x, m = make_inputs((3, 7), 4, torch.float32, keep=0.3)
    kw = dict(shift_mean=shift_mean, backend=backend)
    out = whiten(x.to(device), m.to(device), reduce=_k_ranks(k), **kw)
    ref = whiten_reference(torch.cat([x] * k).double(), torch.cat([m] * k), shift_mean)
    check(out, ref[: x.shape[0]], f"k={k}")
    assert not torch.allclose(whiten(x, m, **kw).cpu(), ref[: x.shape[0]].float(), **TOL)


class OtherShard:
    """The reduce callback of a rank whose only peer holds (values, mask): adds the peer's
    float64 partials, (masked sum, count) and then the centered sum of squares around the
    global mean that the first call produced. Records the calls (op, shape)."""

    def __init__(self, values, mask):
        self.x, self.m = values.double(), (mask != 0).double()
        self.calls = []
        self.mean = None

    def __call__(self, t, op):
        self.calls.append((op, tuple(t.shape)))
        if t.shape == (2,):
            t.add_(torch.stack([(self.x * self.m).sum(), self.m.sum()]).to(t.device, t.dtype))
            total = t.double().cpu()
            self.mean = total[0] / (total[1] + 1e-8)
        else:
            ss = ((self.x - self.mean) ** 2 * self.m).sum().reshape(1)
            t.add_(ss.to(t.device, t.dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("n_b", [300, 0])
def test_reduce_over_two_different_shards(backend, shift_mean, n_b, device):
    """Two ranks with different packed token advantages (different lengths; rank B may
    hold no tokens): each rank's result equals the single process over both."""
    x_a, m_a = make_inputs((211,), 21)
    x_b, m_b = make_inputs((n_b,), 22, keep=0.8)
    x_b = x_b * 0.5 - 4.0  # other statistics than rank A's
    ref = whiten_reference(torch.cat([x_a, x_b]).double(), torch.cat([m_a, m_b]), shift_mean)
    for x, m, other, want in (
        (x_a, m_a, OtherShard(x_b, m_b), ref[:211]),
        (x_b, m_b, OtherShard(x_a, m_a), ref[211:]),
    ):
        out = whiten(
            x.to(device), m.to(device), shift_mean=shift_mean, backend=backend, reduce=other
        )
        check(out, want, f"shard of {x.numel()}")
        assert other.calls == [("sum", (2,)), ("sum", (1,))]
    if n_b:
        alone = whiten(x_a, m_a, shift_mean=shift_mean, backend=backend)
        assert not torch.allclose(alone.cpu(), ref[:211].float(), **TOL)  # the reduce matters


def test_torch_path_has_no_host_sync():
    x, m = make_inputs((9, 40), 6)
    with forbid_host_sync():
        out = whiten(x, m, backend="torch", reduce=_k_ranks(2))
    check(out, whiten_reference(torch.cat([x, x]).double(), torch.cat([m, m]))[:9], "")


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_bits_every_run(backend, device):
    x, m = make_inputs((6, 333), 7)
    x, m = x.to(device), m.to(device)
    assert torch.equal(whiten(x, m, backend=backend), whiten(x, m, backend=backend))


def test_whiten_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="mask"):
        whiten(torch.randn(3, 4), torch.ones(3, 5), backend="torch")
