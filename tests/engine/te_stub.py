"""A stand-in `transformer_engine` package (plain PyTorch, TP = 1) that megatron-core
0.16.1's TE extension (`megatron.core.extensions.transformer_engine`) imports and builds its
layers from on a CPU, so the TE layer-spec path of `nova_engine.model.build` runs in tests.

`install(monkeypatch)` puts the stub in sys.modules, re-imports megatron's TE extension and
spec provider against it and points `gpt_layer_specs` at them; monkeypatch undoes it all.
The stub's math: RMSNorm as Hugging Face computes it, linear layers as F.linear, attention
causal SDPA per sequence (sbhd) or per packed segment (thd, from cu_seqlens).
"""

from __future__ import annotations

import contextlib
import sys
import types

import torch
import torch.nn.functional as F

VERSION = "2.6.0"


def _rms(x, weight, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class RMSNorm(torch.nn.Module):
    def __init__(self, hidden_size, eps=1e-5, params_dtype=torch.float32, device="cpu", **_):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=params_dtype, device=device))

    def forward(self, x):
        return _rms(x, self.weight, self.eps)


class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, *, tp_size=1, init_method=None, bias=True,
                 return_bias=False, parallel_mode=None, params_dtype=torch.float32,
                 device="cpu", **_):  # fmt: skip
        super().__init__()
        assert tp_size == 1, "the TE stub implements TP = 1 only"
        self.in_features, self.out_features = in_features, out_features
        self.parallel_mode, self.use_bias, self.return_bias = parallel_mode, bias, return_bias
        self.weight = torch.nn.Parameter(
            torch.empty(out_features, in_features, dtype=params_dtype, device=device)
        )
        self.bias = None
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=params_dtype))
        if init_method is not None:
            init_method(self.weight)

    def _linear(self, x):
        if self.return_bias:
            return F.linear(x, self.weight), self.bias
        return F.linear(x, self.weight, self.bias)

    def forward(self, x, is_first_microbatch=None):
        return self._linear(x)


class LayerNormLinear(Linear):
    def __init__(self, in_features, out_features, *, eps=1e-5, normalization="RMSNorm",
                 params_dtype=torch.float32, device="cpu", **kw):  # fmt: skip
        assert normalization == "RMSNorm", normalization
        super().__init__(in_features, out_features, params_dtype=params_dtype, device=device, **kw)
        self.eps = eps
        self.layer_norm_weight = torch.nn.Parameter(
            torch.ones(in_features, dtype=params_dtype, device=device)
        )

    def forward(self, x, is_first_microbatch=None):
        return self._linear(_rms(x, self.layer_norm_weight, self.eps))


class DotProductAttention(torch.nn.Module):
    """Causal attention; sbhd q [S, B, np, hn] -> [S, B, np*hn], thd q [T, np, hn] -> [T,
    np*hn] per segment of cu_seqlens_q. Like TE's, it knows nothing of a KV cache."""

    calls = 0

    def __init__(self, num_attention_heads, kv_channels, *, softmax_scale=None, **_):
        super().__init__()
        self.softmax_scale = softmax_scale or kv_channels**-0.5

    def forward(self, q, k, v, attention_mask=None, *, qkv_format="sbhd", attn_mask_type="causal",
                cu_seqlens_q=None, cu_seqlens_q_padded=None, **_):  # fmt: skip
        assert attn_mask_type in ("causal", "padding_causal"), attn_mask_type
        DotProductAttention.calls += 1
        sdpa = lambda q, k, v: F.scaled_dot_product_attention(  # noqa: E731  [.., heads, L, hn]
            q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=q.shape[-3] != k.shape[-3]
        )
        if qkv_format == "thd":
            cu = (cu_seqlens_q_padded if cu_seqlens_q_padded is not None else cu_seqlens_q).tolist()
            outs = [
                sdpa(*(t[a:b].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
                for a, b in zip(cu[:-1], cu[1:])
            ]
            return torch.cat(outs).flatten(1)
        out = sdpa(*(t.permute(1, 2, 0, 3) for t in (q, k, v)))  # [B, np, S, hn]
        return out.permute(2, 0, 1, 3).flatten(2)


class _Anything:
    def __init__(self, *a, **k):
        pass


def _modules() -> dict[str, types.ModuleType]:
    te = types.ModuleType("transformer_engine")
    te.__version__ = VERSION
    pt = types.ModuleType("transformer_engine.pytorch")
    pt.Linear, pt.LayerNormLinear, pt.RMSNorm = Linear, LayerNormLinear, RMSNorm
    pt.LayerNorm = pt.GroupedLinear = _Anything
    pt.DotProductAttention = DotProductAttention
    pt.ops = types.SimpleNamespace(Sequential=_Anything, FusibleOperation=_Anything)
    fp8 = types.ModuleType("transformer_engine.pytorch.fp8")
    fp8.FP8GlobalStateManager = type(
        "FP8GlobalStateManager", (), {"is_fp8_enabled": staticmethod(lambda: False)}
    )
    fp8.fp8_autocast = lambda *a, **k: contextlib.nullcontext()
    ptd = types.ModuleType("transformer_engine.pytorch.distributed")
    ptd.CudaRNGStatesTracker = _Anything
    common = types.ModuleType("transformer_engine.common")
    recipe = types.ModuleType("transformer_engine.common.recipe")
    recipe.DelayedScaling = _Anything
    te.pytorch, te.common, pt.fp8, pt.distributed, common.recipe = pt, common, fp8, ptd, recipe
    mods = (te, pt, fp8, ptd, common, recipe)
    return {m.__name__: m for m in mods}


def install(monkeypatch) -> types.ModuleType:
    """The stub as `transformer_engine`; megatron's TE extension re-imported against it."""
    import importlib

    import megatron.core.utils as mutils
    from megatron.core.models.gpt import gpt_layer_specs

    for name, mod in _modules().items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(mutils, "_te_version", None)
    for name in ("megatron.core.extensions.transformer_engine",
                 "megatron.core.extensions.transformer_engine_spec_provider"):  # fmt: skip
        monkeypatch.delitem(sys.modules, name, raising=False)
    ext = importlib.import_module("megatron.core.extensions.transformer_engine")
    provider = importlib.import_module("megatron.core.extensions.transformer_engine_spec_provider")
    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", provider.TESpecProvider, raising=False)
    monkeypatch.setattr(gpt_layer_specs, "HAVE_TE", True)
    return ext
