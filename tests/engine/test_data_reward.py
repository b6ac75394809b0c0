"""Reward-model data: every kind of bad line of the HelpSteer2, HelpSteer2-Preference and
RewardBench layouts gives its exact "file:line: reason"; ties are dropped and counted (not
errors); the winner of a HelpSteer2-Preference pair follows the sign of the strength; missing
attributes stay missing (NaN) through tokenization; skip mode counts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nova_engine.data.formats import DataError
from nova_engine.data.reward import (
    HELPSTEER2_ATTRIBUTES,
    read_attribute_jsonl,
    read_reward_pairs,
    read_rewardbench,
    tokenize_attributes,
    tokenize_rewardbench,
)
from nova_engine.data.tiny import build_tiny_tokenizer

U = {"role": "user", "content": "What is two plus two?"}
A4 = {"role": "assistant", "content": "4"}
A5 = {"role": "assistant", "content": "5"}

HS2 = {
    "prompt": "What is two plus two?",
    "response": "4",
    "helpfulness": 4,
    "correctness": 4,
    "coherence": 4,
    "complexity": 0,
    "verbosity": 1,
}
PREF = {
    "prompt": "What is two plus two?",
    "response_1": "5",
    "response_2": "4",
    "preference_strength": 2,
}
RB = {"prompt": "What is two plus two?", "chosen": "4", "rejected": "5", "subset": "math-prm"}


def _write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return str(path)


def _with(base, **kw):
    d = dict(base)
    for k, v in kw.items():
        if v is ...:
            d.pop(k)
        else:
            d[k] = v
    return d


HS2_BAD = [
    ("{oops", "bad_json", "bad JSON: Expecting property name enclosed in double quotes at column 2"),
    (_with(HS2, prompt=...), "missing_key", 'missing key "prompt" (a string or a message list); keys present: coherence, complexity, correctness, helpfulness, response, verbosity'),
    (_with(HS2, response=...), "missing_key", 'missing key "response" (a string or assistant messages); keys present: coherence, complexity, correctness, helpfulness, prompt, verbosity'),
    (_with(HS2, response=" "), "empty_content", '"response" is empty'),
    (_with(HS2, helpfulness=5), "bad_score", '"helpfulness" = 5 is outside the score range [0, 4]'),
    (_with(HS2, coherence=-0.5), "bad_score", '"coherence" = -0.5 is outside the score range [0, 4]'),
    (_with(HS2, verbosity="3"), "bad_score", "\"verbosity\" must be a number in [0, 4] or null, got '3'"),
    (_with(HS2, correctness=True), "bad_score", '"correctness" must be a number in [0, 4] or null, got True'),
    ({"prompt": "hi", "response": "4"}, "no_scores", "no attribute score: expected at least one of helpfulness, correctness, coherence, complexity, verbosity"),
]  # fmt: skip

PREF_BAD = [
    (_with(PREF, preference_strength=...), "missing_key", 'missing key "preference_strength" (an integer in -3..3); keys present: prompt, response_1, response_2'),
    (_with(PREF, preference_strength=4), "bad_strength", '"preference_strength" must be an integer in -3..3 (negative: response_1 wins), got 4'),
    (_with(PREF, preference_strength=1.5), "bad_strength", '"preference_strength" must be an integer in -3..3 (negative: response_1 wins), got 1.5'),
    (_with(PREF, preference_strength="-2"), "bad_strength", "\"preference_strength\" must be an integer in -3..3 (negative: response_1 wins), got '-2'"),
    (_with(PREF, response_2=...), "missing_key", 'missing key "response_2" (a string or assistant messages); keys present: preference_strength, prompt, response_1'),
    (_with(PREF, response_2="5"), "identical_responses", "response_1 and response_2 are identical"),
    (_with(PREF, prompt=[A4]), "bad_role", '"prompt" starts with an assistant turn: expected a user turn first'),
    # the Tülu 3 layout goes through formats.parse_pair, with its own messages
    ({"chosen": [U, A4], "rejected": [U, A4]}, "identical_responses", "chosen and rejected responses are identical"),
    ({"chosen": [U, A4], "rejected": [U, A5], "margin": 0}, "bad_margin", '"margin" must be a finite number > 0, got 0'),
]  # fmt: skip

RB_BAD = [
    (_with(RB, subset=...), "missing_key", 'missing key "subset" (the RewardBench subset name); keys present: chosen, prompt, rejected'),
    (_with(RB, subset=""), "bad_subset", "\"subset\" must be a non-empty string, got ''"),
    (_with(RB, subset=3), "bad_subset", '"subset" must be a non-empty string, got 3'),
    (_with(RB, rejected="4"), "identical_responses", "chosen and rejected responses are identical"),
    (_with(RB, chosen=...), "missing_key", 'missing key "chosen" (a message list or a response string); keys present: prompt, rejected, subset'),
]  # fmt: skip

READERS = {"hs2": read_attribute_jsonl, "pref": read_reward_pairs, "rb": read_rewardbench}
GOOD = {"hs2": HS2, "pref": PREF, "rb": RB}
BAD = (
    [("hs2", *b) for b in HS2_BAD] + [("pref", *b) for b in PREF_BAD] + [("rb", *b) for b in RB_BAD]
)


@pytest.mark.parametrize(
    "layout,bad,kind,reason", BAD, ids=[f"{b[0]}-{b[2]}{i}" for i, b in enumerate(BAD)]
)
def test_bad_line_names_file_line_and_reason(tmp_path, layout, bad, kind, reason):
    good = GOOD[layout]
    path = _write(tmp_path, [good, "", good, bad, good])
    with pytest.raises(DataError) as ei:
        READERS[layout](path)
    assert str(ei.value) == f"{path}:4: {reason}"
    assert (ei.value.line, ei.value.kind) == (4, kind)
    recs, stats = READERS[layout](path, on_bad_line="skip")
    assert (len(recs), stats.n_lines, stats.n_ok, stats.skipped[kind]) == (3, 4, 3, 1)
    assert stats.examples == [f"{path}:4: {reason}"]


def test_helpsteer2_scores_and_missing(tmp_path):
    lines = [HS2, _with(HS2, correctness=None, verbosity=..., id=9, prompt=[U], response=[A5])]
    recs, stats = read_attribute_jsonl(_write(tmp_path, lines))
    assert [r.index for r in recs] == [0, 1]
    assert recs[0].scores == (4.0, 4.0, 4.0, 0.0, 1.0)
    assert recs[1].scores == (4.0, None, 4.0, 0.0, None)
    assert (recs[1].id, recs[1].prompt, recs[1].response) == ("9", [U], [A5])
    # a custom attribute subset and range
    recs, _ = read_attribute_jsonl(
        _write(tmp_path, [{"prompt": "p", "response": "r", "score": 7.5}], "c.jsonl"),
        attributes=("score",),
        score_range=(0, 10),
    )
    assert recs[0].scores == (7.5,)


def test_hs2_preference_sign_ties_and_mixed_layouts(tmp_path):
    lines = [
        _with(PREF, preference_strength=-3),  # response_1 ("5") wins, m = 3
        _with(PREF, preference_strength=0),  # tie: dropped, counted
        PREF,  # response_2 ("4") wins, m = 2
        {"chosen": [U, A4], "rejected": [U, A5], "margin": 1.5},  # Tülu 3 layout
        _with(PREF, preference_strength=1.0),
    ]
    recs, stats = read_reward_pairs(_write(tmp_path, lines))
    assert stats.ties == 1 and stats.n_ok == 4 and stats.n_skipped == 0
    assert [r.index for r in recs] == [0, 1, 2, 3]
    assert [(r.chosen[0]["content"], r.rejected[0]["content"], r.margin) for r in recs] == [
        ("5", "4", 3.0),
        ("4", "5", 2.0),
        ("4", "5", 1.5),
        ("4", "5", 1.0),
    ]
    assert all(r.prompt == [U] for r in recs)
    # ties add up across files
    _, s2 = read_reward_pairs(
        [_write(tmp_path, lines, "a.jsonl"), _write(tmp_path, lines, "b.jsonl")]
    )
    assert (s2.ties, s2.n_ok) == (2, 8)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_tokenize_attributes_keeps_targets_by_index(tmp_path, tok_dir):
    lines = [
        HS2,
        _with(HS2, response="forty " * 40, helpfulness=1),  # too long: dropped
        _with(HS2, helpfulness=None, complexity=2.5),
    ]
    recs, _ = read_attribute_jsonl(_write(tmp_path, lines))
    ds, stats = tokenize_attributes(recs, tok_dir, max_length=40, truncation="drop")
    assert [s.index for s in ds.samples] == [0, 2] and stats.dropped_too_long == 1
    assert ds.attributes == HELPSTEER2_ATTRIBUTES
    t = ds.targets_of([s.index for s in ds.samples])
    assert t[0].tolist() == [4, 4, 4, 0, 1]
    assert math.isnan(t[1, 0]) and t[1, 1:].tolist() == [4, 4, 2.5, 1]
    # the response is the loss span and the sequence ends with the end-of-turn token
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    s = ds.samples[0]
    assert tok.convert_ids_to_tokens(int(s.tokens[-1])) == "<|eot_id|>"
    assert tok.decode(s.tokens[s.loss_mask.astype(bool)]).strip() == "4<|eot_id|>"


def test_rewardbench_reader_and_tokenize(tmp_path, tok_dir):
    lines = [RB, _with(RB, subset="hep-go", chosen="5", rejected="4"), _with(RB, id="x")]
    recs, _ = read_rewardbench(_write(tmp_path, lines))
    assert [(r.pair.index, r.subset) for r in recs] == [
        (0, "math-prm"),
        (1, "hep-go"),
        (2, "math-prm"),
    ]
    pairs, subsets, _ = tokenize_rewardbench(recs, tok_dir, max_length=64)
    assert [p.index for p in pairs] == [0, 1, 2]
    assert subsets == {0: "math-prm", 1: "hep-go", 2: "math-prm"}
    assert not np.array_equal(pairs[0].chosen.tokens, pairs[0].rejected.tokens)
