"""Atomic checkpoint directories: a write that raises, a writer killed mid-write, and a crash
between the marker and the rename never yield a checkpoint `latest_complete` picks up;
truncated files and broken markers are rejected; retention; several gloo ranks writing shards
into one checkpoint. Saving a training loop (DP3, plain and distributed optimizer) clones no
floating-point tensor, copies into host buffers that the next save reuses, writes the values
the live model had in the bytes the former clone-then-save code wrote, and resumes to the
uninterrupted run's losses bit for bit."""

import importlib.util
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


STEPS, SAVE_AT, GBS = 4, 2, 6


def _setup(model_dir, samples, dopt):
    from nova_engine.config import OptimConfig
    from nova_engine.parallel.state import initialize_parallel
    from nova_engine.train.data_source import PackedDataSource
    from nova_engine.train.engine import ModelEngine
    from nova_engine.train.loop import Loop
    from nova_engine.train.stages.sft import SFTStage

    ps = initialize_parallel(seed=7)
    optim = OptimConfig(lr=2e-3, weight_decay=0.01, grad_clip=1.0, schedule="cosine")
    engine = ModelEngine.from_hf(
        model_dir, ps, optim=optim, total_steps=STEPS, distributed_optimizer=dopt
    )
    data = PackedDataSource(
        samples, global_batch_size=GBS, micro_batch_tokens=64, ps=ps, seed=3, max_steps=STEPS
    )
    return Loop(engine, data), SFTStage(ps)


def _losses(hist):
    return [(h["loss"], h["grad_norm"]) for h in hist]


def _old_format_bytes(loop, checkpoint) -> dict[str, bytes]:
    """The files this rank's save wrote, as the code before host staging wrote them: the
    parameters and master weights cloned, every other tensor saved by reference."""
    import tempfile

    import torch

    def cloned(opt_state):
        if opt_state is None:
            return None
        return {"leaves": [{"torch": leaf["torch"], "main_params": [p.clone() for p in
                leaf["main_params"]]} for leaf in opt_state["leaves"]]}  # fmt: skip

    e = loop.engine()
    state = checkpoint.rank_state(loop)
    state["engines"]["policy"]["optimizer"] = cloned(state["engines"]["policy"]["optimizer"])
    files = {checkpoint._rank_file(e.ps.rank): state}
    if e.ps.dp_rank == 0:
        shard = checkpoint.shard_state(e)
        shard["model"] = [{n: p.clone() for n, p in c.items()} for c in shard["model"]]
        shard["optimizer"] = cloned(shard["optimizer"])
        files[checkpoint._shard_file("policy", e.ps)] = shard
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, obj in files.items():
            torch.save(obj, os.path.join(tmp, name))  # (the archive is named after the file)
            with open(os.path.join(tmp, name), "rb") as f:
                out[name] = f.read()
    return out


