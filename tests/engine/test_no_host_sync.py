"""No host sync in the per-micro-batch path of SFT, DPO, RM and RLVR (issue #25 item 3).

Inside megatron's schedule (`ModelEngine.forward_backward`: forward, loss callback, backward
of every micro-batch, then the gradient finalization) nothing may read a device tensor's
values on the host: on a GPU each read stalls the stream once per micro-batch. On this CPU
`nova_kernels._sync.forbid_host_sync` turns every such read into HostSyncError
(item/tolist/numpy/bool/int/float, nonzero, boolean masks, unique, ...). Per STEP work
outside the schedule (the loss's `counts` and `prepare`, the metric and stop-flag
reductions, RL's rollouts and advantages) may read: that is where the line is drawn.

One spawned world of one process runs, for every stage, a real training step with the
schedule guarded (the step's loss equals the golden / by-hand value, so the guarded step is
the real one), and then the same step with one host read put back (the code this issue
removed) — the guard must fire, so the check cannot pass vacuously:

- SFT: golden step-1 loss (tests/engine/golden/sft.json); sabotage: linear_cross_entropy
  finding its rows with nonzero(), as before `PackedBatch.loss_rows`; also the grouped
  SDPA attention path (fp32 on CUDA) with and without the batch's cu_seqlens_host;
- DPO: golden step-1 loss (dpo.json, reference pass included); sabotage: the reference
  lookup per micro-batch (`pair_ids.cpu().numpy()`), as before `DPOStage.prepare`;
- RM: Scaled BT and regression step 1 equal their formulas on the head's scores, and the
  held-out evaluation pass (`pair_rewards`, guarded) gives the trained head's scores;
  sabotage: the regression targets looked up per micro-batch (`sample_ids.cpu().numpy()`);
- RLVR: PPO (critic, GAE, KL in the reward, TIS) and GRPO step 1 equal golden rlvr.json, the
  forward-only prepasses guarded too; sabotage: a `.item()` in the policy loss callback.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os

import numpy as np
import pytest

from nova_engine.parallel.spawn import run_distributed

pytestmark = pytest.mark.slow  # one spawned process group (world 1) for the whole file

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden")


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def guarded(*engines, collect: bool = False):
    """Every forward_backward (and forward_collect with `collect`) of `engines` runs under
    forbid_host_sync; counts the guarded calls."""
    from nova_kernels._sync import forbid_host_sync

    calls = {"n": 0}
    names = ["forward_backward", *(["forward_collect"] if collect else [])]
    for eng in engines:
        for name in names:
            inner = getattr(eng, name)

            def wrapped(*a, _inner=inner, **k):
                calls["n"] += 1
                with forbid_host_sync():
                    return _inner(*a, **k)

            setattr(eng, name, wrapped)
    try:
        yield calls
    finally:
        for eng in engines:
            for name in names:
                delattr(eng, name)  # back to the class's method


@contextlib.contextmanager
def patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _fires(fn) -> str:
    """'' when fn() ran through, else the HostSyncError's message."""
    from nova_kernels._sync import HostSyncError

    try:
        fn()
    except HostSyncError as e:
        return str(e) or "HostSyncError"
    return ""


# ------------------------------------------------------------------------------ SFT


