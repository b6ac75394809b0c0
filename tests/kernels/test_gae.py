"""GAE and REINFORCE++ returns: Triton (interpreter on CPU) and torch paths against verl's
loops (nova_kernels.reference, float64), on odd shapes and masks with holes, and by hand."""

from __future__ import annotations

import pytest
import torch

from nova_kernels import discounted_returns, gae, gae_packed
from nova_kernels._testing import assert_verbose_allclose
from nova_kernels.reference import discounted_returns_reference, gae_reference

BACKENDS = ["triton", "torch"]


def loop_gae(rewards, values, mask, gamma, lam):
    """(advantages, returns) of the float64 reference."""
    return gae_reference(rewards.double(), values.double(), mask, gamma, lam)


def loop_returns(rewards, mask, gamma):
    return discounted_returns_reference(rewards.double(), mask, gamma)


def make_inputs(B, T, seed, mask_dtype=torch.bool):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    # responses of random length, with holes (observation tokens) inside them
    lens = torch.randint(0, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lens[:, None]
    mask &= torch.rand(B, T, generator=g) > 0.25
    if B > 1:
        mask[0] = True  # one full row
    return rewards, values, mask.to(mask_dtype)


def on(device, *tensors):
    """The inputs on the test device (references keep the CPU originals)."""
    return tuple(t.to(device) for t in tensors)


def check(actual, expected, name):
    assert actual.dtype == torch.float32
    actual = actual.cpu()
    assert_verbose_allclose(actual, expected, rtol=2e-5, atol=2e-5, name=name)


# --- GAE ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "B,T,gamma,lam", [(7, 53, 0.99, 0.95), (4, 64, 1.0, 1.0), (3, 1, 0.9, 0.0), (2, 37, 0.5, 0.7)]
)
def test_gae_matches_loop(backend, B, T, gamma, lam, device):
    r, v, m = make_inputs(B, T, seed=B * 1000 + T)
    adv, ret = gae(*on(device, r, v, m), gamma, lam, backend=backend)
    ref_adv, ref_ret = loop_gae(r, v, m, gamma, lam)
    check(adv, ref_adv, "advantages")
    check(ret, ref_ret, "returns")


@pytest.mark.slow  # several programs per row: long interpreted scans
@pytest.mark.parametrize("block_t,n_splits", [(16, 2), (16, 4), (32, 2)])
def test_gae_triton_split_rows(block_t, n_splits, device):
    """Rows split over several programs: per-split maps folded into the carry."""
    r, v, m = make_inputs(7, 53, seed=11, mask_dtype=torch.float32)
    kw = dict(backend="triton", block_t=block_t, n_splits=n_splits)
    adv, ret = gae(*on(device, r, v, m), 0.97, 0.9, **kw)
    ref_adv, ref_ret = loop_gae(r, v, m, 0.97, 0.9)
    check(adv, ref_adv, "advantages")
    check(ret, ref_ret, "returns")


def test_gae_torch_long_rows(device):
    """Long rows: many doubling steps of the torch scan (T not a power of two)."""
    r, v, m = make_inputs(3, 300, seed=5, mask_dtype=torch.int64)
    adv, ret = gae(*on(device, r, v, m), 0.99, 0.95, backend="torch")
    ref_adv, ref_ret = loop_gae(r, v, m, 0.99, 0.95)
    check(adv, ref_adv, "advantages")
    check(ret, ref_ret, "returns")


def test_gae_formula_by_hand(device):
    """Two valid steps around an observation step: the observation carries nv and A."""
    r = torch.tensor([[1.0, 5.0, 2.0]])
    v = torch.tensor([[0.5, 9.0, 1.0]])
    m = torch.tensor([[True, False, True]])
    g, lam = 0.9, 0.8
    a2 = 2.0 - 1.0  # last step: delta = r - v
    a1 = a2  # observation: carried
    a0 = (1.0 + g * 1.0 - 0.5) + g * lam * a2  # next value is v[2], skipping v[1]
    want_adv = torch.tensor([[a0, a1, a2]], dtype=torch.float64)
    want_ret = torch.tensor([[a0 + 0.5, a1 + 9.0, a2 + 1.0]], dtype=torch.float64)
    for backend in BACKENDS:
        adv, ret = gae(*on(device, r, v, m), g, lam, backend=backend)
        check(adv, want_adv, f"adv {backend}")
        check(ret, want_ret, f"ret {backend}")
    ref_adv, ref_ret = loop_gae(r, v, m, g, lam)  # the reference the other tests trust
    assert_verbose_allclose(ref_adv, want_adv, rtol=1e-12, atol=1e-12, name="reference adv")
    assert_verbose_allclose(ref_ret, want_ret, rtol=1e-12, atol=1e-12, name="reference ret")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_packed(backend, device):
    g = torch.Generator().manual_seed(7)
    lens = [5, 0, 17, 31, 1]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    N = int(cu[-1])
    r, v = torch.randn(N, generator=g), torch.randn(N, generator=g)
    m = torch.rand(N, generator=g) > 0.3
    kw = dict(block_t=16, n_splits=2) if backend == "triton" else {}
    adv, ret = gae_packed(*on(device, r, v, m, cu), 0.95, 0.9, backend=backend, **kw)
    adv, ret = adv.cpu(), ret.cpu()
    for s in range(len(lens)):
        lo, hi = int(cu[s]), int(cu[s + 1])
        if hi == lo:
            continue
        ra, rr = loop_gae(r[None, lo:hi], v[None, lo:hi], m[None, lo:hi], 0.95, 0.9)
        check(adv[lo:hi], ra[0], f"adv seq {s}")
        check(ret[lo:hi], rr[0], f"ret seq {s}")


def test_gae_rejects_bad_shapes():
    r = torch.randn(3, 4)
    with pytest.raises(ValueError, match="values"):
        gae(r, torch.randn(3, 5), torch.ones(3, 4), 0.9, 0.9, backend="torch")


# --- REINFORCE++ returns ------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T,gamma", [(7, 53, 0.99), (3, 16, 1.0)])
def test_discounted_returns_matches_loop(backend, B, T, gamma, device):
    r, _, m = make_inputs(B, T, seed=T)
    out = discounted_returns(*on(device, r, m), gamma, backend=backend)
    check(out, loop_returns(r, m, gamma), "returns")


@pytest.mark.slow  # several programs per row: long interpreted scans
def test_discounted_returns_triton_split_rows(device):
    r, _, m = make_inputs(5, 53, seed=2)
    out = discounted_returns(*on(device, r, m), 0.9, backend="triton", block_t=16, n_splits=3)
    check(out, loop_returns(r, m, 0.9), "returns")


def test_discounted_returns_torch_long_rows(device):
    r, _, m = make_inputs(2, 290, seed=4)
    out = discounted_returns(*on(device, r, m), 0.995, backend="torch")
    check(out, loop_returns(r, m, 0.995), "ret")


def test_discounted_returns_by_hand(device):
    """R_2 = 3; R_1 = 2 + 0.5 * 3; R_0 = 1 (step 1 is masked: the return restarts before it)."""
    r = torch.tensor([[1.0, 2.0, 3.0]])
    m = torch.tensor([[True, False, True]])
    want = torch.tensor([[1.0, 3.5, 3.0]], dtype=torch.float64)
    for backend in BACKENDS:
        out = discounted_returns(*on(device, r, m), 0.5, backend=backend)
        check(out, want, f"returns {backend}")
    assert torch.equal(loop_returns(r, m, 0.5), want)
