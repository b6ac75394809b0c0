"""Decontamination primitives: text normalization, the text of each data layout, the
compiled n-gram index, and the plain-Python reference it is tested (and benchmarked) against.

Normalization (`normalize`): Unicode NFKC, lowercase, every punctuation character deleted
(Unicode category P*, plus the ASCII symbols of `string.punctuation`: $ + < = > ^ ` | ~),
every whitespace character (and NUL) a space; words are the runs between spaces. So
"Don't  STOP!" and "dont stop" are the same two words; other symbols (×, €, ∑) stay.
The compiled path gets the same result from Python's NFKC + lowercasing of non-ASCII text and
the deletion/splitting in C++ (`prepare`); plain ASCII skips Python altogether.

An item is a list of segments (one per chat turn, or one string); n-grams never cross
segments. Grams of an eval item E: the word n-grams of each segment, or the whole segment
when it has fewer than n words; G(E) is their set. For a training item T,

    coverage(E, T) = |{g in G(E) : the words of g appear contiguously in a segment of T}| / |G(E)|

(the fraction of the eval item's n-grams found in that one training item; open-instruct
scores the fraction of the eval item's words those n-grams cover instead: `nova decontaminate
--score token`), and T hits E when coverage >= threshold (the float division, as written).
The compiled index (`csrc/decontam.h`) hashes words and grams to 64 bits; `ref_scan` does the
same with Python tuples and sets.

Layouts (`train_segments`), first match wins:
    {"messages": [{"role", "content"}, ...], ...}   chat (SFT) and RLVR prompts (with
        "ground_truth"): the user turns, every turn with all_turns
    {"chosen", "rejected", "prompt"?}               preference pairs: the prompt side, i.e.
        "prompt" (a string, or messages: their user turns) or, without it, the turns of
        "chosen" before its final response (user turns); all_turns adds every prompt turn
        and both responses
    {"prompt" | "question" | "problem": str | messages}
Eval items (`eval_segments`): the first of "prompt", "question", "problem", "messages"
present, or the named field; a string, a list of strings, or messages (user turns; every
turn with all_turns).
"""

from __future__ import annotations

import functools
import string
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from nova_engine import _C

DEFAULT_EVAL_FIELDS = ("prompt", "question", "problem", "messages")
PROMPT_FIELDS = ("prompt", "question", "problem")
SEGMENT_SEP = "\x00"  # between the segments of one item in the text handed to C++


class LayoutError(Exception):
    """A line whose layout is not understood (the reader adds path:line). `kind` is a short
    category for skip counts."""

    def __init__(self, reason: str, kind: str = "layout"):
        super().__init__(reason)
        self.reason, self.kind = reason, kind


# ---------------------------------------------------------------------------- normalization


@functools.cache
def _table() -> dict[int, str | None]:
    # Punctuation and whitespace live in planes 0-1 (none above U+1FFFF in unicodedata 14.0).
    table: dict[int, str | None] = {}
    for c in range(0x20000):
        ch = chr(c)
        if unicodedata.category(ch)[0] == "P":
            table[c] = None
        elif ch.isspace() or c == 0:
            table[c] = " "
    for ch in string.punctuation:
        table[ord(ch)] = None
    return table


def normalize(text: str) -> str:
    """NFKC, lowercase, punctuation deleted, whitespace (and NUL) mapped to spaces."""
    return unicodedata.normalize("NFKC", text).lower().translate(_table())


def words(text: str) -> list[str]:
    return normalize(text).split()


def prepare(segments: Sequence[str]) -> str | bytes:
    """The text of one item for the compiled index: segments joined by NUL. Plain ASCII goes
    as is (the C++ tokenizer does all of the normalization); other text is NFKC-normalized
    and lowercased here and sent as UTF-8 (lone surrogates passed through), the tokenizer
    deleting punctuation and splitting on whitespace with the tables of `unicode_classes`."""
    out, ascii_only = [], True
    for s in segments:
        if not s.isascii():
            s = unicodedata.normalize("NFKC", s).lower()
            ascii_only = False
        out.append(s.replace(SEGMENT_SEP, " ") if SEGMENT_SEP in s else s)
    text = SEGMENT_SEP.join(out)
    return text if ascii_only else text.encode("utf-8", "surrogatepass")


@functools.cache
def unicode_classes() -> tuple[list[int], list[int]]:
    """(punctuation, whitespace): the non-ASCII code points `normalize` deletes / reads as
    spaces, for the C++ tokenizer."""
    table = _table()
    drop = sorted(c for c, v in table.items() if c >= 128 and v is None)
    space = sorted(c for c, v in table.items() if c >= 128 and v == " ")
    return drop, space


def new_index(n: int) -> _C.NgramIndex:
    """An empty compiled index for n-grams, with this module's normalization tables."""
    return _C.NgramIndex(n, *unicode_classes())


# ---------------------------------------------------------------------------- layouts


def _turns(msgs: Any, key: str, all_turns: bool) -> list[str]:
    if not isinstance(msgs, list):
        raise LayoutError(
            f'"{key}" must be a list of messages, got {type(msgs).__name__}', "bad_type"
        )
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "content" not in m:
            raise LayoutError(
                f'"{key}"[{i}] must be an object with "role" and "content"', "bad_message"
            )
        if all_turns or m.get("role") == "user":
            content = m["content"]
            if not isinstance(content, str):
                raise LayoutError(
                    f'"{key}"[{i}] content must be a string, got {type(content).__name__}',
                    "bad_type",
                )
            out.append(content)
    return out


