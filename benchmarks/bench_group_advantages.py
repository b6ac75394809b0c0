"""Group advantages (GRPO, RLOO): verl's loop over a dict of groups, the vectorized PyTorch
path (index_add / scatter_reduce), Triton (argsort once, one program per group).

    python -m benchmarks.bench_group_advantages            # GPU: S in {64, 512, 8192} samples
    python -m benchmarks.bench_group_advantages --quick    # CPU: small shapes

Groups of n = 8 samples per prompt, ids shuffled (the general, non-contiguous layout).
Rows (benchmarks/results/group_advantages_<cuda|cpu>.csv): seconds, peak extra memory,
speedup_vs_loop. Without CUDA the Triton rows (impl triton_interpreter) only show that the
path runs under the interpreter; they are not performance figures.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nova_kernels.group_advantages import (  # noqa: E402
    group_advantages,
    group_advantages_reference,
)

from benchmarks._common import bench_args, finish, measure_impls, summary  # noqa: E402

GROUP = 8


def bench_one(S, est, device, reps, rows):
    """Times the loop, torch and Triton impls of `est` on S shuffled samples."""
    on_gpu = device.type == "cuda"
    triton_name = "triton" if on_gpu else "triton_interpreter"
    g = torch.Generator().manual_seed(S)
    ids = torch.arange(S // GROUP).repeat_interleave(GROUP)[torch.randperm(S, generator=g)]
    scores = (torch.randint(0, 2, (S,), generator=g).float() * 10).to(device)
    ids = ids.to(device)
    G = S // GROUP
    impls = {
        "loop": lambda: group_advantages_reference(scores, ids, est),
        "torch": lambda: group_advantages(
            scores, ids, estimator=est, num_groups=G, backend="torch"
        ),
        triton_name: lambda: group_advantages(
            scores, ids, estimator=est, num_groups=G, backend="triton"
        ),
    }
    shape = f"S={S},n={GROUP}"
    times = measure_impls(
        rows, op=f"group_advantages_{est}", shape=shape, mode="fwd", impls=impls, reps=reps,
        baseline="loop",
    )  # fmt: skip
    print(f"{est:5s} {shape:12s} {summary(times)}")


def main(argv=None):
    args, device, quick = bench_args(__doc__, argv)
    rows: list[dict] = []
    for S in [64, 512] if quick else [64, 512, 8192]:
        for est in ("grpo", "rloo"):
            bench_one(S, est, device, args.reps, rows)
    finish("group_advantages", rows)


if __name__ == "__main__":
    main()
