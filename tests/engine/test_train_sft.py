"""The trainer loop with the SFT stage on gloo (one spawned group of 4 ranks):

- per-step losses and grad norms agree across layouts (TP1×DP4 with the plain and the
  distributed optimizer, TP2×DP2 with selective recompute, TP2×PP2, TP2×PP2+SP with full
  recompute, TP1×PP2×VP2×DP2 interleaved), packing with several micro-batches;
- step 1's loss equals the mean token NLL of the same global batch under `transformers`;
- exact resume: stop after step k, resume from the checkpoint, identical per-step losses
  (same layout; plain and distributed optimizer);
- a checkpoint whose write crashed is never picked up; resume takes the previous one;
- a checkpoint loads into another layout through its hf/ export (weights only): evaluated
  there on the next step's batch, it gives the loss the saving layout trained on;
- bf16 with fp32 master weights (TP2×DP2, distributed optimizer) tracks fp32 within 2%;
- a second group of 8 ranks: 10 steps of TP2×PP2×DP2 (with and without SP, and with the
  distributed optimizer) equal to TP1×DP8;
- every fp32 layout of both groups equals the golden per-step losses (tests/engine/golden,
  one process) within 2e-5, so a change that shifts every layout alike is caught;
- engines (nova_engine.train.engine): two engines of different layouts in one world (TP2xDP2
  from megatron's groups, TP1xPP2xDP2 from groups of its own), stepping in turn, each equal
  to the golden single-rank run; a frozen engine has no DDP wrapper, no grad buffers and no
  trainable parameters, and its forward_collect log-probs give the training forward's step-1
  loss; `generate` on its shards gives tokens whose log-probs equal the forward's; a step
  with fewer sequences than DP ranks (empty ranks get a padding batch) equals the
  transformers loss of those sequences; a 2-output score head gives the same scores and
  gradient norm at TP1xDP4 and TP2xDP2 with sequence parallelism.
"""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from nova_engine.parallel.spawn import run_distributed

pytestmark = pytest.mark.slow  # spawned groups of 4 and 8 ranks, whole training runs

WORLD = 4
STEPS = 6
GBS = 8
MBT = 64  # tokens per micro-batch: a step's 8 samples (~20 tokens each) need several
K = 3  # resume point
# (tp, pp, vpp, sp, distributed_optimizer, recompute)
LAYOUTS = [
    (1, 1, None, False, False, "none"),
    (1, 1, None, False, True, "none"),
    (2, 1, None, False, False, "selective"),
    (2, 2, None, False, False, "none"),
    (2, 2, None, True, False, "full"),
    (1, 2, 2, False, False, "none"),
]
RESUME = [LAYOUTS[3], LAYOUTS[1]]
BF16 = (2, 1, None, False, True, "none", "bf16")  # bf16 weights, fp32 masters, ZeRO-1


WORLD8 = 8
STEPS8 = 10
# TP1xDP8 is the reference of the 8-rank group
LAYOUTS8 = [
    (1, 1, None, False, False, "none"),
    (2, 2, None, False, False, "none"),
    (2, 2, None, True, True, "none"),
]


def _optim():
    from nova_engine.config import OptimConfig

    return OptimConfig(lr=2e-3, weight_decay=0.01, grad_clip=1.0, schedule="cosine", warmup_steps=1)


GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "sft.json")
EMPTY_RANK_SEQS = 2  # < DP=4: two ranks get no sequence


