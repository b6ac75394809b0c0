"""JSONL readers: every kind of bad line gives its exact "file:line: reason" error, skip mode
counts and reports, good lines of each layout parse to the right records."""

import json
import logging
import sys

import pytest

from nova_engine.data.formats import (
    DataError,
    read_pref_jsonl,
    read_records,
    read_sft_jsonl,
)

U = {"role": "user", "content": "What is two plus two?"}
A = {"role": "assistant", "content": "4"}
S = {"role": "system", "content": "Answer with the number only."}
GOOD_SFT = json.dumps({"id": 7, "messages": [S, U, A]})
GOOD_PAIR = json.dumps(
    {"chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "5"}], "margin": 2}
)


def _write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_bytes(
        b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines)
    )
    return str(path)


SFT_BAD = [
    ("{not json", "bad_json", "bad JSON: Expecting property name enclosed in double quotes at column 2"),
    ("[1, 2]", "not_object", "expected a JSON object per line, got list"),
    (json.dumps({"id": 1}), "missing_key", 'missing key "messages" (a list of {role, content} messages); keys present: id'),
    (json.dumps({"messages": "hi"}), "bad_type", '"messages" must be a list of messages, got str'),
    (json.dumps({"messages": []}), "empty_messages", '"messages" is empty: expected at least one message'),
    (json.dumps({"messages": [U, "x"]}), "bad_type", '"messages"[1] must be an object, got str'),
    (json.dumps({"messages": [{"role": "user"}, A]}), "missing_key", '"messages"[0] has no "content" key (expected "role" and "content")'),
    (json.dumps({"messages": [{"role": "human", "content": "hi"}, A]}), "bad_role", "\"messages\"[0] has role 'human': expected one of system, user, assistant"),
    (json.dumps({"messages": [U, {"role": "assistant", "content": 4}]}), "bad_type", '"messages"[1] content must be a string, got int'),
    (json.dumps({"messages": [U, {"role": "assistant", "content": "  \n"}]}), "empty_content", '"messages"[1] (assistant) has empty content'),
    (json.dumps({"messages": [U, S, A]}), "system_not_first", '"messages"[1] is a system message: only the first message may be one'),
    (json.dumps({"messages": [S, A, U, A]}), "bad_role", '"messages" starts with an assistant turn: expected a user turn first'),
    (json.dumps({"messages": [S, U]}), "no_assistant", '"messages" has no assistant turn: nothing to train on'),
    (json.dumps({"messages": [U, A, U]}), "last_not_assistant", "\"messages\" ends with a user turn: the last turn must be the assistant's"),
]  # fmt: skip


@pytest.mark.parametrize(
    "bad,kind,reason", SFT_BAD, ids=[k + str(i) for i, (_, k, _) in enumerate(SFT_BAD)]
)
def test_sft_bad_line_error_names_file_line_and_reason(tmp_path, bad, kind, reason):
    path = _write(tmp_path, [GOOD_SFT, "", GOOD_SFT, bad, GOOD_SFT])
    with pytest.raises(DataError) as ei:
        read_sft_jsonl(path)
    assert str(ei.value) == f"{path}:4: {reason}"
    assert (ei.value.path, ei.value.line, ei.value.kind) == (path, 4, kind)
    assert isinstance(ei.value, ValueError)


def test_bad_utf8_line(tmp_path):
    path = _write(tmp_path, [GOOD_SFT, b'{"messages": "\xff"}'])
    with pytest.raises(DataError, match=r":2: not valid UTF-8 \(invalid start byte at byte 14\)"):
        read_sft_jsonl(path)


def test_bom_and_json_error_columns(tmp_path):
    """A UTF-8 BOM before the first line is accepted; a JSON error names its real column."""
    path = _write(tmp_path, [b"\xef\xbb\xbf" + GOOD_SFT.encode(), GOOD_SFT])
    assert len(read_sft_jsonl(path)[0]) == 2
    bad = GOOD_SFT[:-1] + ",}"
    path = _write(tmp_path, [GOOD_SFT, bad], name="bad.jsonl")
    with pytest.raises(DataError, match=rf":2: bad JSON: .* at column {len(bad)}$"):
        read_sft_jsonl(path)


