"""The rlvr stage (nova_engine.train.stages.rlvr) on gloo, one spawned group of 4 ranks:

- fixed rollouts (a seeded stand-in for generation + verification: ragged responses, empty
  ones, truncated ones, sampler log-probs): the per-step policy and value losses, rewards, KL
  and entropy of PPO (critic from a *ForSequenceClassification export, GAE, KL in the reward,
  truncated IS, 2 epochs x 2 mini-batches) and of GRPO (KL k3 in the loss, clip-higher,
  seq-mean-token-mean) are equal at TP1xDP4, TP2xDP2 and TP2xPP2, and equal to the
  single-process run stored in tests/engine/golden/rlvr.json (run_golden_rlvr.py);
- GRPO with generation on the policy's shards (TP2xDP2) on a toy task whose optimum is known
  (reward 10 for a response that starts with a letter, ~40% of the tiny vocabulary at
  first) climbs from ~40% to the optimum; its 3 prompts are fewer than a step's 6 (the stream
  wraps: each step holds every prompt twice) and one fills the model's context (its
  responses are empty: reward 0, kept in their group, so the optimum is 10 x 2/3);
- exact resume: a run resumed from a mid-run checkpoint repeats the uninterrupted run's
  rewards and losses bit for bit (the toy GRPO run with generation; PPO with its critic);
- rewards of truncated responses are RewardConfig.truncated_reward (Tülu 3's penalty);
- `python -m nova_engine.train rlvr --recipe recipes/tiny_cpu.yaml ...` runs (a subprocess,
  beside the group), and config errors name their key.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from nova_engine.parallel.spawn import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "rlvr.json")
WORLD = 4
LAYOUTS = [(1, 1), (2, 1), (2, 2)]  # (tp, pp) in a world of 4
STEPS = 3
P = 8  # prompts per step; the fixed runs have 6 prompts: every step wraps the stream
MBT = 128
MAX_NEW = 12
CONTEXT = 64
TRUNC_REWARD = -1.0
FIXED_SEED = 99
TOY_STEPS, TOY_K = 8, 4  # the toy run; its checkpoint after step TOY_K
TOY_NEW, TOY_LR, TOY_P = 1, 3e-2, 6
PPO_K = 2  # PPO (fixed) checkpoint after this step, at TP2xPP2
KEYS = ("policy_loss", "value_loss", "reward_mean", "kl", "entropy", "clip_frac", "pg_loss")


# ------------------------------------------------------------------------------ set-up


def build_assets(root: str) -> dict[str, str]:
    """Tokenizer, policy (context 64), a 1-output sequence classifier (the critic's init)."""
    from transformers import LlamaForSequenceClassification

    from nova_engine.data.rlvr import write_arithmetic_rlvr
    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.model.tiny import build_tiny_hf_model, tiny_hf_config

    tok = os.path.join(root, "tok")
    build_tiny_tokenizer(tok)
    dims = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT)  # fmt: skip
    model = os.path.join(root, "model")
    build_tiny_hf_model(model, "llama", seed=0, **dims)
    torch.manual_seed(1)
    rm = LlamaForSequenceClassification(
        tiny_hf_config("llama", num_labels=1, pad_token_id=5, **dims)
    )  # fmt: skip
    rm.save_pretrained(os.path.join(root, "rm"))
    data = write_arithmetic_rlvr(os.path.join(root, "arithmetic.jsonl"), 6)
    return {"tok": tok, "model": model, "rm": os.path.join(root, "rm"), "data": data}


