"""RLVR with LoRA (model.lora, critic.lora) through the real entry point: the KL reference is
the policy's own shards with the adapters off (no second model is built), and a run with a
frozen copy of the same weights as the reference (model.reference_path) gives the same
per-step KL and losses; PPO's critic trains LoRA adapters + its score head; the merged
export changes only the adapted linears."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from nova_engine.train import __main__ as train_main

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from nova_engine.data.rlvr import write_arithmetic_rlvr
    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.data.tokenize import load_tokenizer
    from nova_engine.model.tiny import build_tiny_hf_model

    root = tmp_path_factory.mktemp("rlvr_lora")
    tok = build_tiny_tokenizer(root / "tok")
    model = root / "model"
    build_tiny_hf_model(str(model), "llama", vocab_size=len(load_tokenizer(tok)), hidden_size=64,
                        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2)  # fmt: skip
    copy = root / "model_copy"  # the same weights under another path: a frozen second model
    shutil.copytree(model, copy)
    data = write_arithmetic_rlvr(root / "rlvr.jsonl", 32, seed=3)
    return {"root": root, "tok": tok, "model": model, "copy": copy, "data": data}


def _run(assets, name, *extra):
    from nova_engine.train.metrics import read_metrics

    out = assets["root"] / name
    rc = train_main.main(
        ["rlvr", "--recipe", RECIPE, f"model.hf_path={assets['model']}",
         f"model.tokenizer_path={assets['tok']}", f"data.train_paths=[{assets['data']}]",
         "train.global_batch_size=4", "rollout.samples_per_prompt=4", "train.max_steps=3",
         "loss.num_mini_batches=1", "optim.lr=2e-2", "loss.kl_coef=0.5", "loss.advantage=gae",
         f"critic.init_from={assets['model']}", "critic.lora.rank=2", "train.log_every=1",
         f"train.out_dir={out}", "train.tensorboard=false", "checkpoint.resume=none",
         "model.lora.rank=4", "model.lora.alpha=8", *extra]
    )  # fmt: skip
    assert rc == 0
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "kl" in r]
    assert [r["step"] for r in rows] == [1, 2, 3], rows
    return out, rows


@pytest.mark.slow  # two short RLVR runs
def test_adapters_off_reference_equals_a_frozen_copy(assets, monkeypatch):
    from nova_engine.train import engine

    built = []
    real = engine.ModelEngine.from_hf.__func__

    def counting(cls, *a, **k):
        built.append(k.get("name"))
        return real(cls, *a, **k)

    monkeypatch.setattr(engine.ModelEngine, "from_hf", classmethod(counting))
    out, view = _run(assets, "view")
    assert "reference" not in built, built  # no second model: the policy with adapters off
    built.clear()
    _, copy = _run(assets, "copy", f"model.reference_path={assets['copy']}")
    assert "reference" in built, built
    assert view[0]["kl"] == 0.0  # B = 0: the policy is the base model exactly
    assert view[-1]["kl"] > 0  # the adapters moved the policy away from its base
    for a, b in zip(view, copy):
        for key in ("kl", "policy_loss", "value_loss", "reward_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (key, a["step"])

    from safetensors.torch import load_file

    def weights(d):
        got = {}
        for f in os.listdir(d):
            if f.endswith(".safetensors"):
                got.update(load_file(os.path.join(d, f)))
        return got

    base, merged = weights(assets["model"]), weights(out / "hf")
    assert set(merged) == set(base)
    moved = {k for k in base if not torch.equal(base[k].float(), merged[k].float())}
    adapted = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert moved and all(any(a in k for a in adapted) for k in moved), sorted(moved)
    critic = weights(out / "hf_critic")
    assert "score.weight" in critic
    moved_c = {
        k for k in base if k in critic and not torch.equal(base[k].float(), critic[k].float())
    }
    assert moved_c and all(any(a in k for a in adapted) for k in moved_c), sorted(moved_c)
