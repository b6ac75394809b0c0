"""Weight sync trainer -> generator over the process group (nova_engine.model.weight_sync) and
layouts on a subset of the world (nova_engine.parallel.state.new_parallel_state(ranks=...)).

One spawned group of 3 gloo ranks runs four pairs of layouts, each a training engine on some
ranks and a generation engine on the others, built from the same tiny HF model:
    TP2 on [0,2) -> TP1 on [2]      llama (untied head), buckets of 256 MiB, 4096 B, 1000 B
    PP2 on [1,3) -> TP1 on [0]      qwen2 (tied embeddings, q/k/v bias), 4096 B buckets
    TP1 on [0]   -> TP2 on [1,3)    qwen2, 256 MiB, 4096 B
    TP1 on [2]   -> PP2 on [0,2)    llama with LoRA on the trainer (sent merged), 3000 B
The trainer's weights get seeded noise; the trainer exports HF (its own export path, on its
subset); the generator (stale: loaded from the original model) is synced, and then every one
of its parameters equals, bit for bit, a fresh engine at the generator's layout loaded from
the trainer's export, for every bucket size (a tensor spans many buckets at 4096 B); its
log-probs equal the fresh engine's exactly, and transformers' on the export within fp32
noise. The generator copies received bytes straight into its parameters (the direct path,
column slices at TP2 included, whole or spanning buckets); each case also syncs once through
the general path (each parameter loaded by the HF import's `_hf_value`), which must give the
same parameters bit for bit. A generator of another architecture is refused, on every rank, before any weight moves.
"""

from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

from nova_engine.config import LoRAConfig
from nova_engine.model.tiny import build_tiny_hf_model
from nova_engine.parallel.spawn import run_distributed

V = 1000
SEQ_LENS = (13, 9)
LORA = LoRAConfig(rank=4, alpha=8.0, targets=["qkv", "proj", "fc1", "fc2", "lm_head"])
# name, model, training (tp, pp, ranks), generation (tp, pp, ranks), bucket sizes (None:
# 256 MiB), the trainer's LoRA
CASES = [
    ("tp2_to_tp1", "llama", (2, 1, (0, 2)), (1, 1, (2, 3)), (None, 4096, 1000), None),
    ("pp2_to_tp1", "qwen2", (1, 2, (1, 3)), (1, 1, (0, 1)), (4096,), None),
    ("tp1_to_tp2", "qwen2", (1, 1, (0, 1)), (2, 1, (1, 3)), (None, 4096), None),
    ("tp1_to_pp2", "llama", (1, 1, (2, 3)), (1, 2, (0, 2)), (3000,), LORA),
]


def _perturb(chunks, ps) -> None:
    """Seeded noise on every parameter (TP shards differ per rank, replicated ones agree; a
    tied LM head on the last stage moves with the embeddings, as training keeps them)."""
    with torch.no_grad():
        for c in chunks:
            for name, p in c.named_parameters():
                if name == "output_layer.weight" and c.share_embeddings_and_output_weights:
                    name = "embedding.word_embeddings.weight"
                seed = zlib.crc32(name.encode())
                if getattr(p, "tensor_model_parallel", False):
                    seed += 7919 * ps.tp_rank
                g = torch.Generator().manual_seed(seed)
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))


def _params(engine) -> dict[str, torch.Tensor]:
    return {
        f"{i}/{n}": p.detach().clone()
        for i, c in enumerate(engine.chunks)
        for n, p in c.named_parameters()
    }


def _logps(engine, seqs) -> list[torch.Tensor]:
    from nova_engine.data.packing import PackedBatch
    from nova_engine.data.sample import Sample
    from nova_engine.model.heads import token_logprobs

    ps = engine.ps
    mbs = [PackedBatch.from_samples([Sample(s, [1] * len(s))], pad_to_length=16) for s in seqs]
    out = engine.forward_collect(mbs, lambda m, h, b: token_logprobs(m, h, b.labels, ps))
    return [lp[: len(s) - 1].clone() for lp, s in zip(out, seqs)] if ps.tp_rank == 0 else []


