"""Policy losses for RLVR / PPO by name, thin over `nova_kernels.policy_loss`.

    cfg = PolicyLossConfig(name="ppo", clip_low=0.2, clip_high=0.28, kl_coef=0.05)
    loss, metrics = compute_policy_loss(cfg, logprobs, old_logprobs, advantages, mask,
                                        rollout_logprobs=..., ref_logprobs=...)

Inputs are per-token [B, T] (or packed [N] with cu_seqlens): logprobs from
`nova_kernels.linear_logprobs` (the gradient flows there), old_logprobs from the policy
before this update, rollout_logprobs from the inference engine (for the truncated IS
correction), ref_logprobs from the frozen reference. Names:

  ppo        PPO clipped ratio with clip_low / clip_high and dual clip (verl's "vanilla")
  reinforce  importance-weighted policy gradient without clipping: -A * ratio
  gspo       GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): the clipped
             objective on the sequence-level ratio s_i = exp(mean_t (logp - old)) over the
             response's tokens, GSPO-token form s_i,t = sg(s_i) * exp(logp_t - sg(logp_t))
             (equal to GSPO when the advantage is constant over a response, as for the group
             estimators), seq-mean-token-mean aggregation, no dual clip:
                 loss = -1/G sum_i 1/|y_i| sum_t min(s_i,t A_i,t, clip(s_i,t, 1-lo, 1+hi) A_i,t)
  cispo      CISPO (MiniMax-M1, 2025): REINFORCE with clipped, stop-gradient IS weights:
                 loss = -sum_t sg(clip(r_t, 1-lo, 1+hi)) A_t logp_t / total tokens,
             r_t = exp(logp_t - old_t); no token is left without gradient (MiniMax-M1 sets
             no lower bound: clip_low close to 1), token-mean aggregation only

The KL to the reference is used in one place only (`kl_in`): "loss" adds
kl_coef * KL(k1|k2|k3) to every token's loss (differentiable; GRPO style); "reward"
subtracts kl_coef * KL from the token rewards before the advantages (the RLVR stage's
advantages, nova_engine.rl.losses; no gradient; PPO / Tülu 3 style); "none"
ignores it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import nova_kernels as nk
from nova_kernels import AGG_MODES, KL_TYPES

KL_PLACES = ("loss", "reward", "none")
TIS_MODES = ("truncate", "mask")


@dataclass
class PolicyLossConfig:
    """Hyperparameters of the policy loss."""

    name: str = "ppo"
    """A registered policy loss: ppo, reinforce, gspo or cispo."""
    clip_low: float = 0.2
    """Lower clip: the ratio is kept >= 1 - clip_low (ppo; gspo: the sequence ratio; cispo:
    the IS weight's epsilon_low^IS)."""
    clip_high: float | None = None
    """Upper clip: ratio <= 1 + clip_high (None: clip_low; DAPO's clip-higher uses 0.28)."""
    dual_clip: float | None = 3.0
    """Dual clip c > 1 for negative advantages (verl's clip_ratio_c); None turns it off."""
    tis_cap: float | None = 2.0
    """Cap of the truncated importance weight exp(old - rollout) (None: no truncation); used
    only when rollout log-probs are passed."""
    tis_mode: str = "truncate"
    """How the behaviour-policy weight w = exp(old - rollout) enters (only with rollout
    log-probs): "truncate" multiplies each token's loss by min(w, tis_cap) (TIS, Yao et al.
    2025); "mask" multiplies it by w and drops the tokens with w > tis_cap (their advantage
    is zeroed; the normalizer keeps them): AReaL's decoupled PPO objective, whose proximal
    policy is `old_logprobs` (the trainer's pre-update forward) and behaviour policy the
    sampler's."""
    agg: str = "token-mean"
    """Aggregation: token-mean, seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm."""
    loss_scale_factor: float | None = None
    """Divisor of seq-mean-token-sum-norm (None: the padded length; set the max response
    length to keep it constant across batches, as Dr. GRPO does)."""
    kl_coef: float = 0.0
    """Coefficient of the KL to the reference (Tülu 3: 0.05 for 8B, 0.07 for 70B)."""
    kl_type: str = "k3"
    """KL estimator: k1, k2 or k3."""
    kl_log_ratio_clamp: float | None = 20.0
    """Clamp of the log-ratio ref - logprobs before the estimator (None: off)."""
    kl_value_clamp: float | None = 10.0
    """Clamp of the estimator's value (None: off). NeMo-RL clamps all three estimators;
    verl clamps only k3: set both to None for k1/k2 to match verl."""
    kl_in: str = "loss"
    """Where the KL goes: loss, reward or none."""

    def __post_init__(self):
        if self.name not in _REGISTRY:
            raise ValueError(
                f"PolicyLossConfig.name={self.name!r}: expected one of {sorted(_REGISTRY)}"
            )
        if self.agg not in AGG_MODES:
            raise ValueError(f"PolicyLossConfig.agg={self.agg!r}: expected one of {AGG_MODES}")
        if self.kl_type not in KL_TYPES:
            raise ValueError(f"PolicyLossConfig.kl_type={self.kl_type!r}: expected {KL_TYPES}")
        if self.kl_in not in KL_PLACES:
            raise ValueError(f"PolicyLossConfig.kl_in={self.kl_in!r}: expected {KL_PLACES}")
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"PolicyLossConfig.clip_low={self.clip_low}: expected [0, 1)")
        if self.clip_high is not None and self.clip_high < 0:
            raise ValueError(f"PolicyLossConfig.clip_high={self.clip_high}: expected >= 0")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"PolicyLossConfig.dual_clip={self.dual_clip}: expected > 1")
        if self.tis_cap is not None and not self.tis_cap > 0:
            raise ValueError(f"PolicyLossConfig.tis_cap={self.tis_cap}: expected > 0")
        if self.tis_mode not in TIS_MODES:
            raise ValueError(f"PolicyLossConfig.tis_mode={self.tis_mode!r}: expected {TIS_MODES}")
        if self.tis_mode == "mask" and self.tis_cap is None:
            raise ValueError("PolicyLossConfig.tis_mode='mask': drops the tokens above tis_cap, "
                             "which must be set")  # fmt: skip
        for key in ("kl_log_ratio_clamp", "kl_value_clamp"):
            v = getattr(self, key)
            if v is not None and not v > 0:
                raise ValueError(f"PolicyLossConfig.{key}={v}: expected > 0 or None (off)")
        if self.kl_coef < 0:
            raise ValueError(f"PolicyLossConfig.kl_coef={self.kl_coef}: expected >= 0")
        if self.name == "gspo" and self.agg != "seq-mean-token-mean":
            raise ValueError(
                f"PolicyLossConfig.agg={self.agg!r}: gspo averages the sequence objective over "
                "sequences: expected seq-mean-token-mean"
            )
        if self.name == "cispo" and self.agg != "token-mean":
            raise ValueError(
                f"PolicyLossConfig.agg={self.agg!r}: cispo divides by the total token count "
                "(MiniMax-M1): expected token-mean"
            )
        if self.loss_scale_factor is not None and not self.loss_scale_factor > 0:
            raise ValueError(
                f"PolicyLossConfig.loss_scale_factor={self.loss_scale_factor}: expected > 0"
            )


PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
_REGISTRY: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    def deco(fn: PolicyLossFn) -> PolicyLossFn:
        if name in _REGISTRY:
            raise ValueError(f"policy loss {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def get_policy_loss_fn(name: str) -> PolicyLossFn:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown policy loss {name!r}; expected one of {sorted(_REGISTRY)}"
        ) from None


def policy_loss_names() -> list[str]:
    return sorted(_REGISTRY)


def _kernel_kwargs(cfg: PolicyLossConfig, ref_logprobs) -> dict:
    use_kl = cfg.kl_in == "loss" and ref_logprobs is not None and cfg.kl_coef > 0
    return dict(
        ref_logprobs=ref_logprobs if use_kl else None,
        kl_coef=cfg.kl_coef if use_kl else 0.0,
        kl_type=cfg.kl_type,
        kl_log_ratio_clamp=cfg.kl_log_ratio_clamp,
        kl_value_clamp=cfg.kl_value_clamp,
        agg=cfg.agg,
        loss_scale_factor=cfg.loss_scale_factor,
        tis_cap=cfg.tis_cap,
    )


@register_policy_loss("ppo")
def _ppo(cfg, logprobs, old_logprobs, advantages, mask, *, ref_logprobs=None, **kw):
    return nk.policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_low=cfg.clip_low,
        clip_high=cfg.clip_high,
        dual_clip=cfg.dual_clip,
        **_kernel_kwargs(cfg, ref_logprobs),
        **kw,
    )


