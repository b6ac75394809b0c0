"""Masked whitening: Triton (interpreter on CPU) and torch paths against a float64 loop."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from nova_kernels import whiten
from nova_kernels._testing import assert_verbose_allclose

whiten_mod = importlib.import_module("nova_kernels.whiten")
BACKENDS = ["triton", "torch"]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(whiten_mod, "_empty", lambda *a, **k: torch.full(*a, float("nan"), **k))


def loop_whiten(values, mask, shift_mean=True, eps=1e-8):
    xs = [float(x) for x, m in zip(values.flatten(), mask.flatten()) if m]
    n = len(xs)
    mean = sum(xs) / (n + 1e-8)
    var = sum((x - mean) ** 2 for x in xs) / (n + 1e-8) * n / (n - 1)
    out = [(float(x) - mean) / math.sqrt(var + eps) for x in values.flatten()]
    out = torch.tensor(out, dtype=torch.float64).view(values.shape)
    return out if shift_mean else out + mean


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(7, 53), (3, 1000), (37,)])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_loop(backend, shape, shift_mean):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * 3 + 1.5
    m = torch.rand(shape, generator=g) > 0.4
    out = whiten(x, m, shift_mean=shift_mean, backend=backend)
    assert out.dtype == torch.float32
    ref = loop_whiten(x, m, shift_mean)
    assert_verbose_allclose(out, ref, rtol=1e-5, atol=1e-5, name="whitened")
    assert_verbose_allclose(
        whiten_mod.whiten_reference(x.double(), m, shift_mean), ref, rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_whiten_masked_stats_are_standard(backend):
    """Over the masked elements the result has mean 0 and unbiased variance ~1."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 71, generator=g).exp()
    m = (torch.rand(5, 71, generator=g) > 0.5).float()
    out = whiten(x, m, backend=backend)[m.bool()].double()
    assert abs(out.mean().item()) < 1e-5
    assert abs(out.var().item() - 1.0) < 1e-4


def test_whiten_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="mask"):
        whiten(torch.randn(3, 4), torch.ones(3, 5), backend="torch")
