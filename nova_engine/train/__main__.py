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
import sys

from nova_engine.train.metrics import emit
from nova_engine.train.stages import STAGES  # the one stage registry (name -> StageSpec)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nova_engine.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("stage", choices=tuple(STAGES))
    p.add_argument("--recipe", required=True, help="recipe YAML (recipes/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-5")
    return p.parse_intermixed_args(argv)


def run_stage(stage: str, recipe: str, overrides: list[str]) -> list[dict[str, float]]:
    from nova_engine.recipe import load_recipe

    run = load_recipe(recipe, stage, overrides)
    return STAGES[stage].run(run)


def user_errors() -> tuple[type[Exception], ...]:
    """Errors a user can cause (bad recipe, data line, model, checkpoint or layout): the
    entry point reports their one-line message instead of a traceback."""
    from nova_engine.config import ConfigError
    from nova_engine.data.formats import DataError
    from nova_engine.data.tokenize import TemplateError
    from nova_engine.model.arch import ArchitectureError
    from nova_engine.model.hf_io import CheckpointError
    from nova_engine.parallel.state import LayoutError
    from nova_engine.train.checkpoint_io import CheckpointIOError
    from nova_engine.train.ref_cache import RefCacheError

    return (
        ConfigError, DataError, TemplateError, ArchitectureError, CheckpointError,
        LayoutError, CheckpointIOError, RefCacheError,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        run_stage(args.stage, args.recipe, args.overrides)
    except user_errors() as e:
        kind = "config error" if type(e).__name__ == "ConfigError" else type(e).__name__
        emit(f"{kind}: {e}", err=True)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
