"""`make demo` over several seeds: each stage's held-out numbers as mean ± standard error.

    python -m benchmarks.demo_seeds --seeds 3 --out /tmp/demo_seeds
    python -m benchmarks.demo_seeds --seeds 3 --out /tmp/demo_seeds --update-results

Runs `python -m nova_engine.demo --out <out>/seed<S> --seed S` for S = 0 .. n-1, one process
per seed, one after the other (--jobs J: J at a time; each demo pins its own torch threads,
nova_engine.demo.THREADS, so a seed's numbers do not depend on J and seed 0 is `make demo`'s
run; a finished seed's results.json is reused with --reuse), and
writes tidy rows (stage, metric, n, mean, se, per-seed values, device, torch, commit) to
<out>/demo_seeds_cpu.csv and a markdown table beside it; with --update-results to
benchmarks/results/demo_seeds_cpu.{csv,md} instead. The standard error is the sample standard
deviation over seeds / sqrt(n). The paired rows (same task, model init and held-out problems
per seed) are DPO - SFT on held-out preference accuracy and margin, and RLVR - DPO on pass@k
and greedy exact match; the run prints whether the exact-match gain exceeds two standard
errors.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLICY_METRICS = ("exact_match", "sampled_acc", "pass_at_k", "pref_acc", "pref_margin")
UNITS = {"seconds": "s", "pref_margin": "nats/token"}  # every other metric: a fraction, in %
STAGES = ("initial", "after SFT", "after DPO", "after RLVR")


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample standard deviation / sqrt(n); 0 for one value)."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, 0.0
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def collect(results: list[dict]) -> list[dict]:
    """Rows {stage, metric, values (one per seed)} from the demo's results.json per seed."""
    rows = []
    for stage in STAGES:
        for metric in POLICY_METRICS:
            rows.append({"stage": stage, "metric": metric,
                         "values": [float(r[stage][metric]) for r in results]})  # fmt: skip
    rows.append({"stage": "after DPO", "metric": "dpo_reward_acc",
                 "values": [float(r["dpo_reward_accuracy"]) for r in results]})  # fmt: skip
    for name in ("regression", "scaled_bt"):
        rows.append({"stage": f"reward model ({name})", "metric": "pair_acc",
                     "values": [float(r["reward_model"][name]) for r in results]})  # fmt: skip

    def paired(after: str, before: str, metric: str) -> list[float]:
        return [float(r[after][metric]) - float(r[before][metric]) for r in results]

    for metric in ("pref_acc", "pref_margin"):
        rows.append({"stage": "DPO - SFT (paired)", "metric": metric,
                     "values": paired("after DPO", "after SFT", metric)})  # fmt: skip
    for metric in ("pass_at_k", "exact_match"):  # the headline gain last
        rows.append({"stage": "RLVR - DPO (paired)", "metric": metric,
                     "values": paired("after RLVR", "after DPO", metric)})  # fmt: skip
    rows.append({"stage": "demo", "metric": "seconds",
                 "values": [float(r["seconds"]["total"]) for r in results]})  # fmt: skip
    for row in rows:
        row["n"] = len(row["values"])
        row["mean"], row["se"] = mean_se(row["values"])
    return rows


