"""Trust at the edges (#29): each case through the real entry point (`nova` = cli.main,
`python -m nova_engine.train` = train.__main__.main, a world of one), with the exit code,
the one line printed and what is kept on disk. Every case adds a row to the table of
docs/edges.md: `NOVA_WRITE_EDGES=1 pytest tests/engine/test_edges_cases.py` rewrites it
from what the tests saw (paths shown relative to the test's temporary directory).

Covers: exports that never destroy (a new directory, or a previous export with
--overwrite; never anything else), a checkpoint that would run code on load (refused), the
manifest checksums checked by `nova export` and `nova generate --model CKPT`, non-finite and
absurd hyperparameters refused, divergence rolling back to the checkpoint before the first
skipped step (keep_last never prunes it) with no final export, the lock on checkpoint.dir,
one line instead of a traceback for the listed user errors, and (item 12) a layout change
whose advice is a command that runs (the test runs it), every checkpoint damaged refused, a
skipped step naming its data lines, Ctrl-C during start-up (130, not a segfault), an empty
eval set for `nova decontaminate`, non-finite merged weights refused by `nova merge`.
The verifier pool's time bound (item 9) is tested in tests/engine/test_verifiers_pool.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from nova_engine import cli
from nova_engine.train import __main__ as train_main
from nova_engine.train import checkpoint_io

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RECIPE = os.path.join(ROOT, "recipes", "tiny_cpu.yaml")
DOC = os.path.join(ROOT, "docs", "edges.md")
ROWS: list[tuple[str, str, int, str, str]] = []  # (item, command, exit code, line, kept)


@pytest.fixture(scope="module", autouse=True)
def table():
    """Collect the rows; with NOVA_WRITE_EDGES=1 rewrite docs/edges.md's table."""
    yield
    if os.environ.get("NOVA_WRITE_EDGES") != "1" or not ROWS:
        return
    text = open(DOC).read()
    begin, end = "<!-- edges-table begin -->", "<!-- edges-table end -->"
    rows = ["| # | command | exit | line printed | kept |", "| --- | --- | --- | --- | --- |"]
    for item, cmd, rc, line, kept in ROWS:
        cells = [c.replace("|", "\\|") for c in (item, f"`{cmd}`", str(rc), line, kept)]
        rows.append("| " + " | ".join(cells) + " |")
    head, rest = text.split(begin)
    with open(DOC, "w") as f:
        f.write(head + begin + "\n" + "\n".join(rows) + "\n" + end + rest.split(end)[1])


