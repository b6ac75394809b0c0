"""nova pas build-data, step by step on small fixtures with scripted teacher / judge fakes:
dedup (exact and near, exact vs MinHash LSH vs a brute-force reference), category parsing,
judge JSON parsing, malformed verdicts retried then dropped, regeneration bounded by
max_regen, the rule check, the SFT output read by the SFT reader, and file:line errors."""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest

from nova_engine.data.formats import read_sft_jsonl
from nova_engine.tools.pas import prompts as P
from nova_engine.tools.pas.dedup import (
    DedupConfig,
    MinHasher,
    deduplicate,
    jaccard,
    normalize,
    shingles,
)
from nova_engine.tools.pas.pipeline import BuildConfig, build_data
from nova_engine.tools.pas.records import (
    OTHER,
    PASError,
    PoolPrompt,
    Seed,
    parse_categories,
    read_pool,
    read_seeds,
    write_jsonl,
)

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega apple river stone cloud music garden").split()  # fmt: skip


# ------------------------------------------------------------------------------ dedup


def _reference_dedup(texts, thr, n):
    """All-pairs plain reference: keep i unless its normalized text equals a kept one's or
    its shingle Jaccard with a kept one is >= thr."""
    keep = []
    for i, t in enumerate(texts):
        words = re.sub(r"[\W_]+", " ", t.casefold()).split()
        sh = {" ".join(words[k : k + n]) for k in range(max(1, len(words) - n + 1))}
        dup = False
        for _, tj in keep:
            if words == tj[0]:
                dup = True
                break
            inter = len(sh & tj[1])
            if inter / len(sh | tj[1]) >= thr:
                dup = True
                break
        if not dup:
            keep.append((i, (words, sh)))
    return [i for i, _ in keep]


def _pool(rng, n_base=60, n_near=25, n_exact=15, lengths=(6, 18)):
    base = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(*lengths))) for _ in range(n_base)
    ]
    texts = list(base)
    for _ in range(n_near):  # one word changed in a long text
        src = rng.choice(base).split()
        src[rng.randrange(len(src))] = rng.choice(WORDS)
        texts.append(" ".join(src))
    for _ in range(n_exact):  # case and punctuation variants
        texts.append(rng.choice(base).upper() + " ?!")
    rng.shuffle(texts)
    return texts


def test_dedup_exact_and_near_against_reference():
    texts = [
        "What is the capital of France?",
        "what is the capital of france",  # exact after normalization
        "Write a Python function that reverses a linked list in place.",
        "Write a Python function that reverses a singly linked list in place.",  # near
        "Write a Rust function that parses a JSON file.",  # distinct
        "Why do cats purr?",
    ]
    r = deduplicate(texts, DedupConfig(method="exact", threshold=0.5))
    assert r.keep == [0, 2, 4, 5]
    assert r.exact == [(1, 0)]
    assert [(i, j) for i, j, _ in r.near] == [(3, 2)]
    assert r.near[0][2] == pytest.approx(
        jaccard(shingles(normalize(texts[3])), shingles(normalize(texts[2])))
    )
    rng = random.Random(3)
    for thr, n in ((0.7, 3), (0.5, 2), (0.9, 1)):
        pool = _pool(rng)
        got = deduplicate(pool, DedupConfig(method="exact", threshold=thr, ngram=n))
        assert got.keep == _reference_dedup(pool, thr, n)
        assert len(got.keep) + len(got.exact) + len(got.near) == len(pool)


def test_minhash_lsh_matches_exact_on_near_duplicates():
    rng = random.Random(11)
    pool = _pool(rng, n_base=150, n_near=60, n_exact=20, lengths=(20, 40))
    exact = deduplicate(pool, DedupConfig(method="exact"))
    lsh = deduplicate(pool, DedupConfig(method="minhash"))
    assert lsh.method == "minhash" and exact.method == "exact"
    norm = [normalize(t) for t in pool]
    sh = [shingles(t) for t in norm]
    # every LSH decision is right: exact = same normalized text as a kept prompt, near =
    # confirmed by exact Jaccard against an earlier kept prompt (LSH only prunes comparisons)
    for i, j in lsh.exact:
        assert norm[i] == norm[j] and j in lsh.keep
    for i, j, s in lsh.near:
        assert s == jaccard(sh[i], sh[j]) >= 0.7 and j in lsh.keep and j < i
    # what it misses: pairs of kept prompts at >= 0.7, few next to what exact comparison drops
    kept = lsh.keep
    missed = sum(jaccard(sh[a], sh[b]) >= 0.7 for a, b in itertools.combinations(kept, 2))
    assert len(exact.near) >= 40 and missed <= 0.1 * len(exact.near)
    auto = deduplicate(pool, DedupConfig(method="auto", exact_max=10))
    assert auto.method == "minhash" and auto.keep == lsh.keep


