"""`nova`: single-process use of the engine (a world of one; use torchrun with
`-m nova_engine.train` for several ranks) and the tools around the stages.

    nova sft --recipe recipes/tiny_cpu.yaml train.max_steps=50
    nova dpo --recipe recipes/tiny_cpu.yaml loss.beta=0.1
    nova export runs/sft/checkpoints/step_00000200 out/hf     # a checkpoint's HF export
    nova export CKPT out/merged --merge-lora   # a LoRA run: merged (or --adapter-only: PEFT)
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

from nova_engine.progress import emit

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
    "doctor": ("nova_engine.tools.doctor", "what this machine has; which paths the engine takes"),
}


def _export(ckpt: str, out: str, overwrite: bool = False, lora: str | None = None) -> int:
    """Copy checkpoint `ckpt`'s hf/ export to `out`: only the files its manifest lists,
    each checked against the manifest's checksum, refused when any weight is non-finite;
    `out` must be new (or, with overwrite, a previous export: hf_export's one rule).
    lora="merge" / "adapter": a LoRA run's merged weights (base + (alpha/r) B A) or its
    adapter alone in PEFT's layout, from the checkpoint's shards (nova_engine.tools.lora_export;
    a checkpoint without model.lora is refused). A LoRA checkpoint's hf/ is merged already."""
    from nova_engine.model.hf_export import (
        ExportError,
        check_export_target,
        nonfinite_tensors,
        replace_dir,
    )
    from nova_engine.tools.lora_export import LoRAExportError, export_adapter, export_merged
    from nova_engine.train.checkpoint_io import CheckpointIOError, file_crc32, read_manifest
    from nova_engine.train.checkpoint_parts import HF_SUBDIR

    tmp = f"{out.rstrip(os.sep)}.tmp-export"
    try:
        if not os.path.isdir(ckpt):
            raise CheckpointIOError(f"{ckpt}: no such checkpoint directory")
        manifest = read_manifest(ckpt)  # complete, every listed file at its recorded size
        check_export_target(out, overwrite=overwrite, what="export destination")
        if lora is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            (export_merged if lora == "merge" else export_adapter)(ckpt, tmp)
            bad = nonfinite_tensors(tmp)
            if bad:
                raise ExportError(
                    f"{ckpt}: non-finite weights ({', '.join(bad)}): nothing exported"
                )
            replace_dir(tmp, out)
            what = "merged LoRA weights" if lora == "merge" else "LoRA adapter (PEFT)"
            emit(f"exported {ckpt} ({what}) -> {out}")
            return 0
        prefix = HF_SUBDIR + "/"
        files = sorted(r for r in manifest["files"] if r.startswith(prefix))
        if not files:
            raise CheckpointIOError(f"{ckpt}: no {HF_SUBDIR}/ export in this checkpoint")
        sums = manifest.get("checksums") or {}
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for rel in files:  # copy, then check the copy: what ships is what was checksummed
            dst = os.path.join(tmp, rel[len(prefix) :])
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(os.path.join(ckpt, rel), dst)
            if rel in sums and file_crc32(dst) != sums[rel]:
                raise CheckpointIOError(
                    f"{os.path.join(ckpt, rel)}: checksum mismatch with the manifest: the "
                    "file is damaged; nothing exported"
                )
        bad = nonfinite_tensors(tmp)
        if bad:
            raise ExportError(f"{ckpt}: non-finite weights ({', '.join(bad)}): nothing exported")
        replace_dir(tmp, out)
    except (CheckpointIOError, ExportError, LoRAExportError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        emit(f"nova export: {e}", err=True)
        return 2
    emit(f"exported {ckpt}/{HF_SUBDIR} -> {out}")
    return 0


def _stages() -> tuple[str, ...]:
    from nova_engine.train.__main__ import STAGES

    return tuple(STAGES)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from nova_engine.logging import quiet_third_party, verbose_requested

    quiet_third_party(verbose_requested(argv))  # --verbose / NOVA_VERBOSE=1 show them
    if argv and argv[0] in TOOLS:  # a tool parses its own arguments
        module, _ = TOOLS[argv[0]]
        return int(
            importlib.import_module(module).main([a for a in argv[1:] if a != "--verbose"]) or 0
        )
    if argv and argv[0] in _stages():  # --help lists the stage's config keys; --print-config
        from nova_engine.train.__main__ import main as train_main

        return train_main(list(argv))
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
    e.add_argument("out", help="a new directory (or a previous export, with --overwrite)")
    e.add_argument("--overwrite", action="store_true", help="replace a previous export at OUT")
    lora = e.add_mutually_exclusive_group()
    lora.add_argument(
        "--merge-lora",
        dest="lora",
        action="store_const",
        const="merge",
        help="a LoRA run: base + (alpha/r) B A from the checkpoint's adapters",
    )
    lora.add_argument("--adapter-only", dest="lora", action="store_const", const="adapter",
                      help="a LoRA run: the adapter alone, PEFT layout (adapter_config.json + "
                      "adapter_model.safetensors)")  # fmt: skip
    d = sub.add_parser("demo", help="the make-demo run")
    d.add_argument("--out", default="demo_out")
    for name, (_, help_text) in TOOLS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    args, rest = p.parse_known_args(argv)
    if args.cmd in stages:
        from nova_engine.train.__main__ import main as train_main

        return train_main([args.cmd, "--recipe", args.recipe, *args.overrides, *rest])
    if args.cmd == "export":
        return _export(args.checkpoint, args.out, args.overwrite, args.lora)
    from nova_engine.demo import main as demo_main

    return demo_main(["--out", args.out, *rest])


if __name__ == "__main__":
    sys.exit(main())
