"""Nothing lost, nothing silent: the checks around a training run.

- `preflight(run)`: what can be checked before the model loads or any process group exists
  (model and tokenizer directories, the model class each stage needs there — a policy is
  never built from an untied reward model —, data files, a writable out_dir, free disk for
  one checkpoint); a problem raises ConfigError naming the key and the path.
- `RunLock`: an exclusive lock on out_dir held by rank 0 for the run (`fcntl.lockf` on
  `<out_dir>/.nova.lock`: the kernel drops it when the process dies, so a crashed run never
  leaves a stale lock; the file says which pid/host holds it).
- `config_diff(saved, current)`: the keys that changed between a checkpoint's run config and
  this run's (keys that cannot change the numbers — logging, eval cadence, checkpoint
  policy — are ignored); resuming refuses on a change unless `checkpoint.resume` says so.
- `NonFiniteGuard`: a NaN/Inf loss or gradient skips the update (counted, logged); after
  `train.max_bad_steps` consecutive skips the run stops with `TrainingDiverged`. Warns when
  the loss exceeds `train.divergence_factor` x its running mean or the gradient norm is 0
  for `train.zero_grad_steps` steps in a row.
- `StopRequest`: SIGINT / SIGTERM set a flag that the loop reads at the next step boundary
  (agreed over all ranks), so the run saves a checkpoint and exits quietly; a second signal
  stops at once.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from nova_engine.config import ConfigError
from nova_engine.logging import get_logger

logger = get_logger(__name__)

LOCK_NAME = ".nova.lock"

# keys whose change cannot alter the numbers of a resumed run
IGNORED_KEYS = (
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.tensorboard",
    "train.report_to",
    "eval.",
    "train.max_bad_steps",
    "train.divergence_factor",
    "train.zero_grad_steps",
    "train.save_on_signal",
    "data.eval_paths",
    "data.eval_max_samples",
    "checkpoint.",
    "train.out_dir",  # a moved run directory is the same run
)


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps: the run stops (the checkpoints on disk are the
    last finite ones)."""


class RunLockError(RuntimeError):
    """out_dir is in use by another run."""


# ---------------------------------------------------------------------------- preflight


def _tokenizer_files(path: str) -> bool:
    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    return any(os.path.isfile(os.path.join(path, n)) for n in names)


