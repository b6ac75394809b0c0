"""Asynchronous vs colocated RLVR (issue #27) on the demo's RLVR task, same 2 ranks.

    make demo                                        # once: demo_out/dpo/hf, the task data
    python -m benchmarks.bench_async_rlvr            # 3 seeds x 2 modes, interleaved
    python -m benchmarks.bench_async_rlvr --steps 10 --seeds 0   # a quick look

Each run is the demo's RLVR stage (recipes/tiny_cpu.yaml, section rlvr: GRPO from the DPO
model, 16 prompts x 8 samples per step) launched with torchrun on 2 gloo ranks, through
`python -m nova_engine.train rlvr`:
- colocated: both ranks generate and train (DP2);
- async: rank 0 trains, rank 1 generates (rlvr.mode=async, max_staleness 1 by default);
with the same prompts, seeds and samples per step, in the order C A C A ... (seed by
seed). Per run: the training loop's wall time (metrics.jsonl `elapsed`), the tokens it
trained (prompt + response tokens of the step's samples: Σ tokens_per_s x step_time), the
reward curve, and in async mode the weight-sync seconds and bytes per step.

Rows (benchmarks/results/async_rlvr_<device>.csv): per mode, over seeds, p50/p20/p80 of
trained tokens/s, loop seconds, final reward (mean of the last 5 steps), time waiting for
rollouts (async) or generating (colocated); per seed the speedup (async tokens/s over
colocated tokens/s) and its mean ± standard error; weight sync seconds per step and its
ratio to a plain gloo broadcast of the same bytes between the same 2 processes (the floor,
measured interleaved in one spawned group). Plot: reward vs loop wall time, both modes, every
seed (benchmarks/results/async_rlvr_<device>.png). Table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks._common import results_path, write_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(mode: str, seed: int, steps: int, demo: str, out: str, staleness: int) -> dict:
    j = os.path.join
    data = j(demo, "data", "rlvr_train.jsonl")
    for need in (j(demo, "dpo", "hf", "config.json"), data):
        if not os.path.exists(need):
            raise SystemExit(f"{need} is missing: run `make demo` first (or pass --demo-out)")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "nova_engine.train", "rlvr", "--recipe", j(ROOT, "recipes", "tiny_cpu.yaml"),
        f"model.hf_path={j(demo, 'dpo', 'hf')}", f"model.tokenizer_path={j(demo, 'tokenizer')}",
        f"data.train_paths=[{data}]", f"train.out_dir={out}", f"train.max_steps={steps}",
        f"train.seed={seed}", f"rollout.seed={seed}", "train.log_every=1", "train.save_every=0",
        "train.tensorboard=false", "checkpoint.resume=none", "checkpoint.export_hf=false",
    ]  # fmt: skip
    if mode == "async":
        cmd += ["rlvr.mode=async", f"rlvr.max_staleness={staleness}"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{mode} seed {seed} failed:\n{(p.stdout + p.stderr)[-3000:]}")
    recs = [json.loads(x) for x in open(j(out, "metrics.jsonl"))]
    recs = [r for r in recs if "policy_loss" in r]
    return {"records": recs, "process_s": wall}


def _summary(recs: list[dict]) -> dict[str, float]:
    tokens = sum(r["tokens_per_s"] * r["step_time"] for r in recs)
    loop_s = recs[-1]["elapsed"]
    out = {
        "tokens": tokens,
        "loop_s": loop_s,
        "tokens_per_s": tokens / loop_s,
        "final_reward": float(np.mean([r["reward_mean"] for r in recs[-5:]])),
        "wait_s": float(
            sum(r.get("time/wait_rollouts", r.get("time/generate", 0.0)) for r in recs)
        ),
    }
    sync = [r["weight_sync_s"] for r in recs if "weight_sync_s" in r]
    if sync:
        out["weight_sync_s"] = float(np.median(sync))
        out["weight_sync_gb"] = float(recs[-1].get("weight_sync_gb") or
                                      max(r.get("weight_sync_gb", 0.0) for r in recs))  # fmt: skip
    return out


def _floor_worker(rank: int, world: int, nbytes: int, reps: int) -> dict:
    import torch
    import torch.distributed as dist

    buf = torch.empty(nbytes, dtype=torch.uint8)
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        dist.broadcast(buf, src=0)
        times.append(time.perf_counter() - t0)
    return {"p50": float(np.median(times))} if rank == 1 else {}


def _floor(gb: float, reps: int = 10) -> float:
    from nova_engine.parallel.spawn import run_distributed

    out = run_distributed(_floor_worker, 2, int(gb * 1e9), reps)
    return next(o["p50"] for o in out if o)


def _pct(x: list[float]) -> dict[str, float]:
    return {"p50": float(np.median(x)), "p20": float(np.percentile(x, 20)),
            "p80": float(np.percentile(x, 80))}  # fmt: skip


def _plot(runs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {"colocated": "tab:blue", "async": "tab:orange"}
    for (mode, seed), res in sorted(runs.items()):
        recs = res["records"]
        t = [r["elapsed"] for r in recs][2:]  # the 3-step window ending at each step
        rew = np.convolve([r["reward_mean"] for r in recs], np.ones(3) / 3, mode="valid")
        ax.plot(t, rew, color=colors[mode], alpha=0.8,
                label=mode if seed == min(s for m, s in runs if m == mode) else None)  # fmt: skip
    ax.set_xlabel("training loop wall time (s)")
    ax.set_ylabel("mean reward (3-step moving average)")
    ax.set_title("RLVR on the demo task, 2 CPU ranks: async (1 gen + 1 train) vs colocated")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo-out", default=os.path.join(ROOT, "demo_out"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--staleness", type=int, default=1)
    a = p.parse_args(argv)
    runs: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:  # interleaved: C A per seed
            for mode in ("colocated", "async"):
                out = os.path.join(tmp, f"{mode}_{seed}")
                runs[(mode, seed)] = _launch(mode, seed, a.steps, a.demo_out, out, a.staleness)
                s = _summary(runs[(mode, seed)]["records"])
                runs[(mode, seed)]["summary"] = s
                print(f"{mode:9s} seed {seed}: {s['tokens_per_s']:8.1f} trained tok/s, loop "
                      f"{s['loop_s']:6.1f} s, final reward {s['final_reward']:.2f}", flush=True)  # fmt: skip
    shape = f"demo RLVR task, {a.steps} steps x 16 prompts x 8 samples, 2 gloo ranks"
    rows = []
    for mode in ("colocated", "async"):
        sums = [runs[(mode, s)]["summary"] for s in a.seeds]
        for metric, key in (("tokens_per_s", "tokens_per_s"), ("seconds", "loop_s"),
                            ("reward", "final_reward")):  # fmt: skip
            rows.append({"op": "async_rlvr", "impl": mode, "shape": shape, "mode": "step",
                         "metric": metric, **_pct([x[key] for x in sums]),
                         "seeds": len(a.seeds)})  # fmt: skip
    speed = [runs[("async", s)]["summary"]["tokens_per_s"] /
             runs[("colocated", s)]["summary"]["tokens_per_s"] for s in a.seeds]  # fmt: skip
    se = float(np.std(speed, ddof=1) / np.sqrt(len(speed))) if len(speed) > 1 else 0.0
    rows.append({"op": "async_rlvr", "impl": "async/colocated", "shape": shape, "mode": "step",
                 "metric": "speedup", "p50": float(np.mean(speed)), "p20": "", "p80": "",
                 "se": se, "per_seed": " ".join(f"{x:.3f}" for x in speed)})  # fmt: skip
    gb = [runs[("async", s)]["summary"].get("weight_sync_gb", 0.0) for s in a.seeds]
    ws = [runs[("async", s)]["summary"].get("weight_sync_s") for s in a.seeds]
    if gb[0] and all(w is not None for w in ws):
        floor = _floor(gb[0])
        rows.append({"op": "async_rlvr", "impl": "weight_sync", "shape": shape, "mode": "sync",
                     "metric": "seconds", **_pct([float(w) for w in ws]),
                     "gb": gb[0], "floor_s": floor,
                     "ratio_to_floor": float(np.median(ws)) / floor})  # fmt: skip
    path = results_path("async_rlvr")
    write_rows(path, rows)
    curves = {f"{m}_{s}": [{k: r.get(k) for k in ("step", "elapsed", "reward_mean", "step_time",
                                                  "tokens_per_s", "weight_sync_s")}
                           for r in res["records"]] for (m, s), res in runs.items()}  # fmt: skip
    with open(path.replace(".csv", "_curves.json"), "w") as fh:
        json.dump(curves, fh)
    _plot(runs, path.replace(".csv", ".png"))
    rew = {
        m: [runs[(m, s)]["summary"]["final_reward"] for s in a.seeds]
        for m in ("colocated", "async")
    }
    print(f"\n{'mode':10s} {'trained tok/s':>14s} {'loop s':>8s} {'final reward':>14s}")
    for m in ("colocated", "async"):
        t = [runs[(m, s)]["summary"]["tokens_per_s"] for s in a.seeds]
        sec = [runs[(m, s)]["summary"]["loop_s"] for s in a.seeds]
        sd = np.std(rew[m], ddof=1) / np.sqrt(len(rew[m])) if len(rew[m]) > 1 else 0.0
        print(f"{m:10s} {np.mean(t):14.1f} {np.mean(sec):8.1f} {np.mean(rew[m]):8.2f} ± {sd:.2f}")
    print(f"speedup async/colocated: {np.mean(speed):.2f} ± {se:.2f} (per seed: "
          f"{', '.join(f'{x:.2f}' for x in speed)})")  # fmt: skip
    if len(rows) and rows[-1]["impl"] == "weight_sync":
        r = rows[-1]
        print(f"weight sync: {r['p50']:.4f} s per sync for {r['gb']:.4f} GB; floor {r['floor_s']:.4f} s "
              f"(ratio {r['ratio_to_floor']:.2f})")  # fmt: skip
    print(f"rows: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
