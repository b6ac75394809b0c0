"""benchmarks/bench_vs_peers.py's DPO part, run as a user runs it (a subprocess, tiny shapes):

- Nova's DPO step and the plain HF loop both start at log 2 (policy = reference) and the
  bench's own checks (step-1 losses within 1e-4, reference log-prob sums equal) pass;
- the CSV gets dpo_step rows (tokens/s, step-1 loss, peak memory) and dpo_ref_pass rows for
  each implementation, and rows of other keys already in the file (SFT) are kept;
- with TRL installed (slow): TRL's DPOTrainer step-1 loss equals Nova's, on the same ids.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SFT_ROW = {"op": "sft_step", "impl": "nova", "shape": "8x512 tokens,128h4L", "mode": "step",
           "metric": "real_tokens_per_s", "p50": "10594.4", "p20": "", "p80": "",
           "device": "cpu (earlier run)", "torch": "", "triton": "", "commit": "abc1234"}  # fmt: skip


def _run(tmp_path, *extra, only="dpo"):
    out = tmp_path / "vs_peers.csv"
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(SFT_ROW))
        writer.writeheader()
        writer.writerow(SFT_ROW)
    cmd = [sys.executable, "-m", "benchmarks.bench_vs_peers", "--only", only, "--quick",
           "--steps", "2", "--out", str(out), *extra]  # fmt: skip
    # one thread: tiny steps are all small ops, which a second busy core slows down ~10x
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with out.open(newline="") as f:
        return list(csv.DictReader(f))


def _check(rows, impls):
    assert [r for r in rows if r["op"] == "sft_step"] == [SFT_ROW]  # other keys kept as they were
    dpo = {(r["op"], r["impl"], r["metric"]): r for r in rows if r["op"] != "sft_step"}
    for impl in impls:
        loss = float(dpo[("dpo_step", impl, "step1_loss")]["p50"])
        assert math.isclose(loss, math.log(2.0), rel_tol=1e-4), (impl, loss)
        assert float(dpo[("dpo_step", impl, "real_tokens_per_s")]["p50"]) > 0
        assert float(dpo[("dpo_step", impl, "peak_mem_bytes")]["p50"]) > 0
        assert float(dpo[("dpo_ref_pass", impl, "seconds")]["p50"]) > 0
    assert {k[1] for k in dpo} == set(impls)
    assert len({r["shape"] for r in rows if r["op"] == "dpo_step"}) == 1


def test_dpo_nova_and_plain_loop(tmp_path):
    _check(_run(tmp_path, "--no-trl", "--no-fused"), ["hf_loop", "nova"])


@pytest.mark.slow  # TRL's trainer setup and the fused variant's compile: ~30-60 s on 2 cores
def test_dpo_trl_step1_equals_nova(tmp_path):
    pytest.importorskip("trl")
    _check(_run(tmp_path), ["hf_loop", "nova", "nova_fused", "trl"])


def test_sft_equal_and_ragged_lengths(tmp_path):
    """SFT quick shapes, equal and ragged lengths (the plain loop pads the ragged ones): the
    bench itself fails unless every step-1 loss equals the plain loop's; rows per shape."""
    rows = _run(tmp_path, "--no-trl", "--no-fused", only="sft")
    sft = [r for r in rows if r["op"] == "sft_step" and r != SFT_ROW]
    shapes = {r["shape"] for r in sft}
    assert len(shapes) == 2 and any("real" in sh for sh in shapes), shapes
    for sh in shapes:
        got = {(r["impl"], r["metric"]): float(r["p50"]) for r in sft if r["shape"] == sh}
        assert math.isclose(got[("nova", "step1_loss")], got[("hf_loop", "step1_loss")],
                            rel_tol=1e-4)  # fmt: skip
        assert got[("nova", "real_tokens_per_s")] > 0 and got[("hf_loop", "peak_mem_bytes")] > 0
