"""Verifier registry: reward checks by data-source name (Tülu 3 RLVR's `dataset` field).

    @register_verifier("gsm8k", check=check_number_ground_truth)
    def gsm8k(response: str, ground_truth) -> VerifierResult | bool | float: ...

    verify_one(VerifyItem("gsm8k", response, "18"))   # in this process, NOT time-bounded
    VerifierPool(...).verify_batch(items)               # bounded, in worker processes (pool.py)

Names are case-insensitive ("MATH" and "math" name one verifier) and a verifier may have
aliases. A verifier returns a `VerifierResult`, a bool (correct / wrong) or a float score in
[0, 1]; `verify_one` turns the latter two into a result and turns any exception raised by the
verifier into score 0 with reason "error: <Type>: <message>" (never raises for a bad response).

Reasons: the part before the first ":" is the `kind` that batches count
  correct           score 1
  partial           0 < score < 1 (e.g. some of several IFEval constraints hold)
  wrong             an answer was found and it is wrong
  no_answer         no answer could be extracted from the response
  bad_ground_truth  the ground truth itself could not be parsed
  timeout           the call ran past its wall-clock limit (pool only)
  error             the verifier raised, or its worker process died (pool only)

This module imports nothing heavy (no torch): worker processes import it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

CORRECT, PARTIAL, WRONG, NO_ANSWER = "correct", "partial", "wrong", "no_answer"
BAD_GROUND_TRUTH, TIMEOUT, ERROR = "bad_ground_truth", "timeout", "error"
REASON_KINDS = (CORRECT, PARTIAL, WRONG, NO_ANSWER, BAD_GROUND_TRUTH, TIMEOUT, ERROR)

GroundTruth = Any  # str, a list of str, or (IFEval) a dict / list of dicts
VerifierFn = Callable[[str, GroundTruth], Any]
CheckFn = Callable[[GroundTruth], None]


@dataclass(frozen=True)
class VerifierResult:
    """The outcome of one verification."""

    score: float
    """In [0, 1]: 1 = verified correct."""
    reason: str
    """"<kind>" or "<kind>: <detail>", kind in REASON_KINDS."""
    answer: str | None = None
    """The answer the verifier extracted from the response, when it found one."""

    def __post_init__(self) -> None:
        if not (0.0 <= self.score <= 1.0):
            raise ValueError(f"VerifierResult.score must be in [0, 1], got {self.score}")

    @property
    def kind(self) -> str:
        return self.reason.split(":", 1)[0].strip()

    @property
    def correct(self) -> bool:
        return self.score >= 1.0

    @classmethod
    def from_bool(cls, ok: bool, answer: str | None = None) -> VerifierResult:
        return cls(1.0 if ok else 0.0, CORRECT if ok else WRONG, answer)

    @classmethod
    def failed(cls, kind: str, detail: str = "") -> VerifierResult:
        """Score 0 with reason "kind" or "kind: detail" (detail cut to 200 characters)."""
        detail = " ".join(detail.split())
        if len(detail) > 200:
            detail = detail[:197] + "..."
        return cls(0.0, f"{kind}: {detail}" if detail else kind)


@dataclass(frozen=True)
class VerifyItem:
    """One response to verify: the data source's name, the response text (the generated
    assistant turn, decoded, without the stop token) and the record's ground truth."""

    dataset: str
    response: str
    ground_truth: GroundTruth


@dataclass(frozen=True)
class VerifierSpec:
    name: str
    fn: VerifierFn
    check: CheckFn | None = None
    aliases: tuple[str, ...] = ()


_REGISTRY: dict[str, VerifierSpec] = {}  # lower-cased name or alias -> spec


def register_verifier(
    name: str, *aliases: str, check: CheckFn | None = None
) -> Callable[[VerifierFn], VerifierFn]:
    """Decorator: registers `fn(response, ground_truth)` under `name` (and `aliases`).

    `check(ground_truth)` (optional) raises ValueError when a ground truth cannot be used by
    this verifier; data readers call it so that bad records fail at read time (file:line)."""

    def deco(fn: VerifierFn) -> VerifierFn:
        spec = VerifierSpec(name, fn, check, tuple(aliases))
        keys = [k.lower() for k in (name, *aliases)]
        for k in keys:
            if k in _REGISTRY:
                raise ValueError(f"verifier {k!r} is already registered")
        for k in keys:
            _REGISTRY[k] = spec
        return fn

    return deco


def unregister_verifier(name: str) -> None:
    """Removes `name` and its aliases (tests register temporary verifiers)."""
    spec = _REGISTRY.get(name.lower())
    if spec is None:
        return
    for k in (spec.name, *spec.aliases):
        _REGISTRY.pop(k.lower(), None)


def verifier_names() -> list[str]:
    """Every registered name and alias, lower-cased, sorted."""
    return sorted(_REGISTRY)


def get_verifier(dataset: str) -> VerifierSpec:
    """The verifier of data source `dataset` (case-insensitive); ValueError names the known ones."""
    spec = _REGISTRY.get(str(dataset).lower())
    if spec is None:
        raise ValueError(
            f"no verifier for dataset {dataset!r}; known: {', '.join(verifier_names())}"
        )
    return spec


def check_ground_truth(dataset: str, ground_truth: GroundTruth) -> None:
    """Raises ValueError when `dataset` is unknown or its verifier rejects `ground_truth`."""
    spec = get_verifier(dataset)
    if spec.check is not None:
        spec.check(ground_truth)


def _as_result(out: Any) -> VerifierResult:
    if isinstance(out, VerifierResult):
        return out
    if isinstance(out, bool):
        return VerifierResult.from_bool(out)
    if isinstance(out, (int, float)) and math.isfinite(out) and 0.0 <= out <= 1.0:
        score = float(out)
        kind = CORRECT if score >= 1.0 else WRONG if score <= 0.0 else PARTIAL
        return VerifierResult(score, kind)
    return VerifierResult.failed(
        ERROR, f"verifier returned {out!r}; expected a VerifierResult, a bool or a score in [0, 1]"
    )


def verify_one(item: VerifyItem) -> VerifierResult:
    """Runs the item's verifier here, in this process (no time bound: see VerifierPool).

    Raises ValueError only for an unknown dataset; a verifier's exception becomes score 0 with
    reason "error: <Type>: <message>"."""
    spec = get_verifier(item.dataset)
    try:
        return _as_result(spec.fn(item.response, item.ground_truth))
    except Exception as e:  # noqa: BLE001 - any verifier failure is reward 0 with a reason
        return VerifierResult.failed(ERROR, f"{type(e).__name__}: {e}")


def count_reasons(results: Iterable[VerifierResult]) -> Counter:
    """Counter of result kinds (correct, wrong, timeout, error, ...)."""
    return Counter(r.kind for r in results)
