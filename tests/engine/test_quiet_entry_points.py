"""Known third-party noise is filtered in the entry points (#32 item 5), each run here as a
user runs it (a fresh process, so the filters are the entry point's own, not pytest's):

- `python -m nova_engine.train sft` (1 step): no megatron "Transformer Engine / Apex are not
  installed" UserWarning, no deprecation note, no `warnings.warn(` source line; the same
  command with `--verbose` shows them (so the first check can fail);
- `nova run --nproc-per-node 2 sft`: no torchrun OMP_NUM_THREADS banner, and the progress
  line of the step once (rank 0), not once per rank;
- `nova merge expo --eval` (loads models with transformers): no "Loading weights" bar.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nova_engine.data.synthetic import write_task
from nova_engine.data.tiny import build_tiny_tokenizer
from nova_engine.data.tokenize import load_tokenizer
from nova_engine.model.tiny import build_tiny_hf_model

pytestmark = pytest.mark.slow
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RECIPE = os.path.join(ROOT, "recipes", "tiny_cpu.yaml")
NOISE = ("Transformer Engine", "Apex is not installed", "warnings.warn(", "UserWarning",
         "DeprecationWarning", "Loading weights", "OMP_NUM_THREADS")  # fmt: skip


def _run(args, tmp, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "NOVA_VERBOSE")}
    e.update(PYTHONPATH=ROOT, **env)
    return subprocess.run(args, capture_output=True, text=True, env=e, cwd=tmp, timeout=400)


def test_entry_points_are_quiet(tmp_path):
    tok = build_tiny_tokenizer(tmp_path / "tok")
    base = tmp_path / "base"
    build_tiny_hf_model(str(base), "llama", vocab_size=len(load_tokenizer(tok)), hidden_size=32,
                        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2)  # fmt: skip
    for f in os.listdir(tok):
        os.link(os.path.join(tok, f), base / f)
    task = write_task(tmp_path / "data", n_sft=8, n_pref=8, n_eval=2, seed=1)

    def stage(out, *extra):
        return ["sft", "--recipe", RECIPE, "model.tokenizer_path=null", "model.build=null",
                f"model.hf_path={base}", f"data.train_paths=[{task['sft']}]",
                "data.eval_paths=[]", "train.max_steps=1", "train.global_batch_size=4",
                "train.log_every=1", "train.tensorboard=false", f"train.out_dir={out}", *extra]  # fmt: skip

    quiet = _run([sys.executable, "-m", "nova_engine.train", *stage(tmp_path / "a")], tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert not [n for n in NOISE if n in quiet.stderr], quiet.stderr
    assert "[sft] step 1/1" in quiet.stderr + quiet.stdout

    loud = _run([sys.executable, "-m", "nova_engine.train", *stage(tmp_path / "b"), "--verbose"],
                tmp_path)  # fmt: skip
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "Transformer Engine and Apex are not installed" in loud.stderr

    launched = _run([sys.executable, "-m", "nova_engine.cli", "run", "--nproc-per-node", "2",
                     *stage(tmp_path / "c")], tmp_path)  # fmt: skip
    both = launched.stderr + launched.stdout
    assert launched.returncode == 0, both[-3000:]
    assert not [n for n in NOISE if n in launched.stderr], launched.stderr
    assert both.count("[sft] step 1/1") == 1, both

    merged = _run([sys.executable, "-m", "nova_engine.cli", "merge", "expo", "--init", str(base),
                   "--aligned", str(tmp_path / "a" / "hf"), "--alphas", "0.5,1.0",
                   "--eval", task["pref"], "--out", str(tmp_path / "expo")], tmp_path)  # fmt: skip
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert not [n for n in NOISE if n in merged.stderr], merged.stderr
