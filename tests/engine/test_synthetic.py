"""The synthetic arithmetic task and the tiny tokenizer: numbers in words checked against an
independent parser, answers recomputed from the question text, held-out split disjoint from
training, determinism, exact-match scoring; the tokenizer loads with AutoTokenizer, round-trips
any text and keeps digits and special tokens as single tokens."""

import json
import re

import pytest

from nova_engine.data import synthetic
from nova_engine.data.formats import read_pref_jsonl, read_sft_jsonl
from nova_engine.data.synthetic import exact_match, number_to_words
from nova_engine.data.tiny import SPECIAL_TOKENS, build_tiny_tokenizer

_SMALL = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
    )
}
_TENS = {
    w: 10 * i
    for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split())
    if w != "_"
}


def words_to_number(text: str) -> int:
    """Independent inverse of number_to_words (test oracle)."""
    total, cur = 0, 0
    for w in text.replace("-", " ").split():
        if w in _SMALL:
            cur += _SMALL[w]
        elif w in _TENS:
            cur += _TENS[w]
        elif w == "hundred":
            cur *= 100
        elif w == "thousand":
            total, cur = total + cur * 1000, 0
        else:
            raise ValueError(w)
    return total + cur


def test_number_to_words_by_hand():
    assert number_to_words(0) == "zero"
    assert number_to_words(47) == "forty-seven"
    assert number_to_words(18) == "eighteen"
    assert number_to_words(90) == "ninety"
    assert number_to_words(342) == "three hundred forty-two"
    assert number_to_words(1000) == "one thousand"
    assert number_to_words(120_015) == "one hundred twenty thousand fifteen"
    for n in list(range(0, 2100)) + [99_999, 999_999, 500_500]:
        assert words_to_number(number_to_words(n)) == n
    with pytest.raises(ValueError):
        number_to_words(-1)


_Q = re.compile(r"^(?:What is|Compute|How much is|Calculate) (.+) (plus|minus|times) (.+)[?.]$")


def _solve(question: str) -> int:
    a, op, b = _Q.match(question).groups()
    a, b = words_to_number(a), words_to_number(b)
    return {"plus": a + b, "minus": a - b, "times": a * b}[op]


def test_write_task_files(tmp_path):
    paths = synthetic.write_task(
        tmp_path / "t", n_sft=300, n_pref=150, n_eval=60, seed=3, ops=("plus", "minus", "times")
    )
    sft, _ = read_sft_jsonl(paths["sft"])
    pref, _ = read_pref_jsonl(paths["pref"])
    ev, _ = read_sft_jsonl(paths["eval"])
    assert (len(sft), len(pref), len(ev)) == (300, 150, 60)
    rows = [json.loads(x) for x in open(paths["sft"])]
    for rec, row in zip(sft, rows):
        q, a = rec.messages[0]["content"], rec.messages[1]["content"]
        assert str(_solve(q)) == a == row["answer"] and int(a) >= 0
    for rec in pref:
        q = rec.prompt[-1]["content"]
        assert rec.chosen[0]["content"] == str(_solve(q))
        wrong = int(rec.rejected[0]["content"])
        assert wrong != _solve(q) and wrong >= 0 and abs(wrong - _solve(q)) <= 200
    # held-out: eval problems are distinct and never in training (by value, not wording)
    key = lambda q: _Q.match(q).groups()  # noqa: E731
    train_keys = {key(r.messages[0]["content"]) for r in sft} | {
        key(r.prompt[-1]["content"]) for r in pref
    }
    eval_keys = [key(r.messages[0]["content"]) for r in ev]
    assert len(set(eval_keys)) == len(eval_keys) and not set(eval_keys) & train_keys


def test_write_task_deterministic(tmp_path):
    a = synthetic.write_task(
        tmp_path / "a", n_sft=50, n_pref=20, n_eval=10, seed=5, system="Be brief."
    )
    b = synthetic.write_task(
        tmp_path / "b", n_sft=50, n_pref=20, n_eval=10, seed=5, system="Be brief."
    )
    c = synthetic.write_task(tmp_path / "c", n_sft=50, n_pref=20, n_eval=10, seed=6)
    for k in ("sft", "pref", "eval"):
        assert open(a[k]).read() == open(b[k]).read()
        assert open(a[k]).read() != open(c[k]).read()
    first = json.loads(open(a["sft"]).readline())
    assert first["messages"][0] == {"role": "system", "content": "Be brief."}


def test_exact_match():
    assert exact_match("65", "65")
    assert exact_match(" 65.\n", "65")
    assert exact_match("1,234", "1234")
    assert not exact_match("65 apples", "65")
    assert not exact_match("065", "65")
    assert not exact_match("6 5", "65")
    assert not exact_match("", "65")
    assert not exact_match("12,34", "1234")


def test_tiny_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    out = build_tiny_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(out)
    assert 300 <= len(tok) <= 512
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|pad|>",
    )
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(s) == i
    for text in ["What is forty-seven plus eighteen?", "naïve café — ∑ 🙂\n\n\tx", "12345"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert [tok.decode([i]) for i in tok.encode("2024", add_special_tokens=False)] == list("2024")
    assert len(tok.encode(" seventeen", add_special_tokens=False)) == 1  # task words are tokens
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "65"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n65<|eot_id|>"
    )
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    # same inputs, same files
    out2 = build_tiny_tokenizer(tmp_path / "tok2")
    assert open(f"{out}/tokenizer.json").read() == open(f"{out2}/tokenizer.json").read()
