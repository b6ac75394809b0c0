"""The one training loop of every stage.

The loop knows nothing of SFT, DPO, RM or RL. It owns named `ModelEngine`s (a policy, a
frozen reference, a critic, a reward model ...) and a `DataSource`, counts data steps, and
runs a `Stage`:

    loop = Loop({"policy": policy}, data=PackedDataSource(samples, ...))
    loop.fit(SFTStage(...))                        # data steps until data.total_steps

Per data step the stage's `train_step(loop, batch)` decides what happens — SFT and DPO take
one optimizer step, PPO several epochs x mini-batches of updates on the policy and the
critic — through `loop.update(engine, microbatches, loss)`, one optimizer step:

    norms   = all_reduce_DP(loss.counts(mbs) + real tokens)   # ONE collective, on the device
    metrics = engine.forward_backward(mbs, loss.loss_fn(norms))   # losses already / norm
    ok, grad_norm, lr = engine.step()                          # megatron: clip + Adam; LR
    metrics summed over micro-batches and the last stage's ranks (one collective)

A `Loss` may also have `prepare(microbatches) -> microbatches`: host work of the whole step
done before the schedule (DPO attaches its cached reference log-probs, one copy to the
device), so the per-micro-batch forward/backward reads nothing back to the host. The line:
inside `engine.forward_backward` (megatron's schedule, once per micro-batch) no host read;
`counts`, `prepare` and the metric / stop-flag reductions run once per optimizer step.

A `Loss` names its per-rank normalizers (`counts`: loss tokens for SFT, pairs for DPO;
several at once for RL), returns megatron loss callbacks that divide by their global
values, and turns metric sums into logged values. Every tensor handed to a collective
lives on the engine's device (NCCL takes only CUDA tensors).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist

from nova_engine.logging import get_logger
from nova_engine.train.data_source import DataSource, PackedDataSource
from nova_engine.train.engine import LossFn, MicroBatch, ModelEngine
from nova_engine.train.safety import NonFiniteGuard, StopRequest, nonfinite_sample_ids

if TYPE_CHECKING:
    from nova_engine.train.metrics import MetricsLogger

logger = get_logger(__name__)

__all__ = ["Loop", "Loss", "Stage", "StepResult", "PackedDataSource"]


class Loss(Protocol):
    """A loss over packed micro-batches (see the module docstring)."""

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Metrics its loss_fn reports, as sums over the micro-batch."""
        ...

    @property
    def normalizer(self) -> str:
        """The count that divides the loss (a key of `counts`)."""
        ...

    def counts(self, microbatches: Sequence[MicroBatch]) -> dict[str, float]:
        """This rank's normalizers of the step (summed over DP by the loop)."""
        ...

    def loss_fn(self, norms: dict[str, torch.Tensor]) -> LossFn:
        """The engine callback: (model, hidden, mb) -> (loss / norm, count, {metric: sum})."""
        ...

    def finalize_metrics(self, sums: dict[str, float], norms: dict[str, float]) -> dict[str, float]:
        """Metric sums over the whole step (and the global norms) -> the logged values."""
        ...


class Stage(Protocol):
    """What a stage gives the loop: its name and one data step."""

    @property
    def name(self) -> str: ...

    def train_step(self, loop: Loop, batch: Any) -> dict[str, float]:
        """Train on one batch of the data source (any number of `loop.update` calls);
        returns the step's metrics."""
        ...


def _prepare(loss: Loss, microbatches: Sequence[MicroBatch]) -> Sequence[MicroBatch]:
    """The loss's per-step host work before the schedule (`prepare`, when it has one)."""
    prepare = getattr(loss, "prepare", None)
    return microbatches if prepare is None else prepare(microbatches)


def real_tokens(microbatches: Sequence[MicroBatch]) -> int:
    """Tokens of the samples, padding left out (the packer's host count: no device read)."""
    return sum(mb.num_real_tokens for mb in microbatches)


@dataclass
class StepResult:
    metrics: dict[str, float]
    tokens: int
    seconds: float


