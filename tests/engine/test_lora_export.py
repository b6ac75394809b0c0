"""`nova export --merge-lora / --adapter-only` on a checkpoint of a LoRA run (#31).

One SFT run through the entry point (world of one) with model.lora on every target kind,
the LM head included (an untied tiny Llama), 2 steps, a checkpoint at step 2. Then:
- --merge-lora: every adapted HF tensor equals base + (alpha/r) B A computed in float64 from
  the checkpoint shard's A and B (converted from megatron's fused layouts by this test),
  every other tensor is the base's, bit for bit; the export equals the run's own merged
  hf/ (merged live by the engine at save time).
- --adapter-only: PEFT's layout; `peft` loads it on the transformers base model and its
  logits over the whole vocabulary equal Nova's LoRA model's (the checkpoint's shard
  loaded into a LoRA engine, logits = hidden @ (W + s B A)^T), as do the merged export's.
- refusals: a checkpoint without model.lora, in one line naming it; both flags at once.
"""

from __future__ import annotations

import os

import pytest
import torch

from nova_engine import cli
from nova_engine.train import __main__ as train_main
from nova_engine.train.checkpoint_io import write_checkpoint_dir

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "tiny_cpu.yaml")
RANK, ALPHA = 4, 8.0
TARGETS = ["qkv", "proj", "fc1", "fc2", "lm_head"]
HEADS, KV, HID, FFN = 4, 2, 32, 64


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from nova_engine.data.synthetic import write_task
    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.data.tokenize import load_tokenizer
    from nova_engine.model.tiny import build_tiny_hf_model

    d = tmp_path_factory.mktemp("lora_export")
    tok = build_tiny_tokenizer(d / "tok")
    sft = write_task(d / "data", n_sft=32, n_pref=2, n_eval=2, seed=4)["sft"]
    model = d / "model"
    build_tiny_hf_model(str(model), "llama", vocab_size=len(load_tokenizer(tok)), hidden_size=HID,
                        intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=HEADS,
                        num_key_value_heads=KV, tie_word_embeddings=False)  # fmt: skip
    out = d / "out"
    rc = train_main.main(
        ["sft", "--recipe", RECIPE, f"model.hf_path={model}", f"model.tokenizer_path={tok}",
         "model.build=null", f"data.train_paths=[{sft}]", "data.eval_paths=[]",
         "train.global_batch_size=8", "train.max_steps=2", "train.save_every=2",
         "optim.lr=2e-2", f"train.out_dir={out}", "train.tensorboard=false",
         "checkpoint.resume=none", f"model.lora.rank={RANK}", f"model.lora.alpha={ALPHA}",
         f"model.lora.targets=[{','.join(TARGETS)}]"]
    )  # fmt: skip
    assert rc == 0
    ckpt = out / "checkpoints" / "step_00000002"
    assert ckpt.is_dir()
    merged, peft_dir = d / "merged", d / "peft"
    assert cli.main(["export", str(ckpt), str(merged), "--merge-lora"]) == 0
    assert cli.main(["export", str(ckpt), str(peft_dir), "--adapter-only"]) == 0
    return {"model": str(model), "ckpt": str(ckpt), "merged": str(merged), "peft": str(peft_dir)}


def _to_hf_reference(name: str, t: torch.Tensor, which: str) -> dict[str, torch.Tensor]:
    """megatron adapter matrix (TP1) -> HF module names, written out here independently:
    qkv rows are grouped per KV head [q (HEADS/KV heads), k, v], fc1 rows are [gate; up]."""
    if which == "A" and name in ("linear_qkv", "linear_fc1", "output_layer"):
        hf = {"linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_fc1": ("gate_proj", "up_proj")}
        return {m: t for m in hf.get(name, ("lm_head",))}
    if name == "linear_qkv":  # B
        d, hpg = HID // HEADS, HEADS // KV
        g = t.reshape(KV, hpg + 2, d, -1)
        r = t.shape[-1]
        return {"q_proj": g[:, :hpg].reshape(-1, r), "k_proj": g[:, hpg].reshape(-1, r),
                "v_proj": g[:, hpg + 1].reshape(-1, r)}  # fmt: skip
    if name == "linear_fc1":  # B
        gate, up = t.chunk(2, 0)
        return {"gate_proj": gate, "up_proj": up}
    hf = {"linear_proj": "o_proj", "linear_fc2": "down_proj", "output_layer": "lm_head"}
    return {hf[name]: t}


def _reference_deltas(ckpt: str) -> dict[str, torch.Tensor]:
    """HF weight name -> (alpha/r) B A in float64, from the checkpoint's TP1 shard."""
    shard = torch.load(os.path.join(ckpt, "mp_policy_tp00_pp00.pt"), weights_only=True)
    (params,) = shard["model"]
    deltas = {}
    for key, a in params.items():
        if not key.endswith(".lora.A"):
            continue
        mod = key.removesuffix(".lora.A")
        name = mod.rsplit(".", 1)[-1]
        b = params[mod + ".lora.B"]
        a_hf, b_hf = _to_hf_reference(name, a, "A"), _to_hf_reference(name, b, "B")
        prefix = "" if name == "output_layer" else f"model.layers.{mod.split('.')[2]}."
        sub = "mlp." if "fc" in name else "" if name == "output_layer" else "self_attn."
        for m in b_hf:
            delta = (ALPHA / RANK) * b_hf[m].double() @ a_hf[m].double()
            deltas[f"{prefix}{sub}{m}.weight"] = delta
    return deltas


