"""DPO stage: the DPO family of nova_engine.losses.dpo on packed (chosen, rejected) pairs,
against reference log-probs computed once by the same engine and cached on disk.

    torchrun --nproc_per_node 8 -m nova_engine.train dpo --recipe recipes/llama3_8b.yaml
    nova dpo --recipe recipes/tiny_cpu.yaml loss.loss_type=sigmoid loss.beta=0.1

1. Reference pass (`reference_pass`): forward-only over every pair with the initial weights
   (model.hf_path), per-sequence log-prob sums over the response tokens, stored in the
   `RefCache` keyed by (model, data, config) fingerprints. A later run with the same key
   reuses it; any change of model, data or tokenization settings makes a new one.
2. Training: no reference model in memory; each micro-batch looks its pairs up in the cache.
   Per-pair losses are reduced over the step's global pair count (`reduce_pairs`); metrics:
   loss, accuracy (r_c > r_r), chosen/rejected implicit rewards and their margin.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from nova_engine.data.packing import PackedBatch
from nova_engine.logging import get_logger
from nova_engine.losses.dpo import PreferenceLogps, dpo_loss, reduce_pairs, sequence_logps
from nova_engine.model.packed import packed_forward
from nova_engine.parallel.pipeline import forward_backward
from nova_engine.parallel.state import ParallelState
from nova_engine.train.loop import StepBatcher, Trainer
from nova_engine.train.ref_cache import RefCache
from nova_engine.train.sft import token_logprobs

logger = get_logger(__name__)


def pair_logps(model, hidden, mb: PackedBatch, ps: ParallelState):
    """(chosen sums, rejected sums, chosen counts, rejected counts), each [P], from the last
    stage's hidden states of a pairs-mode micro-batch."""
    logp = token_logprobs(model, hidden, mb, ps)
    sums, counts = sequence_logps(logp, mb.loss_mask, mb.cu_seqlens)
    n = mb.num_samples  # the padding segment (if any) comes after the N sequences
    sums, counts = sums[:n], counts[:n].to(sums.dtype)
    return sums[0::2], sums[1::2], counts[0::2], counts[1::2]


class DPOStage:
    """The DPO stage for the trainer loop (see nova_engine.train.loop.Stage)."""

    name = "dpo"
    metric_names = ("loss", "pairs", "accuracy", "chosen_reward", "rejected_reward", "margin")

    def __init__(self, ps: ParallelState, loss_config, ref: RefCache | None):
        self.ps, self.cfg, self.ref = ps, loss_config, ref

    def local_count(self, microbatches: Sequence[PackedBatch]) -> float:
        return float(sum(len(mb.pair_ids) for mb in microbatches))

    def _ref(self, mb: PackedBatch):
        if self.ref is None:
            return None, None
        c, r, _, _ = self.ref.lookup(mb.pair_ids.cpu().numpy())
        dev = self.ps.device
        return torch.from_numpy(c).float().to(dev), torch.from_numpy(r).float().to(dev)

    def step_fn(self, global_count: torch.Tensor):
        ps, cfg = self.ps, self.cfg

        def step(model, mb: PackedBatch):
            ref_c, ref_r = self._ref(mb)
            out = packed_forward(model, mb)

            def loss_fn(hidden):
                pc, pr, nc, nr = pair_logps(model, hidden, mb, ps)
                o = dpo_loss(PreferenceLogps(pc, pr, nc, nr, ref_c, ref_r), cfg)
                loss = reduce_pairs(o.losses, global_count)
                p = torch.tensor(len(pc))
                return (
                    loss,
                    p,
                    {
                        "loss": loss.detach(),
                        "pairs": p,
                        "accuracy": o.accuracy.sum(),
                        "chosen_reward": o.chosen_rewards.sum(),
                        "rejected_reward": o.rejected_rewards.sum(),
                        "margin": o.margin.sum(),
                    },
                )

            return out, loss_fn

        return step

    def finalize_metrics(self, sums: dict[str, float], global_count: float) -> dict[str, float]:
        n = max(sums["pairs"], 1.0)
        out = {"loss": sums["loss"]}
        for k in ("accuracy", "chosen_reward", "rejected_reward", "margin"):
            out[k] = sums[k] / n
        return out


