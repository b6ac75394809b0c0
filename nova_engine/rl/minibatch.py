"""RLVR mini-batches: the step's responses (every rank holds the same list after the DP
gather, nova_engine.rl.producer) -> a seeded partition into `num_mini_batches` parts, each
dealt over DP balanced by tokens (`nova_engine.data.balance.deal`) and packed into
micro-batches of at most `capacity` tokens (exactly `capacity` when PP > 1, as the pipeline
schedules need) — a pure function of (responses, seed, step). A rank dealt nothing gets one
all-padding micro-batch (zero loss, zero counts, zero gradient).

    mbs = minibatches(resp, ps, step=s, num_mini_batches=M, capacity=C, seed=seed)
    mbs[k]                                   # this rank's RLMicroBatch list of mini-batch k
    mb.data["advantages"], mb.policy_mask    # [T] on the label-aligned packed layout
"""

from __future__ import annotations

import numpy as np
import torch

from nova_engine.data.balance import deal
from nova_engine.data.packing import IGNORE_INDEX, PackedBatch
from nova_engine.data.sample import Sample
from nova_engine.rl.producer import Response, StepResponses
from nova_engine.rl.rollouts import RolloutBatch, Rollouts


class RLMicroBatch:
    """A packed micro-batch of rollouts (RolloutBatch) with its per-token RL tensors [T]
    (`data`: old_logprobs, ref_logprobs, values, advantages, returns on the last stage) and
    its responses' rewards / outcome advantages [N_local rows]. Reads as its PackedBatch.
    `keep_R` [N_local rows] (None: all kept) marks the responses the POLICY loss trains on
    (loss.mask_truncated, loss.zero_variance_groups="drop"); `policy_mask` is its [T] mask,
    `policy_tokens` / `policy_seqs` its host counts (read once here, never in the schedule)."""

    def __init__(
        self,
        rb: RolloutBatch,
        rewards_R: torch.Tensor,
        adv_R: torch.Tensor,
        keep_R: torch.Tensor | None = None,
    ):
        self.rb, self.rewards_R, self.adv_R, self.keep_R = rb, rewards_R, adv_R, keep_R
        self.data: dict[str, torch.Tensor] = {}
        self.policy_tokens: float = float(rb.batch.num_loss_tokens)
        self.policy_seqs: int = rb.batch.num_samples
        if keep_R is not None and rb.rows.numel():
            keep_N = keep_R.cpu()[rb.rows.cpu()]
            self.policy_seqs = int(keep_N.sum())
            self.policy_tokens = float(rb.per_token(keep_R).sum())

    def __getattr__(self, name: str):
        if name in ("rb", "rewards_R", "adv_R", "keep_R", "data", "policy_tokens", "policy_seqs"):
            raise AttributeError(name)
        return getattr(self.rb.batch, name)

    @property
    def policy_mask(self) -> torch.Tensor:
        """[T] the policy loss's token mask: loss_mask, 0 on the responses keep_R drops."""
        if self.keep_R is None:
            return self.rb.batch.loss_mask
        return self.rb.per_token(self.keep_R).to(self.rb.batch.loss_mask.dtype)


def _pad_to(rb: RolloutBatch, length: int, pad_id: int) -> RolloutBatch:
    """The micro-batch padded with `length - T` more padding tokens (the padding segment)."""
    b = rb.batch
    extra = length - b.num_tokens
    if extra <= 0:
        return rb
    cu = b.cu_seqlens.clone()
    if b.num_segments > b.num_samples:  # a padding segment already ends the batch
        cu[-1] += extra
    else:
        cu = torch.cat([cu, cu[-1:] + extra])
    pad_len = int(cu[-1] - cu[-2])
    pos = b.position_ids.clone()
    pos = torch.cat([pos, torch.zeros(extra, dtype=pos.dtype)])
    pos[-pad_len:] = torch.arange(pad_len)
    batch = PackedBatch(
        tokens=torch.cat([b.tokens, torch.full((extra,), pad_id, dtype=b.tokens.dtype)]),
        position_ids=pos, cu_seqlens=cu,
        labels=torch.cat([b.labels, torch.full((extra,), IGNORE_INDEX, dtype=b.labels.dtype)]),
        loss_mask=torch.cat([b.loss_mask, torch.zeros(extra, dtype=b.loss_mask.dtype)]),
        seq_index=torch.cat([b.seq_index, torch.full((extra,), -1, dtype=b.seq_index.dtype)]),
        sample_ids=b.sample_ids, num_samples=b.num_samples, max_seqlen=max(b.max_seqlen, pad_len),
    )  # fmt: skip
    lp, ver = rb.gen_logprobs, rb.versions
    lp = None if lp is None else torch.cat([lp, torch.zeros(extra, dtype=lp.dtype)])
    ver = None if ver is None else torch.cat([ver, torch.full((extra,), -1, dtype=ver.dtype)])
    return RolloutBatch(batch, rb.rows, lp, ver)


