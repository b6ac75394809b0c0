"""#32: a benchmark run writes its rows outside the repository ($NOVA_BENCH_OUT, default
/tmp/nova-bench) and leaves the committed benchmarks/results/ alone, unless asked with
--update-results (any bench: benchmarks._common takes the flag out of sys.argv)."""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocesses (each imports torch)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMITTED = os.path.join(ROOT, "benchmarks", "results")


def _digest(d: str) -> dict[str, str]:
    return {
        f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
        for f in sorted(os.listdir(d))
    }


def _py(code: str, env: dict, *argv: str) -> list[str]:
    r = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.splitlines()


def test_bench_rows_go_outside_the_repository(tmp_path):
    before = _digest(COMMITTED)
    env = {**os.environ, "NOVA_BENCH_OUT": str(tmp_path / "rows")}
    env.pop("NOVA_BENCH_UPDATE_RESULTS", None)
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_balance", "--quick"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "rows" / "balance_cpu.csv"
    assert f"wrote {out}" in r.stdout, r.stdout
    rows = list(csv.DictReader(open(out)))
    assert rows and {"op", "impl", "p50", "device"} <= set(rows[0])
    assert _digest(COMMITTED) == before  # nothing committed was touched


def test_update_results_flag_and_defaults(tmp_path):
    code = (
        "import sys\n"
        "from benchmarks import _common as c\n"
        "print(c.results_path('op'))\n"
        "print(sys.argv[1:])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOVA_BENCH")}
    default, argv = _py(code, env, "--quick")
    assert default.startswith("/tmp/nova-bench/op_") and argv == "['--quick']"
    got, argv = _py(code, {**env, "NOVA_BENCH_OUT": str(tmp_path)}, "--quick")
    assert got.startswith(str(tmp_path) + "/op_")
    got, argv = _py(code, {**env, "NOVA_BENCH_OUT": str(tmp_path)}, "--quick", "--update-results")
    assert got.startswith(COMMITTED + "/op_") and argv == "['--quick']"  # flag taken out
    got, _ = _py(code, {**env, "NOVA_BENCH_UPDATE_RESULTS": "1"})
    assert got.startswith(COMMITTED + "/op_")
