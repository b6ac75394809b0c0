"""Launch a training stage (one process per rank):

    torchrun --nproc_per_node 8 -m nova_engine.train sft --recipe recipes/llama3_8b.yaml
    torchrun --nproc_per_node 8 -m nova_engine.train dpo --recipe recipes/llama3_8b.yaml \\
        optim.lr=5e-7 train.max_steps=100
    python -m nova_engine.train sft --recipe recipes/tiny_cpu.yaml      # a world of one

Arguments after the recipe are `key=value` overrides relative to the stage's config
(nova_engine.config). A bad recipe or override stops with the key and what was expected.
"""

from __future__ import annotations

import argparse
import os
import sys

from nova_engine.train.safety import exit_on_interrupt

if __name__ == "__main__":  # from here on a Ctrl-C is one line and exit 130, never a crash
    exit_on_interrupt()

from nova_engine.progress import emit  # noqa: E402
from nova_engine.train.stages import STAGES  # noqa: E402 - the one stage registry


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    stage = next((a for a in argv if a in STAGES), None)
    epilog = None
    if stage is not None and ("-h" in argv or "--help" in argv):  # the stage's config keys
        from nova_engine.recipe import stage_help

        epilog = stage_help(stage)
    prog = "nova" if os.path.basename(sys.argv[0]) == "nova" else "python -m nova_engine.train"
    p = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("stage", choices=tuple(STAGES))
    p.add_argument("--recipe", required=True, help="recipe YAML (recipes/*.yaml)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (YAML, absolute paths) and exit")  # fmt: skip
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-5")
    p.add_argument("--verbose", action="store_true",
                   help="show third-party warnings (Transformer Engine / apex notes, progress "
                        "bars); also NOVA_VERBOSE=1")  # fmt: skip
    return p.parse_intermixed_args(argv)


def print_config(stage: str, recipe: str, overrides: list[str]) -> None:
    """`--print-config`: the config a run would use, as `<out_dir>/config.yaml` holds it."""
    from nova_engine.recipe import config_yaml, load_recipe

    emit(config_yaml(load_recipe(recipe, stage, overrides)).rstrip("\n"))


def run_stage(stage: str, recipe: str, overrides: list[str]) -> list[dict[str, float]]:
    from nova_engine.recipe import load_recipe

    run = load_recipe(recipe, stage, overrides)
    return STAGES[stage].run(run)


def user_errors() -> tuple[type[Exception], ...]:
    """Errors a user can cause (bad recipe, data line, model, checkpoint, layout, a busy
    out_dir, a diverged run): the entry point reports their one-line message instead of a
    traceback."""
    from nova_engine.config import ConfigError
    from nova_engine.data.formats import DataError
    from nova_engine.data.tokenize import TemplateError
    from nova_engine.model.arch import ArchitectureError
    from nova_engine.model.hf_export import ExportError
    from nova_engine.model.hf_io import CheckpointError
    from nova_engine.parallel.state import LayoutError
    from nova_engine.rl.async_rl import GenerationGroupDied
    from nova_engine.train.checkpoint_io import CheckpointIOError
    from nova_engine.train.ref_cache import RefCacheError
    from nova_engine.train.safety import RunLockError, TrainingDiverged

    return (
        ConfigError, DataError, TemplateError, ArchitectureError, CheckpointError,
        LayoutError, CheckpointIOError, RefCacheError, RunLockError, TrainingDiverged,
        ExportError, GenerationGroupDied,
    )  # fmt: skip


def quiet_library_warnings(argv: list[str] | None = None) -> None:
    """Known third-party warnings and progress bars (megatron-core's notes on the absent
    Transformer Engine / apex, deprecations, transformers' "Loading weights") filtered
    unless `--verbose` or NOVA_VERBOSE=1 (nova_engine.logging.quiet_third_party)."""
    from nova_engine.logging import quiet_third_party, verbose_requested

    quiet_third_party(verbose_requested(argv))


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def report(line: str) -> None:
    """One line on stderr, from global rank 0 only (every rank hits the same user error;
    a multi-rank run would otherwise print it once per rank). The other ranks do not exit
    first: torchrun stops every worker as soon as one exits, and rank 0 (which may reach
    the error seconds later under load) must not be stopped before its line is out; they
    wait until the launcher stops them after rank 0's exit (at most 60 s, then print their
    own line: an error that rank 0 did not hit)."""
    import time

    if _rank() == 0 or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        emit(line, err=True)
        return
    time.sleep(60.0)
    emit(f"rank {_rank()}: {line}", err=True)


def _barrier_after_interrupt(timeout_s: float = 5.0) -> None:
    """All ranks meet once after the signal's checkpoint, then exit at once (torchrun
    SIGKILLs the ranks still running 30 s after the first exit; preemption grace periods
    are often shorter). Bounded: a rank that is gone costs at most `timeout_s`."""
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
        else:
            dist.barrier()
    except Exception:  # noqa: BLE001 - a missing rank: exit anyway
        pass


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 a user error (one line), 128 + signal number after SIGINT /
    SIGTERM (a checkpoint saved at the step boundary; rerun to resume)."""
    import signal

    from nova_engine.train.safety import Interrupted

    restore_sigint = exit_on_interrupt()  # a Ctrl-C inside an import: one line, exit 130
    argv = sys.argv[1:] if argv is None else argv
    quiet_library_warnings(argv)
    args = parse(argv)
    try:
        if args.print_config:
            print_config(args.stage, args.recipe, args.overrides)
        else:
            run_stage(args.stage, args.recipe, args.overrides)
    except user_errors() as e:
        kind = "config error" if type(e).__name__ == "ConfigError" else type(e).__name__
        report(f"{kind}: {e}")
        return 2
    except Interrupted as e:  # every rank saved together: no rank has its own line to wait for
        if _rank() == 0:
            emit(str(e), err=True)
        _barrier_after_interrupt()  # rank 0's line is out before any rank exits
        return 128 + e.signum
    except KeyboardInterrupt:  # before or after the training loop (nothing to save)
        report("interrupted (SIGINT) before training started or after it ended")
        return 128 + signal.SIGINT
    finally:
        dist = sys.modules.get("torch.distributed")  # never a first import of torch here
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()
        restore_sigint()
    return 0


if __name__ == "__main__":
    code = main()
    if code > 128:  # stopped by a signal after the checkpoint: everything is on disk
        import logging

        # skip the interpreter's teardown (seconds of library finalizers): a preempted rank
        # exits right after its checkpoint, within any grace period
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
