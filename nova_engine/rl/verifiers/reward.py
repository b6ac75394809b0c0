"""Reward shaping from verifier results, as Tülu 3's RLVR does it.

    cfg = RewardConfig(verified_reward=10.0, truncated_reward=0.0)
    rewards = shape_rewards(results, finished, cfg)       # list[float], one per response

reward = unverified_reward + (verified_reward - unverified_reward) * score, so a verified
answer (score 1) earns 10 and anything else 0 with the defaults (Tülu 3). A response that hit
the generation length limit without a stop token (`finished` False) gets `truncated_reward`
instead when that is set (open-instruct's non_stop_penalty: the value replaces the reward).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from nova_engine.rl.verifiers.base import VerifierResult


@dataclass
class RewardConfig:
    """How verifier scores become rewards."""

    verified_reward: float = 10.0
    """Reward of a verified response (score 1). Tülu 3: 10."""
    unverified_reward: float = 0.0
    """Reward of score 0 (wrong, no answer, timeout, error)."""
    truncated_reward: float | None = None
    """Reward of a response that hit the length limit without a stop token, replacing its
    verified reward (None: truncated responses are scored like any other)."""

    def __post_init__(self) -> None:
        for name in ("verified_reward", "unverified_reward", "truncated_reward"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"RewardConfig.{name} must be finite, got {v}")


def shape_rewards(
    results: Sequence[VerifierResult], finished: Sequence[bool], cfg: RewardConfig
) -> list[float]:
    """One reward per response (see the module docstring)."""
    if len(results) != len(finished):
        raise ValueError(f"{len(results)} results for {len(finished)} finished flags")
    span = cfg.verified_reward - cfg.unverified_reward
    out = []
    for r, done in zip(results, finished):
        if not done and cfg.truncated_reward is not None:
            out.append(float(cfg.truncated_reward))
        else:
            out.append(float(cfg.unverified_reward + span * r.score))
    return out
