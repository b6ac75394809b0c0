"""Nothing lost, nothing silent — each case through the real entry point
(`nova_engine.train.__main__.main`, a world of one; `torchrun` for the multi-rank cases):
the exit code, the one line the user sees, and that nothing good was lost.

Covers: the NaN guard (injected non-finite gradients: updates skipped, the run stops, no non-finite checkpoint),
the divergence warnings, the run lock, the config check on resume, checksummed checkpoints
(a damaged newest checkpoint is skipped; an explicit one is refused naming the file), shape
mismatches naming file and parameter, complete and atomic HF exports (the README's
SFT -> DPO chain from the export alone), one-line errors for missing paths, empty data and
bad layouts, a full disk, SIGTERM (checkpoint at the step boundary, quiet exit, resume), and
one line once under torchrun.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from nova_engine.train import __main__ as train_main
from nova_engine.train import checkpoint_io
from nova_engine.train.safety import NonFiniteGuard, RunLock, config_diff

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
RECIPE = os.path.join(ROOT, "recipes", "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny tokenizer, a tiny Llama and the synthetic task's SFT/DPO data."""
    from nova_engine.data.synthetic import write_task
    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.data.tokenize import load_tokenizer
    from nova_engine.model.tiny import build_tiny_hf_model

    d = tmp_path_factory.mktemp("assets")
    tok = build_tiny_tokenizer(d / "tok")
    files = write_task(d / "data", n_sft=48, n_pref=16, n_eval=4, seed=3)
    model = d / "model"
    build_tiny_hf_model(
        str(model), "llama", vocab_size=len(load_tokenizer(tok)), hidden_size=32,
        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    return {"tok": str(tok), "model": str(model), **files}


def sft_args(a, out, *extra):
    return [
        "sft", "--recipe", RECIPE, f"model.hf_path={a['model']}", f"model.tokenizer_path={a['tok']}",
        "model.build=null", f"data.train_paths=[{a['sft']}]", "data.eval_paths=[]", "train.global_batch_size=8",
        "train.max_steps=3", "train.log_every=1", f"train.out_dir={out}",
        "train.tensorboard=false", "checkpoint.keep_last=3", *extra,
    ]  # fmt: skip


def run(args, capsys):
    """(exit code, the entry point's last stderr line) — logging may precede that line."""
    rc = train_main.main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    return rc, lines[-1] if lines else ""


def shards(ckpt):
    return sorted(glob.glob(os.path.join(ckpt, "mp_*.pt")))


def test_nan_guard_skips_updates_and_stops_without_a_nonfinite_checkpoint(assets, tmp_path, capsys,
                                                                          caplog, monkeypatch):  # fmt: skip
    """Non-finite gradients from update 2 on (injected: optim.lr is capped, so lr 1e30 no
    longer reaches a run): the updates are skipped (logged), two in a row stop the run with
    one line, exit 2; every checkpoint on disk holds finite weights and no final export was
    written."""
    from nova_engine.train.engine import ModelEngine

    calls = {"n": 0}
    real = ModelEngine.local_grads_finite

    def grads_finite(self):
        calls["n"] += 1
        ok = real(self)
        return ok if calls["n"] < 2 else torch.zeros_like(ok)

    monkeypatch.setattr(ModelEngine, "local_grads_finite", grads_finite)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="nova_engine"):
        rc, err = run(sft_args(assets, out, "optim.grad_clip=0",
                               "train.max_steps=8", "train.save_every=1",
                               "train.max_bad_steps=2"), capsys)  # fmt: skip
    assert rc == 2, err
    assert err.startswith("TrainingDiverged") and "consecutive" in err
    assert "update skipped" in caplog.text
    found = checkpoint_io.list_complete(out / "checkpoints")
    assert [s for s, _ in found] == [1], "the finite checkpoint was kept, nothing after it"
    for _, ckpt in found:
        for f in shards(ckpt):
            for chunk in torch.load(f, weights_only=True)["model"]:
                assert all(torch.isfinite(t).all() for t in chunk.values()), f
    assert not (out / "hf").exists()


def test_guard_warns_on_zero_gradients_and_loss_spikes(caplog):
    g = NonFiniteGuard(max_bad_steps=2, divergence_factor=5.0, zero_grad_steps=3)
    with caplog.at_level(logging.WARNING, logger="nova_engine"):
        for step in range(1, 4):
            g.ok(step, 10.4, 0.0)
        g.ok(4, 1.0, 1.0)
        g.ok(5, 100.0, 1.0)
    assert "gradient norm 0 for 3 steps" in caplog.text and "running mean" in caplog.text
    g.skip(6, "non-finite loss")
    assert not g.healthy
    g.ok(7, 1.0, 1.0)
    assert g.healthy and g.skipped == 1


