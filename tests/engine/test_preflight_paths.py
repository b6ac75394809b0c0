"""Checks that come before any process group or model load (#32 item 4): a micro-batch
that does not split over tp, and the other model directories a stage reads (rm
`model.init_from`, rlvr `critic.init_from` / `model.reference_path`: they must exist, hold a
*ForCausalLM or a *ForSequenceClassification, and the reference / RM init the policy's
dimensions). Each case goes through `python -m nova_engine.train`'s `main` with the process
group's creation replaced by a tripwire, and must end with exit 2 and one line naming the
key; one case runs as a real subprocess (exit code and stderr as a user sees them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nova_engine.data.tiny import build_tiny_tokenizer
from nova_engine.data.tokenize import load_tokenizer
from nova_engine.model.tiny import build_tiny_hf_model

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
RECIPE = os.path.join(ROOT, "recipes", "tiny_cpu.yaml")
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    tok = build_tiny_tokenizer(root / "tok")
    vocab = len(load_tokenizer(tok))
    vocab += vocab % 2  # tp=2 divides it: the micro-batch check is the one that fires
    model = root / "model"
    build_tiny_hf_model(str(model), "llama", vocab_size=vocab, **SMALL)
    for f in os.listdir(tok):
        os.link(os.path.join(tok, f), model / f)
    other = root / "wider"  # another model: hidden 64
    build_tiny_hf_model(str(other), "llama", vocab_size=vocab, **{**SMALL, "hidden_size": 64})
    othervocab = root / "othervocab"  # a reference must score the policy's tokens
    build_tiny_hf_model(str(othervocab), "llama", vocab_size=vocab + 8, **SMALL)
    notmodel = root / "notmodel"  # a config.json of another class
    notmodel.mkdir()
    (notmodel / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    rm5 = root / "rm5"  # a 5-output regression reward model's config
    rm5.mkdir()
    names = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
    cfg = json.load(open(model / "config.json"))
    cfg.update(architectures=["LlamaForSequenceClassification"], id2label=dict(enumerate(names)))
    (rm5 / "config.json").write_text(json.dumps(cfg))
    data = root / "x.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    return {
        "root": root,
        "model": model,
        "wider": other,
        "othervocab": othervocab,
        "notmodel": notmodel,
        "data": data,
        "rm5": rm5,
    }


def _args(env, stage, *kv):
    return [stage, "--recipe", RECIPE, "model.tokenizer_path=null", "model.build=null",
            f"model.hf_path={env['model']}", f"data.train_paths=[{env['data']}]",
            "data.eval_paths=[]", f"train.out_dir={env['root'] / ('out_' + stage)}", *kv]  # fmt: skip


def _tripwire(*a, **k):
    raise AssertionError("a process group was started before the checks")


CASES = [
    ("sft", ["train.micro_batch_tokens=2047", "parallel.tp=2", "data.max_length=64"], 2,
     "train.micro_batch_tokens", "not a multiple of parallel.tp=2"),
    ("rlvr", ["loss.advantage=gae", "critic.init_from={root}/nowhere"], 1,
     "critic.init_from", "no such directory"),
    ("rlvr", ["loss.advantage=gae", "critic.init_from={notmodel}"], 1,
     "critic.init_from", "BertModel"),
    ("rlvr", ["model.reference_path={othervocab}"], 1, "model.reference_path", "vocab_size"),
    ("rlvr", ["loss.advantage=gae", "critic.init_from={rm5}"], 1, "critic.output",
     "helpfulness"),
    ("rm", ["model.init_from={root}/nowhere"], 1, "model.init_from", "no such directory"),
    ("rm", ["model.init_from={wider}"], 1, "model.init_from", "is not a model of"),
]  # fmt: skip


@pytest.mark.parametrize("stage,kv,world,key,what", CASES)
def test_checked_before_any_process_group(env, stage, kv, world, key, what, monkeypatch, capsys):
    from nova_engine.train import __main__ as train_main
    from nova_engine.train import runner

    monkeypatch.setattr(runner, "initialize_parallel", _tripwire)
    monkeypatch.setattr("torch.distributed.init_process_group", _tripwire)
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(world)).items():
        monkeypatch.setenv(k, v)
    kv = [s.format(**{k: str(v) for k, v in env.items()}) for s in kv]
    assert train_main.main(_args(env, stage, *kv)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and key in err[0] and what in err[0], err
    assert not os.path.exists(env["root"] / f"out_{stage}" / ".nova.lock")


def test_entry_point_subprocess_one_line(env):
    """`python -m nova_engine.train` as launched by torchrun's rank 0 of a world of 2: exit 2,
    one line on stderr, no lock (taken right after the process group) in out_dir."""
    e = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
             MASTER_PORT="1", PYTHONPATH=os.path.abspath(ROOT))  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "nova_engine.train",
         *_args(env, "dpo", "parallel.tp=2", "train.micro_batch_tokens=1001")],
        capture_output=True, text=True, env=e, timeout=300,
    )  # fmt: skip
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(lines) == 1 and "train.micro_batch_tokens" in lines[0], lines
    assert not os.path.exists(env["root"] / "out_dpo" / ".nova.lock")
