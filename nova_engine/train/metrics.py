"""The one progress/metrics module: a rank-0 progress line, a JSONL metrics file and
TensorBoard, plus the MFU formula.

    with MetricsLogger(out_dir, total_steps=T, stage="sft") as m:
        for step in range(start, T):
            ...
            m.log(step + 1, {"loss": loss, "lr": lr, "grad_norm": gn}, tokens=n_tokens,
                  flops_per_token=fpt, peak_flops=peak)
            m.log(step + 1, {"loss": eval_loss, "exact_match": em}, prefix="eval/")

Progress lines are plain text (one per logged step, no carriage returns), so they read the
same in a terminal and in a log file:

    [sft] step 12/300 (4.0%) | loss 2.3456 | lr 5.00e-06 | grad_norm 1.234 | tok/s 12.3k | mfu 41.2% | eta 1h02m

Only global rank 0 writes anything. The JSONL file (`<out_dir>/metrics.jsonl`) gets one
object per `log` call, flushed at once; when a resumed run passes `start_step=k`, entries
of the crashed run after step k are dropped first so the file reads as one run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from nova_engine.logging import get_logger, is_rank0

logger = get_logger(__name__)

# Dense bf16 tensor-core peaks (FLOP/s per GPU), from the vendors' data sheets.
PEAK_BF16_FLOPS = {
    "H100 SXM": 989e12,
    "H100": 989e12,
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "A100": 312e12,
}


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: float) -> float:
    """Training FLOPs per token: 6 N + 12 L H S (PaLM, Chowdhery et al. 2022, App. B).

    6 N: forward (2 N) and backward (4 N) of every weight matmul; pass as N the parameters
    that take part in matmuls (all but the input embedding lookup; the LM head counts).
    12 L H S: the attention scores QK^T and the weighted sum AV, 2 matmuls x 2 FLOP x 3
    (fwd + bwd) per layer, each over S positions of width H. S is the attention span per
    token; for packed batches use `effective_seq_len(doc_lengths)`. Counted without the
    causal halving, as PaLM and megatron do. Recompute is not counted (that is MFU, not HFU).
    """
    return 6.0 * n_params + 12.0 * n_layers * hidden * seq_len


def effective_seq_len(lengths: Sequence[int]) -> float:
    """Attention span per token of packed documents: sum(l^2) / sum(l) (each token of a
    document of length l attends over l positions in the non-causal count)."""
    total = sum(lengths)
    return sum(n * n for n in lengths) / total if total else 0.0


def mfu(
    tokens_per_s: float,
    n_params: int,
    n_layers: int,
    hidden: int,
    seq_len: float,
    peak_flops: float,
) -> float:
    """Model FLOPs utilization = tokens_per_s * flops_per_token(...) / peak_flops.

    Use consistent scopes: global tokens/s with the summed peak of all GPUs, or per-GPU
    tokens/s with one GPU's peak (`PEAK_BF16_FLOPS`)."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops={peak_flops}: expected > 0")
    return tokens_per_s * flops_per_token(n_params, n_layers, hidden, seq_len) / peak_flops


