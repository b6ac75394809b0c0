"""`nova merge`: every method against a hand computation (float64, whole tensors, every tensor
of tiny transformers-built models, small odd chunks so chunk seams are crossed), ExPO alpha=0
bit for bit, sharded in -> sharded out, transformers loading the result (causal LM and
sequence classification), mismatched inputs and an existing --out refused with nothing
written, an interrupted merge leaving nothing, the preference scorer against unbatched
forwards, and the alpha sweep picking the alpha a constructed reward model makes best."""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nova_engine.tools.merge import ExPO, Linear, Slerp, TaskArithmetic, Ties, main, merge_models
from nova_engine.tools.merge.methods import SLERP_DOT_THRESHOLD
from nova_engine.tools.merge.safetensors_io import SafetensorsDir

CHUNK = 777  # odd, smaller than most tensors: every tensor is combined in several chunks
TOK_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                bos_token_id=0, eos_token_id=4, pad_token_id=5)  # fmt: skip
    return LlamaConfig(**{**base, **kw})


def _save(path, model, tok_dir, shard=None, dtype=torch.float32):
    model.to(dtype).save_pretrained(path, max_shard_size=shard or "1GB")
    for f in TOK_FILES:
        shutil.copy(os.path.join(tok_dir, f), path)
    return str(path)


