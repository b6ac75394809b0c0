"""Sampling settings and the per-step token choice: greedy, temperature, top-k, top-p, with
counter-based randomness so that a sample depends only on (seed, prompt, sample, step).

Legend: B rows of the running batch, V the full vocabulary (logits gathered over TP).

Randomness. Sample i of prompt j draws, at its t-th generated token, the uniform
u = U(seed, j, i, t) in [0, 1) from a stateless integer hash (no generator state, no
dependence on which rows share a batch, on the batch order, on the parallel layout or on
the device), and takes the token at u of the inverse CDF of the (tempered, truncated)
distribution. Ties in the sort are broken by token id (stable sort), so equal logits give
equal tokens everywhere.

Log-probs and entropies are those of the distribution the tokens are drawn from, before
top-k / top-p truncation: log_softmax(logits / T) at temperature T > 0, the plain
log_softmax(logits) when greedy (T = 0). It is what the RL training forward computes for the
same tokens at the same temperature (nova_kernels.linear_logprobs(..., temperature=T), TRL /
open-instruct's convention), in fp32, so the rollout/training log-prob mismatch compares one
distribution with itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

_MASK32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2^27: a product with a 32-bit value stays inside int64


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. Per-request overrides live on `Request`."""

    temperature: float = 1.0
    """0 = greedy (argmax); > 0 divides the logits before top-k / top-p / sampling."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = all)."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    max_new_tokens: int = 128
    """Tokens generated per sample at most (the stop token counts as one)."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation of a sample ends at the first of these (EOS, the template's end of turn);
    the stop token is part of the output."""
    n: int = 1
    """Samples per prompt."""
    seed: int = 0
    """Root of the counter-based randomness (see the module docstring)."""
    return_entropy: bool = False
    """Also return the full-vocabulary entropy of the tempered (untruncated) distribution at
    each token (greedy: of the model's own distribution)."""

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature={self.temperature}: expected >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: expected >= 0 (0 = no top-k)")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p={self.top_p}: expected 0 < top_p <= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: expected >= 1")
        if self.n < 1:
            raise ValueError(f"n={self.n}: expected >= 1")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed={self.seed}: expected 0 <= seed < 2**63")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Request:
    """One prompt. `index` is its global number j (the randomness key; default: its position
    in the list given to `generate`); None fields take the SamplingParams value."""

    tokens: Sequence[int]
    index: int | None = None
    max_new_tokens: int | None = None
    stop_token_ids: Sequence[int] | None = None
    prefix: Sequence[Sequence[int]] | None = None
    """Partial rollouts: per sample i (n of them), the tokens it already generated before an
    interruption (e.g. a weight update); sample i continues after them with the same
    randomness keys (its token t still draws U(seed, prompt, i, t)) and max_new_tokens
    still counts them, so under unchanged weights the continuation is the uninterrupted
    generation. The returned tokens start with the prefix. A finished prefix (ending with a
    stop token, or max_new_tokens long) comes back unchanged."""
    prefix_logprobs: Sequence[Sequence[float]] | None = None
    """The prefix tokens' log-probs as they were sampled (kept in the returned log-probs;
    None: NaN there)."""


@dataclass
class Generation:
    """Sample `sample` of prompt `prompt`: the generated tokens (stop token included when
    one ended it), their fp32 log-probs and, on request, entropies; finish_reason is "stop"
    or "length" (max_new_tokens or the model's context reached)."""

    prompt: int
    sample: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] | None = None
    finish_reason: str = "length"


