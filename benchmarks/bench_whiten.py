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

from benchmarks._common import peak_memory, time_fn, write_rows  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")


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
    times = {}
    shape = f"B={B},T={T}"
    for impl, fn in impls.items():
        slow = impl == "triton_interpreter"
        t = time_fn(fn, warmup=1 if slow else 3, reps=3 if slow else reps)
        times[impl] = t
        base = dict(op="whiten", impl=impl, shape=shape, mode="fwd")
        rows.append({**base, "metric": "seconds", "p50": t[0], "p20": t[1], "p80": t[2]})
        rows.append({**base, "metric": "peak_mem_bytes", "p50": peak_memory(fn)})
        rows.append({**base, "metric": "GB/s", "p50": 18 * B * T / t[0] / 1e9})
        if impl != "reference":
            speedup = times["reference"][0] / t[0]
            rows.append({**base, "metric": "speedup_vs_reference", "p50": speedup})
    print(f"{shape:14s} " + ", ".join(f"{k} {v[0] * 1e3:.3f} ms" for k, v in times.items()))


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
    path = os.path.join(RESULTS, f"whiten_{'cuda' if on_gpu else 'cpu'}.csv")
    write_rows(path, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
