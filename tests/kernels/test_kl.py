"""KL estimators k1 | k2 | k3 on their own (kl_divergence as a loss term, kl_penalty as a
reward penalty): Triton (interpreter on CPU) and torch paths, forward and backward, for every
KL type and clamp setting, against the float64 reference (nova_kernels.reference.kl_reference,
gradients from autograd); by hand; input dtypes and shapes; bad arguments."""

from __future__ import annotations

import math

import pytest
import torch

from nova_kernels import KL_TYPES, kl_divergence, kl_penalty
from nova_kernels._testing import assert_verbose_allclose
from nova_kernels.reference import kl_reference

BACKENDS = ["triton", "torch"]
CLAMPS = {
    "default": dict(log_ratio_clamp=20.0, value_clamp=10.0),
    "none": dict(log_ratio_clamp=None, value_clamp=None),
    "tight": dict(log_ratio_clamp=1.5, value_clamp=0.7),
}


def make_inputs(shape, seed):
    """logprobs <= 0, ref = logprobs + noise, a few |ref - lp| > 20 (the log-ratio clamp),
    and an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(shape, generator=g) * 3
    ref = lp + 2.0 * torch.randn(shape, generator=g)
    far = torch.rand(shape, generator=g) < 0.05
    ref = torch.where(far, lp + 25 * torch.sign(torch.randn(shape, generator=g)), ref)
    gout = torch.randn(shape, generator=g)
    return lp, ref, gout


def reference(lp, ref, gout, kl_type, clamps):
    """(kl, d(sum(kl * gout))/d lp) in float64."""
    x = lp.double().requires_grad_(True)
    kl = kl_reference(x, ref.double(), kl_type, **clamps)
    (kl * gout.double()).sum().backward()
    return kl.detach(), x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_type", KL_TYPES)
@pytest.mark.parametrize("clamp", list(CLAMPS))
@pytest.mark.parametrize("shape", [(7, 53), (1000,), (2, 3, 37)])
def test_kl_divergence_fwd_bwd(backend, kl_type, clamp, shape, device):
    lp, ref, gout = make_inputs(shape, seed=sum(shape))
    want, want_grad = reference(lp, ref, gout, kl_type, CLAMPS[clamp])
    y = lp.clone().to(device).requires_grad_(True)
    kl = kl_divergence(y, ref.to(device), kl_type, backend=backend, **CLAMPS[clamp])
    (kl * gout.to(device)).sum().backward()
    assert kl.dtype == torch.float32 and kl.shape == lp.shape
    tag = f"{kl_type} {clamp} {backend}"
    assert_verbose_allclose(kl.detach().cpu(), want, rtol=1e-5, atol=1e-5, name=f"kl {tag}")
    assert_verbose_allclose(y.grad.cpu(), want_grad, rtol=1e-5, atol=1e-5, name=f"dkl {tag}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_type", KL_TYPES)
def test_kl_divergence_bf16_logprobs(backend, kl_type, device):
    """bf16 log-probs: the KL is fp32 of the bf16 values, the gradient bf16 (the input's
    dtype) within bf16's rounding of the float64 gradient."""
    lp, ref, gout = make_inputs((5, 67), seed=9)
    lp = lp.bfloat16()
    want, want_grad = reference(lp, ref, gout, kl_type, CLAMPS["default"])
    y = lp.clone().to(device).requires_grad_(True)
    kl = kl_divergence(y, ref.to(device), kl_type, backend=backend)
    (kl * gout.to(device)).sum().backward()
    assert kl.dtype == torch.float32 and y.grad.dtype == torch.bfloat16
    assert_verbose_allclose(kl.detach().cpu(), want, rtol=1e-5, atol=1e-5, name="kl bf16")
    assert_verbose_allclose(y.grad.cpu(), want_grad, rtol=1e-2, atol=1e-2, name="dkl bf16")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_divergence_empty(backend, device):
    y = torch.zeros(0, 4, device=device, requires_grad=True)
    kl = kl_divergence(y, torch.zeros(0, 4, device=device), backend=backend)
    kl.sum().backward()
    assert kl.shape == (0, 4) and y.grad.shape == (0, 4)


def test_kl_estimators_by_hand(device):
    """logr = ref - lp = -0.5, 0.5, 30 (clamped to 20, then the value to +-10): values and
    d/dlp of k1 = -logr, k2 = logr^2 / 2, k3 = e^logr - 1 - logr, for both backends and the
    reference the other tests compare against."""
    lp = torch.tensor([-1.0, -1.0, -2.0])
    ref = torch.tensor([-1.5, -0.5, 28.0])
    e_lo, e_hi = math.exp(-0.5), math.exp(0.5)
    want = {
        "k1": ([0.5, -0.5, -10.0], [1.0, 1.0, 0.0]),
        "k2": ([0.125, 0.125, 10.0], [0.5, -0.5, 0.0]),
        "k3": ([e_lo - 0.5, e_hi - 1.5, 10.0], [1 - e_lo, 1 - e_hi, 0.0]),
    }
    assert set(want) == set(KL_TYPES)
    fns = {b: (lambda x, r, k, b=b: kl_divergence(x, r, k, backend=b)) for b in BACKENDS}
    fns["reference"] = kl_reference
    for kl_type, (value, grad) in want.items():
        for name, fn in fns.items():
            dev = "cpu" if name == "reference" else device
            x = lp.clone().to(dev).requires_grad_(True)
            kl = fn(x, ref.to(dev), kl_type)
            kl.sum().backward()
            tag = f"{kl_type} {name}"
            kl = kl.detach().cpu()
            assert_verbose_allclose(kl, torch.tensor(value), rtol=1e-6, atol=1e-6, name=tag)
            assert_verbose_allclose(
                x.grad.cpu(), torch.tensor(grad), rtol=1e-6, atol=1e-6, name=tag
            )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_type", KL_TYPES)
def test_kl_penalty_matches_reference(backend, kl_type, device):
    """rewards - coef * kl * mask and kl * mask for every KL type; no gradient flows."""
    lp, ref, _ = make_inputs((4, 29), seed=3)
    g = torch.Generator().manual_seed(4)
    rewards = torch.randn(4, 29, generator=g)
    mask = (torch.rand(4, 29, generator=g) > 0.5).float()
    lp = lp.requires_grad_(True)
    args = (t.to(device) for t in (rewards, lp, ref, mask))
    out, kl = kl_penalty(*args, 0.05, kl_type, backend=backend)
    assert not out.requires_grad and not kl.requires_grad
    want_kl = kl_reference(lp.detach().double(), ref.double(), kl_type) * mask
    assert_verbose_allclose(kl.cpu(), want_kl, rtol=1e-5, atol=1e-5, name="kl * mask")
    want = rewards.double() - 0.05 * want_kl
    assert_verbose_allclose(out.cpu(), want, rtol=1e-5, atol=1e-5, name="penalized")


def test_kl_rejects_bad_arguments():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="kl_type"):
        kl_divergence(x, x, "k4")
    with pytest.raises(ValueError, match="shaped like"):
        kl_divergence(x, torch.zeros(4))
