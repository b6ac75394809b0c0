"""Partial rollouts (issue #27 item 4): a generation interrupted after any number of tokens and
continued from its prefix (Request.prefix) keeps the prefix and draws the rest with the same
randomness keys — under unchanged weights the uninterrupted generation (tokens equal, log-probs
to fp32 rounding), under new weights the prefix is kept and only the rest changes — at TP1
and TP2 (gloo); prefixes are validated before any work."""

from __future__ import annotations

import math
import types

import pytest
import torch

from nova_engine.parallel.spawn import run_distributed

N, NEW = 3, 10
PROMPTS = [[11, 12, 13, 14], [20, 21], [30, 31, 32, 33, 34, 35]]


def _params(**kw):
    from nova_engine.generate import SamplingParams

    base = dict(temperature=1.0, max_new_tokens=NEW, stop_token_ids=(2,), n=N, seed=5)
    return SamplingParams(**{**base, **kw})


def _worker(rank, world, model_dir):
    from nova_engine.generate import Request, generate
    from nova_engine.model.arch import load_arch
    from nova_engine.model.build import build_model
    from nova_engine.model.hf_io import load_hf_weights
    from nova_engine.parallel.state import destroy_parallel, initialize_parallel

    out = {}
    for tp in (1, 2):
        ps = initialize_parallel(tp=tp)
        arch = load_arch(model_dir)
        chunks = build_model(arch, ps)
        load_hf_weights(chunks, arch, ps, model_dir)
        full = generate(chunks, ps, arch, [Request(p, index=j) for j, p in enumerate(PROMPTS)],
                        _params())  # fmt: skip
        cuts = [
            [
                len(g.tokens) if i == 0 else (j + i) % max(len(g.tokens) - 1, 1)
                for i, g in enumerate(o)
            ]
            for j, o in enumerate(full)
        ]  # fmt: skip  (sample 0 complete: returned as is; the others cut after 0..L-2 tokens)
        reqs = [
            Request(p, index=j, prefix=[g.tokens[:c] for g, c in zip(full[j], cuts[j])],
                    prefix_logprobs=[g.logprobs[:c] for g, c in zip(full[j], cuts[j])])
            for j, p in enumerate(PROMPTS)
        ]  # fmt: skip
        cont = generate(chunks, ps, arch, reqs, _params(), max_batch_size=4)
        with torch.no_grad():  # new weights: the continuation changes after the prefix only
            for c in chunks:
                for p in c.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        moved = generate(chunks, ps, arch, reqs, _params())
        pack = lambda o: [[(g.tokens, g.logprobs, g.finish_reason) for g in s] for s in o]  # noqa: E731
        out[tp] = {"full": pack(full), "cont": pack(cont), "moved": pack(moved), "cuts": cuts}
        destroy_parallel()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from nova_engine.model.tiny import build_tiny_hf_model

    d = str(tmp_path_factory.mktemp("partial") / "llama")
    build_tiny_hf_model(d, "llama", seed=3)
    return run_distributed(_worker, 2, d)


@pytest.mark.slow  # a spawned process group
@pytest.mark.parametrize("tp", [1, 2])
def test_continuation_under_the_same_weights_is_the_uninterrupted_generation(results, tp):
    r = results[0][tp]
    assert any(c > 0 for cs in r["cuts"] for c in cs)
    finished = [c == len(f[0]) for fs, cs in zip(r["full"], r["cuts"]) for f, c in zip(fs, cs)]
    assert any(finished) and not all(finished)  # some samples were continued, some complete
    for full_s, cont_s in zip(r["full"], r["cont"]):
        for (ft, flp, fr), (ct, clp, cr) in zip(full_s, cont_s):
            assert ct == ft and cr == fr
            assert all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5) for a, b in zip(clp, flp))


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_new_weights_keep_the_prefix_and_change_the_rest(results, tp):
    r = results[0][tp]
    changed = 0
    for full_s, moved_s, cuts in zip(r["full"], r["moved"], r["cuts"]):
        for (ft, flp, _), (mt, mlp, _), c in zip(full_s, moved_s, cuts):
            assert mt[:c] == ft[:c] and mlp[:c] == flp[:c]  # the prefix and its sampled log-probs
            changed += mt[c:] != ft[c:] or any(abs(a - b) > 1e-3 for a, b in zip(mlp[c:], flp[c:]))
    assert changed >= len(PROMPTS) * N // 2


def test_bad_prefixes_are_named_before_any_work():
    from nova_engine.generate import GenerationError, Request
    from nova_engine.generate.decode import _validate

    arch = types.SimpleNamespace(vocab_size=100, max_position_embeddings=32)  # what it reads
    p = _params(max_new_tokens=4)
    for prefix, match in (([[1]] * 2, "2 prefixes for n=3"),
                          ([[1], [2, 1], [3]], "a stop token inside the prefix"),
                          ([[1], [5, 5, 5, 5, 5], [3]], "longer than the limit of 4"),
                          ([[1], [500], [3]], "outside the vocabulary")):  # fmt: skip
        with pytest.raises(GenerationError, match=match):
            _validate([Request([4, 5], index=7, prefix=prefix)], p, arch)
    with pytest.raises(GenerationError, match="1 log-probs for 2 tokens"):
        _validate([Request([4, 5], prefix=[[1, 3], [], []], prefix_logprobs=[[0.0], [], []])],
                  p, arch)  # fmt: skip
    (spec,) = _validate([Request([4, 5], prefix=[[1, 3], [], [6]])], p, arch)
    assert spec[4][0][0] == [1, 3] and all(math.isnan(x) for x in spec[4][0][1])
    # finished prefixes (a stop token at the end, or the whole budget) are accepted
    _validate([Request([4, 5], prefix=[[1, 2], [5, 5, 5, 5], []])], p, arch)
