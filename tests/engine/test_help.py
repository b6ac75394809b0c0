"""#32 discoverability: `nova <stage> --help` lists every config key of the stage with its
default and the docstring under its field; `--print-config` prints the resolved config and
exits 0; the resolved config file (absolute paths) reruns as a recipe; `nova run --help`."""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field

import pytest
import yaml

from nova_engine import cli
from nova_engine.recipe import (
    config_keys,
    field_docs,
    load_recipe,
    resolved_config,
    run_config_class,
    write_resolved_config,
)

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "tiny_cpu.yaml")


@dataclass
class _Inner:
    depth: int = 3
    """How deep,
    over two lines."""
    name: str | None = None


@dataclass
class _Base:
    lr: float = 0.5
    """Base doc."""
    keep: bool = True
    """Kept."""


@dataclass
class _Outer(_Base):
    lr: float = 0.25
    """Overridden doc."""
    inner: _Inner = field(default_factory=_Inner)
    """A section."""
    maybe: _Inner | None = None
    """An optional section."""
    pairs: tuple[float, float] = (0.9, 0.99)
    """A tuple."""


def test_field_docs_and_keys_of_a_hand_written_dataclass():
    assert field_docs(_Inner) == {"depth": "How deep, over two lines."}
    assert field_docs(_Outer) == {
        "lr": "Overridden doc.", "keep": "Kept.", "inner": "A section.",
        "maybe": "An optional section.", "pairs": "A tuple.",
    }  # fmt: skip
    keys = {k: (tp, default, doc) for k, tp, default, doc in config_keys(_Outer)}
    assert keys == {
        "lr": ("float", "0.25", "Overridden doc."),
        "keep": ("bool", "true", "Kept."),
        "inner.depth": ("int", "3", "How deep, over two lines."),
        "inner.name": ("str or null", "null", ""),
        "maybe": ("_Inner or null", "null", "An optional section."),
        "maybe.depth": ("int", "3", "How deep, over two lines."),
        "maybe.name": ("str or null", "null", ""),
        "pairs": ("tuple[float, float]", "[0.9, 0.99]", "A tuple."),
    }


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every leaf key of a config class, by plain dataclass reflection (the reference)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        arms = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        sub = next((a for a in arms if dataclasses.is_dataclass(a)), None)
        if sub is not None:
            if f.default is None:
                out.append(prefix + f.name)
            out += _leaf_keys(sub, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


@pytest.mark.parametrize("stage", ["sft", "dpo", "rm", "rlvr"])
def test_stage_help_lists_every_key_with_default_and_doc(stage, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([stage, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--print-config" in text
    cls = run_config_class(stage)
    listed = [
        ln.split(" = ")[0].strip() for ln in text.splitlines() if " = " in ln and "    [" in ln
    ]
    assert listed == _leaf_keys(cls)
    undocumented = [k for k, _, _, doc in config_keys(cls) if not doc]
    assert undocumented == []  # the house writes a docstring under every field
    assert "  optim.lr = 1.0e-05    [float]" in text
    assert "Peak learning rate (after warmup)." in text
    assert "  train.report_to = []    [list[str]]" in text and "  eval.command = null" in text
    if stage == "dpo":  # a section whose fields and docs live on a base class elsewhere
        assert "  loss.beta = 5.0    [float]" in text and "Inverse temperature" in text
    if stage == "rlvr":
        assert "  critic.init_from = null    [str or null]" in text


def test_print_config_prints_the_resolved_yaml_and_it_reruns(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["dpo", "--recipe", RECIPE, "--print-config", "loss.beta=0.25",
            "train.out_dir=rel/out", "data.train_paths=[a.jsonl, sub/b.jsonl]"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    doc = yaml.safe_load(printed)
    d = doc["dpo"]
    assert d["loss"]["beta"] == 0.25
    assert d["train"]["out_dir"] == str(tmp_path / "rel" / "out")
    assert d["data"]["train_paths"] == [str(tmp_path / "a.jsonl"), str(tmp_path / "sub/b.jsonl")]
    assert os.path.isabs(d["model"]["hf_path"]) and os.path.isabs(d["model"]["tokenizer_path"])
    # the printed config is a recipe: loading it gives the same run config
    want = load_recipe(RECIPE, "dpo", argv[4:])
    (tmp_path / "resolved.yaml").write_text(printed)
    again = load_recipe(tmp_path / "resolved.yaml", "dpo")
    assert resolved_config(again) == resolved_config(want) == doc
    assert (
        again.loss == want.loss
        and again.optim == want.optim
        and again.train.out_dir == str(tmp_path / "rel" / "out")
    )
    # a bad key: one line, exit 2, nothing on stdout
    assert cli.main(["dpo", "--recipe", RECIPE, "--print-config", "loss.bta=1"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "loss.bta" in out.err


def test_write_resolved_config_is_atomic_and_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = load_recipe(RECIPE, "sft", ["train.out_dir=run1", "checkpoint.dir=ck"])
    (tmp_path / "run1").mkdir()
    (tmp_path / "run1" / "config.yaml").write_text("old")
    path = write_resolved_config(run)
    assert path == os.path.join("run1", "config.yaml")
    assert sorted(os.listdir(tmp_path / "run1")) == ["config.yaml"]  # no temp file left
    d = yaml.safe_load(open(path))["sft"]
    assert d["train"]["out_dir"] == str(tmp_path / "run1")
    assert d["checkpoint"]["dir"] == str(tmp_path / "ck")
    assert d["checkpoint"]["resume"] == "auto"  # a keyword, not a path
    assert d["data"]["template"] is None


def test_nova_run_help_exits_0(capsys):
    assert cli.main(["run", "--help"]) == 0
    text = capsys.readouterr().out
    assert "torchrun" in text and "nova run --nproc-per-node 8 sft" in text
    with pytest.raises(SystemExit) as e:  # a stage's help through nova run: no launch
        cli.main(["run", "--nproc-per-node", "2", "sft", "--help"])
    assert e.value.code == 0 and "optim.lr = " in capsys.readouterr().out


def test_decontaminate_says_what_it_wrote(tmp_path, capsys):
    import json

    words = "the quick brown fox jumps over the lazy dog while seven wise owls count stars".split()
    item = " ".join(words)
    ev = tmp_path / "eval.jsonl"
    ev.write_text(json.dumps({"prompt": item}) + "\n")
    tr = tmp_path / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "ok"}]}
            for t in (item, "a different prompt entirely " * 5, "yet another clean one " * 5)]  # fmt: skip
    tr.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "clean"
    assert (
        cli.main(["decontaminate", "--train", str(tr), "--eval", str(ev), "--out", str(out)]) == 0
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"decontaminate: wrote 2 items (1 removed) in 1 file(s) -> {out}"
    assert len((out / "train.jsonl").read_text().splitlines()) == 2