@register_policy_loss("reinforce")
def _reinforce(cfg, logprobs, old_logprobs, advantages, mask, *, ref_logprobs=None, **kw):
    # no clipping: the clip bounds [1 - inf, 1 + inf] never bind and there is no dual clip
    return nk.policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_low=math.inf,
        clip_high=math.inf,
        dual_clip=None,
        **_kernel_kwargs(cfg, ref_logprobs),
        **kw,
    )


def seq_mean_per_token(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_host: Sequence[int] | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Every token's sequence mean of x over the masked tokens, shaped like x: rows of [B, T],
    or the packed sequences of [N] (nova_kernels.seq_reduce, then a broadcast whose size comes
    from cu_seqlens_host: no host read; without it cu_seqlens[-1] is read once). Tokens after
    cu_seqlens[-1] get 0. Differentiable w.r.t. x."""
    m = (mask != 0).to(x.dtype)
    if cu_seqlens is None:
        return ((x * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1)).expand_as(x)
    mean_S = nk.seq_reduce(x, cu_seqlens, mask, reduction="mean", backend=backend).to(x.dtype)
    total = int(cu_seqlens_host[-1]) if cu_seqlens_host is not None else int(cu_seqlens[-1])
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    per = torch.repeat_interleave(mean_S, lens, output_size=total)
    if total < x.numel():
        per = torch.cat([per, per.new_zeros(x.numel() - total)])
    return per


@register_policy_loss("gspo")
def _gspo(cfg, logprobs, old_logprobs, advantages, mask, *, ref_logprobs=None,
          rollout_logprobs=None, cu_seqlens=None, cu_seqlens_host=None, backend=None, **kw):  # fmt: skip
    # GSPO-token through the PPO kernel: with old' = sg(logp) - sg(mean_seq(logp - old)) the
    # kernel's ratio exp(logp - old') has the value s_i and the gradient s_i d logp_t
    if rollout_logprobs is not None:
        raise ValueError("policy loss gspo: the truncated IS weight (rollout_logprobs) is "
                         "per token, GSPO's ratio per sequence: not supported")  # fmt: skip
    with torch.no_grad():
        dt = torch.promote_types(logprobs.dtype, torch.float32)
        lp = logprobs.detach().to(dt)
        s_log = seq_mean_per_token(lp - old_logprobs.to(dt), mask, cu_seqlens=cu_seqlens,
                                   cu_seqlens_host=cu_seqlens_host, backend=backend)  # fmt: skip
        old_eff = lp - s_log
    return nk.policy_loss(
        logprobs,
        old_eff,
        advantages,
        mask,
        clip_low=cfg.clip_low,
        clip_high=cfg.clip_high,
        dual_clip=None,
        cu_seqlens=cu_seqlens,
        cu_seqlens_host=cu_seqlens_host,
        backend=backend,
        **_kernel_kwargs(cfg, ref_logprobs),
        **kw,
    )


@register_policy_loss("cispo")
def _cispo(cfg, logprobs, old_logprobs, advantages, mask, *, ref_logprobs=None,
           rollout_logprobs=None, num_tokens=None, backend=None, **_):  # fmt: skip
    # plain torch ops, elementwise + one sum: the token-mean needs no row structure
    dt = torch.promote_types(logprobs.dtype, torch.float32)
    lp, adv = logprobs.to(dt), advantages.to(dt)
    m = (mask != 0).to(dt)
    hi = cfg.clip_low if cfg.clip_high is None else cfg.clip_high
    with torch.no_grad():
        log_r = torch.clamp(lp - old_logprobs.to(dt), -20.0, 20.0)
        ratio = torch.exp(log_r)
        w = ratio.clamp(1 - cfg.clip_low, 1 + hi)
        if rollout_logprobs is not None:  # the truncated IS correction on top (loss.tis)
            tis = torch.exp(torch.clamp(old_logprobs.to(dt) - rollout_logprobs.to(dt), -20, 20))
            w = w * (tis if cfg.tis_cap is None else tis.clamp(max=cfg.tis_cap))
    per_tok = -w * adv * lp
    use_kl = cfg.kl_in == "loss" and ref_logprobs is not None and cfg.kl_coef > 0
    kl = torch.zeros_like(per_tok)
    if use_kl:
        kl = nk.kl_divergence(lp, ref_logprobs, cfg.kl_type, log_ratio_clamp=cfg.kl_log_ratio_clamp,
                              value_clamp=cfg.kl_value_clamp, backend=backend).to(dt)  # fmt: skip
    n = m.sum()
    denom = num_tokens if num_tokens is not None else n.clamp_min(1.0)
    if not isinstance(denom, torch.Tensor):
        denom = float(denom) if denom != 0 else 1.0
    loss = ((per_tok + cfg.kl_coef * kl) * m).sum() / denom
    kl_loss = ((kl * m).sum() / denom).detach()
    nd = n + 1e-8
    metrics = {
        "pg_clipfrac": (((ratio > 1 + hi) | (ratio < 1 - cfg.clip_low)).to(dt) * m).sum() / nd,
        "pg_clipfrac_lower": ((ratio < 1 - cfg.clip_low).to(dt) * m).sum() / nd,
        "ppo_kl": (-log_r * m).sum() / nd,
        "pg_loss": loss.detach() - cfg.kl_coef * kl_loss,
    }
    if use_kl:
        metrics["kl_loss"] = kl_loss
    return loss, metrics


def compute_policy_loss(
    cfg: PolicyLossConfig,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    rollout_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_host: Sequence[int] | None = None,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss `cfg.name` (0-d fp32, gradient to logprobs) and its metrics (detached 0-d):
    pg_clipfrac, pg_clipfrac_lower, ppo_kl, pg_loss, and kl_loss when the KL is in the loss."""
    if rollout_logprobs is not None and cfg.tis_mode == "mask":
        advantages = masked_off_policy(advantages, old_logprobs, rollout_logprobs, cfg.tis_cap)
    return get_policy_loss_fn(cfg.name)(
        cfg,
        logprobs,
        old_logprobs,
        advantages,
        mask,
        ref_logprobs=ref_logprobs,
        rollout_logprobs=rollout_logprobs,
        cu_seqlens=cu_seqlens,
        cu_seqlens_host=cu_seqlens_host,
        num_tokens=num_tokens,
        num_seqs=num_seqs,
        backend=backend,
    )


def masked_off_policy(
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    cap: float | None,
) -> torch.Tensor:
    """tis_mode "mask": the advantages zeroed on the tokens whose behaviour weight
    exp(old - rollout) exceeds `cap` (no gradient, no host sync). With the loss's truncation
    at the same cap, every kept token is weighted by w itself (w <= cap) and every dropped
    token contributes nothing: AReaL's decoupled objective with behav_imp_weight_cap."""
    with torch.no_grad():
        w = torch.exp(torch.clamp(old_logprobs.float() - rollout_logprobs.float(), -20.0, 20.0))
        keep = (w <= cap).to(advantages.dtype) if cap is not None else torch.ones_like(advantages)
    return advantages * keep
