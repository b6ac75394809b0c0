"""LoRA on the megatron shards (nova_engine.model.lora, `model.lora`).

One spawned group of 2 gloo ranks runs four layouts of a tiny Llama: TP1 (DP2), TP2, TP2+SP,
PP2 (adapters live on the stage that owns the layer).
At every layout: a LoRA engine with B = 0 gives the base model's log-probs exactly; with
random B (TP-invariant, set in HF layout) its log-probs and the adapters' gradients (PEFT
layout, gathered) are compared across layouts; adapters-off equals a frozen base copy
exactly. At TP1: each target linear equals W x + (alpha/r) B A x against a float64
reference, forward and backward (input, A, B); only adapter params get grad buffers and
optimizer state, and a step moves only them. At TP2+SP: the merged HF export and the PEFT
adapter are written; transformers (merged) and peft (base + adapter) reproduce Nova's
log-probs, merged == base + (alpha/r) B A per tensor, and the adapter re-imported at TP2+SP
gives the same log-probs exactly; the PP2 layout runs on that imported adapter (so its
TP1 comparison checks the import too). A reward model's score head trains in full.
The LM head is a target too (W + (alpha/r) B A read by the fused log-prob kernel): its
log-probs and the grads of h, A, B against float64 at TP1 and TP2. The TP2+SP shards
written as a format-torch checkpoint give, offline (nova_engine.tools.lora_export), the
live PEFT tensors exactly and the live merged weights.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

from nova_engine.config import ConfigError, LoRAConfig
from nova_engine.model.tiny import build_tiny_hf_model
from nova_engine.parallel.spawn import run_distributed

V, L_SEQ = 1000, 13
LAYOUTS = [(1, 1, False), (2, 1, False), (2, 1, True), (1, 2, False)]  # (tp, pp, sp)
TP1 = LAYOUTS[0]
CFG = LoRAConfig(rank=4, alpha=8.0, targets=["qkv", "proj", "fc1", "fc2", "lm_head"])


def test_config_validation():
    with pytest.raises(ConfigError, match="targets: expected a non-empty list"):
        LoRAConfig(targets=["embed"])
    with pytest.raises(ConfigError, match="rank: expected an integer >= 1"):
        LoRAConfig(rank=0)
    with pytest.raises(ConfigError, match="dropout"):
        LoRAConfig(dropout=1.0)
    from nova_engine.recipe import build_run_config

    run = build_run_config(
        "sft", {"model": {"hf_path": "/m", "lora": {"rank": 8, "targets": ["fc2"]}}}
    )
    assert run.model.lora == LoRAConfig(rank=8, targets=["fc2"])
    assert build_run_config("sft", {"model": {"hf_path": "/m"}}).model.lora is None
    with pytest.raises(ConfigError, match=r"model\.lora\.rank: expected an integer >= 1"):
        build_run_config("sft", {"model": {"hf_path": "/m", "lora": {"rank": 0}}})


def _set_random_b(chunks, arch, ps):
    """B from a generator per (layer, module) in HF layout, sliced to this rank's shard."""
    from nova_engine.model.lora import _targets

    tp, t = ps.tp, ps.tp_rank
    with torch.no_grad():
        for c in chunks:
            for i, name, mod in _targets(c, CFG.targets):
                ad = mod.lora
                g = torch.Generator().manual_seed(zlib.crc32(f"{i}.{name}".encode()))
                out_local, r = ad.B.shape
                if ad.row:
                    full = torch.randn(out_local, r, generator=g) * 0.1
                    ad.B.copy_(full)
                elif name == "output_layer":  # vocab rows split over TP
                    full = torch.randn(V, r, generator=g) * 0.1
                    ad.B.copy_(full[t * out_local : (t + 1) * out_local])
                elif name == "linear_fc1":
                    f = arch.intermediate_size
                    gate, up = (torch.randn(f, r, generator=g) * 0.1 for _ in range(2))
                    rows = slice(t * f // tp, (t + 1) * f // tp)
                    ad.B.copy_(torch.cat([gate[rows], up[rows]]))
                else:  # qkv: megatron's grouped layout is contiguous per TP rank
                    full = torch.randn(out_local * tp, r, generator=g) * 0.1
                    ad.B.copy_(full[t * out_local : (t + 1) * out_local])


def _layer_reference(chunk):
    """Each target linear of layer 0 vs W x + s B A x in float64, fwd + bwd (TP1)."""
    from nova_engine.model.lora import _targets

    errs = {}
    g = torch.Generator().manual_seed(3)
    for _, name, mod in _targets(chunk, CFG.targets):
        if name in errs or name == "output_layer":  # the head: _head_reference
            continue
        ad = mod.lora
        ad.A.requires_grad_(True)
        ad.B.requires_grad_(True)
        x = torch.randn(7, 3, mod.weight.shape[1], generator=g, requires_grad=True)
        out, _ = mod(x)
        up = torch.randn(out.shape, generator=g)
        (out * up).sum().backward()
        w = mod.weight.detach().double()
        xr = x.detach().double().requires_grad_(True)
        a = ad.A.detach().double().requires_grad_(True)
        b = ad.B.detach().double().requires_grad_(True)
        ref = xr @ w.t() + (CFG.alpha / CFG.rank) * (xr @ a.t()) @ b.t()
        (ref * up.double()).sum().backward()
        errs[name] = max(
            (out.double() - ref).abs().max().item(),
            (x.grad.double() - xr.grad).abs().max().item(),
            (ad.A.grad.double() - a.grad).abs().max().item(),
            (ad.B.grad.double() - b.grad).abs().max().item(),
        )
        ad.A.grad = ad.B.grad = None
        ad.A.requires_grad_(False)
        ad.B.requires_grad_(False)
    return errs


def _head_reference(chunk, ps):
    """The LM head's adapter (W + s B A read by the fused log-prob kernel) vs a float64
    log_softmax(h (W + s B A)^T) on the full vocab: log-probs and grads of h, A, B (W and B
    gathered over TP; A's grad must be the full one on every rank)."""
    import torch.distributed as dist

    from nova_engine.model.heads import token_logprobs

    ad = chunk.output_layer.lora
    g = torch.Generator().manual_seed(11)
    n, hid = 37, chunk.output_layer.weight.shape[1]
    h = torch.randn(n, 1, hid, generator=g).requires_grad_(True)
    labels = torch.randint(0, V, (n,), generator=g)
    up = torch.randn(n, generator=g)
    ad.A.requires_grad_(True)
    ad.B.requires_grad_(True)
    lp = token_logprobs(chunk, h, labels, ps)
    (lp * up).sum().backward()

    def full(t):
        if ps.tp == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(ps.tp)]
        dist.all_gather(parts, t.contiguous(), group=ps.tp_group)
        return torch.cat(parts)

    w = full(chunk.output_layer.weight.detach()).double()
    a = ad.A.detach().double().requires_grad_(True)
    b = full(ad.B.detach()).double().requires_grad_(True)
    hr = h.detach().double().requires_grad_(True)
    logits = hr[:, 0] @ (w + (CFG.alpha / CFG.rank) * b @ a).t()
    ref = torch.log_softmax(logits, -1).gather(-1, labels[:, None])[:, 0]
    (ref * up.double()).sum().backward()
    errs = {
        "logp": (lp.double() - ref).abs().max().item(),
        "dh": (h.grad.double() - hr.grad).abs().max().item(),
        "dA": (ad.A.grad.double() - a.grad).abs().max().item(),
        "dB": (full(ad.B.grad).double() - b.grad).abs().max().item(),
        "scale": min(a.grad.abs().max().item(), b.grad.abs().max().item()),
    }
    ad.A.grad = ad.B.grad = None
    ad.A.requires_grad_(False)
    ad.B.requires_grad_(False)
    return errs


