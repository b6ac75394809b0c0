"""Masked whitening over [B, T]: verl's formula in PyTorch (the reference), the torch path,
Triton (two reduction passes + one elementwise pass).

    python -m benchmarks.bench_whiten            # GPU: B in {64, 512} x T in {1024, 8192}
    python -m benchmarks.bench_whiten --quick    # CPU: small shapes

Rows (benchmarks/results/whiten_<cuda|cpu>.csv): seconds, peak extra memory, GB/s over the
minimum traffic (read values fp32 + mask bool twice for the statistics and values once more,
write fp32: 4+1+4+1+4+4 = 18 B/element) and speedup_vs_reference. Without CUDA the Triton
rows (triton_interpreter) only show the path runs; they are not performance figures.
"""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nova_kernels.whiten import whiten, whiten_reference  # noqa: E402

from benchmarks._common import measure_impls, results_path, summary, write_rows  # noqa: E402


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
    shape = f"B={B},T={T}"
    times = measure_impls(
        rows, op="whiten", shape=shape, mode="fwd", impls=impls, reps=reps,
        baseline="reference", bytes_moved=18 * B * T,
    )  # fmt: skip
    print(f"{shape:14s} {summary(times)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU)")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    if args.quick or not on_gpu:
        shapes = [(8, 128), (64, 1024)]
    else:
        shapes = [(B, T) for B in (64, 512) for T in (1024, 8192)]
    rows = []
    for B, T in shapes:
        bench_one(B, T, device, args.reps, rows)
    path = results_path("whiten")
    write_rows(path, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