def run_config(assets, algo: str, tp: int = 1, pp: int = 1, steps: int = STEPS, **kw):
    from nova_engine.config import DataConfig, OptimConfig, ParallelConfig, TrainConfig
    from nova_engine.train.stages import rlvr as R

    if algo == "ppo":
        roll = R.RolloutSection(samples_per_prompt=2, max_new_tokens=MAX_NEW,
                                truncated_reward=TRUNC_REWARD)  # fmt: skip
        loss = R.RLVRLossSection(advantage="gae", lam=0.95, ppo_epochs=2, num_mini_batches=2,
                                 kl_coef=0.05, kl_in="reward", kl_type="k1", tis=True,
                                 vf_coef=0.5, value_clip=0.2)  # fmt: skip
        critic = R.CriticSection(init_from=assets["rm"])
    elif algo == "grpo":
        roll = R.RolloutSection(samples_per_prompt=4, max_new_tokens=MAX_NEW,
                                truncated_reward=TRUNC_REWARD)  # fmt: skip
        loss = R.RLVRLossSection(advantage="grpo", num_mini_batches=2, kl_coef=0.02,
                                 kl_in="loss", clip_high=0.28, agg="seq-mean-token-mean")  # fmt: skip
        critic = R.CriticSection()
    else:  # the toy: generation on the policy
        opts = dict(samples_per_prompt=8, max_new_tokens=TOY_NEW, verifier_workers=0)
        roll = R.RolloutSection(**(opts | kw.pop("rollout", {})))
        loss = R.RLVRLossSection(advantage="grpo", kl_coef=0.0)
        critic = R.CriticSection()
    lr = TOY_LR if algo == "toy" else 1e-3
    return R.RLVRRunConfig(
        model=R.RLVRModelSection(hf_path=assets["model"], tokenizer_path=assets["tok"]),
        parallel=ParallelConfig(tp=tp, pp=pp, distributed_optimizer=False),
        data=DataConfig(max_length=40, seed=5),
        optim=OptimConfig(lr=lr, schedule="constant", grad_clip=1.0),
        train=TrainConfig(global_batch_size=kw.pop("prompts", P), micro_batch_tokens=MBT,
                          max_steps=steps, precision="fp32", seed=3),  # fmt: skip
        rollout=roll, loss=loss, critic=critic,
    )  # fmt: skip


def arithmetic_prompts(assets):
    from nova_engine.data.rlvr import load_rlvr_prompts

    return load_rlvr_prompts(assets["data"], assets["tok"], max_prompt_length=40)[0]


class FixedRollouts:
    """A seeded stand-in for generation + verification: responses of 0..MAX_NEW random
    tokens (some empty; some ending with the stop token, the rest truncated), random sampler
    log-probs, verified with probability 1/2; a pure function of (stream position, sample)."""

    def __init__(self, n: int, stop: int):
        self.n, self.stop = n, stop

    def __call__(self, step, prompts, params=None):
        from nova_engine.rl.rollouts import Generation
        from nova_engine.rl.verifiers import VerifierResult

        gens, results = [], []
        for k, _ in prompts:
            rng = np.random.default_rng([FIXED_SEED, k])
            g, r = [], []
            for _ in range(self.n):
                length = int(rng.integers(0, MAX_NEW + 1))
                toks = rng.integers(6, 512, size=length)
                done = length > 0 and rng.random() < 0.6
                if done:
                    toks[-1] = self.stop
                g.append(Generation(toks, -3 * rng.random(length), done))
                ok = rng.random() < 0.5
                r.append(VerifierResult(float(ok), "correct" if ok else "wrong"))
            gens.append(g)
            results.append(r)
        return gens, results, {}


def fixed_loop(assets, algo, ps, tp, pp):
    from nova_engine.train.stages import rlvr as R

    run = run_config(assets, algo, tp, pp)
    loop = R.build_loop(run, ps, arithmetic_prompts(assets), stops=[4])
    stage = R.build_stage(run, ps, FixedRollouts(run.rollout.samples_per_prompt, 4), pad_id=5)
    return loop, stage


def _rows(hist) -> list[list[float]]:
    return [[float(h.get(k, 0.0)) for k in KEYS] for h in hist]


def single_rank_run(assets) -> dict[str, list]:
    """The fixed-rollout runs in one process (world 1): the golden per-step values."""
    from nova_engine.parallel.state import destroy_parallel, initialize_parallel

    out = {}
    for algo in ("ppo", "grpo"):
        ps = initialize_parallel(seed=7)
        loop, stage = fixed_loop(assets, algo, ps, 1, 1)
        out[algo] = _rows(loop.fit(stage))
        destroy_parallel()
    return out


# ------------------------------------------------------------------------------ the group