def _family(root, tok_dir, name, cls="causal", n=3, scale=0.05, shard=None,
            dtype=torch.float32, seed=0, **cfg):  # fmt: skip
    """n related models (the first, then the first + scale * noise; `scale` may be a list per
    model), saved under root/name_i."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    klass = LlamaForCausalLM if cls == "causal" else LlamaForSequenceClassification
    model = klass(_config(**cfg, **({} if cls == "causal" else {"num_labels": 1}))).eval()
    first = {k: v.clone() for k, v in model.state_dict().items()}
    dirs = []
    for i in range(n):
        with torch.no_grad():
            for k, p in model.state_dict().items():
                sc = scale[i] if isinstance(scale, list) else scale
                p.copy_(first[k] + (sc * torch.randn_like(p) if i else 0))
        dirs.append(_save(root / f"{name}_{i}", model, tok_dir, shard, dtype))
    return dirs


def _tensors(d):
    with SafetensorsDir(d) as st:
        return {n: st.read(n).view(st.tensors[n].shape) for n in st.tensors}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from nova_engine.data.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def fam(tmp_path_factory, tok_dir):
    """base + two fine-tunes + one close to base (float32, single file); two in bfloat16,
    sharded."""
    root = tmp_path_factory.mktemp("models")
    return {
        "f32": _family(root, tok_dir, "f32", n=4, scale=[0, 0.05, 0.05, 0.01]),
        "bf16": _family(root, tok_dir, "bf16", n=2, shard="40KB", dtype=torch.bfloat16, seed=1),
        "root": root,
    }


# ------------------------------------------------------------------ hand computations (fp64)


def _ref_slerp(a, b, t):
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = float(a64 @ b64 / (a64.norm() * b64.norm()))
    if abs(cos) > SLERP_DOT_THRESHOLD:
        return (1 - t) * a.double() + t * b.double()
    om = torch.acos(torch.tensor(cos, dtype=torch.float64))
    return (torch.sin((1 - t) * om) * a.double() + torch.sin(t * om) * b.double()) / torch.sin(om)


def _ref_ties(base, models, density, weights, lam):
    taus = []
    for m, w in zip(models, weights):
        tau = m - base  # float32, as the merge computes it, so the trim picks the same entries
        k = max(1, int(density * tau.numel() + 0.5))
        thr = torch.topk(tau.abs().flatten(), k).values[-1]
        taus.append(w * (tau * (tau.abs() >= thr)).double())
    total = torch.stack(taus).sum(0)
    sign = torch.where(total >= 0, 1.0, -1.0).double()  # a tie elects + (mergekit)
    num = sum(t * (t.sign() == sign) for t in taus)
    den = sum(w * (t.sign() == sign).double() for t, w in zip(taus, weights))
    den[den == 0] = 1
    return base.double() + lam * num / den


def _hand(method, sds, name):
    x = [sd[name] for sd in sds]
    d = [t.double() for t in x]
    if isinstance(method, ExPO):
        return d[1] + method.alpha * (d[1] - d[0])
    if isinstance(method, Linear):
        w = method.weights
        return sum(wi * t for wi, t in zip(w, d)) / sum(w)
    if isinstance(method, TaskArithmetic):
        return d[0] + sum(wi * (t - d[0]) for wi, t in zip(method.weights, d[1:]))
    if isinstance(method, Slerp):
        return _ref_slerp(x[0], x[1], method.t)
    return _ref_ties(x[0], x[1:], method.density, method.weights or [1.0] * (len(x) - 1),
                     method.lam)  # fmt: skip


METHODS = [
    (ExPO(0.3), [0, 1]),
    (ExPO(-0.4), [0, 2]),
    (Linear([0.5, 0.2, 0.7]), [0, 1, 2]),
    (TaskArithmetic([0.6, -0.3]), [0, 1, 2]),
    (Slerp(0.3), [1, 2]),
    (Slerp(0.75), [0, 3]),  # near-parallel tensors (the norm weights) take the lerp fallback
    (Ties(0.3, None, 1.0), [0, 1, 2]),
    (Ties(0.15, [0.7, 1.3], 0.8), [0, 1, 2]),
]


def test_methods_match_hand_computation_on_every_tensor(fam, tmp_path):
    sds = [load_file(os.path.join(d, "model.safetensors")) for d in fam["f32"]]
    for k, (method, idx) in enumerate(METHODS):
        out = tmp_path / f"out{k}"
        res = merge_models(method, [fam["f32"][i] for i in idx], str(out), chunk_elems=CHUNK)
        merged = load_file(out / "model.safetensors")
        assert set(merged) == set(sds[0]) and res.n_tensors == len(sds[0])
        for name, t in merged.items():
            ref = _hand(method, [sds[i] for i in idx], name)
            assert t.dtype == torch.float32 and t.shape == ref.shape
            torch.testing.assert_close(t.double(), ref, rtol=2e-6, atol=2e-7,
                                       msg=lambda m, n=name, me=method: f"{me} {n}: {m}")  # fmt: skip
        if isinstance(method, Ties):  # the trim really trimmed: most entries stay at base
            name = "model.layers.0.mlp.up_proj.weight"
            moved = (merged[name] != sds[0][name]).double().mean()
            assert 0 < moved <= 2 * method.density
        # the reference model's non-weight files came along, unchanged
        ref_dir = fam["f32"][idx[method.reference]]
        for f in ("config.json", "generation_config.json", *TOK_FILES):
            with open(out / f, "rb") as a, open(os.path.join(ref_dir, f), "rb") as b:
                assert a.read() == b.read(), f
        rec = json.loads((out / "nova_merge.json").read_text())
        assert rec["method"] == method.name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kth_largest_abs_matches_topk(dtype):
    """TIES's streamed radix select vs torch.topk, with duplicates, zeros, odd chunks."""
    from nova_engine.tools.merge.methods import kth_largest_abs

    gen = torch.Generator().manual_seed(0)
    for n in (1, 13, 5003):
        x = torch.randn(n, generator=gen, dtype=dtype)
        x[: n // 3] = -x[n // 3 : 2 * (n // 3)]  # ties in |x|
        x[::7] = 0
        for k in sorted({1, max(1, n // 5), (n + 1) // 2, n}):
            chunks = lambda x=x: (x[s : s + 97] for s in range(0, len(x), 97))
            got = kth_largest_abs(chunks, k, dtype)
            assert got == float(torch.topk(x.abs(), k).values[-1]), (n, k)


def test_slerp_fallback_really_taken(fam):
    """Slerp(0.75) on models 0/3 above is a lerp for the norm weights (all ~1, parallel) and a
    real slerp for the random matrices: both branches occur."""
    sds = [load_file(os.path.join(d, "model.safetensors")) for d in fam["f32"][::3]]
    cos = {
        n: float(torch.nn.functional.cosine_similarity(sds[0][n].flatten().double(),
                                                       sds[1][n].flatten().double(), dim=0))
        for n in sds[0]
    }  # fmt: skip
    assert any(abs(c) > SLERP_DOT_THRESHOLD for c in cos.values())
    assert any(abs(c) < SLERP_DOT_THRESHOLD for c in cos.values())


def test_expo_alpha0_bit_exact_sharded_and_loadable(fam, tmp_path):
    from transformers import LlamaForCausalLM

    init, aligned = fam["bf16"]
    out = tmp_path / "a0"
    assert main(["expo", "--init", init, "--aligned", aligned, "--alpha", "0",
                 "--out", str(out), "--chunk-elems", str(CHUNK)]) == 0  # fmt: skip
    a, o = _tensors(aligned), _tensors(out)
    assert set(a) == set(o)
    for n in a:  # bit for bit
        assert o[n].dtype == torch.bfloat16 and torch.equal(o[n].view(torch.int16),
                                                            a[n].view(torch.int16)), n  # fmt: skip
    # sharded in -> sharded out, with the aligned model's layout
    idx_a = json.loads(open(os.path.join(aligned, "model.safetensors.index.json")).read())
    idx_o = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(idx_a["weight_map"].values())) > 2
    assert idx_o["weight_map"] == idx_a["weight_map"]
    assert idx_o["metadata"]["total_size"] == sum(t.numel() * 2 for t in o.values())
    # alpha=0.5, resharded, loads in transformers with exactly the hand-computed weights
    out2 = tmp_path / "a05"
    assert main(["expo", "--init", init, "--aligned", aligned, "--alpha", "0.5",
                 "--out", str(out2), "--max-shard-size", "30KB"]) == 0  # fmt: skip
    files = [f for f in os.listdir(out2) if f.endswith(".safetensors")]
    assert len(files) > 3 and all(os.path.getsize(out2 / f) < 30_000 + 4096 or
                                  len(safe_open(str(out2 / f), "pt").keys()) == 1
                                  for f in files)  # fmt: skip
    model, info = LlamaForCausalLM.from_pretrained(out2, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.dtype == torch.bfloat16
    i = _tensors(init)
    for n, p in model.state_dict().items():
        want = (a[n].double() + 0.5 * (a[n].double() - i[n].double())).to(torch.bfloat16)
        diff = (p.double() - want.double()).abs()  # fp32 math vs fp64: at most 1 bf16 ulp
        assert (diff <= 2**-8 * want.double().abs() + 1e-30).all(), n


def test_sequence_classification_merge_loads(tmp_path, tok_dir):
    from transformers import AutoModelForSequenceClassification

    dirs = _family(tmp_path, tok_dir, "rm", cls="seqcls", n=3, seed=2)
    out = tmp_path / "rm_ta"
    assert main(["task_arithmetic", "--base", dirs[0], "--models", dirs[1], dirs[2],
                 "--weights", "0.5", "0.5", "--out", str(out)]) == 0  # fmt: skip
    model, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    sds = [_tensors(d) for d in dirs]
    for n, p in model.state_dict().items():
        want = sds[0][n].double() + 0.5 * (sds[1][n] - sds[0][n]) + 0.5 * (sds[2][n] - sds[0][n])
        torch.testing.assert_close(p.double(), want.double(), rtol=2e-6, atol=2e-7)


def _listing(d):
    return sorted(os.listdir(d))


def test_mismatches_refused_and_nothing_written(fam, tmp_path, tok_dir, capsys):
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    base = fam["f32"][0]
    root = tmp_path / "bad"
    root.mkdir()
    torch.manual_seed(3)
    bad = {
        "vocab": _save(root / "v", LlamaForCausalLM(_config(vocab_size=520)), tok_dir),
        "shape": _save(root / "s", LlamaForCausalLM(_config(intermediate_size=40)), tok_dir),
        "architectures": _save(
            root / "a", LlamaForSequenceClassification(_config(num_labels=1)), tok_dir
        ),  # fmt: skip
        "dtype": _save(root / "d", LlamaForCausalLM(_config()), tok_dir, dtype=torch.bfloat16),
    }
    names_dir = root / "n"  # one tensor dropped from an otherwise identical model
    shutil.copytree(base, names_dir)
    sd = load_file(names_dir / "model.safetensors")
    sd.pop("model.layers.1.mlp.up_proj.weight")
    from safetensors.torch import save_file

    save_file(sd, names_dir / "model.safetensors", {"format": "pt"})
    bad["names"] = str(names_dir)
    out_parent = tmp_path / "outs"
    out_parent.mkdir()
    for what, other in bad.items():
        for argv in (["expo", "--init", other, "--aligned", base, "--alpha", "0.3"],
                     ["ties", "--base", base, "--models", fam["f32"][1], other]):  # fmt: skip
            capsys.readouterr()
            assert main([*argv, "--out", str(out_parent / "o")]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and what.rstrip("s").split()[0] in err, err
            assert "tensor names" in err if what == "names" else True
            assert _listing(out_parent) == []  # nothing written, no temp dir left


def test_out_exists_refused_overwrite_replaces(fam, tmp_path, capsys):
    init, aligned = fam["f32"][:2]
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["expo", "--init", init, "--aligned", aligned, "--alpha", "0.2", "--out", str(out)]
    assert main(argv) == 2
    assert "exists" in capsys.readouterr().err and _listing(out) == ["keep.txt"]
    assert main([*argv, "--overwrite"]) == 0
    assert "keep.txt" not in _listing(out) and "model.safetensors" in _listing(out)
    assert _listing(tmp_path) == ["o"]
    # an input as --out is refused even with --overwrite
    assert main(["expo", "--init", init, "--aligned", aligned, "--alpha", "0.2",
                 "--out", aligned, "--overwrite"]) == 2  # fmt: skip
    assert "overlaps" in capsys.readouterr().err


def test_interrupted_merge_leaves_nothing(fam, tmp_path, monkeypatch):
    calls = {"n": 0}
    orig = ExPO.combine

    def flaky(self, get, state):
        calls["n"] += 1
        if calls["n"] == 20:
            raise RuntimeError("disk on fire")
        return orig(self, get, state)

    monkeypatch.setattr(ExPO, "combine", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        merge_models(ExPO(0.3), fam["bf16"], str(tmp_path / "o"), chunk_elems=CHUNK)
    assert calls["n"] == 20 and _listing(tmp_path) == []


# ----------------------------------------------------------------------------- scoring


def _pairs_file(path, n_pairs, seed=0):
    """Distinct prompt/response texts (drawn from the tiny tokenizer's words)."""
    import random

    rng = random.Random(seed)
    words = "the answer is one two three four five six seven eight nine plus minus".split()
    lines = []
    for i in range(n_pairs):
        c, r = (" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) for _ in range(2))
        lines.append({"prompt": f"What is {i} plus {i + 1}?", "chosen": c + " ok",
                      "rejected": r + " no"})  # fmt: skip
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def test_policy_scorer_matches_unbatched_forward(tmp_path, tok_dir):
    from transformers import LlamaForCausalLM

    from nova_engine.tools.merge.score import PairScorer, load_pairs

    pol, ref = _family(tmp_path, tok_dir, "pol", n=2, scale=0.5, seed=4)
    pairs = load_pairs(_pairs_file(tmp_path / "p.jsonl", 7), pol)
    got = PairScorer(pairs, "policy", ref_dir=ref, batch_size=3)(pol)

    def logp(model, s):
        ids = torch.as_tensor(s.tokens)[None]
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        picked = lp.gather(-1, ids[0, 1:, None])[:, 0]
        return float((picked * torch.as_tensor(s.loss_mask[1:], dtype=torch.float64)).sum())

    mp, mr = (LlamaForCausalLM.from_pretrained(d).eval() for d in (pol, ref))
    d_lp = [logp(mp, p.chosen) - logp(mp, p.rejected) for p in pairs]
    d_imp = [d - (logp(mr, p.chosen) - logp(mr, p.rejected)) for d, p in zip(d_lp, pairs)]
    for key, d in (("logp", d_lp), ("implicit", d_imp)):
        assert got[f"{key}_accuracy"] == sum(x > 0 for x in d) / len(d)
        assert got[f"{key}_margin"] == pytest.approx(sum(d) / len(d), rel=1e-4, abs=1e-4)
    assert 0 < got["logp_accuracy"] < 1  # a case that can tell the metrics apart


def test_sweep_picks_the_constructed_best_alpha(tmp_path, tok_dir, capsys):
    """A reward model whose score head alone differs between init and aligned:
    w(alpha) = u1 + (0.5 - alpha) K u2 after ExPO, and the pairs are labelled by u1, so
    alpha = 0.5 ranks every pair right while alpha 0.1 / 1 / 2 misrank the pairs whose u2
    component outweighs their u1 component."""
    from transformers import LlamaForSequenceClassification

    from nova_engine.data.formats import read_pref_jsonl
    from nova_engine.data.tokenize import ChatTokenizer

    torch.manual_seed(5)
    model = LlamaForSequenceClassification(_config(num_labels=1)).eval()
    raw = _pairs_file(tmp_path / "raw.jsonl", 24, seed=1)
    ct = ChatTokenizer(tok_dir)
    recs, _ = read_pref_jsonl(raw)

    def h(rec, resp):  # final hidden state at the last token
        ids, _ = ct.encode_response(rec.prompt, resp)
        with torch.no_grad():
            return model.model(torch.as_tensor(ids)[None]).last_hidden_state[0, -1].double()

    q, _ = torch.linalg.qr(torch.randn(32, 2, dtype=torch.float64))
    u1, u2 = q[:, 0], q[:, 1]
    lines, d_uv = [], []
    for rec in recs:  # orient every pair by u1
        d = h(rec, rec.chosen) - h(rec, rec.rejected)
        du, dv = float(u1 @ d), float(u2 @ d)
        c, r = rec.chosen[0]["content"], rec.rejected[0]["content"]
        if du < 0:
            c, r, du, dv = r, c, -du, -dv
        lines.append({"prompt": rec.prompt[0]["content"], "chosen": c, "rejected": r})
        d_uv.append((du, dv))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    K, alphas = 10.0, [0.1, 0.5, 1.0, 2.0]
    expected = {a: sum(du + (0.5 - a) * K * dv > 0 for du, dv in d_uv) / len(d_uv) for a in alphas}
    assert expected[0.5] == 1.0 and max(v for a, v in expected.items() if a != 0.5) < 0.95

    dirs = []
    for name, s in (("init", 0.0), ("aligned", 1.0)):  # w(s) = u1 + (1.5 - s) K u2
        with torch.no_grad():
            model.score.weight.copy_((u1 + (1.5 - s) * K * u2).float()[None])
        dirs.append(_save(tmp_path / name, model, tok_dir))
    out = tmp_path / "best"
    assert main(["expo", "--init", dirs[0], "--aligned", dirs[1], "--alphas", "0.1,0.5,1.0,2.0",
                 "--eval", str(tmp_path / "eval.jsonl"), "--out", str(out), "--keep-all",
                 "--batch-size", "5"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "rm_accuracy" in printed and "kept alpha=0.5" in printed
    rows = json.loads((out / "nova_merge.json").read_text())["sweep"]["rows"]
    assert [r["alpha"] for r in rows if r["selected"]] == [0.5]
    for r in rows:
        assert r["n_pairs"] == 24
        assert abs(r["rm_accuracy"] - expected[r["alpha"]]) <= 1 / 24 + 1e-9, r
    got = _tensors(out)["score.weight"].double()[0]
    torch.testing.assert_close(got, u1, rtol=0, atol=1e-6)
    # a bad eval line is refused before any candidate is written
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[0]) + "\n" + '{"prompt": "x", "chosen": "y"}\n')
    assert main(["expo", "--init", dirs[0], "--aligned", dirs[1], "--alphas", "0.5",
                 "--eval", str(bad), "--out", str(tmp_path / "never")]) == 2  # fmt: skip
    assert f"{bad}:2:" in capsys.readouterr().err and not (tmp_path / "never").exists()
    kept = _listing(tmp_path / "best.candidates")
    assert kept == ["alpha_0.1", "alpha_1", "alpha_2"]
    assert not [f for f in _listing(tmp_path) if f.startswith(".")]  # no work dir left


def test_non_finite_merged_weights_are_refused(fam, tmp_path, capsys):
    """A NaN in one input tensor (at an odd element, in a later chunk), and a finite merge
    that overflows --dtype float16: one line naming the tensor, exit 2, nothing written (not
    even over a previous output with --overwrite)."""
    from safetensors.torch import save_file

    init, aligned = fam["f32"][:2]
    poisoned = tmp_path / "poisoned"
    shutil.copytree(aligned, poisoned)
    sd = load_file(poisoned / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    flat = sd[name].flatten()
    flat[1001] = float("nan")
    sd[name] = flat.view_as(sd[name])
    save_file(sd, poisoned / "model.safetensors", {"format": "pt"})
    outs = tmp_path / "outs"
    outs.mkdir()
    argv = ["expo", "--init", init, "--aligned", str(poisoned), "--alpha", "0.3",
            "--out", str(outs / "o"), "--chunk-elems", str(CHUNK)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"merged tensor {name!r} has 1 non-finite value(s)" in err[0], err
    n = flat.numel()
    assert f"elements {CHUNK}..{min(n, 2 * CHUNK) - 1} of {n}" in err[0], err
    assert "nothing written" in err[0]
    assert _listing(outs) == []
    # finite inputs, but alpha * (aligned - init) past float16's range (65504)
    assert main(["expo", "--init", init, "--aligned", aligned, "--alpha", "1e7",
                 "--dtype", "float16", "--out", str(outs / "o")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "non-finite value(s)" in err and "as F16" in err, err
    assert _listing(outs) == []
    # a previous output is kept as it was
    assert main(["expo", "--init", init, "--aligned", aligned, "--alpha", "0.1",
                 "--out", str(outs / "o")]) == 0  # fmt: skip
    before = load_file(outs / "o" / "model.safetensors")
    assert main([*argv, "--overwrite"]) == 2
    after = load_file(outs / "o" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert _listing(outs) == ["o"]


def test_every_method_prints_one_summary_line(fam, tmp_path, capsys):
    """#32: each method (slerp and ties included) says what it wrote: one stdout line naming
    the method, its parameters, the tensor count and the output directory, which holds the
    merge of the inputs (checked against the hand computation for slerp)."""
    base, a, b, _ = fam["f32"]
    runs = {
        "expo": ["--init", base, "--aligned", a, "--alpha", "0.3"],
        "linear": ["--models", base, a, b, "--weights", "0.5", "0.3", "0.2"],
        "task_arithmetic": ["--base", base, "--models", a, b, "--weights", "0.7", "0.5"],
        "slerp": ["--models", a, b, "--t", "0.4"],
        "ties": ["--base", base, "--models", a, b, "--density", "0.3"],
    }
    n_tensors = len(_tensors(base))
    for method, args in runs.items():
        out = tmp_path / method
        assert main([method, *args, "--out", str(out)]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 1, (method, lines)
        assert lines[0].startswith(method) and f"{n_tensors} tensors" in lines[0], lines
        assert str(out) in lines[0] and (out / "model.safetensors").is_file(), lines
    got, ta, tb = _tensors(tmp_path / "slerp"), _tensors(a), _tensors(b)
    name = "model.layers.0.self_attn.q_proj.weight"
    ref = _ref_slerp(ta[name], tb[name], 0.4)
    torch.testing.assert_close(got[name].double(), ref, rtol=1e-5, atol=1e-6)
