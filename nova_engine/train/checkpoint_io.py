"""Atomic checkpoint directories: a crash never leaves a half checkpoint that looks whole.

Protocol of `write_checkpoint_dir(final_dir, write_fn, step=..., rank=r, barrier=b)` (all
ranks call it; with one process, leave rank/barrier at their defaults):

    rank 0   removes stale temps of final_dir, creates <final_dir>.tmp-<uuid>, and publishes
             its name in <final_dir>.pending (written atomically)
    barrier
    all      read the temp name, call write_fn(tmp_dir) (each rank writes its own shard files),
             fsync what they wrote (write_fn may return the paths; default: every file)
    barrier
    rank 0   writes the manifest (step, files with sizes, config hash, extra) to
             <tmp>/COMPLETE via COMPLETE.tmp + fsync + rename, fsyncs the directory, renames
             tmp -> final_dir, fsyncs the parent, removes the .pending file
    barrier

Integrity: after writing and fsyncing its files, every rank computes their CRC-32 (reading
them back from the page cache) into <tmp>/.checksums/rank_<r>.json; rank 0 merges these into
the manifest's "checksums" before it finalizes. `verify_checksums` recomputes the CRCs of the
files a rank is about to read, so a shard with flipped bytes (same size) is refused with its
path instead of loading silently.

A directory counts as a checkpoint only if it is not a temp (`.tmp-`), holds a COMPLETE
marker that parses, and every file the manifest lists exists with its recorded size.
`latest_complete(root)` picks the highest-step such directory; `prune(root, keep_last)`
deletes older ones (marker first, so a crash mid-delete leaves no "complete" remnant);
`cleanup_stale(root)` removes temps and .pending files of crashed writers (rank 0, at start,
while nobody writes).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from nova_engine.logging import get_logger

logger = get_logger(__name__)

MARKER = "COMPLETE"
FORMAT_VERSION = 1
_SUMS = ".checksums"
_CHUNK = 16 << 20
_TMP = ".tmp-"
_PENDING = ".pending"


class CheckpointIOError(ValueError):
    """A checkpoint directory that is missing, incomplete or inconsistent (the message says
    which path and what)."""


def checkpoint_dir_for(root: str | os.PathLike, step: int) -> str:
    """<root>/step_00000123"""
    return os.path.join(os.fspath(root), f"step_{int(step):08d}")


def _fsync_path(path: str, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. directories on platforms that cannot open them
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _walk_files(root: str) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(root):
        out += [os.path.join(dirpath, f) for f in files]
    return sorted(out)


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_crc32(path: str) -> str:
    """CRC-32 of a file's bytes, streamed in 16 MiB reads, as "crc32:<8 hex digits>"."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"crc32:{crc:08x}"


def verify_checksums(ckpt_dir: str | os.PathLike, rels: Iterable[str]) -> None:
    """Recompute the CRC of each file `rels` (relative to ckpt_dir) that the manifest has a
    checksum for; CheckpointIOError naming the file when one differs (a damaged file)."""
    ckpt_dir = os.fspath(ckpt_dir)
    sums = read_manifest(ckpt_dir).get("checksums") or {}
    for rel in rels:
        want = sums.get(rel)
        if want is None:
            continue
        got = file_crc32(os.path.join(ckpt_dir, rel))
        if got != want:
            raise CheckpointIOError(
                f"{os.path.join(ckpt_dir, rel)}: checksum mismatch ({got}, the manifest "
                f"recorded {want}): the file is damaged"
            )


def _stale_temps(final_dir: str) -> list[str]:
    parent, base = os.path.split(final_dir)
    if not os.path.isdir(parent):
        return []
    return [os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(base + _TMP)]


