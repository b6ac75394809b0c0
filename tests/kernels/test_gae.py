"""GAE over packed sequences (gae_packed): Triton (interpreter on CPU) and torch paths against
verl's loop over t (nova_kernels.reference, float64) run one sequence at a time, on odd
lengths, empty sequences and masks with holes; rows split over several programs; by hand;
and the trainer's REINFORCE++ returns (values 0, lam 1); host boundaries: no read-back."""

from __future__ import annotations

import pytest
import torch

from nova_kernels import gae_packed
from nova_kernels._sync import HostSyncError, forbid_host_sync
from nova_kernels._testing import assert_verbose_allclose
from nova_kernels.reference import gae_reference

BACKENDS = ["triton", "torch"]


def make_packed(lens, seed, mask_dtype=torch.bool):
    """rewards, values [N], mask [N] (responses with holes: observation tokens), cu [S+1]."""
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    N = int(cu[-1])
    r, v = torch.randn(N, generator=g), torch.randn(N, generator=g)
    m = torch.rand(N, generator=g) > 0.25
    return r, v, m.to(mask_dtype), cu


def loop_gae(r, v, m, cu, gamma, lam):
    """(advantages, returns) float64 [N]: the reference on each sequence alone."""
    adv, ret = (
        torch.zeros(r.numel(), dtype=torch.float64),
        torch.zeros(r.numel(), dtype=torch.float64),
    )
    for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if hi > lo:
            a, b = gae_reference(
                r[None, lo:hi].double(), v[None, lo:hi].double(), m[None, lo:hi], gamma, lam
            )
            adv[lo:hi], ret[lo:hi] = a[0], b[0]
    return adv, ret


def on(device, *tensors):
    return tuple(t.to(device) for t in tensors)


def check(actual, expected, name):
    assert actual.dtype == torch.float32
    assert_verbose_allclose(actual.cpu(), expected, rtol=2e-5, atol=2e-5, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "lens,gamma,lam",
    [
        ([5, 0, 17, 31, 1], 0.95, 0.9),
        ([53, 53, 53, 7], 0.99, 0.95),
        ([64, 1, 64], 1.0, 1.0),
        ([3, 37, 2], 0.9, 0.0),
        ([0, 0], 0.9, 0.9),
    ],
)
def test_gae_packed_matches_loop(backend, lens, gamma, lam, device):
    r, v, m, cu = make_packed(lens, seed=sum(lens))
    adv, ret = gae_packed(*on(device, r, v, m, cu), gamma, lam, backend=backend)
    ref_adv, ref_ret = loop_gae(r, v, m, cu, gamma, lam)
    check(adv, ref_adv, "advantages")
    check(ret, ref_ret, "returns")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.int64, torch.uint8])
def test_gae_packed_mask_dtypes(backend, mask_dtype, device):
    r, v, m, cu = make_packed([9, 22, 4], seed=3, mask_dtype=mask_dtype)
    adv, ret = gae_packed(*on(device, r, v, m, cu), 0.97, 0.9, backend=backend)
    ref_adv, ref_ret = loop_gae(r, v, m, cu, 0.97, 0.9)
    check(adv, ref_adv, "advantages")
    check(ret, ref_ret, "returns")


@pytest.mark.parametrize("block_t,n_splits", [(16, 2), (16, 4), (32, 2)])
def test_gae_packed_triton_split_rows(block_t, n_splits, device):
    """Rows split over several programs: per-split maps folded into the carry."""
    r, v, m, cu = make_packed([53, 0, 17, 70], seed=11, mask_dtype=torch.float32)
    kw = dict(backend="triton", block_t=block_t, n_splits=n_splits)
    adv, ret = gae_packed(*on(device, r, v, m, cu), 0.97, 0.9, **kw)
    ref_adv, ref_ret = loop_gae(r, v, m, cu, 0.97, 0.9)
    check(adv, ref_adv, "advantages")
    check(ret, ref_ret, "returns")


def test_gae_packed_torch_long_rows(device):
    """Long rows: many doubling steps of the torch scan (lengths not powers of two)."""
    r, v, m, cu = make_packed([300, 129, 5], seed=5)
    adv, ret = gae_packed(*on(device, r, v, m, cu), 0.99, 0.95, backend="torch")
    ref_adv, ref_ret = loop_gae(r, v, m, cu, 0.99, 0.95)
    check(adv, ref_adv, "advantages")
    check(ret, ref_ret, "returns")


