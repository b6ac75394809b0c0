"""Checkpoint format `dist` (`checkpoint.format: dist`): megatron-core's dist_checkpointing
(sharded tensors in torch's distributed checkpoint format, torch_dist strategy), which resumes
into another TP x PP x DP layout with the optimizer moments.

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

What may change between runs: TP, PP and DP (tested: TP2 x PP2 -> TP1 x DP4 and PP4; with
the distributed optimizer TP2 x DP2 -> DP4 and PP2 x DP2). The optimizer state is saved per
parameter in model space: megatron's regular form without the distributed optimizer,
`fully_reshardable` with it (gathered to DP rank 0 of each model-parallel group at save,
over gloo without CUDA; every rank reads what it needs at load). What may not: the
distributed optimizer on <-> off (the two optimizers' state dicts differ in their param
groups; refused in one line naming parallel.distributed_optimizer), the model, the data.
Two megatron-core 0.16.1 gaps with torch's Adam (no apex/TE) are bridged at load: the
fully_reshardable loader wants a per-parameter 'step' the file does not hold
(`_keep_step_on_load`), and load_state_dict gives every parameter one shared 'step' tensor
that foreach Adam would advance once per parameter (`_own_step_tensors`; resumed runs drifted
by 1e-3 from the second step on). Saves are synchronous (megatron's async finalize needs
CUDA).

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
from nova_engine.train.optim import dp_sharded

logger = get_logger(__name__)

FORMAT = "dist"
LOOP_FILE = "loop.json"
_OPT_METADATA = {"distrib_optim_sharding_type": "fully_sharded_model_space"}
_DOPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
DOPT_KEY = "distributed_optimizer"  # manifest extra: engine -> saved with it


def _dist_dir(name: str) -> str:
    return f"dist_{name}"


def _rng_file(rank: int) -> str:
    return f"rng_{rank:05d}.pt"


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


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
        metadata: dict[str, Any] = dict(_OPT_METADATA)
        if dp_sharded(engine.optimizer):
            metadata = dict(_DOPT_METADATA)
            # without CUDA: gather over the gloo DP group to DP rank 0 (megatron's NCCL
            # all_gather path moves the shards to the GPU)
            if not torch.cuda.is_available():
                metadata["distrib_optim_fully_reshardable_mem_efficient"] = True
                _gloo_dp_groups(engine.optimizer)
        if is_loading:
            _init_optimizer_state(engine.optimizer)
        flat: dict[str, Any] = {}
        for sd in model.values():
            flat.update(sd)
        out["optimizer"] = engine.optimizer.sharded_state_dict(
            flat, is_loading=is_loading, metadata=metadata
        )
    return out


def _gloo_dp_groups(opt) -> None:
    """Without CUDA the DP group is a gloo group already: the distributed optimizer's
    gloo-side gather uses it when megatron built no separate gloo group."""
    from nova_engine.train.optim import _leaves

    for leaf in _leaves(opt):
        if getattr(leaf, "data_parallel_group_gloo", "absent") is None:
            leaf.data_parallel_group_gloo = leaf.data_parallel_group


def _keep_step_on_load(opt) -> None:
    """megatron-core 0.16.1, torch Adam (no apex/TE), fully_reshardable load: the optimizer's
    per-parameter 'step' is restored from the param groups by load_state_dict, but the
    per-parameter copy (`_set_main_param_and_optimizer_states`) wants a 'step' tensor from
    the file too, which fully_reshardable does not hold: hand it the restored one."""
    from nova_engine.train.optim import _leaves

    for leaf in _leaves(opt):
        if getattr(leaf.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
            continue
        orig = leaf._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, leaf=leaf, orig=orig):
            g, i = leaf.model_param_group_index_map[model_param]
            state = leaf.optimizer.state[leaf.optimizer.param_groups[g]["params"][i]]
            if "step" in state and "step" not in tensors:
                tensors = {**tensors, "step": state["step"]}
            orig(model_param, tensors)

        leaf._set_main_param_and_optimizer_states = set_states


def _own_step_tensors(opt) -> None:
    """Give every parameter's Adam 'step' a tensor of its own: megatron's load_state_dict
    (no apex/TE) sets one shared tensor for all of them, which torch's foreach Adam then
    increments once per parameter per step (the bias correction drifts from the second
    step after a resume on)."""
    from nova_engine.train.optim import _leaves

    for leaf in _leaves(opt):
        seen: set[int] = set()
        for st in leaf.optimizer.state.values():
            step = st.get("step")
            if isinstance(step, torch.Tensor):
                if id(step) in seen:
                    st["step"] = step.clone()
                seen.add(id(st["step"]))


def _init_optimizer_state(opt) -> None:
    """Zero Adam moments and step for a not-yet-stepped optimizer, so its state dict has
    the shape of a saved one (the distributed optimizer's state_dict reads every
    parameter's 'step' when neither apex nor TE provides the fused Adam)."""
    from nova_engine.train.optim import _leaves

    for leaf in _leaves(opt):
        inner = leaf.optimizer
        if getattr(leaf, "init_state_fn", None) is not None:
            leaf.init_state_fn(inner, leaf.config)
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p].setdefault("step", torch.zeros((), dtype=torch.float32))


