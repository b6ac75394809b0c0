"""Reward-model losses: every loss against its formula computed by hand with Python floats,
the centering term, metrics, masked regression (missing attributes never read), float64
gradchecks, and the global-normalizer reduction over micro-batches."""

from __future__ import annotations

import math

import pytest
import torch

from nova_engine.losses.dpo import reduce_pairs
from nova_engine.losses.reward import (
    PAIRWISE_LOSSES,
    RewardLossConfig,
    attribute_weights,
    pairwise_loss,
    regression_loss,
    scalar_reward,
)

RC = [1.5, -0.25, 0.75, 2.0, -1.0]
RR = [0.5, 0.5, 0.75, -1.0, -3.5]
M = [1.0, 3.0, 2.0, 1.0, 2.0]


def logsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def by_hand(name, c, i):
    d = RC[i] - RR[i]
    base = {
        "bt": -logsig(d),
        "margin_bt": -logsig(d - M[i]),
        "scaled_bt": -M[i] * logsig(d),
    }[name]
    return base + c * (RC[i] + RR[i]) ** 2


CASES = [(n, c) for n in ("bt", "margin_bt", "scaled_bt") for c in (0.0, 0.01)]


def test_every_pairwise_loss_is_tested():
    assert {n for n, _ in CASES} == set(PAIRWISE_LOSSES)


@pytest.mark.parametrize("name,c", CASES)
def test_pairwise_matches_formula(name, c):
    cfg = RewardLossConfig(loss_type=name, center_rewards_coefficient=c)
    t = lambda x: torch.tensor(x, dtype=torch.float64)
    out = pairwise_loss(t(RC), t(RR), t(M), cfg)
    want = [by_hand(name, c, i) for i in range(len(RC))]
    assert out.losses.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    # tie (pair 2) counts as wrong, as RewardBench counts it
    assert out.accuracy.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert out.margin.tolist() == pytest.approx([a - b for a, b in zip(RC, RR)])


@pytest.mark.parametrize("name,c", CASES)
def test_pairwise_gradcheck(name, c):
    cfg = RewardLossConfig(loss_type=name, center_rewards_coefficient=c)
    g = torch.Generator().manual_seed(3)
    rc = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    rr = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.randint(1, 4, (7,), generator=g).double()
    assert torch.autograd.gradcheck(lambda a, b: pairwise_loss(a, b, m, cfg).losses, (rc, rr))


def test_pairwise_bf16_inputs_compute_in_fp32():
    cfg = RewardLossConfig(loss_type="scaled_bt")
    rc = torch.tensor(RC, dtype=torch.bfloat16)
    rr = torch.tensor(RR, dtype=torch.bfloat16)
    out = pairwise_loss(rc, rr, torch.tensor(M), cfg)
    assert out.losses.dtype == torch.float32
    want = pairwise_loss(rc.float(), rr.float(), torch.tensor(M), cfg).losses
    torch.testing.assert_close(out.losses, want, rtol=0, atol=0)


# regression: 3 responses, K=3 attributes, NaN where missing
PRED = [[3.0, 1.5, 2.0], [0.5, 4.0, 1.0], [2.0, 2.0, 2.0]]
TGT = [[4.0, float("nan"), 2.5], [1.0, 3.0, float("nan")], [float("nan"), 0.0, 1.0]]


def test_regression_matches_formula_and_ignores_missing():
    pred = torch.tensor(PRED, dtype=torch.float64)
    out = regression_loss(pred, torch.tensor(TGT, dtype=torch.float64))
    rows = [
        [(p - t) ** 2 for p, t in zip(pr, tr) if not math.isnan(t)] for pr, tr in zip(PRED, TGT)
    ]
    assert out.losses.tolist() == pytest.approx([sum(r) for r in rows])
    assert out.counts.tolist() == [2.0, 2.0, 2.0]
    # the step's MSE over present scores
    assert (out.losses.sum() / out.counts.sum()).item() == pytest.approx(sum(map(sum, rows)) / 6)
    # per-attribute MSE: attribute 0 present in rows 0, 1
    mse0 = out.sq_err[:, 0].sum() / out.mask[:, 0].sum()
    assert mse0.item() == pytest.approx(((3 - 4) ** 2 + (0.5 - 1) ** 2) / 2)
    # a missing attribute gets no gradient, and NaN placeholders do not leak
    p = pred.clone().requires_grad_(True)
    regression_loss(p, torch.tensor(TGT, dtype=torch.float64)).losses.sum().backward()
    assert torch.isfinite(p.grad).all()
    assert p.grad[0, 1] == 0 and p.grad[1, 2] == 0 and p.grad[2, 0] == 0
    assert p.grad[0, 0] == pytest.approx(2 * (3 - 4))


def test_regression_explicit_mask_equals_nan_mask():
    tgt = torch.tensor(TGT)
    mask = ~torch.isnan(tgt)
    a = regression_loss(torch.tensor(PRED), tgt)
    b = regression_loss(torch.tensor(PRED), torch.nan_to_num(tgt, nan=-100.0), mask)
    torch.testing.assert_close(a.losses, b.losses, rtol=0, atol=0)


def test_regression_gradcheck():
    g = torch.Generator().manual_seed(5)
    pred = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    tgt = torch.randint(0, 5, (6, 5), generator=g).double()
    tgt[torch.rand(6, 5, generator=g) < 0.3] = float("nan")
    assert torch.autograd.gradcheck(lambda x: regression_loss(x, tgt).losses, (pred,))


def test_microbatch_reduction_equals_full_batch_mean():
    """Two micro-batches reduced over the global normalizer add up to the one-batch mean."""
    cfg = RewardLossConfig(loss_type="scaled_bt")
    rc, rr, m = torch.tensor(RC), torch.tensor(RR), torch.tensor(M)
    full = pairwise_loss(rc, rr, m, cfg).losses.mean()
    parts = sum(
        reduce_pairs(pairwise_loss(rc[s], rr[s], m[s], cfg).losses, len(RC))
        for s in (slice(0, 2), slice(2, 5))
    )
    torch.testing.assert_close(parts, full)


def test_scalar_reward_and_attribute_weights():
    w = attribute_weights(("helpfulness", "correctness", "verbosity"), "correctness")
    assert w == [0.0, 1.0, 0.0]
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert scalar_reward(v, w).tolist() == [2.0, 5.0]
    assert scalar_reward(v, [0.5, 0.0, -1.0]).tolist() == [-2.5, -4.0]
    with pytest.raises(ValueError, match="'coherence' is not one of"):
        attribute_weights(("helpfulness",), "coherence")


def test_config_validation():
    with pytest.raises(ValueError, match="expected one of bt, margin_bt, scaled_bt, regression"):
        RewardLossConfig(loss_type="hinge")
    with pytest.raises(ValueError, match="expected >= 0"):
        RewardLossConfig(center_rewards_coefficient=-1)
    with pytest.raises(ValueError, match="not to regression"):
        RewardLossConfig(loss_type="regression", center_rewards_coefficient=0.1)
    with pytest.raises(ValueError, match="not pairwise"):
        pairwise_loss(torch.zeros(2), torch.zeros(2), None, RewardLossConfig("regression"))
