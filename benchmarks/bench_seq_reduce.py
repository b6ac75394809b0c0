"""seq_reduce: per-sequence masked sum / mean over cu_seqlens, forward and forward+backward.

    python -m benchmarks.bench_seq_reduce            # GPU: T {64k, 1M} x B {64, 1024}
    python -m benchmarks.bench_seq_reduce --quick    # CPU: small shapes

Impls: naive (the per-sequence Python loop, seq_reduce_reference), nova_torch (index_add
path), nova_triton (GPU only; the interpreter is no timing). Rows
(benchmarks/results/seq_reduce_<cuda|cpu>.csv): seconds (p50/p20/p80), peak_mem_bytes
(CPU: exact RSS high-water mark, see bench_linear_logprobs), and for nova impls GB/s over the
bytes the op must move (values fp32 + mask 1 B read, grad fp32 written in backward).
"""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks._common import peak_memory, results_dir, time_interleaved, write_rows  # noqa: E402
from nova_kernels import seq_reduce  # noqa: E402
from nova_kernels.reference import seq_reduce_reference  # noqa: E402

RESULTS = str(results_dir())
GPU_SHAPES = [(t, b) for t in (1 << 16, 1 << 20) for b in (64, 1024)]
CPU_SHAPES = [(1 << 14, 16), (1 << 16, 256)]


def bench_shape(T, B, device, reps, rows, phase):
    """phase "time" or "memory" (all timings first: see bench_linear_logprobs.bench_shape)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    cuts = torch.sort(torch.randperm(T - 1, generator=gen)[: B - 1] + 1).values
    cu = torch.cat([torch.tensor([0]), cuts, torch.tensor([T])]).to(device, torch.int32)
    v = torch.randn(T, generator=gen).to(device).requires_grad_()
    mask = (torch.rand(T, generator=gen) > 0.3).to(device)
    g = torch.randn(B, device=device)
    impls = {"naive": lambda: seq_reduce_reference(v, cu, mask, "mean")}
    impls["nova_torch"] = lambda: seq_reduce(v, cu, mask, reduction="mean", backend="torch")
    if device.type == "cuda":
        impls["nova_triton"] = lambda: seq_reduce(v, cu, mask, reduction="mean", backend="triton")
    shape = f"T={T},B={B}"
    timed = {}
    for name, f in impls.items():

        def fwd(f=f):
            with torch.no_grad():
                return f()

        def fwd_bwd(f=f):
            v.grad = None
            (f() * g).sum().backward()

        for mode, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            if phase == "memory":
                mem = peak_memory(fn)
                rows.append(
                    dict(
                        op="seq_reduce",
                        impl=name,
                        shape=shape,
                        mode=mode,
                        metric="peak_mem_bytes",
                        p50=mem,
                        p20=mem,
                        p80=mem,
                    )
                )
            else:
                timed[f"{name}|{mode}"] = fn
    if phase == "memory":
        return
    nbytes = {"fwd": 5 * T, "fwd_bwd": 14 * T}
    for key, times in time_interleaved(timed, warmup=2, reps=reps).items():
        name, mode = key.split("|")
        base = dict(op="seq_reduce", impl=name, shape=shape, mode=mode)
        rows.append(dict(base, metric="seconds", p50=times[0], p20=times[1], p80=times[2]))
        if name != "naive":
            gbs = [nbytes[mode] / t / 1e9 for t in times]
            rows.append(dict(base, metric="GB/s", p50=gbs[0], p20=gbs[2], p80=gbs[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU-sized shapes")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    quick = args.quick or not on_gpu
    rows: list[dict] = []
    for phase in ("time", "memory"):
        for T, B in CPU_SHAPES if quick else GPU_SHAPES:
            bench_shape(T, B, device, args.reps or (5 if quick else 50), rows, phase)
    out = args.out or os.path.join(RESULTS, f"seq_reduce_{'cuda' if on_gpu else 'cpu'}.csv")
    write_rows(out, rows)
    for r in rows:
        print(f"{r['impl']:>12} {r['shape']:>16} {r['mode']:>8} {r['metric']:>16} {r['p50']:.4g}")


if __name__ == "__main__":
    main()
