"""RewardBench scoring on a small fixture in its layout, every number computed by hand:
per-subset accuracy (ties lose), section scores weighted by example counts (math-prm at 984 =
the six HumanEvalPack subsets together), the final mean of the four sections, the prior-sets
variant, unknown subsets (pooled only) and incomplete runs (no final score)."""

from __future__ import annotations

import json

import pytest

from nova_engine.data.reward import read_rewardbench
from nova_engine.eval.rewardbench import (
    EXAMPLE_COUNTS,
    SECTIONS,
    format_table,
    score_comparisons,
    section_scores,
)

# (subset, r_chosen, r_rejected)
FIXTURE = [
    ("alpacaeval-easy", 2.0, 1.0), ("alpacaeval-easy", 0.0, 1.0),
    ("alpacaeval-easy", 3.0, 3.0), ("alpacaeval-easy", 1.0, 0.0),        # 2/4 (a tie loses)
    ("mt-bench-med", 1.0, 0.0), ("mt-bench-med", 0.5, 0.2),              # 2/2
    ("mt-bench-hard", 0.0, 1.0),                                         # 0/1
    ("llmbar-natural", 1.0, 0.0), ("llmbar-natural", 1.0, 0.0),
    ("llmbar-natural", 0.0, 1.0), ("llmbar-natural", 1.0, 0.0),          # 3/4
    ("xstest-should-refuse", 1.0, 0.0),                                  # 1/1
    ("donotanswer", 0.0, 1.0), ("donotanswer", 1.0, 0.0),                # 1/2
    ("refusals-dangerous", 1.0, 0.0), ("refusals-dangerous", 1.0, 0.0),  # 2/2
    ("math-prm", 1.0, 0.0), ("math-prm", 0.0, 1.0),                      # 1/2
    ("hep-python", 1.0, 0.0),                                            # 1/1
    ("hep-go", 0.0, 1.0),                                                # 0/1
    ("synthetic-arith", 1.0, 0.0),                                       # 1/1, no section
]  # fmt: skip

# by hand: sections are the example-count weighted means over the subsets present
CHAT = (0.5 * 100 + 1.0 * 40) / (100 + 40)  # = 9/14
CHAT_HARD = (0.0 * 37 + 0.75 * 100) / (37 + 100)  # = 75/137
SAFETY = (1.0 * 154 + 0.5 * 136 + 1.0 * 100) / (154 + 136 + 100)  # = 161/195
REASONING = (0.5 * 984 + 1.0 * 164 + 0.0 * 164) / (984 + 164 + 164)  # = 1/2
FINAL = (CHAT + CHAT_HARD + SAFETY + REASONING) / 4


def _fixture_file(tmp_path):
    path = tmp_path / "rb.jsonl"
    with open(path, "w") as f:
        for i, (subset, _, _) in enumerate(FIXTURE):
            row = {
                "id": i,
                "prompt": f"question {i}",
                "chosen": "good",
                "rejected": "bad",
                "subset": subset,
            }
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_fixture_scores_by_hand(tmp_path):
    recs, _ = read_rewardbench(_fixture_file(tmp_path))
    rewards = {i: (c, r) for i, (_, c, r) in enumerate(FIXTURE)}
    scores = score_comparisons(
        [r.subset for r in recs],
        [rewards[r.pair.index][0] for r in recs],
        [rewards[r.pair.index][1] for r in recs],
    )
    got = {k: (s.won, s.total) for k, s in scores.subsets.items()}
    assert got == {
        "alpacaeval-easy": (2, 4), "mt-bench-med": (2, 2), "mt-bench-hard": (0, 1),
        "llmbar-natural": (3, 4), "xstest-should-refuse": (1, 1), "donotanswer": (1, 2),
        "refusals-dangerous": (2, 2), "math-prm": (1, 2), "hep-python": (1, 1),
        "hep-go": (0, 1), "synthetic-arith": (1, 1),
    }  # fmt: skip
    assert scores.sections == pytest.approx(
        {"Chat": CHAT, "Chat Hard": CHAT_HARD, "Safety": SAFETY, "Reasoning": REASONING}
    )
    assert (CHAT, CHAT_HARD, SAFETY) == pytest.approx((9 / 14, 75 / 137, 161 / 195))
    assert scores.score == pytest.approx(FINAL)
    assert scores.accuracy == pytest.approx(14 / 21)
    m = scores.metrics()
    assert m["rewardbench"] == pytest.approx(FINAL) and m["subset/hep-go"] == 0.0
    assert "RewardBench score" in format_table(scores)


def test_prior_sets_weigh_half_a_section():
    rows = FIXTURE + [("anthropic_helpful", 1.0, 0.0), ("shp", 0.0, 1.0)]
    s, c, r = zip(*rows)
    scores = score_comparisons(s, c, r, include_prior_sets=True)
    assert scores.prior_sets == pytest.approx(0.5)
    assert scores.score == pytest.approx((2 * 4 * FINAL + 0.5) / 9)
    # without the flag the prior subsets are scored but stay out of the final score
    assert score_comparisons(s, c, r).score == pytest.approx(FINAL)


def test_reasoning_math_and_code_weigh_half_each():
    code = [n for n in SECTIONS["Reasoning"] if n.startswith("hep-")]
    assert EXAMPLE_COUNTS["math-prm"] == sum(EXAMPLE_COUNTS[n] for n in code)
    acc = {"math-prm": 0.2} | {n: 0.9 for n in code}
    assert section_scores(acc)["Reasoning"] == pytest.approx((0.2 + 0.9) / 2)


def test_incomplete_run_has_sections_but_no_score():
    s, c, r = zip(*[row for row in FIXTURE if not row[0].startswith(("hep-", "math"))])
    scores = score_comparisons(s, c, r)
    assert "Reasoning" not in scores.sections and scores.score is None
    assert "rewardbench" not in scores.metrics()
    with pytest.raises(ValueError, match="one of each per comparison"):
        score_comparisons(["a"], [1.0, 2.0], [0.0])
