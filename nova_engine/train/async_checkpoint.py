"""Asynchronous saves (`checkpoint.async_save: true`): the step loop goes on while a
background thread writes the checkpoint the synchronous `checkpoint.save_checkpoint` would
write (same files, same atomic protocol, same CRCs), from host copies staged at the call.
Both formats: `AsyncSaver(format="torch")` (byte-identical shards) and
`AsyncSaver(format="dist")` (megatron-core dist_checkpointing, nova_engine.train.dist_checkpoint).

What runs where, format torch:
    calling thread   waits for the previous save (one in flight at a time), copies the
                     rank's state into the loop's host buffers (`checkpoint.HostBuffers`),
                     deep-copies the plain values around them (the loop mutates its own),
                     and with hf=True writes the hf/ export into a staging directory
                     `<root>/.hf-stage-<step>.tmp-` (the export is a gather: collectives on
                     the training's groups, so it stays synchronous)
    writer thread    `checkpoint_io.write_checkpoint_dir` into a temp dir, the staged hf/
                     moved in by the first rank, COMPLETE, rename, then `on_done` (first
                     rank: pruning)

Format dist:
    calling thread   waits for the previous save, creates the temp dir
                     (`checkpoint_io.begin_checkpoint_dir`), and per engine runs megatron's
                     `dist_checkpointing.save(..., async_sharded_save=True)`: the sharded
                     state dict, its validation and the save planning (collectives on the
                     default group, as megatron-core 0.16.1 runs them), common.pt; then
                     copies every tensor the plan will write into the host buffers (a
                     snapshot: the plan holds the live parameters and moments otherwise);
                     writes the RNG files, loop.json and with hf=True hf/ into the temp dir
    writer thread    writes the planned .distcp files from the host copies (megatron's
                     `FileSystemWriterAsync.write_preloaded_data`, in the thread: no forked
                     workers), exchanges the write results over the saver's gloo group, the
                     first rank writes DCP's .metadata and megatron's metadata.json, then
                     `checkpoint_io.finish_checkpoint_dir` (CRCs, COMPLETE, rename) and
                     `on_done`

The writer's collectives run on a gloo group of its own over the training layout's ranks
(never interleaved with the training's); the calling thread's on the layout's group
(`ps.layout_group`). Extra host memory: one copy of what the rank writes (format torch: its
model shard and optimizer state; format dist: its shards of the model and optimizer
tensors, after megatron's DP split of the writing), kept across saves, never more: a save
first waits for the previous one. A crash (kill -9) during the write leaves a temp directory
that is never picked up: the previous checkpoint stays the newest complete one, and
`cleanup_stale` removes the temp (and a staged hf/) at the next start.
"""

from __future__ import annotations

import copy
import json
import os
import queue
import shutil
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from nova_engine.logging import get_logger
from nova_engine.train import checkpoint as ck
from nova_engine.train import checkpoint_io
from nova_engine.train.checkpoint_parts import hf_dir

logger = get_logger(__name__)

FORMATS = ("torch", "dist")


def hf_stage_dir(root: str | os.PathLike, step: int) -> str:
    """Where an async save stages its hf/ exports (a `.tmp-` name: never a checkpoint,
    removed by `checkpoint_io.cleanup_stale`)."""
    return os.path.join(os.fspath(root), f".hf-stage-{int(step):08d}.tmp-")


def _layout_barrier(ps) -> None:
    if ps.world_size > 1:
        dist.barrier(group=ps.layout_group)


