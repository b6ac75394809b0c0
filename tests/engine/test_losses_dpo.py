"""The DPO family: every variant against its formula computed by hand with Python floats,
metrics, gradients (float64 gradcheck), config validation and the global-pair reduction
(the packed-batch pair log-probs are the DPO stage's: tests/engine/test_train_dpo.py)."""

from __future__ import annotations

import math

import pytest
import torch

from nova_engine.losses.dpo import (
    DPO_LOSSES,
    DPOConfig,
    PreferenceLogps,
    dpo_loss,
    reduce_pairs,
)

# three pairs: policy/reference log-prob sums and loss-token counts
PC, PR = [-12.0, -30.5, -7.25], [-15.0, -28.0, -9.0]
RC, RR = [-13.0, -29.0, -8.0], [-14.5, -29.5, -8.5]
NC, NR = [4, 10, 3], [6, 8, 5]


def _logps(dtype=torch.float64, grad=False):
    t = lambda x: torch.tensor(x, dtype=dtype, requires_grad=grad)
    return PreferenceLogps(
        t(PC), t(PR), torch.tensor(NC, dtype=dtype), torch.tensor(NR, dtype=dtype), t(RC), t(RR)
    )


def logsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def by_hand(name, beta, eps, ratio, i):
    """(loss, r_c, r_r) of pair i, written out from the papers' formulas."""
    if name in ("sigmoid", "cdpo", "hinge", "rdpo"):
        r_c, r_r = beta * (PC[i] - RC[i]), beta * (PR[i] - RR[i])
        h = (PC[i] - PR[i]) - (RC[i] - RR[i])
        if name == "hinge":
            return max(0.0, 1 - beta * h), r_c, r_r
        if name == "rdpo":  # Chowdhury et al. 2024, eq. for the unbiased loss
            loss = ((1 - eps) * -logsig(beta * h) + eps * logsig(-beta * h)) / (1 - 2 * eps)
            return loss, r_c, r_r
        return -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h), r_c, r_r
    if name in ("dpo_norm", "ipo"):
        mc, mr = (PC[i] - RC[i]) / NC[i], (PR[i] - RR[i]) / NR[i]
        if name == "ipo":
            return (mc - mr - 1 / (2 * beta)) ** 2, beta * mc, beta * mr
        x = beta * (mc - mr)
        return -(1 - eps) * logsig(x) - eps * logsig(-x), beta * mc, beta * mr
    assert name == "simpo"
    mc, mr = PC[i] / NC[i], PR[i] / NR[i]
    x = beta * mc - beta * mr - ratio * beta
    return -(1 - eps) * logsig(x) - eps * logsig(-x), beta * mc, beta * mr


CASES = [
    ("sigmoid", 0.1, 0.0),
    ("sigmoid", 0.5, 0.1),
    ("cdpo", 0.1, 0.2),
    ("rdpo", 0.1, 0.2),
    ("rdpo", 0.5, 0.05),
    ("dpo_norm", 5.0, 0.0),
    ("ipo", 0.1, 0.0),
    ("ipo", 2.0, 0.0),
    ("simpo", 2.0, 0.0),
    ("simpo", 2.5, 0.15),
    ("hinge", 0.1, 0.0),
    ("hinge", 1.0, 0.0),
]


def test_every_variant_is_tested():
    assert {c[0] for c in CASES} == set(DPO_LOSSES)


@pytest.mark.parametrize("name,beta,eps", CASES)
def test_variant_matches_formula(name, beta, eps):
    ratio = 0.3
    cfg = DPOConfig(loss_type=name, beta=beta, label_smoothing=eps, gamma_beta_ratio=ratio)
    out = dpo_loss(_logps(), cfg)
    for i in range(3):
        loss, r_c, r_r = by_hand(name, beta, eps, ratio, i)
        assert out.losses[i].item() == pytest.approx(loss, rel=1e-12, abs=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(r_c, rel=1e-12, abs=1e-12)
        assert out.rejected_rewards[i].item() == pytest.approx(r_r, rel=1e-12, abs=1e-12)
        assert out.accuracy[i].item() == float(r_c > r_r)
        assert out.margin[i].item() == pytest.approx(r_c - r_r, rel=1e-12, abs=1e-12)
    assert not out.chosen_rewards.requires_grad


@pytest.mark.parametrize("name,beta,eps", CASES)
def test_variant_gradcheck(name, beta, eps):
    cfg = DPOConfig(loss_type=name, beta=beta, label_smoothing=eps)
    p = _logps()
    if name == "hinge":  # keep away from the kink: scale log-ratios so 1 - beta*h != 0
        assert all(abs(1 - beta * ((a - b) - (c - d))) > 1e-3 for a, b, c, d in zip(PC, PR, RC, RR))

    def f(pc, pr):
        q = PreferenceLogps(
            pc, pr, p.chosen_tokens, p.rejected_tokens, p.ref_chosen, p.ref_rejected
        )
        return dpo_loss(q, cfg).losses

    inputs = (p.policy_chosen.clone().requires_grad_(), p.policy_rejected.clone().requires_grad_())
    assert torch.autograd.gradcheck(f, inputs)


def test_sigmoid_gradient_by_hand():
    """d/d pi_c of -log sigma(beta h) = -beta * sigma(-beta h)."""
    p = _logps(grad=True)
    beta = 0.3
    dpo_loss(p, DPOConfig(loss_type="sigmoid", beta=beta)).losses.sum().backward()
    for i in range(3):
        h = (PC[i] - PR[i]) - (RC[i] - RR[i])
        want = -beta / (1 + math.exp(beta * h))
        assert p.policy_chosen.grad[i].item() == pytest.approx(want, rel=1e-12)
        assert p.policy_rejected.grad[i].item() == pytest.approx(-want, rel=1e-12)


def test_config_validation():
    with pytest.raises(ValueError, match="loss_type='kto'"):
        DPOConfig(loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        DPOConfig(beta=0.0)
    with pytest.raises(ValueError, match="cdpo"):
        DPOConfig(loss_type="cdpo")
    with pytest.raises(ValueError, match="rdpo"):
        DPOConfig(loss_type="rdpo")
    with pytest.raises(ValueError, match="ipo"):
        DPOConfig(loss_type="ipo", label_smoothing=0.1)
    p = _logps()
    p.ref_chosen = None
    with pytest.raises(ValueError, match="reference"):
        dpo_loss(p, DPOConfig(loss_type="sigmoid"))
    # reference-free: SimPO without reference log-probs is SimPO with them
    simpo = DPOConfig(loss_type="simpo")
    torch.testing.assert_close(dpo_loss(p, simpo).losses, dpo_loss(_logps(), simpo).losses)


def test_reduce_pairs_is_global_mean():
    losses = torch.tensor([0.5, 1.5, 2.0, 4.0])
    parts = [reduce_pairs(losses[:1], 4), reduce_pairs(losses[1:], 4)]
    assert sum(parts).item() == pytest.approx(losses.mean().item())
