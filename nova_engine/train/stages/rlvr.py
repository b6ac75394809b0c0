"""RLVR stage (Tülu 3): reinforcement learning with verifiable rewards on rollouts the policy
generates itself — GRPO, Dr. GRPO, RLOO, REINFORCE++ or PPO with a critic — with a KL to the
frozen starting policy.

    torchrun --nproc_per_node 8 -m nova_engine.train rlvr --recipe recipes/llama3_8b.yaml
    python -m nova_engine.train rlvr --recipe recipes/tiny_cpu.yaml train.max_steps=5
    torchrun --nproc_per_node 8 -m nova_engine.train rlvr --recipe recipes/llama3_8b.yaml \
        rlvr.mode=async rlvr.generation_ranks=2      # 6 training + 2 generating ranks

Async mode (`run_async`, nova_engine.rl.async_rl): the generation ranks serve the rollouts of
step k from policy version max(0, k - rlvr.max_staleness) while the training ranks run the
same steps as below on them; the weights go to the generators after each update.

One step (`RLVRStage.train_step`), P = train.global_batch_size prompts:
1. generate: each DP replica samples rollout.samples_per_prompt responses for its P/dp prompts
   on the policy's own shards (KV cache; sample i of stream prompt k draws from
   (rollout.seed, k, i, t): layout-independent and repeatable after a resume);
2. verify: the data source's verifier (nova_engine.rl.verifiers) in a process pool with a
   wall-clock limit (a hang is reward 0, counted), the model-parallel ranks sharing the work;
   reward = 10 when verified (rollout.*_reward; truncated_reward for responses without a stop
   token); group advantages with statistics over DP; the step's responses gathered, split into
   loss.num_mini_batches seeded mini-batches, each dealt over DP balanced by tokens and packed;
3. reference + value: forward-only passes: the policy's own log-probs (the "old" log-probs of
   the ratio, and the entropy), the frozen reference's (KL), the critic's per-token values
   (PPO); advantages (GAE for PPO; whitening over DP);
4. train: loss.ppo_epochs x num_mini_batches optimizer steps of the policy (clipped ratio,
   dual clip, KL in the loss or the reward, optional truncated IS) and of the critic.
Metrics (progress line, metrics.jsonl): reward_mean, verified (per data source), KL, entropy,
the sampler / trainer invariants (train_rollout_logprob_abs_diff, token_mult_prob_error,
ppo_kl_first_update: 0 up to fp32 rounding for colocated generation), clip fraction, response length, truncated fraction, the time split time/{generate, verify,
ref_value, train}, gen_tokens_per_s and train_tokens_per_s. Checkpoints hold the policy, the
critic, both optimizers and the prompt stream's position and seeds: a resumed run repeats the
uninterrupted run's rewards and losses exactly. A reward model (`reward_model.path`, the rm
stage's export) scores the responses too: reward = w_v * verifier + w_rm * RM score, open-ended
prompts (no ground_truth) by the RM alone. This file is the recipe; the RL library is
nova_engine.rl: config (the rollout/loss/critic sections), producer (prompt stream,
generation, verification, responses), minibatch (packing), estimators (the advantage
registry), stats (DP statistics), losses (passes, advantages, policy/value losses),
reward_model, evaluate.
"""

from __future__ import annotations

import dataclasses
import os
import time
import typing
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.distributed as dist

from nova_engine.config import ConfigError, ModelConfig, RunConfig, check
from nova_engine.logging import get_logger
from nova_engine.model.hf_export import complete_hf_export
from nova_engine.rl.config import (
    CriticSection,
    RLVRLossSection,
    RLVRSection,
    RolloutSection,
    group_estimators,
)
from nova_engine.rl.evaluate import eval_fn
from nova_engine.rl.losses import PREPASS_METRICS, PolicyLoss, ValueLoss, assign_advantages, prepass
from nova_engine.rl.minibatch import minibatches
from nova_engine.rl.producer import (
    EngineRollouts,
    Producer,
    PromptSource,
    StepPrompts,
    dynamic_sampling,
    gather_responses,
    load_prompts,
    make_verifier,
    rollout_metrics,
)
from nova_engine.rl.reward_model import RewardModelSection, RMScorer
from nova_engine.rl.reward_model import combine as rm_combine
from nova_engine.train.loop import Loop

logger = get_logger(__name__)

# ------------------------------------------------------------------------------ config


