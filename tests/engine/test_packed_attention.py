"""Packed attention computes exactly what the samples compute alone.

Unit checks of the core-attention module (block-diagonal mask, packed vs per-segment SDPA,
the torch varlen API's two signatures), then the proof on the whole model: the logits and
parameter gradients of a packed batch equal those of each sample run alone, padded, one
at a time (fp32, <= 1e-5), at TP1 and TP2xPP2 with SP, for plain and pairs-mode batches.
One spawned group of 4 gloo ranks.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nova_engine.data.packing import PackedBatch
from nova_engine.data.sample import PairSample, Sample
from nova_engine.model import attention
from nova_engine.model.tiny import build_tiny_hf_model
from nova_engine.parallel.spawn import run_distributed

V = 1000


# ----------------------------------------------------------------------- module-level units


def _segments(lengths):
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    return cu, int(cu[-1])


def test_block_causal_mask_matches_loop():
    cu, total = _segments([3, 1, 5, 2])
    mask = attention.block_causal_mask(cu, total)
    seg = [s for s, n in enumerate([3, 1, 5, 2]) for _ in range(n)]
    for i in range(total):
        for j in range(total):
            assert bool(mask[i, j]) == (seg[i] == seg[j] and j <= i), (i, j)


@pytest.mark.parametrize("heads, groups", [(6, 2), (4, 4)])
def test_packed_attention_equals_per_segment(heads, groups):
    torch.manual_seed(0)
    lengths = [7, 1, 12, 4]
    cu, total = _segments(lengths)
    q = torch.randn(total, heads, 16)
    k = torch.randn(total, groups, 16)
    v = torch.randn(total, groups, 16)
    out = attention.packed_attention(q, k, v, cu, max(lengths), scale=0.25)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t[a:b].permute(1, 0, 2).unsqueeze(0) for t in (q, k, v))
        ref = F.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=0.25, enable_gqa=heads != groups
        )
        torch.testing.assert_close(out[a:b], ref.squeeze(0).permute(1, 0, 2), rtol=0, atol=1e-6)


def _per_segment_reference(q, k, v, bounds, scale):
    """Each segment [a, b) alone through SDPA with is_causal; [T, heads, hn]."""
    outs = []
    for a, b in bounds:
        qs, ks, vs = (t[a:b].permute(1, 0, 2).unsqueeze(0) for t in (q, k, v))
        o = F.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
        outs.append(o.squeeze(0).permute(1, 0, 2))
    return torch.cat(outs)


RAGGED = {
    "ragged": [7, 1, 12, 4, 31, 2, 9, 9, 17],
    "equal_adjacent": [16, 16, 16, 16],  # one group, a view of q/k/v (no gather)
    "mixed": [64, 3, 64, 64, 5, 40, 1, 1, 33],  # long + many short: several groups
    "one": [23],
}


@pytest.mark.parametrize("case", list(RAGGED))
@pytest.mark.parametrize("heads, groups", [(6, 2), (4, 4)])
def test_packed_attention_fwd_bwd_equal_per_sample(case, heads, groups):
    """The grouped path equals per-sample attention, forward and q/k/v gradients, fp64."""
    torch.manual_seed(1)
    lengths = RAGGED[case]
    cu, total = _segments(lengths)
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    leaves = [
        torch.randn(total, n, 8, dtype=torch.float64, requires_grad=True)
        for n in (heads, groups, groups)
    ]
    g_out = torch.randn(total, heads, 8, dtype=torch.float64)
    out = attention.packed_attention(*leaves, cu, max(lengths), scale=0.3)
    (out * g_out).sum().backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    ref = _per_segment_reference(*leaves, bounds, 0.3)
    (ref * g_out).sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for name, g, t in zip("qkv", grads, leaves):
        assert t.grad.abs().max() > 0, name
        torch.testing.assert_close(g, t.grad, rtol=0, atol=1e-12, msg=f"d{name}")


def test_packed_attention_trailing_tokens_are_own_segment():
    """Rows after cu[-1] (none in Nova's batches, but legal) attend only among themselves."""
    torch.manual_seed(2)
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    q, k, v = (torch.randn(13, 2, 4, dtype=torch.float64) for _ in range(3))
    out = attention.packed_attention(q, k, v, cu, 5, scale=0.5)
    ref = _per_segment_reference(q, k, v, [(0, 5), (5, 9), (9, 13)], 0.5)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


# ------------------------------------------------------------- the C++ CPU kernel (fp32)

# lengths, query heads, KV heads, head dim: segments shorter than, equal to and spanning
# several query (32) and key (64) blocks; MHA, GQA 2/3/4 and MQA; every supported head dim
KERNEL_CASES = {
    "ragged_gqa3_d16": ([7, 1, 12, 4, 31, 2, 9, 9, 17], 6, 2, 16),
    "blocks_mqa_d32": ([150, 65, 64, 1, 33, 32], 4, 1, 32),
    "mha_d64": ([40, 97, 128], 4, 4, 64),
    "gqa4_d128": ([130, 3, 64], 4, 1, 128),
    "gqa3_d8": ([5, 70], 3, 1, 8),
    "d96": ([33, 66], 2, 2, 96),
    "d256_one": ([45], 2, 1, 256),
}


def _leaves(lengths, heads, groups, dim, seed):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (
        torch.randn(total, n, dim, generator=g, dtype=torch.float64)
        for n in (heads, groups, groups)
    )
    return q, k, v, torch.randn(total, heads, dim, generator=g, dtype=torch.float64)


def _fwd_bwd(fn, leaves, g_out):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    out.backward(g_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _isas():
    from nova_engine import _C

    return _C.attention_isas()


@pytest.mark.parametrize("case", list(KERNEL_CASES))
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("isa", _isas())
def test_cpu_kernel_fwd_bwd_within_torch_error(case, seed, isa, monkeypatch):
    """fp32 kernel (each instruction-set build this CPU runs) vs the fp64 per-sample
    reference, out and dq/dk/dv, within 2x the error of torch's own fp32 per-sample SDPA
    (STYLE.md's rule). The portable baseline build (no FMA on x86: every a * b + c rounds
    twice) gets 3x; packed_attention only picks it when asked (_CPU_KERNEL_ISA)."""
    from nova_kernels._testing import assert_within_torch_error

    monkeypatch.setattr(attention, "_CPU_KERNEL_ISA", isa)
    factor = 3.0 if isa == "baseline" else 2.0

    lengths, heads, groups, dim = KERNEL_CASES[case]
    cu, total = _segments(lengths)
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    *qkv, g_out = _leaves(lengths, heads, groups, dim, seed)
    scale = dim**-0.5
    assert attention._use_cpu_kernel(*(t.float() for t in qkv))
    ref = _fwd_bwd(lambda *t: _per_segment_reference(*t, bounds, scale), qkv, g_out)
    f32 = [t.float() for t in qkv]
    torch32 = _fwd_bwd(lambda *t: _per_segment_reference(*t, bounds, scale), f32, g_out)
    ours = _fwd_bwd(lambda *t: attention.packed_attention(*t, cu, max(lengths), scale), f32, g_out)
    for name, o, t, r in zip(("out", "dq", "dk", "dv"), ours, torch32, ref):
        assert o.dtype == torch.float32 and o.shape == r.shape, name
        # floor: 4 fp32 ulps of the largest element. torch's own fp32 error (the budget) comes
        # from the host's BLAS kernels and moves with the CPU model: on one EPYC host d256 dq's
        # budget was 7.8e-7 and the kernel's error 1.7e-6 (2.2x, 3.3e-7 over a 1e-7 floor)
        floor = 4 * torch.finfo(torch.float32).eps * float(r.abs().max())
        assert_within_torch_error(o, t, r, name=f"{case} {name}", factor=factor, floor=floor)


@pytest.mark.parametrize("isa", _isas())
def test_cpu_kernel_result_does_not_depend_on_threads(isa):
    """Every output element is written by one task in a fixed order: bitwise equal results
    for 1, 2 and 3 threads, forward and backward."""
    from nova_engine import _C

    lengths, heads, groups, dim = [150, 3, 64, 40], 4, 2, 32
    q, k, v, g_out = (t.float().contiguous() for t in _leaves(lengths, heads, groups, dim, 3))
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    results = []
    for threads in (1, 2, 3):
        out, lse = torch.empty_like(q), torch.empty(heads, q.shape[0])
        _C.packed_attention_fwd(q.numpy(), k.numpy(), v.numpy(), cu, 0.2, out.numpy(),
                                lse.numpy(), threads, isa)  # fmt: skip
        grads = [torch.empty_like(t) for t in (q, k, v)]
        _C.packed_attention_bwd(*(t.numpy() for t in (q, k, v, out, lse, g_out)), cu, 0.2,
                                *(t.numpy() for t in grads), threads, isa)  # fmt: skip
        results.append([out, lse, *grads])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_cpu_kernel_trailing_tokens_and_dispatch(monkeypatch):
    """fp32 on CPU takes the kernel (rows outside cu_seqlens are segments of their own, as
    on the grouped path); fp64 and unsupported head dims take the grouped SDPA path."""
    calls = []
    for name in ("_cpu_kernel_attention", "_grouped_causal_attention"):
        fn = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, _f=fn, _n=name: calls.append(_n) or _f(*a))
    cu = torch.tensor([2, 5, 9], dtype=torch.int32)
    q, k, v = (torch.randn(13, 2, 8, dtype=torch.float64) for _ in range(3))
    ref = _per_segment_reference(q, k, v, [(0, 2), (2, 5), (5, 9), (9, 13)], 0.5)
    out = attention.packed_attention(*(t.float() for t in (q, k, v)), cu, 5, scale=0.5)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)
    attention.packed_attention(q, k, v, cu, 5, scale=0.5)
    attention.packed_attention(*(t[..., :6].float() for t in (q, k, v)), cu, 5, scale=0.5)
    kernel, grouped = "_cpu_kernel_attention", "_grouped_causal_attention"
    assert calls == [kernel, grouped, grouped]