def markdown(rows: list[dict], seeds: list[int], machine: str) -> str:
    head = f"| stage | metric | {' | '.join(f'seed {s}' for s in seeds)} | mean ± SE |"
    lines = [f"`make demo` over seeds {', '.join(map(str, seeds))} on {machine}; SE = sample "
             "standard deviation / sqrt(n).", "", head,
             "|" + " --- |" * (3 + len(seeds))]  # fmt: skip
    fmt = {"s": lambda v: f"{v:.0f}", "nats/token": lambda v: f"{v:.3f}"}
    for r in rows:
        unit = UNITS.get(r["metric"], "%")
        f = fmt.get(unit, lambda v: f"{100 * v:.1f}")
        vals = " | ".join(f(v) for v in r["values"])
        lines.append(f"| {r['stage']} | {r['metric']} ({unit}) | {vals} | "
                     f"{f(r['mean'])} ± {f(r['se'])} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def run_seeds(out: Path, seeds: list[int], reuse: bool, extra: list[str], jobs: int) -> list[dict]:
    """Each seed's demo in its own process (log: <out>/seed<S>.log), `jobs` at a time."""
    paths = {s: out / f"seed{s}" / "results.json" for s in seeds}
    todo = [s for s in seeds if not (reuse and paths[s].exists())]
    env = dict(os.environ)  # the demo sets its thread count itself (demo.THREADS)
    running: list[tuple[int, subprocess.Popen]] = []
    out.mkdir(parents=True, exist_ok=True)
    while todo or running:
        while todo and len(running) < jobs:
            s = todo.pop(0)
            cmd = [sys.executable, "-m", "nova_engine.demo", "--out", str(paths[s].parent),
                   "--seed", str(s), *extra]  # fmt: skip
            sys.stderr.write(f"== {' '.join(cmd[1:])}\n")
            log = (out / f"seed{s}.log").open("w")
            running.append((s, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log)))
        s, proc = running.pop(0)
        if proc.wait() != 0:
            raise SystemExit(f"seed {s} failed (exit {proc.returncode}): see {out}/seed{s}.log")
    results = []
    for s in seeds:
        with paths[s].open() as f:
            results.append(json.load(f))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo_seeds", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--seeds", type=int, default=3, help="run seeds 0 .. N-1")
    p.add_argument("--out", default="/tmp/demo_seeds", help="the demo runs go under here")
    p.add_argument("--reuse", action="store_true", help="keep a seed's finished results.json")
    p.add_argument("--jobs", type=int, default=1, help="seeds run at the same time")
    p.add_argument("--update-results", action="store_true",
                   help="write benchmarks/results/demo_seeds_cpu.{csv,md}")  # fmt: skip
    p.add_argument("--machine", default=f"{os.cpu_count()}-core CPU",
                   help="what the table says it was measured on")  # fmt: skip
    p.add_argument("demo_args", nargs="*", help="passed to nova_engine.demo (after --)")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        p.error(f"--seeds {args.seeds} / --jobs {args.jobs}: expected >= 1")
    out = Path(args.out).resolve()
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    results = run_seeds(out, seeds, args.reuse, args.demo_args, args.jobs)
    rows = collect(results)
    from benchmarks._common import env_info

    env = env_info()
    dest = ROOT / "benchmarks" / "results" if args.update_results else out
    dest.mkdir(parents=True, exist_ok=True)
    csv_path = dest / "demo_seeds_cpu.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["stage", "metric", "n", "mean", "se", "per_seed", "machine", "device",
                    "torch", "commit"])  # fmt: skip
        for r in rows:
            w.writerow([r["stage"], r["metric"], r["n"], f"{r['mean']:.6g}", f"{r['se']:.6g}",
                        ";".join(f"{v:.6g}" for v in r["values"]), args.machine,
                        env["device"], env["torch"], env["commit"]])  # fmt: skip
    md = markdown(rows, seeds, args.machine)
    (dest / "demo_seeds_cpu.md").write_text(md)
    gain = next(r for r in rows if r["stage"].startswith("RLVR - DPO") and
                r["metric"] == "exact_match")  # fmt: skip
    verdict = "exceeds" if gain["mean"] > 2 * gain["se"] else "does NOT exceed"
    sys.stdout.write(md + f"\nRLVR - DPO greedy exact match: {100 * gain['mean']:+.1f} ± "
                     f"{100 * gain['se']:.1f} points (paired over {gain['n']} seeds): "
                     f"{verdict} two standard errors. Rows: {csv_path} "
                     f"({time.perf_counter() - t0:.0f} s)\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
