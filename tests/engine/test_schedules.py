"""LR schedules at known steps, computed by hand, and the scheduler's state round trip."""

import math

import pytest
import torch

from nova_engine.config import OptimConfig
from nova_engine.train.schedules import LRScheduler, lr_at


def test_linear_with_warmup_by_hand():
    kw = dict(lr=1.0, total_steps=10, warmup_steps=2, schedule="linear")
    # warmup 0, 1/2; then (10 - s) / 8
    expected = [0.0, 0.5, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0, 0.0]
    got = [lr_at(s, **kw) for s in range(12)]
    assert got == pytest.approx(expected, abs=1e-15)


def test_linear_min_lr_and_no_warmup():
    got = [lr_at(s, lr=2.0, total_steps=4, schedule="linear", min_lr=0.4) for s in range(5)]
    # 0.4 + 1.6 * (1 - s/4)
    assert got == pytest.approx([2.0, 1.6, 1.2, 0.8, 0.4])


def test_cosine_by_hand():
    kw = dict(lr=1.0, total_steps=6, warmup_steps=2, schedule="cosine", min_lr=0.1)
    # p = (s - 2) / 4: 0, 1/4, 1/2, 3/4, 1 -> 0.1 + 0.9 * (1 + cos(pi p)) / 2
    c = lambda p: 0.1 + 0.9 * (1 + math.cos(math.pi * p)) / 2  # noqa: E731
    assert lr_at(1, **kw) == 0.5
    assert [lr_at(s, **kw) for s in range(2, 7)] == pytest.approx(
        [c(0), c(0.25), c(0.5), c(0.75), c(1)]
    )
    assert lr_at(4, **kw) == pytest.approx(0.55)  # halfway: mean of peak and floor
    assert lr_at(100, **kw) == pytest.approx(0.1)


def test_constant_and_errors():
    assert [
        lr_at(s, lr=3.0, total_steps=5, warmup_steps=3, schedule="constant") for s in range(6)
    ] == [0.0, 1.0, 2.0, 3.0, 3.0, 3.0]
    with pytest.raises(ValueError, match="schedule='exp'"):
        lr_at(0, lr=1.0, total_steps=5, schedule="exp")
    with pytest.raises(ValueError):
        lr_at(-1, lr=1.0, total_steps=5)


def test_hf_parity():
    """min_lr = 0 gives exactly transformers' linear and cosine schedules."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    for make, name in (
        (get_linear_schedule_with_warmup, "linear"),
        (get_cosine_schedule_with_warmup, "cosine"),
    ):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
        hf = make(opt, num_warmup_steps=5, num_training_steps=37)
        for s in range(38):  # HF cosine rises again past the end; ours stays at min_lr
            assert opt.param_groups[0]["lr"] == pytest.approx(
                lr_at(s, lr=3e-4, total_steps=37, warmup_steps=5, schedule=name), abs=1e-18
            )
            opt.step()
            hf.step()


def test_scheduler_object_and_state():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([{"params": [p]}, {"params": [], "lr_mult": 0.5}], lr=123.0)
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, schedule="cosine", warmup_ratio=0.1)
    sched = LRScheduler.from_config(optim, total_steps=50)  # warmup int(5.0) = 5
    assert sched.settings["warmup_steps"] == 5
    assert sched.apply(opt) == 0.0 and opt.param_groups[0]["lr"] == 0.0
    lrs = [sched.step(opt) for _ in range(7)]
    assert lrs[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(7, **sched.settings))
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * opt.param_groups[0]["lr"])
    resumed = LRScheduler.from_config(optim, total_steps=50)
    resumed.load_state_dict(sched.state_dict())
    assert resumed.step_count == 7 and resumed.lr == sched.lr
    assert [resumed.step() for _ in range(3)] == [sched.step() for _ in range(3)]
