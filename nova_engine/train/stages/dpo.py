"""DPO stage: the DPO family of nova_engine.losses.dpo on packed (chosen, rejected) pairs,
against reference log-probs computed once by the same engine and cached on disk.

    torchrun --nproc_per_node 8 -m nova_engine.train dpo --recipe recipes/llama3_8b.yaml
    nova dpo --recipe recipes/tiny_cpu.yaml loss.loss_type=sigmoid loss.beta=0.1

1. Reference pass (`reference_pass`): `engine.forward_collect` over every pair with the
   initial weights (model.hf_path), per-sequence log-prob sums over the response tokens,
   stored in the `RefCache` keyed by (model, data, config) fingerprints. A later run with the
   same key reuses it; any change of model, data or tokenization settings makes a new one.
2. Training: no reference model in memory; before the step's schedule `prepare` looks the
   pairs of all its micro-batches up in the cache on the host and attaches them as device
   tensors (one copy), so the per-micro-batch loss reads nothing back (no stream sync).
   Per-pair losses are reduced over the step's global pair count (`reduce_pairs`); metrics:
   loss, accuracy (r_c > r_r), chosen/rejected implicit rewards and their margin.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nova_engine.config import ConfigError, RunConfig, check
from nova_engine.data.packing import PackedBatch, attach_extra
from nova_engine.logging import get_logger
from nova_engine.losses.dpo import (
    DPO_LOSSES,
    DPOConfig,
    PreferenceLogps,
    dpo_loss,
    reduce_pairs,
)
from nova_engine.model.heads import _tp_args, lm_head_weight
from nova_engine.parallel.state import ParallelState
from nova_engine.train.collect import collect_rows
from nova_engine.train.ref_cache import RefCache
from nova_kernels import linear_pair_logprobs

if TYPE_CHECKING:
    from nova_engine.data.sample import PairSample
    from nova_engine.train.data_source import PackedDataSource
    from nova_engine.train.engine import LossFn, ModelEngine
    from nova_engine.train.loop import Loop

logger = get_logger(__name__)


# ------------------------------------------------------------------------------ config


@dataclass
class DPOLossSection(DPOConfig):
    """The recipe's `loss:` section: the DPO family's hyperparameters (fields, defaults and
    meaning in nova_engine.losses.dpo.DPOConfig, defined once there) plus where the
    reference log-probs are cached. Errors name the recipe key."""

    ref_cache_dir: str | None = None
    """Where reference log-probs are cached (default: <train.out_dir>/ref_cache)."""

    def __post_init__(self) -> None:
        t, eps, names = self.loss_type, self.label_smoothing, ", ".join(DPO_LOSSES)
        check(t in DPO_LOSSES, "loss_type", f"expected one of {names}, got {t!r}")
        check(self.beta > 0, "beta", f"expected > 0, got {self.beta}")
        check(0 <= eps < 0.5, "label_smoothing", f"expected in [0, 0.5), got {eps}")
        check(t != "cdpo" or eps > 0, "label_smoothing", "cdpo needs a value in (0, 0.5)")
        check(t not in ("ipo", "hinge") or eps == 0, "label_smoothing", f"{t} takes none")
        try:
            super().__post_init__()
        except ValueError as e:  # the loss's own rules (e.g. cdpo needs label smoothing)
            raise ConfigError("label_smoothing", str(e).removeprefix("DPOConfig: ")) from None

    @property
    def needs_reference(self) -> bool:
        return self.loss_type != "simpo"


@dataclass
class DPORunConfig(RunConfig):
    loss: DPOLossSection = field(default_factory=DPOLossSection)

    stage: typing.ClassVar[str] = "dpo"
    data_format: typing.ClassVar[str] = "pairs"

    @property
    def ref_cache_dir(self) -> str:
        return self.loss.ref_cache_dir or os.path.join(self.train.out_dir, "ref_cache")

    def ref_config(self) -> dict[str, Any]:
        """The settings that change reference log-probs (beyond model and data content):
        tokenization and numeric precision. Hash it into the reference-cache key."""
        keys = ("max_length", "truncation", "on_bad_line", "margin_key", "template")
        out = {k: getattr(self.data, k) for k in keys}
        out["tokenizer_dir"] = os.path.abspath(self.model.tokenizer_dir)
        return out | {"precision": self.train.precision}


CONFIG = DPORunConfig


# ------------------------------------------------------------------------------ the stage


def pair_logps(model, hidden, mb: PackedBatch, ps: ParallelState):
    """(chosen sums, rejected sums, chosen counts, rejected counts), each [P], from the last
    stage's hidden states of a pairs-mode micro-batch."""
    # scored by the fused head the training loss uses (score-only: no gradients), so at
    # step 1 the policy's sums equal the cached reference sums exactly
    _, sums, counts = linear_pair_logprobs(
        hidden.reshape(-1, hidden.shape[-1]),
        lm_head_weight(model),
        mb.labels,
        mb.cu_seqlens,
        mb.loss_mask,
        None,
        num_sequences=mb.num_samples,
        cu_seqlens_host=mb.cu_seqlens_host,
        seq_index=mb.seq_index,
        **_tp_args(ps),
    )
    return sums[0::2], sums[1::2], counts[0::2], counts[1::2]


