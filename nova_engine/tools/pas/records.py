"""Reading and writing the JSONL files of `nova pas`: the prompt pool, the few-shot seeds,
the SFT output; every bad line is a `PASError` naming path:line and what was expected.

Pool lines (`nova pas build-data --prompts`): a JSON object with `prompt` (a non-empty
string) or `messages` (a chat; its LAST USER TURN is the prompt); an optional `id` is
carried to the output. Seed lines (`--seeds`, default nova_engine/tools/pas/seeds.jsonl):
`{"category": str, "prompt": str, "complement": str}`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

DEFAULT_SEEDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds.jsonl")
OTHER = "other"
"""The category of a prompt no known category fits (always part of the category list)."""

_CATEGORY_RE = re.compile(r"^[a-z][a-z0-9_-]*$")


class PASError(ValueError):
    """A problem with the inputs of `nova pas` (the CLI prints it on one line, exit 2)."""


@dataclass
class PoolPrompt:
    """One prompt of the pool: its text, where it came from, its id (if any)."""

    text: str
    where: str  # path:line
    id: Any = None


@dataclass
class Seed:
    """A hand-written (prompt, complement) example of one category."""

    category: str
    prompt: str
    complement: str
    where: str


def iter_objects(path: str, option: str) -> Iterator[tuple[str, dict]]:
    """(path:line, object) for every non-blank line; PASError for unreadable files, bad
    UTF-8, bad JSON and non-objects."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise PASError(f"{option} {path}: {e.strerror}") from None
    with f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise PASError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PASError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise PASError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def check_messages(msgs: Any, key: str, where: str) -> list[dict]:
    """A list of {role: str, content: str} objects (PASError otherwise)."""
    if not isinstance(msgs, list) or not msgs:
        raise PASError(f'{where}: "{key}" must be a non-empty list of messages')
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):  # fmt: skip
            raise PASError(f'{where}: "{key}"[{i}] needs string "role" and "content"')
    return msgs


def last_user_index(msgs: list[dict], key: str, where: str) -> int:
    """Index of the last user turn (PASError when there is none or it is empty)."""
    for i in range(len(msgs) - 1, -1, -1):
        if msgs[i]["role"] == "user":
            if not msgs[i]["content"].strip():
                raise PASError(f'{where}: "{key}"[{i}]: the last user turn is empty')
            return i
    raise PASError(f'{where}: "{key}" has no user turn (the prompt to augment)')


def pool_prompt(obj: dict, where: str) -> PoolPrompt:
    """The prompt of one pool line (see the module docstring)."""
    if "prompt" in obj and isinstance(obj["prompt"], str):
        if not obj["prompt"].strip():
            raise PASError(f'{where}: "prompt" is empty')
        return PoolPrompt(obj["prompt"], where, obj.get("id"))
    key = "messages" if "messages" in obj else "prompt" if "prompt" in obj else None
    if key is None:
        raise PASError(f'{where}: expected a "prompt" string or a "messages" list')
    msgs = check_messages(obj[key], key, where)
    return PoolPrompt(msgs[last_user_index(msgs, key, where)]["content"], where, obj.get("id"))


def read_pool(path: str) -> list[PoolPrompt]:
    out = [pool_prompt(obj, where) for where, obj in iter_objects(path, "--prompts")]
    if not out:
        raise PASError(f"--prompts {path}: no prompts (every line is blank)")
    return out


def check_category(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _CATEGORY_RE.match(name):
        raise PASError(
            f"{where}: category {name!r}: expected a lowercase name (letters, digits, _ or -, "
            "starting with a letter)"
        )
    return name


def read_seeds(path: str = DEFAULT_SEEDS) -> list[Seed]:
    seeds = []
    for where, obj in iter_objects(path, "--seeds"):
        cat = check_category(obj.get("category"), where)
        texts = []
        for key in ("prompt", "complement"):
            v = obj.get(key)
            if not isinstance(v, str) or not v.strip():
                raise PASError(f'{where}: "{key}" must be a non-empty string')
            texts.append(v.strip())
        seeds.append(Seed(cat, texts[0], texts[1], where))
    if not seeds:
        raise PASError(f"--seeds {path}: no seeds (every line is blank)")
    return seeds


def parse_categories(spec: Iterable[str] | None, seeds: list[Seed]) -> tuple[str, ...]:
    """The category list: `spec` (names, each possibly comma-separated) or the seeds'
    categories in order of first appearance; "other" is always last."""
    if spec:
        names = [n.strip() for item in spec for n in item.split(",") if n.strip()]
        if not names:
            raise PASError("--categories: no category names given")
        names = [check_category(n, "--categories") for n in names]
    else:
        names = [s.category for s in seeds]
    out = [n for n in dict.fromkeys(names) if n != OTHER]
    return (*out, OTHER)


def write_jsonl(path: str, records: Iterable[dict]) -> int:
    """Write records atomically (a .tmp file renamed into place); returns the count."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n
