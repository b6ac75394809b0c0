"""`nova generate` under torchrun, the form the README shows: torchrun's own parser reads the
whole command line (its flags are matched by prefix even after the module name, so `--n`
was "ambiguous option: --n could match --nnodes, ..."). Every option of `nova generate`
passes through torchrun's parser untouched; a real `torchrun --nproc_per_node 1 -m
nova_engine.cli generate ... --num-samples 2` run writes two samples per prompt."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from torch.distributed.run import get_args_parser

from nova_engine.tools.generate import _parser

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCHRUN = ["--standalone", "--nproc_per_node", "1", "-m", "nova_engine.cli", "generate"]


def _every_option() -> list[str]:
    """Each option of `nova generate` once, with a value where it takes one."""
    argv = []
    for action in _parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        for opt in action.option_strings:
            argv.append(opt)
            if action.nargs != 0:
                argv.append(action.choices[0] if action.choices else "2")
    return argv


def test_torchrun_passes_every_generate_option_through():
    args = _every_option()
    assert "--num-samples" in args and "--n" not in args
    ns = get_args_parser().parse_args([*TORCHRUN, *args])  # exits 2 on an ambiguous option
    assert ns.module and ns.training_script == "nova_engine.cli"
    assert ns.training_script_args == ["generate", *args]
    mine = _parser().parse_args(ns.training_script_args[1:])
    assert mine.n == 2


def test_the_old_flag_is_what_torchrun_refused(capsys):
    with pytest.raises(SystemExit) as e:
        get_args_parser().parse_args([*TORCHRUN, "--model", "m", "--n", "2"])
    assert e.value.code == 2 and "ambiguous option: --n" in capsys.readouterr().err


@pytest.mark.slow  # a torchrun agent and one worker process
def test_torchrun_generate_num_samples(tmp_path):
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.model.tiny import tiny_hf_config

    build_tiny_tokenizer(str(tmp_path / "tok"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    cfg = tiny_hf_config("qwen2", vocab_size=len(tok), max_position_embeddings=64)
    cfg.architectures = ["Qwen2ForCausalLM"]
    model_dir = tmp_path / "model"
    Qwen2ForCausalLM(cfg).save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"prompt": "what is two plus two?"}\n{"prompt": "say hi"}\n')
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", *TORCHRUN, "--model", str(model_dir),
           "--prompts", str(prompts), "--out", str(out), "--num-samples", "2",
           "--max-new-tokens", "4", "--seed", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["what is two plus two?", "say hi"]
    for row in rows:
        assert isinstance(row["response"], list) and len(row["response"]) == 2
        assert len(row["tokens"]) == 2 and all(1 <= len(t) <= 4 for t in row["tokens"])
