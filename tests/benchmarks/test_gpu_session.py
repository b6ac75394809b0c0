"""benchmarks/gpu_session.sh: it parses (`bash -n`), its usage names the one device call, and
`--dry` (no GPU) checks every step's plumbing: the files exist and parse, each --flag a step
passes is defined by its script, the budgets sum to <= 8 minutes. A step given a flag its
script lacks is reported (dry-FAIL, exit 1) while the others still run."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_session.sh")
STEPS = ["pip", "build_ext", "kernel_tests", "golden_sft_dpo", "golden_rm", "golden_rlvr",
         "train_mfu", "lce", "logprobs", "pair_logprobs", "attention"]  # fmt: skip


def test_parses_and_names_the_call():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    head = open(SCRIPT).read().split("set -uo pipefail")[0]
    call = 'run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=560)'
    assert call in head
    assert "bash benchmarks/gpu_session.sh --dry" in head


@pytest.mark.slow  # a subprocess (~10-30 s on a loaded 2-core machine)
def test_dry_run_checks_every_step(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "ARGS_pair_logprobs": "--quick --no-such-flag"}
    proc = subprocess.run(["bash", SCRIPT, "--dry"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    table = (tmp_path / "table.txt").read_text()
    assert proc.stdout.endswith(table), proc.stdout + proc.stderr
    rows = {ln.split()[0]: ln.split()[1] for ln in table.splitlines()[2:-1]}
    assert list(rows) == STEPS, table
    bad = {k: v for k, v in rows.items() if v != "dry-ok"}
    assert bad == {"pair_logprobs": "dry-FAIL"}, table
    assert "no flag --no-such-flag" in table
    budgets = int(re.search(r"budgets (\d+) s", table).group(1))
    assert 300 <= budgets <= 480
    assert proc.returncode == 1 and "1 step(s) not ok (dry run)" in table
