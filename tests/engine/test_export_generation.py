"""Exports stop in plain `transformers.generate` (#32 item 2): complete_hf_export writes
bos / eos / pad from the tokenizer into config.json and generation_config.json, eos as the
list of end-of-sequence and end-of-turn ids (<|eot_id|>, which the chat template ends turns
with), whatever the source config said (a randomly built Llama carries transformers'
default eos 2, <|start_header_id|> in the tiny tokenizer; Qwen2's is None).

Stopping is made deterministic with generate's own knobs, not with eos ids passed by the
test: `sequence_bias` makes <|eot_id|> the greedy token and `min_new_tokens=N` suppresses
the generation config's eos ids for N steps, so a model whose generation config holds the
end-of-turn id stops after exactly N + 1 new tokens, and one that does not runs to
max_new_tokens. The slow test runs the real stages (sft, rm) and checks their exports.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from nova_engine.data.tiny import EOT, build_tiny_tokenizer
from nova_engine.data.tokenize import load_tokenizer
from nova_engine.model.hf_export import TOKENIZER_FILES, complete_hf_export
from nova_engine.model.tiny import build_tiny_hf_model

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)  # fmt: skip


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return str(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def _generate(model_dir: str, n_min: int, max_new: int = 12) -> tuple[list[int], int]:
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    eot = tok.convert_tokens_to_ids(EOT)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is two plus two?"}],
                                     add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)  # fmt: skip
    with torch.no_grad():
        out = model.generate(**prompt, do_sample=False, max_new_tokens=max_new,
                             min_new_tokens=n_min, sequence_bias={(eot,): 50.0})  # fmt: skip
    return out[0, prompt["input_ids"].shape[1] :].tolist(), eot


def _check_ids(model_dir: str) -> None:
    tok = load_tokenizer(model_dir)
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    gen = json.load(open(os.path.join(model_dir, "generation_config.json")))
    eot = tok.convert_tokens_to_ids(EOT)
    for c in (cfg, gen):
        assert eot in c["eos_token_id"] and tok.eos_token_id in c["eos_token_id"]
        assert tok.convert_tokens_to_ids("<|start_header_id|>") not in c["eos_token_id"]
        assert c["bos_token_id"] == tok.bos_token_id
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(model_dir))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_completed_export_stops_on_end_of_turn(tmp_path, tok_dir, family):
    src = tmp_path / "src"
    vocab = len(load_tokenizer(tok_dir))
    build_tiny_hf_model(str(src), family, seed=3, vocab_size=vocab, **SMALL)
    default_eos = json.load(open(src / "config.json")).get("eos_token_id")
    # the source as `model.build` leaves it: transformers' default ids, no tokenizer
    before = tmp_path / "before"
    build_tiny_hf_model(str(before), family, seed=3, vocab_size=vocab, **SMALL)
    for n in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(tok_dir, n)):
            os.link(os.path.join(tok_dir, n), before / n)
    new, eot = _generate(str(before), n_min=3)
    assert default_eos != eot and len(new) == 12 and new[-1] == eot  # runs to the limit

    out = tmp_path / "export"
    build_tiny_hf_model(str(out), family, seed=3, vocab_size=vocab, **SMALL)
    os.remove(out / "generation_config.json")
    complete_hf_export(str(out), source_dir=str(src), tokenizer_dir=tok_dir)
    _check_ids(str(out))
    pad = load_tokenizer(str(out)).pad_token_id
    assert json.load(open(out / "config.json"))["pad_token_id"] == pad
    for n_min in (2, 5):
        new, eot = _generate(str(out), n_min=n_min)
        assert len(new) == n_min + 1 and new[-1] == eot and eot not in new[:-1], new


@pytest.mark.slow
def test_stage_exports_stop_and_hold_the_tokenizer(tmp_path, tok_dir):
    """sft and rm (regression) exports through the real entry point: the policy stops on
    <|eot_id|> in transformers.generate, the reward model keeps its own pad id (not an end
    token), both hold the tokenizer files and load with plain transformers."""
    from transformers import AutoModelForSequenceClassification

    from nova_engine import cli
    from nova_engine.data.synthetic import write_task
    from nova_engine.data.synthetic_reward import write_reward_task

    base = tmp_path / "base"
    build_tiny_hf_model(str(base), "llama", vocab_size=len(load_tokenizer(tok_dir)), **SMALL)
    for f in os.listdir(tok_dir):
        os.link(os.path.join(tok_dir, f), base / f)
    task = write_task(tmp_path / "data", n_sft=8, n_pref=4, n_eval=2, seed=1)
    rm_data = write_reward_task(tmp_path / "data", n_regression=8, n_pref=4, n_eval=4)
    recipe = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "tiny_cpu.yaml")
    common = ["model.tokenizer_path=null", "model.build=null", "data.eval_paths=[]",
              "train.tensorboard=false", "train.max_steps=1", "train.global_batch_size=4"]  # fmt: skip
    sft, rm = tmp_path / "sft", tmp_path / "rm"
    assert cli.main(["sft", "--recipe", recipe, *common, f"model.hf_path={base}",
                     f"data.train_paths=[{task['sft']}]", f"train.out_dir={sft}"]) == 0  # fmt: skip
    assert cli.main(["rm", "--recipe", recipe, *common, f"model.hf_path={sft / 'hf'}",
                     f"data.train_paths=[{rm_data['regression']}]", f"train.out_dir={rm}"]) == 0  # fmt: skip
    _check_ids(str(sft / "hf"))
    new, eot = _generate(str(sft / "hf"), n_min=4)
    assert len(new) == 5 and new[-1] == eot
    _check_ids(str(rm / "hf"))
    cfg = json.load(open(rm / "hf" / "config.json"))
    assert cfg["pad_token_id"] not in cfg["eos_token_id"]  # the score is read before padding
    tok = load_tokenizer(str(rm / "hf"))
    model = AutoModelForSequenceClassification.from_pretrained(rm / "hf").eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], return_tensors="pt",
                                  return_dict=True)  # fmt: skip
    with torch.no_grad():
        scores = model(**ids).logits
    assert scores.shape[0] == 1 and torch.isfinite(scores).all()