def _sft(root: str) -> dict:
    import nova_kernels.ops.linear_cross_entropy as lce
    from nova_engine.losses import sft as sft_loss
    from nova_engine.model import attention, packed
    from nova_engine.parallel.state import destroy_parallel, initialize_parallel
    from nova_engine.train.data_source import PackedDataSource
    from nova_engine.train.engine import ModelEngine
    from nova_engine.train.loop import Loop
    from nova_engine.train.stages.sft import SFTStage

    g = _load("run_golden", os.path.join(GOLDEN, "run_golden.py"))
    c = g.SFT
    model_dir, samples = g.build(os.path.join(root, "sft"), c, "chat")
    out: dict = {}

    def step():
        ps = initialize_parallel(seed=7)
        eng = ModelEngine.from_hf(model_dir, ps, optim=g._optim(c), total_steps=6)
        data = PackedDataSource(samples, global_batch_size=c["global_batch_size"],
                                micro_batch_tokens=c["micro_batch_tokens"], ps=ps,
                                seed=c["batch_seed"], max_steps=6)  # fmt: skip
        mbs = data.next_batch()
        try:
            with guarded(eng) as calls:
                res = Loop(eng).update(eng, mbs, SFTStage(ps))
            return res, calls["n"], len(mbs)
        finally:
            destroy_parallel()

    res, calls, n_mbs = step()
    out["loss"], out["grad_norm"], out["calls"], out["mbs"] = (
        res["loss"],
        res["grad_norm"],
        calls,
        n_mbs,
    )

    # the grouped SDPA path (fp32 on CUDA): plans from the batch's host boundaries
    with patched(attention, "_use_cpu_kernel", lambda *a: False):
        out["grouped_loss"] = step()[0]["loss"]
        no_host = packed.packed_seq_params

        def without_host(batch):
            p = no_host(batch)
            p.cu_seqlens_host = None
            return p

        with patched(packed, "packed_seq_params", without_host):
            out["grouped_sabotage"] = _fires(step)

    real = lce.linear_cross_entropy

    def rows_by_nonzero(hidden, weight, targets, token_weights=None, *, rows=None, **kw):
        rows = (token_weights != 0).nonzero()[:, 0]  # what the kernel did before loss_rows
        return real(hidden, weight, targets, token_weights, rows=rows, **kw)

    with patched(sft_loss, "linear_cross_entropy", rows_by_nonzero):
        out["sabotage"] = _fires(step)
    return out


# ------------------------------------------------------------------------------ DPO


def _dpo(root: str) -> dict:
    from nova_engine.losses.dpo import DPOConfig
    from nova_engine.parallel.state import destroy_parallel, initialize_parallel
    from nova_engine.train.data_source import PackedDataSource
    from nova_engine.train.engine import ModelEngine
    from nova_engine.train.loop import Loop
    from nova_engine.train.ref_cache import RefCache, RefCacheKey
    from nova_engine.train.stages import dpo

    g = _load("run_golden", os.path.join(GOLDEN, "run_golden.py"))
    c = g.DPO
    model_dir, pairs = g.build(os.path.join(root, "dpo"), c, "pairs")
    out: dict = {}

    def step(cache_dir):
        ps = initialize_parallel(seed=3)
        eng = ModelEngine.from_hf(model_dir, ps, optim=g._optim(c), total_steps=10)

        def source(**kw):
            gbs, mbt = c["global_batch_size"], c["micro_batch_tokens"]
            return PackedDataSource(
                pairs, global_batch_size=gbs, micro_batch_tokens=mbt, ps=ps, **kw
            )

        try:
            key = RefCacheKey(model="m", data="d", config="fp32")
            cache = RefCache.open(cache_dir, key, expected=[p.index for p in pairs])
            with guarded(eng, collect=True):  # the reference pass reads nothing either
                cache = dpo.reference_pass(eng, source(shuffle=False), cache)
            stage = dpo.DPOStage(ps, DPOConfig(loss_type=c["loss_type"], beta=c["beta"]), cache)
            src, loop, hist = source(seed=c["batch_seed"], max_steps=10), Loop(eng), []
            with guarded(eng) as calls:
                for _ in range(2):  # step 2: the policy has moved off the reference
                    mbs = src.next_batch()
                    hist.append(loop.update(eng, mbs, stage))
            return [[h["loss"], h["grad_norm"]] for h in hist], calls["n"], len(mbs)
        finally:
            destroy_parallel()

    out["hist"], out["calls"], out["mbs"] = step(os.path.join(root, "cache0"))

    def old_ref(self, mb):  # the per-micro-batch lookup before DPOStage.prepare
        import torch

        c_, r_, _, _ = self.ref.lookup(mb.pair_ids.cpu().numpy())
        return torch.from_numpy(c_).float(), torch.from_numpy(r_).float()

    with patched(dpo.DPOStage, "_ref", old_ref):
        out["sabotage"] = _fires(lambda: step(os.path.join(root, "cache1")))
    return out


# ------------------------------------------------------------------------------ RM


