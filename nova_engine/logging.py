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


# Known third-party noise, filtered in the entry points (`python -m nova_engine.train`, `nova`)
# unless `--verbose` / NOVA_VERBOSE=1: megatron-core's notes that the optional accelerators
# are absent (4-6 lines per rank), its deprecation notes, and transformers' "Loading weights"
# progress bars. Nova's own warnings are never filtered.
THIRD_PARTY_WARNINGS = (
    r".*Transformer Engine and Apex are not installed.*",
    r".*Apex is not installed.*",
    r".*Transformer Engine is not installed.*",
    r".*flash.attn.*",
    r".*is deprecated.*",
    r".*will be removed in.*megatron-core.*",
    r".*tp_group is None.*",
    r".*MLP requires ffn_hidden_size.*",
    r".*the core_attn is from transformer_engine.*",  # megatron, for any selective recompute
)


def verbose_requested(argv: list[str] | None = None) -> bool:
    """`--verbose` among `argv` or NOVA_VERBOSE set to anything but "" / "0"."""
    return "--verbose" in (argv or []) or os.environ.get("NOVA_VERBOSE", "") not in ("", "0")


def quiet_third_party(verbose: bool = False) -> None:
    """Filter THIRD_PARTY_WARNINGS and transformers' progress bars for this process (call
    before megatron-core or transformers is imported); with `verbose`, change nothing and
    set NOVA_VERBOSE=1 so that child processes show them too."""
    import warnings

    if verbose:
        os.environ["NOVA_VERBOSE"] = "1"
        return
    for msg in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=msg)
    # read by huggingface_hub and transformers when they are imported
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:  # already imported (e.g. by a test): switch its bars off directly
        import sys

        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - an old transformers: its bars stay
        pass
