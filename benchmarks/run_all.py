"""Run every kernel benchmark (`make bench`): full shapes on a GPU, `--quick` on CPU.

Each `benchmarks/bench_<op>.py` runs in its own process (so the Triton interpreter setting
and CUDA state of one cannot leak into the next) and writes its rows to
`benchmarks/results/<op>_<device>.csv`. Extra arguments are passed to every benchmark.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available() and "--quick" not in extra:
        extra.append("--quick")
    failed = []
    for path in sorted(HERE.glob("bench_*.py")):
        cmd = [sys.executable, "-m", f"benchmarks.{path.stem}", *extra]
        sys.stderr.write(f"== {' '.join(cmd[2:])}\n")
        if subprocess.call(cmd, cwd=HERE.parent) != 0:
            failed.append(path.stem)
    if failed:
        sys.stderr.write(f"failed: {', '.join(failed)}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