class Loop:
    """Named engines + a data source + the step count (see the module docstring).

    engines: name -> ModelEngine (a single engine is named "policy"); data: the DataSource
    `fit` reads (None when batches are passed to `train_step` directly)."""

    def __init__(
        self, engines: Mapping[str, ModelEngine] | ModelEngine, data: DataSource | None = None
    ):
        if isinstance(engines, ModelEngine):
            engines = {engines.name: engines}
        if not engines:
            raise ValueError("Loop: no engines")
        self.engines: dict[str, ModelEngine] = dict(engines)
        self.data = data
        self.step = 0
        self.history: list[dict[str, float]] = []
        self._tokens = 0
        self.guard = NonFiniteGuard()
        """Skips NaN/Inf updates and stops a diverged run (runner sets train.* thresholds)."""
        self.stop: StopRequest | None = None
        """Set by the runner: SIGINT/SIGTERM end `fit` at the next step boundary."""

    # -- engines -------------------------------------------------------------------------

    def engine(self, name: str | None = None) -> ModelEngine:
        """The engine `name` (None: the first one)."""
        if name is None:
            return next(iter(self.engines.values()))
        if name not in self.engines:
            raise KeyError(f"no engine {name!r}; this loop has {', '.join(self.engines)}")
        return self.engines[name]

    @property
    def trainable(self) -> dict[str, ModelEngine]:
        """The engines a checkpoint holds (those with an optimizer)."""
        return {n: e for n, e in self.engines.items() if e.optimizer is not None}

    # -- collectives (one each per update) -----------------------------------------------

    @staticmethod
    def reduce_counts(engine: ModelEngine, local: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """Every normalizer of a step summed over DP in ONE all_reduce (fp64, on the
        engine's device): name -> 0-dim tensor."""
        ps = engine.ps
        names = list(local)
        t = torch.tensor([float(local[n]) for n in names], dtype=torch.float64, device=ps.device)
        if ps.dp > 1:
            dist.all_reduce(t, group=ps.dp_group)
        return {n: t[i] for i, n in enumerate(names)}

    @staticmethod
    def reduce_metrics(
        engine: ModelEngine,
        names: Sequence[str],
        results: list[dict],
        extra: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """Each metric summed over micro-batches (last stage, TP rank 0) and DP replicas, in
        one all_reduce over the world on the engine's device; every rank gets the values.
        `extra`: per-rank 0-dim values summed over every rank in the same collective."""
        extra = dict(extra or {})
        sums = torch.zeros(len(names) + len(extra), dtype=torch.float64, device=engine.ps.device)
        if results and engine.ps.tp_rank == 0:
            for r in results:
                sums[: len(names)] += torch.stack([torch.as_tensor(r[n]).to(sums) for n in names])
        for i, v in enumerate(extra.values()):
            sums[len(names) + i] = v.to(sums)
        if dist.is_initialized() and engine.ps.world_size > 1:
            dist.all_reduce(sums, group=engine.ps.layout_group)
        return {n: float(v) for n, v in zip([*names, *extra], sums.tolist())}

    # -- one optimizer step / one evaluation pass ----------------------------------------

    def update(
        self,
        engine: ModelEngine | str,
        microbatches: Sequence[MicroBatch],
        loss: Loss,
        *,
        count_tokens: bool = True,
    ) -> dict[str, float]:
        """One optimizer step of `engine` on this rank's micro-batches; returns the loss's
        metrics with lr and grad_norm. Its real tokens (over DP) count in the step's
        tokens/s and MFU (`step_tokens`) unless count_tokens=False (e.g. a critic's update,
        next to the policy's on the same tokens)."""
        eng = self.engine(engine) if isinstance(engine, str) else engine
        eng.train()
        microbatches = _prepare(loss, microbatches)
        norms = self.reduce_counts(
            eng, {**loss.counts(microbatches), "_tokens": real_tokens(microbatches)}
        )
        tokens = int(norms.pop("_tokens"))
        if count_tokens:
            self._tokens += tokens
        results = eng.forward_backward(microbatches, loss.loss_fn(norms))
        bad = {"_nonfinite_grads": (~eng.local_grads_finite()).to(torch.float64)}
        sums = self.reduce_metrics(eng, loss.metric_names, results, extra=bad)
        bad_grads = sums.pop("_nonfinite_grads") > 0
        bad_metrics = [k for k, v in sums.items() if not math.isfinite(v)]
        floats = {k: float(v) for k, v in norms.items()}
        if bad_grads or bad_metrics:  # never apply a NaN/Inf update
            lr = eng.skip_step()
            why = "non-finite " + ("gradients" if bad_grads else ", ".join(bad_metrics))
            self.guard.skip(
                self.step + 1, why, nonfinite_sample_ids(loss.metric_names, microbatches, results)
            )
            return dict(loss.finalize_metrics(sums, floats), lr=lr, grad_norm=float("nan"),
                        skipped=1.0)  # fmt: skip
        ok, grad_norm, lr = eng.step()
        if not ok:
            logger.warning("step %d: optimizer skipped the update (inf/nan gradients)", self.step)
        out = dict(loss.finalize_metrics(sums, floats), lr=lr, grad_norm=grad_norm)
        self.guard.ok(self.step + 1, out.get("loss"), grad_norm)
        return out

    @torch.no_grad()
    def evaluate(
        self, loss: Loss, steps: Sequence[Sequence[MicroBatch]], engine: str | None = None
    ) -> dict[str, float]:
        """Forward-only over eval steps (each a list of this rank's micro-batches); metrics
        combine over all steps by summing the loss's sums and normalizers."""
        eng = self.engine(engine)
        eng.train(False)
        total: dict[str, float] = {}
        counts: dict[str, float] = {}
        for mbs in steps:
            mbs = _prepare(loss, mbs)
            norms = self.reduce_counts(eng, loss.counts(mbs))
            ones = {k: torch.ones_like(v) for k, v in norms.items()}  # sums, not means
            results = eng.forward_backward(mbs, loss.loss_fn(ones), forward_only=True)
            for k, v in self.reduce_metrics(eng, loss.metric_names, results).items():
                total[k] = total.get(k, 0.0) + v
            for k, n in norms.items():
                counts[k] = counts.get(k, 0.0) + float(n)
        if "loss" in total:  # losses came as sums: the mean over the whole eval set
            total["loss"] /= max(counts.get(loss.normalizer, 1.0), 1.0)
        return loss.finalize_metrics(total, counts)

    @property
    def step_tokens(self) -> int:
        """Real tokens (over DP) of the counted updates of the current step so far."""
        return self._tokens

    # -- the run -------------------------------------------------------------------------

    def train_step(self, stage: Stage, batch: Any) -> StepResult:
        """One data step of `stage` on `batch` (this rank's share)."""
        t0 = time.perf_counter()
        self._tokens = 0
        metrics = stage.train_step(self, batch)
        self.step += 1
        return StepResult(metrics, self._tokens, time.perf_counter() - t0)

    def fit(
        self,
        stage: Stage,
        *,
        metrics_logger: MetricsLogger | None = None,
        log_every: int = 1,
        eval_every: int = 0,
        eval_fn: Callable[[], dict[str, float]] | None = None,
        save_every: int = 0,
        save_fn: Callable[[int], None] | None = None,
        stop_after: int | None = None,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
    ) -> list[dict[str, float]]:
        """Train from `self.step` to `data.total_steps` (or `stop_after` steps in all);
        returns the per-step metrics of this call (also kept in `self.history`).
        flops_per_token / peak_flops (all ranks' summed peak): MFU in the logged metrics."""
        if self.data is None:
            raise ValueError("Loop.fit needs a data source (Loop(engines, data=...))")
        total = self.data.total_steps
        end = total if stop_after is None else min(stop_after, total)
        if self.data.position != self.step:
            raise RuntimeError(
                f"data source at step {self.data.position}, loop at {self.step}: restore "
                "both from one checkpoint (nova_engine.train.checkpoint.load_checkpoint)"
            )
        out = []
        tokens_since = 0
        while self.step < end:
            res = self.train_step(stage, self.data.next_batch())
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
            if self.stop_requested():
                break
        return out

    def stop_requested(self) -> bool:
        """True on every rank once any rank got SIGINT/SIGTERM (one scalar all_reduce per
        step, so all ranks stop at the same step boundary)."""
        if self.stop is None:
            return False
        ps = self.engine().ps
        flag = torch.tensor(float(self.stop.signum or 0), device=ps.device)
        if dist.is_initialized() and ps.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ps.layout_group)
        if flag.item() and self.stop.signum is None:
            self.stop.signum = int(flag.item())
        return bool(flag.item())