def _setup(layout, model_dir, samples, steps=STEPS, ps=None):
    from nova_engine.parallel.state import initialize_parallel
    from nova_engine.train.data_source import PackedDataSource
    from nova_engine.train.engine import ModelEngine
    from nova_engine.train.loop import Loop
    from nova_engine.train.stages.sft import SFTStage

    tp, pp, vpp, sp, dopt, recompute = layout[:6]
    precision = layout[6] if len(layout) > 6 else "fp32"
    ps = ps or initialize_parallel(tp=tp, pp=pp, vpp=vpp, sp=sp, seed=7)
    engine = ModelEngine.from_hf(
        model_dir,
        ps,
        optim=_optim(),
        total_steps=steps,
        distributed_optimizer=dopt,
        recompute=recompute,
        precision=precision,
    )
    data = PackedDataSource(
        samples, global_batch_size=GBS, micro_batch_tokens=MBT, ps=ps, seed=3, max_steps=steps
    )
    return ps, Loop(engine, data), data, SFTStage(ps)


def _losses(hist):
    return [(h["loss"], h["grad_norm"]) for h in hist]


def _worker(rank, world, model_dir, samples, root):
    import torch.distributed as dist

    from nova_engine.parallel.state import destroy_parallel
    from nova_engine.train import checkpoint, checkpoint_io

    out: dict = {"layouts": {}, "resume": {}}
    n_mbs = {}
    for layout in [*LAYOUTS, BF16]:
        ps, loop, data, stage = _setup(layout, model_dir, samples)
        mbs = data.rank_microbatches(0)
        # (DP size, real tokens and padded length of each of this rank's micro-batches)
        n_mbs[layout] = (
            ps.dp,
            [int((mb.seq_index >= 0).sum()) for mb in mbs],
            [mb.num_tokens for mb in mbs],
        )
        if layout not in RESUME:
            out["layouts"][layout] = _losses(loop.fit(stage))
            destroy_parallel()
            continue
        # the uninterrupted run, with a checkpoint after step K and a crash while writing
        # the one after step K+1 (half a file, then the process "dies")
        ckpt_root = os.path.join(root, f"ckpt{RESUME.index(layout)}")
        hist = loop.fit(stage, stop_after=K)
        checkpoint.save_checkpoint(ckpt_root, loop, hf=True, config_hash="h")
        hist += loop.fit(stage, stop_after=K + 1)
        real = checkpoint._save_rank_file

        def crash(state, path):
            with open(path, "wb") as f:
                f.write(b"partial")
            raise RuntimeError("simulated crash")

        checkpoint._save_rank_file = crash
        try:
            checkpoint.save_checkpoint(ckpt_root, loop, config_hash="h")
            crashed = "no crash"
        except RuntimeError as e:
            crashed = str(e)
        finally:
            checkpoint._save_rank_file = real
        dist.barrier()
        latest = checkpoint_io.latest_complete(ckpt_root)
        hist += loop.fit(stage)
        out["layouts"][layout] = _losses(hist)
        destroy_parallel()

        ps, loop, data, stage = _setup(layout, model_dir, samples)
        step = checkpoint.load_checkpoint(latest, loop)
        resumed = loop.fit(stage)
        destroy_parallel()
        out["resume"][layout] = {
            "full": out["layouts"][layout],
            "resumed": _losses(resumed),
            "step": step,
            "data_position": data.position,
            "crashed": crashed,
            "latest": os.path.basename(latest),
            "files": sorted(os.listdir(latest)),
        }
    out["n_mbs"] = n_mbs

    # weights of the TP2xPP2 checkpoint (step K) into TP1xDP4 (through hf/), then one
    # forward-only eval of step K+1's batch: the loss TP2xPP2 trained on at step K+1
    from nova_engine.train.data_source import PackedDataSource

    ps, loop, _, stage = _setup(LAYOUTS[0], model_dir, samples)
    latest = checkpoint_io.latest_complete(os.path.join(root, "ckpt0"))
    try:
        checkpoint.load_checkpoint(latest, loop)
        out["layout_error"] = None
    except checkpoint_io.CheckpointIOError as e:
        out["layout_error"] = str(e)
    checkpoint.load_checkpoint(latest, loop, weights_only=True)
    ev = PackedDataSource(samples, global_batch_size=GBS, micro_batch_tokens=MBT, ps=ps, seed=3)
    out["eval_after_load"] = loop.evaluate(stage, [ev.rank_microbatches(K)])
    destroy_parallel()
    out["engines"] = _engines(model_dir, samples)
    return out


