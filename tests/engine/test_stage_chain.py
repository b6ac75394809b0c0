"""The README's stage chain, run the way it is written there (the `nova` entry point, each
stage starting from the previous stage's HF export alone, no tokenizer path after SFT):

    nova sft  --recipe R model.hf_path=<base> data.train_paths=[sft.jsonl] train.out_dir=runs/sft
    nova dpo  --recipe R model.hf_path=runs/sft/hf data.train_paths=[prefs.jsonl] ...
    nova rm   --recipe R model.hf_path=runs/sft/hf loss.loss_type=regression ...
    nova rm   --recipe R model.hf_path=runs/sft/hf loss.loss_type=scaled_bt \
              model.init_from=runs/rm_regression/hf ...
    nova rlvr --recipe R model.hf_path=runs/dpo/hf data.train_paths=[rlvr.jsonl] ...
    nova merge expo --init runs/sft/hf --aligned runs/dpo/hf --alpha 0.3 --out runs/dpo_expo
    nova generate --model runs/rlvr/hf --prompts prompts.jsonl --out out.jsonl

on the tiny CPU recipe with a few steps each: every command exits 0 and leaves a HF
directory that transformers loads.
"""

from __future__ import annotations

import json
import os

import pytest

from nova_engine import cli

pytestmark = pytest.mark.slow
RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "tiny_cpu.yaml")


def test_readme_stage_chain(tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from nova_engine.data.rlvr import write_arithmetic_rlvr
    from nova_engine.data.synthetic import write_task
    from nova_engine.data.synthetic_reward import write_reward_task
    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.data.tokenize import load_tokenizer
    from nova_engine.model.tiny import build_tiny_hf_model

    base = tmp_path / "base"
    tok = build_tiny_tokenizer(tmp_path / "tok")
    build_tiny_hf_model(
        str(base), "llama", vocab_size=len(load_tokenizer(tok)), hidden_size=32,
        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    for f in os.listdir(tok):  # a base model directory with its tokenizer, as users have
        os.link(os.path.join(tok, f), base / f)
    task = write_task(tmp_path / "data", n_sft=32, n_pref=16, n_eval=4, seed=5)
    rm_data = write_reward_task(tmp_path / "data", n_regression=16, n_pref=16, n_eval=8)
    rlvr = write_arithmetic_rlvr(tmp_path / "data" / "rlvr.jsonl", 16, skip=100, n_eval=4)
    runs = tmp_path / "runs"
    common = ["model.tokenizer_path=null", "model.build=null", "data.eval_paths=[]",
              "train.tensorboard=false", "train.log_every=1"]  # fmt: skip

    def nova(stage, *kv):
        assert cli.main([stage, "--recipe", RECIPE, *common, *kv]) == 0, (stage, kv)

    nova("sft", f"model.hf_path={base}", f"data.train_paths=[{task['sft']}]",
         "train.global_batch_size=8", "train.max_steps=2", f"train.out_dir={runs / 'sft'}")  # fmt: skip
    nova("dpo", f"model.hf_path={runs / 'sft' / 'hf'}", f"data.train_paths=[{task['pref']}]",
         "train.global_batch_size=4", "train.max_steps=2", f"train.out_dir={runs / 'dpo'}")  # fmt: skip
    nova("rm", f"model.hf_path={runs / 'sft' / 'hf'}", "loss.loss_type=regression",
         f"data.train_paths=[{rm_data['regression']}]", "train.global_batch_size=4",
         "train.max_steps=2", f"train.out_dir={runs / 'rm_regression'}")  # fmt: skip
    nova("rm", f"model.hf_path={runs / 'sft' / 'hf'}", "loss.loss_type=scaled_bt",
         f"model.init_from={runs / 'rm_regression' / 'hf'}",
         f"data.train_paths=[{rm_data['pref']}]", "train.global_batch_size=4",
         "train.max_steps=2", f"train.out_dir={runs / 'rm'}")  # fmt: skip
    nova("rlvr", f"model.hf_path={runs / 'dpo' / 'hf'}", f"data.train_paths=[{rlvr}]",
         "train.global_batch_size=2", "rollout.samples_per_prompt=2", "train.max_steps=2",
         f"train.out_dir={runs / 'rlvr'}")  # fmt: skip
    assert cli.main(["merge", "expo", "--init", str(runs / "sft" / "hf"), "--aligned",
                     str(runs / "dpo" / "hf"), "--alpha", "0.3",
                     "--out", str(runs / "dpo_expo")]) == 0  # fmt: skip
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is two plus two?"}) + "\n")
    out = tmp_path / "out.jsonl"
    assert cli.main(["generate", "--model", str(runs / "rlvr" / "hf"), "--prompts",
                     str(prompts), "--out", str(out), "--max-new-tokens", "4"]) == 0  # fmt: skip
    assert "response" in json.loads(out.read_text())
    for d in ("sft", "dpo", "rlvr", "dpo_expo"):
        AutoModelForCausalLM.from_pretrained(runs / d / "hf" if d != "dpo_expo" else runs / d)
    rm = AutoModelForSequenceClassification.from_pretrained(runs / "rm" / "hf")
    assert rm.config.num_labels == 1
