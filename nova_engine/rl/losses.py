"""RLVR on packed rollouts: the forward-only passes before the updates, the per-token
advantages, and the policy and value losses for `Loop.update`.

    stats = prepass(mbs, policy, reference, critic, ps, cfg)   # old / ref log-probs, values
    assign_advantages(mbs, estimator="grpo", ...)             # advantages (+ returns)
    loop.update("policy", mbs_k, PolicyLoss(cfg, ps))           # per mini-batch
    loop.update("critic", mbs_k, ValueLoss(cfg, ps))            # PPO

Layout (nova_engine.rl.rollouts, rl.minibatch): every tensor is [T] on a micro-batch's label-aligned packed
positions; position j predicts token j+1, so the log-prob, value and advantage of a response
token share its position, and `loss_mask` is 1 exactly on response tokens. These tensors exist
on the last pipeline stage only (where the loss runs); other stages hold none.

- Temperature: every log-prob here (old, reference, the policy loss's, the entropy and so the
  KL) is of log_softmax(logits / T) at the rollout temperature T, as the sampler draws and
  reports them (TRL / open-instruct), the 1/T inside the fused kernel; T = 1 is the plain op.
- Old log-probs come from the policy's training forward before any update (not from the
  sampler): the sampler's log-probs are compared with them every step, the invariants the
  peers check in CI (equal to fp32 rounding for colocated generation):
  `train_rollout_logprob_abs_diff` = mean |gen - old| and NeMo-RL's `token_mult_prob_error`
  = mean exp(|gen - old|) (1 when equal) over the response tokens; with `loss.tis` they enter
  the loss as the truncated importance weight min(e^(old - gen), cap).
- Values: the critic's score head read at EVERY position (`token_values`), not only at the
  last token as a reward model reads it.
- Advantages: by the estimator's declarations (nova_engine.rl.estimators): baseline
  estimators broadcast their per-response outcome advantage (computed with DP-reduced group
  statistics before packing); the others take returns of the token rewards (reward at the last
  response token, minus beta * KL per token when the KL is in the reward) per packed sequence:
  GAE with the critic's values, or discounted returns; whitening over all of the step's
  response tokens of every DP rank (`whiten_dp`) where the estimator says so.
- Losses are normalized by the mini-batch's global token (sequence) count, reduced once over DP
  by the loop, so per-step losses do not depend on the layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

import nova_kernels as nk
from nova_engine.losses.policy import PolicyLossConfig, compute_policy_loss
from nova_engine.model.heads import (
    _tp_args,
    lm_head_weight,
    matmul_fp32,
    score_head,
    token_logprobs,
)
from nova_engine.rl.estimators import Estimator, get_estimator
from nova_engine.rl.minibatch import RLMicroBatch
from nova_engine.rl.rollouts import ppo_token_rewards
from nova_engine.rl.stats import whiten_dp


def token_values(model: torch.nn.Module, hidden: torch.Tensor, ps) -> torch.Tensor:
    """[T] fp32 values: the score head (K = 1) at every position of hidden [T(/tp), 1, H],
    accumulated in fp32 (`matmul_fp32`: no bf16 rounding of values near 10). Under sequence
    parallelism the rows are all-gathered over TP (backward: each rank keeps
    the gradient of its own rows; the loss is the same on every TP rank)."""
    h_TH = hidden.reshape(-1, hidden.shape[-1])
    if ps.sp and ps.tp > 1:
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        h_TH = gather_from_sequence_parallel_region(
            h_TH, tensor_parallel_output_grad=False, group=ps.tp_group
        )
    return matmul_fp32(h_TH, score_head(model).weight[:1])[:, 0]


# ------------------------------------------------------------------------------ pre-pass


def _kl(cfg: PolicyLossConfig, logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return nk.kl_divergence(logp, ref, cfg.kl_type, log_ratio_clamp=cfg.kl_log_ratio_clamp,
                            value_clamp=cfg.kl_value_clamp)  # fmt: skip


PREPASS_METRICS = ("tokens", "entropy", "kl", "logprob_abs_diff", "mult_prob", "values",
                   "is_over_cap", "staleness")  # fmt: skip


def prepass(mbs: Sequence[RLMicroBatch], policy, reference, critic, ps, cfg: PolicyLossConfig,
            temperature: float = 1.0, version: int = 0):  # fmt: skip
    """Forward-only passes over all of this rank's micro-batches of the step: the policy's
    log-probs and entropies (old_logprobs, entropy), the reference's log-probs (ref_logprobs,
    when `reference`), the critic's values (values, when `critic`), into each mb.data on the
    last stage; log-probs and entropies at `temperature` (the rollouts'). Returns
    per-micro-batch metric sums (PREPASS_METRICS) for Loop.reduce_metrics; `version` is the
    trainer's policy version (staleness = version - each token's sampling version)."""
    tp, temp = _tp_args(ps), float(temperature)

    def logp_entropy(model, hidden, mb):
        h = hidden.reshape(-1, hidden.shape[-1])
        lp, ent = nk.linear_logprobs(h, lm_head_weight(model), mb.labels, return_entropy=True,
                                     temperature=temp, **tp)  # fmt: skip
        return torch.stack([lp, ent])

    outs = policy.forward_collect(mbs, logp_entropy)
    for mb, o in zip(mbs, outs):
        mb.data["old_logprobs"], mb.data["entropy"] = o[0], o[1]
    if reference is not None:
        refs = reference.forward_collect(
            mbs, lambda m, h, b: token_logprobs(m, h, b.labels, ps, temperature=temp)
        )
        for mb, o in zip(mbs, refs):
            mb.data["ref_logprobs"] = o
    if critic is not None:
        vals = critic.forward_collect(mbs, lambda m, h, b: token_values(m, h, ps))
        for mb, o in zip(mbs, vals):
            mb.data["values"] = o
    results = []
    for mb in mbs if outs else []:
        d, mask = mb.data, mb.loss_mask
        r = {"tokens": mask.sum(), "entropy": (d["entropy"] * mask).sum()}
        r["kl"] = (_kl(cfg, d["old_logprobs"], d["ref_logprobs"]) * mask).sum() \
            if "ref_logprobs" in d else torch.zeros(())  # fmt: skip
        gen, zero = mb.rb.gen_logprobs, torch.zeros(())
        diff = (gen - d["old_logprobs"]).abs() * mask if gen is not None else None
        r["logprob_abs_diff"] = diff.sum() if diff is not None else zero
        r["mult_prob"] = (torch.exp(diff) * mask).sum() if diff is not None else zero
        over = zero  # tokens whose behaviour weight e^(old - gen) exceeds loss.tis_cap
        if gen is not None and cfg.tis_cap is not None:
            w = torch.exp(torch.clamp(d["old_logprobs"] - gen, -20.0, 20.0))
            over = ((w > cfg.tis_cap).float() * mask).sum()
        r["is_over_cap"] = over
        r["staleness"] = mb.rb.staleness(version).sum()  # policy versions behind (async)
        r["values"] = (d["values"] * mask).sum() if "values" in d else torch.zeros(())
        results.append(r)
    return results


# ------------------------------------------------------------------------------ advantages


def assign_advantages(
    mbs: Sequence[RLMicroBatch],
    *,
    estimator: Estimator | str,
    policy_cfg: PolicyLossConfig,
    gamma: float,
    lam: float,
    whiten: bool,
    ps,
) -> None:
    """mb.data["advantages"] (and ["returns"] for gae) on the last stage, by the estimator's
    declarations (nova_engine.rl.estimators); see the module docstring. Collective over the
    DP group of the last stage when the estimator whitens."""
    if not ps.is_last_stage():
        return
    if isinstance(estimator, str):
        estimator = get_estimator(estimator)
    for mb in mbs:
        d, r_T = mb.data, None
        if estimator.token_rewards:
            kl_T, coef = None, 0.0
            if policy_cfg.kl_in == "reward" and "ref_logprobs" in d:
                kl_T = _kl(policy_cfg, d["old_logprobs"], d["ref_logprobs"])
                coef = policy_cfg.kl_coef
            r_T = ppo_token_rewards(mb.rb, mb.rewards_R, kl_T, coef)
        adv, ret = estimator.token_advantages(mb.rb, adv_R=mb.adv_R, rewards_T=r_T,
                                              values_T=d.get("values"), gamma=gamma, lam=lam)  # fmt: skip
        d["advantages"] = adv
        if ret is not None:
            d["returns"] = ret
    if estimator.whitens(whiten) and mbs:
        adv = torch.cat([mb.data["advantages"] for mb in mbs])
        mask = torch.cat([mb.loss_mask for mb in mbs])
        white = whiten_dp(adv, mask, group=ps.dp_group) * (mask != 0)
        for mb, part in zip(mbs, white.split([mb.num_tokens for mb in mbs])):
            mb.data["advantages"] = part


# ------------------------------------------------------------------------------ losses


def _counts(mbs: Sequence[RLMicroBatch], policy: bool = False) -> dict[str, float]:
    """Normalizers of a mini-batch on this rank: response tokens and sequences (policy: only
    those the policy loss trains on, RLMicroBatch.policy_mask)."""
    if policy:
        return {
            "tokens": float(sum(mb.policy_tokens for mb in mbs)),  # host counts (packing)
            "seqs": float(sum(mb.policy_seqs for mb in mbs)),
        }
    return {
        "tokens": float(sum(mb.num_loss_tokens for mb in mbs)),  # host counts (the packer)
        "seqs": float(sum(mb.num_samples for mb in mbs)),
    }


class PolicyLoss:
    """The policy loss of nova_engine.losses.policy on RL micro-batches (a loop Loss).

    Args:
        cfg: PolicyLossConfig (clip, dual clip, KL, aggregation).
        tis: pass the sampler's log-probs (truncated importance sampling, cfg.tis_cap).
        scale_len: seq-mean-token-sum-norm's constant length (Dr. GRPO: the max response
            length); the loss is sum / (scale_len * sequences of the mini-batch).
        temperature: the rollout temperature T: the loss's log-probs are those of
            log_softmax(logits / T) (the gradient carries the 1/T).
    Tokens: the micro-batches' `policy_mask` (loss_mask without the responses dropped by
    loss.mask_truncated / zero_variance_groups), in the loss and in its normalizers.
    """

    metric_names: tuple[str, ...] = (
        "loss", "pg_loss", "kl_loss", "clipped", "clipped_lower", "approx_kl", "tokens",
    )  # fmt: skip
    normalizer = "tokens"

    def __init__(self, cfg: PolicyLossConfig, ps, *, tis: bool = False, scale_len: float = 1.0,
                 temperature: float = 1.0):  # fmt: skip
        self.cfg, self.ps, self.tis, self.scale_len = cfg, ps, tis, scale_len
        self.temperature = float(temperature)

    def counts(self, microbatches: Sequence[RLMicroBatch]) -> dict[str, float]:
        return _counts(microbatches, policy=True)

    def loss_fn(self, norms: dict[str, torch.Tensor]):
        ps, n_tok, n_seq = self.ps, float(norms["tokens"]), float(norms["seqs"])
        cfg = dataclasses.replace(self.cfg, loss_scale_factor=self.scale_len * max(n_seq, 1.0))

        def loss_fn(model, hidden, mb: RLMicroBatch):
            d, mask = mb.data, mb.policy_mask
            lp = token_logprobs(model, hidden, mb.labels, ps, temperature=self.temperature)
            loss, m = compute_policy_loss(
                cfg, lp, d["old_logprobs"], d["advantages"], mask,
                rollout_logprobs=mb.rb.gen_logprobs if self.tis else None,
                ref_logprobs=d.get("ref_logprobs"), cu_seqlens=mb.cu_seqlens,
                cu_seqlens_host=mb.cu_seqlens_host, num_tokens=n_tok, num_seqs=n_seq,
            )  # fmt: skip
            n = mask.sum()
            zero = torch.zeros((), device=lp.device)
            metrics = {
                "loss": loss.detach(), "pg_loss": m["pg_loss"], "kl_loss": m.get("kl_loss", zero),
                "clipped": m["pg_clipfrac"] * n, "clipped_lower": m["pg_clipfrac_lower"] * n,
                "approx_kl": m["ppo_kl"] * n, "tokens": n,
            }  # fmt: skip
            return loss, n.long(), metrics

        return loss_fn

    def finalize_metrics(self, sums: dict[str, float], norms: dict[str, float]) -> dict:
        n = max(sums["tokens"], 1.0)
        return {
            "policy_loss": sums["loss"], "pg_loss": sums["pg_loss"], "kl_loss": sums["kl_loss"],
            "clip_frac": sums["clipped"] / n, "clip_frac_lower": sums["clipped_lower"] / n,
            "approx_kl": sums["approx_kl"] / n,
        }  # fmt: skip


class ValueLoss:
    """PPO's clipped value loss on the critic's per-token values (a loop Loss):
    vf_coef * 0.5 * max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2), token mean over
    the mini-batch (value_clip None: the plain squared error)."""

    metric_names: tuple[str, ...] = ("loss", "value_loss", "clipped", "tokens")
    normalizer = "tokens"

    def __init__(self, ps, *, vf_coef: float = 0.1, value_clip: float | None = 0.2):
        self.ps, self.vf_coef, self.clip = ps, vf_coef, value_clip

    def counts(self, microbatches: Sequence[RLMicroBatch]) -> dict[str, float]:
        return _counts(microbatches)

    def loss_fn(self, norms: dict[str, torch.Tensor]):
        ps, g = self.ps, max(float(norms["tokens"]), 1.0)

        def loss_fn(model, hidden, mb: RLMicroBatch):
            d, mask = mb.data, mb.loss_mask
            v = token_values(model, hidden, ps)
            err = (v - d["returns"]) ** 2
            clipped = torch.zeros_like(err)
            if self.clip is not None:
                old = d["values"]
                vc = old + (v - old).clamp(-self.clip, self.clip)
                err_c = (vc - d["returns"]) ** 2
                clipped = (err_c > err).float()
                err = torch.maximum(err, err_c)
            per_tok = 0.5 * err * mask
            value_loss = per_tok.sum() / g
            n = mask.sum()
            metrics = {"loss": (self.vf_coef * value_loss).detach(),
                       "value_loss": value_loss.detach(), "clipped": (clipped * mask).sum(),
                       "tokens": n}  # fmt: skip
            return self.vf_coef * value_loss, n.long(), metrics

        return loss_fn

    def finalize_metrics(self, sums: dict[str, float], norms: dict[str, float]) -> dict:
        return {"value_loss": sums["value_loss"],
                "vf_clip_frac": sums["clipped"] / max(sums["tokens"], 1.0)}  # fmt: skip