def _write_shard_checkpoint(eng, ps, model_dir, path):
    """This layout's shards as a format-torch checkpoint (mp_policy_tpXX_pp00.pt + a manifest
    with the run config), what nova_engine.tools.lora_export reads offline."""
    import dataclasses

    import torch.distributed as dist

    from nova_engine.train.checkpoint_io import write_checkpoint_dir

    def write(tmp):
        f = os.path.join(tmp, f"mp_policy_tp{ps.tp_rank:02d}_pp{ps.pp_rank:02d}.pt")
        torch.save({"model": eng.model_state(), "optimizer": None}, f)
        return [f]

    lay = {"tp": ps.tp, "pp": ps.pp, "vpp": 1, "dp": ps.dp, "world_size": ps.world_size}
    cfg = {"model": {"hf_path": model_dir, "lora": dataclasses.asdict(CFG)}}
    write_checkpoint_dir(path, write, step=1, extra={"config": cfg, "engines": {"policy": lay}},
                         rank=ps.rank, barrier=dist.barrier)  # fmt: skip


def _global(v):
    """Global shape of a sharded tensor; of a factory (fc1's swiglu split): its parts'
    (global shape, global offset)."""
    if hasattr(v, "global_shape"):
        return tuple(v.global_shape)
    return [(tuple(t.global_shape), tuple(t.global_offset)) for t in v.build()]