# ------------------------------------------------------------------------------ randomness


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer (int64 tensors holding values in [0, 2^32))."""
    x = ((x >> 16) ^ x) * _MUL & _MASK32
    x = ((x >> 16) ^ x) * _MUL & _MASK32
    return (x >> 16) ^ x


def _hash(
    seed: int, prompt_B: torch.Tensor, sample_B: torch.Tensor, step_B: torch.Tensor, lane: int
):
    h = torch.full_like(prompt_B, (seed & _MASK32) ^ (lane * 0x9E3779B9 & _MASK32))
    for word in (
        torch.full_like(prompt_B, (seed >> 32) & _MASK32),
        prompt_B & _MASK32,
        (prompt_B >> 32) & _MASK32,
        sample_B & _MASK32,
        step_B & _MASK32,
    ):
        h = _mix32((h ^ _mix32(word + 0x7F4A7C15 & _MASK32)) & _MASK32)
    return h


def uniforms(seed: int, prompt_B: torch.Tensor, sample_B: torch.Tensor, step_B: torch.Tensor):
    """[B] float64 uniforms in [0, 1) with 48 random bits, a pure function of
    (seed, prompt, sample, step) per row (int64 tensors on the CPU)."""
    hi = _hash(seed, prompt_B, sample_B, step_B, 1) >> 8  # 24 bits each
    lo = _hash(seed, prompt_B, sample_B, step_B, 2) >> 8
    return (hi * 16777216 + lo).double() / 2.0**48


# -------------------------------------------------------------------------------- sampling


def model_logprobs(
    logits_BV: torch.Tensor, tokens_B: torch.Tensor, entropy: bool, temperature: float = 1.0
):
    """fp32 log p(token) per row and (when asked) the full-vocabulary entropy of
    log_softmax(logits / temperature) (untruncated; temperature 0 = greedy: T = 1). The
    logits are multiplied by 1 / T, as the training kernel does."""
    z_BV = logits_BV.float()
    if temperature > 0.0 and temperature != 1.0:
        z_BV = z_BV * (1.0 / temperature)
    lse_B = torch.logsumexp(z_BV, dim=-1)
    lp_B = z_BV.gather(1, tokens_B[:, None]).squeeze(1) - lse_B
    ent_B = None
    if entropy:  # lse - E_p[z]
        ent_B = lse_B - (torch.softmax(z_BV, dim=-1) * z_BV).sum(-1)
    return lp_B, ent_B


def choose_tokens(logits_BV: torch.Tensor, params: SamplingParams, u_B: torch.Tensor | None):
    """[B] int64 next tokens: argmax when greedy, else the inverse CDF at u of the logits
    divided by the temperature and cut to top-k, then top-p (the order of transformers'
    logits processors)."""
    if params.greedy:
        return logits_BV.argmax(dim=-1)
    assert u_B is not None
    z_BV = logits_BV.float() / params.temperature
    vocab = z_BV.shape[-1]
    if 0 < params.top_k < vocab:
        z_BK, idx_BK = torch.topk(z_BV, params.top_k, dim=-1, sorted=True)
        # topk's order among equal values is unspecified: re-sort by (value desc, id asc)
        idx_BK, perm = torch.sort(idx_BK, dim=-1)
        z_BK = z_BK.gather(1, perm)
        z_BK, perm = torch.sort(z_BK, dim=-1, descending=True, stable=True)
        idx_BK = idx_BK.gather(1, perm)
    elif params.top_p < 1.0:
        z_BK, idx_BK = torch.sort(z_BV, dim=-1, descending=True, stable=True)
    else:  # plain sampling: the CDF in vocabulary order, no sort needed
        z_BK, idx_BK = z_BV, None
    p_BK = torch.softmax(z_BK.double(), dim=-1)
    if params.top_p < 1.0:
        before_BK = p_BK.cumsum(-1) - p_BK  # mass of the strictly more likely tokens
        p_BK = torch.where(before_BK < params.top_p, p_BK, torch.zeros_like(p_BK))
    cdf_BK = p_BK.cumsum(-1)
    target_B1 = (u_B.to(cdf_BK.device) * cdf_BK[:, -1]).unsqueeze(1)
    pos_B = torch.searchsorted(cdf_BK, target_B1, right=True).squeeze(1)
    # never pick a zero-probability token (u * total can round onto the last boundary)
    last_nz_B = (p_BK > 0).cumsum(-1).argmax(-1)
    pos_B = torch.minimum(pos_B, last_nz_B)
    return pos_B if idx_BK is None else idx_BK.gather(1, pos_B[:, None]).squeeze(1)
