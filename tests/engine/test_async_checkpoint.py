"""`checkpoint.async_save: true` through the real entry point (`nova_engine.train.__main__`,
a world of one; issue #28): the same per-step losses and byte-identical checkpoint files as
synchronous saves; a kill -9 while an async save is in flight leaves the previous checkpoint
the newest, and the resumed run gives the uninterrupted losses; SIGTERM while saves are slow
exits with the stop step's checkpoint complete; format dist with async_save is accepted
(its saves: test_dist_checkpoint)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nova_engine.train import __main__ as train_main
from nova_engine.train import checkpoint_io as cio

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
RECIPE = os.path.join(ROOT, "recipes", "tiny_cpu.yaml")
STEPS = 5


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from nova_engine.data.synthetic import write_task
    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.data.tokenize import load_tokenizer
    from nova_engine.model.tiny import build_tiny_hf_model

    d = tmp_path_factory.mktemp("assets")
    tok = build_tiny_tokenizer(d / "tok")
    files = write_task(d / "data", n_sft=48, n_pref=4, n_eval=2, seed=3)
    model = d / "model"
    build_tiny_hf_model(
        str(model), "llama", vocab_size=len(load_tokenizer(tok)), hidden_size=32,
        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    return {"tok": str(tok), "model": str(model), **files}


def sft_args(a, out, *extra):
    return [
        "sft", "--recipe", RECIPE, f"model.hf_path={a['model']}", f"model.tokenizer_path={a['tok']}",
        "model.build=null", f"data.train_paths=[{a['sft']}]", "data.eval_paths=[]",
        "train.global_batch_size=8", f"train.max_steps={STEPS}", "train.log_every=1",
        f"train.out_dir={out}", "train.tensorboard=false", "train.save_every=1",
        "checkpoint.keep_last=10", *extra,
    ]  # fmt: skip


def losses(out) -> dict[int, float]:
    """step -> loss, the last logged value of each step (a resumed run redoes steps)."""
    got = {}
    for line in open(os.path.join(out, "metrics.jsonl")):
        m = json.loads(line)
        if "loss" in m and "step" in m:
            got[m["step"]] = m["loss"]
    return got


@pytest.fixture(scope="module")
def sync_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("sync") / "run"
    assert train_main.main(sft_args(assets, out)) == 0
    return out


def _clean_env():
    env = {**os.environ, "PYTHONPATH": ROOT, "NOVA_LOG_LEVEL": "INFO"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


# the entry point in a child whose checkpoint writer is slowed down: argv[1] the step whose
# write hangs (0: every file write sleeps argv[2] s), then the CLI's arguments
_CHILD = r"""
import sys, time
from nova_engine.train import checkpoint as ck, __main__ as train_main
hang_step, pause = int(sys.argv[1]), float(sys.argv[2])
real = ck._save_rank_file
def slow(state, path):
    real(state, path)
    if hang_step and f"step_{hang_step:08d}" in path:
        print("WRITING", path, flush=True)
        time.sleep(600)
    time.sleep(pause)
ck._save_rank_file = slow
sys.exit(train_main.main(sys.argv[3:]))
"""


def _child(args, hang_step, pause, log):
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(hang_step), str(pause), *args],
        stdout=subprocess.PIPE, stderr=log, text=True, env=_clean_env(),
    )  # fmt: skip


def test_async_run_matches_sync_losses_and_checkpoint_bytes(assets, sync_run, tmp_path, caplog):
    import logging

    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="nova_engine"):
        assert train_main.main(sft_args(assets, out, "checkpoint.async_save=true")) == 0
    assert caplog.text.count("(asynchronously)") == STEPS
    assert losses(out) == losses(sync_run) and len(losses(out)) == STEPS
    want = cio.list_complete(sync_run / "checkpoints")
    got = cio.list_complete(out / "checkpoints")
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, STEPS + 1))
    for (_, a), (_, b) in zip(got, want):
        ma, mb = cio.read_manifest(a), cio.read_manifest(b)
        assert any(f.startswith("hf/") for f in ma["files"])  # the staged hf/ export moved in
        assert ma["files"] == mb["files"]  # same files, same sizes
        assert ma["checksums"] == mb["checksums"]  # and the same bytes
        assert ma["extra"]["layout"] == mb["extra"]["layout"]
    assert not [n for n in os.listdir(out / "checkpoints") if ".tmp-" in n]  # no staging left


@pytest.mark.slow  # a child process killed with SIGKILL, then a resumed run
def test_kill_during_async_save_keeps_previous_and_resume_matches(assets, sync_run, tmp_path):
    out = tmp_path / "run"
    args = sft_args(assets, out, "checkpoint.async_save=true")
    with open(tmp_path / "stderr.txt", "w") as log:
        proc = _child(args, hang_step=3, pause=0.0, log=log)
        line = ""
        for line in proc.stdout:
            if line.startswith("WRITING"):
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert line.startswith("WRITING"), (tmp_path / "stderr.txt").read_text()[-3000:]
    assert proc.returncode == -signal.SIGKILL
    ckpts = out / "checkpoints"
    assert [s for s, _ in cio.list_complete(ckpts)] == [1, 2]  # step 3's write never finished
    assert any(".tmp-" in n for n in os.listdir(ckpts))  # its temp dir, never picked up
    killed_at = max(losses(out))
    assert killed_at >= 3  # the loop trained on while the writer hung
    assert train_main.main(args) == 0  # resume=auto: step 2's checkpoint
    assert losses(out) == losses(sync_run)  # steps 3..5 redone with the uninterrupted losses
    assert [s for s, _ in cio.list_complete(ckpts)] == list(range(1, STEPS + 1))
    assert not [n for n in os.listdir(ckpts) if ".tmp-" in n]  # cleanup_stale at the start


@pytest.mark.slow  # a child process stopped with SIGTERM
def test_sigterm_with_async_saves_exits_with_a_complete_checkpoint(assets, tmp_path):
    out = tmp_path / "run"
    args = sft_args(assets, out, "checkpoint.async_save=true", "train.max_steps=400")
    with open(tmp_path / "stderr.txt", "w") as log:
        proc = _child(args, hang_step=0, pause=1.5, log=log)  # every file write 1.5 s
        t0 = time.time()
        while time.time() - t0 < 300 and proc.poll() is None:
            if os.path.exists(out / "metrics.jsonl") and len(losses(out)) >= 2:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=240)
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    stopped = max(losses(out))
    newest = cio.latest_complete(out / "checkpoints")
    assert newest is not None and cio.read_manifest(newest)["step"] == stopped
    assert not [n for n in os.listdir(out / "checkpoints") if ".tmp-" in n]


def test_async_save_with_format_dist_accepted_and_a_bad_format_named():
    """checkpoint.async_save works with either format (AsyncSaver(format=...); the dist
    one is tested in test_dist_checkpoint: 4 ranks and a kill -9); another format is
    refused naming checkpoint.format."""
    from nova_engine.config import CheckpointConfig
    from nova_engine.train.async_checkpoint import AsyncSaver

    c = CheckpointConfig(format="dist", async_save=True)
    assert c.async_save and AsyncSaver(format=c.format).format == "dist"
    with pytest.raises(ValueError, match="checkpoint.format") as e:
        AsyncSaver(format="zip")
    assert "\n" not in str(e.value)
