"""Atomic checkpoint directories: a write that raises, a writer killed mid-write, and a crash
between the marker and the rename never yield a checkpoint `latest_complete` picks up;
truncated files and broken markers are rejected; retention; several gloo ranks writing shards
into one checkpoint."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from nova_engine.parallel.spawn import run_distributed
from nova_engine.train import checkpoint_io as cio
from nova_engine.train.checkpoint_io import (
    CheckpointIOError,
    checkpoint_dir_for,
    cleanup_stale,
    is_complete,
    latest_complete,
    list_complete,
    prune,
    read_manifest,
    write_checkpoint_dir,
)


def _writer(payload: bytes):
    def write(tmp):
        with open(os.path.join(tmp, "model.bin"), "wb") as f:
            f.write(payload)
        os.makedirs(os.path.join(tmp, "optim"))
        with open(os.path.join(tmp, "optim", "shard0.bin"), "wb") as f:
            f.write(payload * 2)

    return write


def test_write_and_find(tmp_path):
    root = tmp_path / "ckpt"
    assert latest_complete(root) is None
    p1 = write_checkpoint_dir(
        checkpoint_dir_for(root, 1), _writer(b"abc"), step=1, config_hash="h1", extra={"epoch": 0}
    )
    p2 = write_checkpoint_dir(checkpoint_dir_for(root, 20), _writer(b"defg"), step=20)
    assert p1 == str(root / "step_00000001")
    assert latest_complete(root) == p2
    m = read_manifest(p1)
    assert m["step"] == 1 and m["config_hash"] == "h1" and m["extra"] == {"epoch": 0}
    assert m["files"] == {"model.bin": 3, "optim/shard0.bin": 6}
    assert sorted(os.listdir(root)) == ["step_00000001", "step_00000020"]  # no temp, no .pending
    with pytest.raises(CheckpointIOError, match="already exists"):
        write_checkpoint_dir(p1, _writer(b"x"), step=1)
    write_checkpoint_dir(p1, _writer(b"xy"), step=1, overwrite=True)
    assert read_manifest(p1)["files"]["model.bin"] == 2
    assert [s for s, _ in list_complete(root)] == [1, 20]


def test_write_fn_raising_leaves_nothing(tmp_path):
    root = tmp_path / "ckpt"
    good = write_checkpoint_dir(checkpoint_dir_for(root, 1), _writer(b"ok"), step=1)

    def boom(tmp):
        _writer(b"partial")(tmp)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_checkpoint_dir(checkpoint_dir_for(root, 2), boom, step=2)
    assert os.listdir(root) == ["step_00000001"]
    assert latest_complete(root) == good


def test_crash_between_marker_and_rename(tmp_path, monkeypatch):
    """The marker is written inside the temp dir: a crash before the rename leaves a temp
    with a valid-looking marker, which is still never picked up."""
    root = tmp_path / "ckpt"
    good = write_checkpoint_dir(checkpoint_dir_for(root, 1), _writer(b"ok"), step=1)
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in os.path.basename(os.fspath(src)) and os.path.isdir(src):
            raise KeyboardInterrupt("killed before the rename")
        return real_replace(src, dst)

    monkeypatch.setattr(cio.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint_dir(
            checkpoint_dir_for(root, 2), _writer(b"new"), step=2, barrier=lambda: None
        )
    monkeypatch.undo()
    temps = [n for n in os.listdir(root) if ".tmp-" in n]
    assert len(temps) == 1 and os.path.exists(root / temps[0] / "COMPLETE")
    assert json.load(open(root / temps[0] / "COMPLETE"))["step"] == 2
    assert latest_complete(root) == good
    assert not is_complete(root / temps[0])
    removed = cleanup_stale(root)
    assert sorted(os.path.basename(p) for p in removed) == sorted(
        [temps[0], "step_00000002.pending"]
    )
    assert os.listdir(root) == ["step_00000001"]


KILLED_WRITER = textwrap.dedent("""
    import os, sys, time
    from nova_engine.train.checkpoint_io import write_checkpoint_dir
    def write(tmp):
        with open(os.path.join(tmp, "model.bin"), "wb") as f:
            f.write(b"x" * 1000)
            f.flush()
            open(sys.argv[2], "w").close()  # tell the parent we are mid-write
            time.sleep(60)
    write_checkpoint_dir(sys.argv[1], write, step=2)
