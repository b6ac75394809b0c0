"""Sampling (no model): the counter-based uniforms, the token choice against a float64
inverse-CDF reference, log-probs/entropy, the batch planner's padding bound, request
validation and settings errors."""

from __future__ import annotations

import pytest
import torch

from nova_engine.generate import GenerationError, Request, SamplingParams, generate, plan_batches
from nova_engine.generate.sampling import choose_tokens, model_logprobs, uniforms
from nova_engine.model.arch import ModelArch


def test_uniforms_are_a_function_of_the_row_key_only():
    j = torch.tensor([0, 5, 5, 2**40 + 3, 7])
    i = torch.tensor([0, 0, 1, 2, 3])
    t = torch.tensor([0, 9, 9, 1, 100])
    u = uniforms(42, j, i, t)
    assert u.dtype == torch.float64 and ((u >= 0) & (u < 1)).all()
    perm = torch.tensor([3, 1, 4, 0, 2])  # another batch order gives the same per-row values
    assert torch.equal(uniforms(42, j[perm], i[perm], t[perm]), u[perm])
    assert torch.equal(uniforms(42, j[1:2], i[1:2], t[1:2]), u[1:2])  # alone in its batch
    assert len(set(u.tolist())) == 5  # keys differing in one field give different draws
    assert not torch.equal(uniforms(43, j, i, t), u)
    # roughly uniform: mean, spread and a coarse histogram over 40k draws
    n = 40000
    big = uniforms(7, torch.arange(n) // 8, torch.arange(n) % 8, torch.arange(n) % 3)
    assert abs(big.mean().item() - 0.5) < 0.01 and abs(big.var().item() - 1 / 12) < 0.005
    hist = torch.histc(big.float(), bins=10, min=0, max=1)
    assert (hist - n / 10).abs().max() < 0.06 * n / 10


def _reference_probs(logits_V: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """float64: temperature, top-k, top-p (smallest prefix of the sorted distribution whose
    mass reaches top_p), renormalized."""
    z = logits_V.double() / p.temperature
    keep = torch.ones_like(z, dtype=torch.bool)
    if p.top_k:
        kth = torch.sort(z, descending=True).values[p.top_k - 1]
        keep &= z >= kth
    probs = torch.softmax(z.masked_fill(~keep, float("-inf")), -1)
    if p.top_p < 1:
        order = torch.sort(probs, descending=True, stable=True).indices
        before = probs[order].cumsum(0) - probs[order]
        cut = torch.zeros_like(keep)
        cut[order] = before >= p.top_p
        probs = probs.masked_fill(cut, 0)
    return probs / probs.sum()


@pytest.mark.parametrize(
    "kw", [dict(), dict(temperature=0.6), dict(top_k=7), dict(top_p=0.8),
           dict(temperature=1.7, top_k=20, top_p=0.9)],
)  # fmt: skip
def test_choice_follows_the_truncated_distribution(kw):
    """u on a fine grid through the inverse CDF: each token is chosen a number of times
    equal to N x its reference probability (+-1), and never outside the kept set."""
    params = SamplingParams(**kw)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 37, generator=g) * 2
    n = 20000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    toks = choose_tokens(logits.expand(n, -1), params, u)
    counts = torch.bincount(toks, minlength=37).double()
    ref = _reference_probs(logits[0], params) * n
    assert (counts - ref).abs().max() <= 1.0 + 1e-6, (counts - ref).abs().max()
    assert (counts[ref == 0] == 0).all()


def test_greedy_and_top1_pick_the_argmax():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 50, generator=g)
    u = torch.rand(5, generator=g, dtype=torch.float64)
    best = logits.argmax(-1)
    assert torch.equal(choose_tokens(logits, SamplingParams(temperature=0), None), best)
    assert torch.equal(choose_tokens(logits, SamplingParams(top_k=1), u), best)


