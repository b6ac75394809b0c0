"""Reward-model stage: a K-output score head on the last token of every packed sequence,
trained by Bradley–Terry (bt, margin_bt, scaled_bt) on pairs or by regression on attribute
scores (nova_engine.losses.reward), exported as Llama/Qwen2ForSequenceClassification.

    torchrun --nproc_per_node 8 -m nova_engine.train rm --recipe recipes/llama3_8b.yaml
    nova rm --recipe recipes/tiny_cpu.yaml loss.loss_type=regression data.train_paths=[hs2.jsonl]
    nova rm --recipe recipes/tiny_cpu.yaml loss.loss_type=scaled_bt model.init_from=rm_reg/hf

The HelpSteer2-Preference chain (Wang et al. 2024, Nemotron-70B-Reward): regression on
HelpSteer2 (K = 5 attributes), then Scaled BT on HelpSteer2-Preference initialized from it:
`model.init_from` names the regression export, and its head's `loss.reward_attribute` row
(helpfulness) seeds the one-output BT head (`regression_then_bt` runs both).

- Model: `model.hf_path` gives the architecture and tokenizer; the weights come from
  `model.init_from` (default hf_path): a *ForCausalLM (decoder; the head gets a seeded init)
  or a *ForSequenceClassification (decoder and `score.weight`, rows picked by output name).
- Data: regression reads the HelpSteer2 layout (`loss.attributes`, missing scores masked);
  the BT losses read HelpSteer2-Preference and/or Tülu 3 pairs (ties dropped and counted),
  packed as pairs like DPO's. The margin m of a pair is |preference_strength| (or the Tülu
  record's `data.margin_key`, default 1).
- Step loss: per-pair (per-response) losses summed and divided by the step's global count of
  pairs (of present attribute scores), reduced once over DP by the loop.
- Metrics: loss, accuracy (r_c > r_r), margin, chosen/rejected reward (pairs); loss and
  mse/<attribute> (regression). Held-out `data.eval_paths` in RewardBench's layout (prompt,
  chosen, rejected, subset): accuracy, per-subset accuracy, section scores and the
  RewardBench score when every section is present (nova_engine.eval.rewardbench); a
  regression model is compared through its `loss.reward_attribute` output.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nova_engine.config import ConfigError, ModelConfig, RunConfig, check
from nova_engine.data.packing import PackedBatch, attach_extra
from nova_engine.data.reward import HELPSTEER2_ATTRIBUTES
from nova_engine.logging import get_logger
from nova_engine.losses.dpo import reduce_pairs
from nova_engine.losses.reward import (
    REWARD_LOSS_TYPES,
    RewardLossConfig,
    attribute_weights,
    pairwise_loss,
    regression_loss,
    scalar_reward,
)
from nova_engine.model.heads import sequence_scores
from nova_engine.parallel.state import ParallelState
from nova_engine.train.collect import collect_rows
from nova_engine.train.engine import ModelEngine, RewardEngine

if TYPE_CHECKING:
    from nova_engine.train.data_source import PackedDataSource
    from nova_engine.train.engine import LossFn
    from nova_engine.train.loop import Loop

logger = get_logger(__name__)

BT_LABELS = ("reward",)  # id2label of a one-output (Bradley–Terry) export


# ------------------------------------------------------------------------------ config


@dataclass
class RMModelSection(ModelConfig):
    """The recipe's `model:` section for a reward model."""

    init_from: str | None = None
    """HF directory whose weights start the reward model (default: hf_path); a
    *ForSequenceClassification brings its score head too (e.g. a regression model's)."""