@dataclass
class RLVRModelSection(ModelConfig):
    """The recipe's `model:` section: hf_path is the starting policy."""

    reference_path: str | None = None
    """The frozen reference of the KL term (default: hf_path, the starting policy)."""


@dataclass
class RLVRRunConfig(RunConfig):
    """The rlvr stage's recipe. Reinterpreted shared keys: train.global_batch_size = prompts
    per step; data.max_length = the longest prompt kept (longer ones are dropped and counted);
    train.micro_batch_tokens = packing capacity of prompt + response."""

    model: RLVRModelSection
    rollout: RolloutSection = field(default_factory=RolloutSection)
    loss: RLVRLossSection = field(default_factory=RLVRLossSection)
    critic: CriticSection = field(default_factory=CriticSection)
    reward_model: RewardModelSection = field(default_factory=RewardModelSection)
    rlvr: RLVRSection = field(default_factory=RLVRSection)

    stage: typing.ClassVar[str] = "rlvr"
    data_format: typing.ClassVar[str] = "rlvr"

    def __post_init__(self) -> None:
        check(self.data.format == "auto", "data.format",
              'the rlvr stage reads the RLVR layout (messages, ground_truth, dataset): expected "auto"')  # fmt: skip
        need = self.data.max_length + self.rollout.max_new_tokens
        check(
            self.train.micro_batch_tokens >= need,
            "train.micro_batch_tokens",
            f"{self.train.micro_batch_tokens} cannot hold a prompt of data.max_length="
            f"{self.data.max_length} + rollout.max_new_tokens={self.rollout.max_new_tokens}",
        )
        check(not self.loss.needs_critic or bool(self.critic.init_from), "critic.init_from",
              "advantage gae (PPO) needs a critic: the reward model's HF export")  # fmt: skip
        n = self.train.global_batch_size * self.rollout.samples_per_prompt
        check(self.loss.num_mini_batches <= n, "loss.num_mini_batches",
              f"more mini-batches than the {n} responses of a step")  # fmt: skip
        check(not self.rollout.dynamic_sampling or self.loss.estimator.group_baseline,
              "rollout.dynamic_sampling", f"needs a group estimator ({', '.join(group_estimators())})")  # fmt: skip
        if self.rlvr.is_async:  # what the generation group does not serve (yet)
            check(not self.rollout.dynamic_sampling, "rollout.dynamic_sampling",
                  "not available with rlvr.mode=async (its refill rounds are colocated)")  # fmt: skip
            check(not self.reward_model.enabled, "reward_model.path",
                  "a reward model is not available with rlvr.mode=async yet")  # fmt: skip
            check(self.checkpoint.format != "dist", "checkpoint.format",
                  "dist checkpoints need the training ranks to be the whole world; "
                  'use "torch" with rlvr.mode=async')  # fmt: skip
            g = self.rlvr.generation_ranks // (self.rlvr.generation_tp * self.rlvr.generation_pp)
            check(self.train.global_batch_size % g == 0, "rlvr.generation_ranks",
                  f"the generation group's {g} data-parallel replicas do not divide "
                  f"train.global_batch_size={self.train.global_batch_size}")  # fmt: skip
            check(not self.checkpoint.async_save, "checkpoint.async_save",
                  "not with rlvr.mode=async yet (its writer group is created over the whole "
                  "world; the generation ranks never save)")  # fmt: skip

    @property
    def sampling_seed(self) -> int:
        return self.train.seed if self.rollout.seed is None else self.rollout.seed


CONFIG = RLVRRunConfig


# ------------------------------------------------------------------------------ the stage


def _mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows])) if rows else 0.0