def write_checkpoint_dir(
    final_dir: str | os.PathLike,
    write_fn: Callable[[str], Iterable[str] | None],
    *,
    step: int,
    config_hash: str | None = None,
    extra: dict[str, Any] | None = None,
    rank: int = 0,
    barrier: Callable[[], None] | None = None,
    overwrite: bool = False,
) -> str:
    """Write a checkpoint atomically (protocol in the module docstring); returns final_dir.

    Args:
        final_dir: the checkpoint's final path (e.g. `checkpoint_dir_for(root, step)`).
        write_fn: called on every rank with the temp directory; writes that rank's files
            there and may return the paths it wrote (absolute or relative to the temp dir;
            they are fsynced; None = every file in the temp dir).
        step: recorded in the manifest (ordering of `latest_complete`).
        config_hash, extra: recorded in the manifest (extra: any JSON-able dict).
        rank: this process's rank among the writing ranks (0 creates, finalizes and
            renames; a training layout's ranks: ps.rank - ps.first_rank).
        barrier: collective barrier over the writing ranks (e.g. one on ps.layout_group)
            when several ranks write.
        overwrite: replace an existing final_dir (else CheckpointIOError).
    If write_fn raises on a single-process write, the temp directory is removed and the
    exception propagates; a crashed multi-rank write leaves a temp that is never picked up.
    """
    final_dir = os.path.abspath(os.fspath(final_dir))
    tmp_dir = begin_checkpoint_dir(final_dir, rank=rank, barrier=barrier, overwrite=overwrite)
    try:
        written = write_fn(tmp_dir)
    except BaseException:
        if barrier is None:
            abandon_checkpoint_dir(final_dir, tmp_dir)
        raise
    return finish_checkpoint_dir(
        final_dir, tmp_dir, written, step=step, config_hash=config_hash, extra=extra,
        rank=rank, barrier=barrier,
    )  # fmt: skip


def begin_checkpoint_dir(
    final_dir: str | os.PathLike,
    *,
    rank: int = 0,
    barrier: Callable[[], None] | None = None,
    overwrite: bool = False,
) -> str:
    """The first phase of `write_checkpoint_dir` (all ranks): rank 0 creates the temp dir
    and publishes it in <final_dir>.pending, barrier; returns the temp dir on every rank.
    Write into it, then `finish_checkpoint_dir` (possibly later, from another thread)."""
    final_dir = os.path.abspath(os.fspath(final_dir))
    pending = final_dir + _PENDING
    tmp_dir = None
    if rank == 0:
        if os.path.exists(final_dir) and not overwrite:
            raise CheckpointIOError(f"{final_dir}: already exists (pass overwrite=True to replace)")
        for stale in _stale_temps(final_dir):
            logger.warning("removing stale checkpoint temp %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.makedirs(os.path.dirname(final_dir), exist_ok=True)
        tmp_dir = f"{final_dir}{_TMP}{uuid.uuid4().hex[:12]}"
        os.makedirs(tmp_dir)
        with open(pending + ".tmp", "w") as f:
            f.write(os.path.basename(tmp_dir))
            f.flush()
            os.fsync(f.fileno())
        os.replace(pending + ".tmp", pending)
    if barrier is not None:
        barrier()
    if tmp_dir is None:
        with open(pending) as f:
            tmp_dir = os.path.join(os.path.dirname(final_dir), f.read().strip())
    return tmp_dir


def abandon_checkpoint_dir(final_dir: str | os.PathLike, tmp_dir: str) -> None:
    """Remove a failed write's temp dir and .pending (one process, or every rank agreed)."""
    shutil.rmtree(tmp_dir, ignore_errors=True)
    pending = os.path.abspath(os.fspath(final_dir)) + _PENDING
    if os.path.exists(pending):
        os.remove(pending)


def finish_checkpoint_dir(
    final_dir: str | os.PathLike,
    tmp_dir: str,
    written: Iterable[str] | None,
    *,
    step: int,
    config_hash: str | None = None,
    extra: dict[str, Any] | None = None,
    rank: int = 0,
    barrier: Callable[[], None] | None = None,
) -> str:
    """The last phase of `write_checkpoint_dir` (all ranks, once each wrote its files into
    tmp_dir): fsync and CRC the rank's `written` files (None: every file), barrier, rank 0
    writes COMPLETE and renames, barrier; returns final_dir."""
    final_dir = os.path.abspath(os.fspath(final_dir))
    pending = final_dir + _PENDING
    sync = barrier or (lambda: None)
    try:
        paths = _walk_files(tmp_dir) if written is None else written
        sums = {}
        for path in paths:
            full = os.path.join(tmp_dir, os.fspath(path))
            _fsync_path(full)
            sums[os.path.relpath(full, tmp_dir)] = file_crc32(full)
        os.makedirs(os.path.join(tmp_dir, _SUMS), exist_ok=True)
        _write_json_atomic(os.path.join(tmp_dir, _SUMS, f"rank_{rank:05d}.json"), sums)
    except BaseException:
        if barrier is None:
            abandon_checkpoint_dir(final_dir, tmp_dir)
        raise
    sync()
    if rank == 0:
        checksums: dict[str, str] = {}
        sums_dir = os.path.join(tmp_dir, _SUMS)
        for name in sorted(os.listdir(sums_dir)):
            with open(os.path.join(sums_dir, name)) as f:
                checksums.update(json.load(f))
        shutil.rmtree(sums_dir)
        files = {
            os.path.relpath(p, tmp_dir): os.path.getsize(p)
            for p in _walk_files(tmp_dir)
            if os.path.basename(p) not in (MARKER, MARKER + ".tmp")
        }
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "config_hash": config_hash,
            "files": files,
            "checksums": {k: v for k, v in sorted(checksums.items()) if k in files},
            "created": time.time(),
            "extra": extra or {},
        }
        _write_json_atomic(os.path.join(tmp_dir, MARKER), manifest)
        for d, _, _ in os.walk(tmp_dir):
            _fsync_path(d, directory=True)
        old = None
        if os.path.exists(final_dir):  # overwrite=True
            old = f"{final_dir}.old-{uuid.uuid4().hex[:12]}"
            os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        _fsync_path(os.path.dirname(final_dir), directory=True)
        if old is not None:
            remove_checkpoint(old)
        if os.path.exists(pending):
            os.remove(pending)
    sync()
    return final_dir


