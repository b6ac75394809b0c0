"""`nova plan` with model.lora (#31): the planner's LoRA memory terms against a hand
computation written out here from the published configs (no planner helpers), and the
goal of the issue: 70B LoRA DPO fits one node of 8 x 80 GB while full DPO does not."""

from __future__ import annotations

import json

import pytest

from nova_engine.model.arch import arch_from_hf_config
from nova_engine.tools import plan
from nova_engine.tools import plan_terms as P

RECIPE = "recipes/llama3_70b.yaml"


def _arch(name: str):
    with open(f"recipes/configs/{name}/config.json") as f:
        return arch_from_hf_config(json.load(f))


def _by_hand(cfg: dict, tp: int, pp: int, stage_rank: int, r: int, lm_head: bool, score: bool):
    """(base params, adapter params) of one GPU of pipeline stage `stage_rank`, from the HF
    config's numbers: decoder layer = q/k/v/o + gate/up/down (split over TP) + 2 norms;
    LoRA per target A [r, in] + B [out, r], the split side divided by TP."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv_heads, layers = (cfg["num_attention_heads"], cfg["num_key_value_heads"],
                               cfg["num_hidden_layers"])  # fmt: skip
    d = h // heads
    q, kv = heads * d, kv_heads * d
    per_layer = (h * q + 2 * h * kv + q * h + 3 * h * f) // tp + 2 * h
    n_layers = layers // pp
    base = n_layers * per_layer
    if stage_rank == 0:
        base += v * h // tp
    adapters = (
        n_layers
        * r
        * (
            (h + (q + 2 * kv) // tp)  # qkv: column, A whole, B split
            + (q // tp + h)  # o: row, A split, B whole
            + (h + 2 * f // tp)  # gate+up: column
            + (f // tp + h)  # down: row
        )
    )
    if stage_rank == pp - 1:
        base += h  # final norm
        if score:
            base += h  # a 1-output score head (trained in full with LoRA)
            adapters += h
        else:
            base += v * h // tp  # untied LM head
            if lm_head:
                adapters += r * h + v * r // tp
    return base, adapters


@pytest.mark.parametrize("name", ["Llama-3.1-8B", "Llama-3.1-70B"])
@pytest.mark.parametrize("stage", ["dpo", "rlvr"])
@pytest.mark.parametrize("tp,pp,dp", [(8, 1, 1), (4, 2, 2), (2, 4, 1)])
@pytest.mark.parametrize("lm_head", [False, True])
def test_lora_terms_equal_a_hand_computation(name, stage, tp, pp, dp, lm_head):
    with open(f"recipes/configs/{name}/config.json") as f:
        cfg = json.load(f)
    arch, r = _arch(name), 16
    targets = ("qkv", "proj", "fc1", "fc2") + (("lm_head",) if lm_head else ())
    lay = P.Layout(tp, pp, dp, sp=tp > 1)
    wl = P.Workload(stage, 4096, 4, lora_rank=r, lora_targets=targets, critic=True,
                    critic_lora_rank=r)  # fmt: skip
    full_critic = P.plan(arch, lay, P.Workload(stage, 4096, 4, lora_rank=r, critic=True))
    full = P.plan(arch, lay, P.Workload(stage, 4096, 4, critic=True))
    for p, rm in enumerate(P.plan(arch, lay, wl)):
        base, ad = _by_hand(cfg, tp, pp, p, r, lm_head, score=False)
        t = rm.terms
        assert t["weights (frozen base)"] == base * 2
        assert t["lora weights"] == ad * 2
        assert t["lora grads (fp32)"] == ad * 4
        assert t["lora optimizer"] == ad * 12 / dp  # fp32 master + Adam m, v; ZeRO-1 over DP
        for gone in ("weights", "grads (fp32)", "optimizer", "reference weights"):
            assert gone not in t, gone  # frozen base: no grads / state; no reference copy
        assert t["activations"] == full[p].terms["activations"]
        if stage == "rlvr":  # critic.lora: its own frozen base, adapters + score head
            cbase, cad = _by_hand(cfg, tp, pp, p, r, lm_head=False, score=True)
            assert t["critic weights (frozen base)"] == cbase * 2
            assert t["critic lora optimizer"] == cad * 12 / dp
            assert "reference weights" in full[p].terms
            c = full_critic[p].terms  # policy LoRA, critic in full: weights, grads, Adam
            assert c["critic optimizer"] == cbase * 12 / dp and "reference weights" not in c
        if lm_head and p == pp - 1:
            assert t["lora: lm head W + s B A"] == cfg["vocab_size"] // tp * cfg["hidden_size"] * 2
        assert rm.total < full[p].total


def _evaluated(stage: str, world: int, *overrides: str):
    run, arch, _, _ = plan.resolve(RECIPE, stage, None, world, ["parallel.pp=1", *overrides])
    return run, arch, plan.rank_alternatives(arch, run, stage, world, plan.Options())


def test_70b_lora_dpo_fits_one_node_and_full_dpo_does_not():
    run, arch, lora = _evaluated("dpo", 8, "model.lora.rank=16")
    assert run.model.lora is not None and lora[0].fits
    _, _, full = _evaluated("dpo", 8)
    assert not any(e.fits for e in full)
    (world, best) = plan.smallest_fit(arch, run, "dpo", plan.Options())  # fmt: skip
    assert world <= 8 and best.fits
    run_full, _, _ = _evaluated("dpo", 8)
    assert plan.smallest_fit(arch, run_full, "dpo", plan.Options())[0] > 8


def test_plan_cli_reports_lora(capsys):
    argv = ["--recipe", RECIPE, "--stage", "dpo", "--world", "8", "parallel.pp=1"]
    assert plan.main([*argv, "model.lora.rank=16"]) == 0
    out = capsys.readouterr().out
    assert "LoRA r=16" in out and "weights (frozen base)" in out and ": fits" in out
    assert "smallest world that fits:" in out
    assert plan.main(argv) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
