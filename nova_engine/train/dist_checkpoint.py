"""Checkpoint format `dist` (`checkpoint.format: dist`): megatron-core's dist_checkpointing
(sharded tensors in torch's distributed checkpoint format, torch_dist strategy), which resumes
into another layout with the optimizer moments.

    path = save_dist_checkpoint(root, loop, config_hash=run.hash())     # all ranks
    step = load_dist_checkpoint(path, loop)                             # all ranks, any layout

Layout of `<root>/step_00000123/` (same atomic protocol as format `torch`: temp dir, every
rank's CRCs, COMPLETE manifest with `extra.format == "dist"` and per engine whether it
used the distributed optimizer, rename; `checkpoint_io`):
    dist_<engine>/   per trainable engine, `dist_checkpointing.save` of {"model": the
                     chunks' sharded_state_dict ("model0", "model1", ... with virtual
                     pipeline stages), "optimizer": the optimizer's sharded_state_dict}:
                     global tensors keyed by parameter, each rank writing its shards
                     (__<rank>_<i>.distcp; metadata.json, .metadata, common.pt by rank 0)
    loop.json        rank 0: the loop step, the data source's state and per engine the LR
                     schedule's state (all global: the same on every rank and layout)
    rng_00003.pt     every rank: its RNG states (tensors only, read with weights_only=True)
    hf/              as format `torch`, when hf=True

What may change between runs: TP, PP, VPP, SP, DP and the distributed optimizer on or
off (tested on 4 gloo ranks: TP2 x PP2 -> TP1 x DP4, PP4 and TP2 x PP2 x VPP2 + SP;
TP2 x PP2 x VPP2 + SP -> TP1 x DP4; with the distributed optimizer TP2 x DP2 -> DP4 and
PP2 x DP2; switched on TP2 x PP2 -> PP2 x DP2, off TP2 x DP2 -> DP4). The optimizer state
is saved per parameter in model space: megatron's regular form without the distributed
optimizer, `fully_reshardable` with it (gathered to DP rank 0 of each model-parallel group
at save, over gloo without CUDA; every rank reads what it needs at load); a checkpoint of
the other form is converted at load (`dist_optim_state`: same moments, master weights and
step moved). What may not: the model, the data. Two megatron-core 0.16.1 gaps with torch's
Adam (no apex/TE) are bridged at load: the fully_reshardable loader wants a per-parameter
'step' the file does not hold, and load_state_dict gives every parameter one shared 'step'
tensor that foreach Adam would advance once per parameter (resumed runs drifted by 1e-3
from the second step on): `dist_optim_state.patch_set_states` / `own_step_tensors`.
Asynchronous saves: `async_checkpoint.AsyncSaver(format="dist")` (the helpers
`make_engine_dirs`, `write_extras`, `rank_files`, `manifest_extra` are shared with it).

Collectives: megatron's save and load run theirs on the default group (megatron-core
0.16.1 takes no group there), so format dist needs the training layout to be the whole
world (`require_whole_world`: refused in one line otherwise); Nova's own barriers run on
`ps.layout_group` and the shared files are written by `ps.first_rank`.

Loading verifies the CRC of every file of the checkpoint, split over the ranks
(`verify_for_rank`); the per-rank RNG file of a rank that did not exist when it was saved
(more ranks now) is rank 0's. Nothing is unpickled from disk beyond what an allow-list
admits (`check_dcp_dir`, before megatron or torch read the directory): DCP's `.metadata`
through an allow-list unpickler, every DCP byte item (which DCP itself reads with
weights_only=False) and every *.pt (common.pt, rng files) through
torch.load(weights_only=True).
"""

from __future__ import annotations

import io
import json
import os
import pickle
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
from nova_engine.train.checkpoint_parts import unpickling_reason
from nova_engine.train.dist_optim_state import (
    DOPT_METADATA,
    OPT_METADATA,
    gloo_dp_groups,
    init_optimizer_state,
    own_step_tensors,
    patch_set_states,
    switch_requests,
    switched_state,
)
from nova_engine.train.optim import dp_sharded

logger = get_logger(__name__)

FORMAT = "dist"
LOOP_FILE = "loop.json"
DOPT_KEY = "distributed_optimizer"  # manifest extra: engine -> saved with it
_SWITCH_KEY = "optimizer_switched"  # load-time key of the converted optimizer tensors


def _dist_dir(name: str) -> str:
    return f"dist_{name}"


def _rng_file(rank: int) -> str:
    return f"rng_{rank:05d}.pt"


def policy_ps(loop):
    return next(iter(loop.engines.values())).ps


