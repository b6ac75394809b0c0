"""nova pas augment with a scripted PAS model: the complement appended after the separator
with the original text kept verbatim, every other field kept, and the output read back by the
SFT, preference and RLVR loaders; bad lines give file:line errors, exit 2 through the CLI."""

from __future__ import annotations

import json

import pytest

from nova_engine.cli import main as nova_main
from nova_engine.data.formats import read_pref_jsonl, read_sft_jsonl
from nova_engine.data.rlvr import read_rlvr_jsonl
from nova_engine.tools.pas.augment import FIELD, SEPARATOR, augment_records, read_inputs
from nova_engine.tools.pas.records import PASError, write_jsonl

SFT = [
    {"id": "a", "messages": [{"role": "system", "content": "Be kind."},
                             {"role": "user", "content": "Why is the sea salty?"},
                             {"role": "assistant", "content": "Rivers carry salts."}],
     "source": "mix-1"},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Name a prime."},
                  {"role": "assistant", "content": "7"}]},
]  # fmt: skip
PREF = [
    {"prompt": "Suggest a bakery name.", "chosen": "Rise", "rejected": "Shop", "margin": 2},
    {"prompt": "What is 7 x 8?",
     "chosen": [{"role": "user", "content": "What is 7 x 8?"}, {"role": "assistant", "content": "56"}],
     "rejected": [{"role": "user", "content": "What is 7 x 8?"}, {"role": "assistant", "content": "54"}]},
    {"chosen": [{"role": "user", "content": "Spell cat."}, {"role": "assistant", "content": "c-a-t"}],
     "rejected": [{"role": "user", "content": "Spell cat."}, {"role": "assistant", "content": "k-a-t"}]},
    {"prompt": [{"role": "user", "content": "Say yes."}], "chosen": "yes", "rejected": "no"},
]  # fmt: skip
RLVR = [
    {"messages": [{"role": "user", "content": "What is 12 + 30?"}], "ground_truth": "42",
     "dataset": "arithmetic", "constraint_type": None},
    {"id": 9, "messages": [{"role": "user", "content": "What is 2 + 3?"}], "ground_truth": "5",
     "dataset": "arithmetic"},
]  # fmt: skip


class FakePAS:
    """A scripted PAS model: a complement derived from the prompt; '' and None on request."""

    def __init__(self, empty=(), too_long=()):
        self.empty, self.too_long, self.seen = set(empty), set(too_long), []

    def __call__(self, prompts):
        self.seen += prompts
        return [None if p in self.too_long else "  " if p in self.empty
                else f"  Answer '{p[:12]}' step by step.\n" for p in prompts]  # fmt: skip


def _complement(p: str) -> str:
    return f"Answer '{p[:12]}' step by step."


def _roundtrip(tmp_path, name, lines, **fake):
    src, dst = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.out.jsonl"
    write_jsonl(str(src), lines)
    pas = FakePAS(**fake)
    out, counts = augment_records(read_inputs(str(src)), pas)
    write_jsonl(str(dst), out)
    return out, counts, pas, str(dst)


def test_sft_layout(tmp_path):
    out, counts, pas, path = _roundtrip(tmp_path, "sft", SFT)
    assert pas.seen == ["Why is the sea salty?", "Name a prime."]  # the last user turn
    assert counts == {"read": 2, "augmented": 2, "empty": 0, "too_long": 0}
    recs, _ = read_sft_jsonl(path)
    msgs = recs[0].messages
    assert msgs[1]["content"] == "Why is the sea salty?" + SEPARATOR + _complement(
        "Why is the sea salty?"
    )
    assert msgs[0] == SFT[0]["messages"][0] and msgs[2] == SFT[0]["messages"][2]
    assert recs[1].messages[0]["content"] == "Hi"  # earlier user turns untouched
    assert recs[1].messages[2]["content"].startswith("Name a prime." + SEPARATOR)
    assert out[0]["id"] == "a" and out[0]["source"] == "mix-1"
    assert out[0][FIELD] == _complement("Why is the sea salty?")