def _padding_batch(length: int, pad_id: int) -> RolloutBatch:
    batch = PackedBatch.from_samples([], pad_id=pad_id, pad_to_length=length)
    return RolloutBatch(batch, torch.zeros(0, dtype=torch.int64), torch.zeros(length))


def policy_keep(rs: list[Response], *, mask_truncated: bool = False,
                drop_zero_var: bool = False) -> list[bool] | None:  # fmt: skip
    """Which responses the policy loss trains on: not those that hit the length limit
    without a stop token (mask_truncated) nor those of all-equal-reward groups
    (drop_zero_var); None when neither option is on (everything is kept)."""
    if not (mask_truncated or drop_zero_var):
        return None
    return [
        not ((mask_truncated and not r.gen.finished) or (drop_zero_var and r.zero_var)) for r in rs
    ]


def pack_share(rs: list[Response], ps, *, capacity: int, pad_id: int = 0,
               mask_truncated: bool = False, drop_zero_var: bool = False) -> list[RLMicroBatch]:  # fmt: skip
    """This rank's responses `rs` -> micro-batches on the device (module docstring); the
    options set each micro-batch's keep_R (`policy_keep`)."""
    fixed = ps.pp > 1
    empty_len = capacity if fixed else ps.tp * 8
    rbs: list[RolloutBatch] = []
    if any(len(r.gen) for r in rs):
        ro = Rollouts([r.prompt for r in rs], [r.gen for r in rs], np.arange(len(rs)),
                      np.array([r.group for r in rs]), np.array([r.reward for r in rs]))  # fmt: skip
        rbs = ro.pack(capacity, pad_to_multiple=ps.tp, pad_id=pad_id)
    if fixed:
        rbs = [_pad_to(rb, capacity, pad_id) for rb in rbs]
    if not rbs:
        rbs = [_padding_batch(empty_len, pad_id)]
    rew = torch.tensor([r.reward for r in rs], dtype=torch.float32, device=ps.device)
    adv = torch.tensor([r.advantage for r in rs], dtype=torch.float32, device=ps.device)
    keep = policy_keep(rs, mask_truncated=mask_truncated, drop_zero_var=drop_zero_var)
    keep_R = None if keep is None else torch.tensor(keep, dtype=torch.float32, device=ps.device)
    return [RLMicroBatch(rb.to(ps.device), rew, adv, keep_R) for rb in rbs]


def minibatches(
    sr: StepResponses,
    ps,
    *,
    step: int,
    num_mini_batches: int,
    capacity: int,
    seed: int,
    pad_id: int = 0,
    mask_truncated: bool = False,
    drop_zero_var: bool = False,
) -> list[list[RLMicroBatch]]:
    """The step's responses -> [M] mini-batches of this rank's micro-batches: a seeded
    partition of all responses into M parts, each dealt over DP balanced by tokens (the
    options: `pack_share`)."""
    rs = sr.responses
    perm = np.random.default_rng([seed, step, 7]).permutation(len(rs))
    out = []
    for k, part in enumerate(np.array_split(perm, num_mini_batches)):
        part = np.sort(part)  # step order inside a mini-batch
        items = [Sample(np.concatenate([rs[r].prompt, rs[r].gen.tokens]),
                        np.zeros(len(rs[r].prompt) + len(rs[r].gen), np.uint8), int(r))
                 for r in part]  # fmt: skip
        mine = deal(items, ps.dp, ps.dp_rank, seed=seed, step=step * num_mini_batches + k)
        out.append(pack_share([rs[s.index] for s in mine], ps, capacity=capacity, pad_id=pad_id,
                              mask_truncated=mask_truncated, drop_zero_var=drop_zero_var))  # fmt: skip
    return out