def _writable_dir(key: str, path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".nova-write-probe-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(key, f"{path}: not writable ({e.strerror or e})") from None


# the keys of each stage whose directory must hold a policy (a causal LM with its LM head)
POLICY_KEYS = {
    "sft": ("model.hf_path",),
    "dpo": ("model.hf_path",),
    "rlvr": ("model.hf_path", "model.reference_path"),
}


def _weight_names(path: str) -> set[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                return set(json.load(f).get("weight_map", {}))
        except (OSError, ValueError):
            return set()
    names: set[str] = set()
    for n in sorted(os.listdir(path)):
        if n.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                with safe_open(os.path.join(path, n), "pt") as s:
                    names |= set(s.keys())
            except Exception:  # noqa: BLE001 - the loader names a damaged file later
                return set()
    return names


def check_policy_dir(key: str, path: str) -> None:
    """`path` must be a model whose LM head is there: a *ForCausalLM, or a score model
    (*ForSequenceClassification: reward model, critic) with tied embeddings. An untied
    score model has no lm_head, and a policy built from it would sample from a random
    head: ConfigError naming the key."""
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return  # the model loader reports a missing or bad config.json
    archs = cfg.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        return
    if cfg.get("tie_word_embeddings") or "lm_head.weight" in _weight_names(path):
        return
    raise ConfigError(
        key,
        f"{path} is a reward/value model ({archs[0]}, no lm_head): a policy needs a causal "
        "LM (*ForCausalLM); point it at the SFT/DPO export, not the reward model's",
    )


# the other model directories a stage reads: (key, the config.json fields it must share
# with model.hf_path: an RM init is loaded into hf_path's architecture; a KL reference
# scores the policy's tokens)
SAME_DIMS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
MODEL_PATH_KEYS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "rm": (("model.init_from", SAME_DIMS),),
    "rlvr": (
        ("model.reference_path", ("vocab_size",)),
        ("critic.init_from", ()),
        ("reward_model.path", ()),
    ),
}
MODEL_CLASS_SUFFIXES = ("ForCausalLM", "ForSequenceClassification")


def _run_value(run, key: str):
    section, name = key.split(".")
    return getattr(getattr(run, section, None), name, None)


def check_model_dir(
    key: str, path: str, like: str | None = None, same: tuple[str, ...] = SAME_DIMS
) -> None:
    """`path` (set by `key`) must be a HF model directory of a class a stage can start
    from: a *ForCausalLM or a *ForSequenceClassification (reward model, critic); with
    `like` (the run's model.hf_path), equal to it in the config fields `same`. ConfigError
    naming the key."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise ConfigError(key, f"{path!r}: no such directory")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        raise ConfigError(
            key, f"{path}: no readable config.json (expected a HF model directory)"
        ) from None
    archs = [str(a) for a in cfg.get("architectures") or []]
    if not any(a.endswith(MODEL_CLASS_SUFFIXES) for a in archs):
        raise ConfigError(
            key,
            f"{path} holds {archs or 'no architectures'}: expected a *ForCausalLM or a "
            "*ForSequenceClassification (a reward model's export)",
        )
    other = {}
    if like:
        try:
            with open(os.path.join(like, "config.json")) as f:
                other = json.load(f)
        except (OSError, ValueError):
            return  # model.hf_path's own check names the problem
    diff = [k for k in same if k in cfg and k in other and cfg[k] != other[k]]
    if diff:
        shown = ", ".join(f"{k} {cfg[k]} vs {other[k]}" for k in diff)
        raise ConfigError(key, f"{path} is not a model of model.hf_path={like} ({shown})")


def check_model_classes(run) -> None:
    """Every model directory of `run` against what its stage needs there: POLICY_KEYS
    (a policy's LM head), MODEL_PATH_KEYS (exists, a causal LM or a sequence classifier,
    the policy's dimensions where the stage needs them)."""
    stage = getattr(run, "stage", "")
    for key, dims in MODEL_PATH_KEYS.get(stage, ()):
        path = _run_value(run, key)
        loss = getattr(run, "loss", None)
        if key == "critic.init_from" and not getattr(loss, "needs_critic", True):
            continue  # no critic in this run (e.g. GRPO): the path is not read
        if path:
            check_model_dir(key, path, run.model.hf_path if dims else None, dims)
    critic = getattr(run, "critic", None)
    if stage == "rlvr" and critic is not None and critic.init_from and run.loss.needs_critic:
        from nova_engine.model.hf_io import score_labels

        labels = score_labels(critic.init_from)
        if labels is not None and len(labels) > 1 and critic.output not in labels:
            raise ConfigError(
                "critic.output",
                f"{critic.output!r}: critic.init_from={critic.init_from} has {len(labels)} "
                f"outputs: name one of {labels}",
            )
    rm = getattr(run, "reward_model", None)
    if stage == "rlvr" and rm is not None and rm.path:  # a reward model as the RL reward
        from nova_engine.model.hf_io import score_labels

        labels = score_labels(rm.path)
        if labels is None:
            raise ConfigError(
                "reward_model.path",
                f"{rm.path} is not a *ForSequenceClassification (expected the rm stage's export)",
            )
        if (len(labels) > 1 or rm.output is not None) and rm.output not in labels:
            raise ConfigError(
                "reward_model.output",
                f"{rm.output!r}: reward_model.path={rm.path} has {len(labels)} output(s): "
                f"name one of {labels}",
            )
    for key in POLICY_KEYS.get(stage, ()):
        path = _run_value(run, key)
        if path and os.path.isdir(path):
            check_policy_dir(key, path)


def checkpoint_bytes(run) -> int | None:
    """Bytes one checkpoint of `run` takes (all ranks together), from config.json: weights
    in the run's precision, Adam state (fp32 master + two moments, 12 B/param) and the HF
    export when checkpoints carry one. None when the model dims are unknown yet."""
    path = os.path.join(run.model.hf_path, "config.json")
    if not os.path.isfile(path):
        return None
    from nova_engine.model.arch import load_arch

    try:
        n = load_arch(run.model.hf_path).num_params
    except Exception:  # noqa: BLE001 - the model loader reports a bad config later
        return None
    weight = 2 if run.train.precision == "bf16" else 4
    per_param = weight + 12 + (weight if run.checkpoint.hf_in_checkpoints else 0)
    return n * per_param


def preflight(run) -> None:
    """Checks that need no model and no process group (every rank runs them alike)."""
    m = run.model
    if m.build is None:
        if not os.path.isdir(m.hf_path):
            raise ConfigError("model.hf_path", f"{m.hf_path!r}: no such directory")
        if not os.path.isfile(os.path.join(m.hf_path, "config.json")):
            raise ConfigError(
                "model.hf_path", f"{m.hf_path}: no config.json (expected a HF model directory)"
            )
    tok = m.tokenizer_dir
    if m.build is None or m.tokenizer_path is not None:
        if not os.path.isdir(tok):
            raise ConfigError("model.tokenizer_path", f"{tok!r}: no such directory")
        if not _tokenizer_files(tok):
            raise ConfigError(
                "model.tokenizer_path" if m.tokenizer_path else "model.hf_path",
                f"{tok}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)",
            )
    check_model_classes(run)
    d = run.data
    if not d.train_paths:
        raise ConfigError("data.train_paths", "empty: expected at least one JSONL file")
    for key, paths in (("data.train_paths", d.train_paths), ("data.eval_paths", d.eval_paths)):
        for p in paths:
            if not os.path.isfile(p):
                raise ConfigError(key, f"{p}: no such file")
            if not os.access(p, os.R_OK):
                raise ConfigError(key, f"{p}: not readable")
    _writable_dir("train.out_dir", run.train.out_dir)
    if run.checkpoint.export_hf:  # out_dir/hf: a previous export or nothing (hf_export's rule)
        from nova_engine.model.hf_export import ExportError, check_export_target

        try:
            check_export_target(
                os.path.join(run.train.out_dir, "hf"), overwrite=True, what="export"
            )
        except ExportError as e:
            raise ConfigError("train.out_dir", str(e)) from None
    ck = run.checkpoint_dir
    _writable_dir("checkpoint.dir", ck)
    need = checkpoint_bytes(run) if run.checkpoint.check_free_space else None
    if need is not None:
        free = shutil.disk_usage(ck).free
        if free < need:
            raise ConfigError(
                "checkpoint.dir",
                f"{ck}: {free / 1e9:.2f} GB free, one checkpoint needs ~{need / 1e9:.2f} GB "
                "(free space, or checkpoint.check_free_space=false for per-node disks)",
            )


def disk_error(path: str, e: BaseException) -> Exception | None:
    """A clear error for a failed checkpoint write (disk full, permissions), or None."""
    text = str(e)
    code = getattr(e, "errno", None)
    if code == errno.ENOSPC or any(
        m in text for m in ("No space left", "file write failed", "os error 28", "Disk quota")
    ):
        free = shutil.disk_usage(os.path.dirname(path) or ".").free
        return OSError(
            errno.ENOSPC, f"{path}: disk full while writing a checkpoint ({free / 1e9:.2f} GB "
            "free); the previous checkpoints are intact"
        )  # fmt: skip
    if code in (errno.EACCES, errno.EROFS):
        return OSError(code, f"{path}: not writable ({e})")
    return None


# ---------------------------------------------------------------------------- run lock


class RunLock:
    """Exclusive lock on a directory a run writes (rank 0, for the run): out_dir and
    checkpoint.dir each. `acquire()` raises RunLockError naming the holder and `key`;
    released on `release()` or when the process dies."""

    def __init__(self, out_dir: str, key: str = "train.out_dir"):
        self.path = os.path.join(out_dir, LOCK_NAME)
        self.key = key
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except (OSError, ValueError):
                holder = {}
            os.close(fd)
            since = holder.get("started")
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
            raise RunLockError(
                f"{os.path.dirname(self.path)}: in use by another run (pid "
                f"{holder.get('pid', '?')} on {holder.get('host', '?')} since {when}); wait "
                f"for it to finish or choose another {self.key}"
            ) from None
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ---------------------------------------------------------------------------- config diff


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """ "key: old -> new" for every numbers-relevant key that differs (sorted)."""
    a, b = (
        flatten(json.loads(json.dumps(saved, default=str))),
        flatten(json.loads(json.dumps(current, default=str))),
    )
    out = []
    for key in sorted(set(a) | set(b)):
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in IGNORED_KEYS):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


# ---------------------------------------------------------------------------- NaN guard


def nonfinite_sample_ids(
    names: Sequence[str], microbatches: Sequence[Any], results: Sequence[dict]
) -> list[int] | None:
    """The sample ids (Sample / PairSample index) of the micro-batches whose metrics in
    `names` are non-finite, from this rank's per-micro-batch results (the last pipeline
    stage has them); None when no micro-batch can be blamed (non-finite gradients with a
    finite loss, or a rank without results). Reads values to the host: call it only for a
    skipped step."""
    import torch

    if not results or len(results) != len(microbatches):
        return None
    ids: list[int] = []
    for mb, r in zip(microbatches, results):
        vals = [r[n] for n in names if n in r]
        if all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in vals):
            continue
        for attr in ("pair_ids_host", "pair_ids", "sample_ids_host", "sample_ids"):
            got = getattr(mb, attr, None)
            if got is not None:
                ids += [int(i) for i in torch.as_tensor(got).flatten().tolist() if int(i) >= 0]
                break
    return sorted(set(ids)) or None