class RLVRStage:
    """One RLVR step for the loop (nova_engine.train.loop.Stage); see the module docstring.
    `producer` makes this rank's rollouts (EngineRollouts, or a fixed set in tests)."""

    name = "rlvr"
    engine = "policy"

    def __init__(self, ps, rollout: RolloutSection, loss: RLVRLossSection, producer: Producer,
                 *, micro_batch_tokens: int, seed: int, pad_id: int = 0,
                 rm: RMScorer | None = None):  # fmt: skip
        self.ps, self.rollout, self.loss, self.producer, self.rm = ps, rollout, loss, producer, rm
        self.mbt, self.seed, self.pad_id = micro_batch_tokens, seed, pad_id
        self.pcfg = loss.policy_config()
        self.reward = rollout.reward_config()
        scale = loss.loss_scale_length or rollout.max_new_tokens
        self.policy_loss = PolicyLoss(self.pcfg, ps, tis=loss.tis, scale_len=float(scale),
                                      temperature=rollout.temperature)  # fmt: skip
        self.value_loss = ValueLoss(ps, vf_coef=loss.vf_coef, value_clip=loss.value_clip)

    def responses(self, batch: StepPrompts):
        """Generate, verify, shape and gather the responses to the prompts of `batch`."""
        first, mine = batch.share(self.ps)
        gens, results, times = self.producer(batch.step, mine)
        rm, combine = None, None
        if self.rm is not None:  # rl.reward_model: w_v * verifier + w_rm * RM score
            t0 = time.perf_counter()
            text = typing.cast(EngineRollouts, self.producer).text  # the RM reads the replies
            rm, cfg = self.rm(mine, gens, text), self.rm.cfg
            combine, times["reward_model"] = (
                (lambda v, x: rm_combine(v, x, cfg)),
                time.perf_counter() - t0,
            )
        sr = gather_responses(first, mine, gens, results, num_groups=len(batch.items),
                              reward=self.reward, estimator=self.loss.advantage, ps=self.ps,
                              eps=self.loss.adv_eps, overlong=self.rollout.overlong,
                              rm_scores=rm, combine=combine)  # fmt: skip
        sr.times = times
        return sr

    def train_step(self, loop: Loop, batch: StepPrompts) -> dict[str, float]:
        ps, cfg = self.ps, self.loss
        policy = loop.engine("policy")
        reference, critic = loop.engines.get("reference"), loop.engines.get("critic")
        sr = self.responses(batch)
        metrics: dict[str, float] = {}
        every = sr.responses
        if self.rollout.dynamic_sampling:
            refill = getattr(loop.data, "refill_prompts", None)
            if refill is None:
                raise ValueError("rollout.dynamic_sampling needs the loop's PromptSource")
            sr, every, metrics = dynamic_sampling(
                sr, lambda r: self.responses(refill(batch.step, r)), target=len(batch.items),
                max_rounds=self.rollout.max_sampling_rounds,
            )  # fmt: skip
        metrics.update(rollout_metrics(dataclasses.replace(sr, responses=every)))
        times, gen_tokens = sr.times, sum(len(r.gen) for r in every)

        t0 = time.perf_counter()
        mbs = minibatches(sr, ps, step=batch.step, num_mini_batches=cfg.num_mini_batches,
                          capacity=self.mbt, seed=self.seed, pad_id=self.pad_id,
                          mask_truncated=cfg.mask_truncated,
                          drop_zero_var=cfg.zero_variance_groups == "drop")  # fmt: skip
        flat = [mb for part in mbs for mb in part]
        pre = prepass(flat, policy, reference, critic, ps, self.pcfg, self.rollout.temperature,
                      version=loop.step)  # fmt: skip
        assign_advantages(flat, estimator=cfg.estimator, policy_cfg=self.pcfg, gamma=cfg.gamma,
                          lam=cfg.lam, whiten=cfg.whiten_advantages, ps=ps)  # fmt: skip
        sums = Loop.reduce_metrics(policy, PREPASS_METRICS, pre)
        n = max(sums["tokens"], 1.0)
        metrics["entropy"] = sums["entropy"] / n
        if reference is not None:
            metrics["kl"] = sums["kl"] / n
        metrics["train_rollout_logprob_abs_diff"] = sums["logprob_abs_diff"] / n
        metrics["token_mult_prob_error"] = sums["mult_prob"] / n if sums["tokens"] else 1.0
        metrics["is_over_cap_frac"] = sums["is_over_cap"] / n
        metrics["staleness_mean"] = sums["staleness"] / n
        vers = [r.gen.versions for r in sr.responses if r.gen.versions is not None and len(r.gen)]
        metrics["staleness_max"] = (
            float(loop.step - min(int(v.min()) for v in vers)) if vers else 0.0
        )
        if critic is not None:
            metrics["value_mean"] = sums["values"] / n
        t1 = time.perf_counter()

        rng = np.random.default_rng([self.seed, batch.step, 11])
        pol, val = [], []
        for _ in range(cfg.ppo_epochs):
            for k in rng.permutation(len(mbs)):
                pol.append(loop.update(policy, mbs[k], self.policy_loss))
                if critic is not None:  # tokens/s and MFU count the policy updates only
                    val.append(loop.update(critic, mbs[k], self.value_loss, count_tokens=False))
        trained = loop.step_tokens
        t2 = time.perf_counter()

        for key in ("policy_loss", "pg_loss", "kl_loss", "clip_frac", "clip_frac_lower",
                    "approx_kl", "grad_norm"):  # fmt: skip
            metrics[key] = _mean(pol, key)
        metrics["ppo_kl_first_update"] = pol[0]["approx_kl"]  # old == current: 0 to rounding
        metrics["lr"] = pol[-1]["lr"]
        if val:
            metrics["value_loss"] = _mean(val, "value_loss")
            metrics["vf_clip_frac"] = _mean(val, "vf_clip_frac")
            metrics["critic_grad_norm"] = _mean(val, "grad_norm")
        gen_s, ver_s = times.get("generate", 0.0), times.get("verify", 0.0)
        metrics.update({
            "time/generate": gen_s, "time/verify": ver_s, "time/ref_value": t1 - t0,
            "time/train": t2 - t1,
            "gen_tokens_per_s": gen_tokens / gen_s if gen_s > 0 else 0.0,
            "train_tokens_per_s": trained / (t2 - t1) if t2 > t1 else 0.0,
        })  # fmt: skip
        if "verify_total" in times:  # the verifier's wall time, mostly hidden behind generation
            metrics["time/verify_total"] = times["verify_total"]
        if "reward_model" in times:  # the RM scoring pass (rl.reward_model)
            metrics["time/reward_model"] = times["reward_model"]
        after = getattr(self.producer, "after_update", None)
        if after is not None:  # rlvr.mode async: send the new weights, take the next rollouts
            t3 = time.perf_counter()
            metrics.update(after(batch.step))
            metrics["time/wait_rollouts"] = times.get("wait_rollouts", 0.0)
            metrics["time/after_update"] = time.perf_counter() - t3
            metrics["generation_version"] = times.get("generation_version", 0.0)
        return metrics


