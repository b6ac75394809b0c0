"""Attention for decoding: the padded (sbhd) core attention aligns its causal mask
bottom-right and honours megatron's mask types and padding masks; the generate KV cache
attends like a full forward; and on the model, decoding step by step against a KV cache
(megatron's StaticInferenceContext, and Nova's cache with left-padded ragged rows) gives the
full forward's logits (one spawned world of one)."""

from __future__ import annotations

import pytest
import torch
import torch.utils._python_dispatch
from megatron.core.transformer.enums import AttnMaskType

from nova_engine.model.attention import padded_attention
from nova_engine.parallel.spawn import run_distributed

SCALE = 0.37


def _reference(q_SBNH, k_KBGH, v_KBGH, keep_BSK):
    """float64 softmax attention with an explicit [B, S, K] keep mask."""
    rep = q_SBNH.shape[2] // k_KBGH.shape[2]
    q = q_SBNH.double().permute(1, 2, 0, 3)
    k = k_KBGH.double().repeat_interleave(rep, 2).permute(1, 2, 0, 3)
    v = v_KBGH.double().repeat_interleave(rep, 2).permute(1, 2, 0, 3)
    scores = q @ k.transpose(-1, -2) * SCALE
    scores = scores.masked_fill(~keep_BSK[:, None], float("-inf"))
    out = torch.softmax(scores, -1) @ v  # [B, N, S, H]
    s, b = q_SBNH.shape[:2]
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def _qkv(s, k, b=3, n=6, g=2, h=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=gen).requires_grad_()  # noqa: E731
    return mk(s, b, n, h), mk(k, b, g, h), mk(k, b, g, h)


def _bottom_right(s, k, b):
    qpos = torch.arange(k - s, k)
    return (torch.arange(k)[None, :] <= qpos[:, None]).expand(b, s, k)


@pytest.mark.parametrize("s,k", [(7, 7), (1, 11), (3, 11), (1, 1)])
@pytest.mark.parametrize(
    "mask_type",
    [AttnMaskType.causal, AttnMaskType.no_mask, AttnMaskType.padding_causal,
     AttnMaskType.causal_bottom_right],
)  # fmt: skip
def test_query_sees_every_cached_key_up_to_itself(s, k, mask_type):
    q, kk, v = _qkv(s, k)
    out = padded_attention(q, kk, v, SCALE, mask_type)
    ref = _reference(q, kk, v, _bottom_right(s, k, q.shape[1]))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, kk, v), g)
    ref_grads = torch.autograd.grad(ref, (q, kk, v), g.double())
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), r.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("s,k", [(9, 9), (1, 9), (2, 9)])
def test_left_padding_mask(s, k):
    """megatron's convention (True = masked out), over a longer cache and one query row;
    rows with padding equal the unpadded attention of their real keys, and a padding query
    stays finite."""
    b = 3
    q, kk, v = _qkv(s, k, b=b, seed=1)
    pads = torch.tensor([0, 2, 5])
    cache_len = k + 4
    mask = (torch.arange(cache_len)[None, :] < pads[:, None])[:, None, None, :]
    out = padded_attention(q, kk, v, SCALE, AttnMaskType.padding_causal, mask)
    assert torch.isfinite(out).all()
    keep = _bottom_right(s, k, b) & (torch.arange(k)[None, None, :] >= pads[:, None, None])
    own = torch.arange(k)[None, :] == torch.arange(k - s, k)[:, None]
    keep = keep | own[None]
    ref = _reference(q, kk, v, keep)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, kk, v), g)
    ref_grads = torch.autograd.grad(ref, (q, kk, v), g.double())
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), r.double(), rtol=1e-5, atol=1e-5)
    # the real rows: equal to attention over the unpadded keys alone
    for row in range(b):
        p = int(pads[row])
        if k - s < p:
            continue  # the query overlaps the padding
        alone = padded_attention(
            q[:, row : row + 1], kk[p:, row : row + 1], v[p:, row : row + 1], SCALE
        )
        torch.testing.assert_close(out[:, row : row + 1], alone, rtol=1e-5, atol=1e-6)


def test_mask_types_a_causal_layer_cannot_take():
    q, k, v = _qkv(2, 2)
    for bad in (AttnMaskType.padding, AttnMaskType.arbitrary):
        with pytest.raises(ValueError, match="causal-only"):
            padded_attention(q, k, v, SCALE, bad)
    with pytest.raises(ValueError, match="S <= K"):
        padded_attention(*_qkv(3, 2), SCALE)