""")


def test_killed_writer_never_complete(tmp_path):
    root = tmp_path / "ckpt"
    good = write_checkpoint_dir(checkpoint_dir_for(root, 1), _writer(b"ok"), step=1)
    flag = tmp_path / "mid-write"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, checkpoint_dir_for(root, 2), str(flag)]
    )
    try:
        deadline = time.time() + 60
        while not flag.exists():
            assert proc.poll() is None and time.time() < deadline, "writer died early"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert any(".tmp-" in n for n in os.listdir(root))
    assert latest_complete(root) == good
    # the next writer of that step removes the stale temp itself and succeeds
    p2 = write_checkpoint_dir(checkpoint_dir_for(root, 2), _writer(b"two"), step=2)
    assert latest_complete(root) == p2
    assert sorted(os.listdir(root)) == ["step_00000001", "step_00000002"]


def test_damaged_checkpoints_rejected(tmp_path):
    root = tmp_path / "ckpt"
    p1 = write_checkpoint_dir(checkpoint_dir_for(root, 1), _writer(b"one"), step=1)
    p2 = write_checkpoint_dir(checkpoint_dir_for(root, 2), _writer(b"two"), step=2)
    with open(os.path.join(p2, "model.bin"), "r+b") as f:
        f.truncate(1)
    with pytest.raises(CheckpointIOError, match=r"file model.bin has 1 bytes, COMPLETE says 3"):
        read_manifest(p2)
    assert latest_complete(root) == p1 and latest_complete(root, verify=False) == p2
    with open(os.path.join(p2, "model.bin"), "wb") as f:
        f.write(b"TWO")  # right size again (content is not hashed)
    assert is_complete(p2)
    os.remove(os.path.join(p2, "optim", "shard0.bin"))
    with pytest.raises(CheckpointIOError, match="optim/shard0.bin listed in COMPLETE is missing"):
        read_manifest(p2, verify=True)
    with open(os.path.join(p1, "COMPLETE"), "w") as f:
        f.write('{"step": 1, "fil')
    with pytest.raises(CheckpointIOError, match="unreadable marker"):
        read_manifest(p1)
    os.remove(os.path.join(p1, "COMPLETE"))
    with pytest.raises(CheckpointIOError, match="no COMPLETE marker"):
        read_manifest(p1)
    assert latest_complete(root) is None


def test_prune_keeps_newest(tmp_path):
    root = tmp_path / "ckpt"
    paths = [
        write_checkpoint_dir(checkpoint_dir_for(root, s), _writer(b"s"), step=s)
        for s in (5, 10, 15, 20)
    ]
    os.makedirs(root / "not_a_checkpoint")
    assert prune(root, 0) == []
    assert prune(root, 2) == paths[:2]
    assert sorted(os.listdir(root)) == ["not_a_checkpoint", "step_00000015", "step_00000020"]
    assert latest_complete(root) == paths[-1]


def _dist_checks(rank, world, root):
    import torch
    import torch.distributed as dist

    def write(tmp):
        path = os.path.join(tmp, f"shard_{rank}.pt")
        torch.save({"rank": rank, "w": torch.full((rank + 2,), float(rank))}, path)
        return [path]

    out = write_checkpoint_dir(
        checkpoint_dir_for(root, 3), write, step=3, rank=rank, barrier=dist.barrier
    )
    # every rank sees the finished checkpoint after the call
    seen = latest_complete(root)
    shards = sorted(os.listdir(out))
    return out, seen, shards


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dist") / "ckpt")
    return root, run_distributed(_dist_checks, 3, root)


@pytest.mark.slow  # spawned process group
def test_multi_rank_shards(dist_results):
    root, results = dist_results
    final = checkpoint_dir_for(root, 3)
    for out, seen, shards in results:
        assert out == final and seen == final
        assert shards == ["COMPLETE", "shard_0.pt", "shard_1.pt", "shard_2.pt"]
    m = read_manifest(final)
    assert set(m["files"]) == {"shard_0.pt", "shard_1.pt", "shard_2.pt"} and m["step"] == 3
    assert sorted(os.listdir(root)) == ["step_00000003"]