def record(item, cmd, rc, line, kept, tmp):
    """Add a row (tmp paths shown as <tmp>)."""

    def rel(s):
        return str(s).replace(str(tmp), "<tmp>").replace(ROOT + "/", "")

    ROWS.append((item, rel(cmd), rc, rel(line), kept))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny tokenizer, a tiny Llama, the synthetic SFT data and one finished 2-step run
    (its checkpoint carries hf/)."""
    from nova_engine.data.synthetic import write_task
    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.data.tokenize import load_tokenizer
    from nova_engine.model.tiny import build_tiny_hf_model

    d = tmp_path_factory.mktemp("assets")
    tok = build_tiny_tokenizer(d / "tok")
    files = write_task(d / "data", n_sft=24, n_pref=4, n_eval=2, seed=5)
    model = d / "model"
    build_tiny_hf_model(
        str(model), "llama", vocab_size=len(load_tokenizer(tok)), hidden_size=32,
        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    a = {"tok": str(tok), "model": str(model), "root": str(d), **files}
    assert train_main.main(sft_args(a, d / "run", "train.max_steps=2")) == 0
    a["run"] = str(d / "run")
    a["ckpt"] = checkpoint_io.latest_complete(d / "run" / "checkpoints")
    return a


def sft_args(a, out, *extra):
    return [
        "sft", "--recipe", RECIPE, f"model.hf_path={a['model']}", f"model.tokenizer_path={a['tok']}",
        "model.build=null", f"data.train_paths=[{a['sft']}]", "data.eval_paths=[]",
        "train.global_batch_size=8", "train.max_steps=3", "train.log_every=1",
        f"train.out_dir={out}", "train.tensorboard=false", *extra,
    ]  # fmt: skip


def last_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    return lines[-1] if lines else ""


def nova(argv, capsys):
    rc = cli.main(argv)
    return rc, last_line(capsys)


def train(argv, capsys):
    rc = train_main.main(argv)
    return rc, last_line(capsys)


def listing(path):
    return sorted(os.listdir(path))


def flip_byte(path, at=None):
    at = os.path.getsize(path) // 2 if at is None else at
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


# ------------------------------------------------------------------ (1) exports never destroy


def test_export_never_replaces_what_is_not_a_previous_export(assets, tmp_path, capsys):
    ckpt = assets["ckpt"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    rc, line = nova(["export", ckpt, str(mine)], capsys)
    assert rc == 2 and "not a HF export" in line and "notes.txt" in line, line
    assert listing(mine) == ["notes.txt"]
    record("1", f"nova export CKPT {mine}", rc, line, "the directory as it was", tmp_path)
    # the run directory itself (checkpoints/, metrics.jsonl): refused even with --overwrite
    before = listing(assets["run"])
    rc, line = nova(["export", ckpt, assets["run"], "--overwrite"], capsys)
    assert rc == 2 and "not a HF export" in line and "checkpoints" in line, line
    assert listing(assets["run"]) == before
    assert checkpoint_io.latest_complete(os.path.join(assets["run"], "checkpoints")) == ckpt
    record("1", "nova export CKPT RUN_DIR --overwrite", rc, line, "the run directory",
           os.path.dirname(assets["run"]))  # fmt: skip
    # a file at DIR
    f = tmp_path / "file"
    f.write_text("x")
    rc, line = nova(["export", ckpt, str(f)], capsys)
    assert rc == 2 and "is a file" in line and f.read_text() == "x", line
    record("1", f"nova export CKPT {f}", rc, line, "the file", tmp_path)


def test_export_writes_new_dirs_and_replaces_a_previous_export_only_when_asked(
    assets, tmp_path, capsys
):
    from safetensors.torch import load_file

    ckpt = assets["ckpt"]
    dest = tmp_path / "export"
    rc, line = nova(["export", ckpt, str(dest)], capsys)
    assert rc == 0, line
    want = sorted(r[3:] for r in checkpoint_io.read_manifest(ckpt)["files"] if r[:3] == "hf/")
    assert listing(dest) == want
    for name in want:  # byte-equal to the checkpoint's files
        with open(dest / name, "rb") as a, open(os.path.join(ckpt, "hf", name), "rb") as b:
            assert a.read() == b.read(), name
    shard = sorted(dest.glob("*.safetensors"))[0]
    assert load_file(str(shard))  # a loadable file
    (dest / "model-00009-of-00009.safetensors").write_text("stale")  # a previous export's
    rc, line = nova(["export", ckpt, str(dest)], capsys)
    assert rc == 2 and "--overwrite" in line, line
    assert (dest / "model-00009-of-00009.safetensors").exists()
    record("1", "nova export CKPT PREVIOUS_EXPORT", rc, line, "the previous export", tmp_path)
    rc, line = nova(["export", ckpt, str(dest), "--overwrite"], capsys)
    assert rc == 0 and listing(dest) == want, line
    record("1", "nova export CKPT PREVIOUS_EXPORT --overwrite", rc, line,
           "the new export only (no stale shard)", tmp_path)  # fmt: skip


# ------------------------------------------------------------------ (7) checksums on read


def test_export_and_generate_refuse_a_flipped_byte_in_hf(assets, tmp_path, capsys):
    ckpt = str(tmp_path / "step_00000002")
    shutil.copytree(assets["ckpt"], ckpt)
    victim = sorted(p for p in os.listdir(os.path.join(ckpt, "hf")) if p.endswith(".safetensors"))
    flip_byte(os.path.join(ckpt, "hf", victim[-1]))
    dest = tmp_path / "export"
    rc, line = nova(["export", ckpt, str(dest)], capsys)
    assert rc == 2 and "checksum mismatch" in line and victim[-1] in line, line
    assert not dest.exists() and not os.path.exists(f"{dest}.tmp-export")
    record("7", "nova export DAMAGED_CKPT DIR", rc, line, "nothing written", tmp_path)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    out = tmp_path / "gen.jsonl"
    argv = ["generate", "--model", ckpt, "--tokenizer", assets["tok"], "--prompts", str(prompts),
            "--out", str(out), "--max-new-tokens", "2"]  # fmt: skip
    rc, line = nova(argv, capsys)
    assert rc == 2 and "checksum mismatch" in line and victim[-1] in line, line
    assert not out.exists()
    record("7", "nova generate --model DAMAGED_CKPT ...", rc, line, "nothing written", tmp_path)


# ------------------------------------------------------------------ (3) no code on load


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_rank_file_with_a_matching_crc_is_refused_without_running(
    assets, tmp_path, capsys
):
    import torch

    out = tmp_path / "run"
    shutil.copytree(assets["run"], out)
    ckpt = checkpoint_io.latest_complete(out / "checkpoints")
    rank_file = os.path.join(ckpt, "rank_00000.pt")
    state = torch.load(rank_file, weights_only=True)
    marker = tmp_path / "PWNED"
    state["data"] = {"evil": _Payload(marker)}
    torch.save(state, rank_file)
    manifest_path = os.path.join(ckpt, checkpoint_io.MARKER)
    manifest = json.load(open(manifest_path))  # recompute size + CRC: the CRC is no shield
    manifest["files"]["rank_00000.pt"] = os.path.getsize(rank_file)
    manifest["checksums"]["rank_00000.pt"] = checkpoint_io.file_crc32(rank_file)
    json.dump(manifest, open(manifest_path, "w"))
    rc, line = train(sft_args(assets, out, f"checkpoint.resume={ckpt}"), capsys)
    assert rc == 2 and "refused" in line and "rank_00000.pt" in line, line
    assert not marker.exists(), "the checkpoint ran code on load"
    record("3", "sft ... checkpoint.resume=CRAFTED_CKPT", rc, line,
           "nothing run; the checkpoints as they were", tmp_path)  # fmt: skip


# ------------------------------------------------------------------ (2) hyperparameters


@pytest.mark.parametrize(
    "override,want",
    [
        ("optim.lr=inf", "optim.lr: expected a finite number, got 'inf'"),
        ("optim.lr=nan", "optim.lr: expected a finite number"),
        ("optim.lr=1e39", "optim.lr: expected a learning rate in (0, 1]"),
        ("optim.lr=1e30", "optim.lr: expected a learning rate in (0, 1]"),
        ("optim.eps=-inf", "optim.eps: expected a finite number"),
        ("train.divergence_factor=inf", "train.divergence_factor: expected a finite number"),
    ],
)
def test_nonfinite_and_absurd_hyperparameters_are_refused(assets, tmp_path, capsys, override,
                                                          want):  # fmt: skip
    out = tmp_path / "run"
    rc, line = train(sft_args(assets, out, override), capsys)
    assert rc == 2 and want in line, line
    assert not (out / "hf").exists() and not (out / "checkpoints").exists()
    record("2", f"sft ... {override}", rc, line, "nothing written", tmp_path)


# ------------------------------------------------------------------ (8) divergence


def test_divergence_rolls_back_to_the_checkpoint_before_the_first_skip(
    assets, tmp_path, capsys, monkeypatch
):
    """Updates 4, 7 and 8 skipped (non-finite gradients injected), save_every=1, keep_last=2,
    max_bad_steps=2: nothing is saved right after a skip; steps 5 and 6 are saved, yet
    keep_last keeps step 3 (before the first skip); at step 8 the run stops, the
    checkpoints from step 4 on are removed, the line names step 3; no final export."""
    import torch

    from nova_engine.train.engine import ModelEngine

    calls = {"n": 0}
    real = ModelEngine.local_grads_finite

    def grads_finite(self):
        calls["n"] += 1
        ok = real(self)
        return torch.zeros_like(ok) if calls["n"] in (4, 7, 8) else ok

    monkeypatch.setattr(ModelEngine, "local_grads_finite", grads_finite)
    out = tmp_path / "run"
    argv = sft_args(assets, out, "train.max_steps=10", "train.save_every=1",
                    "checkpoint.keep_last=2", "train.max_bad_steps=2")  # fmt: skip
    rc, line = train(argv, capsys)
    ck = out / "checkpoints"
    assert rc == 2 and line.startswith("TrainingDiverged"), line
    assert "first skipped step 4" in line and "rolled back to" in line, line
    assert re.search(r"step_00000003\b", line), line
    assert [s for s, _ in checkpoint_io.list_complete(ck)] == [3]
    assert not (out / "hf").exists()
    record("8", "sft ... (updates 4, 7, 8 non-finite; save_every=1 keep_last=2)", rc, line,
           "step_00000003 (steps 5, 6 removed); no hf/", tmp_path)  # fmt: skip
    # resume=auto now starts from the roll-back point
    monkeypatch.setattr(ModelEngine, "local_grads_finite", real)
    rc, line = train(sft_args(assets, out, "train.max_steps=4", "checkpoint.resume=force"), capsys)
    assert rc == 0, line
    steps = [json.loads(x)["step"] for x in open(out / "metrics.jsonl")]
    assert steps[-1] == 4


# ------------------------------------------------------------------ (5) the lock


def test_the_lock_covers_checkpoint_dir(assets, tmp_path, capsys):
    shared = tmp_path / "shared_ckpts"
    shared.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys,time; sys.path.insert(0, sys.argv[1]);"
         "from nova_engine.train.safety import RunLock; l = RunLock(sys.argv[2]); l.acquire();"
         "print('locked', flush=True); time.sleep(60)", ROOT, str(shared)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        out = tmp_path / "other_run"
        rc, line = train(sft_args(assets, out, f"checkpoint.dir={shared}"), capsys)
        assert rc == 2 and "in use by another run" in line and "checkpoint.dir" in line, line
        assert listing(shared) == [".nova.lock"]
        record("5", "sft ... checkpoint.dir=DIR_OF_A_LIVE_RUN", rc, line,
               "the other run's checkpoints", tmp_path)  # fmt: skip
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------ (11) one line


def test_one_line_for_a_missing_or_non_checkpoint_export_source(assets, tmp_path, capsys):
    for src, want in ((tmp_path / "nope", "no such checkpoint directory"),
                      (tmp_path, "no COMPLETE marker")):  # fmt: skip
        rc, line = nova(["export", str(src), str(tmp_path / "x")], capsys)
        assert rc == 2 and want in line, line
        record("11", f"nova export {src} DIR", rc, line, "nothing written", tmp_path)


def test_one_line_for_a_missing_recipe(assets, tmp_path, capsys):
    argv = sft_args(assets, tmp_path / "run")
    argv[argv.index("--recipe") + 1] = str(tmp_path / "nope.yaml")
    rc, line = train(argv, capsys)
    assert rc == 2 and "--recipe" in line and "nope.yaml: no such file" in line, line
    record("11", "sft --recipe MISSING.yaml", rc, line, "nothing written", tmp_path)


# ------------------------------------------------------------------ (4) model class


def _untied_reward_model(src, dst):
    """A Llama*ForSequenceClassification copy of `src`: no lm_head, a score head."""
    import torch
    from safetensors.torch import load_file, save_file

    os.makedirs(dst)
    w = load_file(os.path.join(src, "model.safetensors"))
    hidden = w.pop("lm_head.weight").shape[1]
    w["score.weight"] = torch.randn(1, hidden)
    save_file(w, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg.update(architectures=["LlamaForSequenceClassification"], num_labels=1,
               tie_word_embeddings=False)  # fmt: skip
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))


def test_an_untied_reward_model_is_refused_as_a_policy(assets, tmp_path, capsys):
    rm = str(tmp_path / "rm")
    _untied_reward_model(assets["model"], rm)
    out = tmp_path / "run"
    rc, line = train(sft_args(assets, out, f"model.hf_path={rm}"), capsys)
    assert rc == 2 and "model.hf_path" in line and "reward/value model" in line, line
    assert not (out / "checkpoints").exists()
    record("4", "sft ... model.hf_path=UNTIED_RM_DIR", rc, line, "nothing written", tmp_path)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    gen = tmp_path / "gen.jsonl"
    rc, line = nova(["generate", "--model", rm, "--tokenizer", assets["tok"], "--prompts",
                     str(prompts), "--out", str(gen)], capsys)  # fmt: skip
    assert rc == 2 and "--model" in line and "reward/value model" in line, line
    assert not gen.exists()
    record("4", "nova generate --model UNTIED_RM_DIR ...", rc, line, "nothing written", tmp_path)
    # the same directory with an lm_head (or tied embeddings) is a fine policy
    from nova_engine.train.safety import check_policy_dir

    cfg = json.load(open(os.path.join(rm, "config.json")))
    cfg["tie_word_embeddings"] = True
    json.dump(cfg, open(os.path.join(rm, "config.json"), "w"))
    check_policy_dir("model.hf_path", rm)


def _damaged_model(src, dst, how):
    shutil.copytree(src, dst)
    f = os.path.join(dst, "model.safetensors")
    if how == "header":
        with open(f, "r+b") as fh:
            fh.write(b"\xff" * 8)  # the header length: absurd
    else:
        os.truncate(f, os.path.getsize(f) // 2)
    return f


@pytest.mark.parametrize("how", ["header", "truncated"])
def test_one_line_for_a_damaged_or_truncated_safetensors_file(assets, tmp_path, capsys, how):
    bad = str(tmp_path / "m")
    f = _damaged_model(assets["model"], bad, how)
    rc, line = train(sft_args(assets, tmp_path / "run", f"model.hf_path={bad}"), capsys)
    assert rc == 2 and line.startswith("CheckpointError") and f in line, line
    assert "damaged safetensors file" in line
    record("11", f"sft ... model.hf_path=DIR_WITH_{how.upper()}_SHARD", rc, line,
           "nothing written", tmp_path)  # fmt: skip
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    gen = tmp_path / "gen.jsonl"
    rc, line = nova(["generate", "--model", bad, "--tokenizer", assets["tok"], "--prompts",
                     str(prompts), "--out", str(gen)], capsys)  # fmt: skip
    assert rc == 2 and f in line and "damaged safetensors file" in line, line
    assert not gen.exists()
    record("11", f"nova generate --model DIR_WITH_{how.upper()}_SHARD ...", rc, line,
           "nothing written", tmp_path)  # fmt: skip


def test_one_line_for_an_unwritable_generate_out_before_generating(assets, tmp_path, capsys,
                                                                   monkeypatch):  # fmt: skip
    import nova_engine.generate as gen_mod

    def never(*a, **k):
        raise AssertionError("generated before checking --out")

    monkeypatch.setattr(gen_mod, "generate", never)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    out = tmp_path / "no_such_dir" / "gen.jsonl"
    rc, line = nova(["generate", "--model", assets["model"], "--tokenizer", assets["tok"],
                     "--prompts", str(prompts), "--out", str(out)], capsys)  # fmt: skip
    assert rc == 2 and "--out" in line and "not writable" in line, line
    record("11", "nova generate ... --out UNWRITABLE", rc, line, "nothing generated", tmp_path)


def test_one_line_for_a_jinja_syntax_error(assets, tmp_path, capsys):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    rc, line = train(sft_args(assets, tmp_path / "run", f"data.template={bad}"), capsys)
    assert rc == 2 and f"{bad}:2: Jinja syntax error" in line, line
    record("11", "sft ... data.template=BAD.jinja", rc, line, "nothing written", tmp_path)


@pytest.mark.parametrize("flag", [["--gpu-mem", "-5"], ["--gpu-mem", "nan"], ["--world", "0"]])
def test_one_line_for_absurd_plan_flags(tmp_path, capsys, flag):
    recipe = os.path.join(ROOT, "recipes", "llama3_8b.yaml")
    rc, line = nova(["plan", "--recipe", recipe, "--world", "8", *flag], capsys)
    assert rc == 2 and line.startswith(f"nova plan: {flag[0]}") and "expected" in line, line
    record("11", f"nova plan --recipe recipes/llama3_8b.yaml {' '.join(flag)}", rc, line,
           "-", tmp_path)  # fmt: skip


def test_one_line_for_a_disk_that_fills_during_the_final_export(assets, tmp_path, capsys,
                                                                monkeypatch):  # fmt: skip
    import errno

    from nova_engine.train.engine import ModelEngine

    def full(self, out, *a, **k):
        os.makedirs(out, exist_ok=True)
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "run"
    monkeypatch.setattr(ModelEngine, "export_hf", full)
    rc, line = train(sft_args(assets, out, "train.max_steps=1",
                              "checkpoint.hf_in_checkpoints=false"), capsys)  # fmt: skip
    assert rc == 2 and "disk full" in line and "final export" in line, line
    assert [s for s, _ in checkpoint_io.list_complete(out / "checkpoints")] == [1]
    assert not (out / "hf").exists() and not (out / "hf.tmp-export").exists()
    record("11", "sft ... (disk fills during the final export)", rc, line,
           "the checkpoints; no partial hf/", tmp_path)  # fmt: skip


# ------------------------------------------------------------------ (6) data content, (12) moves


def test_resume_compares_the_data_content_and_ignores_a_moved_run_dir(assets, tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    shutil.copy(assets["sft"], data)
    out = tmp_path / "run"
    args = [a for a in sft_args(assets, out) if not a.startswith("data.train_paths=")]
    rc, line = train([*args, f"data.train_paths=[{data}]", "train.max_steps=2"], capsys)
    assert rc == 0, line
    # the same number of lines, one answer edited: refused under resume=auto
    lines = data.read_text().splitlines()
    rec = json.loads(lines[0])
    rec["messages"][-1]["content"] += " (edited)"
    data.write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")
    rc, line = train([*args, f"data.train_paths=[{data}]", "train.max_steps=2"], capsys)
    assert rc == 2 and "data_content.0" in line and "force" in line, line
    record("6", "sft ... (same line count, one line edited; resume=auto)", rc, line,
           "the checkpoints; nothing trained", tmp_path)  # fmt: skip
    # the run directory moved elsewhere: the same run, it resumes
    moved = tmp_path / "moved"
    os.rename(out, moved)
    shutil.copy(assets["sft"], data)
    margs = [a for a in sft_args(assets, moved) if not a.startswith("data.train_paths=")]
    rc, line = train([*margs, f"data.train_paths=[{data}]", "train.max_steps=2"], capsys)
    assert rc == 0, line
    steps = [json.loads(x)["step"] for x in open(moved / "metrics.jsonl") if '"loss"' in x]
    assert steps == [1, 2]  # resumed at its last step: nothing redone
    record("12", "sft ... train.out_dir=MOVED_RUN_DIR", rc, line, "resumed at step 2", tmp_path)


def test_a_layout_change_names_a_command_that_runs(assets, tmp_path, capsys):
    """A checkpoint of another layout (its manifest says tp=2 on 2 ranks; this run is one
    rank): refused before the config diff, with the command that starts this layout from
    the checkpoint's hf/ weights; that command, run as printed, trains and exports."""
    out = tmp_path / "run"
    shutil.copytree(assets["run"], out)
    ckpt = checkpoint_io.latest_complete(out / "checkpoints")
    manifest_path = os.path.join(ckpt, checkpoint_io.MARKER)
    manifest = json.load(open(manifest_path))
    two = {"tp": 2, "pp": 1, "vpp": None, "dp": 1, "world_size": 2}
    manifest["extra"]["engines"]["policy"] = manifest["extra"]["layout"] = two
    json.dump(manifest, open(manifest_path, "w"))
    rc, line = train(sft_args(assets, out), capsys)
    assert rc == 2 and "saved at layout tp=2 pp=1 (2 ranks)" in line, line
    assert "this run is tp=1 pp=1 (1 rank)" in line, line
    record("12", "sft ... (the checkpoint is of another layout)", rc, line,
           "the checkpoints; nothing trained", tmp_path)  # fmt: skip
    cmd = line.split("(a new optimizer and schedule): ", 1)[1].split()
    assert cmd[:3] == ["python", "-m", "nova_engine.train"], cmd
    assert f"model.hf_path={ckpt}/hf" in cmd and "checkpoint.resume=none" in cmd
    rc, line = train(cmd[3:], capsys)
    assert rc == 0, line
    new_out = next(a.split("=", 1)[1] for a in cmd if a.startswith("train.out_dir="))
    assert os.path.isdir(os.path.join(new_out, "hf"))
    assert checkpoint_io.latest_complete(out / "checkpoints") == ckpt  # the old run untouched


