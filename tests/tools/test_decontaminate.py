"""`nova decontaminate`: the compiled n-gram index against the plain-Python reference
(nova_engine.data.decontam.ref_scan) on random text, the coverage rule at its boundaries,
short items, normalization, every layout, bad lines, the cleaned files byte for byte and the
report."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from nova_engine.cli import main as nova_main
from nova_engine.data.decontam import (
    LayoutError,
    build_index,
    eval_segments,
    new_index,
    normalize,
    prepare,
    ref_scan,
    scan,
    train_segments,
    words,
)
from nova_engine.data.formats import DataError
from nova_engine.tools.decontaminate import DecontamConfig, main, run

# distinct made-up words, so every n-gram of a text made from them is distinct
WORDS = [f"w{i}x{i * 7919 % 1000}" for i in range(2000)]


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _write_jsonl(path, objs) -> None:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))


# ---------------------------------------------------------------- normalization


def test_normalize_rules():
    assert words("Don't  STOP!\tnow...") == ["dont", "stop", "now"]
    assert words("ﬁnal ＡＢＣ\u00a0x—y «z»") == ["final", "abc", "xy", "z"]  # NFKC, P*, NBSP
    assert words("E\u0301té 3×4 $5 a+b") == words("Été 3×4 5 ab")  # × (a symbol) is kept
    assert normalize("a\x00b") == "a b"


def test_cpp_tokenizer_matches_python():
    """Raw ASCII goes to C++ unnormalized, other text only NFKC-normalized and lowercased: its
    words must hash like Python's fully normalized words."""
    rng = random.Random(1)
    index = new_index(3)
    ascii_chars = "aAbBzZ09 \t\n\r\x0b\x0c\x1c\x1f!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~\x01\x7f"
    other = "éÉﬁＡ\u00a0\u2028\u3000—«»¿\u0085\U0001e95e\U00020000\ud800×"  # P*, spaces, ...
    for alphabet in (ascii_chars, ascii_chars + other):
        for _ in range(200):
            raw = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
            text = prepare([raw])
            got, seg_got = index.word_hashes(text if isinstance(text, bytes) else text.encode())
            clean = " ".join(words(raw)).encode("utf-8", "surrogatepass")
            want, seg_want = index.word_hashes(clean)
            np.testing.assert_array_equal(got, want, err_msg=repr(raw))
            assert seg_got.tolist() == seg_want.tolist() == [len(words(raw))]
            assert len(set(got.tolist())) == len(set(words(raw)))  # distinct words, distinct hashes
    _, seg = index.word_hashes(b"a b\x00\x00c")
    assert seg.tolist() == [2, 2, 3]


# ---------------------------------------------------------------- the index vs the reference


def _noisy(rng: random.Random, vocab: list[str], n_words: int) -> str:
    """Words with case, punctuation and Unicode variants that normalize together."""
    out = []
    for _ in range(n_words):
        w = rng.choice(vocab)
        r = rng.random()
        out.append(w.upper() if r < 0.1 else w + rng.choice(",.!?") if r < 0.2 else w)
    return rng.choice([" ", "  ", "\n", "\u00a0", " — "]).join(out)


def test_index_equals_reference_on_random_data():
    rng = random.Random(0)
    vocab = ["a", "b", "c", "d", "e", "Ünï", "ﬁx", "ＡＢ", "e\u0301", "é", "don't", "x-y", "q«»"]
    vocab += ["\ud800z", "\u2028", "x\x00y"]  # a lone surrogate, a line separator, a NUL
    evals = [
        [_noisy(rng, vocab, rng.randint(0, 14)) for _ in range(rng.randint(1, 2))]
        for _ in range(60)
    ]
    trains = [
        [_noisy(rng, vocab, rng.randint(0, 40)) for _ in range(rng.randint(0, 3))]
        for _ in range(400)
    ]
    trains += [list(e) for e in evals[:10]]  # exact copies
    total = 0
    for n in (1, 2, 3, 5, 8):
        for threshold in (0.1, 0.3, 0.77, 1.0):
            got = scan(build_index(evals, n, threshold), trains)
            assert got == ref_scan(evals, trains, n, threshold), (n, threshold)
            total += sum(map(len, got))
    assert total > 1000  # the comparison saw many hits


