"""AOT compile report: registers, spills, shared memory and warps of every Triton kernel x launch
config x input dtype x target (sm_90, sm_80), compiled by Triton's own compiler without a GPU
(nova_kernels._aot, the module tests/kernels/test_aot_compile.py checks with).

    python -m benchmarks.aot_compile [--fast] [--jobs 2] [--out benchmarks/results/aot_compile.csv]

One tidy row per compile: kernel, variant (flag constexprs), config (tiles / warps / stages),
dtype, target, num_warps, num_stages, registers (per thread), n_spills (Triton's: local
memory bytes / 4), spill_bytes, shared_bytes, smem_limit (the target's per-block opt-in
maximum), ok, error, and the triton version and git commit. No timings: these figures come
from ptxas for the target, whatever machine runs the script.
"""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

from benchmarks._common import env_info
from nova_kernels import _aot

COLUMNS = (
    "kernel",
    "variant",
    "config",
    "dtype",
    "target",
    "num_warps",
    "num_stages",
    "registers",
    "n_spills",
    "spill_bytes",
    "shared_bytes",
    "smem_limit",
    "ok",
    "error",
    "triton",
    "commit",
)
OUT = Path(__file__).resolve().parent / "results" / "aot_compile.csv"
log = logging.getLogger(__name__)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast", action="store_true", help="the fast subset of the test only")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compiles (default <= 4)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    env = env_info()
    rows = _aot.run_matrix(fast=args.fast, jobs=args.jobs)
    rows.sort(key=lambda r: (r["kernel"], r["variant"], r["dtype"], r["config"], r["target"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, restval="", extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "triton": env["triton"], "commit": env["commit"]})
    bad = [r for r in rows if not r["ok"]]
    log.info("%d compiles, %d failing, written to %s", len(rows), len(bad), args.out)
    for r in bad:
        log.info(
            "FAIL %s [%s; %s] %s %s: %s",
            r["kernel"],
            r["config"],
            r["variant"],
            r["dtype"],
            r["target"],
            r["error"],
        )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
