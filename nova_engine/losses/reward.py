"""Reward-model losses by name: Bradley–Terry on (chosen, rejected) pairs — plain (`bt`), with a
margin (`margin_bt`), scaled by the preference strength (`scaled_bt`, HelpSteer2-Preference) —
and multi-attribute regression on single responses (`regression`, HelpSteer2 / SteerLM).

Inputs are the reward head's outputs read at the last token of every packed sequence,
computed here in (at least) fp32 whatever the model's dtype:

    r_c, r_r   scalar rewards of the chosen / rejected response of each pair        [P]
    m          the pair's margin / preference strength (`PairSample.margin`, > 0)    [P]
    y_hat      predicted attribute scores of each response                          [N, K]
    y, mask    target scores and 1 where the attribute is present (0: missing)       [N, K]

Notation: sigma the logistic function, c = `center_rewards_coefficient` (TRL's name), >= 0:

    bt          l = -log sigma(r_c - r_r)                              (Bradley & Terry 1952)
    margin_bt   l = -log sigma(r_c - r_r - m)                 (Llama 2's margin, TRL "margin")
    scaled_bt   l = -m * log sigma(r_c - r_r),  m = |preference strength| in {1, 2, 3}
                                                         (HelpSteer2-Preference, eq. "Scaled BT")
    centering   every pairwise loss gets + c * (r_c + r_r)^2            (Eisenstein et al. 2023;
                TRL: center_rewards_coefficient * mean((r_c + r_r)^2)); c = 0 turns it off
    regression  per response n: l_n = sum_k mask[n,k] * (y_hat[n,k] - y[n,k])^2 and the step loss
                is sum_n l_n / sum_{n,k} mask[n,k]: the mean squared error over the attribute
                scores PRESENT in the step (a missing attribute is masked, never read as 0),
                as NeMo-Aligner's regression reward model computes it

Per-unit losses come back unreduced (pairs [P] or responses [N]); the stage divides their sum
by the step's global normalizer (pairs, or present attribute scores) reduced once over DP
(`nova_engine.losses.dpo.reduce_pairs` does sum / normalizer), so gradient accumulation and DP
give the full-batch mean. Metrics: accuracy 1[r_c > r_r] (a tie counts as wrong, as RewardBench
counts it), margin r_c - r_r, and per-attribute squared errors with their counts (MSE_k =
sum_n sq_err[n,k] / sum_n mask[n,k]).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAIRWISE = ("bt", "margin_bt", "scaled_bt")
REWARD_LOSS_TYPES = (*PAIRWISE, "regression")


@dataclass
class RewardLossConfig:
    """Which reward-model loss, and its options."""

    loss_type: str = "bt"
    """One of REWARD_LOSS_TYPES: bt, margin_bt, scaled_bt (pairs), regression (attributes)."""
    center_rewards_coefficient: float = 0.0
    """c >= 0: adds c * (r_c + r_r)^2 per pair (keeps rewards centred at 0); pairwise only."""

    def __post_init__(self) -> None:
        if self.loss_type not in REWARD_LOSS_TYPES:
            raise ValueError(
                f"RewardLossConfig.loss_type={self.loss_type!r}: expected one of "
                f"{', '.join(REWARD_LOSS_TYPES)}"
            )
        c = self.center_rewards_coefficient
        if not c >= 0:
            raise ValueError(f"RewardLossConfig.center_rewards_coefficient={c}: expected >= 0")
        if c and self.loss_type == "regression":
            raise ValueError(
                "RewardLossConfig.center_rewards_coefficient applies to pairwise losses, "
                "not to regression"
            )

    @property
    def pairwise(self) -> bool:
        return self.loss_type in PAIRWISE


@dataclass
class PairwiseOutput:
    """Per-pair losses [P] (differentiable) and detached metrics [P]."""

    losses: torch.Tensor
    accuracy: torch.Tensor
    margin: torch.Tensor


@dataclass
class RegressionOutput:
    """Per-response summed squared errors over present attributes [N] (differentiable), the
    count of present attributes per response [N], and the detached masked squared errors and
    mask [N, K] for per-attribute MSE."""

    losses: torch.Tensor
    counts: torch.Tensor
    sq_err: torch.Tensor
    mask: torch.Tensor


PairLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PAIRWISE_LOSSES: dict[str, PairLoss] = {}


def register(name: str):
    def deco(fn):
        PAIRWISE_LOSSES[name] = fn
        return fn

    return deco


@register("bt")
def bradley_terry(diff: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """l = -log sigma(r_c - r_r); `diff` = r_c - r_r [P], m unused."""
    return -F.logsigmoid(diff)


@register("margin_bt")
def margin_bradley_terry(diff: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """l = -log sigma(r_c - r_r - m): the chosen reward must lead by the margin m."""
    return -F.logsigmoid(diff - m)


@register("scaled_bt")
def scaled_bradley_terry(diff: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """l = -m * log sigma(r_c - r_r): a pair of preference strength m counts m times."""
    return -m * F.logsigmoid(diff)


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """fp32 for half-precision inputs; float64 stays float64 (gradchecks)."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def pairwise_loss(
    r_c: torch.Tensor,
    r_r: torch.Tensor,
    margins: torch.Tensor | None,
    cfg: RewardLossConfig,
) -> PairwiseOutput:
    """Per-pair losses of `cfg.loss_type` (a PAIRWISE one) from rewards r_c, r_r [P] and the
    pairs' margins [P] (None: all 1), plus the centering term when c > 0."""
    if not cfg.pairwise:
        raise ValueError(f"pairwise_loss: loss_type={cfg.loss_type!r} is not pairwise")
    r_c, r_r = _fp32(r_c), _fp32(r_r)
    if r_c.shape != r_r.shape or r_c.dim() != 1:
        raise ValueError(f"rewards must be [P] each, got {tuple(r_c.shape)}, {tuple(r_r.shape)}")
    m = torch.ones_like(r_c) if margins is None else margins.to(r_c.device, r_c.dtype)
    diff = r_c - r_r
    losses = PAIRWISE_LOSSES[cfg.loss_type](diff, m)
    if cfg.center_rewards_coefficient:
        losses = losses + cfg.center_rewards_coefficient * (r_c + r_r) ** 2
    d = diff.detach()
    return PairwiseOutput(losses, (d > 0).to(d.dtype), d)