def _worker(rank, world, model_dir, seqs, out_root):
    from nova_engine.config import OptimConfig
    from nova_engine.data.packing import PackedBatch
    from nova_engine.data.sample import Sample
    from nova_engine.model.heads import token_logprobs
    from nova_engine.model.lora import adapters_of, is_lora_param, peft_state_dict
    from nova_engine.parallel.state import destroy_parallel, initialize_parallel
    from nova_engine.train.engine import ModelEngine

    out = {}
    for tp, pp, sp in LAYOUTS:
        ps = initialize_parallel(tp=tp, pp=pp, sp=sp, seed=1)
        res = out[(tp, pp, sp)] = {}
        # DP rank d's sequences (every sequence once over DP), one per micro-batch
        mine = list(range(ps.dp_rank, len(seqs), ps.dp))
        mbs = [
            PackedBatch.from_samples([Sample(seqs[i], [1] * len(seqs[i]))], pad_to_length=16)
            for i in mine
        ]
        total = sum(len(s) - 1 for s in seqs)

        def logps(eng, mbs=mbs, ps=ps):
            got = eng.forward_collect(
                mbs, lambda mdl, hs, pb: token_logprobs(mdl, hs, pb.labels, ps)
            )
            return [g.detach().clone() for g in got]

        base = ModelEngine.from_hf(model_dir, ps, trainable=False, name="reference")
        optim = OptimConfig(lr=1e-2, schedule="constant", grad_clip=0.0)
        eng = ModelEngine.from_hf(model_dir, ps, lora=CFG, optim=optim, total_steps=2)
        ref = logps(base)
        res["b0_diff"] = max(
            ((a - b).abs().max().item() for a, b in zip(logps(eng), ref)), default=0.0
        )
        if pp == 1:
            _set_random_b(eng.chunks, eng.arch, ps)
        else:  # the PEFT adapter written at TP2+SP (same B, same A): import to continue
            eng.load_peft(os.path.join(out_root, "peft"))
        lora_lp = logps(eng)
        with eng.adapters_disabled():
            off = logps(eng)
        res["off_diff"] = max(((a - b).abs().max().item() for a, b in zip(off, ref)), default=0.0)
        moves = ((a - b).abs().max().item() for a, b in zip(lora_lp, ref))
        res["lora_moves"] = max(moves, default=1.0)  # (no log-probs off the last stage)
        res["logps"] = {i: lp for i, lp in zip(mine, lora_lp)} if ps.tp_rank == 0 else {}

        def loss_fn(c, h, mb, ps=ps, total=total):
            lp = token_logprobs(c, h, mb.labels, ps)
            return -(lp * mb.loss_mask).sum() / total, (mb.loss_mask != 0).sum(), {}

        eng.forward_backward(mbs, loss_fn)
        ads = adapters_of(eng.chunks)
        saved = [(p, p.data) for a in ads for p in (a.A, a.B)]
        for p, _ in saved:
            p.data = p.main_grad.detach().clone()
        grads = peft_state_dict(eng.chunks, eng.arch, ps)
        res["grads"] = grads if ps.tp_rank == 0 and ps.dp_rank == 0 else {}
        for p, d in saved:
            p.data = d
        if (tp, pp, sp) == TP1:
            trainable = {n for c in eng.chunks for n, p in c.named_parameters() if p.requires_grad}
            names = {n for c in eng.chunks for n, _ in c.named_parameters()}
            res["trainable_ok"] = trainable == {n for n in names if is_lora_param(n)}
            in_buffers = {id(p) for m in eng.models for b in m.buffers for p in b.params}
            res["buffers_ok"] = in_buffers == {id(p) for p, _ in saved}
            res["no_base_main_grad"] = not any(
                hasattr(p, "main_grad") for c in eng.chunks for n, p in c.named_parameters()
                if not is_lora_param(n)
            )  # fmt: skip
            opt_params = {id(p) for grp in eng.optimizer.param_groups for p in grp["params"]}
            before = {n: p.detach().clone() for c in eng.chunks for n, p in c.named_parameters()}
            ok, _, _ = eng.step()
            res["opt_params"] = len(opt_params), len(saved)
            after = {n: p.detach() for c in eng.chunks for n, p in c.named_parameters()}
            res["moved"] = sorted(n for n in before if not torch.equal(before[n], after[n]))
            res["n_lora"] = sum(is_lora_param(n) for n in names)
            res["layer_errs"] = _layer_reference(base_probe(model_dir, ps))
            res["head_errs"] = _head_reference(base_probe(model_dir, ps), ps)
            rm = ModelEngine.from_hf(model_dir, ps, lora=CFG, optim=optim, score_outputs=1)
            res["rm_trainable"] = sorted(
                n for c in rm.chunks for n, p in c.named_parameters() if p.requires_grad
            )
        if (tp, pp, sp) == (2, 1, False):
            res["head_errs"] = _head_reference(base_probe(model_dir, ps), ps)
        if pp > 1:  # lora_export's layer offsets of a pipeline rank's chunk
            from nova_engine.tools.lora_export import _layer_offset

            first = eng.chunks[0].decoder.layers[0].layer_number - 1
            res["offset_ok"] = first == _layer_offset(ps.pp_rank, 0, pp, 1, eng.arch.num_layers)
        ckdir = os.path.join(out_root, "dist")
        if (tp, pp, sp) == (2, 1, False):  # a dist checkpoint at TP2 ...
            from megatron.core import dist_checkpointing as dc

            res["tp2_adapters"] = peft_state_dict(eng.chunks, eng.arch, ps)
            os.makedirs(ckdir, exist_ok=True)
            dc.save({"model": eng.chunks[0].sharded_state_dict()}, ckdir)
        if pp > 1:  # ... loaded at TP1 PP2 into adapters at their init (B = 0)
            from megatron.core import dist_checkpointing as dc

            fresh = ModelEngine.from_hf(model_dir, ps, trainable=False, lora=CFG)
            loaded = dc.load({"model": fresh.chunks[0].sharded_state_dict()}, ckdir)
            fresh.chunks[0].load_state_dict(loaded["model"])
            res["resharded"] = peft_state_dict(fresh.chunks, fresh.arch, ps)
        if (tp, pp, sp) == (2, 1, False):  # dist-checkpoint metadata: global shapes of A, B
            sd = eng.chunks[0].sharded_state_dict()
            res["sharded"] = {
                k.split("layers.0.", 1)[1]: _global(v)
                for k, v in sd.items()
                if ".lora." in k and "layers.0." in k
            }
        if (tp, pp, sp) == (2, 1, False):  # colocated generation runs the adapters
            from nova_engine.generate import SamplingParams

            prompt = seqs[0][:6]
            gen = eng.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=4))[0][0]
            with eng.adapters_disabled():
                base_gen = eng.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=4))
            full = Sample(prompt + gen.tokens, [0] * len(prompt) + [1] * len(gen.tokens))
            mb = PackedBatch.from_samples([full], pad_to_length=16)
            got = eng.forward_collect(
                [mb],
                lambda mdl, hs, pb, ps=ps: token_logprobs(mdl, hs, pb.labels, ps) * pb.loss_mask,
            )
            res["gen"] = (sum(gen.logprobs), float(got[0].sum()), len(gen.tokens))
            res["gen_base_logp"] = sum(base_gen[0][0].logprobs)
        if sp:
            _set_random_b(eng.chunks, eng.arch, ps)  # the logps above were taken with these
            eng.export_hf(os.path.join(out_root, "merged"))
            eng.export_peft(os.path.join(out_root, "peft"), base_model=model_dir)
            _write_shard_checkpoint(eng, ps, model_dir, os.path.join(out_root, "ckpt"))
            again = ModelEngine.from_hf(model_dir, ps, trainable=False, lora=CFG)
            again.load_peft(os.path.join(out_root, "peft"))
            diffs = ((a - b).abs().max().item() for a, b in zip(logps(again), lora_lp))
            res["peft_reload_diff"] = max(diffs, default=0.0)
        del base, eng
        destroy_parallel()
    return out


