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

Trackers (`report_to`, the recipe's `train.report_to`) get the same numeric records:
"tensorboard" (out_dir/tensorboard), "wandb" (`wandb.init(project=$WANDB_PROJECT or "nova",
dir=out_dir)`, one run id per out_dir kept in `out_dir/wandb_run_id` so a resumed run
continues it; WANDB_MODE=offline needs no account), "mlflow" (tracking URI
$MLFLOW_TRACKING_URI or out_dir/mlruns, experiment $MLFLOW_EXPERIMENT_NAME or "nova"; the run
id in `out_dir/mlflow_run_id`, continued on resume). Each is imported only when asked for.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any, TextIO

from nova_engine.logging import get_logger, is_rank0
from nova_engine.progress import format_duration  # noqa: F401  (metrics API: eta lines)

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


def _numeric(record: dict[str, Any]) -> dict[str, float]:
    return {
        k: v
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class _TensorBoard:
    def __init__(self, out_dir: str, start_step: int, required: bool):
        self.w = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as e:  # tensorboard missing or broken
            if required:
                raise RuntimeError(f"train.report_to: tensorboard does not import ({e})") from e
            logger.warning("TensorBoard disabled (%s)", e)
            return
        # purge_step: a resumed run drops the events the crashed run wrote after its last
        # checkpoint, so TensorBoard shows each step once
        self.w = SummaryWriter(
            os.path.join(out_dir, "tensorboard"),
            purge_step=start_step + 1 if start_step else None,
        )

    def log(self, step: int, record: dict[str, Any], prefix: str) -> None:
        if self.w is None:
            return
        for k, v in _numeric(record).items():
            self.w.add_scalar(k if prefix or "/" in k else f"train/{k}", v, step)
        self.w.flush()

    def close(self) -> None:
        if self.w is not None:
            self.w.close()


class _WandB:
    def __init__(self, out_dir: str, stage: str, config: dict[str, Any] | None):
        import uuid

        import wandb

        id_file = os.path.join(out_dir, "wandb_run_id")
        if os.path.exists(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            with open(id_file, "w") as f:
                f.write(run_id + "\n")
        name = f"{os.path.basename(os.path.abspath(out_dir))}-{stage}"
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "nova"), name=name, id=run_id,
            dir=out_dir, config=config or {}, resume="allow", job_type=stage,
        )  # fmt: skip

    def log(self, step: int, record: dict[str, Any], prefix: str) -> None:
        data = {k if prefix or "/" in k else f"train/{k}": v for k, v in _numeric(record).items()}
        self.run.log(data, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, out_dir: str, stage: str, config: dict[str, Any] | None):
        import mlflow

        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (
            "file:" + os.path.join(os.path.abspath(out_dir), "mlruns")
        )
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "nova"))
        id_file = os.path.join(out_dir, "mlflow_run_id")
        if os.path.exists(id_file):  # a resumed run continues its MLflow run
            with open(id_file) as f:
                mlflow.start_run(run_id=f.read().strip())
            return  # (params are immutable in MLflow: the first run's stay)
        run = mlflow.start_run(run_name=f"{os.path.basename(os.path.abspath(out_dir))}-{stage}")
        with open(id_file, "w") as f:
            f.write(run.info.run_id + "\n")
        if config:
            mlflow.log_params({k: str(v)[:250] for k, v in _flatten(config).items()})

    def log(self, step: int, record: dict[str, Any], prefix: str) -> None:
        self.mlflow.log_metrics(_numeric(record), step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def open_trackers(
    report_to: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    stage: str = "train",
    tensorboard: bool = False,
    start_step: int = 0,
    config: dict[str, Any] | None = None,
) -> list[Any]:
    """The trackers of `report_to` (plus TensorBoard when `tensorboard`, best effort): each
    has log(step, record, prefix) and close(). A tracker of report_to that does not start
    (not importable, wandb without a login, an unreachable MLflow server) is a ConfigError
    naming train.report_to: one line, not a traceback."""
    from nova_engine.config import ConfigError

    out_dir = os.fspath(out_dir)
    names = list(dict.fromkeys(report_to))
    out: list[Any] = []
    if tensorboard and "tensorboard" not in names:
        out.append(_TensorBoard(out_dir, start_step, required=False))
    makers = {
        "tensorboard": lambda: _TensorBoard(out_dir, start_step, required=True),
        "wandb": lambda: _WandB(out_dir, stage, config),
        "mlflow": lambda: _MLflow(out_dir, stage, config),
    }
    for name in names:
        if name not in makers:
            raise ConfigError("train.report_to", f"unknown tracker {name!r}")
        try:
            out.append(makers[name]())
        except Exception as e:  # noqa: BLE001 - any failure to start: the user's setup
            for t in out:
                t.close()
            hint = " (without an account: WANDB_MODE=offline)" if name == "wandb" else ""
            raise ConfigError(
                "train.report_to", f"{name} did not start: {type(e).__name__}: {e}{hint}"
            ) from None
    return out


class MetricsLogger:
    """Progress line + metrics.jsonl + TensorBoard, on global rank 0 only.

    Args:
        out_dir: run directory (metrics.jsonl and tensorboard/ go there).
        total_steps: for the progress fraction and ETA.
        stage: tag printed at the start of progress lines.
        tensorboard: write TensorBoard scalars when torch.utils.tensorboard imports.
        report_to: trackers ("tensorboard", "wandb", "mlflow"; see the module docstring).
        config: the run config (a nested dict) the wandb/mlflow run records.
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
        report_to: Sequence[str] = (),
        config: dict[str, Any] | None = None,
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
        self._trackers: list[Any] = []
        self.path = os.path.join(os.fspath(out_dir), "metrics.jsonl")
        if not self.enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(self.path):
            self._truncate_after(start_step)
        self._jsonl = open(self.path, "a")
        self._trackers = open_trackers(
            report_to, out_dir, stage=stage, tensorboard=tensorboard, start_step=start_step,
            config=config,
        )  # fmt: skip

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
        for tracker in self._trackers:
            tracker.log(step, record, prefix)
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
        trackers, self._trackers = self._trackers, []
        for tracker in trackers:
            tracker.close()

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


def append_record(out_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record to `<out_dir>/metrics.jsonl` (rank 0; outside a MetricsLogger)."""
    if not is_rank0():
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(os.fspath(out_dir), "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def run_eval_command(
    command: str,
    export_dir: str,
    step: int,
    out_dir: str | os.PathLike,
    timeout_s: float = 3600.0,
    tail_chars: int = 4000,
) -> dict[str, Any] | None:
    """`eval.command` on an HF export, on rank 0 (None elsewhere): "{export}" / "{step}"
    in the command and $NOVA_EXPORT_DIR / $NOVA_STEP name them. Its exit code, duration and
    output tail (stdout + stderr) are logged and appended to metrics.jsonl as
    {"step", "eval_command": {...}}; a failure or timeout is a warning, never an error."""
    import subprocess

    if not is_rank0():
        return None
    export_dir = os.path.abspath(export_dir)
    cmd = command.replace("{export}", export_dir).replace("{step}", str(step))
    env = {**os.environ, "NOVA_EXPORT_DIR": export_dir, "NOVA_STEP": str(step)}
    t0 = time.perf_counter()
    timed_out = False
    try:
        p = subprocess.run(
            cmd, shell=True, env=env, timeout=timeout_s, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        code, out = p.returncode, p.stdout or b""
    except subprocess.TimeoutExpired as e:
        timed_out, code, out = True, None, e.stdout or b""
    text = out.decode("utf-8", "replace")
    info = {
        "command": cmd,
        "export": export_dir,
        "returncode": code,
        "timed_out": timed_out,
        "seconds": round(time.perf_counter() - t0, 3),
        "output": text[-tail_chars:],
    }
    append_record(out_dir, {"step": int(step), "eval_command": info})
    if code == 0:
        logger.info("eval.command on %s: exit 0 (%.1fs)\n%s", export_dir, info["seconds"], text)
    else:
        why = f"timed out after {timeout_s:g}s" if timed_out else f"exit code {code}"
        logger.warning("eval.command on %s: %s\n%s", export_dir, why, text[-tail_chars:])
    return info