def regression_loss(
    pred_NK: torch.Tensor, target_NK: torch.Tensor, mask_NK: torch.Tensor | None = None
) -> RegressionOutput:
    """Masked squared errors of predicted attribute scores [N, K] against targets [N, K].
    `mask_NK` (1 = present) defaults to ~isnan(target); missing targets may hold NaN or any
    value: they are never read into the loss or its gradient."""
    pred_NK = _fp32(pred_NK)
    if pred_NK.shape != target_NK.shape or pred_NK.dim() != 2:
        raise ValueError(
            f"predictions {tuple(pred_NK.shape)} and targets {tuple(target_NK.shape)}: "
            "expected equal [N, K]"
        )
    target_NK = target_NK.to(pred_NK.device, pred_NK.dtype)
    if mask_NK is None:
        mask_NK = ~torch.isnan(target_NK)
    present = mask_NK.to(pred_NK.device).bool()
    # where() (not multiply) so a NaN placeholder cannot leak into values or gradients
    err = torch.where(present, pred_NK - torch.where(present, target_NK, 0.0), 0.0)
    sq = err * err
    m = present.to(pred_NK.dtype)
    return RegressionOutput(sq.sum(1), m.sum(1), sq.detach(), m)


def scalar_reward(
    values_NK: torch.Tensor, weights_K: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """One reward per response [N] from a K-output head [N, K]: sum_k w_k * values[n, k]
    (a one-hot w picks an attribute, e.g. helpfulness for a regression model on pairs)."""
    w = torch.as_tensor(weights_K, dtype=values_NK.dtype, device=values_NK.device)
    if values_NK.dim() != 2 or w.shape != (values_NK.shape[1],):
        raise ValueError(
            f"values {tuple(values_NK.shape)} and weights {tuple(w.shape)}: expected [N, K], [K]"
        )
    return _fp32(values_NK) @ _fp32(w)


def attribute_weights(attributes: Sequence[str], reward_attribute: str) -> list[float]:
    """The one-hot weights that read `reward_attribute` from a head over `attributes`."""
    if reward_attribute not in attributes:
        raise ValueError(
            f"reward attribute {reward_attribute!r} is not one of the head's outputs "
            f"{', '.join(attributes)}"
        )
    return [float(a == reward_attribute) for a in attributes]
