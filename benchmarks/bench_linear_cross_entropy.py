"""linear_cross_entropy (the SFT loss, 3 GEMMs with the grads formed in the forward pass):
forward+backward time and peak memory of -sum_n w_n log p(target_n) for the Triton row kernel
and the torch row pass of the head, against the 3-GEMM floor (three bare GEMMs of the head's
shapes, bf16: z = h W^T, dh = z W, dW = z^T h), the naive path (logits -> log_softmax ->
gather: nova_kernels.reference), linear_logprobs followed by the weighted sum (4 GEMMs), and
Liger-Kernel's LigerFusedLinearCrossEntropyLoss (its default bf16 grad_W accumulation, and
accum_dtype=float32, the head's numerics contract) when liger_kernel imports.

    python -m benchmarks.bench_linear_cross_entropy            # GPU: N=32768, H=4096, V=128256
    python -m benchmarks.bench_linear_cross_entropy --quick    # smaller (CPU: fp32, torch only)

The goal (issue #25): <= 1.15 x the floor and >= 1.2 x Liger's speed at <= Liger's memory at
the GPU shape. All impls of a shape are timed interleaved (`_common.time_interleaved`), then
their peak memory measured one by one (inputs excluded, grads included). Rows
(benchmarks/results/linear_cross_entropy_<cuda|cpu>.csv): seconds (p50/p20/p80),
peak_mem_bytes, x_gemm3 (p50 / the floor's p50), speedup_vs_liger_flce (Liger's p50 / p50) and
mem_vs_naive. Out of memory: one `oom` row. The Triton impls and Liger run on GPU only (the
interpreter is no timing).
"""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks._common import finish, peak_memory, summary, time_interleaved  # noqa: E402
from nova_kernels import linear_cross_entropy, linear_logprobs  # noqa: E402
from nova_kernels.reference import linear_cross_entropy_reference  # noqa: E402

GPU_SHAPES = [(32768, 4096, 128256)]  # N tokens, H, V: the goal shape
GPU_QUICK = [(8192, 4096, 128256)]
CPU_SHAPES = [(1024, 256, 32000)]


def _liger(**kw):
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    try:
        return LigerFusedLinearCrossEntropyLoss(reduction="sum", **kw)
    except TypeError:  # an older Liger without accum_dtype
        return None


def ce_impls(h, w, t, wts):
    """name -> fwd+bwd fn (grads left in h.grad / w.grad)."""
    on_gpu = h.is_cuda
    hd, wd = h.detach(), w.detach()

    def loss_only(fn):
        def fwd_bwd():
            h.grad = w.grad = None
            fn().backward()

        return fwd_bwd

    def floor():  # the three GEMMs of the head at their full shapes, operands in h's dtype
        z = hd @ wd.T
        return z @ wd, z.T @ hd

    out = {"gemm3_floor": floor}
    backends = ("triton", "torch") if on_gpu else ("torch",)
    for b in backends:
        out[f"nova_fused_ce_{b}"] = loss_only(
            lambda b=b: linear_cross_entropy(h, w, t, wts, backend=b)
        )
    out["naive_ce"] = loss_only(lambda: linear_cross_entropy_reference(h, w, t, wts))
    out["nova_logprobs_4gemm"] = loss_only(
        lambda: -(linear_logprobs(h, w, t, backend=backends[0]) * wts).sum()
    )
    if on_gpu:
        # Liger's loss has no per-token weights: it times the unweighted sum (same FLOPs)
        for name, kw in (
            ("liger_flce", {}),
            ("liger_flce_fp32acc", {"accum_dtype": torch.float32}),
        ):
            flce = _liger(**kw)
            if flce is not None:
                out[name] = loss_only(lambda f=flce: f(w, h, t))
    return out


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _runs(name, fn, rows, base) -> bool:
    """One probe call; False (and an `oom` row) when it runs out of memory."""
    try:
        fn()
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
        if not _is_oom(e):
            raise
        rows.append({**base, "impl": name, "metric": "oom", "p50": float("nan")})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return False
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    shapes = (GPU_QUICK if args.quick else GPU_SHAPES) if on_gpu else CPU_SHAPES
    reps = args.reps or (10 if on_gpu else 3)
    rows, memory_jobs = [], []
    for N, H, V in shapes:
        shape = f"N={N},H={H},V={V},{str(dtype).removeprefix('torch.')}"
        gen = torch.Generator().manual_seed(0)
        h = torch.randn(N, H, generator=gen).to(device, dtype).requires_grad_()
        w = (torch.randn(V, H, generator=gen) / H**0.5).to(device, dtype).requires_grad_()
        t = torch.randint(0, V, (N,), generator=gen).to(device)
        wts = torch.rand(N, generator=gen).to(device)  # e.g. loss_mask / global token count
        base = dict(op="linear_cross_entropy", shape=shape, mode="fwd_bwd")
        impls = {k: f for k, f in ce_impls(h, w, t, wts).items() if _runs(k, f, rows, base)}
        times = time_interleaved(impls, warmup=2, reps=reps)
        print(f"{shape}: {summary(times)}")
        floor, liger = times["gemm3_floor"][0], times.get("liger_flce", (None,))[0]
        for impl, (p50, p20, p80) in times.items():
            b = dict(base, impl=impl)
            rows.append({**b, "metric": "seconds", "p50": p50, "p20": p20, "p80": p80})
            rows.append({**b, "metric": "x_gemm3", "p50": p50 / floor})
            if liger is not None:
                rows.append({**b, "metric": "speedup_vs_liger_flce", "p50": liger / p50})
        memory_jobs.append((base, impls))
        h.grad = w.grad = None
    # memory after every timing: on CPU peak_memory changes glibc's malloc settings
    for base, impls in memory_jobs:
        mem = {impl: peak_memory(fn) for impl, fn in impls.items()}
        print(f"{base['shape']}: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in mem.items()))
        naive = mem.get("naive_ce")
        for impl, m in mem.items():
            rows.append({**base, "impl": impl, "metric": "peak_mem_bytes", "p50": float(m)})
            if naive:
                rows.append({**base, "impl": impl, "metric": "mem_vs_naive", "p50": m / naive})
    finish("linear_cross_entropy", rows)


if __name__ == "__main__":
    main()