@pytest.mark.slow
def test_merge_lora_is_base_plus_scaled_ba(run):
    from nova_engine.model.hf_io import HFCheckpoint

    deltas = _reference_deltas(run["ckpt"])
    assert len(deltas) == 2 * 7 + 1  # q k v o gate up down x 2 layers + lm_head
    assert all(d.abs().max() > 0 for d in deltas.values()), "trained: B moved off 0"
    base, merged = HFCheckpoint(run["model"]), HFCheckpoint(run["merged"])
    live = HFCheckpoint(os.path.join(run["ckpt"], "hf"))
    assert set(merged.names()) == set(base.names()) == set(live.names())
    for name in base.names():
        got, w = merged.read(name), base.read(name)
        if name in deltas:
            want = w.double() + deltas[name]
            err = (got.double() - want).abs().max().item()
            assert err <= 2e-7 * max(1.0, want.abs().max().item()), f"{name}: err {err:.3g}"
        else:
            assert torch.equal(got, w), f"{name}: not adapted, must be the base's"
        torch.testing.assert_close(got, live.read(name), rtol=1e-6, atol=1e-6)


def _nova_logits(rank, world, model_dir, ckpt, seqs):
    """Nova's LoRA model from the checkpoint's shard: full-vocab logits of each sequence."""
    from nova_engine.config import LoRAConfig
    from nova_engine.data.packing import PackedBatch
    from nova_engine.data.sample import Sample
    from nova_engine.model.heads import lm_head_weight
    from nova_engine.parallel.state import destroy_parallel, initialize_parallel
    from nova_engine.train.engine import ModelEngine

    ps = initialize_parallel(tp=1, pp=1, seed=1)
    lora = LoRAConfig(rank=RANK, alpha=ALPHA, targets=TARGETS)
    eng = ModelEngine.from_hf(model_dir, ps, trainable=False, lora=lora)
    shard = torch.load(os.path.join(ckpt, "mp_policy_tp00_pp00.pt"), weights_only=True)
    eng.load_model_state(shard["model"], ckpt)
    mbs = [PackedBatch.from_samples([Sample(s, [1] * len(s))]) for s in seqs]
    out = eng.forward_collect(
        mbs, lambda m, h, mb: (h[:, 0].float() @ lm_head_weight(m).float().t()).detach()
    )
    destroy_parallel()
    return [o[: len(s)] for o, s in zip(out, seqs)]


@pytest.mark.slow
def test_adapter_only_loads_in_peft_with_novas_logits(run):
    peft = pytest.importorskip("peft")
    import json

    from transformers import AutoModelForCausalLM

    from nova_engine.parallel.spawn import run_distributed

    cfg = json.load(open(os.path.join(run["peft"], "adapter_config.json")))
    assert (cfg["r"], cfg["lora_alpha"], cfg["peft_type"]) == (RANK, ALPHA, "LORA")
    assert "lm_head" in cfg["target_modules"] and "q_proj" in cfg["target_modules"]
    g = torch.Generator().manual_seed(7)
    vocab = AutoModelForCausalLM.from_pretrained(run["model"]).config.vocab_size
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (11, 6)]
    (nova,) = run_distributed(_nova_logits, 1, run["model"], run["ckpt"], seqs)
    base = AutoModelForCausalLM.from_pretrained(run["model"]).float().eval()
    with_adapter = peft.PeftModel.from_pretrained(base, run["peft"]).eval()
    merged = AutoModelForCausalLM.from_pretrained(run["merged"]).float().eval()
    plain = AutoModelForCausalLM.from_pretrained(run["model"]).float().eval()
    for seq, want in zip(seqs, nova):
        ids = torch.tensor([seq])
        with torch.no_grad():
            for m in (with_adapter, merged):
                torch.testing.assert_close(m(ids).logits[0].float(), want, rtol=1e-4, atol=1e-4)
            moved = (plain(ids).logits[0] - want).abs().max().item()
        assert moved > 1e-3, "the adapter must change the logits"


def test_lora_flags_refuse_a_full_weight_checkpoint(tmp_path, capsys):
    def write(tmp):
        os.makedirs(os.path.join(tmp, "hf"))
        with open(os.path.join(tmp, "hf", "config.json"), "w") as f:
            f.write("{}")

    config = {"model": {"hf_path": "/m", "lora": None}}
    ckpt = write_checkpoint_dir(tmp_path / "ckpt" / "step_00000002", write, step=2,
                                extra={"config": config})  # fmt: skip
    for flag in ("--merge-lora", "--adapter-only"):
        assert cli.main(["export", ckpt, str(tmp_path / "out"), flag]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ckpt in err[0] and "trained without model.lora" in err[0]
        assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        cli.main(["export", ckpt, str(tmp_path / "out"), "--merge-lora", "--adapter-only"])
