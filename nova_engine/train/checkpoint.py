"""Training checkpoints of a loop: every trainable engine (model, optimizer, LR schedule),
the data source's position and RNG, the loop's step and the RNG states — one file per rank,
written atomically (`checkpoint_io`: temp dir + COMPLETE manifest + rename).

    path = save_checkpoint(root, loop, config_hash=run.hash(), hf=True)   # all ranks
    step = load_checkpoint(latest_complete(root), loop)                    # all ranks

Layout of `<root>/step_00000123/` (nothing is written twice across DP replicas):
    mp_<engine>_tp01_pp00.pt  per trainable engine, written by DP rank 0 of each (TP, PP)
                     coordinate of that engine's layout: the shard's parameters (by name,
                     per chunk) and, unless the optimizer is DP-sharded, its optimizer state
                     (Adam moments + fp32 master weights)
    rank_00003.pt    every rank: loop step, data-source state, RNG states, and per engine
                     its LR schedule and with the distributed optimizer (ZeRO-1) this rank's
                     shard of the optimizer state
    hf/              the first trainable engine ("policy") as a HF directory, when hf=True
                     (other trainable engines: hf_<engine>/)
    COMPLETE         the manifest (step, files + sizes, config hash, layouts)

Saving copies every tensor of the state straight into host buffers kept per loop and reused
by the next save (`HostBuffers`): device tensors into pinned memory with non-blocking copies
and one synchronize before the files are written, host tensors into plain ones. Nothing is
cloned on the device (the fp32 master weights alone are 4 bytes a parameter of the rank's
shard), and the bytes on disk are those of a CPU clone.

Same layouts -> exact resume: the per-step losses of a resumed run equal an uninterrupted
run's. A different TP x PP layout -> `load_checkpoint(..., weights_only=True)` reads hf/
into the new layout (the optimizer state does not carry over); `hf/` is also the HF export
of any checkpoint (`nova export`). Format `dist` (`checkpoint.format: dist`,
nova_engine.train.dist_checkpoint) resumes into another layout with everything;
`save_checkpoint` / `load_checkpoint` / `verify_for_rank` dispatch on the format (a
checkpoint is read in the format it was written in). Asynchronous saves of this format:
nova_engine.train.async_checkpoint (`checkpoint.async_save`), the same files. Frozen
engines are not saved (they are rebuilt from their own HF directories).

Files are read with `torch.load(weights_only=True)` only (`checkpoint_parts.load_file`): a
file that holds anything but tensors and plain values is refused in one line, never run.
A manifest of another `format_version` is refused in one line naming it; checkpoints of
format_version 1 written by earlier Nova versions load (checked against 859d28b's).
"""

from __future__ import annotations

import os
import weakref
from typing import Any

import torch
import torch.distributed as dist

from nova_engine.logging import get_logger
from nova_engine.train import checkpoint_io
from nova_engine.train.checkpoint_io import CheckpointIOError
from nova_engine.train.checkpoint_parts import hf_dir as _hf_dir
from nova_engine.train.checkpoint_parts import layout_record as _layout
from nova_engine.train.checkpoint_parts import load_file as _load
from nova_engine.train.checkpoint_parts import rng_state as _rng_state
from nova_engine.train.checkpoint_parts import set_rng_state as _set_rng_state
from nova_engine.train.optim import dp_sharded, load_optimizer_state, optimizer_state

logger = get_logger(__name__)


class HostBuffers:
    """Host copies of a checkpoint's tensors, reused across saves (one set per loop).

    `stage(obj, key)` returns `obj` (nested dicts / lists / tuples) with every tensor replaced
    by its host buffer for the path `key + (dict key / index, ...)`: allocated on first use
    (pinned when the tensor is on a CUDA device) or when shape / dtype change, then filled by
    `copy_` (non_blocking from a device). `wait()` synchronizes once after the last copy;
    call it before the buffers are read. The staged values stay valid until the next stage.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}
        self._pending = False

    def _host(self, key: tuple, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        buf = self.buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            pin = t.device.type == "cuda"
            if t.is_contiguous():
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
            else:  # same strides as a clone would have
                buf = torch.empty_like(t, device="cpu")
            self.buffers[key] = buf
        device = t.device.type != "cpu"
        buf.copy_(t, non_blocking=device)
        self._pending |= device
        return buf

    def stage(self, obj: Any, key: tuple = ()) -> Any:
        return self._stage(obj, key, {})

    def _stage(self, obj: Any, key: tuple, memo: dict[int, Any]) -> Any:
        # memo: an object met twice is staged once, and a container without tensors is kept
        # as is, so the pickle (its shared references) is the one of the live state
        if id(obj) in memo:
            return memo[id(obj)]
        out = obj
        if isinstance(obj, torch.Tensor):
            out = self._host(key, obj)
        elif isinstance(obj, dict):
            new = {k: self._stage(v, (*key, k), memo) for k, v in obj.items()}
            if any(new[k] is not v for k, v in obj.items()):
                out = new
        elif isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
            items = [self._stage(v, (*key, i), memo) for i, v in enumerate(obj)]
            if any(a is not b for a, b in zip(items, obj)):
                out = type(obj)(items)
        memo[id(obj)] = out
        return out

    def wait(self) -> None:
        """One synchronize for all the non-blocking device-to-host copies of `stage`."""
        if self._pending:
            torch.cuda.synchronize()
            self._pending = False


# the host buffers of each loop's checkpoints (dropped with the loop)
_HOST_BUFFERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def host_buffers(loop) -> HostBuffers:
    """The loop's HostBuffers (created at its first save)."""
    if loop not in _HOST_BUFFERS:
        _HOST_BUFFERS[loop] = HostBuffers()
    return _HOST_BUFFERS[loop]


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _shard_file(name: str, ps) -> str:
    return f"mp_{name}_tp{ps.tp_rank:02d}_pp{ps.pp_rank:02d}.pt"


