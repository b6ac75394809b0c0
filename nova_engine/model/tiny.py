"""Tiny Llama / Qwen2 models built with `transformers` and saved as HF directories.

Used by the tests (random weights, odd sizes) and by `make demo` (which then trains them):
nothing is downloaded, so every model the project runs on CPU is made here.
"""

from __future__ import annotations

from typing import Any

import torch

LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def tiny_hf_config(family: str = "llama", **overrides: Any):
    """A transformers config of a tiny model (defaults: hidden 96, 6 heads, 2 KV heads,
    4 layers, vocab 1000; llama gets Llama-3.1 RoPE scaling, qwen2 tied embeddings)."""
    from transformers import LlamaConfig, Qwen2Config

    kw: dict[str, Any] = dict(
        vocab_size=1000,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
    )
    if family == "llama":
        kw.update(rope_scaling=dict(LLAMA3_ROPE_SCALING), rope_theta=500000.0)
        kw.update(overrides)
        return LlamaConfig(**kw)
    if family == "qwen2":
        kw.update(tie_word_embeddings=True, rope_theta=1000000.0)
        kw.update(overrides)
        return Qwen2Config(**kw)
    raise ValueError(f"family={family!r}: expected 'llama' or 'qwen2'")


def build_tiny_hf_model(out_dir: str, family: str = "llama", seed: int = 0, **overrides: Any):
    """Create a randomly initialized tiny model, save it to `out_dir` (safetensors) and
    return it (fp32, eval mode). Biases (Qwen2 q/k/v) get random values, not zeros, so the
    QKV-bias path is exercised."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = tiny_hf_config(family, **overrides)
    cls = LlamaForCausalLM if family == "llama" else Qwen2ForCausalLM
    model = cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out_dir)
    return model