@torch.no_grad()
def reference_pass(trainer: Trainer, batcher: StepBatcher, cache: RefCache) -> RefCache:
    """Fill `cache` with the trainer's current model's per-pair log-prob sums over every
    step of `batcher` (forward only), save it (rank 0) and return it on every rank."""
    ps = trainer.ps
    for m in trainer.models:
        m.eval()
    rows: list[np.ndarray] = []

    def step(model, mb: PackedBatch):
        out = packed_forward(model, mb)

        def loss_fn(hidden):
            pc, pr, nc, nr = pair_logps(model, hidden, mb, ps)
            vals = torch.stack([mb.pair_ids.double(), pc.double(), pr.double(), nc, nr], 1)
            return pc.sum() * 0, torch.tensor(1), {"rows": vals.cpu()}

        return out, loss_fn

    for s in range(batcher.total_steps):
        mbs = batcher.rank_microbatches(s)
        results = forward_backward(
            trainer.models,
            ps,
            mbs,
            step,
            seq_length=max(mb.num_tokens for mb in mbs),
            forward_only=True,
        )
        if ps.tp_rank == 0:
            rows += [r["rows"].numpy() for r in results]
    mine = np.concatenate(rows) if rows else np.zeros((0, 5))
    gathered: list = [None] * ps.world_size
    dist.all_gather_object(gathered, mine)
    allrows = np.concatenate([g for g in gathered if g is not None and len(g)])
    idx = allrows[:, 0].astype(np.int64)
    cache.put(idx, allrows[:, 1], allrows[:, 2], allrows[:, 3].astype(np.int64),
              allrows[:, 4].astype(np.int64))  # fmt: skip
    if ps.rank == 0:
        cache.save()
    if ps.world_size > 1:
        dist.barrier()
    logger.info("reference log-probs of %d pairs cached in %s", len(np.unique(idx)), cache.path)
    return cache


def load_pairs(run, paths) -> list:
    from nova_engine.data.tokenize import load_samples

    d = run.data
    pairs, _, _ = load_samples(
        paths, run.model.tokenizer_dir, "pairs", max_length=d.max_length,
        truncation=d.truncation, on_bad_line=d.on_bad_line, margin_key=d.margin_key,
    )  # fmt: skip
    return pairs


def run(run) -> list[dict[str, float]]:
    """The DPO stage from a DPORunConfig (all ranks); returns the per-step metrics."""
    from nova_engine.train.ref_cache import RefCacheKey
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
    pairs = load_pairs(run, run.data.train_paths)
    train_batches = step_batcher(run, ps, pairs, train=True)
    trainer, arch = trainer_for_run(run, ps, train_batches.total_steps)
    loss_cfg = run.loss.to_loss_config()

    def reference(pairs_, paths) -> RefCache | None:
        """The reference log-probs of `pairs_` (cached; computed now, before any update)."""
        if not run.loss.needs_reference:
            return None
        key = RefCacheKey.for_run(run, data_paths=paths)
        cache = RefCache.open(run.ref_cache_dir, key, expected=[p.index for p in pairs_])
        if cache.complete:
            logger.info("reference log-probs from the cache %s", cache.path)
            return cache
        return reference_pass(trainer, step_batcher(run, ps, pairs_, train=False), cache)

    stage = DPOStage(ps, loss_cfg, reference(pairs, run.data.train_paths))
    eval_fn = None
    if run.data.eval_paths:
        eval_pairs = load_pairs(run, run.data.eval_paths)
        eval_stage = DPOStage(ps, loss_cfg, reference(eval_pairs, run.data.eval_paths))
        ev = step_batcher(run, ps, eval_pairs, train=False)
        eval_fn = eval_over(trainer, eval_stage, ev)
    return train_stage(run, ps, trainer, arch, stage, train_batches, eval_fn)