def _case(rank, case, model_dir, seqs, root):
    import torch.distributed as dist

    from nova_engine.model.weight_sync import WeightSync
    from nova_engine.parallel.state import new_parallel_state
    from nova_engine.train.engine import ModelEngine

    name, _, (ttp, tpp, tr), (gtp, gpp, gr), buckets, lora = case
    tps = new_parallel_state(tp=ttp, pp=tpp, ranks=range(*tr))
    gps = new_parallel_state(tp=gtp, pp=gpp, ranks=range(*gr))
    trainer = ModelEngine.from_hf(model_dir, tps, lora=lora) if tps else None
    gen = ModelEngine.from_hf(model_dir, gps, trainable=False, name="gen") if gps else None
    export = os.path.join(root, name)
    res: dict = {"role": "train" if tps else "gen"}
    if trainer is not None:
        _perturb(trainer.chunks, tps)
        trainer.export_hf(export)  # collective over the training ranks only
        res["logps"] = _logps(trainer, seqs)
    dist.barrier()
    if gen is None:
        for bucket in buckets:
            res[bucket] = WeightSync(trainer, None, bucket_bytes=bucket).sync()
        WeightSync(trainer, None, bucket_bytes=buckets[-1], direct=False).sync()
        return res
    fresh_engine = ModelEngine.from_hf(export, gps, trainable=False)
    fresh = _params(fresh_engine)
    res["fresh_logps"] = _logps(fresh_engine, seqs)
    for bucket in buckets:
        gen.load_hf(model_dir)  # stale again
        stale = _params(gen)
        ws = WeightSync(None, gen, bucket_bytes=bucket)
        stats = ws.sync()
        got = _params(gen)
        res[bucket] = {
            "stats": stats,
            "total_bytes": ws.total_bytes,
            "bucket_bytes": ws.bucket_bytes,
            "stage_bytes": [st.nbytes for st in ws.stages],
            "unequal": sorted(k for k in fresh if not torch.equal(got[k], fresh[k])),
            "stale_equal": sorted(k for k in fresh if torch.equal(stale[k], fresh[k])),
            "n_params": len(fresh),
        }
    direct = got  # the last bucket size's, by the direct path
    gen.load_hf(model_dir)
    WeightSync(None, gen, bucket_bytes=buckets[-1], direct=False).sync()
    general = _params(gen)  # the general path: each parameter through the HF import
    res["general_vs_direct"] = sorted(k for k in direct if not torch.equal(general[k], direct[k]))
    res["general_vs_fresh"] = sorted(k for k in fresh if not torch.equal(general[k], fresh[k]))
    res["logps"] = _logps(gen, seqs)
    return res


def _adapters(rank, model_dir, seqs):
    """LoRA adapters only (AdapterSync): trainer TP2 on [0,2), generator TP1 on [2], both LoRA
    over the same base; the trainer's adapters get seeded noise (the base stays), the sync
    moves them, and the generator's PEFT tensors equal the trainer's bit for bit; a generator
    with another LoRA rank is refused on every rank."""
    from nova_engine.model.lora import load_peft_tensors, peft_state_dict
    from nova_engine.model.weight_sync import AdapterSync, WeightSyncError
    from nova_engine.parallel.state import new_parallel_state
    from nova_engine.train.engine import ModelEngine

    tps = new_parallel_state(tp=2, ranks=range(0, 2))
    gps = new_parallel_state(tp=1, ranks=range(2, 3))
    trainer = ModelEngine.from_hf(model_dir, tps, lora=LORA) if tps else None
    gen = (
        ModelEngine.from_hf(model_dir, gps, trainable=False, lora=LORA, name="gen") if gps else None
    )
    res: dict = {}
    if trainer is not None:  # new adapters, as full PEFT matrices: each TP rank its slice
        full = peft_state_dict(trainer.chunks, trainer.arch, tps)
        g = torch.Generator().manual_seed(11)
        noisy = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in sorted(full.items())}
        for k in noisy:  # fused q/k/v and gate/up share one A (as the export writes them)
            for shared in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
                if "lora_A" in k and shared[0] in k:
                    for other in shared[1:]:
                        noisy[k.replace(shared[0], other)] = noisy[k]
        load_peft_tensors(trainer.chunks, trainer.arch, tps, noisy, "test")
        res["peft"] = peft_state_dict(trainer.chunks, trainer.arch, tps)
        res["logps"] = _logps(trainer, seqs)
    if gen is not None:
        res["stale"] = peft_state_dict(gen.chunks, gen.arch, gps)
    res["stats"] = AdapterSync(trainer, gen).sync()
    if gen is not None:
        res["peft"] = peft_state_dict(gen.chunks, gen.arch, gps)
        res["logps"] = _logps(gen, seqs)
    other = LoRAConfig(rank=2, alpha=8.0, targets=LORA.targets)
    bad = ModelEngine.from_hf(model_dir, gps, trainable=False, lora=other) if gps else None
    try:
        AdapterSync(trainer, bad)
        res["mismatch"] = None
    except WeightSyncError as e:
        res["mismatch"] = str(e)
    return res


