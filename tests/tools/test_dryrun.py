"""`nova dryrun`: every rank of the 70B/72B recipes built on the meta device under the fake
process-group backend, for every stage (sft, dpo, rm, rlvr), one subprocess per recipe (the
two run side by side). The per-rank parameter counts must add up to the published model
sizes and equal the planner's weights; the checker itself must catch a wrong count.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nova_engine.model.arch import arch_from_hf_config
from nova_engine.tools import dryrun
from nova_engine.tools import plan_terms as P

pytestmark = pytest.mark.slow  # a subprocess per 70B recipe, every rank built on meta

RECIPES = {"llama3_70b": "70.55B", "qwen2_72b": "72.71B"}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def runs():
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nova_engine.cli",
                "dryrun",
                "--recipe",
                f"recipes/{name}.yaml",
                "--stage",
                "all",
                "--quiet",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in RECIPES
    }
    return {name: (p.wait(timeout=600), *p.communicate()) for name, p in procs.items()}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_rank_of_every_stage_adds_up(runs, name):
    rc, out, err = runs[name]
    assert rc == 0, out + err
    lines = out.splitlines()
    for stage in dryrun.STAGES:
        assert any(f"[{stage}]" in line and "ranks built on meta" in line for line in lines)
    checks = [line for line in lines if "per-rank counts add up" in line]
    # sft, dpo: policy; rm: reward; rlvr: policy, reference, critic
    assert len(checks) == 6 and all(line.endswith(": OK") for line in checks), out
    assert sum(f"policy: {RECIPES[name]} params" in line for line in checks) == 3
    assert "FAIL" not in err


def _tiny_arch():
    return arch_from_hf_config(
        {
            "architectures": ["Qwen2ForCausalLM"],
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 512,
            "tie_word_embeddings": True,
        }
    )


def _reports(arch, lay: P.Layout) -> list[dryrun.RankReport]:
    """What a correct build reports (megatron rank order tp-dp-pp), from the planner."""
    out = []
    for rank in range(lay.world):
        tp_rank, dp_rank, pp_rank = (
            rank % lay.tp,
            (rank // lay.tp) % lay.dp,
            rank // (lay.tp * lay.dp),
        )
        n = sum(P.stage_params(arch, lay, pp_rank).values())
        tied = arch.vocab_size * arch.hidden_size // lay.tp if pp_rank == lay.pp - 1 else 0
        r = dryrun.RankReport(rank, tp_rank, pp_rank, dp_rank)
        r.params["lm"], r.weight_bytes["lm"] = n, 2 * n
        r.replicated["lm"] = P.replicated_params(arch, lay, pp_rank)
        r.tied_copy["lm"] = tied
        r.grad_buffer["lm"], r.optim_shard["lm"] = n, n // lay.dp
        out.append(r)
    return out


def test_check_catches_a_wrong_rank():
    from types import SimpleNamespace

    arch, lay = _tiny_arch(), P.Layout(2, 2, 2)
    par = SimpleNamespace(tp=2, pp=2, vpp=1, sp=False, distributed_optimizer=True)
    run = SimpleNamespace(parallel=par, train=SimpleNamespace(precision="bf16"))
    reports = _reports(arch, lay)
    assert dryrun.check(reports, arch, run, "sft") == []
    reports[5].params["lm"] += 1  # one rank holds a parameter too many
    errors = dryrun.check(reports, arch, run, "sft")
    assert any("rank 5" in e for e in errors) and any("add up to" in e for e in errors)