def _rm(root: str) -> dict:
    import torch

    from nova_engine.config import OptimConfig
    from nova_engine.data.reward import (
        read_attribute_jsonl,
        read_reward_pairs,
        tokenize_attributes,
    )
    from nova_engine.data.synthetic_reward import write_reward_task
    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.data.tokenize import tokenize_pairs
    from nova_engine.model.arch import load_arch
    from nova_engine.model.heads import sequence_scores
    from nova_engine.model.tiny import build_tiny_hf_model
    from nova_engine.parallel.state import destroy_parallel, initialize_parallel
    from nova_engine.train.data_source import PackedDataSource
    from nova_engine.train.loop import Loop
    from nova_engine.train.stages import rm

    tok = build_tiny_tokenizer(os.path.join(root, "rm_tok"))
    paths = write_reward_task(os.path.join(root, "rm_data"), n_regression=8, n_pref=8,
                              n_eval=2, seed=3)  # fmt: skip
    model_dir = os.path.join(root, "rm_model")
    build_tiny_hf_model(model_dir, "llama", seed=1, vocab_size=512, hidden_size=64,
                        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2)  # fmt: skip
    pairs, _ = tokenize_pairs(read_reward_pairs(paths["pref"])[0], tok, max_length=48)
    attrs, _ = tokenize_attributes(read_attribute_jsonl(paths["regression"])[0], tok,
                                   max_length=48)  # fmt: skip
    out: dict = {}

    def step(loss_type):
        loss = rm.RMLossSection(loss_type=loss_type)
        samples, targets = (pairs, None) if loss.pairwise else (attrs.samples, attrs.targets)
        ps = initialize_parallel(seed=3)
        try:
            eng = rm.RewardEngine(
                load_arch(model_dir), ps, labels=loss.labels, pad_token_id=0, name="reward",
                weights_dir=model_dir, optim=OptimConfig(lr=3e-3, schedule="constant"),
                total_steps=1, score_init_seed=5,
            )  # fmt: skip

            def src_at_step0():
                return PackedDataSource(samples, global_batch_size=8, micro_batch_tokens=96,
                                        ps=ps, seed=1, max_steps=1)  # fmt: skip

            def score_fn(m, h, b):
                return sequence_scores(m, h, b, ps)

            mbs = src_at_step0().next_batch()
            # the seeded head's scores of the same micro-batches, unguarded (the formula's input)
            scores = eng.forward_collect(mbs, score_fn)
            with guarded(eng) as calls:
                res = Loop(eng).update(eng, mbs, rm.RMStage(ps, loss, targets))
            got = {"loss": res["loss"], "calls": calls["n"], "mbs": len(mbs)}
            s = torch.cat(scores).double().numpy()
            if loss.pairwise:
                m = np.concatenate([b.margins.numpy() for b in mbs]).astype(np.float64)
                d = s[0::2, 0] - s[1::2, 0]
                got["want"] = float(np.mean(-m * np.log(1 / (1 + np.exp(-d)))))
                # the held-out evaluation pass reads nothing back inside its schedule either
                # (after the update: compared with the trained head's scores of the same pairs)
                with guarded(eng, collect=True):
                    rewards = rm.pair_rewards(eng, src_at_step0(), [1.0])
                after = torch.cat(eng.forward_collect(mbs, score_fn)).double().numpy()
                ids = np.concatenate([b.pair_ids_host for b in mbs])
                got["rewards"] = np.array([rewards[int(i)] for i in ids])
                got["rewards_want"] = np.stack([after[0::2, 0], after[1::2, 0]], 1)
            else:
                ids = np.concatenate([b.sample_ids_host for b in mbs])
                t = targets[ids]
                ok = ~np.isnan(t)
                got["want"] = float(((s - np.where(ok, t, 0)) ** 2)[ok].sum() / ok.sum())
            return got
        finally:
            destroy_parallel()

    out["scaled_bt"] = step("scaled_bt")
    out["regression"] = step("regression")

    def old_targets(self, mb):  # the per-micro-batch lookup before RMStage.prepare
        return torch.from_numpy(self.targets[mb.sample_ids[: mb.num_samples].cpu().numpy()])

    def old_regression_loss_fn(self, norms):
        fn = real_loss_fn(self, norms)

        def loss_fn(model, hidden, mb):
            mb.extra = {**mb.extra, "targets": old_targets(self, mb)}
            return fn(model, hidden, mb)

        return loss_fn

    real_loss_fn = rm.RMStage.loss_fn
    with patched(rm.RMStage, "loss_fn", old_regression_loss_fn):
        out["sabotage"] = _fires(lambda: step("regression"))
    return out


# ------------------------------------------------------------------------------ RLVR