def test_need_is_the_float_rule():
    rng = random.Random(3)
    evals = [[_text(rng, k)] for k in range(1, 40)]
    for threshold in (0.1, 0.3, 0.7, 1 / 3, 0.999, 1.0):
        index = build_index(evals, 3, threshold)
        for c, need in zip(index.gram_counts().tolist(), index.need().tolist()):
            assert need == min(k for k in range(1, c + 1) if k / c >= threshold)


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("threshold", [0.1, 0.3, 0.5, 0.7, 1.0])
def test_threshold_boundaries(n, threshold):
    """A training item holding exactly k of an eval item's c grams is a hit iff k/c >= t."""
    rng = random.Random(n)
    ev = rng.sample(WORDS, 10 + n - 1)  # c = 10 distinct grams
    trains = [[" ".join(ev[: k + n - 1]) if k else "unrelated words"] for k in range(11)]
    trains += [["pad pad " + t[0] + " more pad"] for t in trains]  # embedded in other words
    got = scan(build_index([[" ".join(ev)]], n, threshold), trains)
    for k in range(11):
        expect = [(0, k)] if k and k / 10 >= threshold else []
        assert got[k] == got[11 + k] == expect, k


def test_short_items_use_the_whole_item():
    n = 8
    evals = [["What is 2+2?"], ["Name three colors of the flag"], ["?!"]]
    index = build_index(evals, n, 0.5)
    assert index.gram_counts().tolist() == [1, 1, 0]  # one whole-item gram; no words, no gram
    trains = [
        ["please tell me: WHAT is 2+2 ? thanks"],  # contiguous inside a longer item: hit 0
        ["what is 2 + 2", "what is 2 and 22"],  # "2+2" is the word "22"; not contiguous
        ["name three colors of the flag"],  # the same short item
        ["name three colors"],  # a part of it
        ["?!", "...", ""],  # nothing to match the wordless item
    ]
    assert scan(index, trains) == [[(0, 1)], [], [(1, 1)], [], []]
    assert scan(index, trains) == ref_scan(evals, trains, n, 0.5)
    assert scan(build_index([["?!"]], n, 0.5), trains) == [[]] * len(trains)  # nothing indexed


def test_segments_do_not_join():
    ev = [["one two three four"]]
    assert scan(build_index(ev, 2, 1.0), [["one two", "three four"]]) == [[]]
    assert scan(build_index(ev, 2, 1.0), [["one two three four"]]) == [[(0, 3)]]


# ---------------------------------------------------------------- layouts


def test_train_layouts():
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
        {"role": "assistant", "content": "A2"},
    ]
    assert train_segments({"messages": msgs}) == ["U1", "U2"]
    assert train_segments({"messages": msgs}, all_turns=True) == ["S", "U1", "A1", "U2", "A2"]
    rlvr = {"messages": msgs[1:2], "ground_truth": "42", "dataset": "gsm8k"}
    assert train_segments(rlvr) == ["U1"]
    pair = {"prompt": "P", "chosen": "C", "rejected": "R"}
    assert train_segments(pair) == ["P"]
    assert train_segments(pair, all_turns=True) == ["P", "C", "R"]
    pair_msgs = {"prompt": msgs[:2], "chosen": [msgs[2]], "rejected": [msgs[4]]}
    assert train_segments(pair_msgs) == ["U1"]
    assert train_segments(pair_msgs, all_turns=True) == ["S", "U1", "A1", "A2"]
    tulu = {"chosen": msgs[:4] + [msgs[4]], "rejected": msgs[:4] + [msgs[2]]}
    assert train_segments(tulu) == ["U1", "U2"]
    assert train_segments(tulu, all_turns=True) == ["S", "U1", "A1", "U2", "A2", "A1"]
    for key in ("prompt", "question", "problem"):
        assert train_segments({key: "T", "answer": "x"}) == ["T"]
    with pytest.raises(LayoutError, match="keys present: answer, text"):
        train_segments({"text": "x", "answer": "y"})
    with pytest.raises(LayoutError, match="content must be a string"):
        train_segments({"messages": [{"role": "user", "content": 3}]})
    with pytest.raises(LayoutError, match="needs"):
        train_segments({"chosen": "c", "rejected": "r"})


