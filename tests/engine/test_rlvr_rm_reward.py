"""RLVR rewards from a reward model (nova_engine.rl.reward_model), one spawned group of
2 gloo ranks (TP1xDP2, TP2) plus the entry point:

- a tiny 2-output LlamaForSequenceClassification (random decoder, random head; `output`
  picks its second row) scores the step's responses (seeded fixed rollouts, decoded, over 4
  arithmetic prompts and 2 open-ended ones without ground_truth): with `verifier_weight: 0`
  the rewards equal the scores plain transformers' AutoModelForSequenceClassification gives
  on the same texts rendered with the chat template (fp32 rounding); the weighted mix equals
  w_v * (the verifier-only run's reward) + w_rm * (that score); open-ended prompts get the RM
  part alone; `normalize` standardizes the step's scores; all at every layout;
- a training step with rewards from the RM and the mix (metrics reward/verifier_mean,
  reward/rm_mean, reward/total_mean equal at both layouts), one with real generation
  (EngineRollouts: open prompts are not sent to the verifier);
- the RM engine's forward passes run under forbid_host_sync at TP1 (no host read per
  micro-batch; at TP2 megatron's VocabParallelEmbedding itself reads a boolean mask, as in
  every engine's forward), and it is frozen (no parameter requires grad, no optimizer);
- errors through `python -m nova_engine.train rlvr`: reward_model.path naming a causal LM
  (preflight, one line, exit 2) and an open-ended data line without a reward model
  (file:line, exit 2); config values naming their key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from nova_engine.parallel.spawn import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYOUTS = [1, 2]  # tp in a world of 2 (tp 1: DP2)
P, N, MAX_NEW, MBT, CONTEXT = 6, 2, 10, 128, 96
W_V, W_RM = 0.5, 3.0
_PG_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
OPEN = [
    {"messages": [{"role": "user", "content": "Write a haiku about rain."}]},
    {"messages": [{"role": "user", "content": "Tell me a joke."}], "dataset": "chat", "id": 7},
]


def _assets(root: str) -> dict:
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
    torch.manual_seed(3)
    cfg = tiny_hf_config("llama", num_labels=2, pad_token_id=5, **dims)
    cfg.id2label, cfg.label2id = (
        {0: "helpfulness", 1: "correctness"},
        {"helpfulness": 0, "correctness": 1},
    )
    rm = LlamaForSequenceClassification(cfg)
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0)  # scores of order 1, distinct rows
    rm.save_pretrained(os.path.join(root, "rm"))
    data = write_arithmetic_rlvr(os.path.join(root, "arith.jsonl"), 4)
    with open(data, "a") as f:
        for row in OPEN:
            f.write(json.dumps(row) + "\n")
    return {"tok": tok, "model": model, "rm": os.path.join(root, "rm"), "data": data}


def _config(assets, tp: int, **rm):
    from nova_engine.config import DataConfig, OptimConfig, ParallelConfig, TrainConfig
    from nova_engine.rl.reward_model import RewardModelSection
    from nova_engine.train.stages import rlvr as R

    return R.RLVRRunConfig(
        model=R.RLVRModelSection(hf_path=assets["model"], tokenizer_path=assets["tok"]),
        parallel=ParallelConfig(tp=tp, distributed_optimizer=False),
        data=DataConfig(max_length=40, seed=5),
        optim=OptimConfig(lr=1e-3, schedule="constant", grad_clip=1.0),
        train=TrainConfig(global_batch_size=P, micro_batch_tokens=MBT, max_steps=2,
                          precision="fp32", seed=3),  # fmt: skip
        rollout=R.RolloutSection(samples_per_prompt=N, max_new_tokens=MAX_NEW, verifier_workers=0),
        loss=R.RLVRLossSection(advantage="grpo", kl_coef=0.0),
        reward_model=RewardModelSection(**rm),
    )  # fmt: skip


class FixedRollouts:
    """Seeded responses (1..MAX_NEW tokens of the text vocabulary, some ending with the stop
    token 4), verified with probability 1/2; open-ended prompts get OPEN_RESULT."""

    def __init__(self, tok):
        self.tok = tok

    def text(self, g) -> str:
        toks = g.tokens[:-1] if g.finished else g.tokens
        return self.tok.decode([int(t) for t in toks], skip_special_tokens=True)

    def __call__(self, step, prompts, params=None):
        from nova_engine.rl.producer import OPEN_RESULT
        from nova_engine.rl.rollouts import Generation
        from nova_engine.rl.verifiers import VerifierResult

        gens, results = [], []
        for k, p in prompts:
            rng = np.random.default_rng([23, k])
            g, r = [], []
            for _ in range(N):
                n = int(rng.integers(1, MAX_NEW + 1))
                toks = rng.integers(40, 300, size=n)
                done = bool(rng.random() < 0.6)
                if done:
                    toks[-1] = 4
                g.append(Generation(toks, -3 * rng.random(n), done))
                ok = bool(rng.random() < 0.5)
                r.append(OPEN_RESULT if p.ground_truth is None else
                         VerifierResult(float(ok), "correct" if ok else "wrong"))  # fmt: skip
            gens.append(g)
            results.append(r)
        return gens, results, {}


def _prompts(assets, allow_open=True):
    from nova_engine.rl.prompts import load_rlvr_prompts

    return load_rlvr_prompts(assets["data"], assets["tok"], max_prompt_length=40,
                             allow_open=allow_open)[0]  # fmt: skip


def _guard(engine, calls):
    from nova_kernels._sync import forbid_host_sync

    inner = engine.forward_collect

    def wrapped(*a, **k):
        calls["n"] += 1
        with forbid_host_sync():
            return inner(*a, **k)

    engine.forward_collect = wrapped


def _layout(assets, tp):
    from nova_engine.data.tokenize import ChatTokenizer
    from nova_engine.parallel.state import destroy_parallel, initialize_parallel
    from nova_engine.rl.producer import EngineRollouts
    from nova_engine.rl.reward_model import RewardModelSection, RMScorer
    from nova_engine.rl.verifiers import verify_one
    from nova_engine.train.engine import RewardEngine
    from nova_engine.train.stages import rlvr as R

    ps = initialize_parallel(tp=tp, seed=7)
    ct = ChatTokenizer(assets["tok"])
    prod, prompts = FixedRollouts(ct.tokenizer), _prompts(assets)
    base = _config(assets, tp, path=assets["rm"], output="correctness")
    scorer = RMScorer.build(base, ps, RewardEngine)
    assert scorer is not None
    eng = scorer.engine
    frozen = eng.optimizer is None and not any(p.requires_grad for m in eng.models
                                               for p in m.parameters())  # fmt: skip
    calls = {"n": 0}
    if tp == 1:  # megatron's vocab-parallel embedding reads a bool mask at TP > 1 (not ours)
        _guard(eng, calls)
    modes = {"verifier": None, "rm": dict(verifier_weight=0.0), "norm": dict(verifier_weight=0.0, normalize=True),
             "mix": dict(verifier_weight=W_V, weight=W_RM)}  # fmt: skip
    out: dict = {"frozen": frozen}
    for mode, kw in modes.items():
        rm = None
        if kw is not None:
            cfg = RewardModelSection(path=assets["rm"], output="correctness", **kw)
            rm = RMScorer(eng, scorer.ct, cfg, ps, MBT)
        run = _config(assets, tp)
        loop = R.build_loop(run, ps, prompts, stops=[4])
        stage = R.build_stage(run, ps, prod, pad_id=5, rm=rm)
        batch = loop.data.step_prompts(0)
        sr = stage.responses(batch)
        out[mode] = [(r.group, batch.items[r.group][1].messages, prod.text(r.gen), r.reward,
                      r.rm_score, r.verifier_reward, r.dataset) for r in sr.responses]  # fmt: skip
        if mode in ("rm", "mix"):
            hist = loop.fit(stage, stop_after=1)
            keys = ("time/reward_model", "reward/verifier_mean", "reward/rm_mean", "reward/total_mean", "reward_mean",
                    "policy_loss", "verified", "open_ended")  # fmt: skip
            out[f"fit_{mode}"] = {k: float(hist[0][k]) for k in keys}
    if tp == 1:  # real generation: open prompts skip the verifier, the RM scores the text
        run = _config(assets, tp, path=assets["rm"], output="correctness", weight=W_RM,
                      verifier_weight=W_V)  # fmt: skip
        loop = R.build_loop(run, ps, prompts, stops=(4,))
        gen = EngineRollouts(loop.engine("policy"), ct.tokenizer, R.sampling_params(run, (4,)),
                             lambda items: [verify_one(it) for it in items])  # fmt: skip
        stage = R.build_stage(
            run, ps, gen, pad_id=5, rm=RMScorer(eng, scorer.ct, run.reward_model, ps, MBT)
        )
        sr = stage.responses(loop.data.step_prompts(0))
        out["gen"] = [(r.dataset, r.reason, r.reward, r.rm_score, r.verifier_reward)
                      for r in sr.responses]  # fmt: skip
    out["guarded_calls"] = calls["n"]
    destroy_parallel()
    return out


def _worker(rank, world, assets):
    return {tp: _layout(assets, tp) for tp in LAYOUTS}


def hf_scores(assets, rows) -> list[float]:
    """The reference: plain transformers on the chat-template rendering of each response."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["tok"])
    rm = AutoModelForSequenceClassification.from_pretrained(assets["rm"], dtype=torch.float32)
    rm.eval()
    out = []
    for _, msgs, text, *_ in rows:
        conv = tok.apply_chat_template(
            [*msgs, {"role": "assistant", "content": text}], tokenize=False
        )
        ids = tok(conv, add_special_tokens=False)["input_ids"]
        assert 5 not in ids  # the pad id: HF reads the last non-pad token
        with torch.no_grad():
            out.append(float(rm(torch.tensor([ids])).logits[0, 1]))
    return out


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    assets = _assets(str(tmp_path_factory.mktemp("rlvr_rm")))
    return assets, run_distributed(_worker, 2, assets)


