"""Asynchronous saves (`checkpoint.async_save: true`, format `torch`): the step loop goes
on while a background thread writes the checkpoint the synchronous
`checkpoint.save_checkpoint` would write (same files, same atomic protocol, same CRCs,
byte-identical shards), from host copies staged at the call.

What runs where:
    calling thread   waits for the previous save (one in flight at a time), copies the
                     rank's state into the loop's host buffers (`checkpoint.HostBuffers`),
                     deep-copies the plain values around them (the loop mutates its own),
                     and with hf=True writes the hf/ export into a staging directory
                     `<root>/.hf-stage-<step>.tmp-` (the export is a gather: collectives on
                     the training's groups, so it stays synchronous)
    writer thread    `checkpoint_io.write_checkpoint_dir` into a temp dir (barriers on a
                     gloo group of its own, never interleaved with the training's
                     collectives), the staged hf/ moved in by rank 0, COMPLETE, rename,
                     then `on_done` (rank 0: pruning)

Extra host memory: one copy of the rank's checkpoint state (its model shard and optimizer
state, the same buffers a synchronous save uses), never more: a save first waits for the
previous one. A crash (kill -9) during the write leaves a temp directory that is never
picked up: the previous checkpoint stays the newest complete one, and `cleanup_stale`
removes the temp (and a staged hf/) at the next start. Format `dist` saves synchronously
(megatron-core 0.16.1's async finalize broadcasts on a CUDA device and its planning runs
collectives on the default group; `CheckpointConfig` refuses the combination).
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from nova_engine.logging import get_logger
from nova_engine.train import checkpoint as ck
from nova_engine.train import checkpoint_io
from nova_engine.train.checkpoint_parts import hf_dir

logger = get_logger(__name__)


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def hf_stage_dir(root: str | os.PathLike, step: int) -> str:
    """Where an async save stages its hf/ exports (a `.tmp-` name: never a checkpoint,
    removed by `checkpoint_io.cleanup_stale`)."""
    return os.path.join(os.fspath(root), f".hf-stage-{int(step):08d}.tmp-")


class AsyncSaver:
    """Asynchronous saves in format `torch` (see the module docstring).

        saver = AsyncSaver()
        saver.save(root, loop, config_hash=h, keep_last=2)   # all ranks; returns once staged
        ...                                                  # training steps
        path = saver.wait()                                  # before exit (or next save)

    `wait()` re-raises the writer's error (e.g. a full disk) on the thread that calls it.
    A synchronous `checkpoint.save_checkpoint` of the same loop stages into the same host
    buffers: call `wait()` before one while a write is pending (the runner uses one or the
    other for a whole run).
    """

    def __init__(self) -> None:
        import threading

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
        the path the checkpoint will have. keep_last: rank 0 prunes after the write;
        on_done(path): called on rank 0 by the writer after a successful write."""
        self.wait()
        rank, world = _world()
        if world > 1 and self._group is None:
            self._group = dist.new_group(backend="gloo")  # collective: every rank saves
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
        shards = {n: (ps, copy.deepcopy(s, memo)) for n, (ps, s) in shards.items()}
        layouts = {n: ck._layout(e.ps) for n, e in loop.trainable.items()}
        final = checkpoint_io.checkpoint_dir_for(root, loop.step)
        stage = hf_stage_dir(root, loop.step) if hf else None
        hf_names = [hf_dir(loop, n) for n in loop.trainable] if hf else []
        if stage is not None:
            if rank == 0:
                shutil.rmtree(stage, ignore_errors=True)
            self._barrier_main(world)
            for name, e in loop.trainable.items():
                out = os.path.join(stage, hf_dir(loop, name))
                e.export_hf(out)
                if rank == 0 and hf_extras is not None:
                    hf_extras(out)
            self._barrier_main(world)
        step, group = loop.step, self._group

        def write(tmp: str) -> list[str]:
            written = [os.path.join(tmp, ck._rank_file(rank))]
            ck._save_rank_file(state, written[0])
            for name, (ps, shard) in shards.items():
                written.append(os.path.join(tmp, ck._shard_file(name, ps)))
                ck._save_rank_file(shard, written[-1])
            if stage is not None and rank == 0:
                for name in hf_names:
                    os.replace(os.path.join(stage, name), os.path.join(tmp, name))
                    written += [
                        os.path.join(tmp, name, f) for f in os.listdir(os.path.join(tmp, name))
                    ]
            return written

        def barrier() -> None:
            dist.barrier(group=group)

        def run() -> None:
            try:
                self._path = checkpoint_io.write_checkpoint_dir(
                    final,
                    write,
                    step=step,
                    config_hash=config_hash,
                    extra={
                        "layout": next(iter(layouts.values())),
                        "engines": layouts,
                        **(extra or {}),
                    },  # fmt: skip
                    rank=rank,
                    barrier=barrier if world > 1 else None,
                    overwrite=True,
                )
                if rank == 0:
                    if stage is not None:
                        shutil.rmtree(stage, ignore_errors=True)
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

    @staticmethod
    def _barrier_main(world: int) -> None:
        if world > 1:
            dist.barrier()
