"""Bad input to the model layer: one clear error naming the key or tensor, raised before
any collective (these checks run on config and file metadata only)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from nova_engine.model.arch import ArchitectureError, arch_from_hf_config, load_arch
from nova_engine.model.hf_io import CheckpointError, HFCheckpoint
from nova_engine.model.tiny import build_tiny_hf_model, tiny_hf_config
from nova_engine.parallel.state import LayoutError, validate_layout


def _cfg(family="llama", **kw):
    d = tiny_hf_config(family, **kw).to_dict()
    d["architectures"] = ["LlamaForCausalLM" if family == "llama" else "Qwen2ForCausalLM"]
    return d


def test_reads_both_families():
    llama = arch_from_hf_config(_cfg("llama"))
    qwen = arch_from_hf_config(_cfg("qwen2"))
    assert (llama.family, llama.qkv_bias, llama.tie_word_embeddings) == ("llama", False, False)
    assert (qwen.family, qwen.qkv_bias, qwen.tie_word_embeddings) == ("qwen2", True, True)
    assert llama.rope_scaling["factor"] == 8.0 and llama.rope_theta == 500000.0
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim) == (6, 2, 16)


def test_llama3_inv_freq_matches_transformers():
    from transformers import LlamaForCausalLM

    cfg = tiny_hf_config("llama")
    hf = LlamaForCausalLM(cfg).model.rotary_emb.inv_freq
    ours = arch_from_hf_config(_cfg("llama")).inv_freq()
    assert torch.equal(hf.float(), ours)


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"architectures": ["MistralForCausalLM"]}, "architectures="),
        ({"architectures": None}, "architectures="),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"num_key_value_heads": 4}, "num_key_value_heads=4"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "yarn"),
    ],
)
def test_bad_config_names_the_key(edit, match):
    cfg = _cfg("llama")
    cfg.update(edit)
    with pytest.raises(ArchitectureError, match=match):
        arch_from_hf_config(cfg)


def test_missing_key_named():
    cfg = _cfg("llama")
    del cfg["vocab_size"]
    with pytest.raises(ArchitectureError, match="missing key 'vocab_size'"):
        arch_from_hf_config(cfg)


def test_missing_config_file(tmp_path):
    with pytest.raises(ArchitectureError, match="config.json: not found"):
        load_arch(str(tmp_path))


@pytest.mark.parametrize(
    "tp, pp, vpp, match",
    [
        (4, 1, None, "num_attention_heads=6 is not divisible by tp=4"),
        (3, 1, None, "num_key_value_heads=2 is not divisible by tp=3"),
        (1, 3, None, "num_hidden_layers=4 is not divisible by pp\\*vpp=3"),
        (1, 2, 4, "num_hidden_layers=4 is not divisible by pp\\*vpp=8"),
    ],
)
def test_layout_must_divide_model(tp, pp, vpp, match):
    arch = arch_from_hf_config(_cfg("llama"))
    with pytest.raises(ArchitectureError, match=match):
        arch.check_layout(tp, pp, vpp)


def test_layout_must_divide_vocab():
    arch = arch_from_hf_config(_cfg("llama", vocab_size=1001, num_key_value_heads=6))
    with pytest.raises(ArchitectureError, match="vocab_size=1001 is not divisible by tp=2"):
        arch.check_layout(2, 1)


@pytest.mark.parametrize(
    "world, tp, pp, vpp, match",
    [
        (4, 3, 1, None, "world size 4 is not divisible by tp\\*pp"),
        (6, 2, 2, None, "world size 6"),
        (2, 1, 1, 2, "vpp=2 needs pipeline parallelism"),
        (2, 0, 1, None, "parallel.tp=0"),
    ],
)
def test_world_size_must_match_layout(world, tp, pp, vpp, match):
    with pytest.raises(LayoutError, match=match):
        validate_layout(world, tp, pp, vpp)


def test_validate_layout_returns_dp():
    assert validate_layout(8, 2, 2) == 2


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("ckpt"))
    build_tiny_hf_model(d, "llama", num_hidden_layers=2)
    return d


def _rewrite(src, dst, edit):
    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)


def test_valid_checkpoint_passes(ckpt_dir):
    HFCheckpoint(ckpt_dir).validate(load_arch(ckpt_dir))


def test_missing_tensor_named(ckpt_dir, tmp_path):
    _rewrite(ckpt_dir, tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        HFCheckpoint(str(tmp_path)).validate(load_arch(str(tmp_path)))


def test_extra_tensor_named(ckpt_dir, tmp_path):
    def edit(t):
        t["model.layers.2.mlp.up_proj.weight"] = torch.zeros(160, 96)

    _rewrite(ckpt_dir, tmp_path, edit)
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.2.mlp.up_proj"):
        HFCheckpoint(str(tmp_path)).validate(load_arch(str(tmp_path)))


def test_misshaped_tensor_named(ckpt_dir, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(48, 96)

    _rewrite(ckpt_dir, tmp_path, edit)
    with pytest.raises(
        CheckpointError,
        match=r"'model.layers.0.self_attn.k_proj.weight' has shape \[48, 96\], expected \[32, 96\]",
    ):
        HFCheckpoint(str(tmp_path)).validate(load_arch(str(tmp_path)))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        HFCheckpoint(str(tmp_path))


def test_lazy_slices_read_only_what_is_asked(ckpt_dir):
    ckpt = HFCheckpoint(ckpt_dir)
    full = ckpt.read("model.layers.0.mlp.down_proj.weight")
    cols = ckpt.read("model.layers.0.mlp.down_proj.weight", cols=slice(80, 160))
    rows = ckpt.read("model.embed_tokens.weight", rows=slice(500, 1000))
    assert torch.equal(cols, full[:, 80:160])
    assert rows.shape == (500, 96)
    assert torch.equal(rows, ckpt.read("model.embed_tokens.weight")[500:1000])
