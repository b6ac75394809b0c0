"""Helpers shared by the kernel tests and benchmarks: comparisons that say where and by how
much, and fresh random inputs. The references live in `nova_kernels.reference`; outputs are
poisoned through `nova_kernels._common.poisoned`."""

from __future__ import annotations

import torch


def assert_verbose_allclose(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    rtol: float,
    atol: float,
    name: str = "tensor",
    max_print: int = 5,
) -> None:
    """Like torch.testing.assert_close, but says how many elements mismatch and where."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    nan_mismatch = torch.isnan(a) != torch.isnan(e)
    diff = (a - e).abs()
    bad = (diff > atol + rtol * e.abs()) | nan_mismatch
    bad &= ~(torch.isnan(a) & torch.isnan(e))
    n_bad = int(bad.sum())
    if n_bad:
        idx = bad.nonzero()[:max_print]
        lines = [
            f"  at {tuple(i.tolist())}: actual={a[tuple(i)].item():.8g} "
            f"expected={e[tuple(i)].item():.8g}"
            for i in idx
        ]
        finite = diff[~torch.isnan(diff)]
        worst = float(finite.max()) if finite.numel() else float("nan")
        raise AssertionError(
            f"{name}: {n_bad}/{a.numel()} elements mismatch (rtol={rtol}, atol={atol}); "
            f"max abs diff {worst:.3g}\n" + "\n".join(lines)
        )


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.detach().double() - ref.detach().double()).abs().max())


def assert_within_torch_error(
    kernel_out: torch.Tensor,
    torch_same_dtype: torch.Tensor,
    ref_fp32: torch.Tensor,
    *,
    name: str = "tensor",
    factor: float = 2.0,
    floor: float = 1e-6,
) -> None:
    """flash-attention's rule: err(kernel, ref) <= factor * err(torch_same_dtype, ref) + floor.

    `ref_fp32` is the high-precision reference (fp32 or fp64); `torch_same_dtype` is the plain
    PyTorch path run in the kernel's input dtype (e.g. bf16), whose error sets the budget.
    """
    k_err = max_abs_err(kernel_out, ref_fp32)
    t_err = max_abs_err(torch_same_dtype, ref_fp32)
    if k_err > factor * t_err + floor:
        raise AssertionError(
            f"{name}: kernel error {k_err:.3g} > {factor} x torch error {t_err:.3g} + {floor:g}"
        )


def linear_inputs(n: int, h: int, v: int, dtype: torch.dtype, seed: int = 0, n_ignored: int = 3):
    """Fresh random inputs of the LM-head ops: hidden [n, h], weight [v, h] (logits spread over
    several nats), targets [n] with `n_ignored` rows at -100, and upstream gradients for the
    log-probs and the entropy ([n] each)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.25).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.randperm(n, generator=g)[:n_ignored]] = -100
    g_lp = torch.randn(n, generator=g)
    g_ent = torch.randn(n, generator=g)
    return hidden, weight, targets, g_lp, g_ent