def _toy(assets, root):
    """GRPO with generation at TP2xDP2 on the 'starts with a space' task; a checkpoint after
    TOY_K steps, then a resumed run from it."""
    from nova_engine.data.rlvr import RLVRPrompt
    from nova_engine.data.tokenize import ChatTokenizer
    from nova_engine.parallel.state import destroy_parallel, initialize_parallel
    from nova_engine.rl.producer import EngineRollouts
    from nova_engine.rl.verifiers import register_verifier, verify_one
    from nova_engine.train import checkpoint, checkpoint_io
    from nova_engine.train.stages import rlvr as R

    register_verifier("first_letter")(lambda response, gt: response[:1].isalpha())
    ct = ChatTokenizer(assets["tok"])
    msgs = [[{"role": "user", "content": q}] for q in ("Say something.", "Go on.")]
    prompts = [RLVRPrompt(np.asarray(ct.prompt_ids(m)), "x", "first_letter", i, "toy")
               for i, m in enumerate(msgs)]  # fmt: skip
    prompts.append(
        RLVRPrompt(np.full(CONTEXT, 7), "x", "first_letter", 2, "toy: fills the context")
    )
    run = run_config(assets, "toy", 2, 1, steps=TOY_STEPS, prompts=TOY_P)
    stops = tuple(ct.eos_token_ids)

    def build():
        ps = initialize_parallel(tp=2, seed=7)
        loop = R.build_loop(run, ps, prompts, stops)
        verify = lambda items: [verify_one(it) for it in items]  # noqa: E731
        prod = EngineRollouts(loop.engine("policy"), ct.tokenizer, R.sampling_params(run, stops),
                              verify)  # fmt: skip
        return loop, R.build_stage(run, ps, prod, pad_id=5)

    ckpt = os.path.join(root, "toy_ckpt")
    loop, stage = build()
    hist = loop.fit(stage, stop_after=TOY_K)
    checkpoint.save_checkpoint(ckpt, loop, hf=False)
    hist += loop.fit(stage)
    destroy_parallel()
    loop, stage = build()
    step = checkpoint.load_checkpoint(checkpoint_io.latest_complete(ckpt), loop)
    resumed = loop.fit(stage)
    destroy_parallel()
    return {"full": hist, "resumed": resumed, "step": step}


def _worker(rank, world, assets, root):
    from nova_engine.parallel.state import destroy_parallel, initialize_parallel
    from nova_engine.train import checkpoint, checkpoint_io

    out: dict = {"fixed": {}}
    for tp, pp in LAYOUTS:
        for algo in ("ppo", "grpo"):
            ps = initialize_parallel(tp=tp, pp=pp, seed=7)
            loop, stage = fixed_loop(assets, algo, ps, tp, pp)
            if (tp, pp, algo) != (2, 2, "ppo"):
                out["fixed"][(tp, pp, algo)] = loop.fit(stage)
                destroy_parallel()
                continue
            ckpt = os.path.join(root, "ppo_ckpt")
            hist = loop.fit(stage, stop_after=PPO_K)
            checkpoint.save_checkpoint(ckpt, loop, hf=True)
            out["fixed"][(tp, pp, algo)] = hist + loop.fit(stage)
            destroy_parallel()
            ps = initialize_parallel(tp=tp, pp=pp, seed=7)
            loop, stage = fixed_loop(assets, algo, ps, tp, pp)
            path = checkpoint_io.latest_complete(ckpt)
            checkpoint.load_checkpoint(path, loop)
            out["ppo_resumed"] = loop.fit(stage)
            out["ppo_files"] = sorted(os.listdir(path))
            destroy_parallel()
    out["toy"] = _toy(assets, root)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("train_rlvr"))
    assets = build_assets(root)
    cli = _start_cli(assets, root)
    out = run_distributed(_worker, WORLD, assets, root)
    return out, _finish_cli(cli), assets


# ------------------------------------------------------------------------------ entry point


def _start_cli(assets, root):
    from nova_engine.data.rlvr import write_arithmetic_rlvr

    data = write_arithmetic_rlvr(os.path.join(root, "cli.jsonl"), 6)
    out_dir = os.path.join(root, "cli_run")
    pg = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # a world of one
    env = {k: v for k, v in os.environ.items() if k not in pg} | {"NOVA_KERNELS": "torch"}
    cmd = [
        sys.executable,
        "-m",
        "nova_engine.train",
        "rlvr",
        "--recipe",
        "recipes/tiny_cpu.yaml",
        f"model.hf_path={assets['model']}",
        f"model.tokenizer_path={assets['tok']}",
        f"data.train_paths=[{data}]",
        f"train.out_dir={out_dir}",
        "train.max_steps=2",
        "train.global_batch_size=4",
        "rollout.samples_per_prompt=2",
        "train.log_every=1",
        "train.tensorboard=false",
        "rollout.max_new_tokens=4",
        f"data.eval_paths=[{data}]",
        "rollout.verifier_workers=1",
    ]  # fmt: skip  (a verifier pool of one worker process)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    return proc, out_dir