def _engines(model_dir, samples):
    """Two engines of different layouts in one world; a frozen engine; an empty-rank step."""
    from nova_engine.model.heads import token_logprobs
    from nova_engine.parallel.state import destroy_parallel, initialize_parallel
    from nova_engine.parallel.state import new_parallel_state as new_ps
    from nova_engine.train.data_source import PackedDataSource
    from nova_engine.train.engine import ModelEngine

    res: dict = {}
    ps_a = initialize_parallel(tp=2, seed=7)  # megatron's groups
    ps_b = new_ps(tp=1, pp=2)  # groups of its own, same world
    _, loop_a, data_a, stage_a = _setup(LAYOUTS[0], model_dir, samples, ps=ps_a)
    _, loop_b, data_b, stage_b = _setup(LAYOUTS[0], model_dir, samples, ps=ps_b)
    hist_a, hist_b = [], []
    for _ in range(STEPS):  # in turn: both alive, each its own collectives
        hist_a.append(loop_a.train_step(stage_a, data_a.next_batch()).metrics)
        hist_b.append(loop_b.train_step(stage_b, data_b.next_batch()).metrics)
    res["two"] = {"a": _losses(hist_a), "b": _losses(hist_b)}

    # a frozen engine on the second layout: no DDP, no grad buffer, nothing trainable
    frozen = ModelEngine.from_hf(model_dir, ps_b, trainable=False, name="reference")
    params = [p for c in frozen.chunks for p in c.parameters()]
    res["frozen"] = {
        "ddp": any(hasattr(m, "zero_grad_buffer") for m in frozen.models),
        "main_grad": any(hasattr(p, "main_grad") for p in params),
        "requires_grad": any(p.requires_grad for p in params),
        "optimizer": frozen.optimizer is not None,
    }
    # forward_collect: per-token log-probs -> the step-1 SFT loss of the training forward
    mbs = PackedDataSource(
        samples, global_batch_size=GBS, micro_batch_tokens=MBT, ps=ps_b, seed=3
    ).rank_microbatches(0)
    rows = frozen.forward_collect(
        mbs,
        lambda m, h, mb: torch.stack(
            [
                -(token_logprobs(m, h, mb.labels, ps_b).double() * (mb.loss_mask != 0)).sum(),
                (mb.loss_mask != 0).sum().double(),
            ]
        ),
    )
    t = sum(rows) if rows and ps_b.tp_rank == 0 else torch.zeros(2, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    res["collect_loss"] = float(t[0] / t[1])

    # generate on the frozen engine's shards (PP2): greedy tokens whose log-probs are the
    # forward's (forward_collect of prompt + generated tokens)
    from nova_engine.data.packing import PackedBatch
    from nova_engine.data.sample import Sample
    from nova_engine.generate import SamplingParams

    prompt = [int(x) for x in samples[0].tokens[:9]]
    gen = frozen.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=5))[0][0]
    full = Sample(prompt + gen.tokens, [0] * len(prompt) + [1] * len(gen.tokens))
    mb = PackedBatch.from_samples([full], pad_to_length=MBT).to(ps_b.device)
    got = frozen.forward_collect(
        [mb], lambda m, h, b: (token_logprobs(m, h, b.labels, ps_b) * (b.loss_mask != 0)).sum()
    )
    lp = torch.tensor([float(got[0]) if got else 0.0], dtype=torch.float64)
    torch.distributed.all_reduce(lp, group=ps_b.pp_group)  # the last stage has it
    res["generate"] = {"n": len(gen.tokens), "gen_logp": sum(gen.logprobs), "fwd_logp": float(lp)}
    del frozen

    # fewer sequences than DP ranks: ranks 2, 3 get an all-padding micro-batch
    destroy_parallel()
    ps = initialize_parallel(tp=1, seed=7)
    _, loop, _, stage = _setup(LAYOUTS[0], model_dir, samples, ps=ps)
    few = PackedDataSource(
        samples[:EMPTY_RANK_SEQS],
        global_batch_size=EMPTY_RANK_SEQS,
        micro_batch_tokens=MBT,
        ps=ps,
        shuffle=False,
    )
    res["empty_rank"] = {
        "real_tokens": int((few.rank_microbatches(0)[0].seq_index >= 0).sum()),
        "metrics": loop.train_step(stage, few.next_batch()).metrics,
    }

    # a 2-output score head at TP1xDP4 and at TP2xDP2 with sequence parallelism: the same
    # scores and the same gradients (through the head into the decoder)
    from nova_engine.model.heads import sequence_scores
    from nova_engine.train.loop import Loop

    res["score"] = {}
    for key, hps in (("tp1", ps), ("tp2_sp", new_ps(tp=2, sp=True))):
        eng = ModelEngine.from_hf(model_dir, hps, optim=_optim(), score_outputs=2, name="rm")
        mbs = PackedDataSource(
            samples, global_batch_size=GBS, micro_batch_tokens=MBT, ps=hps, shuffle=False
        ).rank_microbatches(0)

        def loss_fn(m, h, mb, hps=hps):
            s = sequence_scores(m, h, mb, hps)  # [S, 2]
            loss = (s[:, 0] - 0.5 * s[:, 1]).sum() / GBS
            return loss, torch.tensor(s.shape[0]), {"loss": loss.detach()}

        results = eng.forward_backward(mbs, loss_fn)
        _, grad_norm, _ = eng.step()
        res["score"][key] = (Loop.reduce_metrics(eng, ["loss"], results)["loss"], grad_norm)
    destroy_parallel()
    return res