def _rlvr(root: str) -> dict:
    from nova_engine.losses import policy
    from nova_engine.model import heads
    from nova_engine.parallel.state import destroy_parallel, initialize_parallel
    from nova_engine.rl import losses as rlvr_losses

    t = _load("test_train_rlvr_for_sync", os.path.join(HERE, "test_train_rlvr.py"))
    assets = t.build_assets(os.path.join(root, "rlvr"))
    out: dict = {}

    def step(algo):
        ps = initialize_parallel(seed=7)
        try:
            loop, stage = t.fixed_loop(assets, algo, ps, 1, 1)
            with contextlib.ExitStack() as stack:
                calls = stack.enter_context(guarded(*loop.engines.values(), collect=True))
                hist = loop.fit(stage, stop_after=1)
            return {"row": t._rows(hist)[0], "calls": calls["n"]}
        finally:
            destroy_parallel()

    for algo in ("ppo", "grpo"):
        out[algo] = step(algo)

    def compute_without_host_facts(*a, cu_seqlens_host=None, **k):
        return real_policy_loss(*a, **k)  # the kernel reads cu_seqlens back

    real_policy_loss = policy.compute_policy_loss
    with patched(rlvr_losses, "compute_policy_loss", compute_without_host_facts):
        out["policy_kernel"] = _fires(lambda: step("grpo"))

    real = heads.token_logprobs

    def logprobs_then_item(*a, **k):
        lp = real(*a, **k)
        lp.sum().item()  # e.g. a logged value read back per micro-batch
        return lp

    with patched(rlvr_losses, "token_logprobs", logprobs_then_item):
        out["sabotage"] = _fires(lambda: step("grpo"))
    return out


# ------------------------------------------------------------------------------ the group


def _worker(rank, world, root):
    import torch

    torch.manual_seed(0)
    return {"sft": _sft(root), "dpo": _dpo(root), "rm": _rm(root), "rlvr": _rlvr(root)}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("no_host_sync"))
    return run_distributed(_worker, 1, root)[0]


def _golden(name: str) -> dict:
    with open(os.path.join(GOLDEN, name)) as f:
        return json.load(f)


def test_sft_step_reads_nothing_back(results):
    r = results["sft"]
    assert r["calls"] == 1 and r["mbs"] > 1  # one guarded schedule over several micro-batches
    gold, gold_norm = _golden("sft.json")["steps6"][0]
    np.testing.assert_allclose([r["loss"], r["grad_norm"]], [gold, gold_norm], rtol=2e-5)
    np.testing.assert_allclose(r["grouped_loss"], gold, rtol=2e-5)
    assert "nonzero" in r["sabotage"], r["sabotage"]
    assert "tolist" in r["grouped_sabotage"], r["grouped_sabotage"]


def test_dpo_step_reads_nothing_back(results):
    r = results["dpo"]
    assert r["calls"] == 2 and r["mbs"] > 1
    np.testing.assert_allclose(r["hist"], _golden("dpo.json")["steps10"][:2], rtol=2e-5)
    assert "numpy" in r["sabotage"], r["sabotage"]


@pytest.mark.parametrize("loss_type", ["scaled_bt", "regression"])
def test_rm_step_reads_nothing_back(results, loss_type):
    r = results["rm"][loss_type]
    assert r["calls"] == 1 and r["mbs"] > 1
    np.testing.assert_allclose(r["loss"], r["want"], rtol=1e-5)
    if loss_type == "scaled_bt":  # the guarded evaluation pass (pair_rewards)
        np.testing.assert_allclose(r["rewards"], r["rewards_want"], rtol=1e-6, atol=1e-7)


def test_rm_sabotage_fires(results):
    assert "numpy" in results["rm"]["sabotage"], results["rm"]["sabotage"]


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_rlvr_step_reads_nothing_back(results, algo):
    r = results["rlvr"][algo]
    # policy + (critic) updates per mini-batch and epoch, and the forward-only prepasses
    assert r["calls"] >= (8 if algo == "ppo" else 4)
    gold = _golden("rlvr.json")[algo][0]
    np.testing.assert_allclose(r["row"], gold, rtol=1e-4, atol=1e-6)


def test_rlvr_sabotage_fires(results):
    assert "item" in results["rlvr"]["sabotage"], results["rlvr"]["sabotage"]


def test_policy_loss_without_host_facts_fires(results):
    """The packer's cu_seqlens_host is what keeps the policy-loss kernel from reading
    cu_seqlens back (the longest row for its grid, the token count): without it, it reads."""
    assert results["rlvr"]["policy_kernel"], "the guard must fire without cu_seqlens_host"
