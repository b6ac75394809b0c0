"""Apply a PAS model: append its complement to each prompt of a JSONL file.

    out, counts = augment_records(read_inputs("prompts.jsonl"), pas_generator)

The prompt of a line is the last user turn of `messages`, or `prompt` (a string, or a
message list whose last user turn it is); a preference line in the Tülu layout (`chosen` and
`rejected` full conversations) carries it as the last user turn of both. The PAS model is
asked with that text as one user turn (the layout it was trained on, see
nova_engine.tools.pas.pipeline), and every place that holds the prompt becomes

    <original text, verbatim> + SEPARATOR + <complement>            SEPARATOR = "\\n\\n"

(the complement stripped of surrounding whitespace; an empty complement leaves the text as it
was). Every other field of the line is kept as it was, and `pas_complement` is added (the
complement, "" when empty, null when the prompt did not fit the PAS model's context and the
line was left unchanged). So an SFT line (messages ending with the assistant's reply), a
preference line (prompt + chosen/rejected, or Tülu full conversations) and an RLVR line
(messages ending with the user turn + ground_truth + dataset) still read with their loaders
(nova_engine.data.formats, nova_engine.data.rlvr), the prompt augmented: ready for generating
responses or rollouts.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nova_engine.tools.pas.generator import Generator
from nova_engine.tools.pas.records import PASError, check_messages, iter_objects, last_user_index

SEPARATOR = "\n\n"
FIELD = "pas_complement"


@dataclass
class _Site:
    """Where a line holds its prompt: a key, and a message index (None: a prompt string)."""

    key: str
    index: int | None


@dataclass
class AugmentInput:
    record: dict
    where: str
    prompt: str
    sites: list[_Site]


def _site_text(obj: dict, s: _Site) -> str:
    return obj[s.key] if s.index is None else obj[s.key][s.index]["content"]


def plan_line(obj: dict, where: str) -> AugmentInput:
    """The prompt of one input line and every place it sits (PASError names the line)."""
    if FIELD in obj:
        raise PASError(f'{where}: already has "{FIELD}" (augmented twice?)')
    sites: list[_Site] = []
    if "messages" in obj:
        msgs = check_messages(obj["messages"], "messages", where)
        sites.append(_Site("messages", last_user_index(msgs, "messages", where)))
    if "prompt" in obj:
        p = obj["prompt"]
        if isinstance(p, str):
            if not p.strip():
                raise PASError(f'{where}: "prompt" is empty')
            sites.append(_Site("prompt", None))
        else:
            msgs = check_messages(p, "prompt", where)
            sites.append(_Site("prompt", last_user_index(msgs, "prompt", where)))
    for key in ("chosen", "rejected"):
        v = obj.get(key)
        if isinstance(v, list) and any(isinstance(m, dict) and m.get("role") == "user" for m in v):
            msgs = check_messages(v, key, where)
            sites.append(_Site(key, last_user_index(msgs, key, where)))
    if not sites:
        raise PASError(
            f'{where}: expected a "prompt" (string or messages), a "messages" list, or '
            '"chosen"/"rejected" conversations with a user turn'
        )
    text = _site_text(obj, sites[0])
    for s in sites[1:]:
        if _site_text(obj, s) != text:
            raise PASError(
                f'{where}: the prompt in "{sites[0].key}" and in "{s.key}" differ; expected the '
                "same last user turn"
            )
    return AugmentInput(obj, where, text, sites)


def read_inputs(path: str) -> list[AugmentInput]:
    out = [plan_line(obj, where) for where, obj in iter_objects(path, "--in")]
    if not out:
        raise PASError(f"--in {path}: no lines (every line is blank)")
    return out


def augmented(inp: AugmentInput, complement: str | None, separator: str = SEPARATOR) -> dict:
    """The line with the complement appended at every prompt site (module docstring)."""
    rec = copy.deepcopy(inp.record)
    if complement is not None:
        complement = complement.strip()
        if complement:
            for s in inp.sites:
                if s.index is None:
                    rec[s.key] = rec[s.key] + separator + complement
                else:
                    msg = rec[s.key][s.index]
                    msg["content"] = msg["content"] + separator + complement
    rec[FIELD] = complement
    return rec


def augment_records(
    inputs: Sequence[AugmentInput], pas: Generator, separator: str = SEPARATOR
) -> tuple[list[dict], dict[str, Any]]:
    """(augmented records in input order, counts: read, augmented, empty, too_long)."""
    replies = pas([inp.prompt for inp in inputs])
    out = [augmented(inp, r, separator) for inp, r in zip(inputs, replies)]
    counts = {"read": len(inputs), "augmented": 0, "empty": 0, "too_long": 0}
    for r in out:
        c = r[FIELD]
        counts["too_long" if c is None else "augmented" if c else "empty"] += 1
    return out, counts