def test_minhash_signature_estimates_jaccard():
    h = MinHasher(num_perm=256, seed=5)
    rng = random.Random(0)
    for _ in range(5):
        a = frozenset(rng.sample(range(400), 120))
        b = frozenset(
            list(a)[: rng.randint(20, 110)] + rng.sample(range(400, 800), rng.randint(5, 60))
        )
        sa, sb = (h.signature(frozenset(map(str, x))) for x in (a, b))
        est = float((sa == sb).mean())
        assert abs(est - len(a & b) / len(a | b)) < 0.12


def test_normalize_and_cjk_shingles():
    assert normalize("  Héllo,\tWORLD!! ﬁne ") == "héllo world fine"
    assert normalize("今天天气") == "今 天 天 气"
    assert shingles("a b", 3) == frozenset({"a b"})
    assert shingles("", 3) == frozenset()
    assert shingles("a b c d", 3) == frozenset({"a b c", "b c d"})


# ------------------------------------------------------------------------------ parsing


CATS = ("qa", "coding", "math", "roleplay", OTHER)


@pytest.mark.parametrize(
    "reply,want",
    [
        ("coding", "coding"),
        ("  Math.\n", "math"),
        ("The category is: QA", "qa"),
        ('{"category": "Role-play"}', "roleplay"),
        ("role play", "roleplay"),
        ("math and coding", "math"),
        ("aquatic", OTHER),  # a name inside a word is not a match
        ("poetry", OTHER),
        ("", OTHER),
        (None, OTHER),
    ],
)
def test_parse_category(reply, want):
    assert P.parse_category(reply, CATS) == want


@pytest.mark.parametrize(
    "reply,want",
    [
        ('{"verdict": "accept", "reason": "fine"}', P.Verdict(True, "fine")),
        (
            '```json\n{"verdict": "REJECT", "reason": "answers the prompt"}\n```',
            P.Verdict(False, "answers the prompt"),
        ),
        ('Sure! {"note": 1} then {"verdict": " accept "}', P.Verdict(True, "")),
        ('{"verdict": "reject", "reason": ["too", "long"]}', P.Verdict(False, '["too", "long"]')),
        ('{"verdict": "maybe"}', None),
        ('{"verdict": "accept", "reason": "cut', None),
        ("accept", None),
        ('{"reason": "no verdict"}', None),
        ("", None),
        (None, None),
    ],
)
def test_parse_verdict(reply, want):
    assert P.parse_verdict(reply) == want


def test_clean_complement_and_script_check():
    assert P.clean_complement("Complement: Be brief.\n\nPrompt:\nnext one") == "Be brief."
    assert P.clean_complement("  Keep it short.  ") == "Keep it short."
    assert P.script_switch("Why is the sky blue?", "请简要解释原因。") is not None
    assert P.script_switch("天空为什么是蓝色的？", "请简要解释原因。") is None
    assert P.script_switch("日本の首都は？", "東京について簡潔に説明してください。") is None
    assert P.script_switch("What is 2+2?", "1 2 3") is None


# ------------------------------------------------------------------------------ pipeline


SEEDS = [
    Seed("coding", "Write a sort function.", "Name the algorithm and show examples.", "s:1"),
    Seed("coding", "Fix my loop.", "Explain the bug before the fix.", "s:2"),
    Seed("math", "What is 2+2?", "Show the steps and the final number.", "s:3"),
    Seed("qa", "Why is the sky blue?", "Explain the cause in plain words.", "s:4"),
]


class Scripted:
    """A fake Generator: reply(prompt_text) per prompt, every call recorded."""

    def __init__(self, reply):
        self.reply, self.calls = reply, []

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        return [self.reply(p) for p in prompts]