def _finish_cli(cli):
    proc, out_dir = cli
    text = proc.communicate(timeout=600)[0]
    return proc.returncode, text, out_dir


@pytest.mark.slow  # the spawned group (or the entry point subprocess)
def test_entry_point_runs(results):
    from nova_engine.train.metrics import read_metrics

    rc, text, out_dir = results[1]
    assert rc == 0, text
    recs_all = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    recs = [r for r in recs_all if "reward_mean" in r]
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        for key in ("reward_mean", "verified/arithmetic", "entropy", "kl", "time/generate",
                    "time/verify", "time/ref_value", "time/train", "gen_tokens_per_s"):  # fmt: skip
            assert key in r and math.isfinite(r[key]), (key, r)
        assert r["time/generate"] > 0 and r["gen_tokens_per_s"] > 0
    ev = [r for r in recs_all if "eval/verified" in r]
    assert len(ev) == 1 and 0 <= ev[0]["eval/verified/arithmetic"] <= 1  # greedy, held out
    assert os.path.isfile(os.path.join(out_dir, "hf", "config.json"))
    assert "[rlvr] step 2/2" in text


# ------------------------------------------------------------------------------ tests


def _fixed(results, tp, pp, algo):
    return torch.tensor(_rows(results[0][0]["fixed"][(tp, pp, algo)]), dtype=torch.float64)


@pytest.mark.slow  # the spawned group (or the entry point subprocess)
@pytest.mark.parametrize("algo", ["ppo", "grpo"])
@pytest.mark.parametrize("layout", LAYOUTS[1:], ids=str)
def test_fixed_rollouts_equal_across_layouts(results, layout, algo):
    ref = _fixed(results, 1, 1, algo)
    got = _fixed(results, *layout, algo)
    assert got.shape == (STEPS, len(KEYS))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # the spawned group (or the entry point subprocess)
