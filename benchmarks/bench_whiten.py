"""Masked whitening of an RLVR step's packed token advantages [T]: verl's `masked_whiten`
formula in plain PyTorch (impl verl), the production call `nova_kernels.whiten(adv, mask,
reduce=...)` on its torch path and (GPU) its Triton path.

    python -m benchmarks.bench_whiten            # GPU: T in {64k, 256k, 1M} packed tokens
    python -m benchmarks.bench_whiten --quick    # CPU: the same T (torch path only)

The production call passes the trainer's DP all-reduce; here a one-rank `reduce` (a no-op
callback: the call sequence and its two small tensors are timed, not the collective).
Timed interleaved (A B A B). Rows (benchmarks/results/whiten_<cuda|cpu>.csv): seconds,
peak extra memory, GB/s over the minimum traffic (values fp32 + mask bool read for each of
the two statistics passes, values once more, output fp32 written: 4+1+4+1+4+4 = 18 B per
token), speedup_vs_verl. Without CUDA there are no Triton rows: the interpreter's timings
are no performance figures (the kernel tests run that path).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks._common import bench_args, finish, measure_impls, summary  # noqa: E402
from nova_kernels import whiten  # noqa: E402

TOKENS = (1 << 16, 1 << 18, 1 << 20)  # packed response tokens of one step (on one rank)


def verl_masked_whiten(values, mask, shift_mean=True):
    """verl's core_algos.masked_whiten (masked_mean / masked_var with Bessel's correction)."""
    mean = (values * mask).sum() / (mask.sum() + 1e-8)
    var = ((values - mean) ** 2 * mask).sum() / (mask.sum() + 1e-8)
    n = mask.sum()
    var = var * n / (n - 1)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def _one_rank(t: torch.Tensor, op: str) -> None:
    """The all-reduce of a world of one: nothing to add."""


def bench_one(T, device, reps, rows):
    on_gpu = device.type == "cuda"
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, generator=g).to(device)
    m = (torch.rand(T, generator=g) > 0.3).to(device)
    impls = {
        "verl": lambda: verl_masked_whiten(x, m),
        "torch": lambda: whiten(x, m, backend="torch", reduce=_one_rank),
    }
    if on_gpu:  # the interpreter is no timing
        impls["triton"] = lambda: whiten(x, m, backend="triton", reduce=_one_rank)
    ref = impls["verl"]()
    for name, fn in impls.items():
        torch.testing.assert_close(fn(), ref, rtol=1e-4, atol=1e-4, msg=name)
    shape = f"T={T}"
    times = measure_impls(
        rows, op="whiten", shape=shape, mode="fwd", impls=impls, reps=reps, baseline="verl",
        bytes_moved=18 * T,
    )  # fmt: skip
    print(f"{shape:10s} {summary(times)}")


def main(argv=None):
    args, device, _ = bench_args(__doc__, argv)
    rows: list[dict] = []
    for T in TOKENS:
        bench_one(T, device, args.reps, rows)
    finish("whiten", rows)


if __name__ == "__main__":
    main()
