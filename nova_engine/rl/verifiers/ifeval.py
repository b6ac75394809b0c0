"""IFEval-style constraint checks: the 25 instruction-following constraints of Tülu 3's RLVR
data (`dataset: "ifeval"`), written here from the constraint definitions.

Ground truth (Tülu 3 layout): a JSON string naming the check and its arguments,
    '{"func_name": "verify_keyword_frequency", "word": "sand", "N": 3, "quantifier": null, ...}'
keys with null values, and keys the check does not take, are ignored (Tülu writes every
argument name of every check); a missing argument is an error. The arguments may also sit
under "kwargs": {...}. A dict instead of the string, or a list of
such constraints (all must hold; the score is the fraction that holds) are accepted too.

The checks, by `func_name` (arguments), and what passes:
  verify_keywords (keyword_list)         every keyword occurs (case-insensitive substring)
  verify_keyword_frequency (word, N)     the word / phrase occurs exactly N times as a whole
                                         word (case-insensitive)
  validate_forbidden_words (forbidden_words)  none occurs as a whole word (case-insensitive)
  verify_letter_frequency (letter, N)    the letter occurs exactly N times (case-insensitive)
  validate_response_language (language)  langdetect (seeded) gives the ISO 639-1 code
  verify_paragraph_count (N)             N non-empty paragraphs separated by "* * *" lines
  validate_word_constraint (N, quantifier)      whitespace-separated words vs N
  verify_sentence_constraint (N, quantifier)    sentences (.!? + space, common abbreviations
                                                skipped) vs N
  validate_paragraphs (N, first_word, i)  N paragraphs separated by blank lines, the i-th
                                         (1-based) starts with first_word (case-insensitive)
  verify_postscript (postscript_marker)  a line starts with the marker and text follows it
  validate_placeholders (N)              at least N non-empty [placeholders]
  verify_bullet_points (N)               exactly N markdown bullet lines ("* x" or "- x")
  validate_title ()                      a non-empty <<title>>
  validate_choice (options)              the response contains one of the options (a list,
                                         or a string holding a Python/JSON list or
                                         comma-separated options)
  validate_highlighted_sections (N)      at least N non-empty *highlighted* / **bold** spans
  validate_sections (N, section_splitter)  at least N headers "<splitter> <number>" at line
                                         starts (case-insensitive; markdown # * _ allowed)
  validate_json_format ()                the response (a ```json fence allowed) is JSON
  validate_repeat_prompt (original_prompt)  the response starts with the prompt
                                         (case-insensitive, surrounding whitespace ignored)
  validate_two_responses ()              two different non-empty responses split by exactly
                                         one "******"
  validate_uppercase ()                  has letters, none lowercase
  validate_lowercase ()                  has letters, none uppercase
  validate_frequency_capital_words (N, quantifier)  all-capital words vs N
  validate_end (end_phrase)              ends with the phrase (case-insensitive, trailing
                                         whitespace ignored)
  validate_quotation ()                  wrapped in double quotes
  validate_no_commas ()                  no ","
Quantifiers: "at least" (>= N), "at most" (<= N), "less than" (< N), "exactly" (== N),
"around" (within max(1, round(N/10)) for words and capital words, within 1 for sentences).
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nova_engine.rl.verifiers.base import (
    CORRECT,
    PARTIAL,
    WRONG,
    GroundTruth,
    VerifierResult,
    register_verifier,
)

QUANTIFIERS = ("at least", "at most", "less than", "exactly", "around")


def _compare(count: int, n: int, quantifier: str, around: int) -> bool:
    if quantifier == "at least":
        return count >= n
    if quantifier == "at most":
        return count <= n
    if quantifier == "less than":
        return count < n
    if quantifier == "exactly":
        return count == n
    return abs(count - n) <= around  # "around" (validated when parsing)


def _tenth(n: int) -> int:
    return max(1, round(n * 0.1))


def _word_re(phrase: str) -> re.Pattern:
    """`phrase` as a whole word / phrase: no word character right before or after it."""
    return re.compile(r"(?<!\w)" + re.escape(phrase.strip()) + r"(?!\w)", re.IGNORECASE)


# ------------------------------------------------------------------------- the 25 checks


def verify_keywords(text: str, keyword_list: list[str]) -> bool:
    low = text.lower()
    return all(k.lower() in low for k in keyword_list)


def verify_keyword_frequency(text: str, word: str, N: int) -> bool:
    return len(_word_re(word).findall(text)) == N


def validate_forbidden_words(text: str, forbidden_words: list[str]) -> bool:
    return not any(_word_re(w).search(text) for w in forbidden_words if w.strip())


def verify_letter_frequency(text: str, letter: str, N: int) -> bool:
    if len(letter) != 1:
        raise ValueError(f"letter {letter!r}: expected a single character")
    return text.lower().count(letter.lower()) == N


def validate_response_language(text: str, language: str) -> bool:
    from langdetect import DetectorFactory, LangDetectException, detect

    DetectorFactory.seed = 0  # langdetect samples: seeded, the same text gets the same code
    try:
        return detect(text) == language
    except LangDetectException:  # no letters to go by
        return False


_DIVIDER = re.compile(r"^\s*\*\s*\*\s*\*\s*$", re.MULTILINE)


def verify_paragraph_count(text: str, N: int) -> bool:
    parts = [p.strip() for p in _DIVIDER.split(text)]
    if parts and not parts[0]:
        parts = parts[1:]
    if parts and not parts[-1]:
        parts = parts[:-1]
    return all(parts) and len(parts) == N


def validate_word_constraint(text: str, N: int, quantifier: str) -> bool:
    return _compare(len(text.split()), N, quantifier, _tenth(N))


_ABBREVIATIONS = {
    "mr",
    "mrs",
    "ms",
    "dr",
    "prof",
    "sr",
    "jr",
    "st",
    "vs",
    "etc",
    "e.g",
    "i.e",
    "eg",
    "ie",
    "no",
    "fig",
    "inc",
    "ltd",
    "co",
    "approx",
    "cf",
    "al",
}
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")


def count_sentences(text: str) -> int:
    """Sentences: runs of text ending in . ! or ? before whitespace (or the end), where the
    word before a single "." is not a known abbreviation ("Dr.", "etc."), a dotted one
    ("e.g.", "p.m.") or an initial ("J."); a final
    stretch without end punctuation counts when it has a word character."""
    count, start = 0, 0
    for m in _SENTENCE_END.finditer(text):
        before = re.search(r"([\w.]+)$", text[start : m.start()])
        word = before.group(1).lower() if before else ""
        if m.group(0).startswith(".") and m.group(0).rstrip("\"')]") == ".":
            dotted = re.fullmatch(r"(?:[^\W\d_]\.)+[^\W\d_]", word)  # e.g, p.m, u.s.a
            if word in _ABBREVIATIONS or dotted or (len(word) == 1 and word.isalpha()):
                continue
        if re.search(r"\w", text[start : m.start()]):
            count += 1
        start = m.end()
    if re.search(r"\w", text[start:]):
        count += 1
    return count


def verify_sentence_constraint(text: str, N: int, quantifier: str) -> bool:
    return _compare(count_sentences(text), N, quantifier, 1)


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def validate_paragraphs(text: str, N: int, first_word: str, i: int) -> bool:
    paras = _paragraphs(text)
    if len(paras) != N or not 1 <= i <= N:
        return False
    m = re.match(r"[\W_]*([\w'-]+)", paras[i - 1])
    return m is not None and m.group(1).lower() == first_word.strip().lower()


def verify_postscript(text: str, postscript_marker: str) -> bool:
    marker = postscript_marker.strip()
    m = re.search(r"^\s*" + re.escape(marker), text, re.IGNORECASE | re.MULTILINE)
    return m is not None and bool(text[m.end() :].strip())


def validate_placeholders(text: str, N: int) -> bool:
    return len([p for p in re.findall(r"\[([^\[\]\n]*)\]", text) if p.strip()]) >= N


_BULLET = re.compile(r"^[ \t]*(?:\*(?!\*)|-(?!-))[ \t]+(.*)$", re.MULTILINE)


def verify_bullet_points(text: str, N: int) -> bool:
    items = [b for b in _BULLET.findall(text) if re.search(r"[^\s*-]", b)]  # not a divider
    return len(items) == N


def validate_title(text: str) -> bool:
    return any(t.strip() for t in re.findall(r"<<([^<>\n]+)>>", text))


def _options(options: Any) -> list[str]:
    if isinstance(options, str):
        try:
            parsed = ast.literal_eval(options.strip())
        except (ValueError, SyntaxError):
            parsed = [o for o in options.split(",")]
        options = [parsed] if isinstance(parsed, str) else parsed
    if not isinstance(options, (list, tuple)) or not options:
        raise ValueError(f"options {options!r}: expected a non-empty list of strings")
    out = [str(o).strip() for o in options if str(o).strip()]
    if not out:
        raise ValueError("options are all empty")
    return out


def validate_choice(text: str, options: Any) -> bool:
    for opt in _options(options):
        left = r"(?<!\w)" if re.match(r"\w", opt) else ""
        right = r"(?!\w)" if re.search(r"\w$", opt) else ""
        if re.search(left + re.escape(opt) + right, text):
            return True
    return False


def validate_highlighted_sections(text: str, N: int) -> bool:
    spans = re.findall(r"\*\*([^\n*]+)\*\*|\*([^\n*]+)\*", text)
    return sum(1 for a, b in spans if (a or b).strip()) >= N


def validate_sections(text: str, N: int, section_splitter: str) -> bool:
    head = r"^[ \t#*_]*" + re.escape(section_splitter.strip()) + r"[ \t]*\d+"
    return len(re.findall(head, text, re.IGNORECASE | re.MULTILINE)) >= N


def validate_json_format(text: str) -> bool:
    body = text.strip()
    m = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, re.DOTALL | re.IGNORECASE)
    if m:
        body = m.group(1)
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def validate_repeat_prompt(text: str, original_prompt: str) -> bool:
    return text.strip().lower().startswith(original_prompt.strip().lower())


def validate_two_responses(text: str) -> bool:
    parts = re.split(r"(?<!\*)\*{6}(?!\*)", text)
    if len(parts) != 2:
        return False
    first, second = parts[0].strip(), parts[1].strip()
    return bool(first) and bool(second) and first != second


def validate_uppercase(text: str) -> bool:
    return any(c.isalpha() for c in text) and text == text.upper()


def validate_lowercase(text: str) -> bool:
    return any(c.isalpha() for c in text) and text == text.lower()


def validate_frequency_capital_words(text: str, N: int, quantifier: str) -> bool:
    words = [w for w in re.findall(r"[^\W\d_]+", text) if w.isupper()]
    return _compare(len(words), N, quantifier, _tenth(N))


def validate_end(text: str, end_phrase: str) -> bool:
    return text.rstrip().lower().endswith(end_phrase.strip().lower())


def validate_quotation(text: str) -> bool:
    body = text.strip()
    return len(body) >= 2 and body[0] == '"' and body[-1] == '"'


def validate_no_commas(text: str) -> bool:
    return "," not in text


CHECKS: dict[str, Callable[..., bool]] = {
    fn.__name__: fn
    for fn in (
        verify_keywords,
        verify_keyword_frequency,
        validate_forbidden_words,
        verify_letter_frequency,
        validate_response_language,
        verify_paragraph_count,
        validate_word_constraint,
        verify_sentence_constraint,
        validate_paragraphs,
        verify_postscript,
        validate_placeholders,
        verify_bullet_points,
        validate_title,
        validate_choice,
        validate_highlighted_sections,
        validate_sections,
        validate_json_format,
        validate_repeat_prompt,
        validate_two_responses,
        validate_uppercase,
        validate_lowercase,
        validate_frequency_capital_words,
        validate_end,
        validate_quotation,
        validate_no_commas,
    )
}


# --------------------------------------------------------------------- ground-truth parsing


@dataclass(frozen=True)
class Constraint:
    """One check and its (validated) arguments."""

    func_name: str
    kwargs: dict[str, Any]

    def __call__(self, text: str) -> bool:
        return bool(CHECKS[self.func_name](text, **self.kwargs))


def _as_int(name: str, v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError(f"{name}={v!r}: expected an integer")
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, str) and re.fullmatch(r"\s*\d+\s*", v):
        v = int(v)
    if not isinstance(v, int) or v < 0:
        raise ValueError(f"{name}={v!r}: expected an integer >= 0")
    return v


def _as_words(name: str, v: Any) -> list[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(w, str) for w in v) or not v:
        raise ValueError(f"{name}={v!r}: expected a non-empty list of strings")
    return list(v)


def _coerce(func: str, name: str, v: Any) -> Any:
    if name in ("N", "i"):
        return _as_int(name, v)
    if name in ("keyword_list", "forbidden_words"):
        return _as_words(name, v)
    if name == "quantifier":
        q = str(v).strip().lower()
        if q not in QUANTIFIERS:
            raise ValueError(f"quantifier={v!r}: expected one of {', '.join(QUANTIFIERS)}")
        return q
    if name == "options":
        _options(v)  # validates
        return v
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{name}={v!r}: expected a non-empty string")
    return v


def parse_constraint(obj: Any) -> Constraint:
    """One Tülu 3 IFEval constraint (JSON string or dict) -> Constraint; ValueError says what
    is wrong (unknown func_name with the known list, a missing or malformed argument). Keys
    the check does not take are ignored."""
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except json.JSONDecodeError as e:
            raise ValueError(f"IFEval ground truth is not JSON ({e.msg})") from None
    if not isinstance(obj, dict) or "func_name" not in obj:
        raise ValueError(
            'IFEval ground truth: expected a JSON object with "func_name" and its arguments'
        )
    func = obj["func_name"]
    if func not in CHECKS:
        raise ValueError(f"unknown IFEval check {func!r}; known: {', '.join(sorted(CHECKS))}")
    args = dict(obj.get("kwargs") or {}) if isinstance(obj.get("kwargs"), dict) else {}
    args.update({k: v for k, v in obj.items() if k not in ("func_name", "kwargs")})
    args = {k: v for k, v in args.items() if v is not None}
    params = [p for p in inspect.signature(CHECKS[func]).parameters if p != "text"]
    missing = [p for p in params if p not in args]
    if missing:
        raise ValueError(f"{func}: missing argument(s) {missing}")
    return Constraint(func, {k: _coerce(func, k, args[k]) for k in params})


def parse_constraints(ground_truth: GroundTruth) -> list[Constraint]:
    """A constraint, or a list of them (a JSON list string, or a Python list)."""
    gt = ground_truth
    if isinstance(gt, str) and gt.lstrip().startswith("["):
        try:
            gt = json.loads(gt)
        except json.JSONDecodeError as e:
            raise ValueError(f"IFEval ground truth is not JSON ({e.msg})") from None
    items = gt if isinstance(gt, (list, tuple)) else [gt]
    if not items:
        raise ValueError("IFEval ground truth is an empty list")
    return [parse_constraint(x) for x in items]


def check_ifeval_ground_truth(ground_truth: GroundTruth) -> None:
    parse_constraints(ground_truth)


@register_verifier("ifeval", check=check_ifeval_ground_truth)
def verify_ifeval(response: str, ground_truth: GroundTruth) -> VerifierResult:
    try:
        constraints = parse_constraints(ground_truth)
    except ValueError as e:
        return VerifierResult.failed("bad_ground_truth", str(e))
    failed = [c.func_name for c in constraints if not c(response)]
    score = 1.0 - len(failed) / len(constraints)
    if not failed:
        return VerifierResult(1.0, CORRECT)
    kind = WRONG if score == 0.0 else PARTIAL
    return VerifierResult(score, f"{kind}: {', '.join(failed)} not followed")