def test_every_checkpoint_damaged_is_refused_not_restarted(assets, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(assets["run"], out)
    found = checkpoint_io.list_complete(out / "checkpoints")
    for _, ck in found:
        flip_byte(os.path.join(ck, "rank_00000.pt"))
    before = listing(out / "checkpoints")
    rc, line = train(sft_args(assets, out), capsys)
    assert rc == 2 and "every checkpoint is damaged" in line, line
    assert "checkpoint.resume=none" in line and "checksum" in line, line
    assert listing(out / "checkpoints") == before
    steps = [json.loads(x)["step"] for x in open(out / "metrics.jsonl") if '"loss"' in x]
    assert steps == [1, 2]  # the finished run's steps only: nothing trained from step 0
    record("12", "sft ... (every checkpoint damaged; resume=auto)", rc, line,
           "the damaged checkpoints; nothing trained", tmp_path)  # fmt: skip


def test_a_skipped_step_names_the_data_lines_of_its_non_finite_micro_batch(
    assets, tmp_path, capsys, monkeypatch
):
    """The loss of the micro-batch holding the sample of data line 5 is made infinite: the
    step is skipped and the line names that micro-batch's samples by file:line (line 5
    among them), not the other micro-batch's (train.micro_batch_tokens=128: two per step)."""
    import torch

    from nova_engine.train.engine import ModelEngine

    target = 4  # the sample of line 5 (every line of the synthetic file is valid)
    real = ModelEngine.forward_backward
    seen: dict[str, list] = {"bad": [], "all": []}

    def poisoned(self, microbatches, loss_fn, **kw):
        results = real(self, microbatches, loss_fn, **kw)
        for mb, r in zip(microbatches, results):
            ids = [int(i) for i in mb.sample_ids.tolist()]
            seen["all"].append(ids)
            if target in ids and not kw.get("forward_only"):
                r["loss"] = torch.tensor(float("inf"))
                seen["bad"] = ids
        return results

    monkeypatch.setattr(ModelEngine, "forward_backward", poisoned)
    out = tmp_path / "run"
    rc, line = train(sft_args(assets, out, "train.micro_batch_tokens=128",
                              "train.max_bad_steps=1"), capsys)  # fmt: skip
    assert rc == 2 and line.startswith("TrainingDiverged") and "non-finite loss" in line, line
    sft = assets["sft"]
    bad = sorted(seen["bad"])
    assert f"in the micro-batch of {len(bad)} sample(s): " in line, line
    named = re.findall(re.escape(sft) + r":(\d+)", line)
    assert f"{sft}:{target + 1}" in line and len(named) == min(len(bad), 8), line
    assert sorted(int(n) - 1 for n in named) == bad[:8], (named, bad)
    assert len(seen["all"]) > 1 and any(set(ids) - set(bad) for ids in seen["all"])
    record("12", "sft ... (one data line's loss infinite; max_bad_steps=1)", rc, line,
           "no checkpoint after the skip; no hf/", assets["root"])  # fmt: skip


def _wait_for_mapping(pid: int, needle: str, timeout: float = 120.0) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/maps") as f:
                if needle in f.read():
                    return True
        except OSError:
            return False
        time.sleep(0.005)
    return False


@pytest.mark.slow  # three start-ups of the entry point in subprocesses
@pytest.mark.parametrize("after_s", [0.0, 0.3, 1.0])
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(assets, tmp_path, after_s):
    """SIGINT while torch's C library is loading (and shortly after: megatron, the gloo
    init): it used to leave half-imported C extensions whose re-import or teardown
    segfaulted (exit -11). Now: exit 130, one line, no traceback."""
    import signal
    import time

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}  # fmt: skip
    argv = [sys.executable, "-m", "nova_engine.train", *sft_args(assets, tmp_path / "run")]
    p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert _wait_for_mapping(p.pid, "libtorch"), "torch never loaded"
    time.sleep(after_s)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert p.returncode == 130 and "Traceback" not in err, (p.returncode, err[-2000:])
    assert lines[-1].startswith(("interrupted (SIGINT)", "SIGINT: stopped after step")), err
    if after_s == 0.0:
        record("12", "sft ... (Ctrl-C while torch loads)", p.returncode, lines[-1],
               "nothing written", tmp_path)  # fmt: skip