def test_cpu_kernel_propagates_nan():
    """A NaN query reaches its own output row (and the gradients), nothing else: the
    training loop's NaN guard sees it, and other samples stay clean."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(100, n, 32, generator=g) for n in (4, 2, 2))
    q[10, 1, 3] = float("nan")
    q.requires_grad_()
    out = attention.packed_attention(q, k, v, torch.tensor([0, 50, 100]), 50, 0.2)
    bad = torch.isnan(out).any(-1).nonzero().tolist()
    assert bad == [[10, 1]]
    out.sum().backward()
    assert torch.isnan(q.grad[:50]).any() and not torch.isnan(q.grad[50:]).any()


def test_cpu_kernel_rejects_bad_inputs():
    from nova_engine import _C

    q, k = torch.randn(10, 4, 32), torch.randn(10, 2, 32)
    out, lse = torch.empty_like(q), torch.empty(4, 10)
    cu = np.array([0, 4, 10], dtype=np.int64)

    def call(q=q, k=k, cu=cu, out=out):
        _C.packed_attention_fwd(q.numpy(), k.numpy(), k.numpy(), cu, 1.0, out.numpy(),
                                lse.numpy(), 1)  # fmt: skip

    with pytest.raises(ValueError, match="q: wrong dtype"):
        call(q=q.double())
    with pytest.raises(ValueError, match="q: must be C-contiguous"):
        call(q=q.transpose(0, 1).contiguous().transpose(0, 1))
    with pytest.raises(ValueError, match="out: dim 0 is 9, expected 10"):
        call(out=out[:9])
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end at T = 10"):
        call(cu=np.array([0, 4, 9], dtype=np.int64))
    with pytest.raises(ValueError, match="non-decreasing"):
        call(cu=np.array([0, 6, 4, 10], dtype=np.int64))
    with pytest.raises(ValueError, match="multiple of KV heads 3"):
        call(k=torch.randn(10, 3, 32))
    with pytest.raises(ValueError, match="head dim 24 is not one of"):
        call(q=torch.randn(10, 4, 24), k=torch.randn(10, 2, 24), out=torch.empty(10, 4, 24))
    with pytest.raises(ValueError, match="instruction set 'avx9' is not available"):
        _C.packed_attention_fwd(q.numpy(), k.numpy(), k.numpy(), cu, 1.0, out.numpy(),
                                lse.numpy(), 1, "avx9")  # fmt: skip
    assert not _C.attention_supports_dim(24) and _C.attention_supports_dim(128)
    assert _C.attention_isas()[0] == "baseline"


def test_plan_cost_is_sum_of_squares():
    """The groups' padded work stays near the sum of the segments' squares (never T^2), and
    equal adjacent segments run as one call on a view."""
    rng = np.random.default_rng(0)
    lengths = tuple(int(x) for x in np.clip(rng.lognormal(np.log(60), 0.8, 64), 1, 512))
    plan = attention._plan(lengths, torch.device("cpu"))
    padded = sum(g.count * g.length**2 for g in plan.groups)
    exact = sum(n * n for n in lengths)
    assert sum(g.count for g in plan.groups) == len(lengths)
    assert padded <= 1.5 * exact + len(plan.groups) * attention._CALL_COST * 2
    assert padded < sum(lengths) ** 2 / 8
    same = attention._plan((512,) * 8, torch.device("cpu"))
    assert len(same.groups) == 1 and same.groups[0].view_start == 0


def _fake_varlen(style):
    calls = {}

    if style == "2.10":

        def fn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, is_causal=False):
            calls.update(is_causal=is_causal, heads_k=k.shape[1])
            return q

    else:

        def fn(
            q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False
        ):
            calls.update(window_size=window_size, enable_gqa=enable_gqa, heads_k=k.shape[1])
            return q

    return fn, calls


@pytest.mark.parametrize("style", ["2.10", "2.12"])
def test_varlen_signature_variants(monkeypatch, style):
    import inspect

    fn, calls = _fake_varlen(style)
    monkeypatch.setattr(
        attention, "_varlen_api", lambda: (fn, set(inspect.signature(fn).parameters))
    )
    q, k = torch.randn(5, 6, 8), torch.randn(5, 2, 8)
    attention._varlen_torch(q, k, k, torch.tensor([0, 5]), 5, 0.3)
    if style == "2.10":
        # causal by flag; no enable_gqa, so K/V are repeated to the query heads
        assert calls == {"is_causal": True, "heads_k": 6}
    else:
        assert calls == {"window_size": (-1, 0), "enable_gqa": True, "heads_k": 2}


# flash-attn 2.x / 3.x varlen signatures: stand-ins with each installed signature, computing
# real causal attention per segment (float64), so the adapter's output is checked, not just
# its keywords


def _segment_attention(q, k, v, cu, scale):
    """float64 causal attention per segment of cu; GQA by repeating K/V heads."""
    rep = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(rep, 1) for t in (k, v))
    mask = attention.block_causal_mask(cu, q.shape[0])
    scores = torch.einsum("ind,jnd->nij", q.double(), k.double()) * scale
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    return torch.einsum("nij,jnd->ind", p, v.double()).to(q.dtype)


def _fake_flash(major: int, calls: dict):
    if major == 2:

        def fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):  # fmt: skip
            calls.update(major=2, dropout_p=dropout_p, causal=causal, max=max_seqlen_q)
            return _segment_attention(q, k, v, cu_seqlens_q, softmax_scale)

    else:  # flash_attn_interface (Hopper): no dropout_p; this build returns (out, lse)

        def fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
               seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None,
               k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0,
               softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0):  # fmt: skip
            calls.update(major=3, causal=causal, max=max_seqlen_q)
            out = _segment_attention(q, k, v, cu_seqlens_q, softmax_scale)
            return out, torch.zeros(q.shape[1], q.shape[0])

    return fn


@pytest.mark.parametrize("major", [2, 3])
def test_flash_attn_varlen_adapts_to_the_installed_signature(monkeypatch, major):
    import sys
    import types

    calls: dict = {}
    mod = types.ModuleType("flash_attn_interface" if major == 3 else "flash_attn")
    mod.flash_attn_varlen_func = _fake_flash(major, calls)
    for name in ("flash_attn_interface", "flash_attn"):
        monkeypatch.setitem(sys.modules, name, mod if name == mod.__name__ else None)
    attention._flash_varlen_api.cache_clear()
    try:
        api = attention._flash_varlen_api()
    finally:
        attention._flash_varlen_api.cache_clear()
    assert api is not None and api[0] is mod.flash_attn_varlen_func
    gen = torch.Generator().manual_seed(major)
    cu = torch.tensor([0, 5, 6, 19, 26], dtype=torch.int32)
    q, k, v = (torch.randn(26, h, 24, generator=gen) for h in (6, 2, 2))
    out = attention._flash_varlen(api, q, k, v, cu, 13, 0.3)
    ref = _segment_attention(q, k, v, cu, 0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    want = {"major": major, "causal": True, "max": 13} | ({"dropout_p": 0.0} if major == 2 else {})
    assert calls == want


def test_flash_attn_varlen_unknown_signature_is_one_clear_error():
    def fn(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, is_causal=False):
        return q

    with pytest.raises(
        RuntimeError, match=r"no \['softmax_scale', 'causal'\] parameter: unsupported"
    ):
        attention._flash_varlen((fn, frozenset(inspect.signature(fn).parameters)),
                                *(torch.randn(4, 2, 8) for _ in range(3)),
                                torch.tensor([0, 4]), 4, 0.3)  # fmt: skip


def test_flash_attn_varlen_call_binds_to_the_installed_package():
    """The adapter's call binds to the installed flash-attn's own signature (GPU images)."""
    api = attention._flash_varlen_api()
    if api is None:
        pytest.skip("flash-attn not installed")
    fn, params = api
    t = torch.empty(0)
    inspect.signature(fn).bind(t, t, t, t, t, 1, 1, **attention._flash_varlen_kwargs(params, 0.1))


# ---------------------------------------------------------------------- the model-level proof


def _rand_samples(seed, n, lo=3, hi=17):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(lo, hi))
        tokens = rng.integers(0, V, length)
        mask = (rng.random(length) < 0.8).astype(np.uint8)
        mask[0] = 0
        mask[-1] = 1
        out.append(Sample(tokens, mask, index=100 + i))
    return out


def _alone_batch(sample: Sample, pad_to: int) -> PackedBatch:
    """One sample, right-padded to `pad_to`, as a plain [1, S] row (no packing)."""
    return PackedBatch.from_samples([sample], pad_to_length=pad_to)


def _run(layout, model_dir, packed: PackedBatch, samples: list[Sample]):
    from megatron.core import tensor_parallel

    from nova_engine.model.arch import load_arch
    from nova_engine.model.build import build_model
    from nova_engine.model.hf_io import _gather_tp, load_hf_weights
    from nova_engine.model.packed import packed_forward
    from nova_engine.parallel.pipeline import forward_backward, wrap_ddp
    from nova_engine.parallel.state import destroy_parallel, initialize_parallel

    tp, pp, sp = layout
    ps = initialize_parallel(tp=tp, pp=pp, sp=sp)
    arch = load_arch(model_dir)
    chunks = build_model(arch, ps)
    load_hf_weights(chunks, arch, ps, model_dir)
    models = wrap_ddp(chunks, ps)
    n_tokens = float(packed.loss_mask.sum())

    def step(model, item):
        batch, packed_mode = item
        if packed_mode:
            out = packed_forward(model, batch)
        else:
            out = model(
                batch.tokens.unsqueeze(0), batch.position_ids.unsqueeze(0), attention_mask=None
            )

        def loss_fn(logits_1TV):
            full = torch.cat(_gather_tp(logits_1TV.detach().clone(), ps), dim=-1)[0]
            labels = batch.labels.clamp(min=0).unsqueeze(1)  # [T, 1]
            ce = tensor_parallel.vocab_parallel_cross_entropy(
                logits_1TV.transpose(0, 1).contiguous().clone(), labels
            )
            loss = (ce[:, 0] * batch.loss_mask).sum() / n_tokens
            return loss, torch.tensor(1), {"logits": full}

        return out, loss_fn

    def grads_after(items, seq_length):
        for m in models:
            m.zero_grad_buffer()
        res = forward_backward(models, ps, items, step, seq_length=seq_length)
        g = {n: p.main_grad.detach().clone() for c in chunks for n, p in c.named_parameters()}
        return res, g

    res_packed, g_packed = grads_after([(packed, True)], packed.num_tokens)
    pad_to = -(-max(len(s) for s in samples) // tp) * tp
    res_alone, g_alone = grads_after([(_alone_batch(s, pad_to), False) for s in samples], pad_to)
    destroy_parallel()
    return {
        "packed_logits": [r["logits"] for r in res_packed],
        "alone_logits": [r["logits"] for r in res_alone],
        "g_packed": g_packed,
        "g_alone": g_alone,
    }


LAYOUTS = [(1, 1, False), (2, 2, True)]


def _worker(rank, world, model_dir, cases):
    return {
        (name, layout): _run(layout, model_dir, packed, samples)
        for name, (packed, samples) in cases.items()
        for layout in LAYOUTS
    }


@pytest.fixture(scope="module")
def proof(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("packed_model"))
    build_tiny_hf_model(d, "qwen2")  # QKV bias + tied embeddings: the harder family
    samples = _rand_samples(0, 5)
    pairs = [
        PairSample(a, b, index=i)
        for i, (a, b) in enumerate(zip(_rand_samples(1, 3), _rand_samples(2, 3)))
    ]
    halves = [s for p in pairs for s in (p.chosen, p.rejected)]
    cases = {
        "samples": (PackedBatch.from_samples(samples, pad_to_multiple=4), samples),
        "pairs": (PackedBatch.from_pairs(pairs, pad_to_multiple=4), halves),
    }
    return cases, run_distributed(_worker, 4, d, cases)


@pytest.mark.slow  # spawned process group
@pytest.mark.parametrize("case", ["samples", "pairs"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_packed_logits_equal_alone(proof, case, layout):
    cases, results = proof
    packed, samples = cases[case]
    checked = 0
    for rank_out in results:
        r = rank_out[(case, layout)]
        if not r["packed_logits"]:
            continue  # not a last pipeline stage
        packed_logits = r["packed_logits"][0]
        cu = packed.cu_seqlens.tolist()
        for i, (s, alone) in enumerate(zip(samples, r["alone_logits"])):
            a, b = cu[i], cu[i + 1]
            assert b - a == len(s)
            diff = (packed_logits[a:b] - alone[: len(s)]).abs().max().item()
            assert diff <= 1e-5, f"{case} {layout} sample {i}: max diff {diff:.3g}"
            checked += 1
    assert checked >= len(samples)


@pytest.mark.slow  # spawned process group
@pytest.mark.parametrize("case", ["samples", "pairs"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_packed_grads_equal_alone(proof, case, layout):
    _, results = proof
    for rank_out in results:
        r = rank_out[(case, layout)]
        assert r["g_packed"].keys() == r["g_alone"].keys()
        for name, g in r["g_packed"].items():
            ref = r["g_alone"][name]
            err = (g - ref).abs().max().item()
            assert err <= 1e-5 * max(1.0, ref.abs().max().item()), (
                f"{case} {layout} {name}: {err:.3g}"
            )
            assert ref.abs().max() > 0, f"{name}: zero gradient proves nothing"


@pytest.mark.slow  # spawned process group
def test_positions_restart_per_sample(proof):
    cases, _ = proof
    packed, samples = cases["samples"]
    cu = packed.cu_seqlens.tolist()
    for i, s in enumerate(samples):
        assert packed.position_ids[cu[i] : cu[i + 1]].tolist() == list(range(len(s)))