# ------------------------------------------------------------------------------ the run


def build_engines(run: RLVRRunConfig, ps, total_updates: int, stop_ids) -> dict[str, Any]:
    """policy (trained), reference (frozen; when the KL is used: with model.lora and no other
    reference_path, the policy's own shards with the adapters off), critic (PPO; LoRA with
    critic.lora) on layout ps."""
    from nova_engine.data.tokenize import load_tokenizer
    from nova_engine.model.arch import load_arch
    from nova_engine.model.hf_io import choose_pad_token_id, score_labels
    from nova_engine.train import runner
    from nova_engine.train.engine import AdaptersOffReference, ModelEngine, RewardEngine

    t = run.train
    engines: dict[str, Any] = {"policy": runner.engine_for_run(run, ps, total_updates)}
    same_ref = run.model.reference_path in (None, run.model.hf_path)
    if run.loss.needs_reference and run.model.lora is not None and same_ref:
        engines["reference"] = AdaptersOffReference(engines["policy"])  # LoRA: no second model
    elif run.loss.needs_reference:
        engines["reference"] = ModelEngine.from_hf(
            run.model.reference_path or run.model.hf_path, ps, name="reference",
            trainable=False, precision=t.precision, fuse_elementwise=t.fuse_elementwise,
        )  # fmt: skip
    if run.loss.needs_critic:
        src = run.critic.init_from
        assert src is not None
        if not os.path.isfile(os.path.join(src, "config.json")):
            raise ConfigError("critic.init_from", f"{src} is not a HF model directory")
        labels, rows = score_labels(src), None
        if labels is not None and len(labels) > 1:
            if run.critic.output not in labels:
                raise ConfigError("critic.output", f"name one of the head's outputs {labels}")
            rows = [labels.index(run.critic.output)]
        pad = choose_pad_token_id(load_tokenizer(run.model.tokenizer_dir), stop_ids)
        engines["critic"] = RewardEngine(
            load_arch(src), ps, labels=("value",), pad_token_id=pad, score_rows=rows,
            name="critic", weights_dir=src, optim=run.critic.optim or run.optim,
            total_steps=total_updates, precision=t.precision, recompute=t.recompute,
            fuse_elementwise=t.fuse_elementwise,
            distributed_optimizer=run.parallel.distributed_optimizer,
            score_init_seed=run.critic.init_seed, lora=run.critic.lora,
        )  # fmt: skip
    return engines


def sampling_params(run: RLVRRunConfig, stops) -> Any:
    from nova_engine.generate import SamplingParams

    r = run.rollout
    return SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                          max_new_tokens=r.max_new_tokens, stop_token_ids=tuple(stops),
                          n=r.samples_per_prompt, seed=run.sampling_seed)  # fmt: skip


