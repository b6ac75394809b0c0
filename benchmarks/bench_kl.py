"""Per-token KL estimate (k3, the RLVR default; k1) of packed log-probs against the reference
model's, forward and forward+backward: naive PyTorch under autograd (impl naive: clamp the
log-ratio, the estimator, clamp the value; what verl's kl_penalty does) vs
`nova_kernels.kl_divergence` on its torch path and (GPU) its Triton path (one elementwise
kernel each way, the backward recomputing from the inputs).

    python -m benchmarks.bench_kl            # GPU: T in {64k, 256k, 1M} packed tokens
    python -m benchmarks.bench_kl --quick    # CPU: the same T (torch paths only)

Rows (benchmarks/results/kl_<cuda|cpu>.csv): seconds and peak extra memory per mode, timed
interleaved (A B A B), speedup_vs_naive. Without CUDA there are no Triton rows: the
interpreter's timings are no performance figures.
"""

from __future__ import annotations

import functools
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks._common import bench_args, finish, measure_impls, summary  # noqa: E402
from nova_kernels import kl_divergence  # noqa: E402

TOKENS = (1 << 16, 1 << 18, 1 << 20)  # packed tokens of a micro-batch


def naive_kl(logprobs, ref_logprobs, kl_type):
    """verl's core_algos.kl_penalty (k1 'kl', k3 'low_var_kl') with Nova's clamps."""
    logr = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    kl = -logr if kl_type == "k1" else torch.exp(logr) - logr - 1
    return kl.clamp(-10.0, 10.0)


def bench_one(T, kl_type, device, reps, rows):
    g = torch.Generator().manual_seed(T)
    lp = (-torch.rand(T, generator=g) * 3).to(device)
    ref = lp + (0.5 * torch.randn(T, generator=g)).to(device)
    gout = torch.randn(T, generator=g).to(device)
    x = lp.clone().requires_grad_(True)
    fns = {"naive": lambda: naive_kl(x, ref, kl_type)}
    fns["torch"] = lambda: kl_divergence(x, ref, kl_type, backend="torch")
    if device.type == "cuda":  # the interpreter is no timing
        fns["triton"] = lambda: kl_divergence(x, ref, kl_type, backend="triton")
    with torch.no_grad():
        want = fns["naive"]()
        for name, fn in fns.items():
            torch.testing.assert_close(fn(), want, rtol=1e-5, atol=1e-5, msg=name)

    def fwd(fn):
        with torch.no_grad():
            return fn()

    def fwd_bwd(fn):
        x.grad = None
        (fn() * gout).sum().backward()

    shape = f"T={T},{kl_type}"
    for mode, run in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        impls = {name: functools.partial(run, fn) for name, fn in fns.items()}
        times = measure_impls(
            rows, op="kl_divergence", shape=shape, mode=mode, impls=impls, reps=reps,
            baseline="naive",
        )  # fmt: skip
        print(f"{mode:8s} {shape:14s} {summary(times)}")


def main(argv=None):
    args, device, _ = bench_args(__doc__, argv)
    rows: list[dict] = []
    for T in TOKENS:
        for kl_type in ("k3", "k1"):
            bench_one(T, kl_type, device, args.reps, rows)
    finish("kl", rows)


if __name__ == "__main__":
    main()
