"""The DPO stage on gloo (one spawned group of 4 ranks), TP1×DP4, TP2×DP2 and TP2×PP2:

- the reference pass caches, per pair, the summed response log-probs that `transformers`
  gives the same model (sums and token counts);
- at step 1 the policy is the reference, so every DPO-family loss with a reference is
  l(0): log 2 for sigmoid / dpo_norm (formula by hand), accuracy 0, margin 0;
- per-step losses agree across the two layouts; the loss on the (repeated) batch goes down;
- a cache saved by rank 0 reopens complete under the same key, and a changed data file
  gives a new key (so a stale cache is never used);
- every layout's losses equal the golden per-step losses (tests/engine/golden, one process);
- an evaluation step with fewer pairs than DP ranks (empty ranks get a padding batch) gives
  l(0) = log 2 at the reference weights.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from nova_engine.parallel.spawn import run_distributed

pytestmark = pytest.mark.slow  # a spawned group of 4 ranks, whole training runs

WORLD = 4
STEPS = 4
GBS = 16  # the whole data set each step: the loss on it must go down
MBT = 128
LAYOUTS = [(1, 1), (2, 1), (2, 2)]
GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "dpo.json")


def _worker(rank, world, model_dir, pairs, root):
    from nova_engine.config import OptimConfig
    from nova_engine.losses.dpo import DPOConfig
    from nova_engine.parallel.state import destroy_parallel, initialize_parallel
    from nova_engine.train.data_source import PackedDataSource
    from nova_engine.train.engine import ModelEngine
    from nova_engine.train.loop import Loop
    from nova_engine.train.ref_cache import RefCache, RefCacheKey
    from nova_engine.train.stages.dpo import DPOStage, reference_pass

    key = RefCacheKey(model="m", data="d", config="c")
    out = {}
    for tp, pp in LAYOUTS:
        ps = initialize_parallel(tp=tp, pp=pp, seed=3)
        optim = OptimConfig(lr=3e-3, grad_clip=1.0, schedule="constant")
        engine = ModelEngine.from_hf(model_dir, ps, optim=optim, total_steps=STEPS)

        def source(ps=ps, data=pairs, gbs=GBS, **kw):
            return PackedDataSource(
                data, global_batch_size=gbs, micro_batch_tokens=MBT, ps=ps, **kw
            )

        cache_dir = os.path.join(root, f"cache{tp}x{pp}")
        cache = RefCache.open(cache_dir, key, expected=[p.index for p in pairs])
        cache = reference_pass(engine, source(shuffle=False), cache)
        reopened = RefCache.open(cache_dir, key, expected=[p.index for p in pairs])
        stage = DPOStage(ps, DPOConfig(loss_type="dpo_norm", beta=2.0), cache)
        loop = Loop(engine, source(seed=1, max_steps=STEPS))
        few = None
        if (tp, pp) == (1, 1):  # DP4, 2 pairs: two ranks hold only padding
            few = loop.evaluate(stage, [source(data=pairs[:2], gbs=2).rank_microbatches(0)])
        hist = loop.fit(stage)
        out[(tp, pp)] = {
            "ref": cache.lookup([p.index for p in pairs]),
            "reopened_complete": reopened.complete,
            "hist": hist,
            "few": few,
        }
        destroy_parallel()
    return out


def _hf_response_logps(model_dir, pairs):
    from transformers import AutoModelForCausalLM

    from nova_kernels.reference import causal_lm_logps

    model = AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    rows = [
        [x for s in (p.chosen, p.rejected) for x in causal_lm_logps(model, s.tokens, s.loss_mask)]
        for p in pairs
    ]
    return np.array(rows)  # [P, 4]: chosen sum, chosen n, rejected sum, rejected n


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from nova_engine.data.synthetic import write_task
    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.data.tokenize import load_samples
    from nova_engine.model.tiny import build_tiny_hf_model

    root = tmp_path_factory.mktemp("train_dpo")
    tok = build_tiny_tokenizer(root / "tok")
    paths = write_task(root / "data", n_sft=4, n_pref=GBS, n_eval=4, seed=2)
    model_dir = str(root / "model")
    build_tiny_hf_model(
        model_dir,
        "llama",
        seed=1,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    pairs, _, _ = load_samples(paths["pref"], tok, "pairs", max_length=64)
    hf = _hf_response_logps(model_dir, pairs)
    out = run_distributed(_worker, WORLD, model_dir, pairs, str(root))
    return out[0], hf, paths, root


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_reference_pass_matches_transformers(results, layout):
    out, hf, _, _ = results
    c, r, cn, rn = out[layout]["ref"]
    np.testing.assert_allclose(c, hf[:, 0], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(r, hf[:, 2], rtol=1e-5, atol=1e-4)
    assert cn.tolist() == hf[:, 1].astype(int).tolist()
    assert rn.tolist() == hf[:, 3].astype(int).tolist()
    assert out[layout]["reopened_complete"]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_first_step_is_log2(results, layout):
    first = results[0][layout]["hist"][0]
    assert math.isclose(first["loss"], math.log(2.0), rel_tol=1e-5)
    assert abs(first["margin"]) < 1e-5 and first["accuracy"] == 0.0


@pytest.mark.parametrize("layout", LAYOUTS[1:], ids=str)
def test_losses_equal_across_layouts_and_decrease(results, layout):
    out = results[0]
    a = [h["loss"] for h in out[LAYOUTS[0]]["hist"]]
    b = [h["loss"] for h in out[layout]["hist"]]
    assert len(a) == STEPS
    np.testing.assert_allclose(b, a, rtol=1e-5)
    assert a[-1] < a[0]


def test_changed_data_changes_the_cache_key(results):
    from nova_engine.train.ref_cache import data_fingerprint

    _, _, paths, root = results
    before = data_fingerprint(paths["pref"])
    changed = root / "changed.jsonl"
    text = open(paths["pref"]).read()
    changed.write_text(text.replace("pref-0", "pref-x", 1))
    assert data_fingerprint(str(changed)) != before


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_golden_losses(results, layout):
    with open(GOLDEN) as f:
        gold = json.load(f)
    c = gold["config"]
    assert (c["global_batch_size"], c["micro_batch_tokens"], c["batch_seed"]) == (GBS, MBT, 1)
    assert (c["lr"], c["schedule"], c["loss_type"], c["beta"]) == (
        3e-3,
        "constant",
        "dpo_norm",
        2.0,
    )
    got = [h["loss"] for h in results[0][layout]["hist"]]
    np.testing.assert_allclose(got, [r[0] for r in gold["steps10"][:STEPS]], rtol=2e-5)


def test_eval_with_fewer_pairs_than_dp_ranks(results):
    few = results[0][(1, 1)]["few"]
    assert math.isclose(few["loss"], math.log(2.0), rel_tol=1e-5)
    assert few["accuracy"] == 0.0 and abs(few["margin"]) < 1e-6
