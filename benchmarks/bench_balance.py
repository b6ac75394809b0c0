"""DP balancing: the heaviest DP rank's tokens / the mean, round-robin dealing vs
`nova_engine.data.balance.balanced_split`, on the README's length mix (log-normal, median 600,
sigma 1.0, clipped to [1, 4096]; global batch 128 sequences, or 64 pairs of two such lengths)
over many steps, at DP 2 / 4 / 8; and the split's wall time (CPU).

    python -m benchmarks.bench_balance            # 500 steps
    python -m benchmarks.bench_balance --quick    # 100 steps

Rows (benchmarks/results/balance_cpu.csv): metric max_over_mean with p50 = the mean over
steps and p20 / p80 the quantiles over steps; metric seconds for the split (the split is a
pure function, timed interleaved with round-robin).
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks._common import results_dir, time_interleaved, write_rows
from benchmarks.bench_packing import lognormal_lengths
from nova_engine.data.balance import balanced_split, max_over_mean, round_robin_split

GLOBAL_BATCH = 128


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100 steps")
    args = ap.parse_args(argv)
    steps = 100 if args.quick else 500
    lengths = lognormal_lengths(steps * GLOBAL_BATCH, seed=0).reshape(steps, GLOBAL_BATCH)
    pairs = lengths.reshape(steps, GLOBAL_BATCH // 2, 2).sum(-1)  # a pair is one item
    rows = []
    print(f"{'items':<10}{'dp':>4}{'round-robin':>14}{'balanced':>12}{'worst':>9}")
    for unit, costs_all in (("sequences", lengths), ("pairs", pairs)):
        n = costs_all.shape[1]
        for dp in (2, 4, 8):
            res = {"round_robin": [], "balanced": []}
            for step, costs in enumerate(costs_all):
                res["round_robin"].append(max_over_mean(costs, round_robin_split(n, dp)))
                shares = balanced_split(costs, dp, seed=0, step=step)
                res["balanced"].append(max_over_mean(costs, shares))
            shape = f"{unit},gbs={GLOBAL_BATCH},dp={dp},steps={steps}"
            for impl, vals in res.items():
                v = np.asarray(vals)
                rows.append(
                    dict(
                        op="dp_balance",
                        impl=impl,
                        shape=shape,
                        mode="plan",
                        metric="max_over_mean",
                        p50=float(v.mean()),
                        p20=float(np.quantile(v, 0.2)),
                        p80=float(np.quantile(v, 0.8)),
                        worst=float(v.max()),
                    )
                )
            c = costs_all[0]
            times = time_interleaved(
                {
                    "round_robin": lambda n=n, dp=dp: round_robin_split(n, dp),
                    "balanced": lambda c=c, dp=dp: balanced_split(c, dp, seed=0, step=0),
                },
                warmup=2,
                reps=30,
            )
            for impl, (p50, p20, p80) in times.items():
                rows.append(
                    dict(
                        op="dp_balance",
                        impl=impl,
                        shape=shape,
                        mode="plan",
                        metric="seconds",
                        p50=p50,
                        p20=p20,
                        p80=p80,
                    )
                )
            print(
                f"{unit:<10}{dp:>4}{np.mean(res['round_robin']):>14.4f}"
                f"{np.mean(res['balanced']):>12.4f}{np.max(res['balanced']):>9.4f}"
                f"   split {times['balanced'][0] * 1e3:.2f} ms"
            )
    path = str(results_dir() / "balance_cpu.csv")
    write_rows(path, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
