"""Generation on the megatron chunks at TP1, TP2 (+SP), PP2 (+VP2), tiny Llama and Qwen2:
greedy tokens equal `transformers.generate` (also through ModelEngine.generate); sampled outputs are the same at every layout
and batch composition for the same seed; generated log-probs and entropies equal the
packed training forward's (through nova_kernels.linear_logprobs as the stages use it);
per-sequence stop tokens and max lengths; `nova generate` end to end under DP2.

One spawned group of 2 gloo ranks runs everything (megatron's groups are rebuilt per
layout); where the layout leaves DP2, the second replica runs another batch composition.
"""

from __future__ import annotations

import json

import pytest
import torch

from nova_engine.parallel.spawn import run_distributed

pytestmark = pytest.mark.slow  # one spawned group of generation runs per layout

PROMPT_LENS = [7, 3, 12, 5, 9]
NEW = 10
# (tp, pp, vpp, sp); the first three for both families, the rest for llama
LAYOUTS = [(1, 1, None, False), (2, 1, None, False), (1, 2, None, False)]
LLAMA_EXTRA = [(2, 1, None, True), (1, 2, 2, False)]
BACKEND_LAYOUTS = [(2, 1, None, False), (1, 2, None, False)]


def _params(**kw):
    from nova_engine.generate import SamplingParams

    base = dict(temperature=0.9, top_k=40, top_p=0.95, n=2, seed=5, max_new_tokens=8,
                return_entropy=True)  # fmt: skip
    base.update(kw)
    return SamplingParams(**base)


