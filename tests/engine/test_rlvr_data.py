"""RLVR data: the Tülu 3 RLVR layout read with file:line errors (bad lines, unknown data
sources listed with the known ones, ground truths the verifier rejects), skip mode counts,
prompts tokenized with the chat template + generation prompt, and the synthetic arithmetic
task written in this layout (verifiable, disjoint from the eval split)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nova_engine.data.formats import DataError
from nova_engine.data.rlvr import tokenize_rlvr, write_arithmetic_rlvr
from nova_engine.data.synthetic import write_task
from nova_engine.data.tiny import build_tiny_tokenizer
from nova_engine.rl.prompts import load_rlvr_prompts, read_rlvr, read_rlvr_jsonl
from nova_engine.rl.verifiers import VerifyItem, verify_one

USER = {"role": "user", "content": "What is two plus two?"}
IFEVAL_GT = json.dumps({"func_name": "validate_lowercase", "N": None, "quantifier": None})
GOOD = [
    {"messages": [USER], "ground_truth": "4", "dataset": "gsm8k"},
    {"id": 7, "messages": [{"role": "system", "content": "Be brief."}, USER],
     "ground_truth": "\\frac{1}{2}", "dataset": "MATH", "constraint_type": None},
    {"messages": [USER], "ground_truth": IFEVAL_GT, "dataset": "ifeval"},
    {"messages": [USER], "ground_truth": ["4", "4.0"], "dataset": "gsm8k"},
]  # fmt: skip


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_reads_the_tulu_layout(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", GOOD[:2] + [""] + GOOD[2:])
    recs, stats = read_rlvr_jsonl(path)
    assert [r.dataset for r in recs] == ["gsm8k", "MATH", "ifeval", "gsm8k"]
    assert [r.index for r in recs] == [0, 1, 2, 3]
    assert [r.source for r in recs] == [f"{path}:1", f"{path}:2", f"{path}:4", f"{path}:5"]
    assert recs[1].id == "7" and recs[1].messages[0]["role"] == "system"
    assert recs[3].ground_truth == ["4", "4.0"] and stats.n_ok == 4
    # several files: indices dense across them
    path2 = write_jsonl(tmp_path / "b.jsonl", GOOD[:1])
    recs, stats = read_rlvr([path, path2])
    assert [r.index for r in recs] == [0, 1, 2, 3, 4] and recs[4].source == f"{path2}:1"


BAD = [
    ("{not json", "bad_json", "bad JSON"),
    ({"ground_truth": "4", "dataset": "gsm8k"}, "missing_key", 'missing key "messages"'),
    ({"messages": [USER, {"role": "assistant", "content": "4"}], "ground_truth": "4",
      "dataset": "gsm8k"}, "last_not_user", "ends with a assistant turn: expected a user turn"),
    ({"messages": [USER], "dataset": "gsm8k"}, "missing_key", 'missing key "ground_truth"'),
    ({"messages": [USER], "ground_truth": "4"}, "missing_key", 'missing key "dataset"'),
    ({"messages": [USER], "ground_truth": "4", "dataset": "chess"}, "unknown_dataset",
     "unknown \"dataset\" 'chess': no verifier of that name; known: "),
    ({"messages": [USER], "ground_truth": "four", "dataset": "gsm8k"}, "bad_ground_truth",
     "'four' is not a number"),
    ({"messages": [USER], "ground_truth": "", "dataset": "math"}, "bad_ground_truth", "empty"),
    ({"messages": [USER], "ground_truth": [], "dataset": "math"}, "bad_ground_truth",
     "empty list"),
    ({"messages": [USER], "ground_truth": '{"func_name": "validate_haiku"}',
      "dataset": "ifeval"}, "bad_ground_truth", "unknown IFEval check 'validate_haiku'"),
    ({"messages": [USER], "ground_truth": 4, "dataset": ""}, "bad_dataset", "non-empty"),
    ({"messages": [{"role": "user", "content": " "}], "ground_truth": "4",
      "dataset": "gsm8k"}, "empty_content", "empty content"),
]  # fmt: skip


@pytest.mark.parametrize("row,kind,message", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_line_names_file_and_line(tmp_path, row, kind, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD[0], GOOD[2], row, GOOD[1]])
    with pytest.raises(DataError) as err:
        read_rlvr_jsonl(path)
    assert err.value.line == 3 and err.value.kind == kind
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)
    if kind == "unknown_dataset":  # the known names are listed (tests may register more)
        assert all(f" {n}" in str(err.value) for n in ("arithmetic", "gsm8k", "ifeval", "math"))


def test_skip_mode_counts(tmp_path):
    rows = [GOOD[0], BAD[0][0], GOOD[1], BAD[5][0], BAD[6][0], GOOD[2]]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    recs, stats = read_rlvr_jsonl(path, on_bad_line="skip")
    assert [r.source for r in recs] == [f"{path}:1", f"{path}:3", f"{path}:6"]
    assert [r.index for r in recs] == [0, 1, 2]
    assert stats.n_lines == 6 and stats.n_ok == 3
    assert stats.skipped == {"bad_json": 1, "unknown_dataset": 1, "bad_ground_truth": 1}


def test_tokenized_prompts_end_with_the_generation_prompt(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    path = write_jsonl(tmp_path / "p.jsonl", GOOD)
    prompts, read_stats, tok_stats = load_rlvr_prompts(path, tok_dir)
    assert len(prompts) == 4 and tok_stats.n_out == 4
    for p, row in zip(prompts, GOOD):
        want = hf.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
        assert hf.decode(p.tokens) == want
        assert want.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        assert p.tokens.dtype == np.int64 and p.dataset == row["dataset"]
        assert p.ground_truth == row["ground_truth"]
    # too long: dropped and counted, the others keep their record index
    recs, _ = read_rlvr_jsonl(path)
    limit = len(prompts[0])
    kept, stats = tokenize_rlvr(recs, tok_dir, max_prompt_length=limit)
    assert stats.dropped_too_long == 1 and stats.n_out == 3
    assert [p.index for p in kept] == [0, 2, 3]  # the system-prompt record is the long one


def test_arithmetic_task_in_rlvr_layout(tmp_path):
    path = write_arithmetic_rlvr(tmp_path / "rlvr.jsonl", 50, seed=3, n_eval=20, skip=40)
    assert write_arithmetic_rlvr(tmp_path / "again.jsonl", 50, seed=3, n_eval=20, skip=40)
    assert open(path).read() == open(tmp_path / "again.jsonl").read()  # deterministic
    recs, _ = read_rlvr_jsonl(path)
    assert len(recs) == 50 and {r.dataset for r in recs} == {"arithmetic"}
    task = write_task(tmp_path / "task", n_sft=40, n_pref=0, n_eval=20, seed=3)
    eval_questions = set()
    with open(task["eval"]) as f:
        for line in f:
            eval_questions.add(json.loads(line)["messages"][0]["content"])
    with open(task["sft"]) as f:
        sft_rows = [json.loads(line) for line in f]
    for rec in recs:
        assert rec.messages[-1]["content"] not in eval_questions
        ok = verify_one(VerifyItem(rec.dataset, rec.ground_truth, rec.ground_truth))
        assert ok.correct
        off = verify_one(VerifyItem(rec.dataset, str(int(rec.ground_truth) + 1), rec.ground_truth))
        assert off.kind == "wrong"
    # skip=40 continues the training stream after SFT's 40 problems (those come first)
    whole = write_arithmetic_rlvr(tmp_path / "whole.jsonl", 90, seed=3, n_eval=20)
    whole_rows = [json.loads(line) for line in open(whole)]
    assert [r["messages"] for r in whole_rows[:40]] == [r["messages"][:1] for r in sft_rows]
    assert [r["messages"] for r in whole_rows[40:]] == [r.messages for r in recs]


def test_arithmetic_rlvr_follows_the_task_shape(tmp_path):
    """The demo's task options (operands as digits, plus only, max 49) reach the RLVR prompts:
    same problem stream as write_task with those options, none from its eval split, and the
    ground truth is the right answer (never the SFT teacher's dropped carry)."""
    import re

    kw = dict(max_value=49, ops=("plus",), in_words=False)
    path = write_arithmetic_rlvr(tmp_path / "r.jsonl", 60, seed=4, n_eval=20, skip=30, **kw)
    task = write_task(tmp_path / "t", n_sft=30, n_pref=0, n_eval=20, seed=4, carry_error=1.0,
                      **kw)  # fmt: skip
    q = re.compile(r"^(?:What is|Compute|How much is|Calculate) (\d+) plus (\d+)[?.]$")
    eval_keys = set()
    for line in open(task["eval"]):
        a, b = q.match(json.loads(line)["messages"][0]["content"]).groups()
        eval_keys.add((int(a), int(b)))
    recs, _ = read_rlvr_jsonl(path)
    assert len(recs) == 60
    for rec in recs:
        a, b = map(int, q.match(rec.messages[-1]["content"]).groups())
        assert a <= 49 and b <= 49 and (a, b) not in eval_keys
        assert rec.ground_truth == str(a + b)
    whole = write_arithmetic_rlvr(tmp_path / "w.jsonl", 90, seed=4, n_eval=20, **kw)
    sft_questions = [json.loads(x)["messages"][0]["content"] for x in open(task["sft"])]
    assert [json.loads(x)["messages"][0]["content"] for x in open(whole)][:30] == sft_questions