def rank_state(loop) -> dict[str, Any]:
    """What this rank saves in its rank file (see the module docstring); tensors are the live
    ones (save_checkpoint copies them to host buffers)."""
    engines = {}
    for name, e in loop.trainable.items():
        opt = e.optimizer
        engines[name] = {
            "layout": _layout(e.ps),
            "optimizer": optimizer_state(opt) if dp_sharded(opt) else None,
            "scheduler": e.scheduler.state_dict() if e.scheduler else None,
        }
    return {
        "step": loop.step,
        "data": loop.data.state_dict() if loop.data is not None else None,
        "engines": engines,
        "rng": _rng_state(),
    }


def shard_state(engine) -> dict[str, Any]:
    """What DP rank 0 of a (TP, PP) coordinate saves for all the engine's DP replicas; tensors
    are the live ones (save_checkpoint copies them to host buffers)."""
    opt = engine.optimizer
    return {
        "model": engine.model_state(),
        "optimizer": optimizer_state(opt) if not dp_sharded(opt) else None,
    }


def _save_rank_file(state: dict[str, Any], path: str) -> None:
    torch.save(state, path)


def _layout_barrier(ps) -> None:
    """A barrier over the training layout's ranks (`ps.layout_group`; None = the world):
    ranks outside it (an async run's generation ranks) never enter checkpoint code."""
    if ps.world_size > 1:
        dist.barrier(group=ps.layout_group)


def _any_ps(loop):
    return next(iter(loop.engines.values())).ps


def save_checkpoint(
    root: str | os.PathLike,
    loop,
    *,
    config_hash: str | None = None,
    hf: bool = False,
    keep_last: int = 0,
    extra: dict[str, Any] | None = None,
    hf_extras: Any = None,
    format: str = "torch",
) -> str:
    """Write `<root>/step_<loop.step>` on all ranks (collective); returns its path.
    hf_extras(dir): called on rank 0 after each HF export is written (tokenizer files,
    generation config: nova_engine.model.hf_export.complete_hf_export). format: "torch"
    (this module's layout) or "dist" (nova_engine.train.dist_checkpoint)."""
    ps = _any_ps(loop)
    if format == "dist":
        from nova_engine.train.dist_checkpoint import save_dist_checkpoint

        path = save_dist_checkpoint(
            root, loop, config_hash=config_hash, hf=hf, extra=extra, hf_extras=hf_extras
        )
        if ps.rank == ps.first_rank and keep_last:
            checkpoint_io.prune(root, keep_last)
        _layout_barrier(ps)
        return path
    final = checkpoint_io.checkpoint_dir_for(root, loop.step)
    host = host_buffers(loop)
    state = host.stage(rank_state(loop), ("rank",))
    shards = {
        n: host.stage(shard_state(e), ("shard", n))
        for n, e in loop.trainable.items()
        if e.ps.dp_rank == 0
    }
    host.wait()  # one synchronize for every device-to-host copy, before anything is written
    layouts = {n: _layout(e.ps) for n, e in loop.trainable.items()}

    def write(tmp: str) -> list[str]:
        path = os.path.join(tmp, _rank_file(ps.rank))
        _save_rank_file(state, path)
        written = [path]
        for name, shard in shards.items():
            written.append(os.path.join(tmp, _shard_file(name, loop.engines[name].ps)))
            _save_rank_file(shard, written[-1])
        if hf:
            for name, e in loop.trainable.items():
                out = os.path.join(tmp, _hf_dir(loop, name))
                e.export_hf(out)
                if ps.rank == ps.first_rank:
                    if hf_extras is not None:
                        hf_extras(out)
                    written += [os.path.join(out, f) for f in os.listdir(out)]
        return written

    policy_layout = next(iter(layouts.values()), _layout(ps))
    path = checkpoint_io.write_checkpoint_dir(
        final,
        write,
        step=loop.step,
        config_hash=config_hash,
        extra={"layout": policy_layout, "engines": layouts, **(extra or {})},
        rank=ps.rank - ps.first_rank,
        barrier=(lambda: _layout_barrier(ps)) if ps.world_size > 1 else None,
        overwrite=True,
    )
    if ps.rank == ps.first_rank and keep_last:
        checkpoint_io.prune(root, keep_last)
    _layout_barrier(ps)
    logger.info("saved checkpoint %s", path)
    return path


