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


def _column_add(a: int, b: int, op: str, carry: bool) -> int:
    """Test oracle: two-digit column arithmetic, ones column first, with the carry (plus) or
    borrow (minus) passed to the tens column only when `carry`."""
    ones = a % 10 + b % 10 if op == "plus" else a % 10 - b % 10
    out_carry = ones >= 10 if op == "plus" else ones < 0
    ones %= 10
    tens = a // 10 + b // 10 if op == "plus" else a // 10 - b // 10
    if out_carry and carry:
        tens += 1 if op == "plus" else -1
    return 10 * tens + ones


def test_dropped_carry_against_column_arithmetic():
    for a in range(100):
        for b in range(100):
            for op in ("plus", "minus"):
                if op == "minus" and b > a:
                    continue
                p = synthetic.Problem(a, op, b)
                assert _column_add(a, b, op, carry=True) == p.answer
                dropped = _column_add(a, b, op, carry=False)
                assert synthetic.has_carry(p) == (dropped != p.answer)
                assert synthetic.dropped_carry_answer(p) == (
                    dropped if dropped != p.answer else None
                )
    assert synthetic.dropped_carry_answer(synthetic.Problem(57, "plus", 68)) == 115
    assert synthetic.dropped_carry_answer(synthetic.Problem(52, "minus", 18)) == 44
    assert not synthetic.has_carry(synthetic.Problem(57, "times", 8))


def test_carry_error_rate_and_flags(tmp_path):
    q = 0.6
    paths = synthetic.write_task(tmp_path / "t", n_sft=3000, n_pref=600, n_eval=50, seed=7,
                                 carry_error=q, pref_skips_carry_error=True)  # fmt: skip
    rows = [json.loads(x) for x in open(paths["sft"])]
    n_carry = n_err = 0
    for row in rows:
        q_text, written = row["messages"][0]["content"], row["messages"][1]["content"]
        a, op, b = _Q.match(q_text).groups()
        a, b = words_to_number(a), words_to_number(b)
        right = _column_add(a, b, op, carry=True)
        assert row["answer"] == str(right) == str(_solve(q_text))
        carries = _column_add(a, b, op, carry=False) != right
        n_carry += carries
        if row.get("carry_error"):
            assert carries and written == str(_column_add(a, b, op, carry=False))
            n_err += 1
        else:
            assert written == str(right)
    # the slip hits only problems that carry, at rate q: binomial, 4 standard errors
    se = (q * (1 - q) / n_carry) ** 0.5
    assert n_carry > 1000 and abs(n_err / n_carry - q) < 4 * se
    # the preference pairs never reject the dropped carry, the held-out split stays right
    for row in map(json.loads, open(paths["pref"])):
        a, op, b = _Q.match(row["prompt"]).groups()
        a, b = words_to_number(a), words_to_number(b)
        assert row["chosen"][-1]["content"] == str(a + b if op == "plus" else a - b)
        assert row["rejected"][-1]["content"] != str(_column_add(a, b, op, carry=False))
    for row in map(json.loads, open(paths["eval"])):
        assert (
            row["messages"][1]["content"]
            == row["answer"]
            == str(_solve(row["messages"][0]["content"]))
        )
    # without a carry error the SFT file is the same as the default one (no draws made)
    plain = synthetic.write_task(tmp_path / "p", n_sft=3000, n_pref=600, n_eval=50, seed=7)
    zero = synthetic.write_task(tmp_path / "z", n_sft=3000, n_pref=600, n_eval=50, seed=7,
                                carry_error=0.0)  # fmt: skip
    assert open(plain["sft"]).read() == open(zero["sft"]).read()
    with pytest.raises(ValueError, match="carry_error"):
        synthetic.write_task(tmp_path / "bad", n_sft=3, n_pref=1, n_eval=1, carry_error=1.5)


def test_carry_error_deterministic_per_seed(tmp_path):
    kw = dict(n_sft=400, n_pref=50, n_eval=20, carry_error=0.5, pref_skips_carry_error=True)
    a = synthetic.write_task(tmp_path / "a", seed=2, **kw)
    b = synthetic.write_task(tmp_path / "b", seed=2, **kw)
    c = synthetic.write_task(tmp_path / "c", seed=3, **kw)
    for k in ("sft", "pref", "eval"):
        assert open(a[k]).read() == open(b[k]).read() != open(c[k]).read()
    flags = lambda p: [json.loads(x).get("carry_error", False) for x in open(p)]  # noqa: E731
    assert flags(a["sft"]) != flags(c["sft"])


def test_wrong_answer_can_skip_the_dropped_carry():
    import random

    p = synthetic.Problem(57, "plus", 68)
    rng = random.Random(0)
    seen = {synthetic.wrong_answer(p, rng) for _ in range(300)}
    assert 115 in seen and 125 not in seen
    rng = random.Random(0)
    skipped = {synthetic.wrong_answer(p, rng, skip_carry_error=True) for _ in range(300)}
    assert 115 not in skipped and 125 not in skipped and skipped <= seen - {115}


