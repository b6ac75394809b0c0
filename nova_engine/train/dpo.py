"""Moved to nova_engine.train.stages.dpo; this name stays importable for callers that still
use it (nova_engine.demo)."""

from nova_engine.train.stages.dpo import (  # noqa: F401
    DPORunConfig,
    DPOStage,
    load_pairs,
    pair_logps,
    reference_pass,
    run,
)
