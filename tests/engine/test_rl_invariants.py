"""RL invariants at every layout, one spawned group of 2 gloo ranks (TP1xDP2, TP2, PP2):

- the methods of issue #26 through the RLVR stage on seeded fixed rollouts: GSPO, CISPO and
  the DAPO set (dynamic sampling with refill + overlong shaping + clip-higher, token mean):
  per-step losses, rewards and dynamic-sampling counts equal the single-process run's;
- the sampler / trainer invariants of colocated generation (EngineRollouts on the policy's
  own shards, fp32) at step 0: `train_rollout_logprob_abs_diff` (mean |gen - old|),
  `token_mult_prob_error` - 1 (NeMo-RL: mean exp|gen - old|) and `ppo_kl_first_update`
  (approx KL at the first update, where old == current) are at fp32 rounding.

The bound. The peers' 1e-8 absolute cannot hold in fp32: a log-prob of magnitude ~6 (a
vocabulary of 512) is represented to ulp(6) = 2^-21 = 4.8e-7, and the sampler (KV-cache
decode) and the training forward (packed prefill) add in other orders, so equal math differs
by a few ulps of |logp|. Log-probs of the sampled tokens of this model are > -16, so the
bound is BOUND = 4 ulp(8) = 4 * 2^-20 = 3.8e-6 on the means (a mean of per-token errors each
a few ulps of |logp| < 16). The tests can fail: a producer whose sampler log-probs are off by
1e-4 (one run) reports ~1e-4 in both metrics.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from nova_engine.parallel.spawn import run_distributed

LAYOUTS = [(1, 1), (2, 1), (1, 2)]  # (tp, pp) in a world of 2
METHODS = ("gspo", "cispo", "dapo")
STEPS, P, MAX_NEW, MBT, CONTEXT = 2, 4, 8, 96, 64
BOUND = 4 * 2.0**-20
_PG_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
KEYS = ("policy_loss", "pg_loss", "kl_loss", "reward_mean", "entropy", "clip_frac",
        "approx_kl", "dynamic_sampling/rounds", "dynamic_sampling/groups_kept")  # fmt: skip


def _assets(root: str) -> dict:
    from nova_engine.data.rlvr import write_arithmetic_rlvr
    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.model.tiny import build_tiny_hf_model

    tok = os.path.join(root, "tok")
    build_tiny_tokenizer(tok)
    model = os.path.join(root, "model")
    build_tiny_hf_model(model, "llama", seed=0, vocab_size=512, hidden_size=64,
                        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=CONTEXT)  # fmt: skip
    data = write_arithmetic_rlvr(os.path.join(root, "arith.jsonl"), 10)
    return {"tok": tok, "model": model, "data": data}


def _config(assets, method: str, tp: int, pp: int):
    from nova_engine.config import DataConfig, OptimConfig, ParallelConfig, TrainConfig
    from nova_engine.train.stages import rlvr as R

    roll = R.RolloutSection(samples_per_prompt=2 if method == "dapo" else 3,
                            max_new_tokens=MAX_NEW, verifier_workers=0)  # fmt: skip
    loss = R.RLVRLossSection(advantage="grpo", num_mini_batches=2, kl_coef=0.02)
    if method == "gspo":
        loss = dataclasses.replace(loss, policy_loss="gspo", agg="seq-mean-token-mean",
                                   clip_low=0.01, clip_high=0.015)  # fmt: skip
    elif method == "cispo":
        loss = dataclasses.replace(loss, policy_loss="cispo", clip_low=0.9, clip_high=0.3)
    elif method == "dapo":
        roll = dataclasses.replace(roll, dynamic_sampling=True, max_sampling_rounds=3,
                                   overlong_buffer=4, overlong_penalty=1.0)  # fmt: skip
        loss = dataclasses.replace(loss, clip_high=0.28, kl_coef=0.0)
    return R.RLVRRunConfig(
        model=R.RLVRModelSection(hf_path=assets["model"], tokenizer_path=assets["tok"]),
        parallel=ParallelConfig(tp=tp, pp=pp, distributed_optimizer=False),
        data=DataConfig(max_length=40, seed=5),
        optim=OptimConfig(lr=1e-3, schedule="constant", grad_clip=1.0),
        train=TrainConfig(global_batch_size=P, micro_batch_tokens=MBT, max_steps=STEPS,
                          precision="fp32", seed=3),  # fmt: skip
        rollout=roll, loss=loss,
    )  # fmt: skip


class FixedRollouts:
    """Seeded stand-in for generation + verification, a pure function of (key, sample):
    responses of 1..MAX_NEW tokens (some truncated), verified with probability 1/2."""

    def __init__(self, n: int, stop: int):
        self.n, self.stop = n, stop

    def __call__(self, step, prompts, params=None):
        from nova_engine.rl.rollouts import Generation
        from nova_engine.rl.verifiers import VerifierResult

        gens, results = [], []
        for k, _ in prompts:
            rng = np.random.default_rng([17, k])
            length = rng.integers(1, MAX_NEW + 1, size=self.n)
            g = []
            for n in length:
                toks = rng.integers(6, 512, size=int(n))
                done = bool(rng.random() < 0.6)
                if done:
                    toks[-1] = self.stop
                g.append(Generation(toks, -3 * rng.random(int(n)), done))
            ok = rng.random(self.n) < 0.5
            gens.append(g)
            results.append([VerifierResult(float(x), "correct" if x else "wrong") for x in ok])
        return gens, results, {}


def _prompts(assets):
    from nova_engine.rl.prompts import load_rlvr_prompts

    return load_rlvr_prompts(assets["data"], assets["tok"], max_prompt_length=40)[0]


def _fixed(assets, method, tp, pp):
    from nova_engine.parallel.state import destroy_parallel, initialize_parallel
    from nova_engine.train.stages import rlvr as R

    ps = initialize_parallel(tp=tp, pp=pp, seed=7)
    run = _config(assets, method, tp, pp)
    loop = R.build_loop(run, ps, _prompts(assets), stops=[4])
    stage = R.build_stage(run, ps, FixedRollouts(run.rollout.samples_per_prompt, 4), pad_id=5)
    hist = loop.fit(stage)
    destroy_parallel()
    return [{k: float(h[k]) for k in KEYS if k in h} for h in hist]


def _generated(assets, tp, pp, noise: float = 0.0):
    """Step 0 of GRPO with colocated generation: the invariant metrics."""
    from nova_engine.data.tokenize import ChatTokenizer
    from nova_engine.parallel.state import destroy_parallel, initialize_parallel
    from nova_engine.rl.producer import EngineRollouts
    from nova_engine.rl.verifiers import verify_one
    from nova_engine.train.stages import rlvr as R

    ps = initialize_parallel(tp=tp, pp=pp, seed=7)
    run = _config(assets, "grpo", tp, pp)
    ct = ChatTokenizer(assets["tok"])
    stops = tuple(ct.eos_token_ids)
    loop = R.build_loop(run, ps, _prompts(assets), stops)
    prod = EngineRollouts(loop.engine("policy"), ct.tokenizer, R.sampling_params(run, stops),
                          lambda items: [verify_one(it) for it in items])  # fmt: skip

    def producer(step, mine, params=None):
        gens, res, times = prod(step, mine, params)
        for group in gens:
            for g in group:
                g.logprobs = np.asarray(g.logprobs) + noise
        return gens, res, times

    stage = R.build_stage(run, ps, producer, pad_id=5)
    (h,) = loop.fit(stage, stop_after=1)
    destroy_parallel()
    keys = ("train_rollout_logprob_abs_diff", "token_mult_prob_error", "ppo_kl_first_update",
            "response_len")  # fmt: skip
    return {k: float(h[k]) for k in keys}


def _worker(rank, world, assets):
    out = {}
    for tp, pp in LAYOUTS:
        for m in METHODS:
            out[(tp, pp, m)] = _fixed(assets, m, tp, pp)
        out[(tp, pp, "gen")] = _generated(assets, tp, pp)
    out["noisy"] = _generated(assets, 1, 1, noise=1e-4)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    assets = _assets(str(tmp_path_factory.mktemp("rl_invariants")))
    group = run_distributed(_worker, 2, assets)
    from nova_engine.train.runner import ensure_process_group_env

    saved = {k: os.environ.get(k) for k in _PG_ENV}
    ensure_process_group_env()  # world 1, in this process (the autouse fixture is per test)
    try:
        single = {m: _fixed(assets, m, 1, 1) for m in METHODS}
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return group, single


@pytest.mark.slow  # spawned process group
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_method_losses_equal_the_single_rank_run(runs, method, layout):
    group, single = runs
    want = single[method]
    assert len(want) == STEPS
    for rank, res in enumerate(group):
        got = res[(*layout, method)]
        for step, (g, w) in enumerate(zip(got, want)):
            assert g.keys() == w.keys(), (g.keys(), w.keys())
            for k in w:
                tag = f"{method} tp,pp={layout} rank {rank} step {step} {k}"
                assert abs(g[k] - w[k]) <= 2e-5 * max(1.0, abs(w[k])), f"{tag}: {g[k]} vs {w[k]}"
    assert any(abs(s["policy_loss"]) > 1e-4 for s in want)  # it trains on something
    if method == "dapo":  # the refill ran and found what it needed
        assert any(s["dynamic_sampling/rounds"] > 1 for s in want), want
        assert all(s["dynamic_sampling/groups_kept"] == P for s in want), want


@pytest.mark.slow  # spawned process group
@pytest.mark.parametrize("layout", LAYOUTS)
def test_step0_sampler_trainer_invariants_at_fp32_rounding(runs, layout):
    group, _ = runs
    for rank, res in enumerate(group):
        r = res[(*layout, "gen")]
        tag = f"tp,pp={layout} rank {rank}: {r}"
        assert r["response_len"] >= 1, tag
        assert r["train_rollout_logprob_abs_diff"] <= BOUND, tag
        assert abs(r["token_mult_prob_error"] - 1.0) <= BOUND, tag
        assert abs(r["ppo_kl_first_update"]) <= BOUND, tag


@pytest.mark.slow  # spawned process group
def test_the_invariants_see_a_perturbed_sampler(runs):
    group, _ = runs
    for res in group:
        r = res["noisy"]
        assert abs(r["train_rollout_logprob_abs_diff"] - 1e-4) <= 1e-5, r
        assert abs(r["token_mult_prob_error"] - 1.0 - 1e-4) <= 1e-5, r
        assert abs(r["ppo_kl_first_update"]) <= BOUND, r  # old == current regardless