def base_probe(model_dir, ps):
    from nova_engine.train.engine import ModelEngine

    probe = ModelEngine.from_hf(model_dir, ps, trainable=False, lora=CFG)
    _set_random_b(probe.chunks, probe.arch, ps)
    return probe.chunks[0]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    model_dir = str(root / "base")
    model = build_tiny_hf_model(model_dir, "llama", num_hidden_layers=2)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, V, (n,), generator=g).tolist() for n in (L_SEQ, 9)]
    results = run_distributed(_worker, 2, model_dir, seqs, str(root))
    return model, model_dir, seqs, results, root


def _merge(results, layout, key):
    got = {}
    for r in results:
        got.update(r[layout][key])
    return got


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_b0_and_adapters_off_equal_base_exactly(lora_run, layout):
    for r in lora_run[3]:
        res = r[layout]
        assert res["b0_diff"] == 0.0, "B = 0 must give the base model's log-probs exactly"
        assert res["off_diff"] == 0.0, "adapters off must equal the frozen copy exactly"
        assert res["lora_moves"] > 1e-4, "random B must change the log-probs"


@pytest.mark.slow
def test_layer_forward_backward_vs_float64(lora_run):
    errs = lora_run[3][0][TP1]["layer_errs"]
    assert set(errs) == {"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"}
    for name, e in errs.items():
        assert e < 1e-4, f"{name}: max err {e:.3g} vs float64 W x + s B A x"


