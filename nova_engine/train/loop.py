"""The one training loop of every stage, and the step batcher that feeds it.

The loop knows nothing of SFT, DPO, RM or RL. A `Stage` supplies, per optimizer step, this
DP rank's micro-batches, the per-rank count its loss is normalized by (loss tokens for SFT,
pairs for DPO; the loop sums it over DP), a `step_fn` for megatron's schedules and the
names of the metrics its loss_fn reports (as sums; the loop adds them over micro-batches and
ranks, then `stage.finalize_metrics` turns sums into means). So a stage whose batches come
from rollouts (RLVR) plugs in the same way as one reading a packed data set.

One step (`Trainer.train_step`):
    count   = all_reduce_DP(stage.local_count(mbs))        # the global normalizer G
    metrics = forward_backward(models, mbs, stage.step_fn(G))   # losses already / G
    ok, grad_norm = optimizer.step()                       # megatron: clip + Adam
    lr schedule step; metrics summed over the last stage's ranks

`StepBatcher` turns a sample list into steps: per epoch a seeded permutation of the samples
(the same on every rank and every layout), `global_batch_size` sequences per step, split
round-robin over DP ranks, each rank's share packed (first-fit decreasing) into micro-batches
of at most `micro_batch_tokens` tokens. A step's data depends only on (seed, step), so the
data position in a checkpoint is the step count and the batches do not depend on the layout:
per-step losses agree across TP/PP/DP up to fp32 summation order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from nova_engine.data.packing import PackedBatch, PackingPlan
from nova_engine.data.sample import PairSample
from nova_engine.logging import get_logger
from nova_engine.parallel.pipeline import StepFn, forward_backward
from nova_engine.parallel.state import ParallelState

logger = get_logger(__name__)


# ------------------------------------------------------------------------------ batching


class StepBatcher:
    """Steps of `global_batch_size` sequences (Samples or PairSamples) → this rank's packed
    micro-batches.

    Args:
        samples: the data set (Sample or PairSample list; index order = file order).
        global_batch_size: sequences (pairs) per optimizer step over all DP ranks.
        micro_batch_tokens: token capacity of one packed micro-batch.
        ps: the layout (dp size/rank; tp for padding; pp > 1 pads every micro-batch to
            exactly micro_batch_tokens, which the pipeline schedules need).
        seed, shuffle: per-epoch permutation seed / whether to shuffle at all.
        epochs, max_steps: the run length (max_steps wins when set; epochs then wrap).
    """

    def __init__(
        self,
        samples: Sequence[Any],
        *,
        global_batch_size: int,
        micro_batch_tokens: int,
        ps: ParallelState,
        seed: int = 1234,
        shuffle: bool = True,
        epochs: int = 1,
        max_steps: int | None = None,
        pad_id: int = 0,
    ):
        if not samples:
            raise ValueError("StepBatcher: no samples (empty data set after tokenization?)")
        self.samples = list(samples)
        self.gbs, self.mbt, self.ps = global_batch_size, micro_batch_tokens, ps
        self.seed, self.shuffle, self.pad_id = seed, shuffle, pad_id
        self.steps_per_epoch = math.ceil(len(self.samples) / global_batch_size)
        self.total_steps = max_steps or epochs * self.steps_per_epoch
        self.fixed_length = ps.pp > 1
        if micro_batch_tokens % ps.tp:
            raise ValueError(
                f"train.micro_batch_tokens={micro_batch_tokens} must be a multiple of tp={ps.tp}"
            )
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            n = len(self.samples)
            perm = np.arange(n)
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm = (epoch, perm)
        return self._perm[1]

    def step_samples(self, step: int) -> list[Any]:
        """The global batch of `step` (0-based), in order."""
        epoch, k = divmod(step, self.steps_per_epoch)
        ids = self._order(epoch)[k * self.gbs : (k + 1) * self.gbs]
        return [self.samples[int(i)] for i in ids]

    def pack(self, samples: Sequence[Any]) -> list[PackedBatch]:
        """Pack `samples` into micro-batches (at least one: an all-padding batch when empty)."""
        pad = {"pad_id": self.pad_id}
        if self.fixed_length:
            pad["pad_to_length"] = self.mbt
        else:
            pad["pad_to_multiple"] = self.ps.tp
        if not samples:
            empty = PackedBatch.from_samples([], pad_id=self.pad_id, pad_to_length=self.ps.tp * 8)
            if self.fixed_length:
                empty = PackedBatch.from_samples([], pad_id=self.pad_id, pad_to_length=self.mbt)
            if isinstance(self.samples[0], PairSample):
                empty.pair_ids = torch.zeros(0, dtype=torch.int64)
                empty.margins = torch.zeros(0)
            return [empty]
        plan = PackingPlan.from_samples(list(samples), self.mbt)
        return [plan.make_batch(list(samples), ids, **pad) for ids in plan.result.bins()]

    def rank_microbatches(self, step: int) -> list[PackedBatch]:
        """This DP rank's micro-batches of `step` (round-robin share of the global batch)."""
        mine = self.step_samples(step)[self.ps.dp_rank :: self.ps.dp]
        return [mb.to(self.ps.device) for mb in self.pack(mine)]