def test_eval_layouts():
    assert eval_segments({"question": "Q", "answer": "7"}) == ["Q"]
    assert eval_segments({"problem": "P", "solution": "s"}) == ["P"]
    assert eval_segments({"prompt": "P", "question": "Q"}) == ["P"]
    chat = {"messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]}
    assert eval_segments(chat) == ["U"]
    assert eval_segments(chat, all_turns=True) == ["U", "A"]
    assert eval_segments({"input": "I", "question": "Q"}, field="input") == ["I"]
    with pytest.raises(LayoutError, match='"input"'):
        eval_segments({"question": "Q"}, field="input")


# ---------------------------------------------------------------- the command


def _eval_file(tmp_path, rng, n_items=20, n_words=40):
    items = [_text(rng, n_words) for _ in range(n_items)]
    path = tmp_path / "gsm.jsonl"
    _write_jsonl(path, [{"question": q, "answer": "1"} for q in items])
    return path, items


def _user(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]}


def _edit(rng, text, n_changes):
    w = text.split()
    for i in rng.sample(range(0, len(w), 10), n_changes):  # spread out
        w[i] = "changed"
    return " ".join(w)


def test_planted_copies_caught_and_clean_lines_kept_byte_for_byte(tmp_path):
    rng = random.Random(7)
    ev_path, items = _eval_file(tmp_path, rng)
    half = " ".join(items[5].split()[:16])  # 9 of 33 grams: below 0.5
    objs = [
        _user(_text(rng, 60)),
        _user(items[3].upper().replace(" ", ", ")),  # planted copy, case and punctuation
        {
            "prompt": "Solve: " + _edit(rng, items[4], 2) + " Explain.",
            "chosen": "a",
            "rejected": "b",
        },
        {"problem": half, "ground_truth": "1"},
        {"messages": [{"role": "user", "content": "intro"}], "ground_truth": "2", "x": items[9]},
    ]
    lines = [json.dumps(o, ensure_ascii=False).encode() + b"\n" for o in objs]
    lines[0] = lines[0][:-1] + b"\r\n"  # CRLF kept
    lines.insert(2, b"   \n")  # blank lines kept
    lines.append(json.dumps(_user("café ✓ \ud800 " + _text(rng, 9))).encode())  # no \n at the end
    tr = tmp_path / "data" / "mix.jsonl"
    tr.parent.mkdir()
    tr.write_bytes(b"".join(lines))
    report_path = tmp_path / "r" / "report.json"
    args = ["--train", str(tr), "--eval", str(ev_path), "--ngram", "8", "--threshold", "0.5"]
    assert main([*args, "--out", str(tmp_path / "clean"), "--report", str(report_path)]) == 0
    kept = [ln for i, ln in enumerate(lines) if i not in (1, 3)]  # the copy and the edited copy
    assert (tmp_path / "clean" / "mix.jsonl").read_bytes() == b"".join(kept)
    report = json.loads(report_path.read_text())
    t = report["train_files"][str(tr)]
    assert (t["items"], t["kept"], t["removed"], t["blank_lines"]) == (6, 4, 2, 1)
    hit = {i["index"]: i for i in report["eval_sets"][str(ev_path)]["contaminated_items"]}
    assert sorted(hit) == [3, 4]
    assert hit[3]["hits"] == [{"source": f"{tr}:2", "coverage": 1.0, "count": 33}]
    h4 = hit[4]["hits"][0]
    assert h4["source"] == f"{tr}:4" and 0.5 <= h4["coverage"] < 1.0
    assert h4["coverage"] == round(h4["count"] / hit[4]["ngrams"], 6) and hit[4]["ngrams"] == 33
    assert hit[4]["line"] == 5 and hit[4]["excerpt"].startswith(items[4][:50])
    # report only: same report, nothing written; the CLI table goes through `nova`
    report_path2 = tmp_path / "r2.json"
    assert nova_main(["decontaminate", *args, "--report-only", "--report", str(report_path2)]) == 0
    r2 = json.loads(report_path2.read_text())
    assert r2["eval_sets"] == report["eval_sets"] and r2["settings"]["report_only"]
    assert r2["train_files"][str(tr)]["removed"] == 2 and r2["train_files"][str(tr)]["out"] is None