@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_fixed_rollouts_equal_single_rank_golden(results, algo):
    with open(GOLDEN) as f:
        gold = json.load(f)
    assert gold["config"] == golden_config(), "regenerate with run_golden_rlvr.py --write"
    ref = torch.tensor(gold[algo], dtype=torch.float64)
    for tp, pp in LAYOUTS:
        torch.testing.assert_close(_fixed(results, tp, pp, algo), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # the spawned group (or the entry point subprocess)
def test_fixed_rollouts_are_trained_on(results):
    ppo = results[0][0]["fixed"][(1, 1, "ppo")]
    grpo = results[0][0]["fixed"][(1, 1, "grpo")]
    for h in ppo + grpo:
        assert h["policy_loss"] != 0 and h["grad_norm"] > 0 and h["entropy"] > 0
    assert all(h["value_loss"] > 0 and h["critic_grad_norm"] > 0 for h in ppo)
    # the policy left the reference (k1, PPO's estimator here, can be negative; k3 cannot)
    assert ppo[0]["kl"] == 0 and ppo[-1]["kl"] != 0 and grpo[-1]["kl"] > 0
    assert any(h["clip_frac"] > 0 for h in ppo)  # 2 epochs: the second one clips
    assert all(h["empty"] > 0 and 0 < h["truncated"] < 1 for h in ppo + grpo)


@pytest.mark.slow  # the spawned group (or the entry point subprocess)
def test_truncated_responses_get_the_penalty(results):
    """reward = 10 * verified, or TRUNC_REWARD for a response without a stop token."""
    hist = results[0][0]["fixed"][(1, 1, "grpo")]
    fixed = FixedRollouts(4, 4)
    for step, h in enumerate(hist):
        ks = [(step * P + j, None) for j in range(P)]
        gens, res, _ = fixed(step, ks)
        want = [TRUNC_REWARD if not g.finished else 10.0 * r.score
                for gs, rs in zip(gens, res) for g, r in zip(gs, rs)]  # fmt: skip
        assert math.isclose(h["reward_mean"], float(np.mean(want)), rel_tol=1e-6)
        assert TRUNC_REWARD in want


@pytest.mark.slow  # the spawned group (or the entry point subprocess)
def test_resume_repeats_ppo_with_critic(results):
    out = results[0][0]
    full = out["fixed"][(2, 2, "ppo")]
    assert len(out["ppo_resumed"]) == STEPS - PPO_K
    for a, b in zip(full[PPO_K:], out["ppo_resumed"]):
        for k in ("policy_loss", "value_loss", "grad_norm", "critic_grad_norm", "kl"):
            assert a[k] == b[k], (k, a[k], b[k])
    files = out["ppo_files"]
    assert sum(f.startswith("mp_policy_") for f in files) == 4  # TP2 x PP2 shards
    assert sum(f.startswith("mp_critic_") for f in files) == 4
    assert not any(f.startswith("mp_reference") for f in files)  # frozen: rebuilt
    assert "hf" in files and "hf_critic" in files


@pytest.mark.slow  # the spawned group (or the entry point subprocess)
def test_grpo_moves_the_toy_reward_up(results):
    toy = results[0][0]["toy"]["full"]
    rewards = [h["reward_mean"] for h in toy]
    optimum = 10.0 * 2 / 3  # every response verified; the context-filling prompt's are empty
    assert len(toy) == TOY_STEPS
    assert all(h["empty"] == 2 * 8 for h in toy)  # that prompt twice per step, 8 samples each
    assert rewards[0] < 0.7 * optimum and rewards[-1] >= 0.95 * optimum, rewards
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 2.0, rewards
    assert toy[-1]["entropy"] < toy[0]["entropy"] - 1.0  # the policy sharpened


@pytest.mark.slow  # the spawned group (or the entry point subprocess)
def test_toy_resume_repeats_rewards_and_losses(results):
    toy = results[0][0]["toy"]
    assert toy["step"] == TOY_K and len(toy["resumed"]) == TOY_STEPS - TOY_K
    for a, b in zip(toy["full"][TOY_K:], toy["resumed"]):
        for k in ("reward_mean", "policy_loss", "grad_norm", "entropy", "response_len"):
            assert a[k] == b[k], (k, a[k], b[k])


@pytest.mark.slow  # the spawned group (or the entry point subprocess)
def test_same_on_every_rank(results):
    out = results[0]
    keys = ("reward_mean", "policy_loss")
    for r in out[1:]:
        for key, hist in r["fixed"].items():
            assert [[h[k] for k in keys] for h in hist] == [
                [h[k] for k in keys] for h in out[0]["fixed"][key]
            ]


# ------------------------------------------------------------------------------ in-process


def golden_config() -> dict:
    return {"steps": STEPS, "prompts_per_step": P, "micro_batch_tokens": MBT, "max_new": MAX_NEW,
            "context": CONTEXT, "fixed_seed": FIXED_SEED, "keys": list(KEYS)}  # fmt: skip


def test_prompt_stream_wraps_and_resumes():
    from nova_engine.data.rlvr import RLVRPrompt
    from nova_engine.rl.producer import PromptSource

    prompts = [RLVRPrompt(np.arange(3) + i, "1", "arithmetic", i, "x") for i in range(5)]
    src = PromptSource(prompts, prompts_per_step=4, total_steps=10, seed=1)
    steps = [src.next_batch() for _ in range(5)]
    ks = [k for s in steps for k, _ in s.items]
    assert ks == list(range(20))
    ids = [p.index for s in steps for _, p in s.items]
    for e in range(4):  # every epoch (5 consecutive stream positions) is a permutation
        assert sorted(ids[5 * e : 5 * e + 5]) == list(range(5))
    again = PromptSource(prompts, prompts_per_step=4, total_steps=10, seed=1)
    again.load_state_dict(src.state_dict())
    assert again.position == 5
    assert [p.index for _, p in again.next_batch().items] == [
        p.index for _, p in src.step_prompts(5).items
    ]
    with pytest.raises(ValueError, match="no prompts"):
        PromptSource([], prompts_per_step=4, total_steps=1)


def test_config_errors_name_the_key(tmp_path):
    from nova_engine.config import ConfigError
    from nova_engine.recipe import load_recipe

    recipe = os.path.join(ROOT, "recipes", "tiny_cpu.yaml")
    cases = [
        (["loss.kl_in=reward"], "loss.kl_in"),  # grpo has no per-token rewards
        (["loss.advantage=gae"], "critic.init_from"),
        (["loss.advantage=ppo2"], "loss.advantage"),
        (["train.micro_batch_tokens=32"], "train.micro_batch_tokens"),
        (["loss.clip_low=1.5"], "loss.clip_low"),
        (["rollout.temperature=0"], "rollout.temperature"),
    ]
    for overrides, key in cases:
        with pytest.raises(ConfigError) as e:
            load_recipe(recipe, "rlvr", overrides)
        assert e.value.key == key, (overrides, e.value)


def test_padding_a_rollout_batch_keeps_its_sequences():
    from nova_engine.rl.minibatch import _pad_to
    from nova_engine.rl.rollouts import Generation, Rollouts

    ro = Rollouts.from_groups([[1, 2, 3], [4, 5]], [[Generation([7, 8], [-1.0, -2.0])],
                                                     [Generation([9], [-0.5], False)]])  # fmt: skip
    rb = ro.pack(64, pad_to_multiple=4)[0]
    padded = _pad_to(rb, 32, pad_id=0)
    b, p = rb.batch, padded.batch
    n = b.num_tokens
    assert p.num_tokens == 32 and p.num_samples == b.num_samples
    assert torch.equal(p.cu_seqlens[: b.num_samples + 1], b.cu_seqlens[: b.num_samples + 1])
    assert int(p.cu_seqlens[-1]) == 32 and p.max_seqlen >= 32 - int(b.cu_seqlens[b.num_samples])
    for name in ("tokens", "labels", "loss_mask", "seq_index", "position_ids"):
        assert torch.equal(getattr(p, name)[: int(b.cu_seqlens[b.num_samples])],
                           getattr(b, name)[: int(b.cu_seqlens[b.num_samples])]), name  # fmt: skip
    assert float(p.loss_mask[n:].sum()) == 0 and bool((p.seq_index[n:] == -1).all())
    assert torch.equal(padded.gen_logprobs[:n], rb.gen_logprobs)
    start = int(p.cu_seqlens[-2])
    assert torch.equal(p.position_ids[start:], torch.arange(32 - start))


def test_a_rank_dealt_only_empty_responses_gets_a_padding_batch():
    """All of a share's responses empty: one all-padding micro-batch, zero advantages for
    every estimator, zero loss counts (the rank still joins every collective)."""
    from types import SimpleNamespace

    from nova_engine.rl.losses import PolicyLoss, assign_advantages
    from nova_engine.rl.minibatch import pack_share
    from nova_engine.rl.producer import Response
    from nova_engine.rl.rollouts import Generation

    ps = SimpleNamespace(tp=2, pp=1, dp=1, device=torch.device("cpu"), dp_group=None,
                         is_last_stage=lambda: True)  # fmt: skip
    empty = Generation(np.zeros(0, np.int64), np.zeros(0, np.float32), False)
    rs = [Response(np.arange(5), empty, TRUNC_REWARD, 0.0, j, "arithmetic", 0.0, "no_answer")
          for j in range(3)]  # fmt: skip
    for pp, length in ((1, 16), (2, MBT)):
        ps.pp = pp
        (mb,) = pack_share(rs, ps, capacity=MBT, pad_id=5)
        assert mb.num_samples == 0 and mb.num_tokens == length and float(mb.loss_mask.sum()) == 0
        assert PolicyLoss.counts(None, [mb]) == {"tokens": 0.0, "seqs": 0.0}
    from nova_engine.losses.policy import PolicyLossConfig

    for est in ("grpo", "gae", "reinforce_pp", "reinforce_pp_baseline"):
        mb.data = {"values": torch.zeros(MBT), "old_logprobs": torch.zeros(MBT)}
        assign_advantages([mb], estimator=est, policy_cfg=PolicyLossConfig(), gamma=1.0, lam=0.95,
                          whiten=True, ps=ps)  # fmt: skip
        assert mb.data["advantages"].shape == (MBT,) and not mb.data["advantages"].any(), est
