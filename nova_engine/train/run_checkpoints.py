"""Checkpoints of a run (the runner's save / resume side): which checkpoint to resume from
and the config diff against it, the guarded save (a full disk or a non-finite model writes
nothing), the asynchronous saver's completion, and the roll-back after divergence."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch.distributed as dist

from nova_engine.config import RunConfig
from nova_engine.logging import get_logger
from nova_engine.model.hf_export import complete_hf_export
from nova_engine.parallel.state import ParallelState
from nova_engine.train import checkpoint_io, safety
from nova_engine.train.async_checkpoint import AsyncSaver
from nova_engine.train.checkpoint import load_checkpoint, save_checkpoint, verify_for_rank
from nova_engine.train.loop import Loop

logger = get_logger(__name__)


def all_ok(ps: ParallelState, ok: bool) -> bool:
    """True on every rank iff `ok` on every rank (one scalar all_reduce on the device)."""
    if not dist.is_initialized() or ps.world_size == 1:
        return ok
    import torch

    flag = torch.tensor(0.0 if ok else 1.0, device=ps.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ps.layout_group)
    return flag.item() == 0.0


def resume_path(run: RunConfig) -> str | None:
    """The checkpoint to resume from per `checkpoint.resume` ("auto", "force", "none" or a
    path), without integrity checks (see `resume`)."""
    r = run.checkpoint.resume
    if r == "none":
        return None
    if r in ("auto", "force"):
        return checkpoint_io.latest_complete(run.checkpoint_dir)
    return r


def run_config_json(run: RunConfig) -> dict[str, Any]:
    """The run config as JSON, plus `data_content`: a fingerprint of every training file's
    bytes (sha256), so resume compares the data itself, not its line count."""
    import json

    return {
        **json.loads(json.dumps(run.to_dict(), default=str)),
        "data_content": {str(i): _file_sha256(p) for i, p in enumerate(run.data.train_paths)},
    }


def _file_sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:
        return "unreadable"
    return "sha256:" + h.hexdigest()[:16]


def resume(run: RunConfig, loop: Loop) -> str | None:
    """Restore `loop` per `checkpoint.resume`; returns the checkpoint loaded (or None).

    "auto"/"force": the newest checkpoint whose files (those each rank reads) pass the size
    and checksum checks on every rank; a damaged one is skipped with the reason logged, and
    when every one is damaged the run refuses (CheckpointIOError) instead of starting over at
    step 0 (checkpoint.resume=none starts over). A checkpoint of another TP/PP/DP layout is
    refused with the command that starts this layout from its weights (`layout_advice`).
    A checkpoint written under another model/data/training config: "auto" refuses with the
    changed keys (ConfigError), "force" and an explicit path resume with a warning."""
    from nova_engine.config import ConfigError

    r = run.checkpoint.resume
    if r == "none":
        return None
    ps = loop.engine().ps
    explicit = r not in ("auto", "force")
    found = checkpoint_io.list_complete(run.checkpoint_dir)
    candidates = [r] if explicit else [p for _, p in reversed(found)]
    damaged: list[str] = []
    for path in candidates:
        advice = layout_advice(run, loop, path)
        if advice is not None:
            raise checkpoint_io.CheckpointIOError(advice)
        reason = verify_for_rank(path, loop)
        if not all_ok(ps, reason is None):
            if explicit:
                raise checkpoint_io.CheckpointIOError(reason or f"{path}: damaged (see logs)")
            logger.warning("skipping damaged checkpoint %s: %s", path, reason or "(another rank)")
            damaged.append(reason or f"{path}: damaged on another rank")
            continue
        manifest = checkpoint_io.read_manifest(path)
        saved = manifest.get("extra", {}).get("config")
        if saved is not None:  # the config and the data's content (run_config_json)
            current = run_config_json(run)
            if "data_content" not in saved:  # a checkpoint from before the fingerprint
                current.pop("data_content")
            diff = safety.config_diff(_with_defaults(run, saved), current)
            if manifest.get("extra", {}).get("format") == "dist":  # the layout may change
                diff = [d for d in diff if not d.startswith("parallel.")]
            if diff and r == "auto":
                raise ConfigError(
                    "checkpoint.resume",
                    f"{path} was written under another config ({'; '.join(diff[:8])}"
                    f"{' ...' if len(diff) > 8 else ''}): use another train.out_dir, or "
                    "checkpoint.resume=force to resume with the new settings",
                )
            if diff:
                logger.warning("resuming %s under a changed config: %s", path, "; ".join(diff))
        load_checkpoint(path, loop)
        return path
    if damaged:
        raise checkpoint_io.CheckpointIOError(
            f"{run.checkpoint_dir}: every checkpoint is damaged ({len(damaged)}; the newest: "
            f"{damaged[0]}): refusing to start over at step 0 over them; restore or move them, "
            "or pass checkpoint.resume=none to train from step 0"
        )
    return None


def _with_defaults(run: RunConfig, saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's saved config (flattened), each key it lacks (added to Nova after it
    was written) set to that key's default: what the older run did, so not a change."""
    import dataclasses
    import json

    def defaults(obj: Any, prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value, key = getattr(obj, f.name), prefix + f.name
            if dataclasses.is_dataclass(value):
                out.update(defaults(value, key + "."))
            elif f.default is not dataclasses.MISSING:
                out[key] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[key] = f.default_factory()
        return out

    flat = lambda d: safety.flatten(json.loads(json.dumps(d, default=str)))  # noqa: E731
    old = flat(saved)
    return {**{k: v for k, v in flat(defaults(run, "")).items() if k not in old}, **old}


def _layout_text(lay: dict[str, Any]) -> str:
    n, vpp = lay.get("world_size", "?"), lay.get("vpp")
    vp = f" vpp={vpp}" if vpp not in (None, 1) else ""
    return f"tp={lay.get('tp')} pp={lay.get('pp')}{vp} ({n} rank{'s' * (n != 1)})"


def layout_advice(run: RunConfig, loop: Loop, path: str) -> str | None:
    """None when checkpoint `path` was saved at this run's layout (or its manifest cannot be
    read: the integrity check says why); else one line with what works: rerun at the saved
    layout to resume exactly, or the command that starts this layout from the checkpoint's
    hf/ weights (this run's resolved config.yaml, a new out_dir; optimizer and schedule
    start over)."""
    from nova_engine.train.checkpoint_parts import HF_SUBDIR
    from nova_engine.train.checkpoint_parts import layout_record as _layout

    try:
        extra = checkpoint_io.read_manifest(path).get("extra", {})
    except checkpoint_io.CheckpointIOError:
        return None
    if extra.get("format") == "dist":  # resumes into any layout (dist_checkpoint)
        return None
    saved = extra.get("engines") or {}
    mine = {name: _layout(e.ps) for name, e in loop.trainable.items()}
    diff = [n for n in mine if n in saved and saved[n] != mine[n]]
    if not diff:
        return None
    name = diff[0]
    line = (
        f"{path}: saved at layout {_layout_text(saved[name])}, this run is "
        f"{_layout_text(mine[name])}: a checkpoint resumes only at its own layout; rerun at "
        "that layout to resume exactly"
    )
    hf = os.path.join(path, HF_SUBDIR)
    if not os.path.isdir(hf):
        return line + " (it has no hf/ export to start another layout from)"
    lay = mine[name]
    run_dir = os.path.abspath(run.train.out_dir)
    out = f"{run_dir}_tp{lay['tp']}pp{lay['pp']}"
    launcher = "python -m nova_engine.train"
    if lay["world_size"] > 1:
        launcher = f"torchrun --nproc-per-node {lay['world_size']} -m nova_engine.train"
    cmd = (  # the resolved config.yaml of this run (setup_parallel wrote it)
        f"{launcher} {run.stage} --recipe {os.path.join(run_dir, 'config.yaml')} "
        f"model.hf_path={os.path.abspath(hf)} checkpoint.resume=none train.out_dir={out}"
    )
    if run.checkpoint.dir is not None:
        cmd += f" checkpoint.dir={out}/checkpoints"
    return f"{line}, or start this layout from its weights (a new optimizer and schedule): {cmd}"


def save_guarded(run: RunConfig, loop: Loop, saver: AsyncSaver | None = None) -> str | None:
    """Checkpoint now unless any rank's weights are non-finite (then nothing is written:
    the previous checkpoints stay the newest); a full disk -> CheckpointIOError naming the
    path. Returns the checkpoint path, or None when not written. With `saver`
    (checkpoint.async_save) the state is staged and the files are written in the
    background: the path is where the checkpoint will be once `finish_saves` returns."""
    ps = loop.engine().ps
    if not loop.guard.healthy:  # right after a skipped update the weights are suspect
        logger.error("step %d: the last update was skipped: checkpoint NOT written", loop.step)
        return None
    if not weights_finite(loop):
        logger.error("step %d: non-finite weights: checkpoint NOT written", loop.step)
        return None
    root = run.checkpoint_dir
    m = run.model
    keep_last, first_skip = run.checkpoint.keep_last, loop.guard.first_skip

    def prune(_path: str | None = None) -> None:  # rank 0, after a complete write
        if keep_last:
            keep = rollback_target(root, first_skip)
            checkpoint_io.prune(root, keep_last, protect=[keep] if keep else [])

    def hf_extras(d: str) -> None:
        complete_hf_export(
            d, source_dir=m.hf_path, tokenizer_dir=m.tokenizer_dir, template=run.data.template
        )

    kw: dict[str, Any] = dict(
        config_hash=run.hash(), hf=run.checkpoint.hf_in_checkpoints,
        extra={"config": run_config_json(run)}, hf_extras=hf_extras,
    )  # fmt: skip
    with _disk_errors(root):
        if saver is not None:
            return saver.save(root, loop, on_done=prune, **kw)
        path = save_checkpoint(root, loop, format=run.checkpoint.format, **kw)
    if ps.rank == ps.first_rank:
        prune()
    return path


@contextlib.contextmanager
def _disk_errors(root: str):
    """A failed checkpoint write that is the disk's fault -> one-line CheckpointIOError."""
    try:
        yield
    except Exception as e:  # torch.save: RuntimeError; safetensors: its own error type
        err = safety.disk_error(root, e)
        if err is None:
            raise
        raise checkpoint_io.CheckpointIOError(str(err)) from None


def finish_saves(run: RunConfig, saver: AsyncSaver | None) -> str | None:
    """Wait for the asynchronous save in flight (if any): its path once complete; a writer's
    disk error as one-line CheckpointIOError (collective when a save is in flight)."""
    if saver is None:
        return None
    with _disk_errors(run.checkpoint_dir):
        return saver.wait()


def weights_finite(loop: Loop) -> bool:
    """Every trainable engine's weights finite on every rank (collective)."""
    finite = all(bool(e.local_params_finite()) for e in loop.trainable.values())
    return all_ok(loop.engine().ps, finite)


def rollback_target(root: str, first_skip: int | None) -> str | None:
    """The checkpoint a diverged run rolls back to: the newest one written before the
    first skipped update (`first_skip`, a step number); None when nothing was skipped."""
    if first_skip is None:
        return None
    before = [p for step, p in checkpoint_io.list_complete(root, verify=False) if step < first_skip]
    return before[-1] if before else None


def roll_back(run: RunConfig, loop: Loop, err: safety.TrainingDiverged) -> safety.TrainingDiverged:
    """After divergence: delete the checkpoints written from the first skipped step on
    (their weights followed a NaN/Inf update) on rank 0; the error names the one to resume
    from."""
    root, first = run.checkpoint_dir, loop.guard.first_skip
    keep = rollback_target(root, first)
    ps = loop.engine().ps
    if ps.rank == ps.first_rank and first is not None:
        for step, p in checkpoint_io.list_complete(root, verify=False):
            if step >= first:
                checkpoint_io.remove_checkpoint(p)
                logger.warning("removed %s: written after the first skipped step %d", p, first)
    ps.barrier()
    where = f"rolled back to {keep}" if keep else "no checkpoint before it to roll back to"
    return safety.TrainingDiverged(f"{err}; first skipped step {first}: {where}")
