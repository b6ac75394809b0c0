"""The repository's layout: what a `python -m ...` / `torchrun -m ...` started from the
repository root can import, and the dependency rule of nova_kernels (torch and triton only)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# where each package's source lives: the kernels in the plain folder kernels/ (DESIGN.md)
PACKAGE_DIRS = {
    "nova_engine": "nova_engine",
    "nova_kernels": os.path.join("kernels", "nova_kernels"),
}


def test_repo_root_does_not_shadow_pypi_packages():
    """From the repository root (on sys.path under `python -m` / `torchrun -m`) `kernels` is the
    PyPI package transformers imports, not our folder kernels/ (it has no __init__.py: an
    installed regular package wins over a namespace portion), and `nova_kernels` is ours."""
    assert not os.path.exists(os.path.join(ROOT, "kernels", "__init__.py"))
    assert not os.path.exists(os.path.join(ROOT, "nova_kernels")), "one home for the kernels"
    code = (
        "import importlib.util, sys\n"
        "sys.path.insert(0, '')  # what python -m does\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec else '')\n"
        "import nova_kernels\n"
        "print(nova_kernels.__file__)\n"
        "from transformers import LlamaForCausalLM  # imports transformers' hub_kernels\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    kernels_origin, ours = r.stdout.split()[-2:]
    assert "site-packages" in kernels_origin, kernels_origin
    assert not kernels_origin.startswith(os.path.join(ROOT, "kernels")), kernels_origin
    want = os.path.join(ROOT, "kernels", "nova_kernels", "__init__.py")
    assert os.path.realpath(ours) == os.path.realpath(want), ours


def test_nova_kernels_imports_only_torch_triton_and_stdlib():
    allowed = {"torch", "triton"} | set(sys.stdlib_module_names)
    bad, seen = [], 0
    pkg = os.path.join(ROOT, PACKAGE_DIRS["nova_kernels"])
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


# ---------------------------------------------------------------------------------------
# The import graph of nova_engine + nova_kernels (docs/design.md, "Import rules").
#
# Floors, lowest first; a module may import its own floor or a lower one, never a higher one.
# Where the design card's list is silent:
# - `nova_engine.logging` and `nova_engine.progress` (stdlib only: logging, `emit`) are the ground
#   floor with nova_kernels and the bare package (its __init__ holds the version; `_C` is the
#   C++ extension): every floor logs and prints progress through them;
# - `config` (the sections every stage shares) and `config_files` (the resolved config.yaml)
#   sit on the model floor: they read data's tokenizer settings and are read by train/;
# - `recipe` (YAML + overrides -> a stage's RunConfig, by stage name through the registry in
#   train/stages/__init__.py) sits on the stages floor: config never imports a stage;
# - `train/__main__` (`python -m nova_engine.train`) and `train/launch` (`nova run`, torchrun's
#   launcher) are entry points: they sit on the cli floor;
# - `eval/` (RewardBench, HF reward scoring) sits with generate and rl: it reads data only;
# - `demo` and `demo_stages` (the end-to-end tiny run that chains the stages and the merge tool) sit on the
#   tools floor, below cli which launches it.
FLOORS = (
    ("nova_kernels", "nova_engine", "nova_engine.logging", "nova_engine.progress"),
    ("nova_engine.parallel", "nova_engine.data", "nova_engine.losses"),
    ("nova_engine.model", "nova_engine.config", "nova_engine.config_files"),
    ("nova_engine.generate", "nova_engine.rl", "nova_engine.eval"),
    ("nova_engine.train",),
    ("nova_engine.train.stages", "nova_engine.recipe"),
    ("nova_engine.tools", "nova_engine.demo", "nova_engine.demo_stages"),
    ("nova_engine.cli", "nova_engine.train.__main__", "nova_engine.train.launch"),
)
STAGES = "nova_engine.train.stages"
FORBIDDEN = (  # (importer prefix, imported prefix, why)
    ("nova_engine.rl", "nova_engine.train", "rl/ is a library under the engines and stages"),
    ("nova_engine.model", "nova_engine.generate", "the layer KV cache lives in model/"),
    ("nova_engine.config", STAGES, "config looks stages up by name, never imports them"),
)


def _modules(root=ROOT, packages=("nova_engine", "nova_kernels")):
    """{dotted module name: file path} for every .py file of the packages."""
    mods = {}
    for pkg in packages:
        pkg_dir = os.path.join(root, pkg)
        if not os.path.isdir(pkg_dir):  # the kernels' home: kernels/nova_kernels
            pkg_dir = os.path.join(root, PACKAGE_DIRS.get(pkg, pkg))
        for dirpath, _, files in os.walk(pkg_dir):
            for f in sorted(files):
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    rel = os.path.relpath(path, pkg_dir)[:-3].replace(os.sep, ".")
                    name = f"{pkg}.{rel}".removesuffix(".__init__").removesuffix(".__init__")
                    mods[pkg if rel == "__init__" else name] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return ast.unparse(test).split(".")[-1] == "TYPE_CHECKING"


def _imports_of(name: str, path: str, mods: dict) -> list[tuple[str, int]]:
    """Project modules `name` imports (module level and inside functions; not under
    `if TYPE_CHECKING:`), as (module, line). `from pkg import sub` counts as pkg.sub."""
    tree = ast.parse(open(path).read(), path)
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    is_pkg = path.endswith("__init__.py")
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            # `from pkg import sub` imports the module pkg.sub; `from pkg import name`, pkg
            subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in mods]
            found += [(m, node.lineno) for m in subs]
            if len(subs) < len(node.names):
                found.append((module, node.lineno))
    out = set()
    for module, line in found:
        while module and module not in mods:
            module = module.rpartition(".")[0]
        if module and module != name:
            out.add((module, line))
    return sorted(out)


def import_graph(root=ROOT, packages=("nova_engine", "nova_kernels")):
    """{module: {imported module: first line}} over the packages' own modules."""
    mods = _modules(root, packages)
    graph = {}
    for name, path in mods.items():
        edges = graph.setdefault(name, {})
        for target, line in _imports_of(name, path, mods):
            edges.setdefault(target, line)
    return graph


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def floor_of(name: str, floors=FLOORS) -> tuple[int, str]:
    """(floor index, the longest matching prefix) of a module."""
    best = (-1, "")
    for i, prefixes in enumerate(floors):
        for p in prefixes:
            if _within(name, p) and len(p) > len(best[1]):
                best = (i, p)
    if best[0] < 0:
        raise AssertionError(f"{name} sits on no floor: add it to FLOORS in tests/test_layout.py")
    return best