def test_preference_layouts(tmp_path):
    out, counts, pas, path = _roundtrip(tmp_path, "pref", PREF, empty={"Say yes."})
    assert counts == {"read": 4, "augmented": 3, "empty": 1, "too_long": 0}
    pairs, _ = read_pref_jsonl(path)
    for pair, src in zip(pairs, PREF):
        text = pair.prompt[-1]["content"]
        original = src["prompt"] if isinstance(src.get("prompt"), str) else (
            src.get("prompt") or src["chosen"])[0]["content"]  # fmt: skip
        if original == "Say yes.":  # empty complement: unchanged
            assert text == original and out[3][FIELD] == ""
        else:
            assert text == original + SEPARATOR + _complement(original)
        assert pair.chosen[-1]["content"] != pair.rejected[-1]["content"]
    assert pairs[0].margin == 2.0
    # Tülu layout: the prompt string and both conversations carry the same augmented turn
    assert out[1]["prompt"] == out[1]["chosen"][0]["content"] == out[1]["rejected"][0]["content"]
    assert out[1]["chosen"][1] == PREF[1]["chosen"][1]


def test_rlvr_layout(tmp_path):
    out, counts, pas, path = _roundtrip(tmp_path, "rlvr", RLVR, too_long={"What is 2 + 3?"})
    assert counts == {"read": 2, "augmented": 1, "empty": 0, "too_long": 1}
    recs, _ = read_rlvr_jsonl(path)
    assert recs[0].messages[-1]["content"] == "What is 12 + 30?" + SEPARATOR + _complement(
        "What is 12 + 30?"
    )
    assert recs[0].ground_truth == "42" and recs[0].dataset == "arithmetic"
    assert recs[1].messages == RLVR[1]["messages"] and out[1][FIELD] is None
    assert out[0]["constraint_type"] is None and out[1]["id"] == 9


@pytest.mark.parametrize(
    "line,msg",
    [
        ("not json", "invalid JSON"),
        ('{"text": "x"}', 'expected a "prompt" (string or messages)'),
        ('{"prompt": ""}', '"prompt" is empty'),
        ('{"messages": [{"role": "assistant", "content": "x"}]}', '"messages" has no user turn'),
        ('{"messages": "hi"}', '"messages" must be a non-empty list'),
        (
            '{"prompt": "a", "chosen": [{"role": "user", "content": "b"}, '
            '{"role": "assistant", "content": "c"}], "rejected": "d"}',
            'in "prompt" and in "chosen" differ',
        ),
        ('{"prompt": "a", "pas_complement": "x"}', "augmented twice"),
    ],
)
def test_bad_lines_exit_2(tmp_path, capsys, line, msg):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "fine"}\n\n' + line + "\n")
    with pytest.raises(PASError, match=f"{src}:3: "):
        read_inputs(str(src))
    rc = nova_main(["pas", "augment", "--pas-model", str(tmp_path / "nowhere"), "--in", str(src),
                    "--out", str(tmp_path / "out.jsonl")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and f"{src}:3: " in err and msg in err and err.count("\n") == 1
    assert not (tmp_path / "out.jsonl").exists()


def test_build_data_cli_user_errors(tmp_path, capsys):
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    args = ["pas", "build-data", "--prompts", str(pool), "--teacher", "t", "--judge", "j",
            "--out", str(tmp_path / "o.jsonl")]  # fmt: skip
    assert nova_main(args) == 2
    assert f"{pool}:2: " in capsys.readouterr().err
    pool.write_text('{"prompt": "ok"}\n')
    assert nova_main(args) == 2  # the teacher directory does not exist
    assert "--teacher" in capsys.readouterr().err
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"category": "qa", "prompt": "p"}) + "\n")
    assert nova_main([*args, "--seeds", str(seeds)]) == 2
    assert f"{seeds}:1: " in capsys.readouterr().err
    assert nova_main([*args, "--dedup-threshold", "1.5"]) == 2
    assert "threshold" in capsys.readouterr().err
    assert nova_main([*args, "--max-regen", "-1"]) == 2
    assert "max-regen" in capsys.readouterr().err
