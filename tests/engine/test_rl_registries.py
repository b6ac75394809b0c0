"""The policy-loss registry: each name against the float64 references with verl's semantics
(nova_kernels.reference), on both kernel backends (Triton under the interpreter on CPU). The
advantage estimators: tests/engine/test_rl_estimators.py."""

from __future__ import annotations

import pytest
import torch

import nova_kernels as nk
from nova_engine.losses.policy import (
    PolicyLossConfig,
    compute_policy_loss,
    policy_loss_names,
)
from nova_engine.rl.losses import _kl as reward_kl
from nova_kernels._testing import assert_verbose_allclose

BACKENDS = ["triton", "torch"]


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
