"""What `nova pas` asks its models, and how it reads their answers.

Three prompts, each one user turn (the model's chat template is applied by the generator):
- `category_prompt`: the constrained classification question (answer: one category name);
  `parse_category` finds the category in whatever came back (unknown -> "other");
- `complement_prompt`: the teacher's task with few-shot (prompt, complement) seeds of the
  prompt's category, and on a regeneration the judge's reason for the rejection;
  `clean_complement` strips what a model adds around the complement;
- `judge_prompt`: the judge's criteria (the paper's: no drift from the intent, no
  over-extension, no answering, no language switch) and the JSON reply it must give;
  `parse_verdict` reads {"verdict": "accept" | "reject", "reason": str} out of the reply
  (None = malformed).
`script_of` / `script_switch` give the cheap rule check run before the judge: a complement
whose letters are mostly of another script than the prompt's (e.g. a Chinese prompt with an
English complement) is rejected without asking the judge.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from nova_engine.tools.pas.records import OTHER, Seed

COMPLEMENT_TASK = (
    "Write a complementary instruction for the user prompt: a few sentences of extra guidance "
    "that help an assistant answer it well (what to cover, the format, the checks to make). "
    "Keep the prompt's intent, do not add requirements the user did not ask for, do not "
    "answer the prompt, and write in the language of the prompt."
)
JUDGE_TASK = (
    "You check a complementary instruction written for a user prompt. Reject it if it drifts "
    "from or changes the prompt's intent, over-extends it with requirements the user did not "
    "ask for, answers the prompt instead of guiding the answer, or is written in another "
    "language than the prompt. Otherwise accept it."
)
JUDGE_FORMAT = (
    'Reply with one JSON object and nothing else: {"verdict": "accept" or "reject", '
    '"reason": "<one sentence>"}'
)
JUDGE_RETRY = (
    "Your previous reply was not a JSON object of that form. Reply with the JSON object only."
)
VERDICTS = {"accept": True, "reject": False}


# ---------------------------------------------------------------------------- categories


def category_prompt(prompt: str, categories: Sequence[str]) -> str:
    return (
        "Classify the user prompt below into exactly one category.\n"
        f"Categories: {', '.join(categories)}\n"
        "Answer with the category name only.\n\n"
        f"Prompt:\n{prompt}\n\nCategory:"
    )


def _squash(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def parse_category(text: str | None, categories: Sequence[str]) -> str:
    """The category a model's answer names: a JSON {"category": ...} or the category whose
    name occurs first in the text (whole word; case, '_', '-' and spaces ignored; the longest
    name wins at one position). Anything else is "other"."""
    if not text:
        return OTHER
    obj = _first_json_object(text)
    if obj is not None and isinstance(obj.get("category"), str):
        text = obj["category"]
    words = re.findall(r"[A-Za-z0-9]+(?:[ _-][A-Za-z0-9]+)*", text)
    by_squash = {_squash(c): c for c in categories}
    for phrase in words:
        parts = re.split(r"[ _-]", phrase)
        for i in range(len(parts)):  # earliest position first, longest name there
            for j in range(len(parts), i, -1):
                hit = by_squash.get(_squash("".join(parts[i:j])))
                if hit is not None:
                    return hit
    return OTHER


# ---------------------------------------------------------------------------- complements


def pick_seeds(
    seeds: Sequence[Seed], category: str, prompt: str, k: int, salt: int = 0
) -> list[Seed]:
    """Up to k seeds of `category` (all seeds when it has none), chosen by a hash of the
    prompt so that the choice is deterministic and differs between prompts."""
    pool = [s for s in seeds if s.category == category] or list(seeds)
    if len(pool) <= k:
        return pool

    def key(s: Seed) -> bytes:
        return hashlib.blake2b(f"{salt}\0{prompt}\0{s.prompt}".encode(), digest_size=8).digest()

    return sorted(pool, key=key)[:k]


def complement_prompt(
    prompt: str, shots: Sequence[Seed], rejected_reason: str | None = None
) -> str:
    parts = [COMPLEMENT_TASK, ""]
    for s in shots:
        parts += [f"Prompt:\n{s.prompt}", f"Complement:\n{s.complement}", ""]
    if rejected_reason is not None:
        why = rejected_reason.strip() or "no reason given"
        parts += [
            f"A previous complement for the next prompt was rejected ({why}). Write a new one.",
            "",
        ]
    parts += [f"Prompt:\n{prompt}", "Complement:"]
    return "\n".join(parts)


def clean_complement(text: str) -> str:
    """Strip a leading "Complement:" label and cut where the model starts a new few-shot
    block ("Prompt:" on a line of its own or after a blank line)."""
    t = text.strip()
    t = re.sub(r"^(complement|complementary instruction)\s*:\s*", "", t, flags=re.IGNORECASE)
    cut = re.search(r"(^|\n)\s*prompt\s*:", t, flags=re.IGNORECASE)
    if cut:
        t = t[: cut.start()]
    return t.strip()


# ---------------------------------------------------------------------------- the judge


def judge_prompt(prompt: str, complement: str, retry: bool = False) -> str:
    parts = [
        JUDGE_TASK,
        "",
        f"Prompt:\n{prompt}",
        "",
        f"Complement:\n{complement}",
        "",
        JUDGE_FORMAT,
    ]
    if retry:
        parts += ["", JUDGE_RETRY]
    return "\n".join(parts)


@dataclass(frozen=True)
class Verdict:
    accept: bool
    reason: str


def _first_json_object(text: str) -> dict | None:
    dec = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = dec.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def parse_verdict(text: str | None) -> Verdict | None:
    """The first JSON object of the reply (code fences and text around it are ignored) with
    "verdict" "accept" or "reject" (case and surrounding spaces ignored) and an optional
    "reason" (a non-string reason is turned into text). None when there is no such object."""
    if not text:
        return None
    dec = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = dec.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("verdict"), str):
            continue
        v = VERDICTS.get(obj["verdict"].strip().lower())
        if v is None:
            return None
        reason = obj.get("reason", "")
        return Verdict(v, reason if isinstance(reason, str) else json.dumps(reason))
    return None


# ---------------------------------------------------------------------------- rule check


def script_of(text: str) -> str | None:
    """The script most of the letters are written in (the first word of their Unicode names:
    LATIN, CJK, CYRILLIC, ARABIC, HIRAGANA, HANGUL, ...); None without letters."""
    counts: Counter = Counter()
    for ch in text:
        if ch.isalpha():
            name = unicodedata.name(ch, "")
            counts[name.split(" ")[0] if name else "?"] += 1
    if not counts:
        return None
    return counts.most_common(1)[0][0]


_CJK_FAMILY = {"CJK", "HIRAGANA", "KATAKANA"}


def script_switch(prompt: str, complement: str) -> str | None:
    """A reason when the complement's main script differs from the prompt's, else None
    (Japanese kana and CJK ideographs count as one family)."""
    a, b = script_of(prompt), script_of(complement)
    if a is None or b is None or a == b or {a, b} <= _CJK_FAMILY:
        return None
    return f"language switch: the prompt is in {a.title()} script, the complement in {b.title()}"