def test_logprobs_and_entropy_of_the_model_distribution():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 29, generator=g)
    toks = torch.tensor([0, 28, 5, 5])
    lp, ent = model_logprobs(logits, toks, True)
    ref = torch.log_softmax(logits.double(), -1)
    torch.testing.assert_close(lp.double(), ref[torch.arange(4), toks], atol=1e-6, rtol=0)
    torch.testing.assert_close(ent.double(), -(ref.exp() * ref).sum(-1), atol=1e-6, rtol=0)
    assert lp.dtype == torch.float32 and model_logprobs(logits, toks, False)[1] is None


@pytest.mark.parametrize("temp", [0.5, 0.7, 1.3])
def test_logprobs_and_entropy_of_the_tempered_distribution(temp):
    """At T > 0: log_softmax(logits / T), untruncated (the RL training forward's); greedy
    (T = 0): the model's own distribution."""
    g = torch.Generator().manual_seed(int(temp * 10))
    logits = torch.randn(5, 31, generator=g) * 3
    toks = torch.tensor([0, 30, 5, 5, 17])
    lp, ent = model_logprobs(logits, toks, True, temp)
    ref = torch.log_softmax(logits.double() / temp, -1)
    torch.testing.assert_close(lp.double(), ref[torch.arange(5), toks], atol=2e-6, rtol=0)
    torch.testing.assert_close(ent.double(), -(ref.exp() * ref).sum(-1), atol=2e-6, rtol=0)
    plain = torch.log_softmax(logits.double(), -1)[torch.arange(5), toks]
    assert (lp.double() - plain).abs().max() > 1e-2
    lp0, ent0 = model_logprobs(logits, toks, True, 0.0)
    torch.testing.assert_close(lp0.double(), plain, atol=2e-6, rtol=0)


def test_batch_plan_bounds_padding():
    g = torch.Generator().manual_seed(4)
    lengths = torch.randint(5, 300, (97,), generator=g).tolist()
    for max_batch, frac in ((8, 0.25), (32, 0.1), (1, 0.0), (100, 10.0)):
        batches = plan_batches(lengths, max_batch, frac)
        assert sorted(r for b in batches for r in b) == list(range(97))
        for b in batches:
            real = sum(lengths[r] for r in b)
            pad = max(lengths[r] for r in b) * len(b) - real
            assert len(b) <= max_batch and pad <= frac * real + 1e-9
    assert plan_batches([5, 5, 5], 8, 0.0) == [[0, 1, 2]]  # equal lengths: one batch


def _arch(**kw):
    base = dict(family="llama", vocab_size=100, hidden_size=8, intermediate_size=16,
                num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, rms_norm_eps=1e-6,
                rope_theta=1e4, rope_scaling=None, tie_word_embeddings=False, qkv_bias=False,
                max_position_embeddings=16)  # fmt: skip
    base.update(kw)
    return ModelArch(**base)


@pytest.mark.parametrize(
    "requests,params,match",
    [
        ([[1, 2], []], SamplingParams(), r"request 1: empty prompt"),
        ([list(range(16))], SamplingParams(), r"16 tokens leaves no room .* context of 16"),
        ([[1, 2]], SamplingParams(stop_token_ids=(3, 100)), r"unknown stop token id 100"),
        ([Request([1], index=7, stop_token_ids=[-1])], SamplingParams(),
         r"request 0 \(prompt 7\): unknown stop token id -1"),
        ([[1, 200]], SamplingParams(), r"token id 200 outside the vocabulary"),
        ([Request([1], max_new_tokens=0)], SamplingParams(), r"max_new_tokens=0"),
    ],
)  # fmt: skip
def test_bad_requests_are_named_before_any_work(requests, params, match):
    with pytest.raises(GenerationError, match=match):
        generate(None, None, _arch(), requests, params)


@pytest.mark.parametrize(
    "kw,match",
    [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
     (dict(max_new_tokens=0), "max_new_tokens"), (dict(n=0), "n=0")],
)  # fmt: skip
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)
