"""The repository's layout: what a `python -m ...` / `torchrun -m ...` started from the
repository root can import, and the dependency rule of nova_kernels (torch and triton only)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_repo_root_does_not_shadow_pypi_packages():
    """transformers imports the PyPI package `kernels`; a folder of that name at the root
    (the working directory is on sys.path under `python -m`) broke every run started there."""
    code = (
        "import importlib.util\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec else '')\n"
        "from transformers import LlamaForCausalLM  # imports transformers' hub_kernels\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    origin = r.stdout.strip()
    assert not origin.startswith(os.path.join(ROOT, "kernels")), origin


def test_nova_kernels_imports_only_torch_triton_and_stdlib():
    allowed = {"torch", "triton"} | set(sys.stdlib_module_names)
    bad, seen = [], 0
    pkg = os.path.join(ROOT, "nova_kernels")
    for dirpath, _, files in os.walk(pkg):
        for f in files:
            if not f.endswith(".py"):
                continue
            path, seen = os.path.join(dirpath, f), seen + 1
            for node in ast.walk(ast.parse(open(path).read(), path)):
                if isinstance(node, ast.Import):
                    tops = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    tops = [node.module.split(".")[0]]
                else:
                    continue
                rel = os.path.relpath(path, ROOT)
                bad += [f"{rel}:{node.lineno} imports {t}" for t in tops if t not in allowed]
    assert seen > 10 and bad == [], (seen, bad)