def _target(text: str) -> str:
    """The user prompt a complement / judge prompt is about."""
    if text.startswith(P.JUDGE_TASK):
        return text.split("Prompt:\n", 1)[1].split("\n\nComplement:", 1)[0]
    return text.rsplit("Prompt:\n", 1)[1].rsplit("\nComplement:", 1)[0]


def _teacher(complements: dict[str, str]):
    counter = itertools.count()

    def reply(text):
        if text.startswith("Classify"):
            p = text.split("Prompt:\n", 1)[1]
            return "coding" if "code" in p else "math" if "sum" in p else "the category: poetry"
        t = _target(text)
        return complements.get(t, f"Complement: Answer '{t}' carefully (#{next(counter)}).")

    return Scripted(reply)


def _pool_of(texts):
    return [PoolPrompt(t, f"pool.jsonl:{i + 1}", f"id{i}") for i, t in enumerate(texts)]


def test_pipeline_counts_malformed_regeneration_and_output(tmp_path):
    pool = _pool_of([
        "Please code a binary search.",       # accepted at once
        "Please code a binary search!",       # exact duplicate
        "What is the sum of 3 and 4?",        # judge: malformed once, then accept
        "Tell me a story about the moon.",    # judge: always malformed -> dropped
        "Compute the sum of a list in code.", # judge: always reject -> regenerated, dropped
        "Write a poem about rain.",           # teacher: other script -> rule-rejected, then fixed
        "An overly long prompt here.",        # judge cannot take it -> dropped_too_long
    ])  # fmt: skip
    seen: dict[str, int] = {}

    def judge_reply(text):
        t = _target(text)
        seen[t] = seen.get(t, 0) + 1
        if t.startswith("What is the sum"):
            return "not json" if seen[t] == 1 else '{"verdict": "accept", "reason": "ok"}'
        if t.startswith("Tell me"):
            return '{"verdict": "perhaps"}'
        if t.startswith("Compute"):
            return '{"verdict": "reject", "reason": "answers the prompt"}'
        if t.startswith("An overly"):
            return None
        return 'Verdict: {"verdict": "accept", "reason": "keeps the intent"}'

    rain = iter(["下雨的诗。", "Use vivid images of sound and light."])
    teacher = _teacher({})
    base = teacher.reply
    teacher.reply = lambda text: (next(rain) if not text.startswith("Classify")
                                  and _target(text).startswith("Write a poem") else base(text))  # fmt: skip
    judge = Scripted(judge_reply)
    cfg = BuildConfig(max_regen=2, judge_retries=2, shots=2)
    records, report = build_data(pool, SEEDS, teacher, judge, cfg)
    c = report["counts"]
    assert c["read"] == 7 and c["duplicates_exact"] == 1 and c["unique"] == 6
    assert report["categories"] == {"coding": 2, "math": 1, "qa": 0, OTHER: 3}
    # "Compute": generated 3 times (2 regenerations), rejected 3 times, then dropped
    assert c["dropped_rejected"] == 1 and c["rejected"] == 3
    # "Tell me": 1 + 2 retries malformed, dropped; "What is the sum": 1 malformed then parsed
    assert c["dropped_malformed"] == 1 and seen["Tell me a story about the moon."] == 3
    assert c["malformed"] == 3 + 1 and c["judge_retries"] == 2 + 1
    assert c["rule_rejected"] == 1 and c["dropped_too_long"] == 1
    assert c["accepted"] == 3 and c["written"] == 3
    assert c["regenerated"] == 2 + 1  # "Compute" twice, "Write a poem" once
    assert c["generated"] == 6 + c["regenerated"]
    assert (
        c["unique"]
        == c["written"] + c["dropped_malformed"] + c["dropped_rejected"] + c["dropped_too_long"]
    )
    assert c["judged"] == c["accepted"] + c["rejected"]
    # the judge never saw the rule-rejected Chinese complement
    assert not any("下雨" in p for call in judge.calls for p in call)
    # the rejection's reason is in the regeneration prompt, the seeds of the category in all
    compute = [p for call in teacher.calls for p in call
               if not p.startswith("Classify") and _target(p).startswith("Compute")]  # fmt: skip
    assert len(compute) == 3
    assert "answers the prompt" not in compute[0] and "answers the prompt" in compute[1]
    assert "Name the algorithm" in compute[0] and "Show the steps" not in compute[0]
    # output: pool order, chat layout, ids and categories carried, read by the SFT reader
    assert [r["id"] for r in records] == ["id0", "id2", "id5"]
    assert records[2]["messages"][1]["content"] == "Use vivid images of sound and light."
    assert records[0]["messages"][1]["content"].startswith("Answer 'Please code")  # label stripped
    path = str(tmp_path / "sft.jsonl")
    write_jsonl(path, records)
    chats, stats = read_sft_jsonl(path)
    assert stats.n_ok == 3 and [m["role"] for m in chats[1].messages] == ["user", "assistant"]
    assert chats[1].messages[0]["content"] == "What is the sum of 3 and 4?"
    assert report["examples"][0]["prompt"] == "Please code a binary search."