def _worker8(rank, world, model_dir, samples):
    from nova_engine.parallel.state import destroy_parallel

    out = {}
    for layout in LAYOUTS8:
        ps, loop, _, stage = _setup(layout, model_dir, samples, steps=STEPS8)
        out[layout] = _losses(loop.fit(stage))
        destroy_parallel()
    return out


def _hf_step_loss(model_dir, batch):
    """Mean token NLL of `batch` (Samples) under transformers, formula from the Sample
    convention: loss_mask[i] = 1 means token i is predicted from tokens < i."""
    from transformers import AutoModelForCausalLM

    from nova_kernels.reference import causal_lm_logps

    model = AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    sums, counts = zip(*(causal_lm_logps(model, s.tokens, s.loss_mask) for s in batch))
    return -sum(sums) / sum(counts)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from nova_engine.data.synthetic import write_task
    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.data.tokenize import load_samples
    from nova_engine.model.tiny import build_tiny_hf_model
    from nova_engine.train.data_source import PackedDataSource

    root = tmp_path_factory.mktemp("train_sft")
    tok = build_tiny_tokenizer(root / "tok")
    paths = write_task(root / "data", n_sft=GBS * STEPS8, n_pref=4, n_eval=4, seed=5)
    model_dir = str(root / "model")
    build_tiny_hf_model(
        model_dir,
        "llama",
        seed=0,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    samples, _, _ = load_samples(paths["sft"], tok, "chat", max_length=64)
    ps1 = SimpleNamespace(tp=1, pp=1, dp=1, dp_rank=0, device=torch.device("cpu"))
    first = PackedDataSource(samples, global_batch_size=GBS, micro_batch_tokens=MBT, ps=ps1, seed=3)
    hf_loss = _hf_step_loss(model_dir, first.step_samples(0))
    hf_few = _hf_step_loss(model_dir, samples[:EMPTY_RANK_SEQS])
    step0_tokens = sum(len(s) for s in first.step_samples(0))
    out = run_distributed(_worker, WORLD, model_dir, samples, str(root))
    out8 = run_distributed(_worker8, WORLD8, model_dir, samples)
    return out, hf_loss, out8, hf_few, step0_tokens


def test_step1_matches_transformers(results):
    out, hf_loss = results[0], results[1]
    for layout in LAYOUTS:  # fp32 ones
        losses = out[0]["layouts"][layout]
        assert math.isclose(losses[0][0], hf_loss, rel_tol=1e-5), (layout, losses[0][0], hf_loss)


def test_several_microbatches_per_step(results):
    """Every layout packs its share of step 1 into micro-batches of at most MBT tokens; at DP1
    (TP2xPP2) that share is the whole batch, 8 samples of ~20 tokens: >= 3 micro-batches
    holding every token of the batch once."""
    step0_tokens, dp1 = results[4], 0
    for layout, (dp, real, padded) in results[0][0]["n_mbs"].items():
        assert all(0 < r <= n <= MBT for r, n in zip(real, padded)), (layout, real, padded)
        if dp == 1:
            dp1 += 1
            assert sum(real) == step0_tokens and len(real) >= 3, (layout, real, step0_tokens)
    assert dp1 == 2  # TP2xPP2 with and without SP


def test_bf16_tracks_fp32(results):
    # bf16 activations/weights (fp32 master weights and grads): within bf16 rounding of fp32
    out = results[0][0]["layouts"]
    ref = torch.tensor(out[LAYOUTS[0]], dtype=torch.float64)[:, 0]
    got = torch.tensor(out[BF16], dtype=torch.float64)[:, 0]
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=0)
    assert got[-1] < got[0]


