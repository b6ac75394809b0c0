"""seq_reduce: Triton (interpreter) and torch paths against the per-sequence loop reference,
forward and backward, sum and mean, with and without a mask, odd lengths, empty sequences,
tokens outside every sequence."""

from __future__ import annotations

import pytest
import torch

from nova_kernels import seq_reduce
from nova_kernels._testing import assert_verbose_allclose
from nova_kernels.reference import seq_reduce_reference

BACKENDS = ["triton", "torch"]


def _case(lengths, tail=0, seed=0, dtype=torch.float32, cu_dtype=torch.int32):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=cu_dtype)
    T = int(cu[-1]) + tail  # tail: padding tokens after the last sequence
    values = torch.randn(T, generator=g).to(dtype)
    mask = torch.rand(T, generator=g) > 0.3
    return values, cu, mask


CASES = [
    ([5, 1, 130, 0, 77], 3),  # odd lengths, a 1-token and an empty sequence, padded tail
    ([64, 64, 64, 64], 0),  # round
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("use_mask", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_forward_backward_vs_reference(backend, reduction, use_mask, case, device):
    values, cu, mask = _case(*case)
    mask = mask if use_mask else None
    g_out = torch.randn(cu.numel() - 1, generator=torch.Generator().manual_seed(1))
    v = values.clone().to(device).requires_grad_()
    dmask = mask.to(device) if mask is not None else None
    out = seq_reduce(v, cu.to(device), dmask, reduction=reduction, backend=backend)
    (out * g_out.to(device)).sum().backward()
    out, v_grad = out.cpu(), v.grad.cpu()
    v64 = values.double().requires_grad_()
    ref = seq_reduce_reference(v64, cu, mask, reduction)
    (ref * g_out.double()).sum().backward()
    assert out.dtype == torch.float32
    assert_verbose_allclose(out, ref, rtol=1e-5, atol=1e-5, name=f"{backend} {reduction}")
    assert_verbose_allclose(v_grad, v64.grad, rtol=1e-6, atol=1e-7, name=f"{backend} grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_counts_int64_cu_bf16_values(backend, device):
    values, cu, mask = _case([3, 0, 9, 40], tail=2, seed=2, dtype=torch.bfloat16)
    cu = cu.long()
    v = values.clone().to(device).requires_grad_()
    kw = dict(reduction="mean", return_counts=True, backend=backend)
    out, cnt = seq_reduce(v, cu.to(device), mask.to(device), **kw)
    out.sum().backward()
    out, cnt, v_grad = out.cpu(), cnt.cpu(), v.grad.cpu()
    want_cnt = torch.tensor([float(mask[cu[b] : cu[b + 1]].sum()) for b in range(4)])
    assert_verbose_allclose(cnt, want_cnt, rtol=0, atol=0, name="counts")
    ref = seq_reduce_reference(values.double(), cu, mask, "mean")
    assert_verbose_allclose(out, ref, rtol=1e-5, atol=1e-5, name="bf16 mean")
    assert v_grad.dtype == torch.bfloat16
    # by hand: grad of the mean is mask / count inside each sequence, 0 in the tail
    seg = torch.repeat_interleave(torch.arange(4), cu.diff())
    want = torch.zeros(values.numel(), dtype=torch.float64)
    want[: seg.numel()] = mask[: seg.numel()].double() / want_cnt[seg].clamp_min(1).double()
    assert_verbose_allclose(v_grad, want, rtol=1e-2, atol=0, name="mean grad by hand")


def test_backends_agree_and_gradcheck(device):
    values, cu, mask = _case([4, 7, 2], seed=3, dtype=torch.float64)
    for reduction in ("sum", "mean"):
        fn = lambda v, r=reduction: seq_reduce(v, cu, mask, reduction=r, backend="torch")
        assert torch.autograd.gradcheck(fn, (values.clone().requires_grad_(),))
        args = (values.float().to(device), cu.to(device), mask.to(device))
        a = seq_reduce(*args, reduction=reduction, backend="triton").cpu()
        b = seq_reduce(*args, reduction=reduction, backend="torch").cpu()
        assert_verbose_allclose(a, b, rtol=1e-6, atol=1e-6, name=reduction)


def test_errors():
    v, cu = torch.randn(5), torch.tensor([0, 2, 5])
    with pytest.raises(ValueError, match="reduction="):
        seq_reduce(v, cu, reduction="max")
    with pytest.raises(ValueError, match="int32/int64"):
        seq_reduce(v, cu.float())
    with pytest.raises(ValueError, match="mask"):
        seq_reduce(v, cu, torch.ones(4))
