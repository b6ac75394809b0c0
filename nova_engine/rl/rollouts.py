"""Rollouts -> packed training batches, per-token RL tensors on the packed layout, and group
statistics / whitening reduced over data-parallel ranks.

    ro = Rollouts.from_groups(prompt_tokens, generations, rewards, group_offset=dp_rank * P)
    for mb in ro.pack(capacity=4096, pad_to_multiple=tp):
        mb.batch                                # PackedBatch: prompt + response per sequence
        mb.gen_logprobs                         # [T] the sampler's log-probs, label-aligned
        adv_T = mb.per_token(adv_R)             # GRPO / RLOO: one advantage per response
        r_T = ppo_token_rewards(mb, ro.rewards_t(), kl_T, kl_coef)   # PPO: reward + KL
        adv_T, ret_T = gae_packed_advantages(mb, r_T, values_T, gamma, lam)

Layout (label-aligned, as PackedBatch): packed position j holds the prediction of token j+1
of its sequence, so the log-prob, value, reward and advantage of generated token k of a
response whose prompt has p tokens sit at position start + p + k - 1, and `batch.loss_mask`
is 1 exactly on those positions (the response tokens; never the prompt, never padding). The
last generated token's position carries the scalar reward (PPO).

Responses. `Generation.tokens` are the generated ids, the stop token included when
`finished` (the model learns to stop); finished=False means the length limit was hit without
a stop token (Tülu 3 may override its reward, see RewardConfig.truncated_reward). An EMPTY
generation (no tokens: the prompt filled the context) is not packed (nothing to train on) but
keeps its reward and group membership, so it still counts in its group's statistics.

Groups. `group_ids` [R] are GLOBAL ids (group_offset + prompt position): with the samples of a
prompt on one rank and `group_offset` = the rank's first prompt in the step, the DP-reduced
statistics (`group_advantages_dp`, `whiten_dp`) over `num_groups` = prompts per step equal
the single-process ones over the whole step.

Shape legend: P prompts, R responses (rows), N packed sequences, T packed tokens, G groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from nova_engine.data.packing import PackedBatch, pack_lengths
from nova_engine.data.sample import Sample


@dataclass
class Generation:
    """One generated response."""

    tokens: np.ndarray
    """[L] int64 generated ids (the stop token included when finished); L may be 0."""
    logprobs: np.ndarray | None = None
    """[L] float32 log-prob of each generated token under the sampling policy."""
    finished: bool = True
    """True when generation ended with a stop token; False when it hit the length limit."""
    versions: np.ndarray | None = None
    """[L] int64 the policy version (optimizer steps applied) that sampled each token; None:
    the trainer's current version (colocated generation). A partial rollout continued under
    newer weights holds several versions."""

    def __post_init__(self) -> None:
        self.tokens = np.asarray(self.tokens, dtype=np.int64).reshape(-1)
        if self.versions is not None:
            self.versions = np.asarray(self.versions, dtype=np.int64).reshape(-1)
            if self.versions.shape != self.tokens.shape:
                raise ValueError(
                    f"Generation: {self.versions.shape[0]} versions for "
                    f"{self.tokens.shape[0]} tokens"
                )
        if self.logprobs is not None:
            self.logprobs = np.asarray(self.logprobs, dtype=np.float32).reshape(-1)
            if self.logprobs.shape != self.tokens.shape:
                raise ValueError(
                    f"Generation: {self.logprobs.shape[0]} log-probs for "
                    f"{self.tokens.shape[0]} tokens"
                )
        self.finished = bool(self.finished)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class Rollouts:
    """A step's responses (on this rank), prompt-major: prompt p's responses are contiguous."""

    prompts: list[np.ndarray]  # [P] prompt token ids
    generations: list[Generation]  # [R]
    prompt_of: np.ndarray  # [R] int64 position of each response's prompt in `prompts`
    group_ids: np.ndarray  # [R] int64 global group id (group_offset + prompt position)
    rewards: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # [R]

    def __post_init__(self) -> None:
        R = len(self.generations)
        self.prompt_of = np.asarray(self.prompt_of, dtype=np.int64)
        self.group_ids = np.asarray(self.group_ids, dtype=np.int64)
        self.rewards = np.asarray(self.rewards, dtype=np.float32)
        if self.rewards.size == 0 and R:
            self.rewards = np.zeros(R, np.float32)
        for name in ("prompt_of", "group_ids", "rewards"):
            if getattr(self, name).shape != (R,):
                raise ValueError(
                    f"Rollouts.{name} has shape {getattr(self, name).shape}, expected ({R},)"
                )
        if R and (self.prompt_of.min() < 0 or self.prompt_of.max() >= len(self.prompts)):
            raise ValueError(f"Rollouts.prompt_of must index the {len(self.prompts)} prompts")
        for p, toks in enumerate(self.prompts):
            if len(toks) < 1:
                raise ValueError(f"prompt {p} is empty: a response needs a prompt token before it")

    @classmethod
    def from_groups(
        cls,
        prompts: Sequence[Sequence[int] | np.ndarray],
        generations: Sequence[Sequence[Generation]],
        rewards: Sequence[Sequence[float]] | None = None,
        *,
        group_offset: int = 0,
    ) -> Rollouts:
        """prompts [P]; generations[p] = prompt p's responses (any number, n for GRPO);
        rewards[p][i] the reward of generations[p][i] (None: zeros, set later with
        `set_rewards`). Group id of prompt p = group_offset + p."""
        if len(generations) != len(prompts):
            raise ValueError(f"{len(generations)} generation groups for {len(prompts)} prompts")
        if rewards is not None and [len(r) for r in rewards] != [len(g) for g in generations]:
            raise ValueError("rewards must have one value per generation, grouped like them")
        flat = [g for group in generations for g in group]
        prompt_of = np.repeat(np.arange(len(prompts)), [len(g) for g in generations])
        rew = (
            np.zeros(len(flat), np.float32) if rewards is None else [x for r in rewards for x in r]
        )
        return cls(
            prompts=[np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts],
            generations=flat,
            prompt_of=prompt_of,
            group_ids=prompt_of + int(group_offset),
            rewards=np.asarray(rew, dtype=np.float32),
        )

    # -- per-response views ----------------------------------------------------------------

    @property
    def num_responses(self) -> int:
        return len(self.generations)

    @property
    def response_lengths(self) -> np.ndarray:
        """[R] int64 generated tokens per response."""
        return np.array([len(g) for g in self.generations], dtype=np.int64)

    @property
    def finished(self) -> np.ndarray:
        """[R] bool: ended with a stop token."""
        return np.array([g.finished for g in self.generations], dtype=bool)

    @property
    def empty(self) -> np.ndarray:
        """[R] bool: no generated tokens (not packed)."""
        return self.response_lengths == 0

    def set_rewards(self, rewards: Sequence[float]) -> None:
        r = np.asarray(rewards, dtype=np.float32).reshape(-1)
        if r.shape != (self.num_responses,):
            raise ValueError(f"{r.shape[0]} rewards for {self.num_responses} responses")
        self.rewards = r

    def rewards_t(self, device=None) -> torch.Tensor:
        """[R] fp32 rewards as a tensor."""
        return torch.as_tensor(self.rewards, dtype=torch.float32, device=device)

    def group_ids_t(self, device=None) -> torch.Tensor:
        """[R] int64 global group ids as a tensor."""
        return torch.as_tensor(self.group_ids, dtype=torch.int64, device=device)

    def sample(self, r: int) -> Sample:
        """Prompt + response r as a Sample: loss on the response tokens only, index = r."""
        prompt, gen = self.prompts[self.prompt_of[r]], self.generations[r]
        tokens = np.concatenate([prompt, gen.tokens])
        mask = np.concatenate([np.zeros(len(prompt), np.uint8), np.ones(len(gen), np.uint8)])
        return Sample(tokens, mask, index=r)

    # -- packing ------------------------------------------------------------------------

    def pack(
        self,
        capacity: int,
        *,
        pad_to_multiple: int = 1,
        pad_id: int = 0,
        algorithm: str = "ffd",
        max_seqs_per_bin: int | None = None,
    ) -> list[RolloutBatch]:
        """The non-empty responses packed into micro-batches of at most `capacity` tokens
        (C++ packer; ValueError when one prompt + response exceeds it)."""
        rows = np.flatnonzero(~self.empty)
        lengths = np.array([len(self.prompts[self.prompt_of[r]]) for r in rows], np.int64)
        lengths += self.response_lengths[rows]
        if rows.size == 0:
            return []
        too_long = np.flatnonzero(lengths > capacity)
        if too_long.size:
            r = int(rows[too_long[0]])
            raise ValueError(
                f"response {r}: prompt + response = {lengths[too_long[0]]} tokens exceeds the "
                f"packing capacity {capacity} (set it >= max prompt + max response length)"
            )
        plan = pack_lengths(lengths, capacity, algorithm, max_seqs_per_bin, overlong="error")
        return [self._micro_batch(rows[ids], pad_to_multiple, pad_id) for ids in plan.bins()]

    def _micro_batch(self, rows: np.ndarray, pad_to_multiple: int, pad_id: int) -> RolloutBatch:
        samples = [self.sample(int(r)) for r in rows]
        batch = PackedBatch.from_samples(samples, pad_to_multiple=pad_to_multiple, pad_id=pad_id)
        starts = batch.cu_seqlens[: len(rows)].numpy().astype(np.int64)

        def on_responses(field: str, fill, dtype) -> torch.Tensor:
            """Per-token values of the responses on the label-aligned layout (`fill` elsewhere)."""
            out = np.full(batch.num_tokens, fill, dtype)
            for start, r in zip(starts, rows):
                p, gen = len(self.prompts[self.prompt_of[r]]), self.generations[r]
                out[start + p - 1 : start + p - 1 + len(gen)] = getattr(gen, field)
            return torch.from_numpy(out)

        logprobs = None
        if all(self.generations[r].logprobs is not None for r in rows):
            logprobs = on_responses("logprobs", 0.0, np.float32)
        versions = None
        have = [self.generations[r].versions is not None for r in rows]
        if any(have):
            if not all(have):
                r = int(rows[have.index(False)])
                raise ValueError(f"response {r}: no policy versions (others have them)")
            versions = on_responses("versions", -1, np.int64)  # -1: not a response token
        return RolloutBatch(batch, torch.from_numpy(rows.astype(np.int64)), logprobs, versions)


@dataclass
class RolloutBatch:
    """One packed micro-batch of rollouts."""

    batch: PackedBatch
    rows: torch.Tensor
    """[N] int64 the rollout row (response index r) of each packed sequence."""
    gen_logprobs: torch.Tensor | None = None
    """[T] fp32 the sampler's log-probs on the label-aligned layout, 0 off the loss mask
    (None when some generation came without log-probs)."""
    versions: torch.Tensor | None = None
    """[T] int64 the policy version that sampled each response token (label-aligned), -1 off
    the loss mask; None: every token from the trainer's current version (colocated)."""

    def to(self, device) -> RolloutBatch:
        lp = None if self.gen_logprobs is None else self.gen_logprobs.to(device)
        ver = None if self.versions is None else self.versions.to(device)
        return RolloutBatch(self.batch.to(device), self.rows.to(device), lp, ver)

    def staleness(self, version: int) -> torch.Tensor:
        """[T] fp32 version - the sampling version of each response token (0 off the mask and
        for colocated rollouts): how many optimizer steps old the behaviour policy is."""
        mask = self.batch.loss_mask
        if self.versions is None:
            return torch.zeros_like(mask, dtype=torch.float32)
        return (float(version) - self.versions.to(mask.device).float()) * mask

    @property
    def response_mask(self) -> torch.Tensor:
        """[T] fp32, 1 on response-token positions (= batch.loss_mask)."""
        return self.batch.loss_mask

    def per_token(self, x_R: torch.Tensor) -> torch.Tensor:
        """Per-response values [R] -> [T] fp32 on each response's token positions, 0 elsewhere
        (GRPO / RLOO / REINFORCE++-baseline advantages)."""
        seq = self.batch.seq_index.to(x_R.device)
        row_of_tok = self.rows.to(x_R.device)[seq.clamp_min(0)]
        return x_R.float()[row_of_tok] * self.batch.loss_mask.to(x_R.device)

    def last_positions(self) -> torch.Tensor:
        """[N] int64 position of each sequence's last response token's prediction."""
        return self.batch.cu_seqlens[1 : self.batch.num_samples + 1].long() - 2