@pytest.mark.slow  # spawned process group
@pytest.mark.parametrize("tp", LAYOUTS)
def test_rm_rewards_equal_transformers_and_the_mix_is_the_weighted_sum(group, tp):
    assets, res = group
    ref = None
    for rank, by_tp in enumerate(res):
        r = by_tp[tp]
        assert r["frozen"] and (tp > 1 or r["guarded_calls"] >= 3)
        rm_rows, mix_rows, ver_rows, norm_rows = r["rm"], r["mix"], r["verifier"], r["norm"]
        assert len(rm_rows) == P * N
        if ref is None:
            ref = hf_scores(assets, rm_rows)
        assert {x[6] for x in rm_rows} >= {"open", "chat", "arithmetic"}
        for i, (row, want) in enumerate(zip(rm_rows, ref)):
            tag = f"tp{tp} rank {rank} response {i}"
            assert abs(row[4] - want) <= 2e-5 * max(1.0, abs(want)), f"{tag}: {row[4]} vs {want}"
            assert abs(row[3] - want) <= 2e-5 * max(1.0, abs(want)), tag  # reward = RM alone
            v = ver_rows[i]
            assert v[2] == row[2] and v[4] is None  # same response; no RM part
            m = mix_rows[i]
            if row[6] in ("open", "chat"):  # open-ended: no verifier part
                assert m[5] is None and abs(m[3] - W_RM * want) <= 1e-4
            else:
                assert m[5] == v[3] and m[5] in (0.0, 10.0)
                assert abs(m[3] - (W_V * v[3] + W_RM * want)) <= 1e-4, (m, v, want)
        s = np.array(ref)
        assert np.allclose([x[3] for x in norm_rows], (s - s.mean()) / (s.std() + 1e-6), atol=1e-4)
        assert np.ptp(s) > 0.1  # the scores differ: the comparison can fail


