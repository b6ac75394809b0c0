"""The advantage-estimator registry (nova_engine.rl.estimators) on the trainer's own path —
gather_responses (rewards, group statistics over DP) -> pack_share (the packed layout) ->
assign_advantages (token rewards, GAE / discounted returns, whitening over DP) — against a
float64 reference written here from the papers' formulas (padded, one process, every
response), at one rank and at TP1xDP4, TP2xDP2 and TP2xPP2 on gloo."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from nova_engine.data.rlvr import RLVRPrompt
from nova_engine.losses.policy import PolicyLossConfig
from nova_engine.parallel.spawn import run_distributed
from nova_engine.rl.estimators import ESTIMATORS, Estimator, get_estimator, register_estimator
from nova_engine.rl.rollouts import Generation
from nova_engine.rl.verifiers import RewardConfig, VerifierResult

P, N = 8, 3  # prompts per step, samples per prompt
GAMMA, LAM, EPS = 0.97, 0.9, 1e-6
NAMES = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")


def _step(seed: int = 0):
    """The step's prompts, generations and verifier results (fractional scores; group 2 all
    equal: a degenerate group; one empty generation)."""
    rng = np.random.default_rng(seed)
    prompts = [
        (k, RLVRPrompt(rng.integers(5, 50, rng.integers(2, 6)), "x", "t", k, "t"))
        for k in range(P)
    ]  # fmt: skip
    gens, results = [], []
    for j in range(P):
        gs, rs = [], []
        for i in range(N):
            n = 0 if (j, i) == (5, 1) else int(rng.integers(1, 7))
            gs.append(Generation(rng.integers(5, 50, n), np.zeros(n, np.float32), True))
            rs.append(VerifierResult(0.5 if j == 2 else float(rng.random()), "correct"))
        gens.append(gs)
        results.append(rs)
    return prompts, gens, results


def _ps1():
    """A world of one without a process group (what gather_responses / pack_share read)."""
    return types.SimpleNamespace(tp=1, pp=1, dp=1, sp=False, tp_group=None, dp_group=None,
                                 dp_rank=0, tp_rank=0, device=torch.device("cpu"),
                                 is_last_stage=lambda: True)  # fmt: skip


def _value(gid: int, k: int) -> float:
    """The synthetic critic value of token k of response gid (layout-independent)."""
    return math.sin(0.7 * gid + 0.3 * k) * 2.0


# ------------------------------------------------------------------------ float64 reference


def _reference(name: str) -> list[np.ndarray]:
    """Token advantages of every response of the step (response order), float64."""
    _, gens, results = _step()
    cfg = RewardConfig()
    span = cfg.verified_reward - cfg.unverified_reward
    rew = [[cfg.unverified_reward + span * r.score for r in rs] for rs in results]
    est = get_estimator(name)
    out: list[np.ndarray] = []
    if est.baseline is not None:
        for j in range(P):
            s = np.array(rew[j], np.float64)
            mean, std = s.mean(), s.std(ddof=1)
            for i in range(N):
                if est.baseline == "grpo":
                    a = (s[i] - mean) / (std + EPS)
                elif est.baseline == "dr_grpo":
                    a = s[i] - mean
                else:
                    a = N / (N - 1) * (s[i] - mean)
                out.append(np.full(len(gens[j][i]), a))
    else:
        for j in range(P):
            for i in range(N):
                L, gid = len(gens[j][i]), j * N + i
                r = np.zeros(L)
                if L:
                    r[-1] = rew[j][i]
                v = (
                    np.array([_value(gid, k) for k in range(L)])
                    if est.needs_critic
                    else np.zeros(L)
                )
                lam = LAM if est.needs_critic else 1.0
                a, nxt_a, nxt_v = np.zeros(L), 0.0, 0.0
                for t in reversed(range(L)):
                    delta = r[t] + GAMMA * nxt_v - v[t]
                    a[t] = nxt_a = delta + GAMMA * lam * nxt_a
                    nxt_v = v[t]
                out.append(a)
    if est.whitens(True):
        flat = np.concatenate(out)
        mean, var = flat.mean(), flat.var(ddof=1)
        out = [(a - mean) / np.sqrt(var + 1e-8) for a in out]
    return out


# ------------------------------------------------------------------------ the trainer's path


def _advantages(names, ps) -> dict[str, dict[int, np.ndarray]]:
    """{estimator: {global response id: token advantages}} of the responses this rank's last
    pipeline stage holds, through gather_responses / pack_share / assign_advantages."""
    from nova_engine.rl.losses import assign_advantages
    from nova_engine.rl.minibatch import pack_share
    from nova_engine.rl.producer import StepPrompts, gather_responses

    prompts, gens, results = _step()
    first, mine = StepPrompts(0, prompts).share(ps)
    lo = first
    out = {}
    for name in names:
        sr = gather_responses(first, mine, gens[lo : lo + len(mine)],
                              results[lo : lo + len(mine)], num_groups=P,
                              reward=RewardConfig(), estimator=name, ps=ps, eps=EPS)  # fmt: skip
        rs = sr.responses  # every response of the step, step order (after the DP gather)
        gids = list(range(ps.dp_rank, len(rs), ps.dp))  # this rank's share (any deal works)
        mbs = pack_share([rs[g] for g in gids], ps, capacity=64, pad_id=0)
        for mb in mbs:  # the critic's values on the packed layout
            v = torch.zeros(mb.num_tokens)
            b = mb.rb.batch
            for n in range(b.num_samples):
                gid = gids[int(mb.rb.rows[n])]
                start = int(b.cu_seqlens[n]) + len(rs[gid].prompt) - 1
                for k in range(len(rs[gid].gen)):
                    v[start + k] = _value(gid, k)
            mb.data["values"] = v
        assign_advantages(mbs, estimator=get_estimator(name), policy_cfg=PolicyLossConfig(),
                          gamma=GAMMA, lam=LAM, whiten=True, ps=ps)  # fmt: skip
        got: dict[int, np.ndarray] = {}
        if ps.is_last_stage() and ps.tp_rank == 0:
            for mb in mbs:
                b, adv = mb.rb.batch, mb.data["advantages"]
                for n in range(b.num_samples):
                    gid = gids[int(mb.rb.rows[n])]
                    start = int(b.cu_seqlens[n]) + len(rs[gid].prompt) - 1
                    got[gid] = adv[start : start + len(rs[gid].gen)].double().numpy()
        out[name] = got
    return out


def _check(name: str, parts: list[dict[int, np.ndarray]]) -> None:
    ref = _reference(name)
    got: dict[int, np.ndarray] = {}
    for p in parts:
        got.update(p)
    packed = [g for g, a in enumerate(ref) if len(a)]  # empty generations are not packed
    assert sorted(got) == packed
    for g in packed:
        np.testing.assert_allclose(got[g], ref[g], rtol=2e-5, atol=2e-5, err_msg=f"{name} #{g}")


@pytest.mark.parametrize("name", NAMES)
def test_estimator_equals_float64_reference_one_rank(name):
    _check(name, [_advantages([name], _ps1())[name]])


LAYOUTS = {"TP1xDP4": (1, 1), "TP2xDP2": (2, 1), "TP2xPP2": (2, 2)}


def _layouts_worker(rank, world):
    """Every layout in one spawned group (megatron's groups rebuilt per layout)."""
    from nova_engine.parallel.state import destroy_parallel, initialize_parallel

    out = {}
    for key, (tp, pp) in LAYOUTS.items():
        out[key] = _advantages(NAMES, initialize_parallel(tp=tp, pp=pp))
        destroy_parallel()
    return out


@pytest.fixture(scope="module")
def layout_results():
    return run_distributed(_layouts_worker, 4)


@pytest.mark.slow  # a spawned process group
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_estimators_equal_float64_reference_at_layouts(layout_results, layout):
    for name in NAMES:
        _check(name, [r[layout][name] for r in layout_results])


def test_registry_declarations_drive_the_trainer():
    assert tuple(ESTIMATORS) == NAMES
    assert [n for n, e in ESTIMATORS.items() if e.needs_critic] == ["gae"]
    assert {n for n, e in ESTIMATORS.items() if e.group_baseline} == {
        "grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"
    }  # fmt: skip
    assert get_estimator("gae").whitens(False) is False and get_estimator("gae").whitens(True)
    assert get_estimator("reinforce_pp").whitens(False)
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'.*grpo"):
        get_estimator("ppo")
    with pytest.raises(ValueError, match="already registered"):
        register_estimator(Estimator("grpo", "again", baseline="grpo"))
    with pytest.raises(ValueError, match="exactly one of baseline, returns"):
        Estimator("bad", "both", baseline="grpo", returns="gae")


def test_a_registered_estimator_is_a_recipe_choice():
    """Adding an estimator is one registration: the config accepts it and the trainer runs it
    (a leave-one-out baseline without whitening, registered here, then removed)."""
    from nova_engine.config import ConfigError
    from nova_engine.rl.config import RLVRLossSection

    with pytest.raises(ConfigError, match="advantage"):
        RLVRLossSection(advantage="rloo_white")
    register_estimator(Estimator("rloo_white", "rloo, whitened", baseline="rloo", whiten="always"))
    try:
        sec = RLVRLossSection(advantage="rloo_white", zero_variance_groups="drop")
        assert sec.estimator.group_baseline and not sec.needs_critic
        got = _advantages(["rloo_white"], _ps1())["rloo_white"]
        rloo = _reference("rloo")
        flat = np.concatenate(rloo)
        want = [(a - flat.mean()) / np.sqrt(flat.var(ddof=1) + 1e-8) for a in rloo]
        for g, a in got.items():
            np.testing.assert_allclose(a, want[g], rtol=2e-5, atol=2e-5)
    finally:
        del ESTIMATORS["rloo_white"]