class NonFiniteGuard:
    """Counts non-finite steps and watches for divergence (see the module docstring)."""

    def __init__(self, max_bad_steps: int = 3, divergence_factor: float = 10.0,
                 zero_grad_steps: int = 3, ema: float = 0.9):  # fmt: skip
        self.max_bad_steps, self.factor = max_bad_steps, divergence_factor
        self.zero_grad_steps, self.ema = zero_grad_steps, ema
        self.bad_in_row = self.skipped = self.zero_in_row = 0
        self.mean: float | None = None
        self.first_skip: int | None = None
        """The step number of this run's first skipped update (checkpoints from it on
        are suspect: a diverged run rolls back to the last one before it)."""
        self.describe: Callable[[Sequence[int]], str] | None = None
        """Set by the runner: sample ids -> "file:line, ..." of the data (called only when
        a step is skipped, so reading the data files again costs nothing per step)."""

    @property
    def healthy(self) -> bool:
        """False while the last step was skipped (a checkpoint now would follow a NaN)."""
        return self.bad_in_row == 0

    def skip(self, step: int, why: str, sample_ids: Sequence[int] | None = None) -> None:
        """Record a skipped update; TrainingDiverged after max_bad_steps in a row.
        `sample_ids`: the samples of the micro-batch(es) whose loss was non-finite, named
        (file:line) in the warning and the error when `describe` is set."""
        if sample_ids is not None and len(sample_ids) and self.describe is not None:
            try:
                where = self.describe(sample_ids)
            except Exception as e:  # noqa: BLE001 - naming must not hide the skip itself
                where = f"samples {sorted(set(sample_ids))[:8]} (not named: {e})"
            why = f"{why} in the micro-batch of {where}"
        self.bad_in_row += 1
        self.skipped += 1
        if self.first_skip is None:
            self.first_skip = step
        logger.warning(
            "step %d: %s: update skipped (%d in a row, %d in all)",
            step, why, self.bad_in_row, self.skipped,
        )  # fmt: skip
        if self.max_bad_steps and self.bad_in_row >= self.max_bad_steps:
            raise TrainingDiverged(
                f"step {step}: {self.bad_in_row} consecutive updates skipped ({why}); the run "
                "diverged (lower optim.lr, keep optim.grad_clip on); checkpoints on disk "
                "hold the last finite weights"
            )

    def ok(self, step: int, loss: float | None, grad_norm: float) -> None:
        """Record an applied update and warn on divergence signs."""
        self.bad_in_row = 0
        if grad_norm == 0.0:
            self.zero_in_row += 1
            if self.zero_in_row == self.zero_grad_steps:
                logger.warning(
                    "step %d: gradient norm 0 for %d steps in a row: the model is not "
                    "learning (a collapsed model after a too-high learning rate?)",
                    step, self.zero_in_row,
                )  # fmt: skip
        else:
            self.zero_in_row = 0
        if loss is None or not math.isfinite(loss):
            return
        if self.mean is not None and self.factor and loss > self.factor * self.mean > 0:
            logger.warning(
                "step %d: loss %.4g is %.1fx its running mean %.4g: diverging?",
                step, loss, loss / self.mean, self.mean,
            )  # fmt: skip
        self.mean = loss if self.mean is None else self.ema * self.mean + (1 - self.ema) * loss

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "mean": self.mean}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped, self.mean = int(state.get("skipped", 0)), state.get("mean")


