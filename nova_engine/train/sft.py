"""Moved to nova_engine.train.stages.sft; this name stays importable for callers that still
use it (nova_engine.demo, benchmarks/bench_train_throughput.py)."""

from nova_engine.train.stages.sft import SFTRunConfig, SFTStage, load_chat, run  # noqa: F401