def require_whole_world(ps) -> None:
    """Format dist needs the training layout to be the whole world: megatron-core 0.16.1's
    dist_checkpointing runs its collectives on the default group (no group argument)."""
    if dist.is_initialized() and ps.world_size != dist.get_world_size():
        raise CheckpointIOError(
            f"checkpoint.format=dist: the training layout spans {ps.world_size} of the world's "
            f"{dist.get_world_size()} ranks, and megatron-core 0.16.1's dist_checkpointing runs "
            "collectives on the whole world; use checkpoint.format=torch for this run"
        )


def barrier(ps) -> None:
    """A barrier over the training layout (`ps.layout_group`; None = the world)."""
    if ps.world_size > 1:
        dist.barrier(group=ps.layout_group)


def _global_rank() -> int:  # megatron names a rank's shard files by its global rank
    return dist.get_rank() if dist.is_initialized() else 0


def sharded_state(engine, *, is_loading: bool) -> dict[str, Any]:
    """The engine's megatron sharded state dict: {"model" | "model<i>": chunk's, "optimizer"}
    (the optimizer's needs the model's, to key its moments by parameter)."""
    if not is_loading:
        engine.sync_params()
    chunks = engine.chunks
    if len(chunks) == 1:
        model = {"model": chunks[0].sharded_state_dict()}
    else:
        model = {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
    out: dict[str, Any] = dict(model)
    if engine.optimizer is not None:
        metadata: dict[str, Any] = dict(OPT_METADATA)
        if dp_sharded(engine.optimizer):
            metadata = dict(DOPT_METADATA)
            # without CUDA: gather over the gloo DP group to DP rank 0 (megatron's NCCL
            # all_gather path moves the shards to the GPU)
            if not torch.cuda.is_available():
                metadata["distrib_optim_fully_reshardable_mem_efficient"] = True
                gloo_dp_groups(engine.optimizer)
        if is_loading:
            init_optimizer_state(engine.optimizer)
        # nested, not merged: the chunks of virtual stages share local keys ("decoder.layers.0")
        out["optimizer"] = engine.optimizer.sharded_state_dict(
            model, is_loading=is_loading, metadata=metadata
        )
    return out


def _save_strategy(engine, strategy=None):
    """torch_dist (or `strategy`, a torch_dist one), wrapped to split the writing over DP
    replicas (fully parallel save)."""
    from megatron.core.dist_checkpointing.serialization import (
        get_default_save_sharded_strategy,
    )
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    if strategy is None:
        strategy = get_default_save_sharded_strategy("torch_dist")
    if engine.ps.dp > 1:
        dp_group = engine.ps.pg_collection.dp if engine.ps.pg_collection is not None else None
        if dp_group is not None:
            strategy = FullyParallelSaveStrategyWrapper(strategy, dp_group)
    return strategy


def loop_state(loop) -> dict[str, Any]:
    """What loop.json holds (JSON: the step, the data position, the LR schedules)."""
    return {
        "step": int(loop.step),
        "data": loop.data.state_dict() if loop.data is not None else None,
        "schedulers": {
            n: (e.scheduler.state_dict() if e.scheduler is not None else None)
            for n, e in loop.trainable.items()
        },
    }


def rank_files(out: str, ps) -> list[str]:
    """This rank's files of a saved `dist_<engine>/` directory: its shards, and on the
    layout's first rank the shared files (.metadata, common.pt, metadata.json)."""
    mine, first = f"__{_global_rank()}_", ps.rank == ps.first_rank
    return [
        os.path.join(out, n)
        for n in os.listdir(out)
        if n.startswith(mine) or (first and not n.startswith("__"))
    ]


def make_engine_dirs(tmp: str, loop, ps) -> dict[str, str]:
    """Create `dist_<engine>/` in the temp dir (first rank, then a barrier): engine -> path."""
    dirs = {name: os.path.join(tmp, _dist_dir(name)) for name in loop.trainable}
    if ps.rank == ps.first_rank:
        for d in dirs.values():
            os.makedirs(d, exist_ok=True)
    barrier(ps)
    return dirs


def write_extras(
    tmp: str, loop, ps, state: dict[str, Any], *, hf: bool, hf_extras: Any = None
) -> list[str]:
    """The small files of a dist checkpoint (this rank's RNG file, loop.json on the first
    rank) and with hf=True the hf/ exports (a gather: collective); the paths written."""
    written = [os.path.join(tmp, _rng_file(ps.rank))]
    torch.save(_rng_state(), written[0])
    first = ps.rank == ps.first_rank
    if first:
        written.append(os.path.join(tmp, LOOP_FILE))
        with open(written[-1], "w") as f:
            json.dump(state, f, indent=1, sort_keys=True)
    if hf:
        for name, e in loop.trainable.items():
            out = os.path.join(tmp, _hf_dir(loop, name))
            e.export_hf(out)
            if first:
                if hf_extras is not None:
                    hf_extras(out)
                written += [os.path.join(out, f) for f in os.listdir(out)]
    return written


def manifest_extra(loop, extra: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest's `extra` of a dist checkpoint: format, layouts, distributed optimizer."""
    layouts = {n: _layout(e.ps) for n, e in loop.trainable.items()}
    return {
        "format": FORMAT,
        "layout": next(iter(layouts.values()), _layout(policy_ps(loop))),
        "engines": layouts,
        DOPT_KEY: {n: dp_sharded(e.optimizer) for n, e in loop.trainable.items()},
        **(extra or {}),
    }


def save_dist_checkpoint(
    root: str | os.PathLike,
    loop,
    *,
    config_hash: str | None = None,
    hf: bool = False,
    extra: dict[str, Any] | None = None,
    hf_extras: Any = None,
) -> str:
    """Write `<root>/step_<loop.step>` in format `dist` on all ranks (collective)."""
    from megatron.core import dist_checkpointing as dc

    ps = policy_ps(loop)
    require_whole_world(ps)
    state = loop_state(loop)
    json.dumps(state)  # fails here, before anything is written, if not JSON-able

    def write(tmp: str) -> list[str]:
        written = []
        for name, out in make_engine_dirs(tmp, loop, ps).items():
            e = loop.trainable[name]
            dc.save(sharded_state(e, is_loading=False), out, sharded_strategy=_save_strategy(e))
            written += rank_files(out, ps)
        return written + write_extras(tmp, loop, ps, state, hf=hf, hf_extras=hf_extras)

    path = checkpoint_io.write_checkpoint_dir(
        checkpoint_io.checkpoint_dir_for(root, loop.step),
        write,
        step=loop.step,
        config_hash=config_hash,
        extra=manifest_extra(loop, extra),
        rank=ps.rank - ps.first_rank,
        barrier=(lambda: barrier(ps)) if ps.world_size > 1 else None,
        overwrite=True,
    )
    barrier(ps)
    logger.info("saved checkpoint %s (format dist)", path)
    return path


def is_dist(manifest: dict[str, Any]) -> bool:
    return (manifest.get("extra") or {}).get("format") == FORMAT


def _files_to_check(manifest: dict[str, Any], loop) -> list[str]:
    names = {_dist_dir(n) for n in loop.trainable}
    return sorted(
        r for r in manifest["files"] if r.split("/")[0] in names or r == LOOP_FILE or
        r.startswith("rng_")
    )  # fmt: skip


def verify_for_rank(path: str, loop) -> str | None:
    """None if this rank's share of the checkpoint's files (every file, split over the
    ranks: any rank may read any shard after a layout change) passes the size and CRC
    checks, else the reason. Call on every rank and agree (runner.all_ok)."""
    ps = policy_ps(loop)
    share = slice(ps.rank - ps.first_rank, None, ps.world_size)
    try:
        require_whole_world(ps)
        manifest = checkpoint_io.read_manifest(path)
        checkpoint_io.verify_checksums(path, _files_to_check(manifest, loop)[share])
        for name in loop.trainable:
            check_dcp_dir(os.path.join(path, _dist_dir(name)))
    except CheckpointIOError as e:
        return str(e)
    return None


# classes a DCP .metadata pickle may name (torch.distributed.checkpoint's metadata types)
_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in (
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.planner", n)
    for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadItemType")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # a layout by its name, as weights_only admits
    ("torch", "Size"),
    ("torch", "float32"), ("torch", "float16"), ("torch", "bfloat16"), ("torch", "float64"),
    ("torch", "int64"), ("torch", "int32"), ("torch", "int8"), ("torch", "uint8"),
    ("torch", "bool"), ("torch", "strided"), ("torch", "contiguous_format"),
    ("torch", "preserve_format"), ("torch", "channels_last"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
}  # fmt: skip


class _Refused(pickle.UnpicklingError):
    """A class outside the allow-list."""


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise _Refused(f"{module}.{name} is not allowed")
        return super().find_class(module, name)


def check_dcp_metadata(path: str) -> Any:
    """Refuse (CheckpointIOError, one line) a DCP `.metadata` that names anything but
    torch.distributed.checkpoint's metadata types: torch unpickles it without restriction.
    Returns the metadata (unpickled by the allow-list unpickler)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointIOError(f"{path}: unreadable ({e})") from None
    try:
        return _AllowListUnpickler(io.BytesIO(data)).load()
    except _Refused as e:
        raise CheckpointIOError(
            f"{path}: refused: it names objects other than checkpoint metadata, and loading "
            f"them could run code ({str(e).splitlines()[0][:200]})"
        ) from None
    except Exception as e:  # noqa: BLE001 - truncated / garbage bytes
        raise CheckpointIOError(f"{path}: unreadable metadata ({type(e).__name__}: {e})") from None


def check_dcp_dir(d: str) -> Any:
    """Refuse (CheckpointIOError, one line naming the file) a megatron dist_checkpointing
    directory that holds a pickle able to run code, before megatron or torch reads it:
    `.metadata` through the allow-list unpickler; every byte item it lists (megatron's
    ShardedObjects, e.g. layers' `_extra_state`, which DCP reads back with
    `torch.load(weights_only=False)`) and every `*.pt` (common.pt) through
    `torch.load(weights_only=True)`. Returns the DCP metadata."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta = check_dcp_metadata(os.path.join(d, ".metadata"))
    kinds = getattr(meta, "state_dict_metadata", None)
    storage = getattr(meta, "storage_data", None)
    if not isinstance(kinds, dict) or not isinstance(storage, dict):
        raise CheckpointIOError(f"{os.path.join(d, '.metadata')}: not a DCP metadata file")
    for index, info in storage.items():
        if not isinstance(kinds.get(getattr(index, "fqn", None)), BytesStorageMetadata):
            continue
        full = os.path.join(d, os.path.basename(str(info.relative_path)))
        try:
            with open(full, "rb") as f:
                f.seek(int(info.offset))
                blob = f.read(int(info.length))
            torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointIOError(
                f"{full}: refused: item {index.fqn} holds objects other than tensors and plain "
                f"values, and loading them could run code ({unpickling_reason(e)})"
            ) from None
        except (OSError, RuntimeError, EOFError, ValueError) as e:
            raise CheckpointIOError(
                f"{full}: unreadable item {index.fqn} ({str(e).splitlines()[0][:200]})"
            ) from None
    for name in sorted(os.listdir(d)):
        if name.endswith(".pt"):
            _load(d, name)  # weights_only=True: a pickle with code is refused in one line
    return meta


def load_dist_checkpoint(path: str | os.PathLike, loop) -> int:
    """Restore `loop` (any layout) from a format-`dist` checkpoint; returns its step."""
    from megatron.core import dist_checkpointing as dc

    path = os.fspath(path)
    manifest = checkpoint_io.read_manifest(path)
    if not is_dist(manifest):
        raise CheckpointIOError(f"{path}: not a checkpoint of format dist")
    ps = policy_ps(loop)
    require_whole_world(ps)
    rank = ps.rank
    saved_dopt = manifest["extra"].get(DOPT_KEY) or {}  # absent: written before it was allowed
    for name, e in loop.trainable.items():
        d = os.path.join(path, _dist_dir(name))
        if not os.path.isdir(d):
            raise CheckpointIOError(f"{path}: no {_dist_dir(name)}/ for engine {name!r}")
        meta = check_dcp_dir(d)
        sd = sharded_state(e, is_loading=True)
        was, now = bool(saved_dopt.get(name, False)), dp_sharded(e.optimizer)
        switch = e.optimizer is not None and was != now
        if switch:  # parallel.distributed_optimizer changed: the other form's state
            opt_sd = sd.pop("optimizer")
            sd[_SWITCH_KEY] = switch_requests(opt_sd, set(meta.state_dict_metadata), d)
        loaded = dc.load(sd, d)
        chunks = e.chunks
        for i, c in enumerate(chunks):
            c.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"])
        if e.optimizer is not None:
            opt_state = loaded["optimizer"]
            if switch:
                opt_state = switched_state(
                    e.optimizer, opt_sd, loaded[_SWITCH_KEY], loaded["optimizer"], d
                )
                logger.info(
                    "engine %s: optimizer state converted (saved with "
                    "parallel.distributed_optimizer=%s, this run %s)",
                    name, str(was).lower(), str(now).lower(),
                )  # fmt: skip
            if now:
                patch_set_states(e.optimizer)
            e.optimizer.load_state_dict(opt_state)
            own_step_tensors(e.optimizer)
    with open(os.path.join(path, LOOP_FILE)) as f:
        state = json.load(f)
    for name, e in loop.trainable.items():
        sched = state["schedulers"].get(name)
        if e.scheduler is not None and sched is not None:
            e.scheduler.load_state_dict(sched)
            e.scheduler.apply(e.optimizer)
    if loop.data is not None and state.get("data") is not None:
        loop.data.load_state_dict(state["data"])
    rel = _rng_file(rank)
    if rel not in manifest["files"]:
        rel = _rng_file(0)
    _set_rng_state(_load(path, rel))
    loop.step = int(state["step"])
    logger.info("resumed from %s (format dist, step %d)", path, loop.step)
    return loop.step
