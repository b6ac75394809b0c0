"""Advantage-estimator and policy-loss registries: each name against the float64 references
with verl's semantics (nova_kernels.reference), on both kernel backends (Triton under the
interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

import nova_kernels as nk
from nova_engine.losses.policy import (
    PolicyLossConfig,
    compute_policy_loss,
    policy_loss_names,
)
from nova_engine.rl.advantages import advantage_names, compute_advantages, group_index
from nova_engine.train.stages.rlvr_losses import _kl as reward_kl
from nova_kernels._testing import assert_verbose_allclose
from nova_kernels.reference import (
    discounted_returns_reference,
    gae_reference,
    group_advantages_reference,
    whiten_reference,
)

BACKENDS = ["triton", "torch"]


def loop_gae(r, v, m, gamma, lam):
    return gae_reference(r.double(), v.double(), m, gamma, lam)[0]


def loop_whiten(x, m):
    return whiten_reference(x.double(), m)


def loop_group(scores, labels, estimator):
    return group_advantages_reference(scores, labels, estimator)[0]  # (advantages, flags)


def make_batch(seed, B=9, T=23):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T)[None, :] < torch.randint(3, T + 1, (B,), generator=g)[:, None]
    mask &= torch.rand(B, T, generator=g) > 0.2
    rewards = torch.zeros(B, T)
    last = (mask * torch.arange(T)).argmax(-1)
    rewards[torch.arange(B), last] = torch.randint(0, 2, (B,), generator=g).float() * 10
    rewards += 0.1 * torch.randn(B, T, generator=g) * mask  # a few token-level rewards
    values = torch.randn(B, T, generator=g)
    labels = ["p0", "p1", "p0", "p2", "p1", "p0", "p3", "p1", "p2"][:B]
    return rewards, values, mask, labels


# --- advantages ---------------------------------------------------------------------------


def test_advantage_registry_names():
    assert advantage_names() == sorted(
        ["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
    )
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        compute_advantages("ppo", token_rewards=torch.zeros(1, 1), mask=torch.ones(1, 1))


def test_group_index_labels_and_ints():
    ids, G = group_index(["b", "a", "b", "c"])
    assert ids.tolist() == [0, 1, 0, 2] and G == 3
    ids, G = group_index(torch.tensor([7, 3, 7]))
    assert ids.tolist() == [1, 0, 1] and G == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_estimator(backend):
    r, v, m, _ = make_batch(1)
    out = compute_advantages(
        "gae", token_rewards=r, values=v, mask=m, gamma=0.99, lam=0.95, backend=backend
    )
    adv = loop_gae(r, v, m, 0.99, 0.95)
    assert_verbose_allclose(out.returns, adv + v.double(), rtol=1e-5, atol=1e-5, name="returns")
    assert_verbose_allclose(out.advantages, loop_whiten(adv, m), rtol=1e-4, atol=1e-4)
    assert out.degenerate is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_outcome_estimators(backend, name):
    r, _, m, labels = make_batch(2)
    out = compute_advantages(name, token_rewards=r, mask=m, group_ids=labels, backend=backend)
    per_sample = loop_group(r.sum(-1), labels, name)
    expected = per_sample[:, None] * m
    assert_verbose_allclose(out.advantages, expected, rtol=1e-4, atol=1e-4, name=name)
    assert torch.equal(out.returns, out.advantages)
    # p3 has one sample: degenerate; the others hold different scores
    scores = r.sum(-1)
    order = list(dict.fromkeys(labels))
    want = [len({float(scores[i]) for i, x in enumerate(labels) if x == g}) == 1 for g in order]
    assert out.degenerate.tolist() == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_reinforce_pp(backend):
    r, _, m, _ = make_batch(3)
    out = compute_advantages("reinforce_pp", token_rewards=r, mask=m, gamma=0.9, backend=backend)
    ret = discounted_returns_reference(r.double(), m, 0.9)
    assert_verbose_allclose(out.returns, ret, rtol=1e-5, atol=1e-5, name="returns")
    expected = loop_whiten(ret, m) * m
    assert_verbose_allclose(out.advantages, expected, rtol=1e-4, atol=1e-4, name="advantages")


@pytest.mark.parametrize("backend", BACKENDS)
def test_reinforce_pp_baseline(backend):
    r, _, m, labels = make_batch(4)
    out = compute_advantages(
        "reinforce_pp_baseline", token_rewards=r, mask=m, group_ids=labels, backend=backend
    )
    baseline, equal = group_advantages_reference(r.sum(-1), labels, "dr_grpo")
    expected = loop_whiten(baseline[:, None] * m, m) * m
    assert_verbose_allclose(out.advantages, expected, rtol=1e-4, atol=1e-4, name="advantages")
    # one flag per prompt, in order of first appearance: p3 (one sample) is degenerate
    assert out.degenerate.tolist() == [equal[g] for g in dict.fromkeys(labels)]
    assert equal["p3"] and not all(equal.values())


def test_estimators_reject_missing_inputs():
    r, v, m, labels = make_batch(5)
    with pytest.raises(ValueError, match="group_ids"):
        compute_advantages("grpo", token_rewards=r, mask=m)
    with pytest.raises(ValueError, match="values"):
        compute_advantages("gae", token_rewards=r, mask=m, values=None)
    with pytest.raises(ValueError, match="group ids"):
        compute_advantages("rloo", token_rewards=r, mask=m, group_ids=labels[:3])


# --- policy losses ------------------------------------------------------------------------


def make_policy_inputs(seed, B=5, T=19):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 2
    lp = old + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    rl = old + 0.2 * torch.randn(B, T, generator=g)
    ref = lp + 0.5 * torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    return lp, old, adv, mask, rl, ref


def test_policy_loss_registry():
    assert policy_loss_names() == ["cispo", "gspo", "ppo", "reinforce"]
    with pytest.raises(ValueError, match="name='a2c'"):
        PolicyLossConfig(name="a2c")
    bads = (dict(dual_clip=1.0), dict(agg="mean"), dict(kl_in="both"), dict(clip_low=1.5),
            dict(name="gspo"), dict(name="cispo", agg="seq-mean-token-sum"))  # fmt: skip
    for bad in bads:
        with pytest.raises(ValueError, match="PolicyLossConfig"):
            PolicyLossConfig(**bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_is_the_kernel(backend):
    lp, old, adv, mask, rl, ref = make_policy_inputs(1)
    cfg = PolicyLossConfig(clip_high=0.28, kl_coef=0.05, agg="seq-mean-token-mean")
    x = lp.clone().requires_grad_(True)
    loss, metrics = compute_policy_loss(
        cfg, x, old, adv, mask, rollout_logprobs=rl, ref_logprobs=ref, backend=backend
    )
    loss.backward()
    y = lp.clone().requires_grad_(True)
    exp_loss, exp_metrics = nk.policy_loss(
        y,
        old,
        adv,
        mask,
        clip_low=0.2,
        clip_high=0.28,
        dual_clip=3.0,
        rollout_logprobs=rl,
        tis_cap=2.0,
        ref_logprobs=ref,
        kl_coef=0.05,
        kl_type="k3",
        agg="seq-mean-token-mean",
        backend="torch",
    )
    exp_loss.backward()
    assert_verbose_allclose(loss, exp_loss, rtol=1e-5, atol=1e-6)
    assert_verbose_allclose(x.grad, y.grad, rtol=1e-5, atol=1e-6)
    assert set(metrics) == set(exp_metrics) and "kl_loss" in metrics


@pytest.mark.parametrize("backend", BACKENDS)
def test_reinforce_by_hand(backend):
    """No clipping: loss = token-mean of -A * ratio * w, grad = -A * ratio * w / n."""
    lp, old, adv, mask, rl, _ = make_policy_inputs(2)
    lp = old + 2.0 * torch.randn(lp.shape)  # ratios far outside any clip range
    cfg = PolicyLossConfig(name="reinforce", tis_cap=1.5)
    x = lp.clone().requires_grad_(True)
    loss, metrics = compute_policy_loss(
        cfg, x, old, adv, mask, rollout_logprobs=rl, backend=backend
    )
    loss.backward()
    ratio = (lp - old).double().exp()
    w = (old - rl).double().exp().clamp(max=1.5)
    n = mask.sum()
    assert_verbose_allclose(loss, (-adv * ratio * w)[mask].sum() / n, rtol=1e-5, atol=1e-5)
    assert_verbose_allclose(x.grad, -adv * ratio * w * mask / n, rtol=1e-5, atol=1e-5)
    assert float(metrics["pg_clipfrac"]) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_goes_to_exactly_one_place(backend):
    lp, old, adv, mask, _, ref = make_policy_inputs(3)
    in_reward = PolicyLossConfig(kl_coef=0.1, kl_type="k1", kl_in="reward", tis_cap=None)
    in_loss = PolicyLossConfig(kl_coef=0.1, kl_type="k1", kl_in="loss", tis_cap=None)
    base = PolicyLossConfig(tis_cap=None)
    l_reward, m_reward = compute_policy_loss(
        in_reward, lp, old, adv, mask, ref_logprobs=ref, backend=backend
    )
    l_base, _ = compute_policy_loss(base, lp, old, adv, mask, backend=backend)
    l_loss, m_loss = compute_policy_loss(
        in_loss, lp, old, adv, mask, ref_logprobs=ref, backend=backend
    )
    assert "kl_loss" not in m_reward and "kl_loss" in m_loss
    assert_verbose_allclose(l_reward, l_base, rtol=1e-6, atol=1e-7)
    k1_mean = ((lp - ref) * mask).sum() / mask.sum()
    assert_verbose_allclose(l_loss, l_base + 0.1 * k1_mean, rtol=1e-5, atol=1e-6)
    # kl_in="reward": the stage's per-token KL (x kl_coef comes off the token rewards)
    kl = reward_kl(in_reward, lp, ref)
    assert_verbose_allclose(kl * mask, (lp - ref) * mask, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_clamps_configurable(backend):
    """k1 with log-ratios far past the clamps: clamped by default (NeMo-RL), unclamped with
    both clamps None (verl clamps only k3), in the loss and in the reward."""
    lp, old, adv, mask, _, ref = make_policy_inputs(4)
    ref = lp + 30.0 * torch.randn(lp.shape)  # |ref - lp| well beyond 20 on many tokens
    logr = (ref - lp).double()
    n = mask.sum()
    base = PolicyLossConfig(tis_cap=None)
    l_base, _ = compute_policy_loss(base, lp, old, adv, mask, backend=backend)
    for clamps, kl in (
        ({}, (-logr.clamp(-20, 20)).clamp(-10, 10)),
        (dict(kl_log_ratio_clamp=None, kl_value_clamp=None), -logr),
        (dict(kl_log_ratio_clamp=5.0, kl_value_clamp=None), -logr.clamp(-5, 5)),
    ):
        cfg = PolicyLossConfig(kl_coef=0.1, kl_type="k1", tis_cap=None, **clamps)
        loss, _ = compute_policy_loss(cfg, lp, old, adv, mask, ref_logprobs=ref, backend=backend)
        expect = l_base.double() + 0.1 * (kl * mask).sum() / n
        assert_verbose_allclose(loss.double(), expect, rtol=1e-5, atol=1e-5)
        cfg_r = PolicyLossConfig(kl_coef=0.1, kl_type="k1", kl_in="reward", **clamps)
        kl_r = reward_kl(cfg_r, lp, ref) * mask
        assert_verbose_allclose(kl_r.double(), kl * mask, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kl_value_clamp"):
        PolicyLossConfig(kl_value_clamp=0.0)
