"""Learning-rate schedules: constant, linear decay and cosine decay, each after a linear warmup.

`step` is the number of optimizer steps already taken (0 for the first update), the
convention of Hugging Face's `get_*_schedule_with_warmup` (what open-instruct's Tülu 3 runs
used) and of megatron's scheduler:

    warmup (step < W):       lr(step) = peak * step / W          (the first update has lr 0)
    after warmup, p = (step - W) / (T - W) clamped to [0, 1]:
      constant:              lr = peak
      linear:                lr = min_lr + (peak - min_lr) * (1 - p)
      cosine:                lr = min_lr + (peak - min_lr) * (1 + cos(pi * p)) / 2

with T = total_steps and W = warmup_steps. With min_lr = 0 these equal HF's schedules.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

from nova_engine.logging import get_logger

if TYPE_CHECKING:
    from nova_engine.config import OptimConfig

logger = get_logger(__name__)

SCHEDULES = ("constant", "linear", "cosine")


def lr_at(
    step: int,
    *,
    lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "linear",
    min_lr: float = 0.0,
) -> float:
    """The learning rate for the update after `step` completed steps (formula above)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if step < 0 or total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"step={step}, total_steps={total_steps}, warmup_steps={warmup_steps}")
    if step < warmup_steps:
        return lr * step / warmup_steps
    if schedule == "constant":
        return lr
    span = total_steps - warmup_steps
    p = 1.0 if span <= 0 else min(max((step - warmup_steps) / span, 0.0), 1.0)
    if schedule == "linear":
        factor = 1.0 - p
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * p))
    return min_lr + (lr - min_lr) * factor


class ScheduleSettings(TypedDict):
    """The keyword arguments of `lr_at` besides the step."""

    lr: float
    total_steps: int
    warmup_steps: int
    schedule: str
    min_lr: float


class HasParamGroups(Protocol):
    """An optimizer (torch's or megatron's) whose param groups carry the learning rate."""

    @property
    def param_groups(self) -> list[dict[str, Any]]: ...


class LRScheduler:
    """Holds the step count and sets the optimizer's learning rate.

    Usage in the loop:  sched.apply(opt) before the first step, then after each
    `opt.step()`: `sched.step(opt)`. Param groups with an "lr_mult" key (megatron's
    convention) get lr * lr_mult. The state is {"step": n, ...}; `load_state_dict` restores
    the count and warns if the schedule's settings changed since the checkpoint.
    """

    def __init__(
        self,
        *,
        lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        schedule: str = "linear",
        min_lr: float = 0.0,
    ):
        self.settings = ScheduleSettings(
            lr=float(lr),
            total_steps=int(total_steps),
            warmup_steps=int(warmup_steps),
            schedule=schedule,
            min_lr=float(min_lr),
        )
        lr_at(0, **self.settings)  # validate now
        self.step_count = 0

    @classmethod
    def from_config(cls, optim: OptimConfig, total_steps: int) -> LRScheduler:
        """From a nova_engine.config.OptimConfig and the run's total steps."""
        return cls(
            lr=optim.lr,
            total_steps=total_steps,
            warmup_steps=optim.warmup_for(total_steps),
            schedule=optim.schedule,
            min_lr=optim.min_lr,
        )

    @property
    def lr(self) -> float:
        """The learning rate of the next update."""
        return lr_at(self.step_count, **self.settings)

    def apply(self, optimizer: HasParamGroups) -> float:
        lr = self.lr
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr

    def step(self, optimizer: HasParamGroups | None = None) -> float:
        """Count one completed update; set (and return) the next update's learning rate."""
        self.step_count += 1
        return self.apply(optimizer) if optimizer is not None else self.lr

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count, **self.settings}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        changed = {
            k: (state[k], v) for k, v in self.settings.items() if k in state and state[k] != v
        }
        if changed:
            logger.warning("LR schedule changed since the checkpoint (old, new): %s", changed)
        self.step_count = int(state["step"])
