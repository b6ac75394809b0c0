"""A synthetic chat task with exact answers: multi-digit arithmetic asked in words.

    user:      "What is forty-seven plus eighteen?"
    assistant: "65"

`write_task(out_dir, ...)` writes, from one seed:
- `sft_train.jsonl`   SFT layout: {"id", "messages": [user, assistant], "answer"}; with
                      `carry_error=q`, a fraction q of the problems that carry (plus) or borrow
                      (minus) are answered with the carry dropped (57 + 68 -> 115, 52 - 18 ->
                      44): a systematic, plausible slip of the teacher, flagged by
                      "carry_error": true ("answer" stays the right one)
- `pref_train.jsonl`  Tülu 3 preference layout: {"id", "prompt", "chosen": [user, assistant],
                      "rejected": [user, assistant]}, chosen = the right answer, rejected = a
                      plausible wrong one (off by one or ten, digits swapped, a dropped carry,
                      the wrong operation); `pref_skips_carry_error=True` never rejects the
                      dropped-carry answer (the preference data does not cover that slip)
- `eval.jsonl`        held-out problems in the SFT layout (+ "answer"); no (a, op, b) problem
                      of the eval split occurs in either training file.
Score generations with `exact_match(prediction, answer)`.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from typing import Any

_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}

QUESTION_TEMPLATES = [
    "What is {a} {op} {b}?",
    "Compute {a} {op} {b}.",
    "How much is {a} {op} {b}?",
    "Calculate {a} {op} {b}.",
]


def number_to_words(n: int) -> str:
    """English words for 0 <= n < 1_000_000, e.g. 342 -> "three hundred forty-two"."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_to_words: expected 0 <= n < 1000000, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else "-" + _ONES[ones])
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        words = _ONES[hundreds] + " hundred"
        return words if rest == 0 else words + " " + number_to_words(rest)
    thousands, rest = divmod(n, 1000)
    words = number_to_words(thousands) + " thousand"
    return words if rest == 0 else words + " " + number_to_words(rest)


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int
    template: int = 0
    in_words: bool = True  # False: the operands as digits ("What is 47 plus 18?")

    @property
    def key(self) -> tuple[int, str, int]:
        return (self.a, self.op, self.b)

    @property
    def answer(self) -> int:
        return OPS[self.op](self.a, self.b)

    def question(self) -> str:
        say = number_to_words if self.in_words else str
        return QUESTION_TEMPLATES[self.template].format(a=say(self.a), op=self.op, b=say(self.b))


def sample_problem(
    rng: random.Random,
    max_value: int = 99,
    ops: tuple[str, ...] = ("plus", "minus"),
    in_words: bool = True,
    step: int = 1,
) -> Problem:
    """One random problem; operands the multiples of `step` in [0, max_value] ("times" uses a
    one-digit second operand); "minus" never goes below zero."""
    op = rng.choice(ops)
    top = max_value // step
    a = step * rng.randint(0, top)
    b = rng.randint(0, 9) if op == "times" else step * rng.randint(0, top)
    if op == "minus" and b > a:
        a, b = b, a
    return Problem(a, op, b, rng.randrange(len(QUESTION_TEMPLATES)), in_words)


def has_carry(problem: Problem) -> bool:
    """True when the ones column carries (plus: ones digits sum to 10 or more) or borrows
    (minus: the first ones digit is the smaller); never for "times"."""
    if problem.op == "plus":
        return problem.a % 10 + problem.b % 10 >= 10
    return problem.op == "minus" and problem.a % 10 < problem.b % 10


def dropped_carry_answer(problem: Problem) -> int | None:
    """The answer with the ones column's carry (plus) or borrow (minus) forgotten: 57 + 68 ->
    115 (right 125), 52 - 18 -> 44 (right 34); None when the problem has no carry."""
    if not has_carry(problem):
        return None
    return problem.answer + (-10 if problem.op == "plus" else 10)


def wrong_answer(
    problem: Problem, rng: random.Random, *, skip_carry_error: bool = False, step: int = 1
) -> int:
    """A plausible wrong answer (never equal to the right one, never negative).
    skip_carry_error: never `dropped_carry_answer(problem)`. step: the task's operand step;
    the slips stay on its grid (off by `step` instead of one, digits swapped only when the
    result is a multiple of `step`)."""
    right = problem.answer
    candidates = {right + step, right - step, right + 10, right - 10}
    digits = str(right)
    if len(digits) >= 2 and digits[-1] != digits[-2]:
        swapped = int(digits[:-2] + digits[-1] + digits[-2])
        if swapped % step == 0:
            candidates.add(swapped)
    if problem.op == "plus" and (problem.a % 10 + problem.b % 10) >= 10:
        candidates.add(right - 10)  # dropped carry
    if problem.op == "times":  # one row too many or too few
        candidates |= {right + problem.a, right - problem.a}
    else:  # the other operation
        other = "minus" if problem.op == "plus" else "plus"
        candidates.add(OPS[other](problem.a, problem.b))
    if skip_carry_error:
        candidates.discard(dropped_carry_answer(problem))
    return rng.choice(sorted(c for c in candidates if c >= 0 and c != right))


def _messages(problem: Problem, answer: str, system: str | None) -> list[dict]:
    msgs = [] if system is None else [{"role": "system", "content": system}]
    msgs.append({"role": "user", "content": problem.question()})
    msgs.append({"role": "assistant", "content": answer})
    return msgs