def verify_for_rank(path: str, loop) -> str | None:
    """None if the files this rank would read from checkpoint `path` are intact (manifest,
    sizes, checksums), else the reason. Call on every rank and agree (runner.all_ok)."""
    try:
        manifest = checkpoint_io.read_manifest(path)
        if (manifest.get("extra") or {}).get("format") == "dist":
            from nova_engine.train import dist_checkpoint

            return dist_checkpoint.verify_for_rank(path, loop)
        ps = _any_ps(loop)
        files = [_rank_file(ps.rank)] + [_shard_file(n, e.ps) for n, e in loop.trainable.items()]
        checkpoint_io.verify_checksums(path, files)
    except CheckpointIOError as e:
        return str(e)
    return None


def load_checkpoint(path: str | os.PathLike, loop, *, weights_only: bool = False) -> int:
    """Restore `loop` from a complete checkpoint; returns the step it was saved at.

    Same layouts: everything (exact resume). `weights_only=True`: only the trainable
    engines' models, read from the checkpoint's HF exports, which works for any TP x PP
    layout. A different layout without weights_only raises CheckpointIOError saying so.
    """
    path = os.fspath(path)
    manifest = checkpoint_io.read_manifest(path)
    version = manifest.get("format_version")
    if version != checkpoint_io.FORMAT_VERSION:
        raise CheckpointIOError(
            f"{path}: checkpoint format version {version}, this Nova reads version "
            f"{checkpoint_io.FORMAT_VERSION} only (weights: its hf/ export, if any)"
        )
    saved = manifest.get("extra", {}).get("engines") or {}
    if not weights_only and manifest.get("extra", {}).get("format") == "dist":
        from nova_engine.train.dist_checkpoint import load_dist_checkpoint

        return load_dist_checkpoint(path, loop)  # any layout
    if weights_only:
        for name, e in loop.trainable.items():
            hf = os.path.join(path, _hf_dir(loop, name))
            if not os.path.isdir(hf):
                raise CheckpointIOError(f"{path}: no {_hf_dir(loop, name)}/ export to load from")
            prefix = _hf_dir(loop, name) + "/"
            checkpoint_io.verify_checksums(
                path, [r for r in manifest["files"] if r.startswith(prefix)]
            )
            e.load_hf(hf)
        return int(manifest["step"])
    for name, e in loop.trainable.items():
        if saved.get(name) != _layout(e.ps):
            raise CheckpointIOError(
                f"{path}: engine {name!r} saved with layout {saved.get(name)}, this run is "
                f"{_layout(e.ps)}; resume needs the same layout (weights_only=True reads "
                "hf/ into any layout; runner.layout_advice gives the command)"
            )
    ps = _any_ps(loop)
    mine_files = [_rank_file(ps.rank)] + [_shard_file(n, e.ps) for n, e in loop.trainable.items()]
    checkpoint_io.verify_checksums(path, mine_files)
    state = _load(path, _rank_file(ps.rank))
    for name, e in loop.trainable.items():
        shard_path = os.path.join(path, _shard_file(name, e.ps))
        shard = _load(path, _shard_file(name, e.ps))
        e.load_model_state(shard["model"], shard_path)
        mine = state["engines"][name]
        opt_state = mine["optimizer"] if mine["optimizer"] is not None else shard["optimizer"]
        if opt_state is not None:
            load_optimizer_state(e.optimizer, opt_state)
        if e.scheduler is not None and mine["scheduler"] is not None:
            e.scheduler.load_state_dict(mine["scheduler"])
    if loop.data is not None and state.get("data") is not None:
        loop.data.load_state_dict(state["data"])
    _set_rng_state(state["rng"])
    loop.step = int(state["step"])
    logger.info("resumed from %s (step %d)", path, loop.step)
    return loop.step
