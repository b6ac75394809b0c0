"""Reward-model data: JSONL readers (file:line validation, as nova_engine.data.formats) and
tokenization into the packer's units.

Layouts, one JSON object per line (blank lines ignored, extra keys ignored):

HelpSteer2 (regression on attribute scores; `read_attribute_jsonl`):
    {"prompt": str | [messages], "response": str | [assistant msgs],
     "helpfulness": 0..4, "correctness": 0..4, "coherence": 0..4, "complexity": 0..4,
     "verbosity": 0..4, "id"?}
    - each attribute is a finite number in the score range, or null / absent (= missing: masked
      out of the loss, never read as 0); at least one attribute must be present;
    - the attribute names and the range are arguments (default: HELPSTEER2_ATTRIBUTES, 0..4).

HelpSteer2-Preference (Bradley–Terry family; `read_reward_pairs`):
    {"prompt": str | [messages], "response_1": str | [...], "response_2": str | [...],
     "preference_strength": integer in -3..3, "id"?}
    - negative: response_1 wins, positive: response_2 wins; the pair's margin is
      |preference_strength| (Scaled BT's m); 0 is a tie: dropped and counted (`ties`), not an
      error.
The Tülu 3 preference layout (chosen / rejected, `margin`?) is read by the same reader through
`formats.parse_pair`; the two pair layouts may be mixed in one file.

RewardBench (held-out evaluation; `read_rewardbench`):
    {"prompt": str | [messages], "chosen": str | [...], "rejected": str | [...],
     "subset": str, "id"?}

Multi-turn prompts are given as message lists (the HF HelpSteer2 files write earlier turns
inline with "<extra_id_1>" markers: convert those to messages first).

Every problem raises `DataError` ("path:line: what was wrong") or, with on_bad_line="skip",
is counted in the returned `RewardReadStats` and logged (rank 0) once per file. Records get a
dense `index` over the valid records of all files, in order; it becomes `Sample.index` /
`PairSample.index` and the row of the regression targets.

Reward reading point: the head is read at the LAST token of each sequence (the template's
end-of-turn token). With data.truncation="truncate" a long response is scored at the cut:
prefer "drop" for reward models.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nova_engine.data.formats import (
    Message,
    OnBadLine,
    PairRecord,
    ReadStats,
    _Bad,
    _get_id,
    _prompt_turns,
    _require,
    _response_turns,
    parse_pair,
    read_jsonl,
)
from nova_engine.data.sample import PairSample, Sample
from nova_engine.data.tokenize import ChatTokenizer, TokenizeStats, Truncation, tokenize_pairs
from nova_engine.logging import get_logger, is_rank0

logger = get_logger(__name__)

# The HelpSteer2 attributes in the order of the dataset's columns (and of Nemotron's head).
HELPSTEER2_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")

PREFERENCE_STRENGTHS = range(-3, 4)


@dataclass
class AttributeRecord:
    """One response with its attribute scores (None = missing), in the reader's attribute
    order."""

    prompt: list[Message]
    response: list[Message]
    scores: tuple[float | None, ...]
    index: int
    source: str
    id: str | None = None


@dataclass
class RewardBenchRecord:
    """One RewardBench comparison: the pair and its subset name."""

    pair: PairRecord
    subset: str


@dataclass
class RewardReadStats(ReadStats):
    """ReadStats plus the HelpSteer2-Preference ties dropped (preference_strength 0)."""

    ties: int = 0

    def merge(self, other: ReadStats) -> None:
        super().merge(other)
        self.ties += getattr(other, "ties", 0)


class _Tie(Exception):
    """Internal: a valid line that is dropped (preference_strength 0)."""


# ---------------------------------------------------------------------------- parsing


def _score(obj: dict, key: str, lo: float, hi: float) -> float | None:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _Bad(f'"{key}" must be a number in [{lo:g}, {hi:g}] or null, got {v!r}', "bad_score")
    if not lo <= v <= hi:
        raise _Bad(f'"{key}" = {v!r} is outside the score range [{lo:g}, {hi:g}]', "bad_score")
    return float(v)


def parse_attributes(
    obj: dict,
    attributes: Sequence[str] = HELPSTEER2_ATTRIBUTES,
    score_range: tuple[float, float] = (0.0, 4.0),
) -> tuple[list[Message], list[Message], tuple[float | None, ...], str | None]:
    """-> (prompt turns, response turns, scores in `attributes` order, id)."""
    prompt = _prompt_turns(_require(obj, "prompt", "a string or a message list"))
    response = _response_turns(
        _require(obj, "response", "a string or assistant messages"), "response"
    )
    lo, hi = score_range
    scores = tuple(_score(obj, k, lo, hi) for k in attributes)
    if all(s is None for s in scores):
        raise _Bad(
            f"no attribute score: expected at least one of {', '.join(attributes)}", "no_scores"
        )
    return prompt, response, scores, _get_id(obj)


def _strength(obj: dict) -> int:
    s = _require(obj, "preference_strength", "an integer in -3..3")
    ok = isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
    if not ok or s != int(s) or int(s) not in PREFERENCE_STRENGTHS:
        raise _Bad(
            f'"preference_strength" must be an integer in -3..3 (negative: response_1 wins), '
            f"got {s!r}",
            "bad_strength",
        )
    return int(s)


def parse_hs2_preference(obj: dict) -> tuple[list, list, list, str | None, float]:
    """HelpSteer2-Preference -> (prompt, chosen, rejected, id, margin = |strength|); a tie
    (strength 0) raises _Tie."""
    prompt = _prompt_turns(_require(obj, "prompt", "a string or a message list"))
    r1 = _response_turns(
        _require(obj, "response_1", "a string or assistant messages"), "response_1"
    )
    r2 = _response_turns(
        _require(obj, "response_2", "a string or assistant messages"), "response_2"
    )
    if r1 == r2:
        raise _Bad("response_1 and response_2 are identical", "identical_responses")
    s = _strength(obj)
    if s == 0:
        raise _Tie()
    chosen, rejected = (r1, r2) if s < 0 else (r2, r1)
    return prompt, chosen, rejected, _get_id(obj), float(abs(s))


def parse_reward_pair(obj: dict, margin_key: str = "margin") -> tuple[list, list, list, Any, float]:
    """Either pair layout: HelpSteer2-Preference when "response_1" is present, else Tülu 3."""
    if "response_1" in obj or "response_2" in obj:
        return parse_hs2_preference(obj)
    return parse_pair(obj, margin_key)


def parse_rewardbench(obj: dict) -> tuple[list, list, list, str | None, str]:
    """RewardBench -> (prompt, chosen, rejected, id, subset)."""
    subset = _require(obj, "subset", "the RewardBench subset name")
    if not isinstance(subset, str) or not subset.strip():
        raise _Bad(f'"subset" must be a non-empty string, got {subset!r}', "bad_subset")
    prompt, c, r, rid, _ = parse_pair(obj)
    return prompt, c, r, rid, subset


# ---------------------------------------------------------------------------- readers

# parse(obj, index, source) -> record; raises _Bad (bad line) or _Tie (dropped, counted)
Parse = Callable[[dict, int, str], Any]


def _read(paths, parse: Parse, on_bad_line: OnBadLine) -> tuple[list, RewardReadStats]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    records: list = []
    total = RewardReadStats()
    for p in paths:
        stats = RewardReadStats()

        def keep_ties_out(obj: dict, index: int, source: str, stats=stats) -> Any:
            try:
                return parse(obj, index, source)
            except _Tie:
                stats.ties += 1
                return None

        got, _ = read_jsonl(
            p, keep_ties_out, on_bad_line=on_bad_line, start_index=len(records), stats=stats
        )
        records += got
        if stats.ties and is_rank0():
            logger.info("%s: dropped %d ties (preference_strength 0)", os.fspath(p), stats.ties)
        total.merge(stats)
    return records, total


def read_attribute_jsonl(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    attributes: Sequence[str] = HELPSTEER2_ATTRIBUTES,
    score_range: tuple[float, float] = (0.0, 4.0),
    on_bad_line: OnBadLine = "error",
) -> tuple[list[AttributeRecord], RewardReadStats]:
    """HelpSteer2-layout files -> AttributeRecords (scores in `attributes` order)."""
    if not attributes or len(set(attributes)) != len(attributes):
        raise ValueError(f"attributes={list(attributes)}: expected distinct names")
    if not score_range[0] < score_range[1]:
        raise ValueError(f"score_range={score_range}: expected (low, high) with low < high")

    def parse(obj, index, source):
        prompt, resp, scores, rid = parse_attributes(obj, attributes, score_range)
        return AttributeRecord(prompt, resp, scores, index, source, rid)

    return _read(paths, parse, on_bad_line)


def read_reward_pairs(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    on_bad_line: OnBadLine = "error",
    margin_key: str = "margin",
) -> tuple[list[PairRecord], RewardReadStats]:
    """HelpSteer2-Preference and/or Tülu 3 preference files -> PairRecords (margin = the
    preference strength); ties are dropped and counted in `stats.ties`."""

    def parse(obj, index, source):
        prompt, c, r, rid, margin = parse_reward_pair(obj, margin_key)
        return PairRecord(prompt, c, r, index, source, rid, margin)

    return _read(paths, parse, on_bad_line)


def read_rewardbench(
    paths: str | os.PathLike | Sequence[str | os.PathLike], *, on_bad_line: OnBadLine = "error"
) -> tuple[list[RewardBenchRecord], RewardReadStats]:
    """RewardBench-layout files -> RewardBenchRecords (pair + subset)."""

    def parse(obj, index, source):
        prompt, c, r, rid, subset = parse_rewardbench(obj)
        return RewardBenchRecord(PairRecord(prompt, c, r, index, source, rid), subset)

    return _read(paths, parse, on_bad_line)


# ---------------------------------------------------------------------------- tokenization


@dataclass
class AttributeSet:
    """Tokenized regression data: one Sample per kept response and the targets of every
    record, row = Sample.index (NaN = missing; rows of dropped records stay unused)."""

    samples: list[Sample]
    targets: np.ndarray  # [num_records, K] float32, NaN where missing
    attributes: tuple[str, ...]

    def targets_of(self, sample_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """[N, K] targets of the samples with these `Sample.index` values."""
        return self.targets[np.asarray(sample_ids, dtype=np.int64)]


def tokenize_attributes(
    records: Sequence[AttributeRecord],
    tokenizer: Any,
    attributes: Sequence[str] = HELPSTEER2_ATTRIBUTES,
    *,
    max_length: int | None = None,
    truncation: Truncation = "drop",
) -> tuple[AttributeSet, TokenizeStats]:
    """AttributeRecords -> AttributeSet (prompt + response tokens, loss mask on the response;
    the length policy of `nova_engine.data.tokenize`)."""
    ct = ChatTokenizer(tokenizer, max_length=max_length, truncation=truncation)
    k = len(attributes)
    targets = np.full((len(records), k), np.nan, dtype=np.float32)
    samples = []
    for rec in records:
        if len(rec.scores) != k:
            raise ValueError(f"{rec.source}: {len(rec.scores)} scores for {k} attributes")
        targets[rec.index] = [np.nan if s is None else s for s in rec.scores]
        ct.stats.n_in += 1
        fitted = ct._fit(*ct.encode_response(rec.prompt, rec.response, rec.source))
        if fitted is None:
            continue
        ct.stats.n_out += 1
        samples.append(Sample(np.asarray(fitted[0], dtype=np.int64), fitted[1], index=rec.index))
    if ct.stats.truncated or ct.stats.n_dropped:
        logger.info("tokenize attributes: %s", ct.stats.summary())
    return AttributeSet(samples, targets, tuple(attributes)), ct.stats


def tokenize_rewardbench(
    records: Sequence[RewardBenchRecord],
    tokenizer: Any,
    *,
    max_length: int | None = None,
    truncation: Truncation = "drop",
) -> tuple[list[PairSample], dict[int, str], TokenizeStats]:
    """RewardBench records -> (PairSamples, subset of each pair index, stats)."""
    pairs, stats = tokenize_pairs(
        [r.pair for r in records], tokenizer, max_length=max_length, truncation=truncation
    )
    subsets = {r.pair.index: r.subset for r in records}
    return pairs, subsets, stats
