"""`nova`: single-process use of the engine (a world of one; use torchrun with
`-m nova_engine.train` for several ranks) and the tools around the stages.

    nova sft --recipe recipes/tiny_cpu.yaml train.max_steps=50
    nova dpo --recipe recipes/tiny_cpu.yaml loss.beta=0.1
    nova export runs/sft/checkpoints/step_00000200 out/hf     # a checkpoint's HF export
    nova demo --out demo_out                                  # = make demo
    nova <tool> --help                                        # the tools listed below

Each tool is one module with `main(argv) -> int` (its own argparse); `TOOLS` maps the
command name to it, so adding a tool is one line here.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys

from nova_engine.train.metrics import emit

# command -> (module with main(argv) -> int, one-line help)
TOOLS: dict[str, tuple[str, str]] = {
    "decontaminate": ("nova_engine.tools.decontaminate", "drop n-gram overlap with eval sets"),
    "merge": ("nova_engine.tools.merge", "merge models: ExPO (+ alpha sweep), linear, TIES, ..."),
    "generate": (
        "nova_engine.tools.generate",
        "sample responses for a JSONL of prompts (KV cache)",
    ),
    "plan": ("nova_engine.tools.plan", "per-GPU memory of a recipe's layout; layouts that fit"),
    "dryrun": ("nova_engine.tools.dryrun", "build every rank of a layout on meta (fake backend)"),
    "pas": ("nova_engine.tools.pas", "prompt augmentation (PAS): build-data, augment"),
    "run": ("nova_engine.train.launch", "torchrun a stage with Nova's exit codes (2: user error)"),
}


def _export(ckpt: str, out: str) -> int:
    from nova_engine.model.hf_export import replace_dir
    from nova_engine.train.checkpoint import HF_SUBDIR
    from nova_engine.train.checkpoint_io import read_manifest

    read_manifest(ckpt)  # a complete checkpoint, or CheckpointIOError naming what is wrong
    src = os.path.join(ckpt, HF_SUBDIR)
    if not os.path.isdir(src):
        emit(f"{ckpt}: no {HF_SUBDIR}/ export in this checkpoint", err=True)
        return 1
    # copy next to `out`, then swap it in: an existing export is replaced, never merged
    # (stale weight shards would otherwise load), and a failed copy leaves the old one
    tmp = f"{out.rstrip(os.sep)}.tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    replace_dir(tmp, out)
    emit(f"exported {src} -> {out}")
    return 0


def _stages() -> tuple[str, ...]:
    from nova_engine.train.__main__ import STAGES

    return tuple(STAGES)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOLS:  # a tool parses its own arguments
        module, _ = TOOLS[argv[0]]
        return int(importlib.import_module(module).main(argv[1:]) or 0)
    p = argparse.ArgumentParser(prog="nova", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True)
    stages = _stages()
    for stage in stages:
        s = sub.add_parser(stage, help=f"run the {stage} stage")
        s.add_argument("--recipe", required=True)
        s.add_argument("overrides", nargs="*")
    e = sub.add_parser("export", help="copy a checkpoint's HF export to a directory")
    e.add_argument("checkpoint")
    e.add_argument("out")
    d = sub.add_parser("demo", help="the make-demo run")
    d.add_argument("--out", default="demo_out")
    for name, (_, help_text) in TOOLS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    args, rest = p.parse_known_args(argv)
    if args.cmd in stages:
        from nova_engine.train.__main__ import main as train_main

        return train_main([args.cmd, "--recipe", args.recipe, *args.overrides, *rest])
    if args.cmd == "export":
        return _export(args.checkpoint, args.out)
    from nova_engine.demo import main as demo_main

    return demo_main(["--out", args.out, *rest])


if __name__ == "__main__":
    sys.exit(main())