def _worker(rank, world, dirs, seqs, root):
    import torch.distributed as dist

    from nova_engine.model.weight_sync import WeightSync, WeightSyncError
    from nova_engine.parallel.state import LayoutError, initialize_parallel, new_parallel_state
    from nova_engine.train.engine import ModelEngine

    initialize_parallel(tp=1, seed=1)
    out: dict = {"rank": rank}
    # the subset layouts: coordinates, groups, None outside; the whole-world default unchanged
    sub = new_parallel_state(tp=2, ranks=range(1, 3))
    out["sub"] = None if sub is None else (sub.tp_rank, sub.dp, sub.world_size, sub.first_rank)
    if sub is not None:
        out["sub_tp_group"] = dist.get_process_group_ranks(sub.tp_group)
    whole = new_parallel_state(tp=1)
    assert whole is not None
    out["whole"] = (whole.ranks, whole.layout_group, whole.world_size, whole.dp, whole.dp_rank)
    errors = {}
    for key, kw in {
        "divides": dict(tp=2, ranks=range(0, 3)),
        "contiguous": dict(tp=1, ranks=[0, 2]),
        "outside": dict(tp=1, ranks=range(2, 5)),
    }.items():
        try:
            new_parallel_state(**kw)
        except LayoutError as e:
            errors[key] = str(e)
    out["layout_errors"] = errors

    for case in CASES:
        out[case[0]] = _case(rank, case, dirs[case[1]], seqs, root)

    out["adapters"] = _adapters(rank, dirs["llama"], seqs)

    # a generator of another architecture: refused on every rank, nothing sent
    tps = new_parallel_state(tp=2, ranks=range(0, 2))
    gps = new_parallel_state(tp=1, ranks=range(2, 3))
    trainer = ModelEngine.from_hf(dirs["llama"], tps, trainable=False) if tps else None
    other = ModelEngine.from_hf(dirs["other"], gps, trainable=False) if gps else None
    try:
        WeightSync(trainer, other)
        out["mismatch"] = None
    except WeightSyncError as e:
        out["mismatch"] = str(e)
    return out


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("wsync")
    dirs = {
        "llama": str(root / "llama"),
        "qwen2": str(root / "qwen2"),
        "other": str(root / "other"),
    }
    build_tiny_hf_model(dirs["llama"], "llama", num_hidden_layers=2)
    build_tiny_hf_model(dirs["qwen2"], "qwen2", seed=1, num_hidden_layers=2)
    build_tiny_hf_model(dirs["other"], "llama", num_hidden_layers=2, intermediate_size=192)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, V, (n,), generator=g).tolist() for n in SEQ_LENS]
    results = run_distributed(_worker, 3, dirs, seqs, str(root))
    return dirs, seqs, results, root