def ppo_token_rewards(
    mb: RolloutBatch,
    rewards_R: torch.Tensor,
    kl_T: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """[T] fp32 token rewards for PPO: each response's scalar reward at its last token's
    position, minus kl_coef * KL per response token (kl_T [T] on the same layout, e.g. from
    nova_kernels.kl_divergence of the sampler's and the reference's log-probs)."""
    mask = mb.batch.loss_mask.to(rewards_R.device)
    out = torch.zeros_like(mask, dtype=torch.float32)
    out[mb.last_positions().to(rewards_R.device)] = rewards_R.float()[mb.rows.to(out.device)]
    if kl_T is not None:
        out = out - float(kl_coef) * kl_T.float() * mask
    return out


def gae_packed_advantages(
    mb: RolloutBatch,
    token_rewards_T: torch.Tensor,
    values_T: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE per packed sequence (nova_kernels.gae_packed over batch.cu_seqlens, the response
    mask as the step mask): (advantages [T], returns [T]) fp32, 0 off the response tokens.
    Whiten the advantages over DP with `whiten_dp` (verl does, for PPO)."""
    import nova_kernels as nk

    b = mb.batch
    mask = b.loss_mask.to(token_rewards_T.device)
    adv, ret = nk.gae_packed(
        token_rewards_T,
        values_T,
        mask,
        b.cu_seqlens.to(mask.device),
        gamma,
        lam,
        backend=backend,
        cu_seqlens_host=b.cu_seqlens_host,
    )  # fmt: skip  (the packer's host boundaries: no read-back of the longest sequence)
    return adv * mask, ret * mask


# ------------------------------------------------------------------------------ DAPO


def overlong_penalty(length: int, max_len: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to a response's reward:

        R_length(y) = 0                                   |y| <= L_max - L_cache
                      ((L_max - L_cache) - |y|) / L_cache  L_max - L_cache < |y| <= L_max
                      -1                                  L_max < |y|

    times `factor`, with L_max = max_len (the response limit), L_cache = buffer (1..max_len)."""
    if not 1 <= buffer <= max_len:
        raise ValueError(f"overlong_penalty: buffer={buffer}: expected 1..max_len={max_len}")
    start = max_len - buffer
    if length <= start:
        return 0.0
    if length <= max_len:
        return factor * (start - length) / buffer
    return -factor


def informative_groups(rewards: Sequence[float], group_ids: Sequence[int]) -> list[int]:
    """DAPO's dynamic-sampling filter: the ids (in first-seen order) of the groups whose
    rewards are not all equal (a group of one response is never informative)."""
    seen: dict[int, list[float]] = {}
    for r, g in zip(rewards, group_ids):
        seen.setdefault(int(g), []).append(float(r))
    return [g for g, rs in seen.items() if len(rs) > 1 and max(rs) != min(rs)]
