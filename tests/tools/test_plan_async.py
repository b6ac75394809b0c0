"""`nova plan` with `rlvr.mode: async`: the training and the generation group planned apart.

The generation group's per-GPU bytes are computed here by hand from the published
Llama-3.1-8B config.json (the recipe's model) -- parameter counts from the HF shapes, the KV
cache from the layer/head dimensions -- and compared with the planner exactly; the training
group must be the colocated plan of the same layout on world - generation_ranks GPUs, term by
term, without the KV cache. The split is validated before anything is planned (exit 2 naming
the key), as the run checks it (RLVRSection.split).
"""

from __future__ import annotations

import json
import re

import pytest

from nova_engine.tools import plan

RECIPE = "recipes/llama3_8b_grpo.yaml"
CONFIG = "recipes/configs/Llama-3.1-8B"
GIB = 1024**3


def _hf() -> dict:
    with open(f"{CONFIG}/config.json") as f:
        return json.load(f)


def _hand(gtp: int, gpp: int, rows: int, length: int) -> list[dict]:
    """Per generation stage: bf16 weights of that stage's HF tensors / gtp, the KV cache of
    `rows` sequences of `length` tokens (K and V, bf16) of its layers, the 4 GiB reserve."""
    c = _hf()
    h, f, v, n_layers = (c[k] for k in ("hidden_size", "intermediate_size", "vocab_size",
                                        "num_hidden_layers"))  # fmt: skip
    d = h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    per_layer = (
        (h * q + 2 * h * kv)  # q_proj, k_proj, v_proj [out, in]
        + q * h  # o_proj
        + 3 * h * f  # gate_proj, up_proj, down_proj
    ) // gtp + 2 * h  # input / post-attention RMSNorm, replicated
    out = []
    for stage in range(gpp):
        layers = n_layers // gpp
        params = layers * per_layer
        if stage == 0:
            params += v * h // gtp  # embed_tokens, vocab-parallel
        if stage == gpp - 1:
            params += h + v * h // gtp  # final norm, untied lm_head
        kv_cache = rows * length * layers * (c["num_key_value_heads"] // gtp) * d * 2 * 2
        out.append({"params": params, "weights": params * 2, "kv": kv_cache,
                    "total": params * 2 + kv_cache + 4 * GIB})  # fmt: skip
    return out


def _run(capsys, *args: str) -> tuple[int, str, str]:
    rc = plan.main(["--recipe", RECIPE, "--stage", "rlvr", "--config", CONFIG, "--top", "2",
                    *args])  # fmt: skip
    got = capsys.readouterr()
    return rc, got.out, got.err


@pytest.mark.parametrize(
    ("world", "gen", "gtp", "gpp"), [(8, 2, 2, 1), (12, 4, 2, 2), (9, 1, 1, 1)]
)
def test_generation_group_equals_hand_computation(capsys, world, gen, gtp, gpp):
    rc, out, err = _run(capsys, "--world", str(world), "rlvr.mode=async",
                        f"rlvr.generation_ranks={gen}", f"rlvr.generation_tp={gtp}",
                        f"rlvr.generation_pp={gpp}")  # fmt: skip
    assert rc in (0, 1) and not err, err
    t = world - gen
    assert f"training group of {t} (ranks 0..{t - 1}) + generation group of {gen} " in out
    # the recipe: rollout.max_batch_size 64, data.max_length 2048 + max_new_tokens 2048
    hand = _hand(gtp, gpp, 64, 2048 + 2048)
    head = f"generation group TP{gtp} PP{gpp} DP{gen // (gtp * gpp)}: frozen weights (bf16), "
    assert head + "KV cache of 64 sequences x 4096 tokens" in out, out
    table = out.split(head, 1)[1]
    for name, key in (("weights (frozen policy)", "weights"), ("kv cache", "kv"),
                      ("total", "total")):  # fmt: skip
        row = re.search(rf"^{re.escape(name)}\s+(.*)$", table, re.M)
        assert row is not None, (name, table)
        got = [float(x) for x in row.group(1).split()]
        assert got == [round(s[key] / GIB, 2) for s in hand], (name, got, hand)
    # and exactly, on the planner's own numbers
    run, arch, _, _ = plan.resolve(RECIPE, "rlvr", CONFIG, world,
                                   ["rlvr.mode=async", f"rlvr.generation_ranks={gen}",
                                    f"rlvr.generation_tp={gtp}", f"rlvr.generation_pp={gpp}"])  # fmt: skip
    train, gen_ranks = plan.async_split(run, arch, world, CONFIG)
    assert (train, gen_ranks) == (range(0, t), range(t, world))
    ev = plan.evaluate_generation(arch, run, gen_ranks, plan.Options())
    assert len(ev.stages) == gpp
    for s, want in zip(ev.stages, hand):
        assert s.params == want["params"]
        assert s.terms["weights (frozen policy)"] == want["weights"]
        assert s.terms["kv cache"] == want["kv"]
        assert s.total == want["total"]
        assert set(s.terms) == {"weights (frozen policy)", "kv cache", "reserve"}
    assert ev.fits == (max(w["total"] for w in hand) <= 80 * GIB)


def test_training_group_is_the_colocated_plan_without_kv_cache(capsys):
    args = ["rlvr.generation_ranks=2"]
    colo, arch, _, _ = plan.resolve(RECIPE, "rlvr", CONFIG, 8, args)
    asy, _, _, _ = plan.resolve(RECIPE, "rlvr", CONFIG, 8, [*args, "rlvr.mode=async"])
    lay = plan.recipe_layout(colo, 6)  # the training group: 8 - 2 ranks, TP2 DP3
    opt = plan.Options(critic=False, rollout_batch=512)  # a cache beyond the activations
    a = plan.evaluate(arch, colo, "rlvr", lay, opt).stages[0].terms
    b = plan.evaluate(arch, asy, "rlvr", lay, opt).stages[0].terms
    kv = "kv cache (beyond train activations)"
    assert kv in a and a[kv] > 0 and kv not in b
    assert {k: v for k, v in a.items() if k != kv} == b
    assert "reference weights" in b and not any(k.startswith("critic") for k in b)
    rc, out, _ = _run(capsys, "--world", "8", "--no-critic", "rlvr.mode=async", *args)
    assert rc == 0 and "TP2+SP PP1 DP3 selective: fits" in out, out
    train_table = out.split("training group (")[1].split("\ngeneration group TP")[0]
    total = re.search(r"^total\s+([\d.]+)\s*$", train_table, re.M)
    assert total is not None and float(total.group(1)) == round(sum(b.values()) / GIB, 2)
    # colocated (the default) plans the whole world as before: no groups
    rc, out, _ = _run(capsys, "--world", "8", "--no-critic", *args)
    assert "generation group" not in out and "TP2+SP PP1 DP4" in out


@pytest.mark.parametrize(
    ("world", "overrides", "key", "words"),
    [
        (8, ["rlvr.generation_ranks=8"], "rlvr.generation_ranks", "leaves no training rank"),
        (8, ["rlvr.generation_ranks=1"], "parallel.tp", "training group of 7 ranks"),
        (9, ["rlvr.generation_ranks=3", "rlvr.generation_tp=3"], "rlvr.generation_tp",
         "num_attention_heads=32"),
        (10, ["rlvr.generation_ranks=2", "train.global_batch_size=50"],
         "train.global_batch_size", "dp=4"),
    ],
)  # fmt: skip
def test_invalid_split_exits_2_naming_the_key(capsys, world, overrides, key, words):
    rc, out, err = _run(capsys, "--world", str(world), "rlvr.mode=async", *overrides)
    assert rc == 2 and key in err and words in err, err
    assert "GiB per GPU" not in out  # nothing planned
