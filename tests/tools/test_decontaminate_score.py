"""`nova decontaminate --score ngram|token`: the fraction of the eval item's n-grams found in a
training item (ngram, the default) or open-instruct's fraction of the eval item's words
covered by found n-grams (token; 0 for items shorter than n). The issue's case, short items,
and the tool's removals on random data against a brute-force reference of both scores."""

from __future__ import annotations

import json
import random

import pytest

from nova_engine.data.decontam import words
from nova_engine.tools.decontaminate import DecontamConfig, main, run, token_coverage

ITEM = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima"  # 12 words


def _write(path, objs) -> str:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return str(path)


def _files(tmp_path, evals, trains):
    ev = _write(tmp_path / "eval.jsonl", [{"prompt": t} for t in evals])
    tr = _write(tmp_path / "train.jsonl", [{"prompt": t} for t in trains])
    return ev, tr


def _scores(report) -> dict[int, list[float]]:
    (es,) = report["eval_sets"].values()
    return {i["index"]: [h["coverage"] for h in i["hits"]] for i in es["contaminated_items"]}


def test_the_issue_case_first_7_of_12_words_at_n4(tmp_path):
    """9 grams of 4 words, 4 of them inside the first 7 words: ngram 4/9 < 0.5 keeps the
    training item, token 7/12 >= 0.5 removes it; the report names the score it used."""
    train = "something else " + " ".join(ITEM.split()[:7]) + " and more words here"
    ev, tr = _files(tmp_path, [ITEM], [train])
    assert token_coverage([ITEM], [train], 4) == pytest.approx(7 / 12)
    got = {}
    for score in ("ngram", "token"):
        cfg = DecontamConfig(ngram=4, threshold=0.5, score=score)
        rep = run([tr], [ev], cfg, out_dir=None, report_path=str(tmp_path / f"{score}.json"))
        assert rep["settings"]["score"] == score
        assert json.loads((tmp_path / f"{score}.json").read_text())["settings"]["score"] == score
        got[score] = rep["totals"]["train_removed"]
    assert got == {"ngram": 0, "token": 1}
    rep = run([tr], [ev], DecontamConfig(ngram=4, threshold=0.4, score="ngram"))
    assert _scores(rep) == {0: [pytest.approx(4 / 9, abs=1e-6)]}
    rep = run([tr], [ev], DecontamConfig(ngram=4, threshold=0.4, score="token"))
    assert _scores(rep) == {0: [pytest.approx(7 / 12, abs=1e-6)]}


def test_items_shorter_than_n(tmp_path):
    """A 3-word eval item at n=4 is one whole gram for ngram (found: 1.0) and 0 for token."""
    ev, tr = _files(tmp_path, ["Delta, echo foxtrot!"], ["x delta echo foxtrot y"])
    for score, removed in (("ngram", 1), ("token", 0)):
        rep = run([tr], [ev], DecontamConfig(ngram=4, threshold=0.5, score=score))
        assert rep["totals"]["train_removed"] == removed, score
    assert token_coverage(["delta echo foxtrot"], ["delta echo foxtrot"], 4) == 0.0


def _brute(eval_text: str, train_text: str, n: int) -> tuple[float, float]:
    """(ngram score, token score) of one-segment items, written out position by position."""
    e, t = words(eval_text), words(train_text)
    if len(e) < n:
        whole = any(t[i : i + len(e)] == e for i in range(len(t) - len(e) + 1)) and bool(e)
        return float(whole), 0.0
    found = [any(t[j : j + n] == e[i : i + n] for j in range(len(t) - n + 1))
             for i in range(len(e) - n + 1)]  # fmt: skip
    distinct = {tuple(e[i : i + n]) for i in range(len(e) - n + 1)}
    hit = {tuple(e[i : i + n]) for i, f in enumerate(found) if f}
    covered = [any(found[s] for s in range(max(0, p - n + 1), min(p, len(found) - 1) + 1))
               for p in range(len(e))]  # fmt: skip
    return len(hit) / len(distinct), sum(covered) / len(e)


@pytest.mark.parametrize("n,threshold", [(3, 0.5), (4, 0.3), (2, 0.75)])
def test_random_items_remove_what_the_brute_force_scores_say(tmp_path, n, threshold):
    rng = random.Random(n * 7 + int(threshold * 100))
    vocab = [f"w{k}" for k in range(12)]  # small: partial overlaps are common
    evals = [" ".join(rng.choices(vocab, k=rng.randint(1, 11))) for _ in range(9)]
    trains = []
    for _ in range(40):
        base = rng.choice(evals).split()
        a = rng.randrange(len(base))
        piece = base[a : a + rng.randint(1, len(base))]
        noise = rng.choices(vocab, k=rng.randint(0, 5))
        trains.append(" ".join(rng.choices(vocab, k=rng.randint(0, 4)) + piece + noise))
    ev, tr = _files(tmp_path, evals, trains)
    for k, score in enumerate(("ngram", "token")):
        want = [
            i for i, t in enumerate(trains) if any(_brute(e, t, n)[k] >= threshold for e in evals)
        ]
        out = tmp_path / score
        rc = main(["--train", tr, "--eval", ev, "--ngram", str(n), "--threshold", str(threshold),
                   "--score", score, "--out", str(out)])  # fmt: skip
        assert rc == 0
        kept = (out / "train.jsonl").read_text().splitlines()
        assert [json.loads(x)["prompt"] for x in kept] == [
            t for i, t in enumerate(trains) if i not in want
        ], score
        for e in evals:
            for t in trains[:10]:
                if score == "token":
                    assert token_coverage([e], [t], n) == pytest.approx(_brute(e, t, n)[1])
    assert any(_brute(e, t, n)[0] != _brute(e, t, n)[1] for e in evals for t in trains)


def test_bad_score_is_a_user_error(tmp_path, capsys):
    ev, tr = _files(tmp_path, [ITEM], [ITEM])
    with pytest.raises(ValueError, match="score='jaccard'"):
        DecontamConfig(score="jaccard")
    with pytest.raises(SystemExit):
        main(["--train", tr, "--eval", ev, "--report-only", "--score", "jaccard"])
    assert "invalid choice: 'jaccard'" in capsys.readouterr().err
