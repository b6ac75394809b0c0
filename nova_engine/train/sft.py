"""SFT stage: next-token cross-entropy on assistant tokens, normalized by the step's global
count of loss tokens, through `nova_kernels.linear_cross_entropy` on the last hidden states:
no [tokens x vocab] logits, and 3 GEMMs (the gradients are formed in the forward pass, since
the upstream gradient of every token's log-prob is known: mask / G).

    torchrun --nproc_per_node 8 -m nova_engine.train sft --recipe recipes/llama3_8b.yaml
    nova sft --recipe recipes/tiny_cpu.yaml train.max_steps=20        # one process

Loss of a micro-batch: -sum(mask * logp) / G with G = loss tokens of the step over all
micro-batches and DP ranks (`nova_engine.losses.sft`); the loop sums micro-batch losses, so
the logged loss is the step's mean token NLL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from nova_kernels import linear_logprobs

from nova_engine.data.packing import PackedBatch
from nova_engine.losses.sft import sft_loss_fused
from nova_engine.model.packed import packed_forward
from nova_engine.parallel.state import ParallelState


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The NovaGPTModel inside a DDP wrapper."""
    while hasattr(model, "module"):
        model = model.module
    return model


def token_logprobs(
    model: torch.nn.Module, hidden: torch.Tensor, mb: PackedBatch, ps: ParallelState
):
    """Per-token log p(label) [T] fp32 from the last stage's hidden states [T(/tp), 1, H]."""
    h_NH = hidden.reshape(-1, hidden.shape[-1])
    return linear_logprobs(
        h_NH,
        unwrap(model).lm_head_weight(),
        mb.labels,
        tp_group=ps.tp_group if ps.tp > 1 else None,
        sequence_parallel=ps.sp and ps.tp > 1,
    )


class SFTStage:
    """The SFT stage for the trainer loop (see nova_engine.train.loop.Stage)."""

    name = "sft"
    metric_names = ("loss", "loss_tokens")

    def __init__(self, ps: ParallelState):
        self.ps = ps

    def local_count(self, microbatches: Sequence[PackedBatch]) -> float:
        return float(sum(float((mb.loss_mask != 0).sum()) for mb in microbatches))

    def step_fn(self, global_count: torch.Tensor):
        ps = self.ps

        def step(model, mb: PackedBatch):
            out = packed_forward(model, mb)

            def loss_fn(hidden):
                loss = sft_loss_fused(
                    hidden.reshape(-1, hidden.shape[-1]), unwrap(model).lm_head_weight(),
                    mb.labels, mb.loss_mask, global_count,
                    tp_group=ps.tp_group if ps.tp > 1 else None,
                    sequence_parallel=ps.sp and ps.tp > 1,
                )  # fmt: skip
                n = (mb.loss_mask != 0).sum()
                return loss, n, {"loss": loss.detach(), "loss_tokens": n}

            return out, loss_fn

        return step

    def finalize_metrics(self, sums: dict[str, float], global_count: float) -> dict[str, float]:
        loss = sums["loss"]
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "loss_tokens": sums["loss_tokens"]}


def load_chat(run, paths) -> list:
    from nova_engine.data.tokenize import load_samples

    d = run.data
    samples, _, _ = load_samples(
        paths, run.model.tokenizer_dir, "chat", max_length=d.max_length,
        truncation=d.truncation, on_bad_line=d.on_bad_line,
    )  # fmt: skip
    if d.eval_max_samples is not None and paths is d.eval_paths:
        samples = samples[: d.eval_max_samples]
    return samples


def run(run) -> list[dict[str, float]]:
    """The SFT stage from a SFTRunConfig (all ranks); returns the per-step metrics."""
    from nova_engine.train.runner import (
        ensure_model,
        eval_over,
        setup_parallel,
        step_batcher,
        train_stage,
        trainer_for_run,
    )

    ps = setup_parallel(run)
    ensure_model(run, ps)
    batcher = step_batcher(run, ps, load_chat(run, run.data.train_paths), train=True)
    trainer, arch = trainer_for_run(run, ps, batcher.total_steps)
    stage = SFTStage(ps)
    eval_fn = None
    if run.data.eval_paths:
        ev = step_batcher(run, ps, load_chat(run, run.data.eval_paths), train=False)
        eval_fn = eval_over(trainer, stage, ev)
    return train_stage(run, ps, trainer, arch, stage, batcher, eval_fn)
