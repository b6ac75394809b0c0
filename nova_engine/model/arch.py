"""The model architecture, read from a Hugging Face `config.json`.

Supported: the Llama-3 family (`LlamaForCausalLM`, including Llama-3.1/3.2 "llama3" RoPE
scaling) and the Qwen2 family (`Qwen2ForCausalLM`: bias on q/k/v). Both are pre-norm
decoders with RMSNorm, SwiGLU MLP, RoPE (non-interleaved halves) and grouped-query
attention; embeddings tied or untied. Anything else raises `ArchitectureError` naming the
key and what was expected.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
# reward / value models: the same decoder with a `score` head instead of the LM head
SEQUENCE_CLASSIFIERS = {
    "LlamaForSequenceClassification": "llama",
    "Qwen2ForSequenceClassification": "qwen2",
}


class ArchitectureError(ValueError):
    """config.json describes a model Nova cannot build, or a layout does not fit it."""


@dataclass(frozen=True)
class ModelArch:
    family: str  # "llama" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # HF "llama3" rope_scaling dict, or None
    tie_word_embeddings: bool
    qkv_bias: bool
    max_position_embeddings: int
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @property
    def architecture(self) -> str:
        return {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[self.family]

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0)
        layer = attn + 3 * h * f + 2 * h
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + h

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_layout(self, tp: int, pp: int, vpp: int | None = None) -> None:
        """Raise ArchitectureError if TP/PP/VP do not divide the model's dimensions."""
        chunks = pp * (vpp or 1)
        checks = [
            ("num_attention_heads", self.num_heads, tp, "tp"),
            ("num_key_value_heads", self.num_kv_heads, tp, "tp"),
            ("vocab_size", self.vocab_size, tp, "tp"),
            ("intermediate_size", self.intermediate_size, tp, "tp"),
            ("num_hidden_layers", self.num_layers, chunks, "pp*vpp"),
        ]
        for key, value, div, name in checks:
            if value % div:
                raise ArchitectureError(
                    f"config.json {key}={value} is not divisible by {name}={div}: "
                    f"choose a layout whose {name} divides {key}"
                )

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim/2] (fp32), with llama3 scaling when configured."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        if self.rope_scaling is None:
            return inv
        rs = self.rope_scaling
        factor = float(rs["factor"])
        low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old_len = float(rs["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)


def _req(cfg: dict[str, Any], key: str, where: str, kind: type = int) -> Any:
    if key not in cfg:
        raise ArchitectureError(f"{where}: missing key {key!r}")
    value = cfg[key]
    if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ArchitectureError(f"{where}: {key}={value!r}, expected a positive integer")
    if kind is float and not isinstance(value, (int, float)):
        raise ArchitectureError(f"{where}: {key}={value!r}, expected a number")
    return value


def arch_from_hf_config(cfg: dict[str, Any], where: str = "config.json") -> ModelArch:
    archs = cfg.get("architectures") or []
    known = SUPPORTED_ARCHITECTURES | SEQUENCE_CLASSIFIERS
    if len(archs) != 1 or archs[0] not in known:
        raise ArchitectureError(
            f"{where}: architectures={archs!r}; expected one of {sorted(known)}"
        )
    family = known[archs[0]]
    heads = _req(cfg, "num_attention_heads", where)
    hidden = _req(cfg, "hidden_size", where)
    kv_heads = cfg.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ArchitectureError(
            f"{where}: num_attention_heads={heads} is not a multiple of "
            f"num_key_value_heads={kv_heads}"
        )
    head_dim = cfg.get("head_dim") or hidden // heads
    if cfg.get("hidden_act", "silu") != "silu":
        raise ArchitectureError(f"{where}: hidden_act={cfg['hidden_act']!r}, expected 'silu'")
    if family == "llama":
        if cfg.get("attention_bias", False):
            raise ArchitectureError(f"{where}: attention_bias=true is not supported for llama")
        if cfg.get("mlp_bias", False):
            raise ArchitectureError(f"{where}: mlp_bias=true is not supported")
        qkv_bias = False
    else:
        if cfg.get("use_sliding_window", False):
            raise ArchitectureError(f"{where}: use_sliding_window=true is not supported")
        qkv_bias = True
    rope_theta = cfg.get("rope_theta")
    rope_scaling = cfg.get("rope_scaling")
    rope_params = cfg.get("rope_parameters")  # transformers >= 5 layout
    if isinstance(rope_params, dict):
        rope_theta = rope_params.get("rope_theta", rope_theta)
        if rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
    if rope_scaling is not None:
        kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if kind == "default":
            rope_scaling = None
        elif kind != "llama3":
            raise ArchitectureError(
                f"{where}: rope_scaling type {kind!r} is not supported; expected null or 'llama3'"
            )
        else:
            for key in ("factor", "low_freq_factor", "high_freq_factor"):
                _req(rope_scaling, key, f"{where} rope_scaling", float)
            _req(rope_scaling, "original_max_position_embeddings", f"{where} rope_scaling")
            rope_scaling = {
                k: rope_scaling[k]
                for k in (
                    "factor",
                    "low_freq_factor",
                    "high_freq_factor",
                    "original_max_position_embeddings",
                )
            }
    return ModelArch(
        family=family,
        vocab_size=_req(cfg, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=_req(cfg, "intermediate_size", where),
        num_layers=_req(cfg, "num_hidden_layers", where),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        torch_dtype=str(cfg.get("torch_dtype", cfg.get("dtype", "float32"))),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
    )


def load_arch(model_dir: str) -> ModelArch:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ArchitectureError(f"{path}: not found; expected a Hugging Face model directory")
    with open(path) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ArchitectureError(f"{path}: invalid JSON ({e})") from e
    return arch_from_hf_config(cfg, where=path)
