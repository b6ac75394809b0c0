"""The Transformer Engine layer-spec path of nova_engine.model.build, on a CPU under a stub
TE package (tests/engine/te_stub.py: megatron-core's own TE extension classes built on it).

One spawned world of one: the TE-spec model has megatron's TE modules (fused norm+linear, TE's
DotProductAttention, TE's final norm), loads the same HF weights as the local spec and gives
the same padded and packed (thd, megatron's per-segment RoPE) forwards; generation with a KV
cache equals the full forward (the cache is attended by Nova's core attention swapped in for
the call: TE's attention alone would attend over each step's own tokens), and the layers get
their own attention back afterwards.
"""

from __future__ import annotations

import pytest
import torch

from nova_engine.parallel.spawn import run_distributed

pytestmark = pytest.mark.slow


def _checks(rank, world, model_dir):
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import te_stub

    from nova_engine.data.packing import PackedBatch
    from nova_engine.data.sample import Sample
    from nova_engine.generate import SamplingParams, generate
    from nova_engine.model.arch import load_arch
    from nova_engine.model.build import build_model
    from nova_engine.model.hf_io import load_hf_weights
    from nova_engine.model.packed import packed_forward
    from nova_engine.parallel.state import initialize_parallel

    mp = pytest.MonkeyPatch()
    ext = te_stub.install(mp)
    ps = initialize_parallel()
    arch = load_arch(model_dir)
    out: dict = {}
    (te,) = build_model(arch, ps, use_te=True, init_weights=False)
    (local,) = build_model(arch, ps, use_te=False, init_weights=False)
    for m in (te, local):
        load_hf_weights([m], arch, ps, model_dir)
        m.eval()
        m.return_hidden = True
    layer = te.decoder.layers[0]
    out["modules"] = {
        "qkv": type(layer.self_attention.linear_qkv) is ext.TELayerNormColumnParallelLinear,
        "core": type(layer.self_attention.core_attention) is ext.TEDotProductAttention,
        "proj": type(layer.self_attention.linear_proj) is ext.TERowParallelLinear,
        "fc1": type(layer.mlp.linear_fc1) is ext.TELayerNormColumnParallelLinear,
        "fc2": type(layer.mlp.linear_fc2) is ext.TERowParallelLinear,
        "final_norm": type(te.decoder.final_layernorm) is te_stub.RMSNorm,
        "packed_rope": (te.packed_rope, local.packed_rope) == (False, True),
    }
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, arch.vocab_size, (2, 13), generator=gen)
    pos = torch.arange(13)[None].expand(2, -1)
    with torch.no_grad():
        calls = te_stub.DotProductAttention.calls
        h_te, h_local = (m(ids, pos, attention_mask=None) for m in (te, local))
        out["te_attention_ran"] = te_stub.DotProductAttention.calls > calls
        out["padded_err"] = (h_te - h_local).abs().max().item()
        samples = [
            Sample(tokens=torch.randint(0, arch.vocab_size, (n,), generator=gen).tolist(),
                   loss_mask=[1] * n)
            for n in (7, 12, 5)
        ]  # fmt: skip
        batch = PackedBatch.from_samples(samples)
        p_te, p_local = (packed_forward(m, batch) for m in (te, local))
        out["packed_err"] = (p_te - p_local).abs().max().item()
        # generation: ragged prompts (left padding in the cache), greedy
        prompts = [s.tokens.tolist() for s in samples]
        params = SamplingParams(temperature=0.0, n=1, max_new_tokens=4)
        g_te = generate([te], ps, arch, prompts, params)
        g_local = generate([local], ps, arch, prompts, params)
        out["same_tokens"] = [o[0].tokens for o in g_te] == [o[0].tokens for o in g_local]
        # the generated tokens' log-probs = the TE model's full forward over prompt + tokens
        w = te.lm_head_weight()
        err = 0.0
        for prompt, o in zip(prompts, g_te):
            seq = torch.tensor(prompt + o[0].tokens)[None]
            h = te(seq, torch.arange(seq.shape[1])[None], attention_mask=None)[:, 0]
            lp = torch.log_softmax(h.double() @ w.double().t(), -1)
            n = len(prompt)
            ref = lp[n - 1 : n - 1 + len(o[0].tokens)].gather(1, seq[0, n:, None])[:, 0]
            err = max(err, (torch.tensor(o[0].logprobs, dtype=torch.float64) - ref).abs().max())
        out["logprob_err"] = float(err)
        out["restored"] = all(
            type(lyr.self_attention.core_attention) is ext.TEDotProductAttention
            for lyr in te.decoder.layers
        )
    mp.undo()
    return out


def test_te_spec_builds_matches_local_and_generates(tmp_path):
    from nova_engine.model.tiny import build_tiny_hf_model

    build_tiny_hf_model(str(tmp_path), "llama", num_hidden_layers=2)
    (res,) = run_distributed(_checks, 1, str(tmp_path))
    assert all(res["modules"].values()), res["modules"]
    assert res["te_attention_ran"], res
    assert res["padded_err"] < 1e-5, res
    assert res["packed_err"] < 1e-5, res
    assert res["same_tokens"], res
    assert res["logprob_err"] < 1e-4, res
    assert res["restored"], res
