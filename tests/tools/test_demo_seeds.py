"""`make demo`'s seed plumbing and the 3-seed summary (benchmarks/demo_seeds.py), without
running the demo: --seed parses and reaches every stage's recipe (train.seed, the SFT model's
init_seed), the held-out problems are the task's eval split of that seed, and the summary's
mean / standard error / paired RLVR - DPO gain match an independent computation."""

from __future__ import annotations

import importlib
import json
import os
import random
import statistics
import sys

import pytest

from nova_engine import demo
from nova_engine.recipe import load_recipe

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture
def demo_seeds(monkeypatch):
    """benchmarks/demo_seeds.py (the benchmarks package sits at the repository root, which
    pytest's importlib mode does not put on sys.path)."""
    monkeypatch.syspath_prepend(ROOT)
    yield importlib.import_module("benchmarks.demo_seeds")
    sys.modules.pop("benchmarks.demo_seeds", None)


def test_parse_args_seed():
    assert demo.parse_args([]).seed == 0
    args = demo.parse_args(["--out", "/tmp/x", "--seed", "2", "--rlvr", "train.max_steps=3"])
    assert (args.seed, args.out, args.rlvr) == (2, "/tmp/x", ["train.max_steps=3"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--seed", "-1"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--seed", "one"])


@pytest.mark.parametrize("stage", ["sft", "dpo", "rm", "rlvr"])
def test_seed_reaches_the_stage_recipe(stage):
    base = load_recipe(demo.RECIPE, stage, [])
    for seed in (0, 3):
        run = load_recipe(demo.RECIPE, stage, demo.seed_overrides(demo.RECIPE, stage, seed))
        assert run.train.seed == base.train.seed + seed
        if stage == "sft":
            assert run.model.build.init_seed == seed
        else:
            assert run.model.build is None  # later stages start from an export


def test_heldout_problems_are_the_task_eval_split(tmp_path):
    from nova_engine.data.synthetic import write_task

    for seed in (0, 1):
        paths = write_task(tmp_path / str(seed), n_sft=demo.N_SFT, n_pref=demo.N_PREF,
                           n_eval=demo.N_EVAL, seed=seed, carry_error=demo.CARRY_ERROR,
                           pref_skips_carry_error=True, **demo.TASK)  # fmt: skip
        rows = [json.loads(x) for x in open(paths["eval"])]
        probs = demo._problems(seed)
        assert [p.question() for p, _, _ in probs] == [r["messages"][0]["content"] for r in rows]
        assert [right for _, right, _ in probs] == [r["answer"] for r in rows]
        assert all(wrong != right for _, right, wrong in probs)
    assert demo._problems(0) != demo._problems(1)


def _fake_result(demo_seeds, rng: random.Random) -> dict:
    stage = lambda: {m: rng.random() for m in demo_seeds.POLICY_METRICS}  # noqa: E731
    res = {s: stage() for s in demo_seeds.STAGES}
    res["dpo_reward_accuracy"] = rng.random()
    res["reward_model"] = {"regression": rng.random(), "scaled_bt": rng.random()}
    res["seconds"] = {"total": 100 * rng.random()}
    return res


def test_summary_mean_se_and_paired_gain(demo_seeds):
    rng = random.Random(7)
    results = [_fake_result(demo_seeds, rng) for _ in range(3)]
    rows = demo_seeds.collect(results)
    by = {(r["stage"], r["metric"]): r for r in rows}
    em = by[("after RLVR", "exact_match")]
    xs = [r["after RLVR"]["exact_match"] for r in results]
    assert em["mean"] == pytest.approx(statistics.fmean(xs))
    assert em["se"] == pytest.approx(statistics.stdev(xs) / 3**0.5)
    gain = by[("RLVR - DPO (paired)", "exact_match")]
    diffs = [r["after RLVR"]["exact_match"] - r["after DPO"]["exact_match"] for r in results]
    assert gain["values"] == pytest.approx(diffs)
    assert gain["se"] == pytest.approx(statistics.stdev(diffs) / 3**0.5)
    assert by[("reward model (scaled_bt)", "pair_acc")]["values"] == [
        r["reward_model"]["scaled_bt"] for r in results
    ]
    assert demo_seeds.mean_se([0.25]) == (0.25, 0.0)
    for metric in ("pref_acc", "pref_margin"):
        dpo = by[("DPO - SFT (paired)", metric)]
        want = [r["after DPO"][metric] - r["after SFT"][metric] for r in results]
        assert dpo["values"] == pytest.approx(want)
        assert dpo["mean"] == pytest.approx(statistics.fmean(want))
    pk = by[("RLVR - DPO (paired)", "pass_at_k")]
    assert pk["values"] == pytest.approx(
        [r["after RLVR"]["pass_at_k"] - r["after DPO"]["pass_at_k"] for r in results]
    )
    md = demo_seeds.markdown(rows, [0, 1, 2], "2-core CPU")
    assert "2-core CPU" in md and f"{100 * em['mean']:.1f} ± {100 * em['se']:.1f}" in md
    margin = by[("after SFT", "pref_margin")]
    assert f"| after SFT | pref_margin (nats/token) | {margin['values'][0]:.3f} |" in md


def test_pref_margin_against_a_loop():
    """pref_margin: mean over pairs of (right log-prob / right tokens - wrong log-prob /
    wrong tokens), checked against a plain float64 loop on fresh random values."""
    import torch

    g = torch.Generator().manual_seed(11)
    logps = -10 * torch.rand(37, 2, generator=g)
    counts = torch.randint(1, 5, (37, 2), generator=g).double()
    want = statistics.fmean(
        float(logps[i, 0]) / float(counts[i, 0]) - float(logps[i, 1]) / float(counts[i, 1])
        for i in range(37)
    )
    assert demo.pref_margin(logps, counts) == pytest.approx(want, rel=1e-12)
    swapped = demo.pref_margin(logps.flip(1), counts.flip(1))
    assert swapped == pytest.approx(-want, rel=1e-12)


def test_rlvr_prompts_avoid_the_demo_heldout_split(tmp_path):
    """The RLVR prompts the demo writes (its N_EVAL, skip = N_SFT + N_PREF) share no problem
    with the held-out split it evaluates on, for each seed."""
    from nova_engine.data.rlvr import write_arithmetic_rlvr
    from nova_engine.data.synthetic import QUESTION_TEMPLATES, Problem

    for seed in (0, 2):
        path = write_arithmetic_rlvr(tmp_path / f"rlvr{seed}.jsonl", 2000, seed=seed,
                                     skip=demo.N_SFT + demo.N_PREF, n_eval=demo.N_EVAL,
                                     **demo.TASK)  # fmt: skip
        asked = {json.loads(x)["messages"][-1]["content"] for x in open(path)}
        held = demo._problems(seed)
        assert len(held) == demo.N_EVAL
        keys = {p.key for p, _, _ in held}
        # every wording of a held-out problem is absent from the prompts
        for a, op, b in keys:
            for t in range(len(QUESTION_TEMPLATES)):
                assert Problem(a, op, b, t).question() not in asked
