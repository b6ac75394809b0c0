"""JSONL readers for chat (SFT) data and preference pairs, with file:line validation.

Accepted layouts, one JSON object per line (blank lines are ignored, extra keys kept out):

SFT (the Tülu 3 SFT mix layout):
    {"id"?: str|int, "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    - at least one assistant turn, and the last turn is an assistant turn;
    - only the first message may be a system message, the first other turn is a user turn;
      every content is a non-empty string.

Preferences (the Tülu 3 preference layout): full conversations that share the prompt turns
    {"id"?, "chosen": [..., {"role": "assistant", ...}], "rejected": [..., {"role": "assistant"}],
     "margin"?: number}
    - chosen[:-1] == rejected[:-1] (the prompt), the last turn of each is the assistant
      response; a "prompt" key, when present as a string, is not needed and is ignored;
or prompt/response strings (or response-only message lists):
    {"prompt": str | [messages], "chosen": str | [assistant msgs], "rejected": ..., "margin"?}
    - the prompt must end with a user turn; the two responses must differ.
`margin` (key configurable) is the preference strength (Scaled BT: m in {1,2,3}); a finite
number > 0, default 1.

Every problem raises `DataError` ("path:line: what was wrong, what was expected") or, with
`on_bad_line="skip"`, is counted in `ReadStats` and logged (rank 0) once per file.

Parquet: a path ending in `.parquet` holds the same records, one per row (columns = the
keys above; nested lists of {role, content} structs as pyarrow writes them, e.g. from
`datasets.Dataset.to_parquet` or `pandas.DataFrame.to_parquet`); a null cell is an absent
key. Errors name "path: row N" (N from 1). Needs pyarrow (`pip install pyarrow`).

Records get a dense `index` (0, 1, 2, ... over the valid records of all files, in order);
it becomes `Sample.index`, stable across epochs and resumes for the same files.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from nova_engine.logging import get_logger, is_rank0

logger = get_logger(__name__)

ROLES = ("system", "user", "assistant")
OnBadLine = Literal["error", "skip"]
Message = dict[str, str]


class DataError(ValueError):
    """A bad data line: `str(err)` is "path:line: reason". `kind` is a short category
    (bad_json, missing_key, bad_role, empty_content, no_assistant, ...)."""

    def __init__(self, path: str, line: int, reason: str, kind: str = "invalid"):
        self.path, self.line, self.reason, self.kind = path, line, reason, kind
        super().__init__(f"{where(path, line)}: {reason}")


def is_parquet(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(".parquet")


def where(path: str, line: int) -> str:
    """ "path:line" (JSONL) or "path: row N" (Parquet, N from 1); the path alone for 0."""
    if line <= 0:
        return path
    return f"{path}: row {line}" if is_parquet(path) else f"{path}:{line}"


class EmptyDataError(DataError):
    """No usable sample in a data set: every file empty, every line skipped, or every sample
    dropped by the length policy; the message names the files and the counts."""

    def __init__(self, paths: Any, read_stats: Any = None, dropped: str | None = None):
        files = [os.fspath(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])]
        where = ", ".join(files)
        if read_stats is None or read_stats.n_lines == 0:
            why = "no data lines (empty file)"
        elif read_stats.n_ok == 0:
            kinds = ", ".join(f"{k}={v}" for k, v in read_stats.skipped.most_common())
            first = read_stats.examples[0] if read_stats.examples else ""
            why = f"all {read_stats.n_lines} lines skipped ({kinds}); first: {first}"
        else:
            why = f"every sample dropped by the length policy ({dropped}): raise data.max_length"
        self.path, self.line, self.kind = where, 0, "empty"
        self.reason = f"no usable samples: {why}"
        ValueError.__init__(self, f"{where}: {self.reason}")


class _Bad(Exception):
    """Internal: a validation failure without the location (added by the reader)."""

    def __init__(self, reason: str, kind: str):
        super().__init__(reason)
        self.reason, self.kind = reason, kind


@dataclass
class ChatRecord:
    """One SFT conversation."""

    messages: list[Message]
    index: int
    source: str  # "path:line"
    id: str | None = None


@dataclass
class PairRecord:
    """One preference pair: the shared prompt turns and the two responses (each a list of
    turns ending with an assistant turn; usually a single assistant message)."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    index: int
    source: str
    id: str | None = None
    margin: float = 1.0

    def chosen_messages(self) -> list[Message]:
        return self.prompt + self.chosen

    def rejected_messages(self) -> list[Message]:
        return self.prompt + self.rejected