@pytest.mark.slow
def test_subset_layouts(sync_run):
    *_, results, _ = sync_run
    assert results[0]["sub"] is None
    assert results[1]["sub"] == (0, 1, 2, 1) and results[2]["sub"] == (1, 1, 2, 1)
    assert results[1]["sub_tp_group"] == [1, 2] == results[2]["sub_tp_group"]
    for r in results:  # without ranks: the whole world, as before
        assert r["whole"] == (None, None, 3, 3, r["rank"])
        e = r["layout_errors"]
        assert "ranks=range(0, 3)" in e["divides"] and "tp*pp = 2*1" in e["divides"]
        assert "contiguous" in e["contiguous"] and "outside the world of 3" in e["outside"]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_generator_equals_trainer_export_bit_for_bit(sync_run, case):
    from safetensors import safe_open

    *_, results, root = sync_run
    name, _, _, (_, _, gr), buckets, _ = case
    # the HF bytes of the trainer's export: the stream carries them (+ <16 B alignment each)
    files = [f for f in os.listdir(os.path.join(root, name)) if f.endswith(".safetensors")]
    hf_bytes, n_tensors = 0, 0
    for f in files:
        with safe_open(os.path.join(root, name, f), "pt") as s:
            for k in s.keys():
                hf_bytes += s.get_tensor(k).nbytes
                n_tensors += 1
    gens = [r[name] for r in results if r[name]["role"] == "gen"]
    assert len(gens) == gr[1] - gr[0]
    for bucket in buckets:
        for g in gens:
            got = g[bucket]
            assert got["n_params"] > 0 and got["unequal"] == [], (bucket, got["unequal"][:3])
            # the stale generator differed from the export everywhere: the sync moved them
            assert got["stale_equal"] == [], (bucket, got["stale_equal"][:3])
            total = got["total_bytes"]
            assert hf_bytes <= total < hf_bytes + 16 * n_tensors
            assert got["stats"]["weight_sync_gb"] == total / 1e9
            want = sum(math.ceil(b / got["bucket_bytes"]) for b in got["stage_bytes"])
            assert got["stats"]["weight_sync_buckets"] == want
            assert got["stats"]["weight_sync_s"] > 0
            if bucket is not None:
                assert want > 100  # embeddings (384 kB) span many buckets
    for g in gens:  # the direct copies equal the general path (each parameter via _hf_value)
        assert g["general_vs_direct"] == [] and g["general_vs_fresh"] == []
        senders = [r[name][bucket] for r in results if r[name]["role"] == "train"]
        assert sum(s.get("weight_sync_buckets", 0) for s in senders) == want


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_generator_logprobs(sync_run, case):
    from transformers import AutoModelForCausalLM

    _, seqs, results, root = sync_run
    name = case[0]
    gen = [r[name] for r in results if r[name]["role"] == "gen" and r[name]["logps"]]
    train = [r[name] for r in results if r[name]["role"] == "train" and r[name]["logps"]]
    assert len(gen) == 1 and len(train) == 1
    got, fresh = gen[0]["logps"], gen[0]["fresh_logps"]
    assert all(torch.equal(a, b) for a, b in zip(got, fresh))
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(root, name), dtype=torch.float32)
    for s, a, t in zip(seqs, got, train[0]["logps"]):
        ids = torch.tensor([s])
        with torch.no_grad():
            logits = hf(ids).logits[0, :-1].double()
        ref = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
        assert torch.allclose(a.double(), ref, atol=2e-5), (a.double() - ref).abs().max()
        assert torch.allclose(a, t, atol=2e-5)  # and the trainer's own, at its layout


@pytest.mark.slow
def test_mismatched_architecture_is_refused_everywhere(sync_run):
    *_, results, _ = sync_run
    msgs = {r["mismatch"] for r in results}
    assert len(msgs) == 1, msgs  # the same verdict on every rank (no hang, nothing sent)
    (msg,) = msgs
    assert msg is not None and "generation model on rank 2" in msg
    assert "intermediate_size: 192 vs 160" in msg or "intermediate_size: 160 vs 192" in msg


@pytest.mark.slow
def test_adapter_sync_moves_only_the_adapters_bit_for_bit(sync_run):
    *_, results, _ = sync_run
    train, gen = results[0]["adapters"], results[2]["adapters"]
    assert set(gen["peft"]) == set(train["peft"]) and train["peft"]
    assert all(torch.equal(gen["peft"][k], train["peft"][k]) for k in train["peft"])
    assert not all(torch.equal(gen["stale"][k], train["peft"][k]) for k in train["peft"])
    for a, b in zip(gen["logps"], train["logps"]):  # TP1 vs TP2 forward: fp32 rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
    nbytes = sum(t.numel() * 4 for t in train["peft"].values())
    assert gen["stats"]["weight_sync_gb"] * 1e9 == nbytes
    full = results[2]["tp2_to_tp1"][4096]["total_bytes"]
    assert nbytes < full / 5  # the adapters, not the model
    for r in results:
        assert "model.lora.rank: 4 vs 2" in r["adapters"]["mismatch"]
