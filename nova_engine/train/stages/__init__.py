"""The stage registry: the one list of stages, read by the config loader
(nova_engine.recipe), the `nova` CLI and `python -m nova_engine.train`.

Each stage is one module here, opening with its launch command, that defines:
    CONFIG       its RunConfig subclass (nova_engine.config.RunConfig + its own sections)
    run(run)     the stage from a CONFIG instance, on every rank
Adding a stage is one `StageSpec` line below. Modules are imported when first used, so
listing the stages (`nova --help`) imports nothing heavy.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nova_engine.config import RunConfig


@dataclass(frozen=True)
class StageSpec:
    name: str
    """Command name (recipe section, CLI sub-command)."""
    module: str
    """The stage module (defines CONFIG and run)."""
    help: str
    """One-line description for the CLI."""

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    @property
    def config_class(self) -> type[RunConfig]:
        """The stage's RunConfig subclass."""
        return self.load().CONFIG

    def run(self, run_config: RunConfig) -> list[dict[str, float]]:
        return self.load().run(run_config)


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec("sft", "nova_engine.train.stages.sft", "supervised fine-tuning"),
        StageSpec("dpo", "nova_engine.train.stages.dpo", "preference optimization (DPO family)"),
        StageSpec("rm", "nova_engine.train.stages.rm", "reward model (Bradley-Terry, regression)"),
        StageSpec(
            "rlvr", "nova_engine.train.stages.rlvr", "RL with verifiable rewards (GRPO, PPO)"
        ),
    )
}