def read_manifest(ckpt_dir: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """The COMPLETE manifest of a checkpoint; CheckpointIOError if the directory is not a
    complete checkpoint (with `verify`: every listed file present with its recorded size)."""
    ckpt_dir = os.fspath(ckpt_dir)
    path = os.path.join(ckpt_dir, MARKER)
    if _TMP in os.path.basename(ckpt_dir):
        raise CheckpointIOError(f"{ckpt_dir}: a temporary directory of an unfinished write")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise CheckpointIOError(f"{ckpt_dir}: no {MARKER} marker (an unfinished write?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointIOError(f"{path}: unreadable marker ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointIOError(f"{path}: expected a manifest with a 'files' mapping")
    if not isinstance(manifest.get("step"), int):
        raise CheckpointIOError(f"{path}: expected an integer 'step'")
    if verify:
        for rel, size in manifest["files"].items():
            p = os.path.join(ckpt_dir, rel)
            if not os.path.isfile(p):
                raise CheckpointIOError(f"{ckpt_dir}: file {rel} listed in {MARKER} is missing")
            if os.path.getsize(p) != size:
                raise CheckpointIOError(
                    f"{ckpt_dir}: file {rel} has {os.path.getsize(p)} bytes, {MARKER} says {size}"
                )
    return manifest


def is_complete(ckpt_dir: str | os.PathLike, *, verify: bool = True) -> bool:
    try:
        read_manifest(ckpt_dir, verify=verify)
    except CheckpointIOError:
        return False
    return True


def list_complete(root: str | os.PathLike, *, verify: bool = True) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint directly under root, oldest first."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return []
    found = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if _TMP in name or ".old-" in name or not os.path.isdir(path):
            continue
        try:
            found.append((read_manifest(path, verify=verify)["step"], path))
        except CheckpointIOError as e:
            if name.startswith("step_"):
                logger.warning("skipping checkpoint %s: %s", path, e)
            continue
    return sorted(found)


def latest_complete(root: str | os.PathLike, *, verify: bool = True) -> str | None:
    """Path of the complete checkpoint with the highest step under root, or None."""
    found = list_complete(root, verify=verify)
    return found[-1][1] if found else None


def remove_checkpoint(path: str) -> None:
    """Delete a checkpoint directory, its marker first (a crash mid-delete leaves an
    incomplete, ignored directory)."""
    marker = os.path.join(path, MARKER)
    if os.path.exists(marker):
        os.remove(marker)  # first: a crash below leaves an incomplete, ignored directory
        _fsync_path(path, directory=True)
    shutil.rmtree(path, ignore_errors=True)


def prune(root: str | os.PathLike, keep_last: int, protect: Iterable[str] = ()) -> list[str]:
    """Delete all but the newest `keep_last` complete checkpoints (0 = keep all), never one
    in `protect` (e.g. a diverged run's roll-back point); returns the deleted paths. Call
    on rank 0 after a successful write."""
    if keep_last <= 0:
        return []
    kept = {os.path.abspath(p) for p in protect}
    doomed = [
        p
        for _, p in list_complete(root, verify=False)[:-keep_last]
        if os.path.abspath(p) not in kept
    ]
    for p in doomed:
        remove_checkpoint(p)
        logger.info("removed old checkpoint %s", p)
    return doomed


def cleanup_stale(root: str | os.PathLike) -> list[str]:
    """Remove temps, half-deleted (.old-) directories and .pending files left under root by
    crashed writers; returns what was removed. Rank 0 only, while no write is under way."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return []
    removed = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if _TMP in name or ".old-" in name:
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            removed.append(path)
        elif name.endswith(_PENDING) or name.endswith(_PENDING + ".tmp"):
            os.remove(path)
            removed.append(path)
    return removed
