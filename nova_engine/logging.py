"""Rank-aware logging: library code logs through `get_logger(__name__)`; by default only
global rank 0 emits INFO and below, every rank emits warnings and errors."""

from __future__ import annotations

import logging
import os

_CONFIGURED = False


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return _global_rank() == 0


def is_rank0() -> bool:
    """True on global rank 0 (or when torch.distributed is not initialized and RANK is unset)."""
    return _global_rank() == 0


def _global_rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:  # pragma: no cover - torch always importable here
        pass
    return int(os.environ.get("RANK", "0"))


def get_logger(name: str) -> logging.Logger:
    global _CONFIGURED
    if not _CONFIGURED:
        root = logging.getLogger("nova_engine")
        if not root.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(
                logging.Formatter("[%(asctime)s %(levelname)s %(name)s] %(message)s", "%H:%M:%S")
            )
            handler.addFilter(_RankZeroFilter())
            root.addHandler(handler)
            root.setLevel(os.environ.get("NOVA_LOG_LEVEL", "INFO"))
            root.propagate = False
        _CONFIGURED = True
    if not name.startswith("nova_engine"):
        name = f"nova_engine.{name}"
    return logging.getLogger(name)