@pytest.mark.parametrize("layout", LAYOUTS[1:], ids=str)
def test_losses_equal_across_layouts(results, layout):
    out = results[0][0]["layouts"]
    ref = torch.tensor(out[LAYOUTS[0]], dtype=torch.float64)
    got = torch.tensor(out[layout], dtype=torch.float64)
    assert got.shape == (STEPS, 2)
    assert ref[-1, 0] < ref[0, 0], "the loss goes down"
    torch.testing.assert_close(got[:, 0], ref[:, 0], rtol=1e-5, atol=0)  # losses
    torch.testing.assert_close(got[:, 1], ref[:, 1], rtol=1e-4, atol=0)  # grad norms


def test_same_on_every_rank(results):
    out = results[0]
    for r in out[1:]:
        assert r["layouts"] == out[0]["layouts"]


@pytest.mark.parametrize("layout", RESUME, ids=str)
def test_exact_resume_after_crash(results, layout):
    res = results[0][0]["resume"][layout]
    assert res["crashed"] == "simulated crash"
    assert res["latest"] == f"step_{K:08d}", "the crashed step-4 write is not complete"
    assert res["step"] == K
    assert len(res["full"]) == STEPS and len(res["resumed"]) == STEPS - K
    assert res["resumed"] == res["full"][K:], "resumed losses are bit-identical"
    # model weights once per (TP, PP) shard, not once per DP replica; one small file per rank
    assert res["data_position"] == STEPS, "the data source resumed at the saved position"
    tp, pp = layout[0], layout[1]
    assert sum(f.startswith("mp_policy_tp") for f in res["files"]) == tp * pp
    assert sum(f.startswith("rank_") for f in res["files"]) == WORLD


def test_load_into_other_layout(results):
    out = results[0][0]
    assert "same layout" in out["layout_error"]
    ev = out["eval_after_load"]
    # TP2xPP2's step-K weights evaluated at TP1xDP4 on step K+1's batch: the loss the saving
    # layout computed for that batch with those weights (and the TP1xDP4 run's own)
    saved_layout_loss = out["layouts"][LAYOUTS[3]][K][0]
    assert math.isclose(ev["loss"], saved_layout_loss, rel_tol=1e-5), (ev, saved_layout_loss)
    assert math.isclose(ev["loss"], out["layouts"][LAYOUTS[0]][K][0], rel_tol=1e-5)
    assert ev["loss"] < out["layouts"][LAYOUTS[0]][0][0]


