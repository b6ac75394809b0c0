"""Nova's packed RoPE equals megatron's per-segment RoPE (forward and backward), and a
reference written out from the formula, on ragged segments and fresh random inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from nova_engine.model.rope import apply_packed_rope, packed_rope_table


def _megatron_per_segment(x_TNH, lengths, inv_freq):
    """megatron's non-fused path, segment by segment (positions restart at 0)."""
    out, start = [], 0
    for n in lengths:
        pos = torch.arange(n, dtype=inv_freq.dtype)
        f = torch.outer(pos, inv_freq)
        emb = torch.cat((f, f), dim=-1)[:, None, :]  # [n, 1, hn]
        out.append(_apply_rotary_pos_emb_bshd(x_TNH[start : start + n], emb))
        start += n
    return torch.cat(out)


def _formula(x, pos, inv_freq):
    """out = x cos(p w) + rotate_half(x) sin(p w), written out in fp64."""
    x = x.double()
    f = pos.double()[:, None] * inv_freq.double()[None, :]
    cos, sin = (torch.cat((t, t), -1)[:, None, :] for t in (f.cos(), f.sin()))
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat((-x2, x1), -1) * sin


@pytest.mark.parametrize(
    "heads, hn, lengths", [(4, 32, [7, 1, 12, 4]), (3, 10, [5, 9]), (1, 2, [1])]
)
def test_packed_rope_equals_megatron_fwd_bwd(heads, hn, lengths):
    g = torch.Generator().manual_seed(sum(lengths) * heads + hn)
    total = sum(lengths)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, hn, 2, dtype=torch.float32) / hn))
    pos = torch.from_numpy(np.concatenate([np.arange(n) for n in lengths]))
    x = torch.randn(total, heads, hn, generator=g, requires_grad=True)
    go = torch.randn(total, heads, hn, generator=g)

    cos, sin = packed_rope_table(pos[None, :], inv_freq, torch.float32)
    out = apply_packed_rope(x, cos, sin)
    (dx,) = torch.autograd.grad(out, x, go)

    ref = _megatron_per_segment(x, lengths, inv_freq)
    (dref,) = torch.autograd.grad(ref, x, go)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, dref, rtol=1e-6, atol=1e-6)

    exact = _formula(x.detach(), pos, inv_freq)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)
    # RoPE is a rotation: the gradient is the inverse rotation of go (its transpose)
    back = _formula(go, -pos, inv_freq)
    torch.testing.assert_close(dx.double(), back, rtol=1e-4, atol=1e-4)


def test_packed_rope_bf16_close_to_fp32():
    g = torch.Generator().manual_seed(3)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    pos = torch.arange(40) % 13
    x = torch.randn(40, 2, 16, generator=g)
    c32, s32 = packed_rope_table(pos, inv_freq, torch.float32)
    c16, s16 = packed_rope_table(pos, inv_freq, torch.bfloat16)
    assert c16.dtype == torch.bfloat16
    out = apply_packed_rope(x.bfloat16(), c16, s16)
    torch.testing.assert_close(out.float(), apply_packed_rope(x, c32, s32), rtol=2e-2, atol=2e-2)


def test_packed_rope_rejects_mismatched_table():
    cos, sin = packed_rope_table(torch.arange(5), torch.ones(4), torch.float32)
    with pytest.raises(ValueError, match="expected"):
        apply_packed_rope(torch.randn(6, 2, 8), cos, sin)


def _forward_both_ropes(rank, world, model_dir, lengths):
    from nova_engine.data.packing import PackedBatch
    from nova_engine.data.sample import Sample
    from nova_engine.model.packed import packed_forward
    from nova_engine.parallel.state import initialize_parallel
    from nova_engine.train.engine import ModelEngine

    ps = initialize_parallel()
    model = ModelEngine.from_hf(model_dir, ps, trainable=False).chunks[0]
    rng = np.random.default_rng(0)
    samples = [Sample(rng.integers(4, 200, n), np.ones(n, np.uint8), index=i)
               for i, n in enumerate(lengths)]  # fmt: skip
    batch = PackedBatch.from_samples(samples, pad_to_multiple=8)  # a padding segment too
    out = {}
    with torch.no_grad():
        for nova in (True, False):  # False: megatron's per-segment RoPE (the TE-spec path)
            model.packed_rope = nova
            out[nova] = packed_forward(model, batch).clone()
    return out


def test_model_packed_rope_equals_megatron_rope(tmp_path):
    """The whole model on a packed batch: Nova's RoPE (model.packed_rope) and megatron's
    per-segment RoPE (what the TE spec keeps) give the same hidden states: the switch neither
    drops nor doubles the rotation."""
    from nova_engine.model.tiny import build_tiny_hf_model
    from nova_engine.parallel.spawn import run_distributed

    model_dir = str(tmp_path / "m")
    build_tiny_hf_model(model_dir, "llama", seed=0, vocab_size=256, hidden_size=64,
                        intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2)  # fmt: skip
    (out,) = run_distributed(_forward_both_ropes, 1, model_dir, [9, 1, 17, 5])
    assert out[True].abs().max() > 0
    torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-5)
