"""Run every kernel benchmark (`make bench`): full shapes on a GPU, `--quick` on CPU.

Each `benchmarks/bench_<op>.py` runs in its own process (so the Triton interpreter setting
and CUDA state of one cannot leak into the next) and writes its rows to
`<results dir>/<op>_<device>.csv`: $NOVA_BENCH_OUT or /tmp/nova-bench, or the committed
benchmarks/results/ with `--update-results`. Extra arguments are passed to every benchmark.

    python -m benchmarks.run_all                      # rows under /tmp/nova-bench
    python -m benchmarks.run_all --update-results     # update benchmarks/results/*.csv
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks._common import UPDATE_ENV, UPDATE_FLAG, results_dir

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    if UPDATE_FLAG in extra:  # (the import of _common took it out of sys.argv already)
        extra.remove(UPDATE_FLAG)
        os.environ[UPDATE_ENV] = "1"  # the benches inherit it
    if not torch.cuda.is_available() and "--quick" not in extra:
        extra.append("--quick")
    failed = []
    for path in sorted(HERE.glob("bench_*.py")):
        cmd = [sys.executable, "-m", f"benchmarks.{path.stem}", *extra]
        sys.stderr.write(f"== {' '.join(cmd[2:])}\n")
        if subprocess.call(cmd, cwd=HERE.parent) != 0:
            failed.append(path.stem)
    sys.stderr.write(f"rows written under {results_dir()}\n")
    if failed:
        sys.stderr.write(f"failed: {', '.join(failed)}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