@pytest.mark.slow
@pytest.mark.parametrize("layout", [TP1, (2, 1, False)], ids=str)
def test_lm_head_adapter_vs_float64(lora_run, layout):
    for r in lora_run[3]:
        e = r[layout]["head_errs"]
        assert e["scale"] > 1e-3, "A and B must get gradients"
        for k in ("logp", "dh", "dA", "dB"):
            assert e[k] < 1e-4, f"{layout} LM head {k}: max err {e[k]:.3g} vs float64"


@pytest.mark.slow
def test_pp_layer_offsets_of_the_offline_export(lora_run):
    assert all(r[(1, 2, False)]["offset_ok"] for r in lora_run[3])


@pytest.mark.slow
def test_offline_exports_of_tp2_shards_equal_the_live_ones(lora_run, tmp_path):
    """lora_export on the TP2+SP shards: the PEFT tensors equal the engine's live export
    (all-gathered) exactly; the merged weights equal the engine's merged export."""
    from safetensors.torch import load_file

    from nova_engine.model.hf_io import HFCheckpoint
    from nova_engine.tools.lora_export import export_adapter, export_merged

    root = lora_run[4]
    export_adapter(str(root / "ckpt"), str(tmp_path / "peft"))
    got = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    want = load_file(str(root / "peft" / "adapter_model.safetensors"))
    assert set(got) == set(want) and len(got) == 2 * (2 * 7 + 1)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    export_merged(str(root / "ckpt"), str(tmp_path / "merged"))
    live, offline = HFCheckpoint(str(root / "merged")), HFCheckpoint(str(tmp_path / "merged"))
    assert set(live.names()) == set(offline.names())
    for name in live.names():
        torch.testing.assert_close(offline.read(name), live.read(name), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_only_adapters_train(lora_run):
    res = lora_run[3][0][TP1]
    assert res["trainable_ok"] and res["buffers_ok"] and res["no_base_main_grad"]
    n_opt, n_ad = res["opt_params"]
    assert n_opt == n_ad == res["n_lora"] == 2 * (4 * 2 + 1)  # A, B x (4 kinds x 2 layers + head)
    assert res["moved"] and all(".lora." in n for n in res["moved"])
    assert any(n.startswith("output_layer.lora.") for n in res["moved"])
    rm = res["rm_trainable"]  # a reward model: adapters + its score head in full, no LM head's
    assert "score.weight" in rm and len(rm) == res["n_lora"] - 2 + 1
    assert not any(n.startswith("output_layer") for n in rm)


@pytest.mark.slow
def test_dist_checkpoint_shards_adapters_like_their_layer(lora_run):
    arch_q = (6 + 2 * 2) * 16  # (heads + 2 kv heads) * head_dim
    r = CFG.rank
    expect = {
        "self_attention.linear_qkv.lora.A": (r, 96),
        "self_attention.linear_qkv.lora.B": (arch_q, r),  # split over TP: the full shape
        "self_attention.linear_proj.lora.A": (r, 96),
        "self_attention.linear_proj.lora.B": (96, r),
        "mlp.linear_fc1.lora.A": (r, 96),
        "mlp.linear_fc2.lora.A": (r, 160),
        "mlp.linear_fc2.lora.B": (96, r),
    }
    layers = 2  # megatron prepends the layer axis (sharded_offsets of the block)
    for t, res in enumerate(lora_run[3]):  # TP rank t (world 2 = TP2)
        got = dict(res[(2, 1, False)]["sharded"])
        # fc1's B as megatron's fc1 weight: global [gate; up], rank t holds rows t*80.. of each
        gate_up = got.pop("mlp.linear_fc1.lora.B")
        assert gate_up == [
            ((layers, 320, r), (0, t * 80, 0)),
            ((layers, 320, r), (0, 160 + t * 80, 0)),
        ]
        assert got == {k: (layers, *v) for k, v in expect.items()}


@pytest.mark.slow
def test_dist_checkpoint_of_tp2_adapters_loads_at_pp2(lora_run):
    """Adapters saved in a dist checkpoint at TP2 and loaded at TP1 x PP2 are the same
    matrices (fc1's B in [gate; up] order, the LM head's B by vocab rows)."""
    want = lora_run[3][0][(2, 1, False)]["tp2_adapters"]
    got = _merge(lora_run[3], (1, 2, False), "resharded")
    assert set(got) == set(want) and len(want) == 2 * (2 * 7 + 1)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.slow
def test_generation_runs_the_adapters(lora_run):
    res = lora_run[3][0][(2, 1, False)]
    gen_logp, fwd_logp, n = res["gen"]
    assert n == 4 and abs(gen_logp - fwd_logp) < 1e-4, "generated log-probs != LoRA forward"
    assert abs(gen_logp - res["gen_base_logp"]) > 1e-4, "adapters must change generation"


@pytest.mark.slow
def test_peft_adapter_reloads_exactly(lora_run):
    for r in lora_run[3]:
        assert r[(2, 1, True)]["peft_reload_diff"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS[1:], ids=str)
def test_tp_sp_pp_equal_tp1(lora_run, layout):
    results = lora_run[3]
    ref_lp, got_lp = _merge(results, TP1, "logps"), _merge(results, layout, "logps")
    assert sorted(ref_lp) == sorted(got_lp) == [0, 1]
    for i in ref_lp:
        n = min(len(ref_lp[i]), len(got_lp[i]))  # SP pads to a multiple of tp
        torch.testing.assert_close(got_lp[i][:n], ref_lp[i][:n], rtol=1e-5, atol=1e-5)
    ref_g, got_g = _merge(results, TP1, "grads"), _merge(results, layout, "grads")
    assert set(ref_g) == set(got_g) and len(ref_g) == 2 * (2 * 7 + 1)  # + lm_head
    for k in ref_g:
        scale = ref_g[k].abs().max().item()
        err = (got_g[k] - ref_g[k]).abs().max().item()
        assert scale > 0 and err <= 1e-6 + 1e-4 * scale, f"{layout} grad {k}: err {err:.3g}"


def _hf_logps(model, seq):
    ids = torch.tensor([seq])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]


