"""Asynchronous saves of format `torch` (`AsyncSaver`): the step loop goes on while a
background thread writes the checkpoint the synchronous `checkpoint.save_checkpoint` would
write (same files, same atomic protocol, same CRCs), from host copies staged at the call."""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

from nova_engine.logging import get_logger
from nova_engine.train import checkpoint as ck
from nova_engine.train import checkpoint_io

logger = get_logger(__name__)


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class AsyncSaver:
    """Asynchronous saves in format `torch`: the step loop continues while a background
    thread writes the checkpoint (same files, same atomic protocol, same CRCs).

        saver = AsyncSaver()
        saver.save(root, loop, config_hash=h, keep_last=2)   # all ranks; returns at once
        ...                                                  # training steps
        path = saver.wait()                                  # before exit (or next save)

    `save` copies the rank's state into the loop's host buffers (`checkpoint.HostBuffers`)
    on the calling thread, then hands the copies to the writer. Extra host memory is bounded
    by one copy of the rank's checkpoint state: a save first waits for the previous one
    (whose files come from the same buffers). The writer's barriers run on a gloo group of
    their own, so they never interleave with the training's collectives. A crash (kill -9)
    during the write leaves a temp directory that is never picked up: the previous
    checkpoint stays the newest complete one. No hf/ export (it needs the model's
    collectives): use a synchronous save for that.
    """

    def __init__(self) -> None:
        import threading

        self._threading = threading
        self._thread = None
        self._error: BaseException | None = None
        self._path: str | None = None
        self._group = None

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
    ) -> None:
        """Stage the state now and write `<root>/step_<loop.step>` in the background."""
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
        layouts = {n: ck._layout(e.ps) for n, e in loop.trainable.items()}
        final = checkpoint_io.checkpoint_dir_for(root, loop.step)
        step, group = loop.step, self._group

        def write(tmp: str) -> list[str]:
            written = [os.path.join(tmp, ck._rank_file(rank))]
            ck._save_rank_file(state, written[0])
            for name, (ps, shard) in shards.items():
                written.append(os.path.join(tmp, ck._shard_file(name, ps)))
                ck._save_rank_file(shard, written[-1])
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
                if rank == 0 and keep_last:
                    checkpoint_io.prune(root, keep_last)
                logger.info("saved checkpoint %s (asynchronously)", self._path)
            except BaseException as e:  # noqa: BLE001 - re-raised by wait()
                self._error = e

        self._path = None
        self._thread = self._threading.Thread(target=run, name="nova-ckpt-writer", daemon=True)
        self._thread.start()
