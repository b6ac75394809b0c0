"""The DPO family, by name: sigmoid DPO, length-normalized DPO (Tülu 3's dpo_norm), IPO, SimPO,
hinge, conservative DPO (label smoothing) and robust DPO (rDPO, unbiased under label noise).

Inputs are per-sequence quantities (B pairs), computed from the hidden states of a packed
batch by the DPO stage (nova_engine.train.stages.dpo.pair_logps: `nova_kernels`' fused
pair log-probs, summed over each sequence's loss tokens):

    pi_c, pi_r    policy log-prob SUMS over the loss tokens of chosen / rejected  [B]
    ref_c, ref_r  the same under the reference model (cached from disk by the trainer) [B]
    n_c, n_r      loss-token counts                                              [B]

Notation: beta > 0 (`DPOConfig.beta`), eps = label_smoothing, sigma the logistic function,
    h     = (pi_c - pi_r) - (ref_c - ref_r)                                 (sum log-ratios)
    hbar  = (pi_c/n_c - pi_r/n_r) - (ref_c/n_c - ref_r/n_r)         (per-token mean log-ratios)
    l_eps(x) = -(1 - eps) log sigma(x) - eps log sigma(-x)          (eps = 0: -log sigma(x))

Each loss returns per-pair losses [B] and the implicit rewards r_c, r_r [B] (detached); the
shared metrics are accuracy = 1[r_c > r_r] and margin = r_c - r_r. Reduce the per-pair losses
with `reduce_pairs` over the global pair count (as SFT does with tokens) so that gradient
accumulation and DP give the full-batch mean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DPOConfig:
    """Hyperparameters of the DPO family."""

    loss_type: str = "dpo_norm"
    """One of DPO_LOSSES: sigmoid, dpo_norm, ipo, simpo, hinge, cdpo, rdpo."""
    beta: float = 5.0
    """Inverse temperature beta (Tülu 3 dpo_norm: 5; sigmoid DPO usually 0.1)."""
    label_smoothing: float = 0.0
    """eps: assumed probability that a preference label is flipped (cdpo and rdpo require
    0 < eps < 0.5; sigmoid, dpo_norm and simpo accept it too; ipo and hinge refuse it)."""
    gamma_beta_ratio: float = 0.5
    """SimPO's target margin gamma expressed as gamma / beta (SimPO paper, TRL's simpo_gamma is
    gamma itself: gamma = gamma_beta_ratio * beta)."""

    def __post_init__(self):
        if self.loss_type not in DPO_LOSSES:
            raise ValueError(
                f"DPOConfig.loss_type={self.loss_type!r}: expected one of {sorted(DPO_LOSSES)}"
            )
        if not self.beta > 0:
            raise ValueError(f"DPOConfig.beta={self.beta}: expected > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"DPOConfig.label_smoothing={self.label_smoothing}: expected [0, 0.5)")
        if self.loss_type in ("cdpo", "rdpo") and self.label_smoothing == 0.0:
            raise ValueError(
                f"DPOConfig: loss_type={self.loss_type!r} needs label_smoothing in (0, 0.5)"
            )
        if self.loss_type in ("ipo", "hinge") and self.label_smoothing != 0.0:
            raise ValueError(f"DPOConfig: loss_type={self.loss_type!r} takes no label_smoothing")


@dataclass
class PreferenceLogps:
    """Per-pair sequence log-probs, all [B]. ref_* may be None for reference-free losses."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    def need_ref(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ref_chosen is None or self.ref_rejected is None:
            raise ValueError(
                f"DPO loss {name!r} needs reference log-probs (ref_chosen/ref_rejected)"
            )
        return self.ref_chosen, self.ref_rejected