@pytest.mark.slow
def test_merged_export_and_peft_adapter(lora_run):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from nova_engine.model.hf_io import HFCheckpoint

    base_model, model_dir, seqs, results, root = lora_run
    nova = _merge(results, (2, 1, True), "logps")
    merged = AutoModelForCausalLM.from_pretrained(str(root / "merged")).float().eval()
    adapter = load_file(str(root / "peft" / "adapter_model.safetensors"))
    base_ck, merged_ck = HFCheckpoint(model_dir), HFCheckpoint(str(root / "merged"))
    s = CFG.alpha / CFG.rank
    n_checked = 0
    for name in base_ck.names():
        key = "base_model.model." + name.removesuffix(".weight")
        if key + ".lora_A.weight" in adapter:
            delta = s * adapter[key + ".lora_B.weight"] @ adapter[key + ".lora_A.weight"]
            expect = base_ck.read(name) + delta
            n_checked += 1
        else:
            expect = base_ck.read(name)
        torch.testing.assert_close(merged_ck.read(name), expect, rtol=1e-6, atol=1e-6)
    assert n_checked == 2 * 7 + 1  # + lm_head
    hf_base = AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    peft_model = peft.PeftModel.from_pretrained(hf_base, str(root / "peft")).eval()
    for i, seq in enumerate(seqs):
        got = nova[i][: len(seq)][:-1]  # labels of the last token are ignored
        torch.testing.assert_close(_hf_logps(merged, seq), got, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(_hf_logps(peft_model, seq), got, rtol=1e-4, atol=1e-4)
