"""The trainer loop with the SFT stage on gloo (one spawned group of 4 ranks):

- per-step losses and grad norms agree across layouts (TP1×DP4 with the plain and the
  distributed optimizer, TP2×DP2 with selective recompute, TP2×PP2, TP2×PP2+SP with full
  recompute, TP1×PP2×VP2×DP2 interleaved), packing with several micro-batches;
- step 1's loss equals the mean token NLL of the same global batch under `transformers`;
- exact resume: stop after step k, resume from the checkpoint, identical per-step losses
  (same layout; plain and distributed optimizer);
- a checkpoint whose write crashed is never picked up; resume takes the previous one;
- a checkpoint loads into another layout through its hf/ export (weights only);
- bf16 with fp32 master weights (TP2×DP2, distributed optimizer) tracks fp32 within 2%;
- a second group of 8 ranks: 10 steps of TP2×PP2×DP2 (with and without SP, and with the
  distributed optimizer) equal to TP1×DP8.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from nova_engine.parallel.spawn import run_distributed

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


def _setup(layout, model_dir, samples, steps=STEPS):
    from nova_engine.parallel.state import initialize_parallel
    from nova_engine.train.loop import StepBatcher
    from nova_engine.train.runner import build_trainer
    from nova_engine.train.sft import SFTStage

    tp, pp, vpp, sp, dopt, recompute = layout[:6]
    precision = layout[6] if len(layout) > 6 else "fp32"
    ps = initialize_parallel(tp=tp, pp=pp, vpp=vpp, sp=sp, seed=7)
    trainer, arch = build_trainer(
        model_dir, ps, optim=_optim(), total_steps=steps, distributed_optimizer=dopt,
        recompute=recompute, precision=precision,
    )  # fmt: skip
    batcher = StepBatcher(
        samples, global_batch_size=GBS, micro_batch_tokens=MBT, ps=ps, seed=3, max_steps=steps
    )
    return ps, trainer, arch, batcher, SFTStage(ps)


def _losses(hist):
    return [(h["loss"], h["grad_norm"]) for h in hist]


def _worker(rank, world, model_dir, samples, root):
    import os

    import torch.distributed as dist

    from nova_engine.parallel.state import destroy_parallel
    from nova_engine.train import checkpoint, checkpoint_io

    out: dict = {"layouts": {}, "resume": {}}
    n_mbs = []
    for layout in [*LAYOUTS, BF16]:
        ps, trainer, arch, batcher, stage = _setup(layout, model_dir, samples)
        n_mbs.append(len(batcher.rank_microbatches(0)))
        if layout not in RESUME:
            out["layouts"][layout] = _losses(trainer.fit(stage, batcher))
            destroy_parallel()
            continue
        # the uninterrupted run, with a checkpoint after step K and a crash while writing
        # the one after step K+1 (half a file, then the process "dies")
        ckpt_root = os.path.join(root, f"ckpt{RESUME.index(layout)}")
        hist = trainer.fit(stage, batcher, stop_after=K)
        checkpoint.save_checkpoint(ckpt_root, trainer, arch=arch, config_hash="h")
        hist += trainer.fit(stage, batcher, stop_after=K + 1)
        real = checkpoint._save_rank_file

        def crash(state, path):
            with open(path, "wb") as f:
                f.write(b"partial")
            raise RuntimeError("simulated crash")

        checkpoint._save_rank_file = crash
        try:
            checkpoint.save_checkpoint(ckpt_root, trainer, config_hash="h")
            crashed = "no crash"
        except RuntimeError as e:
            crashed = str(e)
        finally:
            checkpoint._save_rank_file = real
        dist.barrier()
        latest = checkpoint_io.latest_complete(ckpt_root)
        hist += trainer.fit(stage, batcher)
        out["layouts"][layout] = _losses(hist)
        destroy_parallel()

        ps, trainer, arch, batcher, stage = _setup(layout, model_dir, samples)
        step = checkpoint.load_checkpoint(latest, trainer)
        resumed = trainer.fit(stage, batcher)
        destroy_parallel()
        out["resume"][layout] = {
            "full": out["layouts"][layout],
            "resumed": _losses(resumed),
            "step": step,
            "crashed": crashed,
            "latest": os.path.basename(latest),
            "files": sorted(os.listdir(latest)),
        }
    out["n_mbs"] = n_mbs

    # weights of the TP2xPP2 checkpoint into TP1xDP4 (through hf/), then one forward-only eval
    from nova_engine.train.loop import StepBatcher

    ps, trainer, _, _, stage = _setup(LAYOUTS[0], model_dir, samples)
    latest = checkpoint_io.latest_complete(os.path.join(root, "ckpt0"))
    try:
        checkpoint.load_checkpoint(latest, trainer)
        out["layout_error"] = None
    except checkpoint_io.CheckpointIOError as e:
        out["layout_error"] = str(e)
    checkpoint.load_checkpoint(latest, trainer, weights_only=True)
    eval_batcher = StepBatcher(samples, global_batch_size=GBS, micro_batch_tokens=MBT, ps=ps)
    out["eval_after_load"] = trainer.evaluate(stage, [eval_batcher.rank_microbatches(0)])
    destroy_parallel()
    return out


def _worker8(rank, world, model_dir, samples):
    from nova_engine.parallel.state import destroy_parallel

    out = {}
    for layout in LAYOUTS8:
        ps, trainer, _, batcher, stage = _setup(layout, model_dir, samples, steps=STEPS8)
        out[layout] = _losses(trainer.fit(stage, batcher))
        destroy_parallel()
    return out


def _hf_step_loss(model_dir, batch):
    """Mean token NLL of `batch` (Samples) under transformers, formula from the Sample
    convention: loss_mask[i] = 1 means token i is predicted from tokens < i."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in batch:
            ids = torch.as_tensor(s.tokens).unsqueeze(0)
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            tgt = ids[0, 1:]
            mask = torch.as_tensor(s.loss_mask[1:]).bool()
            nll -= logp[torch.arange(len(tgt)), tgt][mask].sum().item()
            n += int(mask.sum())
    return nll / n


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from nova_engine.data.synthetic import write_task
    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.data.tokenize import load_samples
    from nova_engine.model.tiny import build_tiny_hf_model
    from nova_engine.train.loop import StepBatcher

    root = tmp_path_factory.mktemp("train_sft")
    tok = build_tiny_tokenizer(root / "tok")
    paths = write_task(root / "data", n_sft=GBS * STEPS8, n_pref=4, n_eval=4, seed=5)
    model_dir = str(root / "model")
    build_tiny_hf_model(
        model_dir, "llama", seed=0, vocab_size=512, hidden_size=64, intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    samples, _, _ = load_samples(paths["sft"], tok, "chat", max_length=64)
    ps1 = SimpleNamespace(tp=1, pp=1, dp=1, dp_rank=0, device=torch.device("cpu"))
    first = StepBatcher(samples, global_batch_size=GBS, micro_batch_tokens=MBT, ps=ps1, seed=3)
    hf_loss = _hf_step_loss(model_dir, first.step_samples(0))
    out = run_distributed(_worker, WORLD, model_dir, samples, str(root))
    out8 = run_distributed(_worker8, WORLD8, model_dir, samples)
    return out, hf_loss, out8


def test_step1_matches_transformers(results):
    out, hf_loss, _ = results
    for layout in LAYOUTS:  # fp32 ones
        losses = out[0]["layouts"][layout]
        assert math.isclose(losses[0][0], hf_loss, rel_tol=1e-5), (layout, losses[0][0], hf_loss)


def test_several_microbatches_per_step(results):
    # DP1 (TP2xPP2) packs 8 samples of ~20 tokens into >= 3 micro-batches of 64 tokens
    assert min(results[0][0]["n_mbs"]) >= 1 and max(results[0][0]["n_mbs"]) >= 3


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
    tp, pp = layout[0], layout[1]
    assert sum(f.startswith("mp_tp") for f in res["files"]) == tp * pp
    assert sum(f.startswith("rank_") for f in res["files"]) == WORLD


def test_load_into_other_layout(results):
    out = results[0][0]
    assert "same layout" in out["layout_error"]
    ev = out["eval_after_load"]
    # forward-only eval of step 0's batch with the step-3 weights from another layout:
    # lower than the initial loss, as training brought it
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
