"""The collect-and-gather pass the stages share: forward-only over every step of a data
source, per-micro-batch rows computed on the last pipeline stage, gathered on every rank.

    rows = collect_rows(engine, source, fn, width=5)       # DPO's reference log-probs
    rows = collect_rows(engine, source, fn, width=3)       # the RM's held-out pair rewards

`fn(model, hidden, mb)` returns a [n, width] tensor (its first column usually the pair /
sample id, so the caller can key the rows; their order across ranks is not defined). One
all_gather over the world at the end (a host copy of a few numbers per sequence).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch.distributed as dist


def collect_rows(
    engine: Any,
    source: Any,
    fn: Callable,
    *,
    width: int,
    context: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> np.ndarray:
    """[rows, width] float64 of `fn` over every step of `source` (a PackedDataSource:
    `total_steps`, `rank_microbatches(step)`), from every rank; `context` wraps each step's
    forward pass (e.g. engine.adapters_disabled for a LoRA reference)."""
    ps = engine.ps
    mine: list[np.ndarray] = []
    for s in range(source.total_steps):
        with context() if context is not None else contextlib.nullcontext():
            out = engine.forward_collect(source.rank_microbatches(s), fn)
        if ps.tp_rank == 0:  # the last stage's TP rank 0 holds the rows once
            mine += [o.double().cpu().numpy() for o in out]
    local = np.concatenate(mine) if mine else np.zeros((0, width))
    gathered: list = [local]
    if dist.is_initialized() and ps.world_size > 1:
        gathered = [None] * ps.world_size
        dist.all_gather_object(gathered, local, group=ps.layout_group)
    parts = [g for g in gathered if g is not None and len(g)]
    return np.concatenate(parts) if parts else np.zeros((0, width))