def test_several_files_and_threshold_one(tmp_path):
    rng = random.Random(11)
    ev_path, items = _eval_file(tmp_path, rng, n_items=5, n_words=20)
    ev2 = tmp_path / "math.jsonl"
    _write_jsonl(ev2, [{"problem": p} for p in ("Find x if 2x = 10.", items[0])])
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    edited = _edit(rng, items[1], 1)
    _write_jsonl(a, [{"prompt": items[0]}, {"prompt": edited}])
    _write_jsonl(b, [{"question": "find X if 2x = 10"}, {"question": "hello"}])
    cfg = DecontamConfig(ngram=4, threshold=1.0)
    report = run([str(a), str(b)], [str(ev_path), str(ev2)], cfg, str(tmp_path / "out"))
    # threshold 1.0: the edited copy is kept, exact copies (case/punctuation aside) are not
    assert report["train_files"][str(a)]["removed_by_eval_set"] == {str(ev_path): 1, str(ev2): 1}
    assert report["train_files"][str(b)]["removed_by_eval_set"] == {str(ev2): 1}
    assert (tmp_path / "out/a.jsonl").read_text() == json.dumps({"prompt": edited}) + "\n"
    assert (tmp_path / "out/b.jsonl").read_text() == '{"question": "hello"}\n'
    assert report["totals"] == {
        "eval_items": 7,
        "eval_contaminated": 3,
        "train_items": 4,
        "train_removed": 2,
    }


def test_bad_lines(tmp_path, capsys):
    rng = random.Random(5)
    ev_path, items = _eval_file(tmp_path, rng, n_items=3)
    tr = tmp_path / "t.jsonl"
    tr.write_bytes(
        b'{"prompt": "fine"}\n{"prompt": broken\n[1, 2]\n{"text": "no known key"}\n'
        b'{"prompt": "\xff bad utf8"}\n' + json.dumps({"prompt": items[0]}).encode() + b"\n"
    )
    args = ["--train", str(tr), "--eval", str(ev_path), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert f"{tr}:2: bad JSON" in capsys.readouterr().err
    assert not (tmp_path / "o" / "t.jsonl").exists()  # no partial output
    with pytest.raises(DataError, match=f"{tr}:2:"):
        run([str(tr)], [str(ev_path)], DecontamConfig(), None)
    report = run([str(tr)], [str(ev_path)], DecontamConfig(on_bad_line="skip"), str(tmp_path / "o"))
    t = report["train_files"][str(tr)]
    assert (t["items"], t["removed"], t["bad_lines_skipped"]) == (2, 1, 4)
    assert t["bad_lines_by_kind"] == {
        "bad_json": 1,
        "not_object": 1,
        "missing_key": 1,
        "bad_utf8": 1,
    }
    assert t["bad_line_examples"][0].startswith(f"{tr}:2: bad JSON")
    assert (tmp_path / "o" / "t.jsonl").read_bytes() == b'{"prompt": "fine"}\n'
    bad_eval = tmp_path / "e.jsonl"
    bad_eval.write_text('{"question": "q"}\n{"answer": 1}\n')
    with pytest.raises(DataError, match=f'{bad_eval}:2: no eval text: expected "prompt"'):
        run([str(tr)], [str(bad_eval)], DecontamConfig(), None)


def test_user_errors(tmp_path, capsys):
    rng = random.Random(2)
    ev_path, _ = _eval_file(tmp_path, rng, n_items=2)
    tr = tmp_path / "t.jsonl"
    _write_jsonl(tr, [{"prompt": "x"}])
    base = ["--train", str(tr), "--eval", str(ev_path)]
    assert main([*base, "--out", str(tmp_path)]) == 2  # would overwrite the input
    assert "would overwrite" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "o"), "--threshold", "0"]) == 2
    assert "threshold" in capsys.readouterr().err
    assert main(base) == 2  # neither --out nor --report-only
    assert (
        main(["--train", str(tmp_path / "missing.jsonl"), "--eval", str(ev_path), "--report-only"])
        == 2
    )
    assert "no such file" in capsys.readouterr().err


def test_an_empty_eval_set_is_refused(tmp_path, capsys):
    """An eval file without items would pass every training item unchecked: refused, one
    line naming the file (empty, blank lines only, or every line skipped as bad)."""
    tr = tmp_path / "t.jsonl"
    _write_jsonl(tr, [{"prompt": "x y z"}])
    rng = random.Random(3)
    good, _ = _eval_file(tmp_path, rng, n_items=2)
    for name, body, why in (
        ("empty.jsonl", "", "no JSON line"),
        ("blank.jsonl", "\n\n  \n", "no JSON line"),
        ("bad.jsonl", "[1]\n{broken\n", "2 bad line(s) skipped"),
    ):
        ev = tmp_path / name
        ev.write_text(body)
        argv = ["--train", str(tr), "--eval", str(good), str(ev), "--report-only"]
        assert main([*argv, "--on-bad-line", "skip"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"nova decontaminate: --eval {ev}: no eval items ({why}): nothing to "
                       "check the training data against; give a JSONL of eval items"]  # fmt: skip
