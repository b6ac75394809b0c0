"""The advantage estimators: one registry on the packed layout, statistics reduced over DP.

    est = get_estimator("grpo")
    adv_R, degenerate_G = est.response_advantages(rewards_R, gids_R, G, eps=1e-6, group=dp)
    adv_T, ret_T = est.token_advantages(mb.rb, adv_R=..., rewards_T=..., values_T=..., ...)
    est.whitens(loss.whiten_advantages)   # whiten adv_T over the step's tokens of every rank

Each estimator is an `Estimator` declaring what it needs, and the trainer (rl.losses, the
rlvr stage, config validation) reads only these declarations — adding one is one
`register_estimator` call here:

  baseline  the group statistic of its outcome advantage (nova_kernels.group_advantages:
            grpo (s - mean) / (std + eps), dr_grpo s - mean, rloo n/(n-1) (s - mean)) over the
            samples of a prompt, reduced over DP; None: no group baseline
  returns   per-token returns from token rewards (the scalar reward at the last response
            token, minus beta * KL per token when loss.kl_in = reward): "gae" (GAE with the
            critic's values: needs a critic), "discounted" (REINFORCE++: GAE with zero
            values and lambda 1); None: the outcome advantage broadcast over the response
  whiten    "never", "always", or "option" (loss.whiten_advantages): masked whitening of the
            token advantages over every DP rank's response tokens

Semantics: verl's core_algos estimators of the same names (gae, grpo, rloo, reinforce_plus_plus,
reinforce_plus_plus_baseline; dr_grpo = grpo without the std division, Liu et al. 2025).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nova_engine.rl.rollouts import RolloutBatch, gae_packed_advantages
from nova_engine.rl.stats import group_advantages_dp

WHITEN_MODES = ("never", "always", "option")
RETURNS = ("gae", "discounted")


@dataclass(frozen=True)
class Estimator:
    """An advantage estimator (module docstring)."""

    name: str
    doc: str
    baseline: str | None = None
    returns: str | None = None
    whiten: str = "never"

    def __post_init__(self) -> None:
        if self.whiten not in WHITEN_MODES:
            raise ValueError(
                f"estimator {self.name}: whiten={self.whiten!r}: one of {WHITEN_MODES}"
            )
        if self.returns not in (None, *RETURNS):
            raise ValueError(f"estimator {self.name}: returns={self.returns!r}: one of {RETURNS}")
        if (self.baseline is None) == (self.returns is None):
            raise ValueError(f"estimator {self.name}: exactly one of baseline, returns")

    @property
    def needs_critic(self) -> bool:
        """GAE reads the critic's per-token values."""
        return self.returns == "gae"

    @property
    def group_baseline(self) -> bool:
        """Advantages from group statistics: samples_per_prompt > 1 matters, the groups whose
        rewards are all equal carry no signal (zero_variance_groups, dynamic sampling)."""
        return self.baseline is not None

    @property
    def token_rewards(self) -> bool:
        """Per-token rewards: the KL may enter the reward (loss.kl_in = reward)."""
        return self.returns is not None

    def whitens(self, option: bool) -> bool:
        """Whether the token advantages are whitened, given loss.whiten_advantages."""
        return self.whiten == "always" or (self.whiten == "option" and option)

    def response_advantages(
        self,
        rewards_R: torch.Tensor,
        group_ids_R: torch.Tensor,
        num_groups: int,
        *,
        eps: float = 1e-6,
        group=None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(outcome advantage [R] fp32, degenerate [G] bool) of this rank's responses with
        the group statistics of every DP rank (`group`); (zeros, None) without a baseline."""
        if self.baseline is None:
            return torch.zeros_like(rewards_R, dtype=torch.float32), None
        return group_advantages_dp(
            rewards_R, group_ids_R, num_groups, estimator=self.baseline, eps=eps, group=group
        )

    def token_advantages(
        self,
        rb: RolloutBatch,
        *,
        adv_R: torch.Tensor,
        rewards_T: torch.Tensor | None = None,
        values_T: torch.Tensor | None = None,
        gamma: float = 1.0,
        lam: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(advantages [T], returns [T] or None) of one packed micro-batch, before whitening:
        the outcome advantage broadcast over each response's tokens (baseline estimators), or
        the returns of `rewards_T` (token rewards, see the module docstring)."""
        mask = rb.batch.loss_mask
        if self.returns is None:
            return (rb.per_token(adv_R) if rb.rows.numel() else torch.zeros_like(mask)), None
        if rewards_T is None:
            raise ValueError(f"estimator {self.name}: token rewards are required")
        if self.returns == "gae":
            if values_T is None:
                raise ValueError(f"estimator {self.name}: the critic's values are required")
            return gae_packed_advantages(rb, rewards_T, values_T, gamma, lam)
        adv, _ = gae_packed_advantages(rb, rewards_T, torch.zeros_like(rewards_T), gamma, 1.0)
        return adv, None


ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(est: Estimator) -> Estimator:
    if est.name in ESTIMATORS:
        raise ValueError(f"advantage estimator {est.name!r} is already registered")
    ESTIMATORS[est.name] = est
    return est


def get_estimator(name: str) -> Estimator:
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; expected one of {', '.join(ESTIMATORS)}"
        ) from None


def estimator_names() -> tuple[str, ...]:
    return tuple(ESTIMATORS)


for _est in (
    Estimator("gae", "PPO: GAE on the critic's values", returns="gae", whiten="option"),
    Estimator("grpo", "(s - group mean) / (group std + eps)", baseline="grpo"),
    Estimator("dr_grpo", "s - group mean (Dr. GRPO: no std division)", baseline="dr_grpo"),
    Estimator("rloo", "n/(n-1) (s - group mean): the leave-one-out baseline", baseline="rloo"),
    Estimator(
        "reinforce_pp",
        "REINFORCE++: discounted token returns, whitened",
        returns="discounted",
        whiten="always",
    ),  # fmt: skip
    Estimator(
        "reinforce_pp_baseline",
        "REINFORCE++-baseline: s - group mean, whitened",
        baseline="dr_grpo",
        whiten="always",
    ),  # fmt: skip
):
    register_estimator(_est)
