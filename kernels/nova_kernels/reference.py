"""Plain-PyTorch references of every nova_kernels op, written the straightforward way
(materialized logits, loops over time steps, sequences and groups): the one copy that the
kernel tests, the engine tests, the benchmarks (their "naive" / "loop" baselines) and the demo
use. Floats are computed in the promoted dtype (fp32, or fp64 for fp64 inputs: call them on
`.double()` inputs for a high-precision oracle). Depends only on torch.

| op                                   | reference                                          |
| ------------------------------------ | -------------------------------------------------- |
| linear_logprobs                      | linear_logprobs_reference (logits -> log_softmax)  |
| linear_cross_entropy                 | linear_cross_entropy_reference                     |
| a causal LM's response log-probs     | causal_lm_logps (any model whose output has .logits, e.g. transformers) |
| seq_reduce                           | seq_reduce_reference (loop over sequences)         |
| gae_packed                           | gae_reference (verl's loop over t on padded rows; run it per sequence) |
| whiten                               | whiten_reference (verl's masked_whiten; over all ranks' elements) |
| group_advantages                     | group_advantages_reference (loop over groups, Python floats; over all ranks' responses) |
| kl_divergence, kl_penalty            | kl_reference (also the torch backend's per-token KL) |
| policy_loss                          | policy_loss_reference (one token at a time, autograd gradients) |
| GSPO (nova_engine policy loss gspo)  | gspo_loss_reference (one sequence at a time, the paper's formula) |
| CISPO (nova_engine policy loss cispo)| cispo_loss_reference (one token at a time, MiniMax-M1's formula) |
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Sequence

import torch

__all__ = [
    "causal_lm_logps",
    "cispo_loss_reference",
    "gspo_loss_reference",
    "gae_reference",
    "group_advantages_reference",
    "kl_reference",
    "linear_cross_entropy_reference",
    "linear_logprobs_reference",
    "policy_loss_reference",
    "seq_reduce_reference",
    "whiten_reference",
]


def _float_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


# ----------------------------------------------------------------------------- LM head


def linear_logprobs_reference(
    hidden: torch.Tensor,
    weight_full: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    return_entropy: bool = False,
    dtype: torch.dtype | None = None,
    temperature: float = 1.0,
):
    """Materialized logits -> log_softmax(logits / temperature) -> gather ([N, V] in memory).

    hidden [N, H], weight_full [V, H] (the whole LM head), targets [N]. `dtype` casts the inputs
    first (e.g. float64 for a high-precision reference); the GEMM runs in that dtype and the
    softmax in at least fp32. Returns logp [N] (and entropy [N]) in fp32, or fp64 for fp64;
    ignore_index rows are 0.
    """
    if dtype is not None:
        hidden, weight_full = hidden.to(dtype), weight_full.to(dtype)
    logits = hidden @ weight_full.T
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logsm = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    logp = logsm.gather(1, torch.where(valid, targets, 0).long()[:, None])[:, 0]
    logp = torch.where(valid, logp, 0.0)
    if not return_entropy:
        return logp
    ent = -(logsm.exp() * logsm).sum(-1)
    return logp, torch.where(valid, ent, 0.0)


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight_full: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    ignore_index: int = -100,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """-sum_n w_n log p(targets_n) through `linear_logprobs_reference` (0-dim)."""
    logp = linear_logprobs_reference(hidden, weight_full, targets, ignore_index, dtype=dtype)
    if token_weights is None:
        return -logp.sum()
    return -(logp * token_weights.to(logp.dtype)).sum()


@torch.no_grad()
def causal_lm_logps(model, tokens: Sequence[int], loss_mask: Sequence[int]) -> tuple[float, int]:
    """Summed float64 log-prob of the tokens whose loss_mask is set under a causal LM, and
    their count: the Sample convention (loss_mask[i] = 1: token i is predicted from the
    tokens before it; loss_mask[0] is never counted). `model(ids)` must return an object
    with `.logits` [1, T, V] (transformers' AutoModelForCausalLM in eval mode)."""
    ids = torch.as_tensor(list(tokens)).unsqueeze(0)
    logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    tgt = ids[0, 1:]
    mask = torch.as_tensor(list(loss_mask)[1:]).bool()
    return float(logp[torch.arange(len(tgt)), tgt][mask].sum()), int(mask.sum())


# ----------------------------------------------------------------------------- sequences


def seq_reduce_reference(values, cu_seqlens, mask=None, reduction: str = "sum") -> torch.Tensor:
    """Loop over sequences: [B] sums (or means over the counted tokens, 0 when none) of values
    [T] over cu_seqlens [B+1], in fp32 (fp64 for fp64 values); differentiable."""
    dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    w = torch.ones_like(values, dtype=dtype) if mask is None else (mask != 0).to(dtype)
    cu = cu_seqlens.tolist()
    outs = []
    for b in range(len(cu) - 1):
        seg_v, seg_w = values[cu[b] : cu[b + 1]].to(dtype), w[cu[b] : cu[b + 1]]
        total = (seg_v * seg_w).sum()
        if reduction == "mean":
            n = seg_w.sum()
            total = total / n if n > 0 else total * 0
        outs.append(total)
    return torch.stack(outs) if outs else values.new_zeros(0, dtype=dtype)


# ----------------------------------------------------------------------------- RL


def gae_reference(rewards, values, mask, gamma: float, lam: float):
    """verl's `compute_gae_advantage_return` loop over t, vectorized over rows: masked-out
    steps carry the next value and the running advantage.

    rewards, values, mask [B, T] -> (advantages, returns = advantages + values) [B, T]."""
    dt = _float_dtype(rewards)
    r, v, m = rewards.to(dt), values.to(dt), (mask != 0).to(dt)
    nextvalues = torch.zeros_like(r[:, 0])
    lastgaelam = torch.zeros_like(r[:, 0])
    out = []
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * nextvalues - v[:, t]
        new = delta + gamma * lam * lastgaelam
        nextvalues = v[:, t] * m[:, t] + (1 - m[:, t]) * nextvalues
        lastgaelam = new * m[:, t] + (1 - m[:, t]) * lastgaelam
        out.append(lastgaelam)
    adv = torch.stack(out[::-1], 1) if out else torch.zeros_like(r)
    return adv, adv + v


def whiten_reference(values, mask, shift_mean: bool = True, eps: float = 1e-8):
    """verl's `masked_whiten`: (x - mean) / sqrt(var + eps) with the mean and the unbiased
    variance of the masked elements (Bessel factor 1 below two of them), for every element."""
    dt = _float_dtype(values)
    x, m = values.to(dt), (mask != 0).to(dt)
    n = m.sum()
    mean = (x * m).sum() / (n + 1e-8)
    var = ((x - mean) ** 2 * m).sum() / (n + 1e-8)
    if n > 1:
        var = var * n / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def group_advantages_reference(
    scores: torch.Tensor,
    group_ids: torch.Tensor | Sequence[Hashable],
    estimator: str,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, dict[Hashable, bool]]:
    """One group at a time in Python floats (verl's compute_{grpo,rloo}_outcome_advantage).

    scores [S]; group_ids [S] ints or any hashable labels. estimator "grpo" (x - mean) /
    (std + eps), unbiased std; "dr_grpo" x - mean; "rloo" (x - mean) n / (n - 1). A group of
    one has mean 0 and std 1 (rloo: x itself). Returns (advantages [S] float64,
    {group id: all its scores equal}).
    """
    ids = group_ids.tolist() if isinstance(group_ids, torch.Tensor) else list(group_ids)
    groups: dict[Hashable, list[int]] = {}
    for i, g in enumerate(ids):
        groups.setdefault(g, []).append(i)
    adv = [0.0] * len(ids)
    equal: dict[Hashable, bool] = {}
    for g, members in groups.items():
        s = [float(scores[i]) for i in members]
        n = len(s)
        equal[g] = max(s) == min(s)
        mean = sum(s) / n if n > 1 else 0.0
        std = statistics.stdev(s) if n > 1 else 1.0
        for i, x in zip(members, s):
            if estimator == "grpo":
                adv[i] = (x - mean) / (std + eps)
            elif estimator == "dr_grpo":
                adv[i] = x - mean
            elif estimator == "rloo":
                adv[i] = (x - mean) * n / (n - 1) if n > 1 else x
            else:
                raise ValueError(f"group_advantages_reference: estimator={estimator!r}")
    return torch.tensor(adv, dtype=torch.float64), equal


# ----------------------------------------------------------------------------- policy loss


def kl_reference(logprobs, ref_logprobs, kl_type="k3", log_ratio_clamp=20.0, value_clamp=10.0):
    """Per-token KL estimate k1 | k2 | k3 (Schulman) of logprobs vs ref_logprobs, with
    logr = clamp(ref - logprobs, +-log_ratio_clamp) and the value clamped to +-value_clamp
    (None: no clamp); differentiable, promoted float dtype. The torch backend of
    `kl_divergence` / `policy_loss` computes its KL with this function."""
    dt = _float_dtype(logprobs)
    logr = ref_logprobs.to(dt) - logprobs.to(dt)
    if log_ratio_clamp is not None:
        logr = logr.clamp(-log_ratio_clamp, log_ratio_clamp)
    if kl_type == "k1":
        kl = -logr
    elif kl_type == "k2":
        kl = 0.5 * logr.square()
    else:
        kl = torch.exp(logr) - 1 - logr
    if value_clamp is not None:
        kl = kl.clamp(-value_clamp, value_clamp)
    return kl


def policy_loss_reference(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    rows: Sequence[Sequence[int]],
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = 3.0,
    rollout_logprobs: torch.Tensor | None = None,
    tis_cap: float | None = 2.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
    kl_log_ratio_clamp: float | None = 20.0,
    kl_value_clamp: float | None = 10.0,
    agg: str = "token-mean",
    loss_scale_factor: float | None = None,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """`nova_kernels.policy_loss` (same keyword arguments) one token at a time: PPO clip,
    dual clip, truncated IS weight, KL term, then the aggregation over `rows` (one list of
    indices into the flattened tensors per sequence). The loss is differentiable w.r.t.
    `logprobs` (autograd gives the reference gradient). Returns (loss 0-d, metrics)."""
    clip_high = clip_low if clip_high is None else clip_high
    lp, old, adv = logprobs.reshape(-1), old_logprobs.reshape(-1), advantages.reshape(-1)
    m = mask.reshape(-1)
    rl = rollout_logprobs.reshape(-1) if rollout_logprobs is not None else None
    ref = ref_logprobs.reshape(-1) if ref_logprobs is not None else None
    cap = math.inf if tis_cap is None else tis_cap
    row_loss, row_kl, row_n = [], [], []
    n_clip = n_lower = 0
    approx_kl = 0.0
    for idx in rows:
        s_loss = s_kl = torch.zeros((), dtype=torch.float64)
        n = 0
        for i in idx:
            if not m[i]:
                continue
            a = adv[i]
            ratio = torch.exp(torch.clamp(lp[i] - old[i], -20.0, 20.0))
            pg1, pg2 = -a * ratio, -a * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
            loss = torch.maximum(pg1, pg2)
            n_clip += bool(pg2 > pg1)
            if dual_clip is not None and a < 0:
                n_lower += bool(loss > -a * dual_clip)
                loss = torch.minimum(loss, -a * dual_clip)
            if rl is not None:
                loss = loss * min(math.exp(max(-20.0, min(20.0, float(old[i] - rl[i])))), cap)
            kl = torch.zeros((), dtype=torch.float64)
            if ref is not None:
                kl = kl_reference(lp[i], ref[i], kl_type, kl_log_ratio_clamp, kl_value_clamp)
                loss = loss + kl_coef * kl
            s_loss, s_kl, n = s_loss + loss, s_kl + kl.detach(), n + 1
            approx_kl += float(old[i] - lp[i].detach())
        row_loss.append(s_loss)
        row_kl.append(s_kl)
        row_n.append(n)
    ntok = sum(row_n)
    nseq = num_seqs or sum(1 for n in row_n if n > 0)
    scale = loss_scale_factor or max(max((len(r) for r in rows), default=1), 1)

    def aggregate(values):
        if agg == "token-mean":
            return sum(values) / (num_tokens or ntok)
        if agg == "seq-mean-token-sum":
            return sum(v for v, n in zip(values, row_n) if n) / nseq
        if agg == "seq-mean-token-mean":
            return sum(v / n for v, n in zip(values, row_n) if n) / nseq
        if agg == "seq-mean-token-sum-norm":
            return sum(values) / scale
        raise ValueError(f"policy_loss_reference: agg={agg!r}")

    metrics = {
        "pg_clipfrac": n_clip / ntok,
        "pg_clipfrac_lower": n_lower / ntok,
        "ppo_kl": approx_kl / ntok,
        "kl_loss": float(aggregate(row_kl)),
    }
    return aggregate(row_loss), metrics


def gspo_loss_reference(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    rows: Sequence[Sequence[int]],
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    token_level: bool = False,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
    num_seqs: float | None = None,
) -> torch.Tensor:
    """GSPO (Zheng et al. 2025) one sequence (a list of flat indices in `rows`) at a time:
    s_i = (pi(y_i|x) / pi_old(y_i|x))^(1/|y_i|) = exp(mean_t (logp_t - old_t)) over the masked
    tokens, with the gradient through the mean, and
        loss = -1/G sum_i min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i)
    with A_i the response's advantage (its first masked token's). token_level: the GSPO-token
    variant s_i,t = sg(s_i) * exp(logp_t - sg(logp_t)) with the per-token advantages, averaged
    over each sequence's tokens. The KL term (ref_logprobs) is kl_coef * 1/G sum_i mean_t kl_t.
    G = num_seqs or the non-empty rows. Differentiable w.r.t. logprobs."""
    clip_high = clip_low if clip_high is None else clip_high
    lp, old, adv = logprobs.reshape(-1), old_logprobs.reshape(-1), advantages.reshape(-1)
    m = mask.reshape(-1)
    ref = ref_logprobs.reshape(-1) if ref_logprobs is not None else None
    total, G = torch.zeros((), dtype=lp.dtype), 0
    for idx in rows:
        toks = [i for i in idx if m[i]]
        if not toks:
            continue
        G += 1
        log_s = torch.stack([lp[i] - old[i] for i in toks]).sum() / len(toks)
        s = torch.exp(log_s)
        if token_level:
            terms = []
            for i in toks:
                s_t = s.detach() * torch.exp(lp[i] - lp[i].detach())
                a = adv[i]
                terms.append(
                    -torch.minimum(s_t * a, torch.clamp(s_t, 1 - clip_low, 1 + clip_high) * a)
                )
            obj = sum(terms) / len(toks)
        else:
            a = adv[toks[0]]
            obj = -torch.minimum(s * a, torch.clamp(s, 1 - clip_low, 1 + clip_high) * a)
        if ref is not None:
            kl = sum(kl_reference(lp[i], ref[i], kl_type) for i in toks) / len(toks)
            obj = obj + kl_coef * kl
        total = total + obj
    return total / (num_seqs or max(G, 1))


def cispo_loss_reference(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    tis_cap: float | None = 2.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
    num_tokens: float | None = None,
) -> torch.Tensor:
    """CISPO (MiniMax-M1, 2025) one token at a time:
        loss = -sum_t sg(clip(r_t, 1 - clip_low, 1 + clip_high)) A_t logp_t / total tokens,
    r_t = exp(logp_t - old_t); the IS weight is a constant (Python float), so the gradient is
    -w_t A_t d logp_t; times min(exp(old - rollout), tis_cap) with rollout_logprobs; plus
    kl_coef * kl_t with ref_logprobs. Differentiable w.r.t. logprobs."""
    clip_high = clip_low if clip_high is None else clip_high
    lp, old, adv = logprobs.reshape(-1), old_logprobs.reshape(-1), advantages.reshape(-1)
    m = mask.reshape(-1)
    total, n = torch.zeros((), dtype=lp.dtype), 0
    for i in range(lp.numel()):
        if not m[i]:
            continue
        n += 1
        r = math.exp(float(lp[i] - old[i]))
        w = min(max(r, 1 - clip_low), 1 + clip_high)
        if rollout_logprobs is not None:
            tis = math.exp(float(old[i] - rollout_logprobs.reshape(-1)[i]))
            w *= tis if tis_cap is None else min(tis, tis_cap)
        term = -w * adv[i] * lp[i]
        if ref_logprobs is not None:
            term = term + kl_coef * kl_reference(lp[i], ref_logprobs.reshape(-1)[i], kl_type)
        total = total + term
    return total / (num_tokens or max(n, 1))
