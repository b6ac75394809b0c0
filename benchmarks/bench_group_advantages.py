"""Group advantages (GRPO, RLOO) of an RLVR step's responses on one DP rank: verl's loop over a
dict of groups (impl loop), verl's formula vectorized with index_add (impl verl_vectorized,
one process: no DP statistics), and the production call `nova_kernels.group_advantages(...,
num_groups=, reduce=)` on its torch path and (GPU) its Triton path.

    python -m benchmarks.bench_group_advantages            # GPU: R in {512, 2048, 8192}
    python -m benchmarks.bench_group_advantages --quick    # CPU: the same R (torch path)

Layout as the trainer has it: R responses on the rank, n = 8 per prompt, global group ids
in contiguous runs starting at the rank's offset (the rank holds the 2nd quarter of a step
over 4 DP ranks, so num_groups = 4 R / n), 0/1 rewards times 10. The production call passes
the DP all-reduce; here a one-rank `reduce` (a no-op callback: three small tensors).
Rows (benchmarks/results/group_advantages_<cuda|cpu>.csv): seconds and peak extra memory,
timed interleaved (A B A B), speedup_vs_verl_vectorized. Without CUDA there are no Triton
rows: the interpreter's timings are no performance figures.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks._common import bench_args, finish, measure_impls, summary  # noqa: E402
from nova_kernels import group_advantages  # noqa: E402
from nova_kernels.reference import group_advantages_reference  # noqa: E402

GROUP, DP, RESPONSES = 8, 4, (512, 2048, 8192)


def verl_vectorized(scores, ids, G, estimator, eps=1e-6):
    """verl's compute_{grpo,rloo}_outcome_advantage with the per-group loop replaced by
    index_add (groups of one: mean 0, std 1; rloo scale n / (n - 1))."""
    n = torch.zeros(G, device=scores.device).index_add_(0, ids, torch.ones_like(scores))
    mean = torch.zeros(G, device=scores.device).index_add_(0, ids, scores) / n.clamp_min(1)
    single = (n <= 1)[ids]
    shifted = scores - torch.where(single, 0.0, mean[ids])
    if estimator == "rloo":
        return shifted * torch.where(single, 1.0, (n / (n - 1).clamp_min(1))[ids])
    ss = torch.zeros(G, device=scores.device).index_add_(0, ids, (scores - mean[ids]) ** 2)
    std = torch.sqrt(ss / (n - 1).clamp_min(1))
    return shifted / (torch.where(single, 1.0, std[ids]) + eps)


def _one_rank(t: torch.Tensor, op: str) -> None:
    """The all-reduce of a world of one: nothing to add."""


def bench_one(R, est, device, reps, rows):
    on_gpu = device.type == "cuda"
    g = torch.Generator().manual_seed(R)
    G = DP * R // GROUP
    offset = R // GROUP  # this rank's first prompt of the step
    ids = (offset + torch.arange(R) // GROUP).to(device)
    scores = (torch.randint(0, 2, (R,), generator=g).float() * 10).to(device)
    kw = dict(num_groups=G, estimator=est, reduce=_one_rank)
    impls = {
        "verl_vectorized": lambda: verl_vectorized(scores, ids, G, est),  # the baseline: first
        "loop": lambda: group_advantages_reference(scores, ids, est),
        "torch": lambda: group_advantages(scores, ids, backend="torch", **kw),
    }
    if on_gpu:  # the interpreter is no timing
        impls["triton"] = lambda: group_advantages(scores, ids, backend="triton", **kw)
    ref = impls["verl_vectorized"]()
    for name in ("torch", "triton"):
        if name in impls:
            torch.testing.assert_close(impls[name]()[0], ref, rtol=1e-5, atol=1e-5, msg=name)
    shape = f"R={R},n={GROUP},G={G}"
    times = measure_impls(
        rows, op=f"group_advantages_{est}", shape=shape, mode="fwd", impls=impls, reps=reps,
        baseline="verl_vectorized",
    )  # fmt: skip
    print(f"{est:5s} {shape:20s} {summary(times)}")


def main(argv=None):
    args, device, _ = bench_args(__doc__, argv)
    rows: list[dict] = []
    for R in RESPONSES:
        for est in ("grpo", "rloo"):
            bench_one(R, est, device, args.reps, rows)
    finish("group_advantages", rows)


if __name__ == "__main__":
    main()