@dataclass
class ReadStats:
    """Counts from one read: lines seen (non-blank), records kept, lines skipped by kind,
    and the first few skip messages."""

    n_lines: int = 0
    n_ok: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def add_skip(self, err: DataError) -> None:
        self.skipped[err.kind] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(err))

    def merge(self, other: ReadStats) -> None:
        self.n_lines += other.n_lines
        self.n_ok += other.n_ok
        self.skipped.update(other.skipped)
        room = self.max_examples - len(self.examples)
        self.examples += other.examples[: max(room, 0)]


# ---------------------------------------------------------------------------- validation


def _check_messages(
    msgs: Any, key: str, *, need_assistant_last: bool, user_first: bool = True
) -> list[Message]:
    if not isinstance(msgs, list):
        raise _Bad(f'"{key}" must be a list of messages, got {type(msgs).__name__}', "bad_type")
    if not msgs:
        raise _Bad(f'"{key}" is empty: expected at least one message', "empty_messages")
    out = []
    for i, m in enumerate(msgs):
        where = f'"{key}"[{i}]'
        if not isinstance(m, dict):
            raise _Bad(f"{where} must be an object, got {type(m).__name__}", "bad_type")
        for k in ("role", "content"):
            if k not in m:
                raise _Bad(
                    f'{where} has no "{k}" key (expected "role" and "content")', "missing_key"
                )
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise _Bad(f"{where} has role {role!r}: expected one of {', '.join(ROLES)}", "bad_role")
        if not isinstance(content, str):
            raise _Bad(
                f"{where} content must be a string, got {type(content).__name__}", "bad_type"
            )
        if not content.strip():
            raise _Bad(f"{where} ({role}) has empty content", "empty_content")
        if role == "system" and i > 0:
            raise _Bad(
                f"{where} is a system message: only the first message may be one",
                "system_not_first",
            )
        out.append({"role": role, "content": content})
    first = next((m for m in out if m["role"] != "system"), None)
    if user_first and first is not None and first["role"] == "assistant":
        raise _Bad(f'"{key}" starts with an assistant turn: expected a user turn first', "bad_role")
    if need_assistant_last:
        if not any(m["role"] == "assistant" for m in out):
            raise _Bad(f'"{key}" has no assistant turn: nothing to train on', "no_assistant")
        if out[-1]["role"] != "assistant":
            raise _Bad(
                f'"{key}" ends with a {out[-1]["role"]} turn: the last turn must be the '
                "assistant's",
                "last_not_assistant",
            )
    return out


def _require(obj: dict, key: str, expected: str) -> Any:
    if key not in obj:
        keys = ", ".join(sorted(obj)) or "none"
        raise _Bad(f'missing key "{key}" ({expected}); keys present: {keys}', "missing_key")
    return obj[key]


def _get_id(obj: dict) -> str | None:
    return None if obj.get("id") is None else str(obj["id"])


def parse_sft(obj: dict) -> tuple[list[Message], str | None]:
    msgs = _require(obj, "messages", "a list of {role, content} messages")
    return _check_messages(msgs, "messages", need_assistant_last=True), _get_id(obj)


def _prompt_turns(prompt: Any) -> list[Message]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise _Bad('"prompt" is empty', "empty_content")
        return [{"role": "user", "content": prompt}]
    turns = _check_messages(prompt, "prompt", need_assistant_last=False)
    if turns[-1]["role"] != "user":
        raise _Bad(
            f'"prompt" ends with a {turns[-1]["role"]} turn: expected a user turn', "bad_role"
        )
    return turns


