"""The resolved run config as files: plain YAML data with every path absolute, what
`--print-config` prints and `<train.out_dir>/config.yaml` holds (`nova <stage> --recipe <that
file>` reruns it). Stage-independent, so the training runner (train/) writes it without the
recipe loader (nova_engine.recipe, which names the stages through their registry)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import yaml

from nova_engine.config import RunConfig


def _plain(v: Any) -> Any:
    """A config value as plain YAML data (tuples as lists, dataclasses as mappings)."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        v = dataclasses.asdict(v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


_PATH_NAMES = ("dir", "init_from", "checkpoint_path")
_PATH_SUFFIXES = ("_path", "_paths", "_dir")
_KEYWORDS = ("auto", "force", "none")


def _is_path_key(name: str) -> bool:
    return name in _PATH_NAMES or name.endswith(_PATH_SUFFIXES)


def _abs_paths(d: dict) -> dict:
    """Path-valued keys (…_path(s), …_dir, dir, init_from) made absolute; `template` and
    `checkpoint.resume` too when they name a file or directory (not a built-in name or
    keyword)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _abs_paths(v)
        elif _is_path_key(k) and isinstance(v, str) and v:
            v = os.path.abspath(v)
        elif _is_path_key(k) and isinstance(v, list):
            v = [os.path.abspath(x) if isinstance(x, str) and x else x for x in v]
        elif k in ("template", "resume") and isinstance(v, str) and v not in _KEYWORDS:
            if os.sep in v or os.path.exists(v):
                v = os.path.abspath(v)
        out[k] = v
    return out


def resolved_config(run: RunConfig) -> dict[str, Any]:
    """The run config as plain data, with every path absolute: what `--print-config` prints
    and `<train.out_dir>/config.yaml` holds (`nova <stage> --recipe <that file>` reruns
    it)."""
    d = _abs_paths(_plain(run))
    return {run.stage: d}


def config_yaml(run: RunConfig) -> str:
    return yaml.safe_dump(resolved_config(run), sort_keys=False, default_flow_style=False)


def write_resolved_config(run: RunConfig, out_dir: str | None = None) -> str:
    """Write `config_yaml(run)` to `<out_dir>/config.yaml` (default train.out_dir),
    atomically (a temp file, then a rename). Returns the path."""
    out_dir = out_dir or run.train.out_dir
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "config.yaml")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"# the resolved {run.stage} config of this run (absolute paths)\n")
        f.write(config_yaml(run))
    os.replace(tmp, path)
    return path