@pytest.mark.parametrize("max_regen", [0, 1, 3])
def test_regeneration_bounded(max_regen):
    pool = _pool_of(["Please code a parser.", "What is the sum of 2 and 9?"])
    teacher = _teacher({})
    judge = Scripted(lambda t: '{"verdict": "reject", "reason": "over-extends"}')
    records, report = build_data(pool, SEEDS, teacher, judge, BuildConfig(max_regen=max_regen))
    c = report["counts"]
    gen_calls = [call for call in teacher.calls if not call[0].startswith("Classify")]
    assert len(gen_calls) == max_regen + 1 and all(len(call) == 2 for call in gen_calls)
    assert c["regenerated"] == 2 * max_regen and c["generated"] == 2 * (max_regen + 1)
    assert c["rejected"] == 2 * (max_regen + 1) and c["dropped_rejected"] == 2
    assert records == [] and c["written"] == 0


def test_classifier_and_category_seeds():
    pool = _pool_of(["Solve x + 1 = 2.", "Sort a list."])
    classifier = Scripted(lambda t: {"Solve x + 1 = 2.": "Math", "Sort a list.": "??"}[t])
    teacher = _teacher({})
    records, report = build_data(pool, SEEDS, teacher, Scripted(lambda t: '{"verdict":"accept"}'),
                                 BuildConfig(shots=1), classifier=classifier)  # fmt: skip
    assert [r["category"] for r in records] == ["math", OTHER]
    assert not any(p.startswith("Classify") for call in teacher.calls for p in call)
    gen = teacher.calls[0]
    assert "Show the steps" in gen[0] and gen[0].count("Complement:\n") == 1
    assert report["counts"]["written"] == 2


def test_sequence_classifier_labels(tmp_path):
    import torch
    from transformers import LlamaForSequenceClassification

    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.data.tokenize import load_tokenizer
    from nova_engine.model.tiny import tiny_hf_config
    from nova_engine.tools.pas.generator import SequenceClassifier, is_sequence_classifier

    tok_dir = build_tiny_tokenizer(tmp_path / "tok", vocab_size=300)
    tok = load_tokenizer(tok_dir)
    labels = {0: "math", 1: "Coding", 2: "poetry"}
    cfg = tiny_hf_config("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()},
                         pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg).eval()
    with torch.no_grad():  # make the score head decisive
        model.score.weight.normal_(0.0, 5.0)
    model.save_pretrained(tmp_path / "cls")
    assert is_sequence_classifier(str(tmp_path / "cls")) and not is_sequence_classifier(tok_dir)
    ends = "sea? tree 42 Paris. code! rain x+1 blue ok why 7 cat".split()
    texts = [f"Prompt {i}: " + "why " * i + e for i, e in enumerate(ends)]
    got = SequenceClassifier(str(tmp_path / "cls"), tok_dir)(texts)
    with torch.no_grad():
        want = [labels[int(model(input_ids=torch.tensor([tok(t)["input_ids"]])).logits[0].argmax())]
                for t in texts]  # fmt: skip
    assert got == want and len(set(got)) >= 2
    pool = _pool_of(texts)
    accept = Scripted(lambda t: '{"verdict": "accept"}')
    records, _ = build_data(pool, SEEDS, _teacher({}), accept,
                            classifier=SequenceClassifier(str(tmp_path / "cls"), tok_dir))  # fmt: skip
    mapped = {"math": "math", "Coding": "coding", "poetry": OTHER}
    assert [r["category"] for r in records] == [mapped[g] for g in got]


# ------------------------------------------------------------------------------ inputs