def test_run_lock_refuses_a_second_run(assets, tmp_path, capsys):
    """Another live process holds out_dir: exit 2 naming its pid; once it is gone (even
    killed), the lock is free again (the kernel drops it)."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys,time; sys.path.insert(0, sys.argv[1]);"
         "from nova_engine.train.safety import RunLock; l = RunLock(sys.argv[2]); l.acquire();"
         "print('locked', flush=True); time.sleep(60)", ROOT, str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, err = run(sft_args(assets, out), capsys)
        assert rc == 2 and "in use by another run" in err and f"pid {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(str(out))
    lock.acquire()  # the dead holder left no stale lock
    lock.release()


def test_resume_refuses_a_changed_config_and_skips_a_damaged_checkpoint(assets, tmp_path,
                                                                         capsys, caplog):  # fmt: skip
    out = tmp_path / "run"
    rc, err = run(sft_args(assets, out, "train.save_every=1"), capsys)
    assert rc == 0, err
    # more steps + another learning rate: refused with the changed keys
    rc, err = run(sft_args(assets, out, "train.max_steps=4", "optim.lr=1e-4"), capsys)
    assert rc == 2 and "optim.lr" in err and "train.max_steps" in err and "force" in err
    # the newest checkpoint damaged (same size, flipped bytes): skipped with the reason
    newest = checkpoint_io.latest_complete(out / "checkpoints")
    victim = shards(newest)[0]
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) // 2)
        b = f.read(16)
        f.seek(-16, 1)
        f.write(bytes(x ^ 0xFF for x in b))
    with caplog.at_level(logging.WARNING, logger="nova_engine"):
        rc, err = run(sft_args(assets, out, "train.max_steps=4", "checkpoint.resume=force"),
                      capsys)  # fmt: skip
    assert rc == 0, err
    assert "skipping damaged checkpoint" in caplog.text and "checksum mismatch" in caplog.text
    metrics = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [m["step"] for m in metrics if "loss" in m][-2:] == [3, 4]  # steps 3-4 redone
    # an explicit damaged checkpoint: refused naming the file
    rc, err = run(sft_args(assets, out, "train.max_steps=4", f"checkpoint.resume={newest}"),
                  capsys)  # fmt: skip
    assert rc == 2 and "checksum mismatch" in err and os.path.basename(victim) in err


def test_shape_mismatch_names_file_and_parameter(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(sft_args(assets, out, "train.max_steps=1"), capsys)[0] == 0
    ckpt = checkpoint_io.latest_complete(out / "checkpoints")
    f = shards(ckpt)[0]
    state = torch.load(f, weights_only=False)
    name = next(iter(state["model"][0]))
    state["model"][0][name] = state["model"][0][name][:1].clone()
    torch.save(state, f)
    manifest = checkpoint_io.read_manifest(ckpt, verify=False)  # re-seal: size and CRC
    rel = os.path.relpath(f, ckpt)
    manifest["files"][rel] = os.path.getsize(f)
    manifest["checksums"][rel] = checkpoint_io.file_crc32(f)
    with open(os.path.join(ckpt, "COMPLETE"), "w") as fh:
        json.dump(manifest, fh)
    rc, err = run(sft_args(assets, out, "train.max_steps=2", "checkpoint.resume=force"), capsys)
    assert rc == 2 and os.path.basename(f) in err and name in err and "in this run" in err


def test_export_is_complete_and_the_readme_chain_runs_from_it(assets, tmp_path, capsys):
    """SFT's <out>/hf alone carries tokenizer, chat template, generation config and the
    special-token ids: transformers loads it, and DPO runs from it without tokenizer_path.
    A rerun replaces the export (an old stray file does not survive)."""
    from transformers import AutoConfig, AutoTokenizer

    from nova_engine.data.tokenize import CHAT_TEMPLATES

    out = tmp_path / "sft"
    assert run(sft_args(assets, out, "train.max_steps=1", "data.template=tulu"), capsys)[0] == 0
    hf = out / "hf"
    tok = AutoTokenizer.from_pretrained(hf)
    src = AutoTokenizer.from_pretrained(assets["tok"])
    assert tok.get_vocab() == src.get_vocab()
    assert tok.chat_template == CHAT_TEMPLATES["tulu"]  # the template the run trained with
    assert (hf / "generation_config.json").is_file()
    cfg = AutoConfig.from_pretrained(hf)
    assert cfg.eos_token_id is not None and cfg.pad_token_id == src.pad_token_id
    (hf / "stray.safetensors").write_bytes(b"old")
    rc, err = run(sft_args(assets, out, "train.max_steps=2", "checkpoint.resume=none",
                           "data.template=tulu"), capsys)  # fmt: skip
    assert rc == 0 and not (hf / "stray.safetensors").exists()
    rc, err = run([
        "dpo", "--recipe", RECIPE, f"model.hf_path={hf}", "model.tokenizer_path=null",
        f"data.train_paths=[{assets['pref']}]",
        "data.eval_paths=[]", "train.global_batch_size=4", "train.max_steps=1",
        f"train.out_dir={tmp_path / 'dpo'}", "train.tensorboard=false",
    ], capsys)  # fmt: skip
    assert rc == 0, err


def test_nova_export_replaces_an_existing_directory(tmp_path):
    from safetensors.torch import save_file

    from nova_engine import cli

    def write(tmp):
        os.makedirs(os.path.join(tmp, "hf"))
        save_file({"w": torch.ones(3)}, os.path.join(tmp, "hf", "model.safetensors"))

    ckpt = checkpoint_io.write_checkpoint_dir(tmp_path / "c" / "step_00000001", write, step=1)
    dest = tmp_path / "export"
    dest.mkdir()
    (dest / "model-00001-of-00002.safetensors").write_text("old")
    assert cli.main(["export", ckpt, str(dest)]) == 2  # a previous export: --overwrite
    assert cli.main(["export", ckpt, str(dest), "--overwrite"]) == 0
    assert sorted(os.listdir(dest)) == ["model.safetensors"]


@pytest.mark.parametrize(
    "override,want",
    [
        ("model.hf_path=/nonexistent/model", "model.hf_path: '/nonexistent/model': no such directory"),
        ("data.train_paths=[/nonexistent/train.jsonl]", "data.train_paths: /nonexistent/train.jsonl: no such file"),
        ("train.out_dir=/proc/nova-run", "train.out_dir: /proc/nova-run: not writable"),
    ],
)  # fmt: skip
def test_user_errors_are_one_line_before_the_model_loads(assets, tmp_path, capsys, override,
                                                         want):  # fmt: skip
    key = override.split("=")[0]
    args = [a for a in sft_args(assets, tmp_path / "run") if not a.startswith(key + "=")]
    rc, err = run(args + [override], capsys)
    assert rc == 2 and want in err, err


def test_layout_error_names_heads_before_anything_else(assets, tmp_path):
    """tp=3 in a world of 3: the heads error (not a micro-batch or world-size one)."""
    from nova_engine.config import ConfigError
    from nova_engine.recipe import load_recipe

    run_cfg = load_recipe(RECIPE, "sft", sft_args(assets, tmp_path)[3:] + ["parallel.tp=3",
                          "train.global_batch_size=3", "train.micro_batch_tokens=2049"])  # fmt: skip
    with pytest.raises(
        ConfigError, match="parallel.tp: tp=3 does not divide num_attention_heads=4"
    ):
        run_cfg.validate_layout(3)


def test_empty_and_fully_skipped_data_and_missing_tokenizer(assets, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, err = run(sft_args(assets, tmp_path / "a") + [f"data.train_paths=[{empty}]"], capsys)
    assert rc == 2 and "no usable samples: no data lines" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n[1]\n")
    rc, err = run(sft_args(assets, tmp_path / "b") + [f"data.train_paths=[{bad}]",
                                                     "data.on_bad_line=skip"], capsys)  # fmt: skip
    assert rc == 2 and "all 2 lines skipped" in err and "bad_json" in err
    rc, err = run(sft_args(assets, tmp_path / "c") + [f"model.tokenizer_path={tmp_path}"], capsys)
    assert rc == 2 and "no tokenizer files" in err


def test_disk_full_names_the_path_and_keeps_the_old_checkpoints(assets, tmp_path, capsys,
                                                                monkeypatch):  # fmt: skip
    out = tmp_path / "run"
    assert run(sft_args(assets, out, "train.max_steps=1"), capsys)[0] == 0
    import nova_engine.train.checkpoint as ck

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter "
                           "failed writing file data/0: file write failed")  # fmt: skip

    monkeypatch.setattr(ck, "_save_rank_file", full)
    rc, err = run(sft_args(assets, out, "train.max_steps=2", "checkpoint.resume=force"), capsys)
    assert rc == 2 and "disk full while writing a checkpoint" in err and str(out) in err
    assert [s for s, _ in checkpoint_io.list_complete(out / "checkpoints")] == [1]


def test_config_diff_ignores_logging_and_checkpoint_policy():
    a = {
        "optim": {"lr": 1e-3},
        "train": {"log_every": 1, "max_steps": 3},
        "checkpoint": {"keep_last": 1},
    }
    b = {
        "optim": {"lr": 1e-3},
        "train": {"log_every": 9, "max_steps": 3},
        "checkpoint": {"keep_last": 5},
    }
    assert config_diff(a, b) == []
    b["optim"]["lr"] = 2e-3
    assert config_diff(a, b) == ["optim.lr: 0.001 -> 0.002"]


def test_keys_added_after_a_checkpoint_count_as_their_defaults():
    """A checkpoint written before a config key existed (its saved config lacks it) resumes
    under checkpoint.resume=auto when the run leaves that key at its default (what the
    older run did); set to anything else, the key is a change. Seen with a checkpoint of
    859d28b: model.lora and train.speed.* were refused as '<absent>' -> None."""
    from nova_engine.recipe import load_recipe
    from nova_engine.train.runner import _with_defaults, run_config_json

    run = load_recipe(RECIPE, "sft", ["data.train_paths=[]", "train.seed=7"])
    saved = run_config_json(run)
    del saved["model"]["lora"], saved["train"]["speed"], saved["train"]["seed"]
    current = run_config_json(run)
    assert config_diff(saved, current)  # what resume refused before
    filled = _with_defaults(run, saved)
    assert config_diff(filled, current) == ["train.seed: 1234 -> 7"]  # 7 is not the default
    lora = load_recipe(RECIPE, "sft", ["data.train_paths=[]", "model.lora.rank=4"])
    assert any(d.startswith("model.lora") for d in config_diff(filled, run_config_json(lora)))


def _wait_for(path, pred, proc, timeout=600):
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if os.path.exists(path) and pred(open(path).read()):
            return True
        time.sleep(0.2)
    return False


def _clean_env():
    """This process's environment without the process-group variables an in-process run
    left behind (a child must not rendezvous on this process's port)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.mark.slow
def test_sigterm_saves_at_the_step_boundary_and_resumes(assets, tmp_path):
    """A real process, SIGTERM after step 2: a checkpoint of the step it stopped at, exit
    128+15 with one line and no traceback; the rerun resumes from that step."""
    out = tmp_path / "run"
    env = {**_clean_env(), "NOVA_LOG_LEVEL": "WARNING"}
    log = tmp_path / "stderr.txt"
    with open(log, "w") as errf:  # a file, not a pipe: nobody reads while it runs
        proc = subprocess.Popen(
            [sys.executable, "-m", "nova_engine.train",
             *sft_args(assets, out, "train.max_steps=400")],
            stdout=subprocess.DEVNULL, stderr=errf, text=True, env=env,
        )  # fmt: skip
        ok = _wait_for(out / "metrics.jsonl", lambda s: s.count('"loss"') >= 2, proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=240)
    err = log.read_text()
    assert ok, err
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "SIGTERM: stopped after step" in err
    (step, path), = checkpoint_io.list_complete(out / "checkpoints")  # fmt: skip
    assert f"saved {path}" in err and step >= 2
    rc = train_main.main(
        sft_args(assets, out, f"train.max_steps={step + 1}", "checkpoint.resume=force")
    )
    assert rc == 0
    steps = [json.loads(x)["step"] for x in open(out / "metrics.jsonl") if '"loss"' in x]
    assert steps[-1] == step + 1 and steps.count(step + 1) == 1


@pytest.mark.slow
def test_multi_rank_user_error_printed_once(assets, tmp_path):
    """Two gloo ranks, a bad key. `nova run` (torchrun's flags, Nova's exit codes): exit 2
    and the one line is all it prints. Plain torchrun: the line once (rank 0), the workers'
    exit code 2 in torchrun's own report."""
    env = _clean_env()
    args = sft_args(assets, tmp_path / "run", "data.max_lenght=3")
    nova = subprocess.run(
        [sys.executable, "-m", "nova_engine.cli", "run", "--standalone", "--nproc-per-node", "2",
         *args], capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    lines = [ln for ln in (nova.stdout + nova.stderr).splitlines() if "Warning" not in ln
             and not ln.startswith(" ")]  # fmt: skip
    assert nova.returncode == 2, nova.stderr
    assert [ln for ln in lines if "data.max_lenght" in ln] == lines[-1:], lines
    assert "Traceback" not in nova.stderr and "ChildFailedError" not in nova.stderr
    plain = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "nova_engine.train", *args], capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    text = plain.stdout + plain.stderr
    assert text.count("data.max_lenght: unknown key") == 1, text
    assert "exitcode  : 2" in text