@pytest.mark.slow  # spawned process group
def test_training_steps_and_metrics_equal_across_layouts(group):
    _, res = group
    want = res[0][1]
    for key in ("fit_rm", "fit_mix"):
        m = want[key]
        assert np.isfinite(m["policy_loss"]) and m["reward/total_mean"] == m["reward_mean"]
        assert 0 < m["open_ended"] < 1 and 0 <= m["verified"] <= 1
        for by_tp in res:
            for tp in LAYOUTS:
                got = by_tp[tp][key]
                for k, v in m.items():
                    if k.startswith("time/"):  # reported, not layout-independent
                        assert got[k] > 0, (key, tp, k)
                        continue
                    assert abs(got[k] - v) <= 2e-5 * max(1.0, abs(v)), (key, tp, k, got[k], v)
    mix = want["fit_mix"]
    total = (
        W_V * mix["reward/verifier_mean"] * (1 - mix["open_ended"]) + W_RM * mix["reward/rm_mean"]
    )
    assert abs(mix["reward/total_mean"] - total) <= 1e-4, mix


@pytest.mark.slow  # spawned process group
def test_generated_open_prompts_skip_the_verifier(group):
    _, res = group
    for by_tp in res:
        rows = by_tp[1]["gen"]
        assert len(rows) == P * N
        for ds, reason, reward, rm, ver in rows:
            assert rm is not None
            if ds in ("open", "chat"):
                assert ver is None and reason == "no_answer" and abs(reward - W_RM * rm) <= 1e-5
            else:
                assert abs(reward - (W_V * ver + W_RM * rm)) <= 1e-5