def _text_or_turns(value: Any, key: str, all_turns: bool) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, list):
        return _turns(value, key, all_turns)
    raise LayoutError(
        f'"{key}" must be a string, a list of strings or messages, got {type(value).__name__}',
        "bad_type",
    )


def _keys(obj: dict) -> str:
    return ", ".join(sorted(obj)) or "none"


def train_segments(obj: dict, all_turns: bool = False) -> list[str]:
    """The text segments of one training record (see the module docstring for layouts)."""
    if "messages" in obj:
        return _turns(obj["messages"], "messages", all_turns)
    if "chosen" in obj or "rejected" in obj:
        return _pair_segments(obj, all_turns)
    for key in PROMPT_FIELDS:
        if key in obj:
            return _text_or_turns(obj[key], key, all_turns)
    raise LayoutError(
        'no text: expected "messages", "chosen"/"rejected", "prompt", "question" or "problem"; '
        f"keys present: {_keys(obj)}",
        "missing_key",
    )


def _pair_segments(obj: dict, all_turns: bool) -> list[str]:
    chosen, rejected = obj.get("chosen"), obj.get("rejected")
    if obj.get("prompt") is not None:
        segs = _text_or_turns(obj["prompt"], "prompt", all_turns)
        if all_turns:
            for key, resp in (("chosen", chosen), ("rejected", rejected)):
                if resp is not None:
                    segs += _text_or_turns(resp, key, True)
        return segs
    if not isinstance(chosen, list):
        raise LayoutError(
            'a pair without "prompt" needs "chosen" as a message list (prompt turns then the '
            f"response), got {type(chosen).__name__}",
            "missing_prompt",
        )
    last = chosen[-1] if chosen else None
    has_response = isinstance(last, dict) and last.get("role") == "assistant"
    prompt = chosen[:-1] if has_response else chosen
    if not all_turns:
        return _turns(prompt, "chosen", False)
    segs = _turns(chosen, "chosen", True)
    if isinstance(rejected, list) and rejected:
        segs += _turns(rejected[len(prompt) :], "rejected", True)
    return segs


def eval_segments(obj: dict, field: str | None = None, all_turns: bool = False) -> list[str]:
    """The text segments of one eval record: `field`, or the first default field present."""
    for key in (field,) if field else DEFAULT_EVAL_FIELDS:
        if key in obj:
            return _text_or_turns(obj[key], key, all_turns)
    expected = f'"{field}"' if field else ", ".join(f'"{k}"' for k in DEFAULT_EVAL_FIELDS)
    raise LayoutError(
        f"no eval text: expected {expected}; keys present: {_keys(obj)}", "missing_key"
    )


# ---------------------------------------------------------------------------- the index


def build_index(eval_items: Iterable[Sequence[str]], n: int, threshold: float) -> _C.NgramIndex:
    """A frozen compiled index of eval items (each a list of segments), ids in order."""
    index = new_index(n)
    batch: list[str | bytes] = []
    for segs in eval_items:
        batch.append(prepare(segs))
        if len(batch) == 4096:
            index.add(batch)
            batch = []
    index.add(batch)
    index.build(threshold)
    return index


def scan(index: _C.NgramIndex, train_items: Sequence[Sequence[str]]) -> list[list[tuple[int, int]]]:
    """Hits [(eval id, count), ...] of each training item (list of segments), by eval id."""
    offsets, ids, counts = index.scan([prepare(s) for s in train_items])
    return [
        list(zip(ids[a:b].tolist(), counts[a:b].tolist()))
        for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())
    ]


# ---------------------------------------------------------------------------- reference


def ref_eval_grams(segments: Sequence[str], n: int) -> set[tuple[str, ...]]:
    """G(E): the word n-grams of each segment, or the whole segment when shorter than n."""
    grams: set[tuple[str, ...]] = set()
    for seg in segments:
        w = words(seg)
        if len(w) >= n:
            grams.update(tuple(w[i : i + n]) for i in range(len(w) - n + 1))
        elif w:
            grams.add(tuple(w))
    return grams


class RefIndex:
    """The plain-Python reference: n-gram tuples in sets and an inverted dict."""

    def __init__(self, eval_items: Iterable[Sequence[str]], n: int, threshold: float):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.n, self.threshold = n, threshold
        self.gram_counts: list[int] = []
        self.inverted: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for e, segs in enumerate(eval_items):
            grams = ref_eval_grams(segs, n)
            self.gram_counts.append(len(grams))
            for g in grams:
                self.inverted[g].append(e)
        self.lengths = sorted({len(g) for g in self.inverted} | {n})

    def hits(self, segments: Sequence[str]) -> list[tuple[int, int]]:
        found: set[tuple[str, ...]] = set()
        for seg in segments:
            w = words(seg)
            for k in self.lengths:
                for i in range(len(w) - k + 1):
                    g = tuple(w[i : i + k])
                    if g in self.inverted:
                        found.add(g)
        counts: dict[int, int] = defaultdict(int)
        for g in found:
            for e in self.inverted[g]:
                counts[e] += 1
        return sorted(
            (e, c) for e, c in counts.items() if c / self.gram_counts[e] >= self.threshold
        )


def ref_scan(
    eval_items: Sequence[Sequence[str]],
    train_items: Sequence[Sequence[str]],
    n: int,
    threshold: float,
) -> list[list[tuple[int, int]]]:
    """`scan` in plain Python: hits [(eval id, count), ...] of each training item."""
    ref = RefIndex(eval_items, n, threshold)
    return [ref.hits(t) for t in train_items]
