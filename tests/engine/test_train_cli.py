"""Entry points: `python -m nova_engine.train` and the `nova` console script (no training
here: argument handling, config errors, checkpoint export)."""

from __future__ import annotations

import os

import pytest

from nova_engine import cli
from nova_engine.train import __main__ as train_main
from nova_engine.train.checkpoint_io import write_checkpoint_dir

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


def test_export_refuses_an_incomplete_checkpoint(tmp_path, capsys):
    """One line naming the missing COMPLETE marker, exit 2 (a user error), nothing written."""
    half = tmp_path / "step_00000003"
    (half / "hf").mkdir(parents=True)
    assert cli.main(["export", str(half), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"nova export: {half}: no COMPLETE marker"), err
    assert not (tmp_path / "out").exists()


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
    rc = train_main.main(
        [
            "sft",
            "--recipe",
            RECIPE,
            f"model.hf_path={tmp_path / 'model'}",
            f"model.tokenizer_path={tmp_path / 'tok'}",
            f"data.train_paths=[{bad}]",
            "data.eval_paths=[]",
            f"train.out_dir={tmp_path / 'out'}",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{bad}:2:" in err and "DataError" in err


@pytest.mark.slow  # a whole SFT+DPO run through the entry point
def test_dpo_entry_point_evaluates_held_out_pairs(tmp_path):
    """`dpo` through the entry point with held-out pairs: both reference passes run before
    any update (two cache files: train and held-out), and the eval records carry the DPO
    metrics."""
    from nova_engine.data.synthetic import write_task
    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.data.tokenize import load_tokenizer
    from nova_engine.model.tiny import build_tiny_hf_model
    from nova_engine.train.metrics import read_metrics

    tok = build_tiny_tokenizer(tmp_path / "tok")
    train = write_task(tmp_path / "train", n_sft=2, n_pref=16, n_eval=2, seed=1)["pref"]
    held = write_task(tmp_path / "held", n_sft=2, n_pref=8, n_eval=2, seed=2)["pref"]
    model = tmp_path / "model"
    build_tiny_hf_model(
        str(model),
        "llama",
        vocab_size=len(load_tokenizer(tok)),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    out = tmp_path / "out"
    rc = train_main.main(
        [
            "dpo",
            "--recipe",
            RECIPE,
            f"model.hf_path={model}",
            f"model.tokenizer_path={tok}",
            f"data.train_paths=[{train}]",
            f"data.eval_paths=[{held}]",
            "train.global_batch_size=8",
            "train.max_steps=2",
            "train.eval_every=2",
            f"train.out_dir={out}",
            "train.tensorboard=false",
            "checkpoint.resume=none",
        ]
    )
    assert rc == 0
    assert len([f for f in os.listdir(out / "ref_cache") if f.endswith(".npz")]) == 2
    evals = [
        r for r in read_metrics(out / "metrics.jsonl") if any(k.startswith("eval/") for k in r)
    ]
    assert evals, "an eval record was written"
    rec = evals[-1]
    for k in ("eval/loss", "eval/accuracy", "eval/margin"):
        assert k in rec and rec[k] == rec[k], k  # present and not NaN


def test_dpo_with_lora_through_the_entry_point(tmp_path):
    """`model.lora` reaches the policy engine from a recipe override: DPO trains (its
    reference pass runs on the same engine with the adapters off) and the final export holds
    merged weights under the base model's names, changed only where adapters were
    (q/k/v/o/gate/up/down: embeddings, norms and the LM head stay frozen), which transformers
    loads."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from nova_engine.data.synthetic import write_task
    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.data.tokenize import load_tokenizer
    from nova_engine.model.tiny import build_tiny_hf_model

    tok = build_tiny_tokenizer(tmp_path / "tok")
    train = write_task(tmp_path / "train", n_sft=2, n_pref=16, n_eval=2, seed=1)["pref"]
    model = tmp_path / "model"
    build_tiny_hf_model(str(model), "llama", vocab_size=len(load_tokenizer(tok)), hidden_size=64,
                        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2)  # fmt: skip
    out = tmp_path / "out"
    rc = train_main.main(
        ["dpo", "--recipe", RECIPE, f"model.hf_path={model}", f"model.tokenizer_path={tok}",
         f"data.train_paths=[{train}]", "train.global_batch_size=8", "train.max_steps=2",
         "optim.lr=1e-2", f"train.out_dir={out}", "train.tensorboard=false",
         "checkpoint.resume=none", "model.lora.rank=4", "model.lora.alpha=8"]
    )  # fmt: skip
    assert rc == 0

    def weights(d):
        out_ = {}
        for f in os.listdir(d):
            if f.endswith(".safetensors"):
                out_.update(load_file(os.path.join(d, f)))
        return out_

    base, merged = weights(model), weights(out / "hf")
    assert set(merged) == set(base), "merged export: the base model's tensor names, no adapters"
    moved = {k for k in base if not torch.equal(base[k].float(), merged[k].float())}
    adapted = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert moved and all(any(a in k for a in adapted) for k in moved), sorted(moved)
    AutoModelForCausalLM.from_pretrained(out / "hf")


def test_world_of_one_takes_its_own_port(monkeypatch):
    """Without a launcher's RANK the process owns its rendezvous: an inherited MASTER_PORT
    that another process still listens on (a parent's store) is replaced by a free one."""
    import socket

    from nova_engine.train.runner import ensure_process_group_env

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    try:
        port = held.getsockname()[1]
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv("MASTER_PORT", str(port))
        ensure_process_group_env()
        assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"
        assert os.environ["MASTER_PORT"] != str(port)
        probe = socket.socket()
        probe.bind(("127.0.0.1", int(os.environ["MASTER_PORT"])))  # free: binds
        probe.close()
    finally:
        held.close()
