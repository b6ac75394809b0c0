"""Exact resume of a LoRA run (#31), through the entry point, world of one, format torch.

An SFT run with model.lora (every target kind, the LM head included, dropout 0.1 so the
restored RNG state matters) trains 4 steps uninterrupted; a second run in another directory
stops after step 2 (max_steps=2; constant LR so the schedule does not depend on the step
count) and is then rerun with max_steps=4 (checkpoint.resume=force: the step count is the
one changed key). Steps 3 and 4 of the resumed run have the uninterrupted run's losses and
gradient norms bit for bit, and both runs end on the same adapters and the same merged
export. The checkpoint it resumed from holds the frozen base and the adapters (A, B of each
of the 9 targets).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from nova_engine.train import __main__ as train_main

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from nova_engine.data.synthetic import write_task
    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.data.tokenize import load_tokenizer
    from nova_engine.model.tiny import build_tiny_hf_model

    d = tmp_path_factory.mktemp("lora_resume")
    tok = build_tiny_tokenizer(d / "tok")
    sft = write_task(d / "data", n_sft=48, n_pref=2, n_eval=2, seed=5)["sft"]
    model = d / "model"
    build_tiny_hf_model(str(model), "llama", vocab_size=len(load_tokenizer(tok)), hidden_size=32,
                        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    return {"tok": str(tok), "model": str(model), "sft": sft}


def _args(a, out, steps, *extra):
    return [
        "sft", "--recipe", RECIPE, f"model.hf_path={a['model']}", f"model.tokenizer_path={a['tok']}",
        "model.build=null", f"data.train_paths=[{a['sft']}]", "data.eval_paths=[]",
        "train.global_batch_size=8", f"train.max_steps={steps}", "train.log_every=1",
        "train.save_every=2", f"train.out_dir={out}", "train.tensorboard=false",
        "checkpoint.keep_last=5", "optim.lr=2e-2", "optim.schedule=constant",
        "optim.warmup_steps=0", "optim.warmup_ratio=null", "model.lora.rank=4",
        "model.lora.alpha=8", "model.lora.dropout=0.1",
        "model.lora.targets=[qkv,proj,fc1,fc2,lm_head]", *extra,
    ]  # fmt: skip


def _records(out) -> dict[int, dict]:
    """step -> the last logged training record of that step."""
    got = {}
    for line in open(os.path.join(out, "metrics.jsonl")):
        m = json.loads(line)
        if "loss" in m and "step" in m:
            got[m["step"]] = m
    return got


def _weights(d) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


@pytest.mark.slow  # three short training runs through the entry point
def test_lora_run_resumes_exactly(assets, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train_main.main(_args(assets, full, 4, "checkpoint.resume=none")) == 0
    assert train_main.main(_args(assets, cut, 2, "checkpoint.resume=none")) == 0
    ckpt = cut / "checkpoints" / "step_00000002"
    (shard,) = torch.load(ckpt / "mp_policy_tp00_pp00.pt", weights_only=True)["model"]
    lora = {n for n in shard if ".lora." in n}
    assert len(lora) == 2 * (4 * 2 + 1) and len(shard) > len(lora)  # base + A, B per target
    assert train_main.main(_args(assets, cut, 4, "checkpoint.resume=force")) == 0
    want, got = _records(full), _records(cut)
    assert sorted(want) == sorted(got) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        for k in ("loss", "grad_norm"):
            assert got[step][k] == want[step][k], (step, k, got[step][k], want[step][k])
    assert len({want[s]["loss"] for s in want}) == 4, "the adapters train: losses move"
    a, b = _weights(full / "hf"), _weights(cut / "hf")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"merged export differs at {k}"
    end_a = torch.load(full / "checkpoints" / "step_00000004" / "mp_policy_tp00_pp00.pt",
                       weights_only=True)["model"][0]  # fmt: skip
    end_b = torch.load(cut / "checkpoints" / "step_00000004" / "mp_policy_tp00_pp00.pt",
                       weights_only=True)["model"][0]  # fmt: skip
    for n in lora:
        assert torch.equal(end_a[n], end_b[n]), n