def test_generate_cache_attends_like_a_full_forward():
    """LayerKVCache with left-padded ragged rows: prefill, then one token per step; every
    real position's output equals full causal attention over that row's real tokens."""
    from nova_engine.generate.kv_cache import DecodeState, LayerKVCache

    lens = [6, 3, 5]
    b, total_new = len(lens), 3
    p = max(lens)
    pads = torch.tensor([p - n for n in lens])
    gen = torch.Generator().manual_seed(2)
    seqs = [
        [torch.randn(n + total_new, 1, heads, 8, generator=gen) for heads in (6, 2, 2)]
        for n in lens
    ]
    state = DecodeState(pads, p + total_new, torch.ones(4))
    cache = LayerKVCache(state, b, 2, 8, torch.float32)

    def padded(t_idx, width):  # [width, B, heads, hn] of each row's tokens, left-padded
        out = []
        for row, n in enumerate(lens):
            x = seqs[row][t_idx][: n + width - p]
            pad = torch.zeros(int(pads[row]) if width == p else 0, *x.shape[1:])
            out.append(torch.cat([pad, x])[-width:])
        return torch.cat(out, dim=1)

    state.begin_step(p)
    out_pre = cache.attend(*(padded(i, p) for i in range(3)), SCALE)
    state.end_step()
    steps = []
    for t in range(total_new):
        state.begin_step(1)
        qkv = [torch.cat([seqs[r][i][lens[r] + t : lens[r] + t + 1] for r in range(b)], 1)
               for i in range(3)]  # fmt: skip
        steps.append(cache.attend(*qkv, SCALE))
        state.end_step()
    for row, n in enumerate(lens):
        q, k, v = (x[: n + total_new] for x in seqs[row])
        full = padded_attention(q, k, v, SCALE)  # [n + new, 1, np*hn]
        torch.testing.assert_close(
            out_pre[int(pads[row]) :, row], full[:n, 0], atol=1e-6, rtol=1e-5
        )
        for t in range(total_new):
            torch.testing.assert_close(steps[t][0, row], full[n + t, 0], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------- masked GQA without the math fallback


@pytest.mark.parametrize("expand", [False, True])
def test_gqa_sdpa_with_a_mask_matches_float64(expand):
    from nova_engine.model.attention import gqa_sdpa

    gen = torch.Generator().manual_seed(11)
    b, np_, ng, s, k, h = 3, 6, 2, 5, 9, 12
    mk = lambda *shape: torch.randn(*shape, generator=gen).requires_grad_()  # noqa: E731
    q, kk, v = mk(s, b, np_, h), mk(k, b, ng, h), mk(k, b, ng, h)
    keep = torch.rand(b, s, k, generator=gen) < 0.6
    keep |= torch.arange(k)[None, None, :] == torch.arange(k - s, k)[None, :, None]
    out = gqa_sdpa(
        *(t.permute(1, 2, 0, 3) for t in (q, kk, v)), SCALE, keep[:, None], expand=expand
    )
    out = out.permute(2, 0, 1, 3).reshape(s, b, -1)
    ref = _reference(q, kk, v, keep)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    for a, r in zip(
        torch.autograd.grad(out, (q, kk, v), g), torch.autograd.grad(ref, (q, kk, v), g.double())
    ):
        torch.testing.assert_close(a.double(), r.double(), rtol=1e-5, atol=1e-5)


class _Largest(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every floating tensor of at least `limit` elements an op creates."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.big = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() >= self.limit:
                self.big.append((str(func), tuple(t.shape)))
        return out


def test_masked_gqa_prefill_takes_no_math_fallback(monkeypatch):
    """A GPU-sized left-padded prefill (64 rows x 8 query / 2 KV heads x 2048 positions, bf16,
    meta device): every SDPA call with a mask gets K/V at the query heads (no enable_gqa, so
    CUDA's efficient/cuDNN kernels take it, not the math backend) and nothing outside SDPA
    creates a [B, heads, L, L] score-sized tensor; through padded_attention and the generate
    cache's prefill group."""
    from nova_engine.generate.kv_cache import DecodeState, LayerKVCache
    from nova_engine.model.attention import padded_attention

    b, np_, ng, s, h = 64, 8, 2, 2048, 128
    calls = []

    def sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, **kw):
        calls.append((attn_mask is not None, enable_gqa, k.shape[1] == q.shape[1]))
        return q.new_empty(*q.shape[:-1], v.shape[-1])  # what a fused kernel returns

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    meta = torch.device("meta")
    mk = lambda *shape: torch.empty(*shape, device=meta, dtype=torch.bfloat16)  # noqa: E731
    pads = torch.randint(0, 300, (b,), generator=torch.Generator().manual_seed(0))
    pads[0] = 0
    padding_B1K = (torch.arange(s)[None, :] < pads[:, None])[:, None, None, :]
    with _Largest(b * np_ * s * s // 8) as rec:
        padded_attention(mk(s, b, np_, h), mk(s, b, ng, h), mk(s, b, ng, h), SCALE,
                         attention_mask=padding_B1K.to(meta))  # fmt: skip
    st = DecodeState(pads, s + 4, torch.rand(h // 2))
    st.begin_prefill(torch.arange(b), 0, s)
    assert st.mask_B1SK is not None  # the padded rows need a mask
    st.device, st.rows_R, st.mask_B1SK = meta, st.rows_R.to(meta), st.mask_B1SK.to(meta)
    cache = LayerKVCache.__new__(LayerKVCache)
    cache.state, cache.k_BGKH, cache.v_BGKH = st, mk(b, ng, s + 4, h), mk(b, ng, s + 4, h)
    with _Largest(b * np_ * s * s // 8) as rec2:
        cache.attend(mk(s, b, np_, h), mk(s, b, ng, h), mk(s, b, ng, h), SCALE)
    assert len(calls) == 2 and all(m and not gqa and same for m, gqa, same in calls), calls
    assert rec.big == [] and rec2.big == [], (rec.big, rec2.big)


# ------------------------------------------------------------------------ on the model


def _model_checks(rank, world, model_dir):
    from megatron.core.inference.contexts import StaticInferenceContext

    from nova_engine.generate.decode import _generation_mode
    from nova_engine.generate.kv_cache import BatchCache
    from nova_engine.model.arch import load_arch
    from nova_engine.model.build import build_model
    from nova_engine.model.hf_io import load_hf_weights
    from nova_engine.parallel.state import initialize_parallel

    ps = initialize_parallel()
    arch = load_arch(model_dir)
    (m,) = build_model(arch, ps)
    load_hf_weights([m], arch, ps, model_dir)
    m.eval()
    ids = torch.randint(0, arch.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    w = m.lm_head_weight()
    out = {}

    def logits(hidden_SBH):
        return (hidden_SBH @ w.t()).transpose(0, 1)

    with torch.no_grad():
        m.return_hidden = True
        full = logits(m(ids, torch.arange(11)[None].expand(2, -1), attention_mask=None))
        # megatron's static context: prefill 5, a 3-token chunk, then one token at a time
        ctx = StaticInferenceContext(2, 11)
        got = []
        for a, b in ((0, 5), (5, 8), (8, 9), (9, 10), (10, 11)):
            h = m(ids[:, a:b], None, attention_mask=None, inference_context=ctx)
            ctx.sequence_len_offset += b - a
            got.append(logits(h))
        out["static"] = (torch.cat(got, 1) - full).abs().max().item()
        # Nova's cache: rows of 8 and 5 prompt tokens (the second left-padded by 3),
        # prefill, then 3 tokens one at a time; causal, so each row's reference is `full`
        pads = torch.tensor([0, 3])
        cache = BatchCache([m], pads, 8 + 3)
        pre = torch.stack([ids[0, :8], torch.cat([torch.zeros(3, dtype=ids.dtype), ids[1, :5]])])
        with _generation_mode([m]), cache.installed() as st:
            st.begin_step(8)
            h_pre = logits(m(pre, None, attention_mask=None))
            st.end_step()
            steps = []
            for t in range(3):
                st.begin_step(1)
                step_ids = torch.stack([ids[0, 8 + t], ids[1, 5 + t]])[:, None]
                steps.append(logits(m(step_ids, None, attention_mask=None)))
                st.end_step()
        dec = torch.cat(steps, 1)  # [2, 3, V]
        out["nova"] = max(
            (h_pre[0] - full[0, :8]).abs().max().item(),
            (h_pre[1, 3:] - full[1, :5]).abs().max().item(),
            (dec[0] - full[0, 8:11]).abs().max().item(),
            (dec[1] - full[1, 5:8]).abs().max().item(),
        )
        out["restored"] = m.training is False and all(
            layer.self_attention.core_attention.decode_cache is None for layer in m.decoder.layers
        ) and "forward" not in m.rotary_pos_emb.__dict__  # fmt: skip
    return out


@pytest.mark.slow  # a spawned process group
def test_decoding_against_a_kv_cache_gives_the_full_forward(tmp_path):
    from nova_engine.model.tiny import build_tiny_hf_model

    build_tiny_hf_model(str(tmp_path), "llama", num_hidden_layers=2)
    (res,) = run_distributed(_model_checks, 1, str(tmp_path))
    assert res["static"] < 1e-5, res
    assert res["nova"] < 1e-5, res
    assert res["restored"], res