def peak_flops_for(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU from its torch.cuda.get_device_name(), or None if unknown."""
    name = device_name.upper()
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if all(part in name for part in key.upper().split()):
            return PEAK_BF16_FLOPS[key]
    return None


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


def _fmt_value(key: str, v: Any) -> str:
    if isinstance(v, float):
        if key == "lr" or (v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5)):
            return f"{v:.2e}"
        return f"{v:.4f}" if key.endswith("loss") else f"{v:.4g}"
    return str(v)


def _si(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.1f}"


def _to_float(v: Any) -> Any:
    if hasattr(v, "item"):  # torch / numpy scalars
        v = v.item()
    return v


class MetricsLogger:
    """Progress line + metrics.jsonl + TensorBoard, on global rank 0 only.

    Args:
        out_dir: run directory (metrics.jsonl and tensorboard/ go there).
        total_steps: for the progress fraction and ETA.
        stage: tag printed at the start of progress lines.
        tensorboard: write TensorBoard scalars when torch.utils.tensorboard imports.
        start_step: steps already done (resume): later entries of metrics.jsonl are dropped
            and the ETA counts from here.
        stream: write progress lines to this text stream instead of the logger.
        enabled: override the rank-0 check (tests).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        total_steps: int,
        stage: str = "train",
        tensorboard: bool = True,
        start_step: int = 0,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        clock: Any = time.perf_counter,
    ):
        self.enabled = is_rank0() if enabled is None else enabled
        self.total_steps, self.stage, self.stream = total_steps, stage, stream
        self.start_step, self._clock = start_step, clock
        self._t0 = clock()
        self._last_t, self._last_step = self._t0, start_step
        self._jsonl: TextIO | None = None
        self._tb = None
        self.path = os.path.join(os.fspath(out_dir), "metrics.jsonl")
        if not self.enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(self.path):
            self._truncate_after(start_step)
        self._jsonl = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as e:  # tensorboard missing or broken: keep going without it
                logger.warning("TensorBoard disabled (%s)", e)
            else:
                # purge_step: a resumed run drops the events the crashed run wrote after
                # its last checkpoint, so TensorBoard shows each step once
                self._tb = SummaryWriter(
                    os.path.join(os.fspath(out_dir), "tensorboard"),
                    purge_step=start_step + 1 if start_step else None,
                )

    def _truncate_after(self, step: int) -> None:
        with open(self.path) as f:
            lines = f.readlines()
        keep = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def log(
        self,
        step: int,
        metrics: dict[str, Any],
        *,
        prefix: str = "",
        tokens: int | None = None,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
    ) -> dict[str, Any]:
        """Record `metrics` at `step` (steps completed). Training calls (empty prefix) add
        step_time, tokens/s (from `tokens` processed since the previous training call) and
        MFU (when flops_per_token and peak_flops are given). Returns the record."""
        record: dict[str, Any] = {"step": int(step)}
        record.update({prefix + k: _to_float(v) for k, v in metrics.items()})
        now = self._clock()
        if not prefix:
            dt, dsteps = now - self._last_t, step - self._last_step
            if dsteps > 0 and dt > 0:
                record["step_time"] = dt / dsteps
                if tokens is not None:
                    record["tokens_per_s"] = tokens / dt
                    if flops_per_token and peak_flops:
                        record["mfu"] = record["tokens_per_s"] * flops_per_token / peak_flops
            self._last_t, self._last_step = now, step
        record["elapsed"] = now - self._t0
        if not self.enabled:
            return record
        assert self._jsonl is not None, "MetricsLogger.log after close()"
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k if prefix or "/" in k else f"train/{k}", v, step)
            self._tb.flush()
        self._emit(self.progress_line(record, prefix))
        return record

    def progress_line(self, record: dict[str, Any], prefix: str = "") -> str:
        step, total = record["step"], self.total_steps
        pct = 100.0 * step / total if total else 0.0
        parts = [
            f"[{self.stage}{' ' + prefix.rstrip('/') if prefix else ''}] step {step}/{total} ({pct:.1f}%)"
        ]
        skip = {"step", "elapsed", "step_time", "tokens_per_s", "mfu"}
        for k, v in record.items():
            if k not in skip:
                parts.append(f"{k.removeprefix(prefix)} {_fmt_value(k.removeprefix(prefix), v)}")
        if "tokens_per_s" in record:
            parts.append(f"tok/s {_si(record['tokens_per_s'])}")
        if "mfu" in record:
            parts.append(f"mfu {100 * record['mfu']:.1f}%")
        if not prefix:
            done = step - self.start_step
            if done > 0 and total:
                eta = record["elapsed"] / done * max(total - step, 0)
                parts.append(f"eta {format_duration(eta)}")
        return " | ".join(parts)

    def _emit(self, line: str) -> None:
        if self.stream is not None:
            self.stream.write(line + "\n")
            self.stream.flush()
        else:
            logger.info(line)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (a torn last line is ignored)."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def emit(text: str, *, err: bool = False) -> None:
    """User-facing output of the entry points and the demo (a results table, a one-line user
    error): stdout on rank 0, or stderr (every rank) for errors."""
    stream = sys.stderr if err else sys.stdout
    if err or is_rank0():
        stream.write(text + "\n")
        stream.flush()
