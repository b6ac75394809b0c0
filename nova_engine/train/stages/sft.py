"""SFT stage: next-token cross-entropy on assistant tokens, normalized by the step's global
count of loss tokens, through `nova_kernels.linear_cross_entropy` on the last hidden states:
no [tokens x vocab] logits, and 3 GEMMs (the gradients are formed in the forward pass, since
the upstream gradient of every token's log-prob is known: mask / G).

    torchrun --nproc_per_node 8 -m nova_engine.train sft --recipe recipes/llama3_8b.yaml
    nova sft --recipe recipes/tiny_cpu.yaml train.max_steps=20        # one process

Loss of a micro-batch: -sum(mask * logp) / G with G = loss tokens of the step over all
micro-batches and DP ranks (`nova_engine.losses.sft`); the loop sums micro-batch losses, so
the logged loss is the step's mean token NLL. One engine ("policy"), one optimizer step per
data step.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from nova_engine.config import RunConfig
from nova_engine.data.packing import PackedBatch
from nova_engine.model.heads import token_logprobs, unwrap  # noqa: F401 (re-exported)
from nova_engine.parallel.state import ParallelState

if TYPE_CHECKING:
    from nova_engine.data.sample import Sample
    from nova_engine.train.engine import LossFn
    from nova_engine.train.loop import Loop


@dataclass
class SFTRunConfig(RunConfig):
    """The SFT stage's recipe: the shared sections only (nova_engine.config.RunConfig)."""

    stage: typing.ClassVar[str] = "sft"
    data_format: typing.ClassVar[str] = "chat"


CONFIG = SFTRunConfig


class SFTStage:
    """Loss and stage for the loop (nova_engine.train.loop.Loss / Stage)."""

    name = "sft"
    engine = "policy"
    metric_names = ("loss", "loss_tokens")
    normalizer = "tokens"

    def __init__(self, ps: ParallelState):
        self.ps = ps

    def counts(self, microbatches: Sequence[PackedBatch]) -> dict[str, float]:
        return {"tokens": float(sum(mb.num_loss_tokens for mb in microbatches))}  # host counts

    def loss_fn(self, norms: dict[str, torch.Tensor]) -> LossFn:
        from nova_engine.losses.sft import sft_loss_fused

        ps, global_count = self.ps, norms["tokens"]

        def loss_fn(model, hidden, mb: PackedBatch):
            loss = sft_loss_fused(
                hidden.reshape(-1, hidden.shape[-1]),
                unwrap(model).lm_head_weight(),
                mb.labels,
                mb.loss_mask,
                global_count,
                tp_group=ps.tp_group if ps.tp > 1 else None,
                sequence_parallel=ps.sp and ps.tp > 1,
                rows=mb.loss_rows,  # the packer's loss rows: no nonzero() on the device
            )
            n = mb.num_loss_tokens  # a host count: megatron adds it to its token total
            return loss, n, {"loss": loss.detach(), "loss_tokens": n}

        return loss_fn

    def finalize_metrics(self, sums: dict[str, float], norms: dict[str, float]) -> dict:
        loss = sums["loss"]
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "loss_tokens": sums["loss_tokens"]}

    def train_step(self, loop: Loop, batch: list[PackedBatch]) -> dict[str, float]:
        return loop.update(self.engine, batch, self)


def load_chat(run: RunConfig, paths: Sequence[str]) -> list[Sample]:
    from nova_engine.data.tokenize import load_samples

    d = run.data
    samples, _, _ = load_samples(
        paths,
        run.tokenizer(),
        "chat",
        max_length=d.max_length,
        truncation=d.truncation,
        on_bad_line=d.on_bad_line,
    )
    if d.eval_max_samples is not None and paths is d.eval_paths:
        samples = samples[: d.eval_max_samples]
    return samples


def run(run: SFTRunConfig) -> list[dict[str, float]]:
    """The SFT stage from a SFTRunConfig (all ranks); returns the per-step metrics."""
    from nova_engine.train import runner

    ps = runner.setup_parallel(run)
    runner.ensure_model(run, ps)
    data = runner.data_source(run, ps, load_chat(run, run.data.train_paths), train=True)
    loop = runner.loop_for_run(run, ps, data)
    stage = SFTStage(ps)
    eval_fn = None
    if run.data.eval_paths:
        ev = runner.data_source(run, ps, load_chat(run, run.data.eval_paths), train=False)
        eval_fn = runner.eval_over(loop, stage, ev)
    return runner.train_stage(run, loop, stage, eval_fn)