def _save_strategy(engine):
    """torch_dist, wrapped to split the writing over DP replicas (fully parallel save)."""
    from megatron.core.dist_checkpointing.serialization import (
        get_default_save_sharded_strategy,
    )
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

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

    rank, world = _world()
    ps = next(iter(loop.engines.values())).ps
    final = checkpoint_io.checkpoint_dir_for(root, loop.step)
    layouts = {n: _layout(e.ps) for n, e in loop.trainable.items()}
    state = loop_state(loop)
    json.dumps(state)  # fails here, before anything is written, if not JSON-able

    def write(tmp: str) -> list[str]:
        written = []
        for name, e in loop.trainable.items():
            out = os.path.join(tmp, _dist_dir(name))
            if rank == 0:
                os.makedirs(out, exist_ok=True)
            _barrier()
            dc.save(sharded_state(e, is_loading=False), out, sharded_strategy=_save_strategy(e))
            for n in os.listdir(out):  # this rank's shards; rank 0 also the shared files
                if n.startswith(f"__{rank}_") or (rank == 0 and not n.startswith("__")):
                    written.append(os.path.join(out, n))
        path = os.path.join(tmp, _rng_file(rank))
        torch.save(_rng_state(), path)
        written.append(path)
        if rank == 0:
            path = os.path.join(tmp, LOOP_FILE)
            with open(path, "w") as f:
                json.dump(state, f, indent=1, sort_keys=True)
            written.append(path)
        if hf:
            for name, e in loop.trainable.items():
                out = os.path.join(tmp, _hf_dir(loop, name))
                e.export_hf(out)
                if rank == 0:
                    if hf_extras is not None:
                        hf_extras(out)
                    written += [os.path.join(out, f) for f in os.listdir(out)]
        return written

    path = checkpoint_io.write_checkpoint_dir(
        final,
        write,
        step=loop.step,
        config_hash=config_hash,
        extra={
            "format": FORMAT,
            "layout": next(iter(layouts.values()), _layout(ps)),
            "engines": layouts,
            DOPT_KEY: {n: dp_sharded(e.optimizer) for n, e in loop.trainable.items()},
            **(extra or {}),
        },
        rank=rank,
        barrier=_barrier if world > 1 else None,
        overwrite=True,
    )
    _barrier()
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
    rank, world = _world()
    try:
        manifest = checkpoint_io.read_manifest(path)
        checkpoint_io.verify_checksums(path, _files_to_check(manifest, loop)[rank::world])
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


def check_dcp_dir(d: str) -> None:
    """Refuse (CheckpointIOError, one line naming the file) a megatron dist_checkpointing
    directory that holds a pickle able to run code, before megatron or torch reads it:
    `.metadata` through the allow-list unpickler; every byte item it lists (megatron's
    ShardedObjects, e.g. layers' `_extra_state`, which DCP reads back with
    `torch.load(weights_only=False)`) and every `*.pt` (common.pt) through
    `torch.load(weights_only=True)`."""
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


def load_dist_checkpoint(path: str | os.PathLike, loop) -> int:
    """Restore `loop` (any layout) from a format-`dist` checkpoint; returns its step."""
    from megatron.core import dist_checkpointing as dc

    path = os.fspath(path)
    manifest = checkpoint_io.read_manifest(path)
    if not is_dist(manifest):
        raise CheckpointIOError(f"{path}: not a checkpoint of format dist")
    rank, _ = _world()
    saved_dopt = manifest["extra"].get(DOPT_KEY) or {}  # absent: written before it was allowed
    for name, e in loop.trainable.items():
        d = os.path.join(path, _dist_dir(name))
        if not os.path.isdir(d):
            raise CheckpointIOError(f"{path}: no {_dist_dir(name)}/ for engine {name!r}")
        was, now = bool(saved_dopt.get(name, False)), dp_sharded(e.optimizer)
        if e.optimizer is not None and was != now:
            raise CheckpointIOError(
                f"{path}: engine {name!r} was saved with parallel.distributed_optimizer="
                f"{str(was).lower()}, this run has {str(now).lower()}: format dist resumes into "
                "another TP/PP/DP layout, not across that switch (megatron-core 0.16.1's two "
                f"optimizer state layouts differ); rerun with parallel.distributed_optimizer="
                f"{str(was).lower()}"
            )
        check_dcp_dir(d)
        sd = sharded_state(e, is_loading=True)
        loaded = dc.load(sd, d)
        chunks = e.chunks
        for i, c in enumerate(chunks):
            c.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"])
        if e.optimizer is not None:
            if dp_sharded(e.optimizer):
                _keep_step_on_load(e.optimizer)
            e.optimizer.load_state_dict(loaded["optimizer"])
            _own_step_tensors(e.optimizer)
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
