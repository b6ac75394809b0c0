"""RLVR prompts: the Tülu 3 RLVR layout, read with file:line validation, and tokenized.

One JSON object per line (blank lines ignored; other keys, e.g. Tülu's "constraint_type",
are kept out):
    {"id"?: str|int,
     "messages": [{"role": "system"|"user"|"assistant", "content": str}, ..., {"role": "user"}],
     "ground_truth": str | [str, ...] | {...} | [{...}, ...],
     "dataset": str}
- `messages` follows the SFT rules (nova_engine.data.formats) except that it ENDS WITH A USER
  TURN: the policy writes the next assistant turn;
- `dataset` names the verifier (nova_engine.rl.verifiers: gsm8k, MATH / math, ifeval,
  arithmetic, or any registered one; case-insensitive); an unknown name is an error that lists
  the known ones;
- `ground_truth` is what that verifier checks against (GSM8K: the number; MATH: the LaTeX
  answer; IFEval: the JSON constraint string).
An OPEN-ENDED prompt has no "ground_truth" (and needs no "dataset": it names the data source
in the metrics, default "open"): it is scored by a reward model alone, so the readers accept it
only with allow_open=True (the rlvr stage passes it when `reward_model.path` is set); without,
the line is bad ("no ground_truth ... set reward_model.path"). Its ground_truth is None.
The readers here check the layout; the verifier's own check (`dataset` names a registered
verifier, `ground_truth` passes its check) comes in as `check`: nova_engine.rl.prompts passes
it (the stages read through it), so e.g. a GSM8K ground truth that is not a number, or an
IFEval constraint naming an unknown check, fails at read time with file:line rather than as
reward 0 for the whole run. data/ sits below rl/ and never imports the verifiers.
Bad lines raise `DataError` ("path:line: reason") or, with on_bad_line="skip", are counted in
`ReadStats` and logged once per file (as for SFT and preference data).

Tokenized prompts (`RLVRPrompt`) hold the chat template's rendering of the messages with the
generation prompt (the assistant header), ready for generation. A prompt longer than
`max_prompt_length` is dropped and counted (truncating a question changes it).

`write_arithmetic_rlvr` writes the synthetic arithmetic task (nova_engine.data.synthetic) in
this layout with `dataset: "arithmetic"`, its problems disjoint from the task's eval split.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nova_engine.data.formats import (
    Message,
    OnBadLine,
    ReadStats,
    _Bad,
    _check_messages,
    _get_id,
    _require,
    read_jsonl,
)
from nova_engine.logging import get_logger

logger = get_logger(__name__)

OPEN_DATASET = "open"
"""The data source name of an open-ended prompt that names none."""


@dataclass
class RLVRRecord:
    """One RLVR prompt with what its verifier needs."""

    messages: list[Message]
    ground_truth: Any
    dataset: str
    index: int
    source: str  # "path:line"
    id: str | None = None


@dataclass
class RLVRPrompt:
    """A tokenized RLVR prompt: the rendered conversation + the assistant header."""

    tokens: np.ndarray  # [L] int64
    ground_truth: Any
    dataset: str
    index: int
    source: str
    messages: list[Message] | None = None  # the conversation (a reward model re-renders it)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class RLVRTokenizeStats:
    n_in: int = 0
    n_out: int = 0
    dropped_too_long: int = 0


def _check_ground_truth_shape(gt: Any) -> None:
    items = gt if isinstance(gt, list) else [gt]
    if not items:
        raise _Bad('"ground_truth" is an empty list', "bad_ground_truth")
    for g in items:
        if isinstance(g, bool) or not isinstance(g, (str, int, float, dict)):
            raise _Bad(
                f'"ground_truth" holds {type(g).__name__}: expected a string, a number, an '
                "object or a list of those",
                "bad_ground_truth",
            )
        if isinstance(g, str) and not g.strip():
            raise _Bad('"ground_truth" is empty', "bad_ground_truth")


DatasetCheck = Callable[[str, Any], None]
"""check(dataset, ground_truth): raises `_Bad` (kind "unknown_dataset" / "bad_ground_truth")
when no verifier of that name exists or it rejects the ground truth (nova_engine.rl.prompts)."""


def parse_rlvr(
    obj: dict, check: DatasetCheck | None = None, allow_open: bool = False
) -> tuple[list[Message], Any, str, str | None]:
    """-> (messages, ground_truth, dataset, id); raises _Bad (see the module docstring).
    allow_open: a line without "ground_truth" is an open-ended prompt (ground_truth None)."""
    msgs = _check_messages(
        _require(obj, "messages", "a list of {role, content} messages ending with a user turn"),
        "messages",
        need_assistant_last=False,
    )
    if msgs[-1]["role"] != "user":
        raise _Bad(
            f'"messages" ends with a {msgs[-1]["role"]} turn: expected a user turn (the policy '
            "writes the reply)",
            "last_not_user",
        )
    if obj.get("ground_truth") is None:
        if not allow_open:
            raise _Bad(
                'missing key "ground_truth" (the answer or constraint the verifier checks; '
                "an open-ended prompt without one needs a reward model: set "
                "reward_model.path)",
                "missing_key",
            )
        dataset = obj.get("dataset", OPEN_DATASET)
        if not isinstance(dataset, str) or not dataset.strip():
            raise _Bad(f'"dataset" must be a non-empty string, got {dataset!r}', "bad_dataset")
        return msgs, None, dataset, _get_id(obj)
    gt = obj["ground_truth"]
    _check_ground_truth_shape(gt)
    dataset = _require(obj, "dataset", "the data source naming the verifier")
    if not isinstance(dataset, str) or not dataset.strip():
        raise _Bad(f'"dataset" must be a non-empty string, got {dataset!r}', "bad_dataset")
    if check is not None:
        check(dataset, gt)
    return msgs, gt, dataset, _get_id(obj)


def read_rlvr_jsonl(
    path: str | os.PathLike,
    *,
    on_bad_line: OnBadLine = "error",
    start_index: int = 0,
    check: DatasetCheck | None = None,
    allow_open: bool = False,
) -> tuple[list[RLVRRecord], ReadStats]:
    """Read one RLVR JSONL file; DataError on the first bad line unless on_bad_line="skip"."""

    def parse(obj: dict, index: int, source: str) -> RLVRRecord:
        msgs, gt, dataset, rid = parse_rlvr(obj, check, allow_open)
        return RLVRRecord(msgs, gt, dataset, index, source, rid)

    return read_jsonl(path, parse, on_bad_line=on_bad_line, start_index=start_index)


def read_rlvr(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    on_bad_line: OnBadLine = "error",
    check: DatasetCheck | None = None,
    allow_open: bool = False,
) -> tuple[list[RLVRRecord], ReadStats]:
    """Read several RLVR files, indices dense across files in the given order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    records: list[RLVRRecord] = []
    total = ReadStats()
    for p in paths:
        recs, stats = read_rlvr_jsonl(
            p, on_bad_line=on_bad_line, start_index=len(records), check=check,
            allow_open=allow_open,
        )  # fmt: skip
        records += recs
        total.merge(stats)
    return records, total