@dataclass
class DPOOutput:
    """Per-pair losses [B] (differentiable) and detached metrics [B]."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    accuracy: torch.Tensor
    margin: torch.Tensor


LossFn = Callable[[PreferenceLogps, DPOConfig], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
DPO_LOSSES: dict[str, LossFn] = {}


def register(name: str):
    def deco(fn: LossFn) -> LossFn:
        DPO_LOSSES[name] = fn
        return fn

    return deco


def _smoothed(x: torch.Tensor, eps: float) -> torch.Tensor:
    """l_eps(x) = -(1 - eps) log sigma(x) - eps log sigma(-x)."""
    loss = -F.logsigmoid(x)
    return loss if eps == 0.0 else (1 - eps) * loss - eps * F.logsigmoid(-x)


def _means(p: PreferenceLogps, c: torch.Tensor, r: torch.Tensor):
    return c / p.chosen_tokens.clamp_min(1), r / p.rejected_tokens.clamp_min(1)


@register("sigmoid")
def sigmoid_dpo(p: PreferenceLogps, cfg: DPOConfig):
    """Sigmoid DPO (Rafailov et al. 2023): loss = l_eps(beta * h);
    rewards r_c = beta (pi_c - ref_c), r_r = beta (pi_r - ref_r)."""
    ref_c, ref_r = p.need_ref("sigmoid")
    rc, rr = p.policy_chosen - ref_c, p.policy_rejected - ref_r
    return _smoothed(cfg.beta * (rc - rr), cfg.label_smoothing), cfg.beta * rc, cfg.beta * rr


@register("cdpo")
def conservative_dpo(p: PreferenceLogps, cfg: DPOConfig):
    """Conservative DPO (Mitchell 2023, label smoothing eps in (0, 0.5)):
    loss = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h); rewards as sigmoid DPO."""
    return sigmoid_dpo(p, cfg)


@register("rdpo")
def robust_dpo(p: PreferenceLogps, cfg: DPOConfig):
    """Robust DPO (Chowdhury et al. 2024, TRL's loss_type="robust"), an unbiased estimate of
    the clean-label loss when labels flip with probability eps in (0, 0.5):
    loss = ((1 - eps)(-log sigma(beta h)) - eps(-log sigma(-beta h))) / (1 - 2 eps);
    rewards as sigmoid DPO. (Not lower-bounded: the eps term rewards pushing h down.)"""
    ref_c, ref_r = p.need_ref("rdpo")
    rc, rr = p.policy_chosen - ref_c, p.policy_rejected - ref_r
    x, eps = cfg.beta * (rc - rr), cfg.label_smoothing
    loss = ((1 - eps) * -F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)
    return loss, cfg.beta * rc, cfg.beta * rr


@register("dpo_norm")
def length_normalized_dpo(p: PreferenceLogps, cfg: DPOConfig):
    """Length-normalized DPO (Tülu 3 / open-instruct dpo_norm, beta = 5): sigmoid DPO on
    per-token mean log-probs over the loss tokens: loss = l_eps(beta * hbar);
    rewards r_c = beta (pi_c - ref_c) / n_c, r_r = beta (pi_r - ref_r) / n_r."""
    ref_c, ref_r = p.need_ref("dpo_norm")
    rc, rr = _means(p, p.policy_chosen - ref_c, p.policy_rejected - ref_r)
    return _smoothed(cfg.beta * (rc - rr), cfg.label_smoothing), cfg.beta * rc, cfg.beta * rr


@register("ipo")
def ipo(p: PreferenceLogps, cfg: DPOConfig):
    """IPO (Azar et al. 2023, eq. 17; TRL's convention of per-token mean log-probs):
    loss = (hbar - 1 / (2 beta))^2; rewards r = beta (pi - ref) / n."""
    ref_c, ref_r = p.need_ref("ipo")
    rc, rr = _means(p, p.policy_chosen - ref_c, p.policy_rejected - ref_r)
    return (rc - rr - 1.0 / (2.0 * cfg.beta)) ** 2, cfg.beta * rc, cfg.beta * rr


@register("simpo")
def simpo(p: PreferenceLogps, cfg: DPOConfig):
    """SimPO (Meng et al. 2024), reference-free, length-normalized, target margin gamma:
    loss = l_eps(beta * (pi_c/n_c - pi_r/n_r) - gamma), gamma = gamma_beta_ratio * beta;
    rewards r_c = beta pi_c / n_c, r_r = beta pi_r / n_r."""
    mc, mr = _means(p, p.policy_chosen, p.policy_rejected)
    x = cfg.beta * (mc - mr - cfg.gamma_beta_ratio)
    return _smoothed(x, cfg.label_smoothing), cfg.beta * mc, cfg.beta * mr


@register("hinge")
def hinge(p: PreferenceLogps, cfg: DPOConfig):
    """Hinge / SLiC (Zhao et al. 2023): loss = max(0, 1 - beta * h);
    rewards as sigmoid DPO."""
    ref_c, ref_r = p.need_ref("hinge")
    rc, rr = p.policy_chosen - ref_c, p.policy_rejected - ref_r
    return torch.relu(1.0 - cfg.beta * (rc - rr)), cfg.beta * rc, cfg.beta * rr


def dpo_loss(p: PreferenceLogps, cfg: DPOConfig) -> DPOOutput:
    """Per-pair losses and metrics of `cfg.loss_type` (see the registry DPO_LOSSES)."""
    losses, r_c, r_r = DPO_LOSSES[cfg.loss_type](p, cfg)
    r_c, r_r = r_c.detach(), r_r.detach()
    return DPOOutput(losses, r_c, r_r, (r_c > r_r).float(), r_c - r_r)


def reduce_pairs(losses: torch.Tensor, global_num_pairs: torch.Tensor | float) -> torch.Tensor:
    """This micro-batch's share of the step loss: sum(losses) / P, P the pairs
    of the step over all micro-batches and DP ranks (reduced over DP on the engine's device, as
    the loop's Loop.reduce_counts does for every normalizer)."""
    g = torch.as_tensor(global_num_pairs, device=losses.device, dtype=losses.dtype)
    return losses.sum() / g.clamp_min(1.0)