class AsyncSaver:
    """Asynchronous saves in format `torch` or `dist` (see the module docstring).

        saver = AsyncSaver(format="dist")
        saver.save(root, loop, config_hash=h, keep_last=2)   # all ranks; returns once staged
        ...                                                  # training steps
        path = saver.wait()                                  # before exit (or next save)

    `wait()` re-raises the writer's error (e.g. a full disk) on the thread that calls it.
    A synchronous `checkpoint.save_checkpoint` of the same loop stages into the same host
    buffers: call `wait()` before one while a write is pending (the runner uses one or the
    other for a whole run).
    """

    def __init__(self, format: str = "torch") -> None:
        import threading

        if format not in FORMATS:
            raise ValueError(f"checkpoint.format: expected one of {FORMATS}, got {format!r}")
        self.format = format
        self._threading = threading
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._path: str | None = None
        self._group = None

    @property
    def pending(self) -> bool:
        """A write is under way (or finished but not yet waited for)."""
        return self._thread is not None

    def wait(self) -> str | None:
        """Block until the write under way (if any) is done; its path, or re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return self._path

    def _writer_group(self, ps):
        """The writer thread's gloo group over the layout's ranks (created once; only the
        layout's ranks take part when it is a subset of the world)."""
        if ps.world_size > 1 and self._group is None:
            ranks = list(ps.ranks) if ps.ranks else None
            self._group = dist.new_group(
                ranks=ranks, backend="gloo", use_local_synchronization=ranks is not None
            )
        return self._group

    def save(
        self,
        root: str | os.PathLike,
        loop,
        *,
        config_hash: str | None = None,
        keep_last: int = 0,
        extra: dict[str, Any] | None = None,
        hf: bool = False,
        hf_extras: Callable[[str], None] | None = None,
        on_done: Callable[[str], None] | None = None,
    ) -> str:
        """Stage the state now and write `<root>/step_<loop.step>` in the background; returns
        the path the checkpoint will have. keep_last: the first rank prunes after the write;
        on_done(path): called on the first rank by the writer after a successful write."""
        self.wait()
        wanted = ((extra or {}).get("config") or {}).get("checkpoint", {}).get("format")
        if wanted not in (None, self.format):  # the run's config, as the runner records it
            raise checkpoint_io.CheckpointIOError(
                f"checkpoint.format={wanted} but this AsyncSaver writes format {self.format} "
                "(construct it with AsyncSaver(format=run.checkpoint.format))"
            )
        ps = ck._any_ps(loop)
        group = self._writer_group(ps)
        final = checkpoint_io.checkpoint_dir_for(root, loop.step)
        stage = self._save_dist if self.format == "dist" else self._save_torch
        finish = stage(final, root, loop, ps, config_hash, extra, hf, hf_extras)
        first = ps.rank == ps.first_rank

        def run() -> None:
            try:
                self._path = finish(
                    (lambda: dist.barrier(group=group)) if ps.world_size > 1 else None, group
                )
                if first:
                    if keep_last:
                        checkpoint_io.prune(root, keep_last)
                    if on_done is not None:
                        on_done(self._path)
                logger.info("saved checkpoint %s (asynchronously)", self._path)
            except BaseException as e:  # noqa: BLE001 - re-raised by wait()
                self._error = e

        self._path = None
        self._thread = self._threading.Thread(target=run, name="nova-ckpt-writer", daemon=True)
        self._thread.start()
        return final

    def _save_torch(self, final, root, loop, ps, config_hash, extra, hf, hf_extras) -> Callable:
        """Format torch: stage now; the returned function writes (in the writer thread)."""
        rank, first = ps.rank, ps.rank == ps.first_rank
        host = ck.host_buffers(loop)
        state = host.stage(ck.rank_state(loop), ("rank",))
        shards = {
            n: (e.ps, host.stage(ck.shard_state(e), ("shard", n)))
            for n, e in loop.trainable.items()
            if e.ps.dp_rank == 0
        }
        host.wait()
        # plain values (LR schedule, data position, param groups) copied now: the loop
        # mutates its own while the writer pickles; the tensors stay the staged buffers
        memo: dict[int, Any] = {id(b): b for b in host.buffers.values()}
        state = copy.deepcopy(state, memo)
        shards = {n: (p, copy.deepcopy(s, memo)) for n, (p, s) in shards.items()}
        layouts = {n: ck._layout(e.ps) for n, e in loop.trainable.items()}
        stage = hf_stage_dir(root, loop.step) if hf else None
        hf_names = [hf_dir(loop, n) for n in loop.trainable] if hf else []
        if stage is not None:
            if first:
                shutil.rmtree(stage, ignore_errors=True)
            _layout_barrier(ps)
            for name, e in loop.trainable.items():
                out = os.path.join(stage, hf_dir(loop, name))
                e.export_hf(out)
                if first and hf_extras is not None:
                    hf_extras(out)
            _layout_barrier(ps)
        step = loop.step

        def write(tmp: str) -> list[str]:
            written = [os.path.join(tmp, ck._rank_file(rank))]
            ck._save_rank_file(state, written[0])
            for name, (p, shard) in shards.items():
                written.append(os.path.join(tmp, ck._shard_file(name, p)))
                ck._save_rank_file(shard, written[-1])
            if stage is not None and first:
                for name in hf_names:
                    os.replace(os.path.join(stage, name), os.path.join(tmp, name))
                    written += [
                        os.path.join(tmp, name, f) for f in os.listdir(os.path.join(tmp, name))
                    ]
            return written

        def finish(barrier, _group) -> str:
            path = checkpoint_io.write_checkpoint_dir(
                final,
                write,
                step=step,
                config_hash=config_hash,
                extra={"layout": next(iter(layouts.values())), "engines": layouts, **(extra or {})},
                rank=ps.rank - ps.first_rank,
                barrier=barrier,
                overwrite=True,
            )
            if first and stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
            return path

        return finish

    def _save_dist(self, final, root, loop, ps, config_hash, extra, hf, hf_extras) -> Callable:
        """Format dist: plan and stage now; the returned function writes (writer thread)."""
        from nova_engine.train import dist_checkpoint as dck

        dck.require_whole_world(ps)
        state = dck.loop_state(loop)
        json.dumps(state)  # fails here, before anything is written, if not JSON-able
        rel = ps.rank - ps.first_rank
        tmp = checkpoint_io.begin_checkpoint_dir(
            final,
            rank=rel,
            barrier=(lambda: _layout_barrier(ps)) if ps.world_size > 1 else None,
            overwrite=True,
        )
        host = ck.host_buffers(loop)
        plans = [
            _plan_dist(e, out, host, name) for name, out in dck.make_engine_dirs(tmp, loop, ps).items()
            for e in (loop.trainable[name],)
        ]  # fmt: skip
        host.wait()
        small = dck.write_extras(tmp, loop, ps, state, hf=hf, hf_extras=hf_extras)
        manifest_extra = dck.manifest_extra(loop, extra)
        step = loop.step

        def finish(barrier, group) -> str:
            written = list(small)
            for plan in plans:
                written += _write_dist(plan, ps, group)
            return checkpoint_io.finish_checkpoint_dir(
                final, tmp, written, step=step, config_hash=config_hash, extra=manifest_extra,
                rank=rel, barrier=barrier,
            )  # fmt: skip

        return finish


def _plan_dist(engine, out: str, host, name: str) -> dict[str, Any]:
    """megatron's async save of one engine up to its plan (collective), the tensors it will
    write copied into host buffers: what `_write_dist` needs."""
    from megatron.core import dist_checkpointing as dc
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    from nova_engine.train import dist_checkpoint as dck

    class Planned(TorchDistSaveShardedStrategy):
        """torch_dist, keeping the writer and the plan's metadata of its async save."""

        captured: tuple | None = None

        def _get_save_and_finalize_callbacks(self, writer, save_state_dict_ret):
            self.captured = (writer, save_state_dict_ret)
            return super()._get_save_and_finalize_callbacks(writer, save_state_dict_ret)

    base = Planned("torch_dist", 1)
    state = dck.sharded_state(engine, is_loading=False)
    dc.save(state, out, sharded_strategy=dck._save_strategy(engine, base), async_sharded_save=True)
    assert base.captured is not None, "megatron's torch_dist async save did not plan"
    writer, (_, metadata, wrapper) = base.captured
    buckets = [
        (path, fname, (bytes_data, host.stage(tensors, ("dist", name, i))))
        for i, (path, fname, (bytes_data, tensors)) in enumerate(writer.write_buckets or [])
    ]
    return {
        "out": out, "writer": writer, "metadata": metadata, "buckets": buckets,
        "coordinator": wrapper.is_coordinator, "backend": (base.backend, base.version),
    }  # fmt: skip


def _write_dist(plan: dict[str, Any], ps, group) -> list[str]:
    """Write one engine's planned files (writer thread); the paths this rank wrote."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        FileSystemWriterAsync,
    )

    from nova_engine.train import dist_checkpoint as dck

    writer = plan["writer"]
    transforms = [writer.transforms] if hasattr(writer, "transforms") else []
    results: list = []
    error = None
    for i, bucket in enumerate(plan["buckets"]):
        done: queue.Queue = queue.Queue()
        count: queue.Queue = queue.Queue()
        count.put(i)
        FileSystemWriterAsync.write_preloaded_data(transforms, i, bucket, done, count, True)
        _, out = done.get()
        if isinstance(out, Exception):
            error = f"{bucket[0]}: {type(out).__name__}: {out}"
            break
        results.extend(out)
    # every rank learns every rank's outcome (no rank waits for a failed one)
    everyone: list = [(error, results)]
    if ps.world_size > 1:
        everyone = [None] * ps.world_size
        dist.all_gather_object(everyone, (error, results), group=group)
    failed = [e for e, _ in everyone if e is not None]
    if failed:
        raise checkpoint_io.CheckpointIOError(f"{plan['out']}: writing failed: {failed[0]}")
    if plan["coordinator"]:  # DCP's .metadata (the global plan) and megatron's metadata.json
        writer.finish(plan["metadata"], [r for _, r in everyone])
        save_config(CheckpointingConfig(*plan["backend"]), plan["out"])
    return dck.rank_files(plan["out"], ps)