def prompt_source(run: RLVRRunConfig, prompts) -> PromptSource:
    """The run's prompt stream over `prompts` (the same on every rank, either group)."""
    t = run.train
    steps = t.max_steps or t.epochs * -(-len(prompts) // t.global_batch_size)
    return PromptSource(prompts, prompts_per_step=t.global_batch_size, total_steps=steps,
                        seed=run.data.seed, shuffle=run.data.shuffle,
                        sampling_seed=run.sampling_seed)  # fmt: skip


def build_loop(run: RLVRRunConfig, ps, prompts, stops) -> Loop:
    """The loop of `run`: its engines over the prompt stream of `prompts`."""
    source = prompt_source(run, prompts)
    updates = source.total_steps * run.loss.ppo_epochs * run.loss.num_mini_batches
    return Loop(build_engines(run, ps, updates, stops), source)


def build_stage(run: RLVRRunConfig, ps, producer: Producer, pad_id: int = 0,
                rm: RMScorer | None = None) -> RLVRStage:  # fmt: skip
    return RLVRStage(ps, run.rollout, run.loss, producer, seed=run.data.seed, pad_id=pad_id,
                     micro_batch_tokens=run.train.micro_batch_tokens, rm=rm)  # fmt: skip


def run(run: RLVRRunConfig) -> list[dict[str, float]]:
    """The rlvr stage from an RLVRRunConfig (all ranks); returns the per-step metrics."""
    from nova_engine.data.tokenize import ChatTokenizer
    from nova_engine.train import runner
    from nova_engine.train.engine import RewardEngine

    if run.rlvr.is_async:
        return run_async(run)
    ps = runner.setup_parallel(run)
    runner.ensure_model(run, ps)
    ct = ChatTokenizer(run.model.tokenizer_dir)
    prompts = load_prompts(run, ct, run.data.train_paths)
    if not prompts:
        raise ConfigError("data.train_paths", f"no prompt of at most data.max_length="
                          f"{run.data.max_length} tokens in {run.data.train_paths}")  # fmt: skip
    r = run.rollout
    stops = tuple(r.stop_token_ids or ct.eos_token_ids)
    loop = build_loop(run, ps, prompts, stops)
    verify, pool = make_verifier(run)
    try:
        producer = EngineRollouts(loop.engine("policy"), ct.tokenizer, sampling_params(run, stops),
                                  verify, max_batch_size=r.max_batch_size)  # fmt: skip
        stage = build_stage(run, ps, producer, pad_id=ct.tokenizer.pad_token_id or 0,
                            rm=RMScorer.build(run, ps, RewardEngine))  # fmt: skip
        evaluate = _held_out_eval(run, ct, producer, ps, stage, stops)
        out = runner.train_stage(run, loop, stage, evaluate)
        _export_critic(run, loop, ps)
        return out
    finally:
        if pool is not None:
            pool.close()


def _export_critic(run: RLVRRunConfig, loop: Loop, ps) -> None:
    """PPO: the trained critic as a HF reward model at <out_dir>/hf_critic."""
    if "critic" not in loop.engines or not run.checkpoint.export_hf:
        return
    critic_dir = os.path.join(run.train.out_dir, "hf_critic")
    loop.engine("critic").export_hf(critic_dir)
    ps.barrier()
    if ps.rank == ps.first_rank:  # the tokenizer and special-token ids, as every export carries
        complete_hf_export(critic_dir, source_dir=run.critic.init_from,
                           tokenizer_dir=run.model.tokenizer_dir,
                           template=run.data.template)  # fmt: skip


def _held_out_eval(run: RLVRRunConfig, ct, producer, ps, stage: RLVRStage, stops):
    """The held-out evaluation (greedy, plus rollout.eval_samples samples at the rollout
    temperature) on `producer`, or None without data.eval_paths."""
    from nova_engine.generate import SamplingParams

    r = run.rollout
    if not run.data.eval_paths:
        return None
    greedy = SamplingParams(temperature=0.0, max_new_tokens=r.max_new_tokens,
                            stop_token_ids=stops)  # fmt: skip
    held_out = load_prompts(run, ct, run.data.eval_paths)
    if run.data.eval_max_samples is not None:
        held_out = held_out[: run.data.eval_max_samples]
    at_t = None
    if r.eval_samples:  # another seed than the training stream's (keys overlap)
        at_t = dataclasses.replace(sampling_params(run, stops), n=r.eval_samples,
                                   seed=(run.sampling_seed + 7919) % 2**63)  # fmt: skip
    return eval_fn(producer, held_out, ps, stage.reward, greedy, at_t)


def run_async(run: RLVRRunConfig) -> list[dict[str, float]]:
    """`rlvr.mode: async` (nova_engine.rl.async_rl): the training ranks run the stage's loop
    on rollouts from the generation ranks, which serve them from a frozen copy of the policy
    kept in sync by weight broadcasts. Training ranks return their metrics, generation
    ranks []. A dead generation group: a checkpoint at the step boundary, then one line."""
    from nova_engine.data.tokenize import ChatTokenizer
    from nova_engine.model.weight_sync import WeightSync
    from nova_engine.rl.async_rl import (
        Channels,
        GenerationGroupDied,
        PendingRollouts,
        RemoteRollouts,
        serve_generation,
    )
    from nova_engine.train import checkpoint_io, runner
    from nova_engine.train.engine import ModelEngine

    train_ps, gen_ps, (train_ranks, gen_ranks) = runner.setup_async(run)
    r, a = run.rollout, run.rlvr
    channels = Channels.build(train_ranks, gen_ranks, a.generation_timeout_s)
    if train_ps is not None:
        runner.ensure_model(run, train_ps)
    dist.barrier()  # the model exists before any generation rank reads it
    ct = ChatTokenizer(run.model.tokenizer_dir)
    prompts = load_prompts(run, ct, run.data.train_paths)
    if not prompts:
        raise ConfigError("data.train_paths", f"no prompt of at most data.max_length="
                          f"{run.data.max_length} tokens in {run.data.train_paths}")  # fmt: skip
    stops = tuple(r.stop_token_ids or ct.eos_token_ids)
    verify, pool = make_verifier(run)
    try:
        if gen_ps is not None:  # ---------------------------------------- generation ranks
            t = run.train
            engine = ModelEngine.from_hf(run.model.hf_path, gen_ps, name="generator",
                                         trainable=False, precision=t.precision,
                                         fuse_elementwise=t.fuse_elementwise)  # fmt: skip
            sync = WeightSync(None, engine, bucket_mb=a.sync_bucket_mb)
            source = prompt_source(run, prompts)
            producer = EngineRollouts(engine, ct.tokenizer, sampling_params(run, stops), verify,
                                      max_batch_size=r.max_batch_size)  # fmt: skip
            try:
                cut = (
                    (a.interrupt_at or max(r.max_new_tokens // 2, 1))
                    if a.partial_rollouts
                    else None
                )
                serve_generation(channels, gen_ps, producer, sync, source,
                                 staleness=a.max_staleness, total_steps=source.total_steps,
                                 interrupt_at=cut)  # fmt: skip
            except Exception as e:  # the trainer saved and reports; this rank waits for it
                raise GenerationGroupDied(f"{type(e).__name__}: {e}") from None
            return []
        # --------------------------------------------------------------------- training ranks
        assert train_ps is not None
        loop = build_loop(run, train_ps, prompts, stops)
        policy = loop.engine("policy")
        sync = WeightSync(policy, None, bucket_mb=a.sync_bucket_mb)
        local = EngineRollouts(policy, ct.tokenizer, sampling_params(run, stops), verify,
                               max_batch_size=r.max_batch_size)  # fmt: skip
        remote = RemoteRollouts(channels, sync, local, staleness=a.max_staleness,
                                total_steps=loop.data.total_steps,
                                partial=a.partial_rollouts)  # fmt: skip
        loop.data = PendingRollouts(loop.data, remote)
        stage = build_stage(run, train_ps, remote, pad_id=ct.tokenizer.pad_token_id or 0)
        evaluate = _held_out_eval(run, ct, local, train_ps, stage, stops)
        try:
            out = runner.train_stage(run, loop, stage, evaluate)
            _export_critic(run, loop, train_ps)
            return out
        except GenerationGroupDied as e:  # at a step boundary: the loop's state is whole
            loop.data.source.position = loop.step
            path = checkpoint_io.latest_complete(run.checkpoint_dir, verify=False)
            if path != checkpoint_io.checkpoint_dir_for(run.checkpoint_dir, loop.step):
                path = runner.save_guarded(run, loop)
                runner.finish_saves(run, None)
            raise GenerationGroupDied(f"{e}; saved {path} at step {loop.step} (rerun to "
                                      "resume)") from None  # fmt: skip
    finally:
        if pool is not None:
            pool.close()