def _response_turns(resp: Any, key: str) -> list[Message]:
    if isinstance(resp, str):
        if not resp.strip():
            raise _Bad(f'"{key}" is empty', "empty_content")
        return [{"role": "assistant", "content": resp}]
    turns = _check_messages(resp, key, need_assistant_last=True, user_first=False)
    if any(m["role"] != "assistant" for m in turns):
        raise _Bad(f'"{key}" has non-assistant turns but no shared prompt', "bad_role")
    return turns


def parse_pair(obj: dict, margin_key: str = "margin") -> tuple[list, list, list, str | None, float]:
    """-> (prompt turns, chosen response turns, rejected response turns, id, margin)."""
    chosen = _require(obj, "chosen", "a message list or a response string")
    rejected = _require(obj, "rejected", "a message list or a response string")
    full = (
        isinstance(chosen, list)
        and isinstance(rejected, list)
        and any(isinstance(m, dict) and m.get("role") != "assistant" for m in chosen + rejected)
    )
    if full:  # Tülu 3: whole conversations sharing all but the last turn
        c = _check_messages(chosen, "chosen", need_assistant_last=True)
        r = _check_messages(rejected, "rejected", need_assistant_last=True)
        if len(c) != len(r):
            raise _Bad(
                f'"chosen" has {len(c)} turns and "rejected" {len(r)}: expected the same '
                "prompt turns followed by one response each",
                "prompt_mismatch",
            )
        for i, (mc, mr) in enumerate(zip(c[:-1], r[:-1])):
            if mc != mr:
                raise _Bad(
                    f"chosen and rejected prompts differ at message {i} ({mc['role']}): "
                    "expected identical prompt turns",
                    "prompt_mismatch",
                )
        if len(c) < 2:
            raise _Bad('"chosen" has no prompt turns before the response', "missing_prompt")
        prompt, c_resp, r_resp = c[:-1], c[-1:], r[-1:]
        if prompt[-1]["role"] != "user":
            raise _Bad(
                f"the prompt ends with a {prompt[-1]['role']} turn: expected a user turn",
                "bad_role",
            )
    else:
        prompt = _prompt_turns(_require(obj, "prompt", "a string or a message list"))
        c_resp = _response_turns(chosen, "chosen")
        r_resp = _response_turns(rejected, "rejected")
    if c_resp == r_resp:
        raise _Bad("chosen and rejected responses are identical", "identical_responses")
    margin = obj.get(margin_key, 1.0)
    if margin is None:
        margin = 1.0
    if (
        isinstance(margin, bool)
        or not isinstance(margin, (int, float))
        or not math.isfinite(margin)
    ):
        raise _Bad(f'"{margin_key}" must be a finite number > 0, got {margin!r}', "bad_margin")
    if margin <= 0:
        raise _Bad(f'"{margin_key}" must be a finite number > 0, got {margin!r}', "bad_margin")
    return prompt, c_resp, r_resp, _get_id(obj), float(margin)


# ---------------------------------------------------------------------------- readers