def _save_checks(rank, root, model_dir, samples):
    """Per optimizer kind: the uninterrupted losses, the saved-and-resumed ones, float clones
    during the saves, host-buffer reuse, the files' bytes against the former format, and the
    shard file against the live parameters."""
    import torch

    from nova_engine.parallel.state import destroy_parallel
    from nova_engine.train import checkpoint

    out = {}
    for dopt in (False, True):
        loop, stage = _setup(model_dir, samples, dopt)
        full = _losses(loop.fit(stage))
        destroy_parallel()
        loop, stage = _setup(model_dir, samples, dopt)
        hist = _losses(loop.fit(stage, stop_after=SAVE_AT))
        clones, real_clone = [], torch.Tensor.clone

        def counting_clone(t, *a, clones=clones, real_clone=real_clone, **k):
            if t.is_floating_point():
                clones.append(tuple(t.shape))
            return real_clone(t, *a, **k)

        ptrs, ckpts, same_bytes = [], [], []
        for stop in (SAVE_AT + 1, None):
            torch.Tensor.clone = counting_clone
            try:
                ckpts.append(checkpoint.save_checkpoint(os.path.join(root, f"d{dopt}"), loop))
            finally:
                torch.Tensor.clone = real_clone
            bufs = checkpoint.host_buffers(loop).buffers
            ptrs.append({k: v.data_ptr() for k, v in bufs.items()})
            for name, want in _old_format_bytes(loop, checkpoint).items():
                with open(os.path.join(ckpts[-1], name), "rb") as f:
                    same_bytes.append((name, f.read() == want))
            if rank == 0 and stop is None:  # the shard file holds the live parameters
                shard = torch.load(os.path.join(ckpts[-1], checkpoint._shard_file(
                    "policy", loop.engine().ps)), weights_only=False)  # fmt: skip
                live = loop.engine().model_state()
                out[("same", dopt)] = all(
                    torch.equal(shard["model"][i][n], v) and shard["model"][i][n].is_contiguous()
                    for i, c in enumerate(live) for n, v in c.items()
                )  # fmt: skip
            hist += _losses(loop.fit(stage, stop_after=stop))
        destroy_parallel()
        loop, stage = _setup(model_dir, samples, dopt)
        step = checkpoint.load_checkpoint(ckpts[0], loop)
        resumed = _losses(loop.fit(stage))
        destroy_parallel()
        out[dopt] = dict(full=full, hist=hist, resumed=resumed, step=step, clones=clones,
                         reused=ptrs[0] == ptrs[1], nbufs=len(ptrs[0]), same_bytes=same_bytes)  # fmt: skip
    return out


def _worker(rank, world, root, model_dir, samples):
    saves = _save_checks(rank, root + "-loop", model_dir, samples)
    return _dist_checks(rank, world, root), saves


def _golden_build():
    path = os.path.join(os.path.dirname(__file__), "golden", "run_golden.py")
    spec = importlib.util.spec_from_file_location("run_golden", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    cfg = dict(n_sft=30, data_seed=5, max_length=64, model_seed=0, num_hidden_layers=2)
    model_dir, samples = _golden_build()(str(base / "assets"), cfg, "chat")
    root = str(base / "ckpt")
    res = run_distributed(_worker, 3, root, model_dir, samples)
    return root, [r[0] for r in res], [r[1] for r in res]


@pytest.mark.slow  # spawned process group
def test_multi_rank_shards(dist_results):
    root, results, _ = dist_results
    final = checkpoint_dir_for(root, 3)
    for out, seen, shards in results:
        assert out == final and seen == final
        assert shards == ["COMPLETE", "shard_0.pt", "shard_1.pt", "shard_2.pt"]
    m = read_manifest(final)
    assert set(m["files"]) == {"shard_0.pt", "shard_1.pt", "shard_2.pt"} and m["step"] == 3
    assert sorted(os.listdir(root)) == ["step_00000003"]


@pytest.mark.slow  # spawned process group
@pytest.mark.parametrize("dopt", [False, True], ids=["plain", "distributed"])
def test_save_stages_into_reused_host_buffers_and_resumes_exactly(dist_results, dopt):
    _, _, saves = dist_results
    for rank, out in enumerate(saves):
        r = out[dopt]
        assert r["clones"] == [], r["clones"]  # no parameter / optimizer tensor cloned
        # the second save wrote into the first's buffers (rank 0: the model and optimizer;
        # the others their RNG states, and with ZeRO-1 their optimizer shards too)
        assert r["reused"] and r["nbufs"] >= (10 if rank == 0 or dopt else 3), r["nbufs"]
        # the bytes on disk are the former format's (rank file; rank 0 also the shard file)
        assert len(r["same_bytes"]) == (4 if rank == 0 else 2), r["same_bytes"]
        assert all(ok for _, ok in r["same_bytes"]), r["same_bytes"]
        assert r["step"] == SAVE_AT and len(r["full"]) == STEPS
        assert r["hist"] == r["full"]  # saving does not disturb training
        assert r["resumed"] == r["full"][SAVE_AT:]  # bit-exact resume
    assert saves[0][("same", dopt)]