@pytest.mark.parametrize("layout", LAYOUTS8[1:], ids=str)
def test_tp2_pp2_dp2_equals_tp1(results, layout):
    out8 = results[2][0]
    ref = torch.tensor(out8[LAYOUTS8[0]], dtype=torch.float64)
    got = torch.tensor(out8[layout], dtype=torch.float64)
    assert got.shape == (STEPS8, 2)
    assert ref[-1, 0] < ref[0, 0], "the loss goes down"
    torch.testing.assert_close(got[:, 0], ref[:, 0], rtol=1e-5, atol=0)
    torch.testing.assert_close(got[:, 1], ref[:, 1], rtol=1e-4, atol=0)
    # step 1 (initial weights, same first batch) is the transformers loss
    assert math.isclose(float(got[0, 0]), results[1], rel_tol=1e-5)


def _golden(run):
    with open(GOLDEN) as f:
        gold = json.load(f)
    c = gold["config"]
    # the golden file was made with this file's settings (regenerate it if they change)
    assert (c["global_batch_size"], c["micro_batch_tokens"], c["batch_seed"]) == (GBS, MBT, 3)
    assert c["runs"] == [STEPS, STEPS8] and (c["lr"], c["schedule"]) == (2e-3, "cosine")
    return torch.tensor(gold[run], dtype=torch.float64)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_golden_losses(results, layout):
    got = torch.tensor(results[0][0]["layouts"][layout], dtype=torch.float64)
    torch.testing.assert_close(got[:, 0], _golden(f"steps{STEPS}")[:, 0], rtol=2e-5, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS8, ids=str)
def test_golden_losses_8_ranks(results, layout):
    got = torch.tensor(results[2][0][layout], dtype=torch.float64)
    torch.testing.assert_close(got[:, 0], _golden(f"steps{STEPS8}")[:, 0], rtol=2e-5, atol=0)


def test_two_engines_of_different_layouts_in_one_world(results):
    two = results[0][0]["engines"]["two"]
    gold = _golden(f"steps{STEPS}")
    for name in ("a", "b"):
        got = torch.tensor(two[name], dtype=torch.float64)
        torch.testing.assert_close(got[:, 0], gold[:, 0], rtol=2e-5, atol=0)
        torch.testing.assert_close(got[:, 1], gold[:, 1], rtol=1e-4, atol=0)


def test_frozen_engine_and_forward_collect(results):
    eng = results[0][0]["engines"]
    assert eng["frozen"] == {
        "ddp": False,
        "main_grad": False,
        "requires_grad": False,
        "optimizer": False,
    }
    # forward only, frozen, other layout: the training forward's step-1 loss
    step1 = results[0][0]["layouts"][LAYOUTS[0]][0][0]
    assert math.isclose(eng["collect_loss"], step1, rel_tol=1e-5)
    assert math.isclose(eng["collect_loss"], results[1], rel_tol=1e-5)


def test_step_with_fewer_sequences_than_dp_ranks(results):
    res = [r["engines"]["empty_rank"] for r in results[0]]
    assert [r["real_tokens"] > 0 for r in res] == [True, True, False, False]
    m = res[0]["metrics"]
    assert math.isclose(m["loss"], results[3], rel_tol=1e-5)  # the 2 sequences' NLL
    assert math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0


def test_generate_on_engine_shards_matches_the_forward(results):
    g = results[0][0]["engines"]["generate"]
    assert g["n"] == 5
    assert math.isclose(g["gen_logp"], g["fwd_logp"], rel_tol=1e-4, abs_tol=1e-4)


def test_score_head_under_sequence_parallelism(results):
    s = results[0][0]["engines"]["score"]
    (l1, g1), (l2, g2) = s["tp1"], s["tp2_sp"]
    assert l1 != 0 and g1 > 0
    assert math.isclose(l1, l2, rel_tol=1e-5, abs_tol=1e-7)
    assert math.isclose(g1, g2, rel_tol=1e-5)