def _drop_nulls(v: Any) -> Any:
    """A Parquet row as JSON would have it: null struct fields / cells are absent keys."""
    if isinstance(v, dict):
        return {k: _drop_nulls(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_drop_nulls(x) for x in v]
    return v


def _iter_parquet(path: str) -> Iterable[tuple[int, Any]]:
    """(row number from 1, the row as a dict) for every row of a Parquet file."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            path, 0, "reading Parquet needs pyarrow (pip install pyarrow)", "no_pyarrow"
        ) from None
    try:
        f = pq.ParquetFile(path)
        batches = f.iter_batches(batch_size=4096)
        row = 0
        for batch in batches:
            for obj in batch.to_pylist():
                row += 1
                yield row, _drop_nulls(obj)
    except (OSError, ValueError) as e:  # pyarrow.ArrowException subclasses both
        if isinstance(e, DataError):
            raise
        raise DataError(path, 0, f"not a readable Parquet file ({e})", "bad_parquet") from None


def _iter_objects(path: str) -> Iterable[tuple[int, Any]]:
    """(line number, parsed object or _Bad) for every non-blank line (every row of a
    .parquet file)."""
    if is_parquet(path):
        yield from _iter_parquet(path)
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM is fine
            except UnicodeDecodeError as e:
                yield lineno, _Bad(f"not valid UTF-8 ({e.reason} at byte {e.start})", "bad_utf8")
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield lineno, _Bad(f"bad JSON: {e.msg} at column {e.colno}", "bad_json")
                continue
            if not isinstance(obj, dict):
                yield (
                    lineno,
                    _Bad(
                        f"expected a JSON object per line, got {type(obj).__name__}", "not_object"
                    ),
                )
                continue
            yield lineno, obj


def _log_skips(path: str, stats: ReadStats) -> None:
    if stats.n_skipped and is_rank0():
        kinds = ", ".join(f"{k}={v}" for k, v in stats.skipped.most_common())
        logger.warning(
            "%s: skipped %d of %d lines (%s); first: %s",
            path,
            stats.n_skipped,
            stats.n_lines,
            kinds,
            " | ".join(stats.examples),
        )


def read_jsonl(
    path: str | os.PathLike,
    parse: Callable[[dict, int, str], Any],
    *,
    on_bad_line: OnBadLine = "error",
    start_index: int = 0,
    stats: ReadStats | None = None,
) -> tuple[list, ReadStats]:
    """The one line loop of every data layout's reader: `parse(obj, index, source)` turns a
    line's JSON object into a record (index = start_index + records so far, source =
    "path:line"), raises _Bad for a bad line — DataError naming file:line, or skipped and
    counted with on_bad_line="skip" — or returns None for a line dropped on purpose (the
    parser counts it). `stats` (a ReadStats subclass) collects the counts."""
    if on_bad_line not in ("error", "skip"):
        raise ValueError(f'on_bad_line={on_bad_line!r}: expected "error" or "skip"')
    path = os.fspath(path)
    stats = ReadStats() if stats is None else stats
    records: list = []
    for lineno, obj in _iter_objects(path):
        stats.n_lines += 1
        try:
            if isinstance(obj, _Bad):
                raise obj
            rec = parse(obj, start_index + len(records), where(path, lineno))
        except _Bad as bad:
            err = DataError(path, lineno, bad.reason, bad.kind)
            if on_bad_line == "error":
                raise err from None
            stats.add_skip(err)
            continue
        if rec is not None:
            records.append(rec)
    stats.n_ok = len(records)
    _log_skips(path, stats)
    return records, stats


def _read(path, kind, on_bad_line, start_index, margin_key):
    def parse(obj: dict, index: int, source: str) -> ChatRecord | PairRecord:
        if kind == "sft":
            msgs, rid = parse_sft(obj)
            return ChatRecord(msgs, index, source, rid)
        prompt, c, r, rid, margin = parse_pair(obj, margin_key)
        return PairRecord(prompt, c, r, index, source, rid, margin)

    return read_jsonl(path, parse, on_bad_line=on_bad_line, start_index=start_index)


def read_sft_jsonl(
    path: str | os.PathLike, *, on_bad_line: OnBadLine = "error", start_index: int = 0
) -> tuple[list[ChatRecord], ReadStats]:
    """Read one SFT JSONL file. Raises DataError on the first bad line unless
    on_bad_line="skip"."""
    return _read(path, "sft", on_bad_line, start_index, "margin")


def read_pref_jsonl(
    path: str | os.PathLike,
    *,
    on_bad_line: OnBadLine = "error",
    start_index: int = 0,
    margin_key: str = "margin",
) -> tuple[list[PairRecord], ReadStats]:
    """Read one preference JSONL file (either pair layout, mixed freely)."""
    return _read(path, "pref", on_bad_line, start_index, margin_key)


def read_records(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    kind: Literal["sft", "pref"],
    *,
    on_bad_line: OnBadLine = "error",
    margin_key: str = "margin",
) -> tuple[list, ReadStats]:
    """Read several files of one kind, indices dense across files in the given order."""
    if kind not in ("sft", "pref"):
        raise ValueError(f'kind={kind!r}: expected "sft" or "pref"')
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    records: list = []
    total = ReadStats()
    for p in paths:
        recs, stats = _read(p, kind, on_bad_line, len(records), margin_key)
        records += recs
        total.merge(stats)
    return records, total