# ------------------------------------------------------------------ (12) tools


def test_decontaminate_refuses_an_empty_eval_set(assets, tmp_path, capsys):
    empty = tmp_path / "eval.jsonl"
    empty.write_text("\n")
    argv = ["decontaminate", "--train", assets["sft"], "--eval", str(empty), "--out",
            str(tmp_path / "clean")]  # fmt: skip
    rc, line = nova(argv, capsys)
    assert rc == 2 and f"--eval {empty}: no eval items" in line, line
    assert not (tmp_path / "clean").exists()
    record("12", "nova decontaminate --train T --eval EMPTY.jsonl --out DIR", rc, line,
           "nothing written", tmp_path)  # fmt: skip


def test_merge_refuses_non_finite_merged_weights(assets, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    nan = tmp_path / "aligned"
    shutil.copytree(assets["model"], nan)
    w = load_file(str(nan / "model.safetensors"))
    name = sorted(k for k in w if k.endswith("mlp.up_proj.weight"))[0]
    w[name] = w[name].clone()
    w[name].view(-1)[7] = float("nan")
    save_file(w, str(nan / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "merged"
    rc, line = nova(["merge", "expo", "--init", assets["model"], "--aligned", str(nan),
                     "--alpha", "0.5", "--out", str(out)], capsys)  # fmt: skip
    assert rc == 2 and f"merged tensor {name!r} has 1 non-finite value(s)" in line, line
    assert listing(tmp_path) == ["aligned"] and torch.isnan(w[name]).sum() == 1
    record("12", "nova merge expo --init M --aligned M_WITH_A_NAN --out DIR", rc, line,
           "nothing written", tmp_path)  # fmt: skip