def _training_logprobs(chunks, ps, prompts, gens):
    """Per-token (logp, entropy) of each generated sequence from the packed training
    forward: the pipeline schedule, packed THD batch, last-stage hidden states through
    nova_kernels.linear_logprobs."""
    from nova_engine.data.packing import PackedBatch
    from nova_engine.data.sample import Sample
    from nova_engine.model.packed import packed_forward
    from nova_engine.parallel.pipeline import forward_backward
    from nova_kernels import linear_logprobs

    samples = [
        Sample(prompts[g.prompt] + g.tokens, [0] * len(prompts[g.prompt]) + [1] * len(g.tokens))
        for gs in gens
        for g in gs
    ]
    # two micro-batches of one length (the interleaved schedule needs >= PP of them)
    half = len(samples) // 2
    parts = [samples[:half], samples[half:]]
    width = max(sum(len(x) for x in p) for p in parts)
    width = -(-width // ps.tp) * ps.tp
    mbs = [PackedBatch.from_samples(p, pad_to_length=width) for p in parts]
    chunks[-1].return_hidden = True
    for c in chunks:
        c.eval()

    def step(model, mb):
        out = packed_forward(model, mb)

        def loss_fn(hidden):
            lp, ent = linear_logprobs(
                hidden.reshape(-1, hidden.shape[-1]), model.lm_head_weight(), mb.labels,
                tp_group=ps.tp_group if ps.tp > 1 else None, return_entropy=True,
                sequence_parallel=ps.sp, temperature=_params().temperature,  # the sampler's T
            )  # fmt: skip
            keep = mb.labels != -100
            return hidden.sum() * 0, torch.tensor(1), {"lp": lp[keep], "ent": ent[keep]}

        return out, loss_fn

    with torch.no_grad():
        res = forward_backward(chunks, ps, mbs, step, seq_length=width, forward_only=True)
    chunks[-1].return_hidden = False
    if not res:
        return None
    return torch.cat([r["lp"] for r in res]), torch.cat([r["ent"] for r in res])


def _backend_checks(chunks, ps, arch, prompts, greedy, other_dir):
    """The rollout backend: generate = generate(); update_weights(all HF tensors of another
    model) -> that model's greedy tokens; partial q/k/v and unknown names refused."""
    from safetensors.torch import load_file

    from nova_engine.generate import generate
    from nova_engine.generate.backend import EngineRolloutBackend, RolloutBackend
    from nova_engine.model.hf_io import CheckpointError

    backend = EngineRolloutBackend(chunks, ps, arch)
    assert isinstance(backend, RolloutBackend)
    same = [o[0].tokens for o in backend.generate(prompts, greedy)]
    assert same == [o[0].tokens for o in generate(chunks, ps, arch, prompts, greedy)]
    tensors = load_file(f"{other_dir}/model.safetensors")
    errors = []
    for bad in ({"model.layers.0.self_attn.q_proj.weight": tensors["model.layers.0.self_attn.q_proj.weight"]},
                {"model.layers.9.mlp.up_proj.weight": tensors["model.layers.0.mlp.up_proj.weight"]}):  # fmt: skip
        try:
            backend.update_weights(bad.items())
        except CheckpointError as e:
            errors.append(str(e))
    backend.update_weights(tensors.items())
    return [o[0].tokens for o in backend.generate(prompts, greedy)], errors


def _layout_run(family, layout, model_dir, prompts, eos, other_dir=None):
    from nova_engine.generate import Request, generate
    from nova_engine.model.arch import load_arch
    from nova_engine.model.build import build_model
    from nova_engine.model.hf_io import load_hf_weights
    from nova_engine.parallel.state import destroy_parallel, initialize_parallel

    tp, pp, vpp, sp = layout
    ps = initialize_parallel(tp=tp, pp=pp, vpp=vpp, sp=sp)
    arch = load_arch(model_dir)
    chunks = build_model(arch, ps)
    load_hf_weights(chunks, arch, ps, model_dir)
    out: dict = {}
    greedy = _params(temperature=0.0, n=1, max_new_tokens=NEW, stop_token_ids=(eos,),
                     return_entropy=False)  # fmt: skip
    if ps.dp_rank == 0:
        out["greedy"] = [o[0].tokens for o in generate(chunks, ps, arch, prompts, greedy)]
        sampled = generate(chunks, ps, arch, prompts, _params(), max_batch_size=3)
        out["sampled"] = [[g.tokens for g in o] for o in sampled]
        lp = torch.tensor([x for o in sampled for g in o for x in g.logprobs])
        ent = torch.tensor([x for o in sampled for g in o for x in g.entropies])
        ref = _training_logprobs(chunks, ps, prompts, sampled)
        if ref is not None:
            out["logprob_err"] = (lp - ref[0]).abs().max().item()
            out["entropy_err"] = (ent - ref[1]).abs().max().item()
        if layout == (1, 2, None, False):  # per-sequence stops and lengths, across stages
            stop = out["greedy"][0][3]
            reqs = [Request(prompts[0], index=0, stop_token_ids=[stop]),
                    Request(prompts[1], index=1, max_new_tokens=2), Request(prompts[2], index=2)]  # fmt: skip
            o = generate(chunks, ps, arch, reqs, greedy)
            out["per_seq"] = [(g[0].tokens, g[0].finish_reason) for g in o]
        if other_dir is not None:
            out["backend"] = _backend_checks(chunks, ps, arch, prompts, greedy, other_dir)
        if family == "llama" and layout == (2, 1, None, False):  # ModelEngine delegates
            from nova_engine.train.engine import ModelEngine

            eng = ModelEngine(arch, ps, weights_dir=model_dir, trainable=False)
            out["engine_greedy"] = [o[0].tokens for o in eng.generate(prompts, greedy)]
    elif ps.dp_rank == 1:  # another batch composition: a reversed subset, one row per batch
        order = [3, 0, 4]
        reqs = [Request(prompts[j], index=j) for j in order]
        sub = generate(chunks, ps, arch, reqs, _params(), max_batch_size=1)
        out["subset"] = {j: [g.tokens for g in o] for j, o in zip(order, sub)}
    destroy_parallel()
    return out


def _worker(rank, world, dirs, prompts, eos, cli, other_dir):
    from nova_engine.tools.generate import main as generate_main

    out = {}
    for family, model_dir in dirs.items():
        layouts = LAYOUTS + (LLAMA_EXTRA if family == "llama" else [])
        for layout in layouts:
            other = other_dir if family == "llama" and layout in BACKEND_LAYOUTS else None
            out[(family, layout)] = _layout_run(
                family, layout, model_dir, prompts, eos[family], other
            )
    # the command under DP2: lines split over the replicas, gathered, written by rank 0
    out["cli_rc"] = generate_main(cli)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from transformers import AutoTokenizer

    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.model.tiny import build_tiny_hf_model

    root = tmp_path_factory.mktemp("generate")
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(6, 1000, (n,), generator=g).tolist() for n in PROMPT_LENS]
    dirs, refs, eos = {}, {}, {}
    for family in ("llama", "qwen2"):
        d = str(root / family)
        model = build_tiny_hf_model(d, family, seed=3)
        eos[family] = 2  # a token the greedy runs may emit (tiny Qwen2's default is not)
        with torch.no_grad():
            refs[family] = [
                model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False,
                               eos_token_id=eos[family], pad_token_id=0)[0, len(p):].tolist()
                for p in prompts
            ]  # fmt: skip
        dirs[family] = d
    # another Llama (same shapes, other weights) for the backend's update_weights
    other = build_tiny_hf_model(str(root / "llama_b"), "llama", seed=8)
    with torch.no_grad():
        refs["llama_b"] = [
            other.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False,
                           eos_token_id=2, pad_token_id=0)[0, len(p):].tolist()
            for p in prompts
        ]  # fmt: skip
    # the command's model: the tiny tokenizer's vocabulary, tokenizer saved alongside
    cli_dir = root / "cli_model"
    build_tiny_tokenizer(str(root / "tok"))
    tok = AutoTokenizer.from_pretrained(str(root / "tok"))
    build_tiny_hf_model(str(cli_dir), "llama", vocab_size=len(tok), seed=4)
    tok.save_pretrained(str(cli_dir))
    lines = [{"id": "a", "prompt": "What is 12 plus 7?"},
             {"id": "b", "messages": [{"role": "user", "content": "Answer with the number only."}],
              "max_new_tokens": 2},
             {"id": "c", "prompt": "hello", "stop": ["<|eot_id|>"]}]  # fmt: skip
    (root / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cli = ["--model", str(cli_dir), "--prompts", str(root / "in.jsonl"), "--out",
           str(root / "out.jsonl"), "--temperature", "0.8", "--num-samples", "2", "--seed", "3",
           "--max-new-tokens", "6", "--entropy"]  # fmt: skip
    results = run_distributed(_worker, 2, dirs, prompts, eos, cli, str(root / "llama_b"))
    return prompts, refs, results, root, lines


def _layouts(family):
    return LAYOUTS + (LLAMA_EXTRA if family == "llama" else [])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_equals_transformers_at_every_layout(runs, family):
    _, refs, results, _, _ = runs
    for layout in _layouts(family):
        got = results[0][(family, layout)]["greedy"]
        assert got == refs[family], f"{family} {layout}"
    if family == "llama":  # through ModelEngine.generate (a frozen engine at TP2)
        assert results[0][(family, (2, 1, None, False))]["engine_greedy"] == refs[family]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_sampling_is_independent_of_layout_and_batching(runs, family):
    prompts, _, results, _, _ = runs
    base = results[0][(family, LAYOUTS[0])]["sampled"]
    assert all(len(s) == 2 for s in base) and base[0][0] != base[0][1]  # n=2, distinct
    for layout in _layouts(family)[1:]:
        assert results[0][(family, layout)]["sampled"] == base, f"{family} {layout}"
    # rank 1 = DP replica 1 at TP1: reversed subset, one row per batch
    for j, samples in results[1][(family, LAYOUTS[0])]["subset"].items():
        assert samples == base[j], f"{family} prompt {j}"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_logprobs_equal_the_training_forward(runs, family):
    _, _, results, _, _ = runs
    for layout in _layouts(family):
        errs = [r[(family, layout)] for r in results if "logprob_err" in r[(family, layout)]]
        assert errs, f"{family} {layout}: no last-stage result"
        for e in errs:
            assert e["logprob_err"] <= 1e-5, f"{family} {layout}: {e['logprob_err']:.3g}"
            assert e["entropy_err"] <= 1e-5, f"{family} {layout}: {e['entropy_err']:.3g}"


def test_stop_tokens_and_max_length_per_sequence(runs):
    _, _, results, _, _ = runs
    for family in ("llama", "qwen2"):
        r = results[0][(family, (1, 2, None, False))]
        greedy = r["greedy"]
        (t0, f0), (t1, f1), (t2, f2) = r["per_seq"]
        stop = greedy[0][3]
        assert t0 == greedy[0][: greedy[0].index(stop) + 1] and f0 == "stop"
        assert t1 == greedy[1][:2] and f1 == "length"
        assert t2 == greedy[2]


def test_nova_generate_command_under_dp2(runs):
    _, _, results, root, lines = runs
    assert [r["cli_rc"] for r in results] == [0, 0]
    out = [json.loads(x) for x in (root / "out.jsonl").read_text().splitlines()]
    assert [o["id"] for o in out] == ["a", "b", "c"]
    for rec, src in zip(out, lines):
        assert {k: rec[k] for k in src} == src  # input fields kept
        assert len(rec["response"]) == len(rec["tokens"]) == len(rec["logprobs"]) == 2
        for toks, lps, ents, fin in zip(rec["tokens"], rec["logprobs"], rec["entropies"],
                                        rec["finish_reason"]):  # fmt: skip
            assert len(toks) == len(lps) == len(ents) >= 1
            assert all(lp <= 0 for lp in lps) and fin in ("stop", "length")
            limit = src.get("max_new_tokens", 6)
            assert len(toks) <= limit and (fin == "stop" or len(toks) == limit)
    assert all(len(t) <= 2 for t in out[1]["tokens"])


def test_rollout_backend_generates_and_takes_weights_by_hf_name(runs):
    _, refs, results, _, _ = runs
    for layout in BACKEND_LAYOUTS:
        tokens, errors = results[0][("llama", layout)]["backend"]
        assert tokens == refs["llama_b"], layout
        assert refs["llama_b"] != refs["llama"]
        assert "given without 'model.layers.0.self_attn.k_proj.weight'" in errors[0], errors
        assert "'model.layers.9.mlp.up_proj.weight' is not a tensor of this" in errors[1], errors