@dataclass
class RMLossSection:
    """The recipe's `loss:` section for the rm stage (errors name the recipe key)."""

    loss_type: str = "bt"
    """bt, margin_bt, scaled_bt (pairs, one output) or regression (attribute scores)."""
    center_rewards_coefficient: float = 0.0
    """c >= 0: + c (r_c + r_r)^2 per pair (TRL's reward centering); pairwise losses only."""
    attributes: list[str] = field(default_factory=lambda: list(HELPSTEER2_ATTRIBUTES))
    """Regression: the attribute keys of the data, one head output each, in this order."""
    score_range: tuple[float, float] = (0.0, 4.0)
    """Regression: the valid attribute score range (HelpSteer2: 0..4)."""
    reward_attribute: str = "helpfulness"
    """The output that serves as THE reward of a multi-output head: it ranks held-out pairs
    and seeds a one-output head initialized from a regression model."""

    def __post_init__(self) -> None:
        t, c = self.loss_type, self.center_rewards_coefficient
        names = ", ".join(REWARD_LOSS_TYPES)
        check(t in REWARD_LOSS_TYPES, "loss_type", f"expected one of {names}, got {t!r}")
        check(c >= 0, "center_rewards_coefficient", f"expected >= 0, got {c}")
        check(t != "regression" or c == 0, "center_rewards_coefficient", "pairwise losses only")
        a = self.attributes
        check(bool(a) and len(set(a)) == len(a), "attributes", "expected distinct names")
        lo, hi = self.score_range
        check(lo < hi, "score_range", f"expected [low, high] with low < high, got {[lo, hi]}")
        check(
            t != "regression" or self.reward_attribute in a,
            "reward_attribute",
            f"{self.reward_attribute!r} is not one of attributes {a}",
        )

    def to_loss_config(self) -> RewardLossConfig:
        return RewardLossConfig(self.loss_type, self.center_rewards_coefficient)

    @property
    def pairwise(self) -> bool:
        return self.loss_type != "regression"

    @property
    def labels(self) -> tuple[str, ...]:
        """Names of the head's outputs."""
        return BT_LABELS if self.pairwise else tuple(self.attributes)


@dataclass
class RMRunConfig(RunConfig):
    model: RMModelSection
    loss: RMLossSection = field(default_factory=RMLossSection)

    stage: typing.ClassVar[str] = "rm"
    data_format: typing.ClassVar[str] = "pairs"  # held-out pairs need a pair's room

    def __post_init__(self) -> None:
        check(self.data.format == "auto", "data.format",
              'the rm stage reads its layouts by loss.loss_type: expected "auto"')  # fmt: skip
        need = self.data.max_length * 2
        check(
            self.train.micro_batch_tokens >= need,
            "train.micro_batch_tokens",
            f"{self.train.micro_batch_tokens} cannot hold one pair of up to {need} tokens "
            f"(data.max_length={self.data.max_length})",
        )

    @property
    def weights_dir(self) -> str:
        return self.model.init_from or self.model.hf_path


CONFIG = RMRunConfig


# ------------------------------------------------------------------------------ the engine


def head_rows(init_labels: Sequence[str] | None, loss: RMLossSection) -> list[int] | None:
    """Rows of the init checkpoint's head for this run's head: by output name when the names
    are there (regression -> BT: the reward_attribute row), all rows when the sizes agree,
    None (fresh head) for a *ForCausalLM. ConfigError otherwise."""
    if init_labels is None:
        return None
    want = [loss.reward_attribute] if loss.pairwise else list(loss.attributes)
    if len(init_labels) == len(want) and (loss.pairwise or list(init_labels) == want):
        return None
    if all(w in init_labels for w in want):
        return [list(init_labels).index(w) for w in want]
    raise ConfigError(
        "model.init_from",
        f"its head's outputs {list(init_labels)} do not provide {want} for a {loss.loss_type} head",
    )


# ------------------------------------------------------------------------------ the stage