# ------------------------------------------------------------------------------ errors


def _launch_env() -> dict:
    """This environment without torchrun's variables (the entry point is a world of one)."""
    env = {k: v for k, v in os.environ.items() if k not in _PG_ENV}
    return env | {"NOVA_KERNELS": "torch"}


def _cli(assets, tmp_path, *extra):
    cmd = [sys.executable, "-m", "nova_engine.train", "rlvr", "--recipe", "recipes/tiny_cpu.yaml",
           f"model.hf_path={assets['model']}", f"model.tokenizer_path={assets['tok']}",
           f"data.train_paths=[{assets['data']}]", f"train.out_dir={tmp_path / 'out'}",
           "train.max_steps=1", "train.tensorboard=false", *extra]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=_launch_env())  # fmt: skip
    return p.returncode, (p.stdout + p.stderr).strip()


@pytest.fixture(scope="module")
def small_assets(tmp_path_factory):
    return _assets(str(tmp_path_factory.mktemp("rlvr_rm_cli")))


@pytest.mark.slow  # entry-point subprocesses
def test_entry_point_errors(small_assets, tmp_path):
    rc, text = _cli(small_assets, tmp_path, f"reward_model.path={small_assets['model']}")
    lines = [x for x in text.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and "reward_model.path" in lines[0], text
    assert "ForSequenceClassification" in lines[0], text
    rc, text = _cli(small_assets, tmp_path)  # open-ended lines, no reward model
    assert rc == 2 and f"{small_assets['data']}:5" in text and "reward_model.path" in text, text


def test_config_errors_name_the_key(small_assets):
    from nova_engine.config import ConfigError
    from nova_engine.recipe import load_recipe
    from nova_engine.train import safety

    recipe = os.path.join(ROOT, "recipes", "tiny_cpu.yaml")
    for over, key in ((["reward_model.weight=.inf"], "reward_model.weight"),
                      (["reward_model.verifier_weight=x"], "reward_model.verifier_weight"),
                      (["reward_model.normalize=3"], "reward_model.normalize")):  # fmt: skip
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_recipe(recipe, "rlvr", over)
    base = [f"model.hf_path={small_assets['model']}", f"model.tokenizer_path={small_assets['tok']}",
            f"data.train_paths=[{small_assets['data']}]"]  # fmt: skip
    run = load_recipe(recipe, "rlvr", [*base, f"reward_model.path={small_assets['rm']}"])
    with pytest.raises(ConfigError, match=r"reward_model\.output.*helpfulness"):
        safety.check_model_classes(run)  # 2 outputs: name one
    run = load_recipe(recipe, "rlvr", [*base, f"reward_model.path={small_assets['rm']}",
                                       "reward_model.output=correctness"])  # fmt: skip
    safety.check_model_classes(run)
    run = load_recipe(recipe, "rlvr", [*base, "reward_model.path=/no/such/dir"])
    with pytest.raises(ConfigError, match=r"reward_model\.path.*no such directory"):
        safety.check_model_classes(run)