def test_operands_as_digits(tmp_path):
    paths = synthetic.write_task(tmp_path / "d", n_sft=200, n_pref=20, n_eval=20, seed=4,
                                 in_words=False)  # fmt: skip
    words = synthetic.write_task(tmp_path / "w", n_sft=200, n_pref=20, n_eval=20, seed=4)
    q = re.compile(r"^(?:What is|Compute|How much is|Calculate) (\d+) (plus|minus) (\d+)[?.]$")
    for line, wline in zip(open(paths["sft"]), open(words["sft"])):
        row, wrow = json.loads(line), json.loads(wline)
        a, op, b = q.match(row["messages"][0]["content"]).groups()
        assert row["answer"] == str(int(a) + int(b) if op == "plus" else int(a) - int(b))
        wa, wop, wb = _Q.match(wrow["messages"][0]["content"]).groups()  # same problems
        assert (words_to_number(wa), wop, words_to_number(wb)) == (int(a), op, int(b))


def test_reward_task_far_answers(tmp_path):
    from nova_engine.data.synthetic_reward import write_reward_task

    f = 0.5
    paths = write_reward_task(tmp_path / "f", n_regression=1200, n_pref=600, n_eval=200, seed=3,
                              far=f)  # fmt: skip
    plain = write_reward_task(tmp_path / "p", n_regression=1200, n_pref=600, n_eval=200, seed=3)
    zero = write_reward_task(tmp_path / "z", n_regression=1200, n_pref=600, n_eval=200, seed=3,
                             far=0.0)  # fmt: skip
    for k in plain:
        assert open(plain[k]).read() == open(zero[k]).read()  # far=0: the default bytes
    dists = []
    for row in map(json.loads, open(paths["eval"])):
        right = _solve(row["prompt"])
        assert row["chosen"] == str(right) and int(row["rejected"]) >= 0
        dists.append(abs(int(row["rejected"]) - right))
    for row in map(json.loads, open(paths["pref"])):
        right, m = _solve(row["prompt"]), row["preference_strength"]
        r1, r2 = int(row["response_1"]), int(row["response_2"])
        wrong = r2 if m < 0 else r1
        assert (r1 if m < 0 else r2) == right != wrong
        d = abs(wrong - right)
        assert abs(m) == (1 if d <= 1 else 2 if d <= 10 else 3)
        dists.append(d)
    far_n = sum(d > 10 for d in dists)
    assert all(1 <= d for d in dists)
    se = (f * (1 - f) / len(dists)) ** 0.5
    assert far_n / len(dists) > f - 4 * se  # the near misses add a few > 10 (other op)
    with pytest.raises(ValueError, match="far"):
        write_reward_task(tmp_path / "bad", n_regression=2, n_pref=1, n_eval=1, far=-0.1)
    import random

    from nova_engine.data.synthetic_reward import far_answer

    rng = random.Random(0)
    for a, op, b in [(0, "plus", 0), (5, "minus", 3), (99, "plus", 99), (80, "minus", 11)]:
        p = synthetic.Problem(a, op, b)
        got = {far_answer(p, rng) for _ in range(400)}
        assert all(x >= 0 and 11 <= abs(x - p.answer) <= 60 for x in got)
        assert max(got) == p.answer + 60  # both sides reachable where >= 0
        assert min(got) == max(p.answer - 60, 0 if p.answer >= 11 else p.answer + 11)


def test_step_five_task(tmp_path):
    """Operands on a grid of 5 (the demo's task): ones digits 0 or 5, a carry exactly when both
    are 5 (plus) or a borrow when 0 - 5 (minus); the wrong answers stay on the grid."""
    import random

    paths = synthetic.write_task(tmp_path / "s", n_sft=800, n_pref=300, n_eval=100, seed=1,
                                 max_value=95, step=5, carry_error=0.5,
                                 pref_skips_carry_error=True)  # fmt: skip
    for row in map(json.loads, open(paths["sft"])):
        a, op, b = _Q.match(row["messages"][0]["content"]).groups()
        a, b = words_to_number(a), words_to_number(b)
        assert a % 5 == b % 5 == 0 and a <= 95 and b <= 95
        carry = (a % 10, b % 10) == (5, 5) if op == "plus" else (a % 10, b % 10) == (0, 5)
        assert synthetic.has_carry(synthetic.Problem(a, op, b)) == carry
    for row in map(json.loads, open(paths["pref"])):
        right, wrong = int(row["chosen"][-1]["content"]), int(row["rejected"][-1]["content"])
        assert right % 5 == wrong % 5 == 0 and wrong != right
    rng = random.Random(0)
    p = synthetic.Problem(45, "plus", 30)
    got = {synthetic.wrong_answer(p, rng, step=5) for _ in range(200)}
    assert got == {70, 80, 65, 85, 15}  # +-5, +-10, the other operation (57 is off the grid)
    with pytest.raises(ValueError, match="step"):
        synthetic.make_splits(10, 1, 1, max_value=95, step=0)
