"""Group advantages (GRPO, RLOO): verl's loop over a dict of groups, the vectorized PyTorch
path (index_add / scatter_reduce), Triton (argsort once, one program per group).

    python -m benchmarks.bench_group_advantages            # GPU: S in {64, 512, 8192} samples
    python -m benchmarks.bench_group_advantages --quick    # CPU: small shapes

Groups of n = 8 samples per prompt, ids shuffled (the general, non-contiguous layout).
Rows (benchmarks/results/group_advantages_<cuda|cpu>.csv): seconds, peak extra memory,
speedup_vs_loop.

Then the whole GRPO outcome step on token rewards [B, T] (scores = row sums, group
statistics, the broadcast over the 0/1 response mask): verl-style vectorized torch (index_add
statistics, `scores.unsqueeze(-1) * response_mask`) vs Nova's `compute_advantages("grpo")`
(one-pass broadcast), op grpo_outcome_BT, bool and float masks, timed interleaved. Without CUDA there
are no Triton rows: the interpreter's timings are no performance figures.
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
from nova_engine.rl.advantages import compute_advantages  # noqa: E402
from nova_kernels.ops.group_advantages import (  # noqa: E402
    group_advantages,
    group_advantages_reference,
)

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
    if not on_gpu:  # the interpreter is no timing
        impls.pop(triton_name)
    shape = f"S={S},n={GROUP}"
    times = measure_impls(
        rows, op=f"group_advantages_{est}", shape=shape, mode="fwd", impls=impls, reps=reps,
        baseline="loop",
    )  # fmt: skip
    print(f"{est:5s} {shape:12s} {summary(times)}")


def verl_grpo_vectorized(token_rewards, response_mask, ids, G, eps=1e-6):
    """verl's GRPO outcome advantage with the per-group loop replaced by index_add."""
    scores = token_rewards.sum(-1)
    n = torch.zeros(G, device=scores.device).index_add_(0, ids, torch.ones_like(scores))
    mean = torch.zeros(G, device=scores.device).index_add_(0, ids, scores) / n
    var = torch.zeros(G, device=scores.device).index_add_(0, ids, (scores - mean[ids]) ** 2)
    std = torch.sqrt(var / (n - 1).clamp_min(1))
    scores = (scores - mean[ids]) / (std[ids] + eps)
    return scores.unsqueeze(-1) * response_mask


def bench_outcome_BT(B, T, device, reps, rows):
    """GRPO on [B, T] token rewards: verl-style vectorized vs compute_advantages."""
    g = torch.Generator().manual_seed(B + T)
    ids = torch.arange(B // GROUP).repeat_interleave(GROUP)[torch.randperm(B, generator=g)]
    ids = ids.to(device)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), lengths - 1] = torch.randint(0, 2, (B,), generator=g) * 10.0
    rewards = rewards.to(device)
    for mask_dtype in (torch.bool, torch.float32):
        m = mask.to(mask_dtype)
        impls = {
            "verl_vectorized": lambda m=m: verl_grpo_vectorized(rewards, m, ids, B // GROUP),
            "nova": lambda m=m: (
                compute_advantages("grpo", token_rewards=rewards, mask=m, group_ids=ids).advantages
            ),
        }
        a, b = (fn() for fn in impls.values())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        shape = f"B={B},T={T},mask={str(mask_dtype).removeprefix('torch.')}"
        times = measure_impls(
            rows, op="grpo_outcome_BT", shape=shape, mode="fwd", impls=impls, reps=reps,
            baseline="verl_vectorized",
        )  # fmt: skip
        print(f"grpo [B,T] {shape:28s} {summary(times)}")


def main(argv=None):
    args, device, quick = bench_args(__doc__, argv)
    rows: list[dict] = []
    for S in [64, 512] if quick else [64, 512, 8192]:
        for est in ("grpo", "rloo"):
            bench_one(S, est, device, args.reps, rows)
    for B, T in CPU_BT_SHAPES + [(512, 4096)] if quick else GPU_BT_SHAPES:
        bench_outcome_BT(B, T, device, args.reps, rows)
    finish("group_advantages", rows)


if __name__ == "__main__":
    main()
