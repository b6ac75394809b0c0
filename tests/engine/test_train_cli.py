"""Entry points: `python -m nova_engine.train` and the `nova` console script (no training
here: argument handling, config errors, checkpoint export)."""

from __future__ import annotations

import os

import pytest

from nova_engine import cli
from nova_engine.train import __main__ as train_main
from nova_engine.train.checkpoint_io import CheckpointIOError, write_checkpoint_dir

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "tiny_cpu.yaml")


def test_train_parses_stage_recipe_and_overrides():
    a = train_main.parse(["dpo", "--recipe", "r.yaml", "optim.lr=1e-5", "loss.beta=0.1"])
    assert (a.stage, a.recipe, a.overrides) == ("dpo", "r.yaml", ["optim.lr=1e-5", "loss.beta=0.1"])
    with pytest.raises(SystemExit):
        train_main.parse(["rlhf", "--recipe", "r.yaml"])


def test_bad_override_is_a_config_error_naming_the_key(capsys):
    rc = train_main.main(["sft", "--recipe", RECIPE, "optim.learning_rate=1e-3"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "optim.learning_rate" in err and "valid keys" in err


def test_nova_forwards_to_the_trainer(capsys):
    assert cli.main(["sft", "--recipe", RECIPE, "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err


def test_export_copies_the_checkpoint_hf_dir(tmp_path):
    def write(tmp):
        os.makedirs(os.path.join(tmp, "hf"))
        with open(os.path.join(tmp, "hf", "config.json"), "w") as f:
            f.write("{}")

    ckpt = write_checkpoint_dir(tmp_path / "ckpt" / "step_00000002", write, step=2)
    assert cli.main(["export", ckpt, str(tmp_path / "out")]) == 0
    assert open(tmp_path / "out" / "config.json").read() == "{}"


def test_export_refuses_an_incomplete_checkpoint(tmp_path):
    half = tmp_path / "step_00000003"
    (half / "hf").mkdir(parents=True)
    with pytest.raises(CheckpointIOError, match="COMPLETE"):
        cli.main(["export", str(half), str(tmp_path / "out")])


def test_bad_data_line_stops_the_run_naming_file_and_line(tmp_path, capsys):
    """Through the real entry point: the tiny model is built, the data read; line 2 of the
    training file is not JSON -> exit 2 with file:line and what was wrong."""
    from nova_engine.data.tiny import build_tiny_tokenizer

    build_tiny_tokenizer(tmp_path / "tok")
    good = (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "2"}]}'
    )
    bad = tmp_path / "train.jsonl"
    bad.write_text(good + "\n" + '{"messages": [\n' + good + "\n")
    rc = train_main.main([
        "sft", "--recipe", RECIPE, f"model.hf_path={tmp_path / 'model'}",
        f"model.tokenizer_path={tmp_path / 'tok'}", f"data.train_paths=[{bad}]",
        "data.eval_paths=[]", f"train.out_dir={tmp_path / 'out'}",
    ])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{bad}:2:" in err and "DataError" in err
