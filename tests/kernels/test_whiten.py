"""Masked whitening: Triton (interpreter on CPU) and torch paths against verl's formula in
float64 (nova_kernels.reference), and the statistics of the result by definition."""

from __future__ import annotations

import pytest
import torch

from nova_kernels import whiten
from nova_kernels._testing import assert_verbose_allclose
from nova_kernels.reference import whiten_reference

BACKENDS = ["triton", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(7, 53), (3, 1000), (37,)])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_loop(backend, shape, shift_mean, device):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * 3 + 1.5
    m = torch.rand(shape, generator=g) > 0.4
    out = whiten(x.to(device), m.to(device), shift_mean=shift_mean, backend=backend)
    assert out.dtype == torch.float32 and out.device.type == torch.device(device).type
    out = out.cpu()
    ref = whiten_reference(x.double(), m, shift_mean)
    assert_verbose_allclose(out, ref, rtol=1e-5, atol=1e-5, name="whitened")


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


def test_whiten_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="mask"):
        whiten(torch.randn(3, 4), torch.ones(3, 5), backend="torch")