def _pair_ids(mb: PackedBatch) -> torch.Tensor:
    """[P] PairSample.index of a pairs-mode micro-batch."""
    if mb.pair_ids is None:
        raise ValueError("DPO needs pairs-mode micro-batches (PackedBatch.pair_ids is None)")
    return mb.pair_ids


class DPOStage:
    """Loss and stage for the loop (nova_engine.train.loop.Loss / Stage)."""

    name = "dpo"
    engine = "policy"
    metric_names = ("loss", "pairs", "accuracy", "chosen_reward", "rejected_reward", "margin")
    normalizer = "pairs"

    def __init__(self, ps: ParallelState, loss_config: DPOConfig, ref: RefCache | None):
        self.ps, self.cfg, self.ref = ps, loss_config, ref

    def counts(self, microbatches: Sequence[PackedBatch]) -> dict[str, float]:
        for mb in microbatches:
            _pair_ids(mb)  # pairs mode, or a clear error
        return {"pairs": float(sum(mb.num_pairs for mb in microbatches))}  # host counts

    def prepare(self, microbatches: Sequence[PackedBatch]) -> list[PackedBatch]:
        """The step's micro-batches with their reference log-prob sums attached
        (`extra["ref_logps"]` [P, 2] fp32 (chosen, rejected) on the device): one host lookup
        of all pairs (`pair_ids_host`) and one host-to-device copy for the whole step, before
        the schedule. Unchanged without a reference (a reference-free loss)."""
        mbs = list(microbatches)
        if self.ref is None:
            return mbs
        ids = []
        for mb in mbs:
            _pair_ids(mb)
            assert mb.pair_ids_host is not None  # set with pair_ids (PackedBatch)
            ids.append(mb.pair_ids_host)
        c, r, _, _ = self.ref.lookup(np.concatenate(ids) if ids else np.zeros(0, np.int64))
        both = np.stack([c, r], 1).astype(np.float32)  # [sum P, 2], as the loss reads them
        parts = np.split(both, np.cumsum([len(i) for i in ids])[:-1])
        return attach_extra(mbs, "ref_logps", parts, self.ps.device)

    def _ref(self, mb: PackedBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(chosen, rejected) [P] reference log-prob sums of the batch's pairs, attached by
        `prepare` (None: no reference, a reference-free loss)."""
        if self.ref is None:
            return None
        ref = mb.extra.get("ref_logps")
        if ref is None:
            raise ValueError(
                "DPO: micro-batch without reference log-probs: pass the step's micro-batches "
                "through DPOStage.prepare before the schedule (Loop.update does)"
            )
        return ref[:, 0], ref[:, 1]

    def loss_fn(self, norms: dict[str, torch.Tensor]) -> LossFn:
        ps, cfg, global_count = self.ps, self.cfg, norms["pairs"]

        def loss_fn(model, hidden, mb: PackedBatch):
            ref = self._ref(mb)
            ref_c, ref_r = (None, None) if ref is None else ref

            def pair_loss(lp, n, first):  # whole pairs first//2 ...: sum of their losses / P
                a, b = first // 2, (first + len(lp)) // 2
                refs = (None, None) if ref is None else (ref[0][a:b], ref[1][a:b])
                p = PreferenceLogps(lp[0::2], lp[1::2], n[0::2], n[1::2], *refs)
                return reduce_pairs(dpo_loss(p, cfg).losses, global_count)

            # the fused 3-GEMM head: each pair's loss gradient formed in the forward pass
            loss, lp, n = linear_pair_logprobs(
                hidden.reshape(-1, hidden.shape[-1]),
                lm_head_weight(model),
                mb.labels,
                mb.cu_seqlens,
                mb.loss_mask,
                pair_loss,
                num_sequences=mb.num_samples,
                cu_seqlens_host=mb.cu_seqlens_host,  # the packer's host facts: no read-back
                seq_index=mb.seq_index,
                **_tp_args(ps),
            )
            pc, pr, nc, nr = lp[0::2], lp[1::2], n[0::2], n[1::2]
            o = dpo_loss(PreferenceLogps(pc, pr, nc, nr, ref_c, ref_r), cfg)  # metrics
            p = mb.num_pairs  # a host count (no host-to-device copy)
            metrics = {
                "loss": loss.detach(),
                "pairs": p,
                "accuracy": o.accuracy.sum(),
                "chosen_reward": o.chosen_rewards.sum(),
                "rejected_reward": o.rejected_rewards.sum(),
                "margin": o.margin.sum(),
            }
            return loss, p, metrics

        return loss_fn

    def finalize_metrics(self, sums: dict[str, float], norms: dict[str, float]) -> dict:
        n = max(sums["pairs"], 1.0)
        out = {"loss": sums["loss"]}
        for k in ("accuracy", "chosen_reward", "rejected_reward", "margin"):
            out[k] = sums[k] / n
        return out

    def train_step(self, loop: Loop, batch: list[PackedBatch]) -> dict[str, float]:
        return loop.update(self.engine, batch, self)


def reference_pass(engine: ModelEngine, source: PackedDataSource, cache: RefCache) -> RefCache:
    """Fill `cache` with `engine`'s per-pair log-prob sums over every step of `source` (a
    PackedDataSource; forward only), save it (rank 0) and return it on every rank."""
    ps = engine.ps

    def rows(model, hidden, mb: PackedBatch):
        pc, pr, nc, nr = pair_logps(model, hidden, mb, ps)
        return torch.stack([_pair_ids(mb).to(pc).double(), pc.double(), pr.double(), nc, nr], 1)

    # LoRA (model.lora): the reference is the base model, adapters off on the same engine
    allrows = collect_rows(engine, source, rows, width=5, context=engine.adapters_disabled)
    idx = allrows[:, 0].astype(np.int64)
    cache.put(
        idx,
        allrows[:, 1],
        allrows[:, 2],
        allrows[:, 3].astype(np.int64),
        allrows[:, 4].astype(np.int64),
    )
    if ps.rank == ps.first_rank:
        cache.save()
    ps.barrier()
    logger.info("reference log-probs of %d pairs cached in %s", len(np.unique(idx)), cache.path)
    return cache


def load_pairs(run: RunConfig, paths: Sequence[str]) -> list[PairSample]:
    from nova_engine.data.tokenize import load_samples

    d = run.data
    pairs, _, _ = load_samples(
        paths,
        run.tokenizer(),
        "pairs",
        max_length=d.max_length,
        truncation=d.truncation,
        on_bad_line=d.on_bad_line,
        margin_key=d.margin_key,
    )
    return pairs


def run(run: DPORunConfig) -> list[dict[str, float]]:
    """The DPO stage from a DPORunConfig (all ranks); returns the per-step metrics."""
    from nova_engine.train import runner
    from nova_engine.train.ref_cache import RefCacheKey

    ps = runner.setup_parallel(run)
    runner.ensure_model(run, ps)
    pairs = load_pairs(run, run.data.train_paths)
    data = runner.data_source(run, ps, pairs, train=True)
    loop = runner.loop_for_run(run, ps, data)
    policy = loop.engine("policy")

    def reference(pairs_, paths) -> RefCache | None:
        """The reference log-probs of `pairs_` (cached; computed now, before any update)."""
        if not run.loss.needs_reference:
            return None
        key = RefCacheKey.for_run(run, data_paths=paths)
        cache = RefCache.open(run.ref_cache_dir, key, expected=[p.index for p in pairs_])
        if cache.complete:
            logger.info("reference log-probs from the cache %s", cache.path)
            return cache
        return reference_pass(policy, runner.data_source(run, ps, pairs_, train=False), cache)

    stage = DPOStage(ps, run.loss, reference(pairs, run.data.train_paths))
    eval_fn = None
    if run.data.eval_paths:
        eval_pairs = load_pairs(run, run.data.eval_paths)
        eval_stage = DPOStage(ps, run.loss, reference(eval_pairs, run.data.eval_paths))
        ev = runner.data_source(run, ps, eval_pairs, train=False)
        eval_fn = runner.eval_over(loop, eval_stage, ev)
    return runner.train_stage(run, loop, stage, eval_fn)