class RMStage:
    """Loss and stage for the loop (nova_engine.train.loop.Loss / Stage). Regression needs
    `targets` (AttributeSet.targets: [records, K], NaN = missing, row = Sample.index)."""

    name = "rm"
    engine = "reward"

    def __init__(self, ps: ParallelState, loss: RMLossSection, targets: np.ndarray | None = None):
        self.ps, self.loss, self.cfg = ps, loss, loss.to_loss_config()
        self.targets = targets
        if loss.pairwise:
            self.normalizer = "pairs"
            self.metric_names: tuple[str, ...] = (
                "loss", "pairs", "accuracy", "margin", "chosen_reward", "rejected_reward",
            )  # fmt: skip
        else:
            if targets is None:
                raise ValueError("RMStage: regression needs the targets")
            self.normalizer = "scores"
            attrs = loss.attributes
            self.metric_names = ("loss", "sequences", "scores",
                                 *[f"sq_err/{a}" for a in attrs], *[f"n/{a}" for a in attrs])  # fmt: skip

    def _targets(self, mb: PackedBatch) -> np.ndarray:
        """[N, K] attribute targets of the batch's samples (NaN = missing), on the host."""
        assert self.targets is not None and mb.sample_ids_host is not None
        return self.targets[mb.sample_ids_host[: mb.num_samples]]

    def counts(self, microbatches: Sequence[PackedBatch]) -> dict[str, float]:
        if self.loss.pairwise:
            return {"pairs": float(sum(mb.num_samples // 2 for mb in microbatches))}
        return {"scores": float(sum(int((~np.isnan(self._targets(mb))).sum())
                                    for mb in microbatches))}  # fmt: skip

    def prepare(self, microbatches: Sequence[PackedBatch]) -> list[PackedBatch]:
        """Regression: the step's micro-batches with their targets attached
        (`extra["targets"]` [N, K] on the device), looked up on the host and copied in one
        transfer before the schedule, so the loss reads nothing back."""
        mbs = list(microbatches)
        if self.loss.pairwise:
            return mbs
        return attach_extra(mbs, "targets", [self._targets(mb) for mb in mbs], self.ps.device)

    def loss_fn(self, norms: dict[str, torch.Tensor]) -> LossFn:
        ps, cfg, g = self.ps, self.cfg, norms[self.normalizer]

        def pairwise(model, hidden, mb: PackedBatch):
            r = sequence_scores(model, hidden, mb, ps)[:, 0]
            rc, rr = r[0::2], r[1::2]
            m = None if mb.margins is None else mb.margins.to(rc.device)
            o = pairwise_loss(rc, rr, m, cfg)
            loss = reduce_pairs(o.losses, g)
            p = mb.num_samples // 2  # a host count (no host-to-device copy)
            metrics = {
                "loss": loss.detach(), "pairs": p, "accuracy": o.accuracy.sum(),
                "margin": o.margin.sum(), "chosen_reward": rc.detach().sum(),
                "rejected_reward": rr.detach().sum(),
            }  # fmt: skip
            return loss, p, metrics

        def regression(model, hidden, mb: PackedBatch):
            s_NK = sequence_scores(model, hidden, mb, ps)
            targets = mb.extra.get("targets")
            if targets is None:
                raise ValueError("RMStage: regression micro-batch without targets: pass the "
                                 "step's micro-batches through RMStage.prepare (Loop.update "
                                 "does)")  # fmt: skip
            o = regression_loss(s_NK, targets)
            loss = reduce_pairs(o.losses, g)
            n = o.mask.sum().long()
            metrics = {"loss": loss.detach(), "sequences": mb.num_samples, "scores": n}
            for k, a in enumerate(self.loss.attributes):
                metrics[f"sq_err/{a}"] = o.sq_err[:, k].sum()
                metrics[f"n/{a}"] = o.mask[:, k].sum()
            return loss, n, metrics

        return pairwise if self.loss.pairwise else regression

    def finalize_metrics(self, sums: dict[str, float], norms: dict[str, float]) -> dict:
        out = {"loss": sums["loss"]}
        if self.loss.pairwise:
            n = max(sums["pairs"], 1.0)
            for k in ("accuracy", "margin", "chosen_reward", "rejected_reward"):
                out[k] = sums[k] / n
            return out
        for a in self.loss.attributes:
            if sums[f"n/{a}"]:
                out[f"mse/{a}"] = sums[f"sq_err/{a}"] / sums[f"n/{a}"]
        return out

    def train_step(self, loop: Loop, batch: list[PackedBatch]) -> dict[str, float]:
        return loop.update(self.engine, batch, self)


# ------------------------------------------------------------------------------ evaluation


def pair_rewards(
    engine: ModelEngine, source: PackedDataSource, weights: Sequence[float]
) -> dict[int, tuple[float, float]]:
    """{pair index: (r_chosen, r_rejected)} over every step of `source` (pairs; forward
    only), gathered on every rank. The reward of a K-output head is sum_k weights[k] s_k."""
    ps = engine.ps

    def rows(model, hidden, mb: PackedBatch):
        r = scalar_reward(sequence_scores(model, hidden, mb, ps), weights).double()
        assert mb.pair_ids is not None, "held-out data must be pairs"
        return torch.stack([mb.pair_ids.to(r), r[0::2], r[1::2]], 1)  # read back after the pass

    return {int(i): (c, r) for i, c, r in collect_rows(engine, source, rows, width=3)}


def rewardbench_eval(
    engine: ModelEngine,
    source: PackedDataSource,
    subsets: dict[int, str],
    weights: Sequence[float],
) -> Callable[[], dict[str, float]]:
    """An eval_fn: RewardBench metrics (nova_engine.eval.rewardbench) of the held-out pairs."""
    from nova_engine.eval.rewardbench import score_comparisons

    def evaluate() -> dict[str, float]:
        got = pair_rewards(engine, source, weights)
        ids = sorted(got)
        scores = score_comparisons(
            [subsets[i] for i in ids], [got[i][0] for i in ids], [got[i][1] for i in ids]
        )
        margin = float(np.mean([got[i][0] - got[i][1] for i in ids])) if ids else 0.0
        return scores.metrics() | {"margin": margin}

    return evaluate


# ------------------------------------------------------------------------------ data and run


def load_train_data(run: RMRunConfig):
    """(samples or pairs, regression targets or None) of data.train_paths."""
    from nova_engine.data.reward import (
        read_attribute_jsonl,
        read_reward_pairs,
        tokenize_attributes,
    )
    from nova_engine.data.tokenize import tokenize_pairs

    d, loss, tok = run.data, run.loss, run.tokenizer()
    if loss.pairwise:
        recs, stats = read_reward_pairs(d.train_paths, on_bad_line=d.on_bad_line,
                                        margin_key=d.margin_key)  # fmt: skip
        if stats.ties:
            logger.info("rm data: %d ties dropped (preference_strength 0)", stats.ties)
        pairs, _ = tokenize_pairs(recs, tok, max_length=d.max_length, truncation=d.truncation)
        return pairs, None
    arecs, _ = read_attribute_jsonl(d.train_paths, attributes=loss.attributes,
                                    score_range=loss.score_range, on_bad_line=d.on_bad_line)  # fmt: skip
    ds, _ = tokenize_attributes(
        arecs, tok, loss.attributes, max_length=d.max_length, truncation=d.truncation
    )
    return ds.samples, ds.targets


def load_eval_data(run: RMRunConfig):
    """(pairs, {pair index: subset}) of data.eval_paths (RewardBench layout)."""
    from nova_engine.data.reward import read_rewardbench, tokenize_rewardbench

    d = run.data
    recs, _ = read_rewardbench(d.eval_paths, on_bad_line=d.on_bad_line)
    if d.eval_max_samples is not None:
        recs = recs[: d.eval_max_samples]
    pairs, subsets, _ = tokenize_rewardbench(
        recs, run.tokenizer(), max_length=d.max_length, truncation=d.truncation
    )
    return pairs, subsets


def _last_tokens(data) -> set[int]:
    seqs = [h for p in data for h in (p.chosen, p.rejected)] if hasattr(data[0], "chosen") else data
    return {int(s.tokens[-1]) for s in seqs if len(s)}


def build_engine(run: RMRunConfig, ps: ParallelState, total_steps: int, data) -> RewardEngine:
    """The reward engine of `run`: arch of hf_path, weights (and head rows) of init_from."""
    from nova_engine.data.tokenize import load_tokenizer
    from nova_engine.model.arch import load_arch
    from nova_engine.model.hf_io import choose_pad_token_id, score_labels

    arch, src = load_arch(run.model.hf_path), run.weights_dir
    if src != run.model.hf_path:
        other = load_arch(src)
        if other.to_dict() | {"torch_dtype": ""} != arch.to_dict() | {"torch_dtype": ""}:
            raise ConfigError("model.init_from", f"{src} is not a {run.model.hf_path} model")
    pad = choose_pad_token_id(load_tokenizer(run.model.tokenizer_dir), _last_tokens(data))
    t = run.train
    return RewardEngine(
        arch, ps, labels=run.loss.labels, pad_token_id=pad,
        score_rows=head_rows(score_labels(src), run.loss), name="reward",
        weights_dir=src, optim=run.optim, total_steps=total_steps, precision=t.precision,
        recompute=t.recompute, distributed_optimizer=run.parallel.distributed_optimizer,
        fuse_elementwise=t.fuse_elementwise, score_init_seed=t.seed,
    )  # fmt: skip


def prepare(
    run: RMRunConfig, ps: ParallelState
) -> tuple[Loop, RMStage, Callable[[], dict[str, float]] | None]:
    """(loop, stage, eval_fn or None) of `run` on the layout `ps`: data, the reward engine
    (initialized per model.init_from), the loss, the held-out RewardBench evaluation."""
    from nova_engine.train import runner
    from nova_engine.train.loop import Loop

    data, targets = load_train_data(run)
    source = runner.data_source(run, ps, data, train=True)
    engine = build_engine(run, ps, source.total_steps, data)
    loop = Loop({"reward": engine}, source)
    stage = RMStage(ps, run.loss, targets)
    eval_fn = None
    if run.data.eval_paths:
        pairs, subsets = load_eval_data(run)
        weights = attribute_weights(run.loss.labels, run.loss.reward_attribute) \
            if not run.loss.pairwise else [1.0]  # fmt: skip
        ev = runner.data_source(run, ps, pairs, train=False)
        eval_fn = rewardbench_eval(engine, ev, subsets, weights)
    return loop, stage, eval_fn


def run(run: RMRunConfig) -> list[dict[str, float]]:
    """The rm stage from an RMRunConfig (all ranks); returns the per-step metrics."""
    from nova_engine.train import runner

    ps = runner.setup_parallel(run)
    runner.ensure_model(run, ps)
    loop, stage, eval_fn = prepare(run, ps)
    return runner.train_stage(run, loop, stage, eval_fn)


def regression_then_bt(
    recipe: str,
    *,
    regression_data: Sequence[str],
    preference_data: Sequence[str],
    out_dir: str,
    eval_data: Sequence[str] = (),
    bt_loss: str = "scaled_bt",
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """The HelpSteer2-Preference chain on the recipe's `rm:` section (one process group):
    regression on `regression_data`, then `bt_loss` on `preference_data` initialized from
    it (the helpfulness row seeds the BT head). Returns the two HF export directories
    ({"regression": ..., "bt": ...}) and each run's seconds ({"regression_s", "bt_s"});
    metrics are in each run's out_dir/metrics.jsonl."""
    import time

    from nova_engine.recipe import load_recipe

    def paths(key: str, ps: Sequence[str]) -> str:
        return f"{key}=[{','.join(ps)}]"

    reg_out, bt_out = os.path.join(out_dir, "rm_regression"), os.path.join(out_dir, f"rm_{bt_loss}")
    common = [*overrides, paths("data.eval_paths", eval_data)]
    reg = load_recipe(recipe, "rm", [*common, "loss.loss_type=regression",
                                     paths("data.train_paths", regression_data),
                                     f"train.out_dir={reg_out}"])  # fmt: skip
    t0 = time.perf_counter()
    run(typing.cast(RMRunConfig, reg))
    t1 = time.perf_counter()
    bt = load_recipe(recipe, "rm", [*common, f"loss.loss_type={bt_loss}",
                                    paths("data.train_paths", preference_data),
                                    f"model.init_from={os.path.join(reg_out, 'hf')}",
                                    f"train.out_dir={bt_out}"])  # fmt: skip
    run(typing.cast(RMRunConfig, bt))
    return {
        "regression": os.path.join(reg_out, "hf"), "bt": os.path.join(bt_out, "hf"),
        "regression_s": t1 - t0, "bt_s": time.perf_counter() - t1,
    }  # fmt: skip
