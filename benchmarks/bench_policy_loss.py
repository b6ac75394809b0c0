"""Policy loss (PPO clip + dual clip + truncated IS + k3 KL term, token-mean), forward and
forward+backward: the vectorized PyTorch path (verl's formulas under autograd) vs the fused
Triton kernels (per-row partial sums forward, elementwise recomputing backward).

    python -m benchmarks.bench_policy_loss            # GPU: B in {64, 512} x T in {1024, 8192}
    python -m benchmarks.bench_policy_loss --quick    # CPU: small shapes

There is no Python-loop baseline here: the engines compute this loss with vectorized
PyTorch already (that is the `torch` impl). Rows (benchmarks/results/policy_loss_<cuda|cpu>.csv):
seconds, peak extra memory and speedup_vs_torch per mode. Without CUDA there are no
Triton rows: the interpreter's timings are no performance figures.
"""

from __future__ import annotations

import functools
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
from nova_kernels import policy_loss  # noqa: E402

INTERPRETER_MAX_TOKENS = 0  # no interpreter timings (they are no performance figures)
CFG = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, tis_cap=2.0, kl_coef=0.05, kl_type="k3")


def make_inputs(B, T, device):
    g = torch.Generator().manual_seed(B * T)
    old = -torch.rand(B, T, generator=g) * 3
    lp = old + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    rl = old + 0.2 * torch.randn(B, T, generator=g)
    ref = lp + 0.5 * torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    return [t.to(device) for t in (lp, old, adv, mask, rl, ref)]


def bench_one(B, T, device, reps, rows):
    on_gpu = device.type == "cuda"
    triton_name = "triton" if on_gpu else "triton_interpreter"
    lp, old, adv, mask, rl, ref = make_inputs(B, T, device)
    x = lp.clone().requires_grad_(True)
    shape = f"B={B},T={T}"

    def loss(backend):
        kw = dict(rollout_logprobs=rl, ref_logprobs=ref, backend=backend, **CFG)
        return policy_loss(x, old, adv, mask, **kw)[0]

    def fwd(backend):
        with torch.no_grad():
            return loss(backend)

    def fwd_bwd(backend):
        x.grad = None
        loss(backend).backward()

    for mode, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        impls = {
            impl: functools.partial(fn, backend)
            for impl, backend in (("torch", "torch"), (triton_name, "triton"))
            if not (impl == "triton_interpreter" and B * T > INTERPRETER_MAX_TOKENS)
        }
        times = measure_impls(
            rows,
            op="policy_loss",
            shape=shape,
            mode=mode,
            impls=impls,
            reps=reps,
            baseline="torch",
        )
        print(f"{mode:8s} {shape:14s} {summary(times)}")


def main(argv=None):
    args, device, quick = bench_args(__doc__, argv)
    rows: list[dict] = []
    for B, T in CPU_BT_SHAPES if quick else GPU_BT_SHAPES:
        bench_one(B, T, device, args.reps, rows)
    finish("policy_loss", rows)


if __name__ == "__main__":
    main()