def tokenize_rlvr(
    records: Sequence[RLVRRecord], tokenizer: Any, *, max_prompt_length: int | None = None
) -> tuple[list[RLVRPrompt], RLVRTokenizeStats]:
    """Render each record's messages with the chat template and the generation prompt.
    `tokenizer`: a HF tokenizer with a chat template, a local directory, or a ChatTokenizer."""
    from nova_engine.data.tokenize import ChatTokenizer

    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length={max_prompt_length}: expected >= 1 or None")
    ct = tokenizer if isinstance(tokenizer, ChatTokenizer) else ChatTokenizer(tokenizer)
    stats = RLVRTokenizeStats()
    out = []
    for rec in records:
        stats.n_in += 1
        ids = ct.prompt_ids(rec.messages)
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            stats.dropped_too_long += 1
            continue
        tokens = np.asarray(ids, dtype=np.int64)
        out.append(RLVRPrompt(tokens, rec.ground_truth, rec.dataset, rec.index, rec.source,
                              rec.messages))  # fmt: skip
    stats.n_out = len(out)
    if stats.dropped_too_long:
        logger.info(
            "tokenize rlvr: %d/%d prompts kept, %d dropped (longer than %s tokens)",
            stats.n_out,
            stats.n_in,
            stats.dropped_too_long,
            max_prompt_length,
        )
    return out, stats


def load_rlvr_prompts(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: Any,
    *,
    max_prompt_length: int | None = None,
    on_bad_line: OnBadLine = "error",
    check: DatasetCheck | None = None,
    allow_open: bool = False,
) -> tuple[list[RLVRPrompt], ReadStats, RLVRTokenizeStats]:
    """Read + validate + tokenize: (prompts, ReadStats, RLVRTokenizeStats)."""
    records, read_stats = read_rlvr(paths, on_bad_line=on_bad_line, check=check,
                                    allow_open=allow_open)  # fmt: skip
    prompts, tok_stats = tokenize_rlvr(records, tokenizer, max_prompt_length=max_prompt_length)
    return prompts, read_stats, tok_stats


def write_arithmetic_rlvr(
    path: str | os.PathLike,
    n: int,
    *,
    seed: int = 0,
    skip: int = 0,
    n_eval: int = 200,
    max_value: int = 99,
    ops: tuple[str, ...] = ("plus", "minus"),
    system: str | None = None,
    in_words: bool = True,
    step: int = 1,
) -> str:
    """Write `n` arithmetic prompts in the RLVR layout (dataset "arithmetic"), none of them in
    the eval split that `synthetic.write_task` makes with the same seed, n_eval, max_value and
    ops. The problems continue the task's training stream after its first `skip` problems:
    skip = n_sft + n_pref gives problems after the SFT and preference splits' (a problem may
    still recur by chance, as within those splits). Returns the path. Same arguments -> same
    bytes."""
    from nova_engine.data.synthetic import make_splits

    if n < 0 or skip < 0:
        raise ValueError(f"n={n} and skip={skip} must be >= 0")
    drawn, _, _ = make_splits(skip + n, 0, n_eval, seed=seed, max_value=max_value, ops=ops,
                              in_words=in_words, step=step)  # fmt: skip
    problems = drawn[skip:]
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        for i, p in enumerate(problems):
            msgs = [] if system is None else [{"role": "system", "content": system}]
            msgs.append({"role": "user", "content": p.question()})
            row = {"id": f"rlvr-{i}", "messages": msgs, "ground_truth": str(p.answer)}
            f.write(json.dumps(row | {"dataset": "arithmetic"}) + "\n")
    return path
