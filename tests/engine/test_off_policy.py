"""Off-policy rollouts (asynchronous RLVR's building blocks): per-token policy versions on the
packed layout and the staleness they give, and the two corrections of the behaviour policy —
truncated IS (loss.tis_mode=truncate) and AReaL's decoupled PPO with a weight cap
(tis_mode=mask) — against float64 references of their formulas, loss and gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nova_engine.losses.policy import PolicyLossConfig, compute_policy_loss
from nova_engine.rl.rollouts import Generation, Rollouts

CAP = 1.5


def _inputs(seed, n=97):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    lp = old + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    gen = old + 0.6 * torch.randn(n, generator=g, dtype=torch.float64)  # stale behaviour policy
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = (torch.rand(n, generator=g) > 0.2).double()
    return tuple(x.reshape(1, n) for x in (lp, old, gen, adv, mask))  # [B = 1, T]


def _reference(name, mode, lp, old, gen, adv, mask, lo=0.2, hi=0.28):
    """float64: per-token objective of `name` weighted by the behaviour weight, token-mean."""
    ratio = torch.exp(lp - old)
    w = torch.exp(old - gen)
    if mode == "truncate":
        w = w.clamp(max=CAP)
    else:  # AReaL: behav_imp_weight, tokens above the cap dropped (normalizer unchanged)
        w = torch.where(w <= CAP, w, torch.zeros_like(w))
    if name == "ppo":
        per = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - lo, 1 + hi))
    else:  # cispo: REINFORCE with the clipped, stop-gradient IS weight
        per = -ratio.detach().clamp(1 - lo, 1 + hi) * adv * lp
    return (w.detach() * per * mask).sum() / mask.sum()


@pytest.mark.parametrize("name", ["ppo", "cispo"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_behaviour_corrections_equal_float64(name, mode):
    lp64, old, gen, adv, mask = _inputs(3)
    cfg = PolicyLossConfig(name=name, clip_low=0.2, clip_high=0.28, dual_clip=None,
                           tis_cap=CAP, tis_mode=mode)  # fmt: skip
    lp = lp64.float().requires_grad_()
    loss, _ = compute_policy_loss(cfg, lp, old.float(), adv.float(), mask.float(),
                                  rollout_logprobs=gen.float())  # fmt: skip
    loss.backward()
    ref_lp = lp64.clone().requires_grad_()
    ref = _reference(name, mode, ref_lp, old, gen, adv, mask)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp.grad.double(), ref_lp.grad, rtol=1e-4, atol=1e-6)
    dropped = (torch.exp(old - gen) > CAP) & (mask > 0)
    assert dropped.any()  # the inputs exercise the cap
    if mode == "mask":  # a dropped token gets no gradient at all
        assert (lp.grad[dropped] == 0).all()


def test_modes_differ_only_above_the_cap():
    lp, old, gen, adv, mask = _inputs(5)
    gen = torch.minimum(gen, old + 0.1)  # every weight e^(old - gen) >= e^-0.1 ...
    gen = torch.maximum(gen, old - 0.3)  # ... and <= e^0.3 < CAP: nothing is capped
    out = []
    for mode in ("truncate", "mask"):
        cfg = PolicyLossConfig(tis_cap=CAP, tis_mode=mode, dual_clip=None)
        out.append(compute_policy_loss(cfg, lp.float(), old.float(), adv.float(), mask.float(),
                                       rollout_logprobs=gen.float())[0])  # fmt: skip
    assert out[0].item() == out[1].item()


def test_tis_mode_validation_names_the_key():
    from nova_engine.config import ConfigError
    from nova_engine.rl.config import RLVRLossSection

    with pytest.raises(ValueError, match="tis_mode='drop'"):
        PolicyLossConfig(tis_mode="drop")
    with pytest.raises(ConfigError, match="tis_mode"):
        RLVRLossSection(tis=True, tis_mode="mask", tis_cap=None)
    assert RLVRLossSection(tis=True, tis_mode="mask").policy_config().tis_mode == "mask"


def test_versions_follow_the_tokens_and_give_the_staleness():
    """A partial rollout (prefix under version 3, the rest under 4) and a fresh one (5): the
    versions sit on the label-aligned response positions; at trainer version 5 the staleness
    is 2, 1 and 0 there, 0 off the mask (prompt, padding)."""
    from nova_engine.rl.minibatch import _pad_to

    gens = [
        Generation(np.array([7, 8, 9, 10]), np.zeros(4), True, versions=np.array([3, 3, 4, 4])),
        Generation(np.array([11, 12]), np.zeros(2), True, versions=np.array([5, 5])),
    ]  # fmt: skip
    ro = Rollouts.from_groups([np.array([1, 2, 3]), np.array([4, 5])], [[gens[0]], [gens[1]]])
    (rb,) = ro.pack(64)
    rb = _pad_to(rb, 20, pad_id=0)
    mask = rb.batch.loss_mask.bool()
    st = rb.staleness(5)
    starts = rb.batch.cu_seqlens.tolist()
    want = torch.zeros(20)
    for n, r in enumerate(rb.rows.tolist()):
        p = len(ro.prompts[ro.prompt_of[r]])
        v = torch.tensor(ro.generations[r].versions, dtype=torch.float32)
        want[starts[n] + p - 1 : starts[n] + p - 1 + len(v)] = 5 - v
    torch.testing.assert_close(st, want)
    assert sorted(st[mask].tolist()) == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]
    assert (rb.versions[~mask] == -1).all()
    colocated = Rollouts.from_groups([np.array([1, 2])], [[Generation(np.array([3]))]])
    assert not colocated.pack(16)[0].staleness(9).any()
    with pytest.raises(ValueError, match="2 versions for 3 tokens"):
        Generation(np.array([1, 2, 3]), versions=np.array([0, 0]))