def test_read_pool_and_seeds_errors(tmp_path):
    p = tmp_path / "pool.jsonl"
    p.write_text('{"prompt": "a"}\n\n{"messages": [{"role": "user", "content": "b"},'
                 ' {"role": "assistant", "content": "c"}], "id": 7}\n')  # fmt: skip
    pool = read_pool(str(p))
    assert [(x.text, x.where, x.id) for x in pool] == [("a", f"{p}:1", None), ("b", f"{p}:3", 7)]
    for line, msg in [
        ("{bad", "invalid JSON"),
        ('["x"]', "expected a JSON object"),
        ('{"text": "x"}', 'expected a "prompt" string or a "messages" list'),
        ('{"prompt": "  "}', '"prompt" is empty'),
        ('{"messages": [{"role": "assistant", "content": "x"}]}', "has no user turn"),
        ('{"messages": [{"role": "user"}]}', 'needs string "role" and "content"'),
    ]:
        p.write_text('{"prompt": "ok"}\n' + line + "\n")
        with pytest.raises(PASError, match=re.escape(f"{p}:2: ") + ".*" + re.escape(msg)):
            read_pool(str(p))
    s = tmp_path / "seeds.jsonl"
    s.write_text(json.dumps({"category": "Bad Name", "prompt": "p", "complement": "c"}) + "\n")
    with pytest.raises(PASError, match=f"{s}:1: category 'Bad Name'"):
        read_seeds(str(s))
    s.write_text(json.dumps({"category": "qa", "prompt": "p", "complement": ""}) + "\n")
    with pytest.raises(PASError, match=f'{s}:1: "complement" must be a non-empty string'):
        read_seeds(str(s))


def test_shipped_seeds_and_categories():
    seeds = read_seeds()
    cats = parse_categories(None, seeds)
    assert cats[-1] == OTHER and len(cats) >= 6
    assert all(sum(s.category == c for s in seeds) >= 2 for c in cats[:-1])
    assert parse_categories(["qa,coding", "math", "qa"], seeds) == ("qa", "coding", "math", OTHER)
    with pytest.raises(PASError, match="--categories"):
        parse_categories(["Q A"], seeds)


def test_build_data_cli_fails_when_nothing_passes(tmp_path, capsys, monkeypatch):
    """#32: `nova pas build-data` whose every prompt is rejected writes no output, exits 2
    with one line naming the counts and the first rejected example (prompt, complement,
    reason), and leaves the report with the rejected examples; one that passes prints its
    summary and writes the records."""
    from nova_engine.cli import main as nova_main
    from nova_engine.tools.pas import generator as gen_mod

    verdict = {"reply": '{"verdict": "reject", "reason": "answers the prompt itself"}'}

    class FakeModels:
        def __init__(self, **kw):
            pass

        def generator(self, model_dir, config, option):
            if option == "--judge":
                return Scripted(lambda t: verdict["reply"])
            return _teacher({"Please code a parser.": "Write the parser for them."})

        def close(self):
            pass

    monkeypatch.setattr(gen_mod, "ModelSet", FakeModels)
    pool = tmp_path / "pool.jsonl"
    pool.write_text(
        '{"prompt": "Please code a parser."}\n{"prompt": "What is the sum of 2 and 9?"}\n'
    )
    out = tmp_path / "o.jsonl"
    args = ["pas", "build-data", "--prompts", str(pool), "--teacher", "t", "--judge", "j",
            "--out", str(out), "--max-regen", "1"]  # fmt: skip
    assert nova_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"{out} NOT written" in err[0] and "dropped_rejected=2" in err[0], err
    assert "first rejected: prompt 'Please code a parser.'" in err[0], err
    assert "'Write the parser for them.': answers the prompt itself" in err[0], err
    assert not out.exists()
    report = json.loads((tmp_path / "o.jsonl.report.json").read_text())
    assert [r["prompt"] for r in report["rejected_examples"]] == [
        "Please code a parser.", "What is the sum of 2 and 9?"
    ]  # fmt: skip
    assert all(r["reason"] == "answers the prompt itself" for r in report["rejected_examples"])
    verdict["reply"] = '{"verdict": "accept", "reason": "ok"}'
    assert nova_main(args) == 0
    printed = capsys.readouterr().out
    assert f"-> {out}" in printed and "written" in printed
    assert len(read_sft_jsonl(str(out))[0]) == 2
