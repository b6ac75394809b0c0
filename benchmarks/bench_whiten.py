"""Masked whitening over [B, T]: verl's formula in PyTorch (the reference), the torch path,
Triton (two reduction passes + one elementwise pass).

    python -m benchmarks.bench_whiten            # GPU: B in {64, 512} x T in {1024, 8192}
    python -m benchmarks.bench_whiten --quick    # CPU: small shapes

Rows (benchmarks/results/whiten_<cuda|cpu>.csv): seconds, peak extra memory, GB/s over the
minimum traffic (read values fp32 + mask bool twice for the statistics and values once more,
write fp32: 4+1+4+1+4+4 = 18 B/element) and speedup_vs_reference. Without CUDA there
are no Triton rows: the interpreter's timings are no performance figures (the kernel tests
run that path).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks._common import (  # noqa: E402
    CPU_BT_SHAPES,
    GPU_BT_SHAPES,
    bench_args,
    finish,
    measure_impls,
    summary,
)
from nova_kernels import whiten  # noqa: E402
from nova_kernels.reference import whiten_reference  # noqa: E402


def bench_one(B, T, device, reps, rows):
    on_gpu = device.type == "cuda"
    triton_name = "triton" if on_gpu else "triton_interpreter"
    g = torch.Generator().manual_seed(B + T)
    x = torch.randn(B, T, generator=g).to(device)
    m = (torch.rand(B, T, generator=g) > 0.3).to(device)
    impls = {
        "reference": lambda: whiten_reference(x, m),
        "torch": lambda: whiten(x, m, backend="torch"),
        triton_name: lambda: whiten(x, m, backend="triton"),
    }
    if not on_gpu:  # the interpreter is no timing
        impls.pop(triton_name)
    shape = f"B={B},T={T}"
    times = measure_impls(
        rows,
        op="whiten",
        shape=shape,
        mode="fwd",
        impls=impls,
        reps=reps,
        baseline="reference",
        bytes_moved=18 * B * T,
    )
    print(f"{shape:14s} {summary(times)}")


def main(argv=None):
    args, device, quick = bench_args(__doc__, argv)
    rows: list[dict] = []
    for B, T in CPU_BT_SHAPES if quick else GPU_BT_SHAPES:
        bench_one(B, T, device, args.reps, rows)
    finish("whiten", rows)


if __name__ == "__main__":
    main()
