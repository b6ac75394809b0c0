"""`nova generate` user errors: one line naming file:line (or the option), exit status 2,
before any model is built (no process group needed). The end-to-end run is in
test_generate.py's spawned group."""

from __future__ import annotations

import json
import re

import pytest

from nova_engine.tools.generate import main

CONTEXT = 40


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.model.tiny import tiny_hf_config

    root = tmp_path_factory.mktemp("gen_cli")
    build_tiny_tokenizer(str(root / "tok"))
    tok = AutoTokenizer.from_pretrained(str(root / "tok"))
    d = root / "model"
    cfg = tiny_hf_config("qwen2", vocab_size=len(tok), max_position_embeddings=CONTEXT)
    cfg.architectures = ["Qwen2ForCausalLM"]
    cfg.save_pretrained(str(d))  # config only: errors come before the weights are read
    tok.save_pretrained(str(d))
    return d


def _run(model_dir, tmp_path, capsys, lines, *extra):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(x if isinstance(x, str) else json.dumps(x) + "\n" for x in lines))
    rc = main(["--model", str(model_dir), "--prompts", str(path),
               "--out", str(tmp_path / "out.jsonl"), *extra])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert not (tmp_path / "out.jsonl").exists()
    return rc, err, str(path)


@pytest.mark.parametrize(
    "lines,where,match",
    [
        ([{"prompt": "hi"}, "{not json\n"], 2, "invalid JSON"),
        ([{"prompt": "hi"}, "\n", {"prompt": ""}], 3, "empty prompt"),
        ([{"messages": []}], 1, "empty prompt"),
        ([{"messages": [{"role": "user", "content": "  "}]}], 1, "empty prompt"),
        ([{"prompt": "seven " * 60}], 1, f"longer than the model's context \\({CONTEXT} tokens"),
        ([{"prompt": "hi", "stop": ["<|nope|>"]}], 1, "unknown stop token '<|nope|>'"),
        ([{"prompt": "hi", "stop": [99999]}], 1, "unknown stop token id 99999"),
        ([{"text": "hi"}], 1, "expected a 'messages' list or a 'prompt' string"),
        ([[1, 2]], 1, "expected a JSON object"),
        ([{"prompt": "hi", "max_new_tokens": 0}], 1, "max_new_tokens=0"),
    ],
)  # fmt: skip
def test_bad_lines_name_file_and_line(model_dir, tmp_path, capsys, lines, where, match):
    rc, err, path = _run(model_dir, tmp_path, capsys, lines)
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert f"{path}:{where}: " in err
    assert re.search(match, err), err


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--stop", "<|nope|>"], "--stop: unknown stop token '<|nope|>'"),
        (["--top-p", "0"], "sampling options: top_p=0.0"),
        (["--tp", "4"], "is not divisible by tp=4"),
    ],
)  # fmt: skip
def test_bad_options(model_dir, tmp_path, capsys, extra, match):
    rc, err, _ = _run(model_dir, tmp_path, capsys, [{"prompt": "hi"}], *extra)
    assert rc == 2 and match in err, err


def test_not_a_model(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
    rc = main(["--model", str(tmp_path), "--prompts", str(tmp_path / "in.jsonl"),
               "--out", str(tmp_path / "o.jsonl")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "neither an HF model directory" in err, err


def test_checkpoint_dir_resolves_to_its_hf_export(model_dir, tmp_path):
    import os
    import shutil

    from nova_engine.tools.generate import UserError, resolve_model_dir
    from nova_engine.train.checkpoint_io import write_checkpoint_dir

    def rank_file_only(tmp):  # a checkpoint the way the trainer writes one, without hf/
        with open(os.path.join(tmp, "mp_rank_00.pt"), "wb") as f:
            f.write(b"shard")

    bare = write_checkpoint_dir(tmp_path / "step_00000010", rank_file_only, step=10)
    with pytest.raises(UserError, match="checkpoint without an hf/ export"):
        resolve_model_dir(bare)

    def with_export(tmp):
        rank_file_only(tmp)
        shutil.copytree(model_dir, os.path.join(tmp, "hf"))

    ckpt = write_checkpoint_dir(tmp_path / "step_00000020", with_export, step=20)
    assert resolve_model_dir(ckpt) == os.path.join(ckpt, "hf")
    assert resolve_model_dir(str(model_dir)) == str(model_dir)