# ---------------------------------------------------------------------------- signals


INTERRUPTED_LINE = (
    "interrupted (SIGINT) outside a training step: stopped at once; checkpoints and exports "
    "are only renamed into place when complete, rerun to resume"
)


def _exit_now(signum: int, frame: Any) -> None:
    import sys

    if int(os.environ.get("RANK", "0")) == 0:
        try:
            sys.stdout.flush()
            sys.stderr.write(INTERRUPTED_LINE + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    os._exit(128 + signum)


def exit_on_interrupt() -> Callable[[], None]:
    """SIGINT -> one line (rank 0) and exit 130 at once, skipping the interpreter's teardown.
    Installed by the training entry point before anything heavy is imported: a
    KeyboardInterrupt raised inside `import torch` / megatron / a C extension or a gloo
    init leaves half-initialized modules whose later re-import or teardown segfaulted
    (exit -11). The training loop's StopRequest takes over during training (a checkpoint at
    the step boundary) and hands back to this handler after. Returns the restore function
    (in-process callers, tests, get their previous handler back)."""
    try:
        old = signal.signal(signal.SIGINT, _exit_now)
    except ValueError:  # not the main thread: leave signals alone
        return lambda: None

    def restore() -> None:
        signal.signal(signal.SIGINT, old)

    return restore


class StopRequest:
    """SIGINT/SIGTERM -> `requested` (checked at step boundaries); a second signal restores
    the default handler and re-raises it (stop now)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second signal: stop at once
            self.uninstall()
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        logger.warning(
            "%s received: saving a checkpoint at the end of this step, then stopping "
            "(send it again to stop at once)", signal.Signals(signum).name,
        )  # fmt: skip

    def install(self) -> StopRequest:
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None


class Interrupted(Exception):
    """Raised after the signal-triggered checkpoint: the entry point exits quietly."""

    def __init__(self, signum: int, step: int, path: str | None):
        self.signum, self.step, self.path = signum, step, path
        name = signal.Signals(signum).name
        saved = f"saved {path}" if path else "nothing saved"
        super().__init__(f"{name}: stopped after step {step}; {saved}; rerun to resume")
