"""Rollouts -> packed batches: every packed token checked against the prompt + response it
came from (loss mask on the response only, labels, the sampler's log-probs label-aligned),
empty generations left out of the batch but not of their group, truncated generations kept
with their flag; per-response values broadcast onto tokens, PPO token rewards (reward at the
last response token, KL per token) and GAE on the packed layout against plain loops; group
advantages and whitening reduced over a spawned 2-rank gloo group equal to one process.
(nova_kernels is imported inside the tests: the spawned ranks do not need triton.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nova_engine.data.packing import IGNORE_INDEX
from nova_engine.parallel.spawn import run_distributed
from nova_engine.rl.rollouts import Generation, Rollouts, gae_packed_advantages, ppo_token_rewards
from nova_engine.rl.stats import group_advantages_dp, whiten_dp
from nova_engine.rl.verifiers import RewardConfig, VerifyItem, shape_rewards, verify_one

EOS = 4


def make_rollouts(seed=0, n=3, group_offset=0):
    """3 prompts x n responses; response (0, 1) is empty, (1, 2) hit the length limit."""
    g = np.random.default_rng(seed)
    prompts = [g.integers(10, 100, size=k) for k in (5, 9, 3)]
    groups = []
    for p in range(3):
        gens = []
        for i in range(n):
            L = 0 if (p, i) == (0, 1) else int(g.integers(1, 8))
            toks = g.integers(10, 100, size=L)
            finished = (p, i) != (1, 2)
            if finished and L:
                toks[-1] = EOS
            gens.append(Generation(toks, -g.random(L).astype(np.float32), finished))
        groups.append(gens)
    return prompts, groups, Rollouts.from_groups(prompts, groups, group_offset=group_offset)


def test_packed_tokens_masks_and_logprobs():
    prompts, groups, ro = make_rollouts()
    assert ro.num_responses == 9 and ro.empty.tolist().count(True) == 1
    assert ro.finished.tolist() == [True] * 5 + [False] + [True] * 3
    assert ro.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    mbs = ro.pack(capacity=24, pad_to_multiple=4)
    assert len(mbs) > 1  # the capacity forces several micro-batches
    seen = []
    for mb in mbs:
        b = mb.batch
        assert b.num_tokens % 4 == 0 and b.num_tokens <= 24
        expect_mask = np.zeros(b.num_tokens, np.float32)
        expect_lp = np.zeros(b.num_tokens, np.float32)
        for k, r in enumerate(mb.rows.tolist()):
            p, gen = ro.prompt_of[r], ro.generations[r]
            prompt = prompts[p]
            start, end = int(b.cu_seqlens[k]), int(b.cu_seqlens[k + 1])
            assert b.tokens[start:end].tolist() == prompt.tolist() + gen.tokens.tolist()
            assert b.position_ids[start:end].tolist() == list(range(end - start))
            first = start + len(prompt) - 1  # predicts the first generated token
            resp = slice(first, first + len(gen))
            assert b.labels[resp].tolist() == gen.tokens.tolist()
            expect_mask[resp] = 1
            expect_lp[resp] = gen.logprobs
            assert int(mb.last_positions()[k]) == first + len(gen) - 1
            seen.append(r)
        np.testing.assert_array_equal(b.loss_mask.numpy(), expect_mask)
        np.testing.assert_array_equal(mb.gen_logprobs.numpy(), expect_lp)
        assert torch.all(b.labels[b.loss_mask == 0] == IGNORE_INDEX)
    assert sorted(seen) == [0, 2, 3, 4, 5, 6, 7, 8]  # every non-empty response once


def test_rewards_advantages_and_ppo_layout():
    import nova_kernels as nk

    prompts, groups, ro = make_rollouts(seed=1)
    # verify (the arithmetic task's exact-number check), shape rewards as Tülu 3
    answers = ["7", "", "8", "7", "7", "7", "1", "2", "2"]
    results = [verify_one(VerifyItem("arithmetic", a, "7")) for a in answers]
    rewards = shape_rewards(results, ro.finished.tolist(), RewardConfig(truncated_reward=-1.0))
    assert rewards == [10.0, 0.0, 0.0, 10.0, 10.0, -1.0, 0.0, 0.0, 0.0]
    ro.set_rewards(rewards)
    adv, degenerate = group_advantages_dp(ro.rewards_t(), ro.group_ids_t(), 3)
    ref, ref_deg = nk.group_advantages(
        ro.rewards_t(), ro.group_ids_t(), num_groups=3, backend="torch"
    )
    torch.testing.assert_close(adv, ref, rtol=1e-6, atol=1e-6)
    assert degenerate.tolist() == ref_deg.tolist() == [False, False, True]
    # the empty response counted in group 0's mean: (10 + 0 + 0) / 3
    assert math.isclose(
        float(adv[0]) * (float(np.std([10, 0, 0], ddof=1)) + 1e-6), 10 - 10 / 3, rel_tol=1e-5
    )

    kl_coef = 0.05
    mbs = ro.pack(capacity=64)
    for mb in mbs:
        b = mb.batch
        tok_adv = mb.per_token(adv)
        kl = torch.rand(b.num_tokens) * b.loss_mask
        r_tok = ppo_token_rewards(mb, ro.rewards_t(), kl, kl_coef)
        values = torch.randn(b.num_tokens)
        gae_adv, gae_ret = gae_packed_advantages(mb, r_tok, values, 0.9, 0.8, backend="torch")
        if mb is mbs[0]:  # the Triton scan (interpreted on CPU) gives the same
            tri = gae_packed_advantages(mb, r_tok, values, 0.9, 0.8, backend="triton")
            torch.testing.assert_close(tri, (gae_adv, gae_ret), rtol=1e-5, atol=1e-5)
        for k, r in enumerate(mb.rows.tolist()):
            end = int(b.cu_seqlens[k + 1])
            L = len(ro.generations[r])
            resp = list(range(end - 1 - L, end - 1))  # a response ends its sequence
            assert torch.all(tok_adv[resp] == adv[r])
            want = [-kl_coef * float(kl[j]) for j in resp]
            want[-1] += rewards[r]
            torch.testing.assert_close(r_tok[resp], torch.tensor(want))
            # plain GAE over the response (V after the last token = 0)
            run, nxt = 0.0, 0.0
            expect = []
            for j in reversed(resp):
                run = float(r_tok[j]) + 0.9 * nxt - float(values[j]) + 0.9 * 0.8 * run
                nxt = float(values[j])
                expect.append(run)
            torch.testing.assert_close(
                gae_adv[resp], torch.tensor(expect[::-1]), rtol=1e-5, atol=1e-5
            )
            torch.testing.assert_close(gae_ret[resp], gae_adv[resp] + values[resp])
        off = b.loss_mask == 0
        for t in (tok_adv, r_tok, gae_adv, gae_ret):
            assert torch.all(t[off] == 0)


def test_rollout_errors():
    with pytest.raises(ValueError, match="2 log-probs for 3 tokens"):
        Generation([1, 2, 3], [0.0, 0.0])
    prompts, groups, ro = make_rollouts()
    with pytest.raises(ValueError, match="exceeds the packing capacity 8"):
        ro.pack(capacity=8)
    with pytest.raises(ValueError, match="3 rewards for 9 responses"):
        ro.set_rewards([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="one value per generation"):
        Rollouts.from_groups(prompts, groups, [[1.0]] * 3)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        Rollouts.from_groups([[]], [[Generation([5])]])
    with pytest.raises(ValueError, match="estimator"):
        group_advantages_dp(ro.rewards_t(), ro.group_ids_t(), 3, estimator="ppo")
    # no generation logprobs -> no gen_logprobs tensor, the batch is still packed
    bare = Rollouts.from_groups([[1, 2]], [[Generation([3, EOS]), Generation([])]])
    (mb,) = bare.pack(capacity=16)
    assert mb.gen_logprobs is None and mb.rows.tolist() == [0]
    assert Rollouts.from_groups([[1, 2]], [[Generation([])]]).pack(capacity=16) == []


# ------------------------------------------------------------------- DP reductions (gloo)

S, G = 23, 6  # group 5 gets no samples, group 4 a single one
ESTIMATORS = ("grpo", "dr_grpo", "rloo")


def _global_data():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4, (S,), generator=g)
    ids[7] = 4
    scores = torch.randint(0, 3, (S,), generator=g).float() * 5 + torch.rand(S, generator=g)
    scores[ids == 3] = 2.5  # a degenerate group spread over both ranks
    values = torch.randn(S, 5, generator=g)
    mask = torch.rand(S, 5, generator=g) > 0.3
    return scores, ids, values, mask


def _dp_worker(rank, world):
    import torch.distributed as dist

    scores, ids, values, mask = _global_data()
    lo, hi = (0, 10) if rank == 0 else (10, S)  # unequal shards; groups split across ranks
    out = {}
    for est in ESTIMATORS:
        out[est] = group_advantages_dp(
            scores[lo:hi], ids[lo:hi], G, estimator=est, group=dist.group.WORLD
        )
    out["whiten"] = whiten_dp(values[lo:hi], mask[lo:hi], group=dist.group.WORLD)
    out["whiten_keep_mean"] = whiten_dp(
        values[lo:hi], mask[lo:hi], shift_mean=False, group=dist.group.WORLD
    )
    return out


@pytest.fixture(scope="module")
def dp_results():
    return run_distributed(_dp_worker, 2)


@pytest.mark.slow  # spawned process group
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_group_advantages_over_dp_equal_one_process(dp_results, estimator):
    import nova_kernels as nk

    scores, ids, _, _ = _global_data()
    ref, ref_deg = nk.group_advantages(
        scores, ids, estimator=estimator, num_groups=G, backend="torch"
    )
    local, local_deg = group_advantages_dp(scores, ids, G, estimator=estimator)
    got = torch.cat([dp_results[0][estimator][0], dp_results[1][estimator][0]])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(local, ref, rtol=1e-5, atol=1e-5)
    for r in range(2):
        assert dp_results[r][estimator][1].tolist() == ref_deg.tolist()
    assert ref_deg.tolist() == [False, False, False, True, True, True]
    # a shard alone gives different statistics: the reduction matters
    alone, _ = group_advantages_dp(scores[:10], ids[:10], G, estimator=estimator)
    assert not torch.allclose(alone, ref[:10])


@pytest.mark.slow  # spawned process group
def test_whitening_over_dp(dp_results):
    import nova_kernels as nk

    scores, ids, values, mask = _global_data()
    for key, shift in (("whiten", True), ("whiten_keep_mean", False)):
        ref = nk.whiten(values, mask, shift_mean=shift, backend="torch")
        got = torch.cat([dp_results[0][key], dp_results[1][key]])
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(whiten_dp(values, mask, shift_mean=shift), ref)
