"""User-facing output: the one line an entry point, a tool or the demo prints (a results
table, a progress line, a one-line user error), and durations as people read them.
On the ground floor with nova_engine.logging (stdlib only), so every floor may print through
it without importing the training metrics (nova_engine.train.metrics uses it too)."""

from __future__ import annotations

import math
import sys

from nova_engine.logging import is_rank0


def emit(text: str, *, err: bool = False) -> None:
    """User-facing output of the entry points and the demo (a results table, a one-line user
    error): stdout on rank 0, or stderr (every rank) for errors."""
    stream = sys.stderr if err else sys.stdout
    if err or is_rank0():
        stream.write(text + "\n")
        stream.flush()


def format_duration(seconds: float) -> str:
    """3725 -> "1h02m", 125 -> "2m05s", 7 -> "7s"."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