# ------------------------------------------------------------------------------ the stage


class Stage(Protocol):
    """What a stage gives the loop (see the module docstring)."""

    name: str
    metric_names: tuple[str, ...]

    def local_count(self, microbatches: Sequence[Any]) -> float:
        """This rank's contribution to the step's loss normalizer."""
        ...

    def step_fn(self, global_count: torch.Tensor) -> StepFn:
        """megatron step function; its loss_fn returns (loss / G, n, {name: sum})."""
        ...

    def finalize_metrics(self, sums: dict[str, float], global_count: float) -> dict[str, float]:
        """Metric sums over the whole step → the logged values."""
        ...


def real_tokens(microbatches: Sequence[PackedBatch]) -> int:
    return int(sum(int((mb.seq_index >= 0).sum()) for mb in microbatches))


# ------------------------------------------------------------------------------ the loop


@dataclass
class StepResult:
    metrics: dict[str, float]
    tokens: int
    seconds: float


@dataclass
class Trainer:
    """Runs steps of a stage over model chunks with megatron's schedules and optimizer.

    chunks: this rank's NovaGPTModel chunks (return_hidden is set here); models: the same
    chunks DDP-wrapped (`wrap_ddp`); optimizer: `optim.build_optimizer`; scheduler:
    `schedules.LRScheduler` (None in forward-only use).
    """

    ps: ParallelState
    chunks: list[torch.nn.Module]
    models: list[torch.nn.Module]
    optimizer: Any = None
    scheduler: Any = None
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for c in self.chunks:
            c.return_hidden = True

    # -- collectives ------------------------------------------------------------------

    def global_count(self, local: float, extra: float = 0.0) -> tuple[torch.Tensor, float]:
        """(sum over DP of `local` as a 0-dim fp64 tensor, sum over DP of `extra`)."""
        t = torch.tensor([float(local), float(extra)], dtype=torch.float64)
        if self.ps.dp > 1:
            dist.all_reduce(t, group=self.ps.dp_group)
        return t[0].to(self.ps.device), float(t[1])

    def _reduce_metrics(self, names: Sequence[str], results: list[dict]) -> dict[str, float]:
        """Sum each metric over micro-batches (last stage) and over DP replicas; every rank
        gets the values (one all_reduce over the world)."""
        sums = torch.zeros(len(names), dtype=torch.float64)
        if results and self.ps.tp_rank == 0:
            for r in results:
                for i, n in enumerate(names):
                    sums[i] += float(r[n])
        dist.all_reduce(sums)
        return {n: float(v) for n, v in zip(names, sums)}

    # -- one step ---------------------------------------------------------------------

    def run_microbatches(
        self, stage: Stage, microbatches: Sequence[PackedBatch], *, forward_only: bool = False
    ) -> tuple[dict[str, float], int]:
        """Forward (and backward) of one step's micro-batches; returns (metrics, tokens)."""
        count, tokens = self.global_count(
            stage.local_count(microbatches), real_tokens(microbatches)
        )
        if not forward_only:
            for m in self.models:
                m.zero_grad_buffer()
            self.optimizer.zero_grad()
        seq_length = max(mb.num_tokens for mb in microbatches)
        results = forward_backward(
            self.models,
            self.ps,
            list(microbatches),
            stage.step_fn(count),
            seq_length=seq_length,
            forward_only=forward_only,
        )
        sums = self._reduce_metrics(stage.metric_names, results)
        return stage.finalize_metrics(sums, float(count)), int(tokens)

    def train_step(self, stage: Stage, microbatches: Sequence[PackedBatch]) -> StepResult:
        t0 = time.perf_counter()
        for m in self.models:
            m.train()
        lr = self.scheduler.apply(self.optimizer)
        metrics, tokens = self.run_microbatches(stage, microbatches)
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            logger.warning("step %d: optimizer skipped the update (inf/nan gradients)", self.step)
        self.scheduler.step(self.optimizer)
        self.step += 1
        metrics = dict(metrics, lr=lr, grad_norm=float(grad_norm or 0.0))
        return StepResult(metrics, tokens, time.perf_counter() - t0)

    @torch.no_grad()
    def evaluate(self, stage: Stage, steps: Sequence[Sequence[PackedBatch]]) -> dict[str, float]:
        """Forward-only over eval steps (each a list of this rank's micro-batches); metrics
        are combined over all steps by summing the stage's sums and counts."""
        for m in self.models:
            m.eval()
        total: dict[str, float] = {}
        count = 0.0
        for mbs in steps:
            c, _ = self.global_count(stage.local_count(mbs))
            results = forward_backward(
                self.models,
                self.ps,
                list(mbs),
                stage.step_fn(torch.ones((), dtype=torch.float64)),  # sums, not means
                seq_length=max(mb.num_tokens for mb in mbs),
                forward_only=True,
            )
            for k, v in self._reduce_metrics(stage.metric_names, results).items():
                total[k] = total.get(k, 0.0) + v
            count += float(c)
        # losses came as sums (normalizer 1): finalize divides by the whole eval count
        return stage.finalize_metrics(_rescale_loss(total, count), count)

    # -- the run ----------------------------------------------------------------------

    def fit(
        self,
        stage: Stage,
        batcher: StepBatcher,
        *,
        metrics_logger: Any = None,
        log_every: int = 1,
        eval_every: int = 0,
        eval_fn: Callable[[], dict[str, float]] | None = None,
        save_every: int = 0,
        save_fn: Callable[[int], None] | None = None,
        stop_after: int | None = None,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
    ) -> list[dict[str, float]]:
        """Train from `self.step` to `batcher.total_steps` (or `stop_after` steps total);
        returns the per-step metrics of this call (also kept in `self.history`).
        flops_per_token / peak_flops (all ranks' summed peak): MFU in the logged metrics."""
        end = batcher.total_steps if stop_after is None else min(stop_after, batcher.total_steps)
        out = []
        tokens_since = 0
        while self.step < end:
            res = self.train_step(stage, batcher.rank_microbatches(self.step))
            tokens_since += res.tokens
            rec = dict(res.metrics, step=self.step)
            out.append(rec)
            self.history.append(rec)
            if metrics_logger is not None and (self.step % log_every == 0 or self.step == end):
                metrics_logger.log(
                    self.step, res.metrics, tokens=tokens_since,
                    flops_per_token=flops_per_token, peak_flops=peak_flops,
                )  # fmt: skip
                tokens_since = 0
            if eval_fn is not None and eval_every and self.step % eval_every == 0:
                ev = eval_fn()
                if metrics_logger is not None:
                    metrics_logger.log(self.step, ev, prefix="eval/")
            if save_fn is not None and save_every and self.step % save_every == 0:
                save_fn(self.step)
        return out


def _rescale_loss(total: dict[str, float], count: float) -> dict[str, float]:
    out = dict(total)
    if "loss" in out:
        out["loss"] = out["loss"] / max(count, 1.0)
    return out
