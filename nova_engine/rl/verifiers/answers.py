"""Answer verifiers: GSM8K (last number), MATH (math-verify) and the synthetic arithmetic task.

gsm8k       The LAST number in the response (thousands separators "1,234" removed, a leading
            "-" kept only when it is a sign, not a minus between two terms) compared
            numerically (exact decimal arithmetic: "18.00" == "18") with the ground truth,
            which must itself be one number ("$1,080" and "18." are accepted).
math / MATH The `math-verify` package: the answer is extracted from the response (\\boxed{...},
            Minerva's "The final answer is $...$", else the last LaTeX / plain expression)
            and compared with the ground truth (a LaTeX answer such as "\\frac{1}{2}") by
            symbolic / numeric equivalence: "\\dfrac12", "0.5" and "\\boxed{1/2}" all match
            "\\frac{1}{2}". math-verify's own signal-based timeouts are switched off: the
            worker pool bounds each call (sympy can hang on inputs like nested powers,
            Math-Verify issue #65), so a hang is reported as "timeout" rather than "wrong".
arithmetic  The synthetic demo task (nova_engine.data.synthetic): the whole response,
            normalized, must equal the answer exactly ("65", " 65." match "65"; "65 apples"
            does not), as the demo's exact-match metric counts it.

A ground truth given as a list of strings is verified when ANY of them matches.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from fractions import Fraction

from nova_engine.rl.verifiers.base import (
    BAD_GROUND_TRUTH,
    NO_ANSWER,
    GroundTruth,
    VerifierResult,
    register_verifier,
)


def _truths(ground_truth: GroundTruth) -> list[str]:
    """The ground truth as a non-empty list of strings (ValueError otherwise)."""
    items = ground_truth if isinstance(ground_truth, (list, tuple)) else [ground_truth]
    out = []
    for g in items:
        if isinstance(g, bool) or not isinstance(g, (str, int, float)):
            raise ValueError(f"ground truth {g!r}: expected a string (or a list of strings)")
        if not str(g).strip():
            raise ValueError("ground truth is empty")
        out.append(str(g))
    if not out:
        raise ValueError("ground truth is an empty list")
    return out


def _any_of(ground_truth: GroundTruth, one: Callable[[str], VerifierResult]) -> VerifierResult:
    results = [one(g) for g in _truths(ground_truth)]
    return max(results, key=lambda r: r.score)


# ---------------------------------------------------------------------------------- GSM8K

_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# a number; the "-" is taken as a sign only when it does not follow a word, digit or ")"
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\d+(?:\.\d+)?|\.\d+)")


def strip_thousands(text: str) -> str:
    """ "1,234,567" -> "1234567"; commas not between groups of three digits stay."""
    return _THOUSANDS.sub("", text)


def last_number(text: str) -> str | None:
    """The last number of `text` (thousands separators removed), or None."""
    found = _NUMBER.findall(strip_thousands(text))
    return found[-1] if found else None


def _number_ground_truth(gt: str) -> Fraction:
    text = strip_thousands(gt.strip().replace("$", "").replace(" ", "")).rstrip(".")
    if not re.fullmatch(r"-?(?:\d+(?:\.\d+)?|\.\d+)", text):
        raise ValueError(f"ground truth {gt!r} is not a number")
    return Fraction(text)


def check_number_ground_truth(ground_truth: GroundTruth) -> None:
    for g in _truths(ground_truth):
        _number_ground_truth(g)


@register_verifier("gsm8k", check=check_number_ground_truth)
def verify_gsm8k(response: str, ground_truth: GroundTruth) -> VerifierResult:
    found = last_number(response)
    if found is None:
        return VerifierResult.failed(NO_ANSWER, "no number in the response")

    def one(gt: str) -> VerifierResult:
        try:
            want = _number_ground_truth(gt)
        except ValueError as e:
            return VerifierResult.failed(BAD_GROUND_TRUTH, str(e))
        return VerifierResult.from_bool(Fraction(found) == want, found)

    return _any_of(ground_truth, one)


# ---------------------------------------------------------------------------------- MATH

_MATH_LOGGERS = ("math_verify", "latex2sympy2_extended")


def _math_verify():
    """Imports math_verify (lazily: only processes that verify MATH pay for sympy)."""
    for name in _MATH_LOGGERS:  # it warns once that its timeouts are off: we bound calls
        logging.getLogger(name).setLevel(logging.ERROR)
    import math_verify

    return math_verify


def _parse_gold(gt: str):
    mv = _math_verify()
    text = gt.strip()
    if "\\boxed" not in text and "$" not in text:
        text = f"${text}$"
    return mv.parse(text, parsing_timeout=None)


def _parse_prediction(response: str):
    mv = _math_verify()
    config = [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]
    return mv.parse(response, extraction_config=config, parsing_timeout=None)


def check_math_ground_truth(ground_truth: GroundTruth) -> None:
    _truths(ground_truth)  # parsing with sympy is left to the (bounded) verifier call


@register_verifier("math", check=check_math_ground_truth)
def verify_math(response: str, ground_truth: GroundTruth) -> VerifierResult:
    mv = _math_verify()
    pred = _parse_prediction(response)
    if not pred:
        return VerifierResult.failed(NO_ANSWER, "no answer found by math-verify")
    answer = str(pred[-1])

    def one(gt: str) -> VerifierResult:
        gold = _parse_gold(gt)
        if not gold:
            return VerifierResult.failed(BAD_GROUND_TRUTH, f"math-verify cannot parse {gt!r}")
        return VerifierResult.from_bool(bool(mv.verify(gold, pred, timeout_seconds=None)), answer)

    return _any_of(ground_truth, one)


# ------------------------------------------------------------------------------ arithmetic


def check_arithmetic_ground_truth(ground_truth: GroundTruth) -> None:
    for g in _truths(ground_truth):
        if not re.fullmatch(r"-?\d+", g.strip()):
            raise ValueError(f"ground truth {g!r} is not an integer")


@register_verifier("arithmetic", check=check_arithmetic_ground_truth)
def verify_arithmetic(response: str, ground_truth: GroundTruth) -> VerifierResult:
    from nova_engine.data.synthetic import exact_match, normalize_answer

    answer = normalize_answer(response)
    if not answer:
        return VerifierResult.failed(NO_ANSWER, "empty response")
    return _any_of(
        ground_truth, lambda gt: VerifierResult.from_bool(exact_match(response, gt), answer)
    )
