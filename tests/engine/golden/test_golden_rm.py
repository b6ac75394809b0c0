"""rm.json (run_golden.py --stages rm): its settings are run_golden.RM's, and a fresh
single-process CPU run of Scaled BT and regression repeats its per-step losses within
2e-5 (the tolerance the SFT/DPO goldens are held to)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _run_golden():
    spec = importlib.util.spec_from_file_location("run_golden", os.path.join(HERE, "run_golden.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rm_golden_settings_and_shape():
    rg = _run_golden()
    with open(os.path.join(HERE, "rm.json")) as f:
        gold = json.load(f)
    assert gold["config"] == rg.RM, "regenerate with run_golden.py --write --stages rm"
    for loss_type in rg.RM["losses"]:
        rows = np.array(gold[f"{loss_type}_steps{rg.RM['runs'][0]}"])
        assert rows.shape == (rg.RM["runs"][0], 2) and np.isfinite(rows).all()
        assert rows[-3:, 0].mean() < rows[:3, 0].mean()  # the recorded runs learn


@pytest.mark.slow  # a subprocess with its own (world 1) process group
def test_rm_golden_repeats_on_cpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "run_golden.py"), "--check", "--stages", "rm"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("rm ")]
    assert len(lines) == 20, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.returncode == 0 and "golden check: passed" in proc.stdout, proc.stdout[-2000:]