def _cycles(graph) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def _stage_of(name: str, stages: str) -> str:
    """The stage a module is ("rlvr" for stages/rlvr.py: one module per stage, the RL library
    in nova_engine/rl), "" outside one."""
    if not name.startswith(stages + "."):
        return ""
    return name[len(stages) + 1 :].split(".")[0]


def layout_violations(graph, floors=FLOORS, forbidden=FORBIDDEN, stages=STAGES) -> list[str]:
    """Every broken import rule of `graph`, one line each (empty: the layout holds)."""
    bad = []
    for src in sorted(graph):
        f_src, _ = floor_of(src, floors)
        for dst, line in sorted(graph[src].items()):
            f_dst, _ = floor_of(dst, floors)
            where = f"{src}:{line} imports {dst}"
            if f_dst > f_src:
                bad.append(f"{where}: upward (floor {f_src} -> {f_dst})")
            if _stage_of(src, stages) and _stage_of(dst, stages) not in (
                "",
                _stage_of(src, stages),
            ):
                bad.append(f"{where}: a stage imports another stage")
            bad += [
                f"{where}: {why}" for a, b, why in forbidden if _within(src, a) and _within(dst, b)
            ]
    bad += [f"import cycle: {' <-> '.join(c)}" for c in _cycles(graph)]
    return bad


def test_import_graph_has_no_upward_arrows_no_cycles_no_stage_to_stage():
    graph = import_graph()
    assert len(graph) > 100 and sum(map(len, graph.values())) > 300
    assert layout_violations(graph) == []


def test_layout_checker_catches_upward_imports_cycles_and_stage_to_stage(tmp_path):
    """The checker on a synthetic tree: each planted violation is reported, the clean tree is not."""
    files = {
        "nova_engine/__init__.py": "",
        "nova_engine/logging.py": "import logging\n",
        "nova_engine/data/__init__.py": "",
        "nova_engine/data/a.py": "from nova_engine.logging import x\n",
        "nova_engine/model/__init__.py": "",
        "nova_engine/model/m.py": "from ..data import a\n",
        "nova_engine/train/__init__.py": "",
        "nova_engine/train/stages/__init__.py": "",
        "nova_engine/train/stages/sft.py": "from nova_engine.model import m\n",
        "nova_engine/train/stages/dpo.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from nova_engine.train.stages import sft\n"
        ),
        "nova_engine/rl/__init__.py": "",
        "nova_engine/rl/r.py": "from nova_engine.model import m\n",
        "nova_engine/config.py": "from nova_engine.data import a\n",
        "nova_kernels/__init__.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert layout_violations(import_graph(str(tmp_path))) == []
    # an upward import inside a function, a stage importing a stage, a two-module circle
    (tmp_path / "nova_engine/data/a.py").write_text(
        "def f():\n    from nova_engine.model.m import g\n"
    )
    (tmp_path / "nova_engine/train/stages/dpo.py").write_text("from . import sft\n")
    bad = layout_violations(import_graph(str(tmp_path)))
    assert any("nova_engine.data.a:2 imports nova_engine.model.m: upward" in b for b in bad), bad
    assert any("stages.dpo:1 imports nova_engine.train.stages.sft: a stage" in b for b in bad), bad
    assert any(
        b.startswith("import cycle: nova_engine.data.a <-> nova_engine.model.m") for b in bad
    )
    assert len(bad) == 3, bad
    # the named rules: rl/ imports no train/ (stages), model/ no generate/, config no stage
    (tmp_path / "nova_engine/rl/r.py").write_text("from nova_engine.train.stages import sft\n")
    (tmp_path / "nova_engine/generate").mkdir()
    (tmp_path / "nova_engine/generate/__init__.py").write_text("")
    (tmp_path / "nova_engine/generate/g.py").write_text("")
    (tmp_path / "nova_engine/model/m.py").write_text("from nova_engine.generate import g\n")
    (tmp_path / "nova_engine/config.py").write_text("import nova_engine.train.stages.sft\n")
    bad = layout_violations(import_graph(str(tmp_path)))
    for want in ("rl.r:1 imports nova_engine.train.stages.sft: rl/ is a library",
                 "model.m:1 imports nova_engine.generate.g: the layer KV cache",
                 "config:1 imports nova_engine.train.stages.sft: config looks stages up"):  # fmt: skip
        assert any(want in b for b in bad), (want, bad)
