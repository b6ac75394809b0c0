"""The rm stage on gloo (one spawned group of 4 ranks), TP1×DP4, TP2×DP2 and TP2×PP2 (with
sequence parallelism, so the score head reads last tokens from TP-sharded hidden rows):

- per-step losses of bt (+ reward centering), margin_bt, scaled_bt and regression agree
  across the three layouts, and step 1 of every pairwise loss equals its formula on the
  rewards of the seeded head (bt at r_c = r_r would be log 2; here the head is random);
- a trained model exported as LlamaForSequenceClassification at each layout loads in
  `transformers`, which gives the engine's rewards on the held-out pairs (fp32, <= 1e-4);
- the entry point (`rm.run` on a run config) trains Scaled BT initialized from a regression
  export: the BT head starts as the regression head's helpfulness row and the decoder as
  the regression decoder; its RewardBench-layout evaluation equals transformers' on the export.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from nova_engine.parallel.spawn import run_distributed

pytestmark = pytest.mark.slow  # one spawned group of training runs per layout

WORLD = 4
STEPS = 3
GBS, MBT, MAXLEN = 8, 128, 64
LAYOUTS = [(1, 1), (2, 1), (2, 2)]
LOSSES = ["bt", "margin_bt", "scaled_bt", "regression"]
PARITY = ("scaled_bt", "regression")  # exported and checked against transformers
CENTER = 0.05  # bt runs with reward centering


def _loss(loss_type):
    from nova_engine.train.stages.rm import RMLossSection

    c = CENTER if loss_type == "bt" else 0.0
    return RMLossSection(loss_type=loss_type, center_rewards_coefficient=c)


def _worker(rank, world, model_dir, tok_dir, data, root):
    import torch.distributed as dist

    from nova_engine.config import OptimConfig
    from nova_engine.model.arch import load_arch
    from nova_engine.model.heads import score_head
    from nova_engine.parallel.state import destroy_parallel, initialize_parallel
    from nova_engine.train import runner
    from nova_engine.train.data_source import PackedDataSource
    from nova_engine.train.loop import Loop
    from nova_engine.train.stages import rm

    arch, out = load_arch(model_dir), {}
    for tp, pp in LAYOUTS:
        ps = initialize_parallel(tp=tp, pp=pp, sp=(tp, pp) == (2, 2), seed=3)
        for loss_type in LOSSES:
            loss = _loss(loss_type)
            samples, targets = data["pairs"] if loss.pairwise else data["attributes"]
            engine = rm.RewardEngine(
                arch, ps, labels=loss.labels, pad_token_id=data["pad"], name="reward",
                weights_dir=model_dir, optim=OptimConfig(lr=3e-3, schedule="constant"),
                total_steps=STEPS, score_init_seed=5,
            )  # fmt: skip
            src = PackedDataSource(samples, global_batch_size=GBS, micro_batch_tokens=MBT,
                                   ps=ps, seed=1, max_steps=STEPS)  # fmt: skip
            first = None
            if loss.pairwise:  # the step-1 rewards, to check the loss formula by hand
                first = rm.pair_rewards(engine, _one_step(src, ps), [1.0])
            lm = getattr(engine.chunks[-1], "output_layer", None)  # the untied LM head
            lm0 = None if lm is None else lm.weight.detach().clone()
            hist = Loop({"reward": engine}, src).fit(rm.RMStage(ps, loss, targets))
            rec = {"hist": hist, "first": first}
            if lm is not None:  # frozen: untouched by the steps (no grads, no weight decay)
                rec["lm_head"] = (lm.weight.requires_grad, torch.equal(lm.weight, lm0))
            if loss_type in PARITY:
                ev = PackedDataSource(data["eval"], global_batch_size=GBS,
                                      micro_batch_tokens=MBT, ps=ps, shuffle=False)  # fmt: skip
                w = [1.0] if loss.pairwise else [1.0, 0, 0, 0, 0]
                rec["rewards"] = rm.pair_rewards(engine, ev, w)
                rec["export"] = os.path.join(root, f"{loss_type}-{tp}x{pp}")
                engine.export_hf(rec["export"])
            out[(loss_type, tp, pp)] = rec
        destroy_parallel()

    # the entry point: Scaled BT initialized from the TP2xPP2 regression export, at TP2xPP2
    reg_dir = out[("regression", 2, 2)]["export"]
    cfg = _run_config(model_dir, tok_dir, data["paths"], reg_dir, os.path.join(root, "bt"))
    ps = runner.setup_parallel(cfg)
    loop, stage, eval_fn = rm.prepare(cfg, ps)
    head0 = None
    if ps.is_last_stage():
        head0 = score_head(loop.engine("reward").chunks[-1]).weight.detach().clone()
    emb0 = None
    if ps.is_first_stage():
        emb0 = loop.engine("reward").chunks[0].embedding.word_embeddings.weight.detach().clone()
    hist = runner.train_stage(cfg, loop, stage, eval_fn)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (head0, emb0, ps.tp_rank))
    destroy_parallel()
    out["chain"] = {"hist": hist, "init": gathered, "out_dir": cfg.train.out_dir}
    return out


def _one_step(src, ps):
    from nova_engine.train.data_source import PackedDataSource

    return PackedDataSource(src.step_samples(0), global_batch_size=GBS, micro_batch_tokens=MBT,
                            ps=ps, shuffle=False)  # fmt: skip


def _run_config(model_dir, tok_dir, paths, init_from, out_dir):
    from nova_engine.recipe import build_run_config

    values = {
        "model": {"hf_path": model_dir, "tokenizer_path": tok_dir, "init_from": init_from},
        "parallel": {"tp": 2, "pp": 2, "distributed_optimizer": False},
        "data": {"train_paths": [paths["pref"]], "eval_paths": [paths["eval"]],
                 "max_length": MAXLEN, "truncation": "drop"},
        "optim": {"lr": 3e-3, "schedule": "constant"},
        "train": {"global_batch_size": GBS, "micro_batch_tokens": MBT, "max_steps": 2,
                  "out_dir": out_dir, "precision": "fp32", "tensorboard": False},
        "checkpoint": {"resume": "none", "hf_in_checkpoints": False},
        "loss": {"loss_type": "scaled_bt"},
    }  # fmt: skip
    return build_run_config("rm", values)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from nova_engine.data.reward import (
        read_attribute_jsonl,
        read_reward_pairs,
        read_rewardbench,
        tokenize_attributes,
        tokenize_rewardbench,
    )
    from nova_engine.data.synthetic_reward import write_reward_task
    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.data.tokenize import load_tokenizer, tokenize_pairs
    from nova_engine.model.hf_io import choose_pad_token_id
    from nova_engine.model.tiny import build_tiny_hf_model

    root = tmp_path_factory.mktemp("train_rm")
    tok = build_tiny_tokenizer(root / "tok")
    paths = write_reward_task(root / "data", n_regression=GBS * STEPS, n_pref=GBS * STEPS,
                              n_eval=12, seed=3)  # fmt: skip
    model_dir = str(root / "model")
    build_tiny_hf_model(
        model_dir, "llama", seed=1, vocab_size=512, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    pairs, _ = tokenize_pairs(read_reward_pairs(paths["pref"])[0], tok, max_length=MAXLEN)
    attrs, _ = tokenize_attributes(read_attribute_jsonl(paths["regression"])[0], tok,
                                   max_length=MAXLEN)  # fmt: skip
    ev, subsets, _ = tokenize_rewardbench(read_rewardbench(paths["eval"])[0], tok)
    pad = choose_pad_token_id(load_tokenizer(tok))
    data = {"pairs": (pairs, None), "attributes": (attrs.samples, attrs.targets), "eval": ev,
            "pad": pad, "paths": paths}  # fmt: skip
    out = run_distributed(_worker, WORLD, model_dir, str(tok), data, str(root))
    return out[0], data, tok


@pytest.mark.parametrize("loss_type", LOSSES)
def test_losses_equal_across_layouts(results, loss_type):
    out = results[0]
    ref = [h["loss"] for h in out[(loss_type, *LAYOUTS[0])]["hist"]]
    assert len(ref) == STEPS and all(np.isfinite(ref))
    for layout in LAYOUTS[1:]:
        got = [h["loss"] for h in out[(loss_type, *layout)]["hist"]]
        np.testing.assert_allclose(got, ref, rtol=2e-5, err_msg=f"{loss_type} {layout}")
    if loss_type == "regression":
        for layout in LAYOUTS[1:]:
            a, b = out[(loss_type, *LAYOUTS[0])]["hist"][0], out[(loss_type, *layout)]["hist"][0]
            for k in (k for k in a if k.startswith("mse/")):
                np.testing.assert_allclose(b[k], a[k], rtol=2e-5)


def _by_hand(loss_type, rc, rr, m):
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    d = rc - rr
    if loss_type == "bt":
        return -np.log(sig(d)) + CENTER * (rc + rr) ** 2
    if loss_type == "margin_bt":
        return -np.log(sig(d - m))
    return -m * np.log(sig(d))


def test_untied_lm_head_is_frozen(results):
    """A reward model never reads its untied LM head: no gradient, no optimizer state, and
    the weight stays as loaded through training (AdamW would otherwise decay it)."""
    heads = [
        rec["lm_head"] for key, rec in results[0].items() if key != "chain" and "lm_head" in rec
    ]
    assert heads  # rank 0 is a last stage in the PP1 layouts (the tiny model is untied)
    assert all(h == (False, True) for h in heads), heads


@pytest.mark.parametrize("loss_type", LOSSES[:3])
def test_first_step_matches_formula(results, loss_type):
    out, data, _ = results
    pairs = {p.index: p for p in data["pairs"][0]}
    for layout in LAYOUTS:
        rec = out[(loss_type, *layout)]
        first = rec["first"]
        ids = sorted(first)
        assert len(ids) == GBS
        rc, rr = np.array([first[i][0] for i in ids]), np.array([first[i][1] for i in ids])
        m = np.array([pairs[i].margin for i in ids])
        h = rec["hist"][0]
        np.testing.assert_allclose(h["loss"], _by_hand(loss_type, rc, rr, m).mean(), rtol=1e-5)
        np.testing.assert_allclose(h["accuracy"], (rc > rr).mean())
        np.testing.assert_allclose(h["margin"], (rc - rr).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type", PARITY)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_export_matches_transformers(results, loss_type, layout):
    from nova_engine.eval.reward_hf import load_hf_reward_model, output_weights, sequence_rewards

    out, data, _ = results
    rec = out[(loss_type, *layout)]
    model = load_hf_reward_model(rec["export"])
    cfg = json.load(open(os.path.join(rec["export"], "config.json")))
    want_labels = ["reward"] if loss_type != "regression" else [
        "helpfulness", "correctness", "coherence", "complexity", "verbosity"
    ]  # fmt: skip
    assert cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert [cfg["id2label"][str(i)] for i in range(len(want_labels))] == want_labels
    assert model.config.num_labels == len(want_labels) and cfg["pad_token_id"] == data["pad"]
    ev = data["eval"]
    r = sequence_rewards(model, [h.tokens for p in ev for h in (p.chosen, p.rejected)],
                         output_weights(model, "helpfulness"))  # fmt: skip
    got = rec["rewards"]
    assert sorted(got) == [p.index for p in ev]
    eng = torch.tensor([got[p.index] for p in ev], dtype=torch.float32)
    torch.testing.assert_close(r[0::2], eng[:, 0], rtol=0, atol=1e-4)
    torch.testing.assert_close(r[1::2], eng[:, 1], rtol=0, atol=1e-4)
    # training moved the head off its seeded init: the exports are real, not the init
    assert not torch.allclose(r[0::2], r[1::2])


def test_regression_init_carries_the_head_and_decoder(results):
    from safetensors import safe_open

    out, _, _ = results
    reg_dir = out[("regression", 2, 2)]["export"]
    tensors = {}
    for f in os.listdir(reg_dir):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(reg_dir, f), "pt") as fh:
                tensors |= {k: fh.get_tensor(k) for k in fh.keys()}
    heads = [h for h, _, _ in out["chain"]["init"] if h is not None]
    embs = [(e, r) for _, e, r in out["chain"]["init"] if e is not None]
    assert len(heads) == 2 and len(embs) == 2  # TP2xPP2: two last-stage and two first-stage ranks
    for h in heads:  # K=5 -> K=1: the helpfulness row (output 0)
        assert h.shape == (1, 64)
        torch.testing.assert_close(h[0], tensors["score.weight"][0], rtol=0, atol=0)
    full = tensors["model.embed_tokens.weight"]
    for e, tp_rank in embs:  # vocab shard of the TP rank
        torch.testing.assert_close(e, full[tp_rank * 256 : (tp_rank + 1) * 256], rtol=0, atol=0)


def test_entry_point_eval_matches_transformers_on_export(results):
    from nova_engine.eval.reward_hf import evaluate_hf_reward_model

    out, data, tok = results
    chain = out["chain"]
    assert len(chain["hist"]) == 2 and all(np.isfinite(h["loss"]) for h in chain["hist"])
    with open(os.path.join(chain["out_dir"], "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    ev = [r for r in rows if any(k.startswith("eval/") for k in r)][-1]
    hf = evaluate_hf_reward_model(os.path.join(chain["out_dir"], "hf"), [data["paths"]["eval"]],
                                  tok, max_length=MAXLEN)  # fmt: skip
    assert hf.subsets["synthetic-arith"].total == 12
    assert ev["eval/accuracy"] == pytest.approx(hf.accuracy)
    assert ev["eval/subset/synthetic-arith"] == pytest.approx(hf.accuracy)


RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")


def test_recipes_and_config_errors():
    from nova_engine.config import ConfigError
    from nova_engine.recipe import load_recipe
    from nova_engine.train.stages.rm import RMLossSection, head_rows

    tiny = load_recipe(os.path.join(RECIPES, "tiny_cpu.yaml"), "rm")
    assert (tiny.loss.loss_type, tiny.data.truncation) == ("regression", "drop")
    assert tiny.loss.labels[0] == "helpfulness" and len(tiny.loss.labels) == 5
    p70 = os.path.join(RECIPES, "llama3_70b.yaml")
    reg = load_recipe(p70, "rm")
    assert (reg.parallel.tp, reg.parallel.pp, reg.train.global_batch_size, reg.optim.lr) == (
        8, 2, 128, 2e-6,
    )  # fmt: skip
    bt = load_recipe(p70, "rm", ["parallel.pp=4", "optim.lr=1e-6", "loss.loss_type=scaled_bt",
                                 "model.init_from=runs/llama3_70b/rm_regression/hf"])  # fmt: skip
    assert (bt.parallel.pp, bt.optim.lr, bt.train.epochs, bt.loss.labels) == (
        4,
        1e-6,
        1,
        ("reward",),
    )
    assert bt.weights_dir == "runs/llama3_70b/rm_regression/hf"
    # the head's rows from the init checkpoint: regression -> BT takes helpfulness
    names = list(reg.loss.labels)
    assert head_rows(names, bt.loss) == [0]
    assert head_rows(names[::-1], bt.loss) == [4]
    assert head_rows(names[::-1], reg.loss) == [4, 3, 2, 1, 0]
    assert head_rows(names, reg.loss) is None and head_rows(None, bt.loss) is None
    with pytest.raises(ConfigError, match="do not provide"):
        head_rows(["reward"], reg.loss)
    with pytest.raises(ConfigError, match="loss_type: expected one of bt, margin_bt"):
        RMLossSection(loss_type="ipo")
    with pytest.raises(ConfigError, match="center_rewards_coefficient: pairwise losses only"):
        RMLossSection(loss_type="regression", center_rewards_coefficient=0.1)
    with pytest.raises(ConfigError, match="reward_attribute: 'safety' is not one of"):
        RMLossSection(loss_type="regression", reward_attribute="safety")
    with pytest.raises(ConfigError, match="micro_batch_tokens: 100 cannot hold one pair"):
        load_recipe(os.path.join(RECIPES, "tiny_cpu.yaml"), "rm", ["train.micro_batch_tokens=100"])
