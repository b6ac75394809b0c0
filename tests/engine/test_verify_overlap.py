"""The rollout producer verifies off the critical path (nova_engine.rl.producer.EngineRollouts):
while a generation chunk runs, the previous chunk is verified in the background; results are
those of generating everything first and verifying after, in the same order, and the exposed
verification time is about one chunk's, not the step's."""

from __future__ import annotations

import threading
import time
import types

import numpy as np

from nova_engine.data.rlvr import RLVRPrompt
from nova_engine.generate import SamplingParams
from nova_engine.rl.producer import OPEN_RESULT, EngineRollouts
from nova_engine.rl.verifiers import VerifierResult

GEN_S, VERIFY_S = 0.15, 0.01  # per chunk / per item


class FakeEngine:
    """generate(): deterministic per (prompt index, sample) tokens, GEN_S per call; records
    which thread runs it and how many requests each call gets."""

    def __init__(self):
        self.arch = types.SimpleNamespace(max_position_embeddings=64)
        self.ps = types.SimpleNamespace(world_size=1)
        self.calls: list[int] = []

    def generate(self, requests, params, max_batch_size):
        assert threading.current_thread() is threading.main_thread()
        self.calls.append(len(requests))
        time.sleep(GEN_S)
        out = []
        for r in requests:
            rng = np.random.default_rng(r.index)
            group = []
            for _ in range(params.n):
                toks = rng.integers(5, 9, rng.integers(1, 4)).tolist() + [2]
                group.append(types.SimpleNamespace(tokens=toks, logprobs=[-0.5] * len(toks),
                                                   finish_reason="stop"))  # fmt: skip
            out.append(group)
        return out


class Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def _verify(items):
    time.sleep(VERIFY_S * len(items))
    return [VerifierResult(float(len(it.response) % 3 == 0), "correct") for it in items]


def _prompts(n):
    truths = [None if k % 5 == 4 else str(k) for k in range(n)]  # every 5th is open-ended
    return [(k, RLVRPrompt(np.array([1, 3, 4]), t, "arith", k, "t")) for k, t in enumerate(truths)]


def test_results_equal_generate_then_verify_and_verification_overlaps():
    params = SamplingParams(temperature=1.0, max_new_tokens=4, stop_token_ids=(2,), n=4, seed=0)
    prompts = _prompts(20)
    eng = FakeEngine()
    prod = EngineRollouts(eng, Tok(), params, _verify, max_batch_size=16)  # 4 prompts a chunk
    t0 = time.perf_counter()
    gens, results, times = prod(0, prompts)
    wall = time.perf_counter() - t0
    assert eng.calls == [4] * 5  # five chunks of 4 prompts (16 sequences each)

    # the reference: everything generated first (one call), then verified in item order
    one = EngineRollouts(FakeEngine(), Tok(), params, _verify, max_batch_size=10_000)
    ref_gens, ref_results, _ = one(0, prompts)
    assert [[g.tokens.tolist() for g in gs] for gs in gens] == [
        [g.tokens.tolist() for g in gs] for gs in ref_gens
    ]
    assert results == ref_results
    assert all(r == [OPEN_RESULT] * 4 for k, r in enumerate(results) if k % 5 == 4)

    verify_total = VERIFY_S * 16 * 4  # 64 verified items (16 open-ended)
    assert times["verify_total"] >= verify_total * 0.9
    assert times["verify"] < 0.5 * times["verify_total"]  # only the last chunk is exposed
    assert wall < 5 * GEN_S + verify_total - 0.2  # sequential would be 0.75 + 0.64 s
