"""YAML recipes and `key=value` overrides -> the run config dataclasses of nova_engine.config.

    run = load_recipe("recipes/llama3_8b.yaml", "sft", ["optim.lr=1e-5", "parallel.tp=2"])

The shared sections of the recipe are deep-merged with the stage's section, the overrides
(dotted keys relative to the stage's RunConfig, values parsed as YAML) applied on top, and
every value typed by its dataclass field. Unknown keys raise `ConfigError` naming the key and
the valid keys; bad values name the key and what was expected.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal

import yaml

from nova_engine.config import ConfigError, RunConfig
from nova_engine.config_files import (  # noqa: F401  (the recipe API, one import away)
    _plain,
    config_yaml,
    resolved_config,
    write_resolved_config,
)
from nova_engine.train.stages import STAGES


def run_config_class(stage: str) -> type[RunConfig]:
    """The RunConfig subclass of `stage`, from the stage registry (nova_engine.train.stages;
    each stage's config lives next to its stage). ConfigError for an unknown stage."""
    if stage not in STAGES:
        raise ConfigError("stage", f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    return STAGES[stage].config_class


def stage_names() -> tuple[str, ...]:
    return tuple(STAGES)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin in (list, tuple):
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


class _Raw:
    """An override's text next to its YAML parse (a number, bool or null), so that a str
    field gets the text verbatim (`model.hf_path=1234`, `data.margin_key=on`)."""

    def __init__(self, raw: str, parsed: Any):
        self.raw, self.parsed = raw, parsed

    def __repr__(self) -> str:
        return repr(self.parsed)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` (from YAML or an override) as type `tp`, or ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        plain = value.parsed if isinstance(value, _Raw) else value
        if plain is None or (isinstance(plain, str) and plain.lower() in ("null", "none")):
            if type(None) in args:
                return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:  # Optional[X]: X's own error is the precise one
            return _coerce(value, arms[0], key)
        for a in arms:
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise bad
    if isinstance(value, _Raw):
        value = value.raw if tp is str else value.parsed
    if origin is Literal:
        if value in args:
            return value
        raise bad
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise bad
    if tp in (int, float):
        # numbers, or strings of numbers: PyYAML reads "5e-6" (no dot) as a string
        num = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if isinstance(value, str):
            try:
                num = float(value)
            except ValueError:
                pass
        if num is None or (tp is int and not float(num).is_integer()):
            raise bad
        if not math.isfinite(num):  # the one rule: no NaN/Inf hyperparameter anywhere
            raise ConfigError(key, f"expected a finite number, got {value!r}")
        return tp(num)
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    raise ConfigError(key, f"unsupported field type {tp}")  # pragma: no cover


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _build(cls: type, values: dict, prefix: str) -> Any:
    fields = _fields(cls)
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            raise ConfigError(key, f"unknown key; valid keys here: {', '.join(fields)}")
        kwargs[k] = _coerce(v, fields[k], key)
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.init and required and f.name not in kwargs:
            key = f"{prefix}.{f.name}" if prefix else f.name
            raise ConfigError(key, "missing required key")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if e.key.startswith(prefix + ".") or not prefix:
            raise
        raise ConfigError(f"{prefix}.{e.key}", e.msg) from None


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_overrides(values: dict, overrides: Sequence[str]) -> dict:
    """Set dotted keys in a nested dict: "optim.lr=1e-5", "data.train_paths=[a.jsonl,b.jsonl]".
    Values are parsed as YAML scalars/lists (typing happens when the config is built)."""
    out = copy.deepcopy(values)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(item, 'expected an override of the form "a.b.c=value"')
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (int, float, bool)) or value is None:
            value = _Raw(raw, value)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            if node.get(p) is None:  # absent or null (e.g. `build: null`): a new section
                node[p] = {}
            nxt = node[p]
            if not isinstance(nxt, dict):
                raise ConfigError(key, f'"{p}" is a value, not a section')
            node = nxt
        node[parts[-1]] = value
    return out


def build_run_config(stage: str, values: dict, source: str | None = None) -> RunConfig:
    """A stage's RunConfig from a nested dict (already merged)."""
    cls = run_config_class(stage)
    try:
        return _build(cls, values, "")
    except ConfigError as e:
        raise ConfigError(e.key, e.msg, source) from None


def load_recipe(path: str | os.PathLike, stage: str, overrides: Sequence[str] = ()) -> RunConfig:
    """Load `stage` (a name of the stage registry: "sft", "dpo", ...) from a recipe YAML,
    then apply `key=value` overrides."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError("<yaml>", f"not valid YAML: {e}", path) from None
    except (OSError, UnicodeDecodeError) as e:
        why = "no such file" if isinstance(e, FileNotFoundError) else f"unreadable ({e})"
        raise ConfigError("--recipe", f"{path}: {why} (expected a recipe YAML)") from None
    if not isinstance(doc, dict):
        raise ConfigError("<top>", "expected a mapping of sections", path)
    stages = {name: run_config_class(name) for name in stage_names()}
    if stage not in stages:
        run_config_class(stage)  # ConfigError naming the stages
    sections = set().union(*(_fields(c) for c in stages.values()))
    shared, per_stage = {}, {}
    for k, v in doc.items():
        if k in stages:
            per_stage[k] = v or {}
        elif k in sections:
            shared[k] = v
        else:
            valid = ", ".join(sorted(sections)) + "; stages: " + ", ".join(stages)
            raise ConfigError(str(k), f"unknown top-level key; valid keys: {valid}", path)
    if stage not in per_stage:
        raise ConfigError(stage, f"the recipe has no {stage!r} section", path)
    if not isinstance(per_stage[stage], dict):
        raise ConfigError(stage, "expected a mapping of sections", path)
    stage_fields = _fields(stages[stage])
    merged = _deep_merge({k: v for k, v in shared.items() if k in stage_fields}, per_stage[stage])
    try:
        merged = apply_overrides(merged, overrides)
    except ConfigError as e:
        raise ConfigError(e.key, e.msg, "override") from None
    src = f"{path} [{stage}]" + (" + overrides" if overrides else "")
    return build_run_config(stage, merged, src)


def config_from_dict(d: dict) -> RunConfig:
    """Inverse of RunConfig.to_dict (e.g. the config saved in a checkpoint)."""
    d = dict(d)
    return build_run_config(d.pop("stage"), d)


# ---------------------------------------------------------------------------- discoverability


def field_docs(cls: type) -> dict[str, str]:
    """{field name: the docstring written under it} of a dataclass, over its bases (a
    subclass's docstring wins). Read from the source with `ast`; {} when there is none."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def _section_class(tp: Any) -> type | None:
    """The dataclass behind a field type (X or X | None), else None."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(arms) == 1 and isinstance(arms[0], type) and dataclasses.is_dataclass(arms[0]):
            return arms[0]
    return None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def config_keys(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Every leaf key of a config dataclass, depth first: (dotted key, type, default as
    YAML, the field's docstring). A section that defaults to null (e.g. `model.build`) lists
    its keys too, with the defaults they take once the section is set."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out: list[tuple[str, str, str, str]] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp = f"{prefix}{f.name}", hints[f.name]
        section = _section_class(tp)
        default = _default(f)
        if section is not None:
            if default is None:
                out.append((key, section.__name__ + " or null", "null", docs.get(f.name, "")))
            out += config_keys(section, key + ".")
            continue
        if default is dataclasses.MISSING:
            shown = "(required)"
        else:
            shown = yaml.safe_dump(_plain(default), default_flow_style=True, width=1 << 16)
            shown = shown.strip().removesuffix("...").strip()
        out.append((key, _type_name(tp), shown, docs.get(f.name, "")))
    return out


def stage_help(stage: str, width: int = 100) -> str:
    """The text `nova <stage> --help` ends with: every config key of the stage (as
    `key=value` overrides or recipe keys) with its type, default and docstring."""
    import textwrap

    lines = [
        f"config keys of the {stage} stage (recipe sections, or key=value overrides; "
        "defaults shown):"
    ]
    for key, tp, default, doc in config_keys(run_config_class(stage)):
        lines.append(f"  {key} = {default}    [{tp}]")
        if doc:
            lines += textwrap.wrap(doc, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)
