"""Metrics: the MFU formula by hand, the progress line text, metrics.jsonl contents and resume
truncation, TensorBoard scalars read back, nothing written off rank 0."""

import io
import json
import os

import pytest
import torch

from nova_engine.train.metrics import (
    MetricsLogger,
    effective_seq_len,
    flops_per_token,
    format_duration,
    mfu,
    peak_flops_for,
    read_metrics,
)


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_mfu_by_hand():
    # 6 * 1e9 + 12 * 10 * 100 * 50 = 6.0006e9 FLOP/token; x 1000 tok/s / 1e13
    assert flops_per_token(10**9, 10, 100, 50) == 6.0006e9
    assert mfu(1000, 10**9, 10, 100, 50, 1e13) == pytest.approx(0.60006)
    # Llama-3-8B-like: N=7.5e9 (no input embedding), L=32, H=4096, S=4096
    f = flops_per_token(7.5e9, 32, 4096, 4096)
    assert f == pytest.approx(6 * 7.5e9 + 12 * 32 * 4096 * 4096)
    assert mfu(8000, 7.5e9, 32, 4096, 4096, 989e12) == pytest.approx(8000 * f / 989e12)
    assert effective_seq_len([2, 4]) == pytest.approx(20 / 6)
    assert effective_seq_len([]) == 0.0
    with pytest.raises(ValueError):
        mfu(1, 1, 1, 1, 1, 0)


def test_peak_flops_lookup():
    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for("NVIDIA H200") == 989e12
    assert peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for("Some CPU") is None


def test_format_duration():
    assert [format_duration(s) for s in (7, 125, 3725, float("nan"))] == [
        "7s",
        "2m05s",
        "1h02m",
        "?",
    ]


def test_progress_jsonl_and_tensorboard(tmp_path):
    clock, out = FakeClock(), io.StringIO()
    with MetricsLogger(
        tmp_path, total_steps=10, stage="sft", stream=out, enabled=True, clock=clock
    ) as m:
        clock.t += 2.0
        rec = m.log(
            1,
            {"loss": torch.tensor(2.5), "lr": 5e-6, "grad_norm": 1.25},
            tokens=4000,
            flops_per_token=1e9,
            peak_flops=1e13,
        )
        clock.t += 4.0
        m.log(3, {"loss": 2.0, "lr": 4e-6, "grad_norm": 0.5}, tokens=6000)
        m.log(3, {"loss": 1.75, "exact_match": 0.25}, prefix="eval/")
    # step 1: 2 s for 1 step, 4000 tokens -> 2000 tok/s, mfu 2000 * 1e9 / 1e13 = 0.2
    assert (
        rec["step_time"] == 2.0
        and rec["tokens_per_s"] == 2000.0
        and rec["mfu"] == pytest.approx(0.2)
    )
    lines = out.getvalue().splitlines()
    assert (
        lines[0]
        == "[sft] step 1/10 (10.0%) | loss 2.5000 | lr 5.00e-06 | grad_norm 1.25 | tok/s 2.0k | mfu 20.0% | eta 18s"
    )
    # step 3: 4 s for 2 steps, 6000 tokens -> 1500 tok/s; eta = 6 s / 3 steps * 7 left = 14 s
    assert (
        lines[1]
        == "[sft] step 3/10 (30.0%) | loss 2.0000 | lr 4.00e-06 | grad_norm 0.5 | tok/s 1.5k | eta 14s"
    )
    assert lines[2] == "[sft eval] step 3/10 (30.0%) | loss 1.7500 | exact_match 0.25"
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 3, 3]
    assert (
        recs[1]["step_time"] == 2.0 and recs[1]["tokens_per_s"] == 1500.0 and "mfu" not in recs[1]
    )
    assert recs[2] == {"step": 3, "eval/loss": 1.75, "eval/exact_match": 0.25, "elapsed": 6.0}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/loss", "eval/exact_match"} <= tags
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.5), (3, 2.0)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/exact_match")] == [(3, 0.25)]


def test_resume_truncates_later_entries(tmp_path):
    with MetricsLogger(
        tmp_path, total_steps=10, stream=io.StringIO(), enabled=True, tensorboard=False
    ) as m:
        for s in range(1, 6):
            m.log(s, {"loss": float(s)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss"')  # torn line from a crash
    clock, out = FakeClock(), io.StringIO()
    with MetricsLogger(
        tmp_path,
        total_steps=10,
        stream=out,
        enabled=True,
        tensorboard=False,
        start_step=3,
        clock=clock,
    ) as m:
        clock.t += 3.0
        m.log(4, {"loss": 40.0})
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in recs] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert recs[-1]["step_time"] == 3.0  # timed from the resume point, not from step 0
    assert out.getvalue().strip().endswith("eta 18s")  # 3 s per step x 6 steps left


def test_off_rank0_writes_nothing(tmp_path):
    out = io.StringIO()
    with MetricsLogger(tmp_path / "r1", total_steps=5, stream=out, enabled=False) as m:
        rec = m.log(1, {"loss": 1.0}, tokens=10)
    assert rec["loss"] == 1.0 and out.getvalue() == "" and not os.path.exists(tmp_path / "r1")


def test_progress_through_logger(tmp_path, caplog):
    import logging

    lg = logging.getLogger("nova_engine")
    lg.addHandler(caplog.handler)
    try:
        with MetricsLogger(
            tmp_path, total_steps=2, stage="dpo", enabled=True, tensorboard=False
        ) as m:
            m.log(1, {"loss": 0.5, "reward_acc": 0.75})
    finally:
        lg.removeHandler(caplog.handler)
    msgs = [r.getMessage() for r in caplog.records]
    assert any(s.startswith("[dpo] step 1/2 (50.0%) | loss 0.5000 | reward_acc 0.75") for s in msgs)
    assert json.loads(open(tmp_path / "metrics.jsonl").readline())["reward_acc"] == 0.75