def test_gae_formula_by_hand(device):
    """Two valid steps around an observation step: the observation carries nv and A; a
    second sequence of one step is scanned on its own (nothing flows across the boundary)."""
    r = torch.tensor([1.0, 5.0, 2.0, 4.0])
    v = torch.tensor([0.5, 9.0, 1.0, 3.0])
    m = torch.tensor([True, False, True, True])
    cu = torch.tensor([0, 3, 4])
    g, lam = 0.9, 0.8
    a2 = 2.0 - 1.0  # last step: delta = r - v
    a1 = a2  # observation: carried
    a0 = (1.0 + g * 1.0 - 0.5) + g * lam * a2  # next value is v[2], skipping v[1]
    a3 = 4.0 - 3.0
    want_adv = torch.tensor([a0, a1, a2, a3], dtype=torch.float64)
    want_ret = want_adv + v.double()
    for backend in BACKENDS:
        adv, ret = gae_packed(*on(device, r, v, m, cu), g, lam, backend=backend)
        check(adv, want_adv, f"adv {backend}")
        check(ret, want_ret, f"ret {backend}")
    ref_adv, ref_ret = loop_gae(r, v, m, cu, g, lam)  # the reference the other tests trust
    assert_verbose_allclose(ref_adv, want_adv, rtol=1e-12, atol=1e-12, name="reference adv")
    assert_verbose_allclose(ref_ret, want_ret, rtol=1e-12, atol=1e-12, name="reference ret")


@pytest.mark.parametrize("backend", BACKENDS)
def test_reinforce_pp_returns_by_hand(backend, device):
    """The trainer's REINFORCE++ returns: values 0, lam 1. R_3 = 3; R_1 (masked out) carries
    R_2 = 2 + 0.5 * 3; R_0 = 1 + 0.5 * R_2 (the next counted step)."""
    r = torch.tensor([1.0, 7.0, 2.0, 3.0])
    m = torch.tensor([True, False, True, True])
    cu = torch.tensor([0, 4])
    adv, ret = gae_packed(*on(device, r, torch.zeros(4), m, cu), 0.5, 1.0, backend=backend)
    want = torch.tensor([1.0 + 0.5 * 3.5, 3.5, 3.5, 3.0], dtype=torch.float64)
    check(adv, want, "returns")
    check(ret, want, "returns (values 0)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_packed_with_host_boundaries(backend, device):
    """cu_seqlens_host (the packer's host ints) gives the longest sequence: the same result;
    on the torch path nothing is read back to the host (without it, the one read shows)."""
    lens = [9, 0, 40, 3, 1]
    r, v, m, cu = make_packed(lens, seed=13)
    cu_host = cu.tolist()
    ref_adv, ref_ret = loop_gae(r, v, m, cu, 0.99, 0.9)
    kw = dict(backend=backend, cu_seqlens_host=cu_host)
    adv, ret = gae_packed(*on(device, r, v, m, cu), 0.99, 0.9, **kw)
    check(adv, ref_adv, "advantages")
    check(ret, ref_ret, "returns")
    if backend == "torch":
        with forbid_host_sync():
            adv, ret = gae_packed(r, v, m, cu, 0.99, 0.9, **kw)
            with pytest.raises(HostSyncError):
                gae_packed(r, v, m, cu, 0.99, 0.9, backend="torch")
        check(adv, ref_adv, "advantages without a host read")
        check(ret, ref_ret, "returns without a host read")


def test_gae_packed_rejects_bad_shapes():
    r = torch.randn(4)
    with pytest.raises(ValueError, match="rewards, values, mask"):
        gae_packed(r, torch.randn(5), torch.ones(4), torch.tensor([0, 4]), 0.9, 0.9)
    with pytest.raises(ValueError, match="cu_seqlens"):
        gae_packed(r, r, torch.ones(4), torch.zeros(0, dtype=torch.int64), 0.9, 0.9)
    with pytest.raises(ValueError, match="cu_seqlens_host has 2 entries"):
        gae_packed(r, r, torch.ones(4), torch.tensor([0, 1, 4]), 0.9, 0.9, cu_seqlens_host=[0, 4])