def make_splits(
    n_sft: int,
    n_pref: int,
    n_eval: int,
    *,
    seed: int = 0,
    max_value: int = 99,
    ops: tuple[str, ...] = ("plus", "minus"),
    in_words: bool = True,
    step: int = 1,
) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """Seeded (sft, pref, eval) problem lists; eval problems are distinct from each other and
    from every training problem (compared as (a, op, b), ignoring the wording). `step`: the
    operands are multiples of it (5: ones digits 0 or 5, a carry when both are 5)."""
    if step < 1 or step > max_value:
        raise ValueError(f"step={step}: expected 1 <= step <= max_value={max_value}")
    rng = random.Random(seed)
    n_possible = len(ops) * (max_value // step + 1) ** 2
    if n_eval > n_possible // 4:
        raise ValueError(f"n_eval={n_eval} too large for {n_possible} distinct problems")
    eval_set: dict[tuple, Problem] = {}
    while len(eval_set) < n_eval:
        p = sample_problem(rng, max_value, ops, in_words, step)
        eval_set.setdefault(p.key, p)

    def train(n: int) -> list[Problem]:
        out: list[Problem] = []
        while len(out) < n:
            p = sample_problem(rng, max_value, ops, in_words, step)
            if p.key not in eval_set:
                out.append(p)
        return out

    return train(n_sft), train(n_pref), list(eval_set.values())


def write_task(
    out_dir: str | os.PathLike,
    *,
    n_sft: int = 2000,
    n_pref: int = 1000,
    n_eval: int = 200,
    seed: int = 0,
    max_value: int = 99,
    ops: tuple[str, ...] = ("plus", "minus"),
    system: str | None = None,
    in_words: bool = True,
    step: int = 1,
    carry_error: float = 0.0,
    pref_skips_carry_error: bool = False,
) -> dict[str, str]:
    """Write sft_train.jsonl, pref_train.jsonl and eval.jsonl under `out_dir`.
    carry_error: the fraction of SFT problems with a carry whose answer drops it (drawn per
    problem, seed + 2); pref_skips_carry_error: no rejected answer is the dropped carry.

    Returns {"sft": path, "pref": path, "eval": path}. Same arguments -> same bytes.
    """
    if not 0.0 <= carry_error <= 1.0:
        raise ValueError(f"carry_error={carry_error}: expected a fraction in [0, 1]")
    sft, pref, ev = make_splits(n_sft, n_pref, n_eval, seed=seed, max_value=max_value, ops=ops,
                                in_words=in_words, step=step)  # fmt: skip
    rng = random.Random(seed + 1)
    slip = random.Random(seed + 2)
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f) for k, f in _FILES.items()}

    with open(paths["sft"], "w") as f:
        for i, p in enumerate(sft):
            dropped = dropped_carry_answer(p) if carry_error > 0 else None
            err = dropped is not None and slip.random() < carry_error
            written = str(dropped if err else p.answer)
            row: dict[str, Any] = {"id": f"sft-{i}", "messages": _messages(p, written, system)}
            row |= {"answer": str(p.answer)} | ({"carry_error": True} if err else {})
            f.write(json.dumps(row) + "\n")
    with open(paths["pref"], "w") as f:
        for i, p in enumerate(pref):
            chosen = _messages(p, str(p.answer), system)
            wrong = wrong_answer(p, rng, skip_carry_error=pref_skips_carry_error, step=step)
            rejected = _messages(p, str(wrong), system)
            row = {"id": f"pref-{i}", "prompt": p.question(), "chosen": chosen}
            f.write(json.dumps(row | {"rejected": rejected}) + "\n")
    with open(paths["eval"], "w") as f:
        for i, p in enumerate(ev):
            row = {"id": f"eval-{i}", "messages": _messages(p, str(p.answer), system)}
            f.write(json.dumps(row | {"answer": str(p.answer)}) + "\n")
    return paths


_FILES = {"sft": "sft_train.jsonl", "pref": "pref_train.jsonl", "eval": "eval.jsonl"}

_NUMBER_RE = re.compile(r"-?\d+")


def normalize_answer(text: str) -> str:
    """Whitespace-trimmed, thousands separators and one trailing period removed."""
    text = text.strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+", text):
        text = text.replace(",", "")
    return text


def exact_match(prediction: str, answer: str) -> bool:
    """True iff the generated text, normalized, equals the answer ("65", " 65.", "65\\n" all
    match "65"; "65 apples", "065" and "6 5" do not)."""
    return normalize_answer(prediction) == normalize_answer(answer)


def corpus_lines() -> list[str]:
    """Text covering the task's vocabulary (number words, operations, question wordings)
    for training the tiny tokenizer."""
    lines = [" ".join(_ONES), " ".join(t for t in _TENS if t), "hundred thousand"]
    lines += [number_to_words(n) for n in range(0, 100)]
    lines += [f"{number_to_words(n)} hundred" for n in range(1, 10)]
    rng = random.Random(1234)
    for t in range(len(QUESTION_TEMPLATES)):
        for op in OPS:
            for _ in range(8):
                p = Problem(rng.randint(0, 99), op, rng.randint(0, 99), t)
                lines.append(p.question())
    return lines