V = {"role": "assistant", "content": "5"}
PAIR_BAD = [
    (json.dumps({"chosen": [U, A]}), "missing_key", 'missing key "rejected" (a message list or a response string); keys present: chosen'),
    (json.dumps({"chosen": [U, A], "rejected": [{"role": "user", "content": "What is two plus three?"}, V]}), "prompt_mismatch", "chosen and rejected prompts differ at message 0 (user): expected identical prompt turns"),
    (json.dumps({"chosen": [S, U, A], "rejected": [U, V]}), "prompt_mismatch", '"chosen" has 3 turns and "rejected" 2: expected the same prompt turns followed by one response each'),
    (json.dumps({"chosen": [U, A], "rejected": [U, V, U]}), "last_not_assistant", "\"rejected\" ends with a user turn: the last turn must be the assistant's"),
    (json.dumps({"chosen": [U, A], "rejected": [U, A]}), "identical_responses", "chosen and rejected responses are identical"),
    (json.dumps({"chosen": [U, A], "rejected": [U, V], "margin": 0}), "bad_margin", '"margin" must be a finite number > 0, got 0'),
    (json.dumps({"chosen": [U, A], "rejected": [U, V], "margin": "2"}), "bad_margin", "\"margin\" must be a finite number > 0, got '2'"),
    (json.dumps({"chosen": "4", "rejected": "5"}), "missing_key", 'missing key "prompt" (a string or a message list); keys present: chosen, rejected'),
    (json.dumps({"prompt": "", "chosen": "4", "rejected": "5"}), "empty_content", '"prompt" is empty'),
    (json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": " "}), "empty_content", '"rejected" is empty'),
    (json.dumps({"prompt": [U, A], "chosen": "4", "rejected": "5"}), "bad_role", '"prompt" ends with a assistant turn: expected a user turn'),
]  # fmt: skip


@pytest.mark.parametrize(
    "bad,kind,reason", PAIR_BAD, ids=[k + str(i) for i, (_, k, _) in enumerate(PAIR_BAD)]
)
def test_pair_bad_line_error_names_file_line_and_reason(tmp_path, bad, kind, reason):
    path = _write(tmp_path, [GOOD_PAIR, bad])
    with pytest.raises(DataError) as ei:
        read_pref_jsonl(path)
    assert str(ei.value) == f"{path}:2: {reason}"
    assert ei.value.kind == kind


def test_sft_good_records(tmp_path):
    path = _write(tmp_path, [GOOD_SFT, "   ", json.dumps({"messages": [U, A, U, A]})])
    recs, stats = read_sft_jsonl(path, start_index=10)
    assert [r.index for r in recs] == [10, 11]
    assert recs[0].messages == [S, U, A] and recs[0].id == "7" and recs[1].id is None
    assert recs[0].source == f"{path}:1" and recs[1].source == f"{path}:3"
    assert (stats.n_lines, stats.n_ok, stats.n_skipped) == (2, 2, 0)


def test_pair_layouts(tmp_path):
    lines = [
        GOOD_PAIR,  # Tülu 3: full conversations
        json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5", "strength": 3}),
        json.dumps({"prompt": [S, U], "chosen": [A], "rejected": [V]}),
        json.dumps({"prompt": "ignored", "chosen": [S, U, A], "rejected": [S, U, V]}),
    ]
    recs, _ = read_pref_jsonl(_write(tmp_path, lines), margin_key="strength")
    assert [r.index for r in recs] == [0, 1, 2, 3]
    r0, r1, r2, r3 = recs
    assert (r0.prompt, r0.chosen, r0.rejected) == ([U], [A], [V])
    assert r0.margin == 1.0  # "margin" is not the configured key here
    assert r1.prompt == [{"role": "user", "content": "2+2?"}] and r1.margin == 3.0
    assert r1.chosen == [{"role": "assistant", "content": "4"}]
    assert (r2.prompt, r2.chosen, r2.rejected) == ([S, U], [A], [V])
    assert r3.prompt == [S, U] and r3.chosen_messages() == [S, U, A]
    assert r3.rejected_messages() == [S, U, V]
    recs, _ = read_pref_jsonl(_write(tmp_path, [GOOD_PAIR], "m.jsonl"))
    assert recs[0].margin == 2.0


def test_skip_mode_counts_and_logs(tmp_path, caplog):
    lines = [GOOD_SFT] + [bad for bad, _, _ in SFT_BAD] + [GOOD_SFT, "{bad", GOOD_SFT]
    path = _write(tmp_path, lines)
    logger = logging.getLogger("nova_engine")
    logger.addHandler(caplog.handler)
    try:
        recs, stats = read_sft_jsonl(path, on_bad_line="skip")
    finally:
        logger.removeHandler(caplog.handler)
    assert [r.index for r in recs] == [0, 1, 2]
    assert [r.source for r in recs] == [f"{path}:1", f"{path}:16", f"{path}:18"]
    assert stats.n_lines == len(lines) and stats.n_ok == 3
    assert stats.n_skipped == len(SFT_BAD) + 1
    expected = {}
    for _, kind, _ in SFT_BAD:
        expected[kind] = expected.get(kind, 0) + 1
    expected["bad_json"] += 1
    assert dict(stats.skipped) == expected
    assert len(stats.examples) == 5
    assert stats.examples[0].startswith(f"{path}:2: bad JSON")
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1
    assert f"skipped {len(SFT_BAD) + 1} of {len(lines)} lines" in msgs[0]
    assert "bad_json=2" in msgs[0] and f"{path}:3: expected a JSON object" in msgs[0]


def test_read_records_dense_indices_across_files(tmp_path):
    p1 = _write(tmp_path, [GOOD_SFT, "{", GOOD_SFT], "a.jsonl")
    p2 = _write(tmp_path, [GOOD_SFT], "b.jsonl")
    recs, stats = read_records([p1, p2], "sft", on_bad_line="skip")
    assert [r.index for r in recs] == [0, 1, 2]
    assert recs[2].source == f"{p2}:1"
    assert (stats.n_lines, stats.n_ok, stats.n_skipped) == (4, 3, 1)
    with pytest.raises(DataError, match=r"a\.jsonl:2: bad JSON"):
        read_records([p1, p2], "sft")
    with pytest.raises(ValueError, match="on_bad_line='warn'"):
        read_records(p1, "sft", on_bad_line="warn")


# ------------------------------------------------------------------ Parquet (#32 item 7)


def _to_parquet(jsonl_path, out_path):
    """The JSONL file's records as a Parquet file (pyarrow infers the nested schema, as
    datasets.Dataset.to_parquet does)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(jsonl_path) as f:
        rows = [json.loads(x) for x in f if x.strip()]
    pq.write_table(pa.Table.from_pylist(rows), str(out_path), row_group_size=7)  # several groups
    return str(out_path)


def _same(a, b):
    """Records equal in everything but `source` (file:line vs file: row N)."""
    import dataclasses

    def strip(r):
        d = dataclasses.asdict(r)
        d.pop("source", None)
        if "pair" in d:
            d["pair"].pop("source", None)
        return d

    assert len(a) == len(b) > 0
    assert [strip(x) for x in a] == [strip(x) for x in b]


def test_parquet_gives_the_same_records_for_every_stage(tmp_path):
    """SFT chats, preference pairs, HelpSteer2 attributes and preferences, RewardBench and
    RLVR prompts: the Parquet file of a JSONL file reads as the same records, in order."""
    pytest.importorskip("pyarrow")
    from nova_engine.data.reward import read_attribute_jsonl, read_reward_pairs, read_rewardbench
    from nova_engine.data.rlvr import read_rlvr
    from nova_engine.data.synthetic import write_task
    from nova_engine.data.synthetic_reward import write_reward_task

    task = write_task(tmp_path / "t", n_sft=23, n_pref=19, n_eval=5, seed=3)
    rw = write_reward_task(tmp_path / "r", n_regression=17, n_pref=13, n_eval=11, seed=4)
    pq = lambda p: _to_parquet(p, str(p) + ".parquet")  # noqa: E731
    _same(read_records(task["sft"], "sft")[0], read_records(pq(task["sft"]), "sft")[0])
    _same(read_records(task["pref"], "pref")[0], read_records(pq(task["pref"]), "pref")[0])
    _same(
        read_attribute_jsonl([rw["regression"]])[0], read_attribute_jsonl([pq(rw["regression"])])[0]
    )
    _same(read_reward_pairs([rw["pref"]])[0], read_reward_pairs([pq(rw["pref"])])[0])
    _same(read_rewardbench([rw["eval"]])[0], read_rewardbench([pq(rw["eval"])])[0])
    rl = _write(tmp_path, [
        json.dumps({"id": i, "messages": [{"role": "user", "content": f"What is {i} + 30?"}],
                    "ground_truth": str(i + 30), "dataset": "gsm8k"})
        for i in range(9)
    ], "rlvr.jsonl")  # fmt: skip
    _same(read_rlvr(rl)[0], read_rlvr(pq(rl))[0])
    # mixed: a JSONL file then a Parquet file, indices dense across both
    both, _ = read_records([task["sft"], str(task["sft"]) + ".parquet"], "sft")
    assert [r.index for r in both] == list(range(46))
    assert both[23].source == f"{task['sft']}.parquet: row 1"


def test_parquet_errors_name_file_and_row(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    good = json.loads(GOOD_SFT)
    bad = {"id": 8, "messages": [S, U]}  # no assistant turn
    src = _write(tmp_path, [GOOD_SFT, GOOD_SFT, json.dumps(bad)], "x.jsonl")
    path = _to_parquet(src, tmp_path / "x.parquet")
    with pytest.raises(DataError) as e:
        read_sft_jsonl(path)
    assert str(e.value).startswith(f"{path}: row 3: ") and e.value.line == 3
    recs, stats = read_sft_jsonl(path, on_bad_line="skip")
    assert len(recs) == 2 and stats.n_skipped == 1 and recs[0].messages == good["messages"]
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=rf"^{junk}: not a readable Parquet file"):
        read_sft_jsonl(junk)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # pyarrow not installed
    with pytest.raises(DataError, match=r"x\.parquet: reading Parquet needs pyarrow"):
        read_sft_jsonl(path)
