"""Advantage estimators by name, thin over nova_kernels (verl's registry, in a small module).

    out = compute_advantages("grpo", token_rewards=r_BT, mask=m_BT, group_ids=uids)
    out.advantages [B, T] fp32, out.returns [B, T] fp32, out.degenerate [G] bool | None

Names (semantics of verl's core_algos estimators of the same names):
  gae                    GAE (observation steps carry), advantages whitened over the mask
  grpo                   (score - group mean) / (group std + eps), broadcast over the 0/1 mask
  dr_grpo                score - group mean (no std division)
  rloo                   n/(n-1) (score - group mean): the leave-one-out baseline
  reinforce_pp           discounted token returns (gamma), whitened over the mask, * mask
  reinforce_pp_baseline  score - group mean, broadcast, whitened over the mask, * mask

A sample's score is the sum of its token rewards. `group_ids` [B] names the prompt of each
sample: an int tensor or any sequence of hashables (e.g. uid strings). `degenerate[g]` is
True where all scores of group g are equal (g numbered by first appearance for sequences,
by sorted value for int tensors): the trainer may drop those groups.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import nova_kernels as nk


@dataclass
class AdvantageOutput:
    advantages: torch.Tensor
    """[B, T] fp32 per-token advantages."""
    returns: torch.Tensor
    """[B, T] fp32 value targets (GAE) / returns; equal to the advantages for outcome methods."""
    degenerate: torch.Tensor | None = None
    """[G] bool, True where all scores of the group are equal (group methods only)."""


AdvantageFn = Callable[..., AdvantageOutput]
_REGISTRY: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    def deco(fn: AdvantageFn) -> AdvantageFn:
        if name in _REGISTRY:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def get_advantage_fn(name: str) -> AdvantageFn:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; expected one of {sorted(_REGISTRY)}"
        ) from None


def advantage_names() -> list[str]:
    return sorted(_REGISTRY)


def compute_advantages(name: str, **kwargs) -> AdvantageOutput:
    """Runs the estimator `name` with keyword arguments (see each estimator)."""
    return get_advantage_fn(name)(**kwargs)


def group_index(group_ids, device: torch.device | None = None) -> tuple[torch.Tensor, int]:
    """[B] group labels (int tensor, or a sequence of hashables) -> ([B] int64 in [0, G), G)."""
    if isinstance(group_ids, torch.Tensor):
        if group_ids.is_floating_point() or group_ids.dim() != 1:
            raise ValueError("group_ids: expected a 1-d integer tensor or a sequence of labels")
        uniq, inverse = torch.unique(group_ids, return_inverse=True)
        return inverse.to(device or group_ids.device), uniq.numel()
    if not isinstance(group_ids, Sequence) and not hasattr(group_ids, "tolist"):
        raise ValueError("group_ids: expected a 1-d integer tensor or a sequence of labels")
    labels = group_ids.tolist() if hasattr(group_ids, "tolist") else list(group_ids)
    first: dict = {}
    ids = [first.setdefault(x, len(first)) for x in labels]
    return torch.tensor(ids, dtype=torch.long, device=device), len(first)


def _check(token_rewards: torch.Tensor, mask: torch.Tensor) -> None:
    if token_rewards.dim() != 2 or mask.shape != token_rewards.shape:
        raise ValueError(
            f"token_rewards and mask must both be [B, T]; got {tuple(token_rewards.shape)} "
            f"and {tuple(mask.shape)}"
        )


def _group_method(estimator, token_rewards, mask, group_ids, eps, backend):
    _check(token_rewards, mask)
    if group_ids is None:
        raise ValueError(f"{estimator}: group_ids is required")
    ids, G = group_index(group_ids, token_rewards.device)
    if ids.numel() != token_rewards.shape[0]:
        raise ValueError(f"{estimator}: {ids.numel()} group ids for {token_rewards.shape[0]} rows")
    scores = token_rewards.float().sum(-1)
    adv, degenerate = nk.group_advantages(
        scores, ids, estimator=estimator, num_groups=G, eps=eps, backend=backend
    )
    return adv, degenerate


@register_advantage("gae")
def _gae(*, token_rewards, mask, values, gamma=1.0, lam=1.0, whiten=True, backend=None, **_):
    """GAE on [B, T]; `values` [B, T] from the critic. verl whitens the advantages (whiten)."""
    _check(token_rewards, mask)
    if values is None:
        raise ValueError("gae: values is required")
    adv, ret = nk.gae(token_rewards, values, mask, gamma, lam, backend=backend)
    if whiten:
        adv = nk.whiten(adv, mask, backend=backend)
    return AdvantageOutput(adv, ret)


def _outcome(estimator):
    def fn(*, token_rewards, mask, group_ids=None, eps=1e-6, backend=None, **_):
        adv, degenerate = _group_method(estimator, token_rewards, mask, group_ids, eps, backend)
        tok = nk.broadcast_advantages(adv, mask, backend=backend)  # one pass over [B, T]
        return AdvantageOutput(tok, tok, degenerate)

    fn.__doc__ = f"{estimator} outcome advantages, broadcast over the mask (group_ids required)."
    return fn


for _name in ("grpo", "dr_grpo", "rloo"):
    register_advantage(_name)(_outcome(_name))


@register_advantage("reinforce_pp")
def _reinforce_pp(*, token_rewards, mask, gamma=1.0, backend=None, **_):
    """REINFORCE++: discounted token returns, whitened over the mask."""
    _check(token_rewards, mask)
    ret = nk.discounted_returns(token_rewards, mask, gamma, backend=backend)
    m = mask != 0
    return AdvantageOutput(nk.whiten(ret, mask, backend=backend) * m, ret)


@register_advantage("reinforce_pp_baseline")
def _reinforce_pp_baseline(*, token_rewards, mask, group_ids=None, eps=1e-6, backend=None, **_):
    """REINFORCE++-baseline: group-mean baseline, then global whitening over the mask."""
    adv, degenerate = _group_method("dr_grpo", token_rewards, mask, group_ids, eps, backend)
    m = mask != 0
    tok = adv[:, None] * m
    tok = nk.whiten(tok, mask, backend=backend) * m
    return AdvantageOutput(tok, tok, degenerate)
