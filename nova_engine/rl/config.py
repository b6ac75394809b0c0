"""The RLVR recipe's RL sections — `rollout:` (sampling, verification, reward shaping, DAPO
dynamic sampling and overlong shaping), `loss:` (advantage estimator, policy loss, KL, value
loss, update plan) and `critic:` (PPO's value model) — dataclasses validated on
construction; errors name the recipe key. The estimator checks read the registry's
declarations (nova_engine.rl.estimators), never a list of names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nova_engine.config import ConfigError, LoRAConfig, OptimConfig, check
from nova_engine.losses.policy import KL_PLACES, PolicyLossConfig, policy_loss_names
from nova_engine.rl.estimators import ESTIMATORS, Estimator, estimator_names
from nova_engine.rl.verifiers import RewardConfig


@dataclass
class RolloutSection:
    """The recipe's `rollout:` section: sampling, verification, reward shaping."""

    samples_per_prompt: int = 4
    """Responses per prompt (the group of GRPO / RLOO; PPO: usually 1)."""
    max_new_tokens: int = 512
    """Response length limit (Tülu 3: 2048); reaching it without a stop token = truncated."""
    temperature: float = 1.0
    """Sampling temperature T (> 0). The training forward uses it too: old / reference /
    policy log-probs, entropy and KL are those of log_softmax(logits / T), the distribution
    the responses are drawn from (TRL, open-instruct), and so are the sampler's log-probs."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    seed: int | None = None
    """Root of the per-sample sampling randomness (default: train.seed)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Tokens that end a response (default: the tokenizer's end-of-turn / EOS tokens)."""
    max_batch_size: int = 64
    """Rows generated at once per DP replica (KV-cache memory)."""
    verifier_workers: int = 2
    """Verifier worker processes per rank (0: verify in the training process, unbounded in
    time: only for trusted, simple checks such as the arithmetic demo)."""
    verifier_timeout_s: float = 10.0
    """Wall-clock limit of one verifier call (a hang is reward 0, reason timeout)."""
    verified_reward: float = 10.0
    """Reward of a verified response (Tülu 3: 10)."""
    unverified_reward: float = 0.0
    """Reward of any other response."""
    truncated_reward: float | None = None
    """Reward of a response without a stop token, replacing the verified one (Tülu 3: -10)."""
    overlong_buffer: int | None = None
    """DAPO's overlong reward shaping: L_cache, the last tokens before max_new_tokens over
    which the reward falls linearly by up to overlong_penalty (None: off; DAPO: 4096 of 20480)."""
    overlong_penalty: float = 1.0
    """The shaping's largest penalty (reward units)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop the groups whose rewards are all equal and refill the step
    with informative groups of extra seeded prompt draws (group estimators, samples >= 2)."""
    max_sampling_rounds: int = 3
    """Generation rounds per step under dynamic_sampling (the first included; verl's
    max_num_gen_batches); a step short of informative groups trains on those it has."""
    eval_samples: int = 0
    """Held-out evaluation (data.eval_paths): besides the greedy responses, sample this many
    per prompt at the training temperature / top-k / top-p and report their mean verified
    fraction, pass@1 at T (`verified_at_t`); 0 = greedy only."""

    def __post_init__(self) -> None:
        for k in ("samples_per_prompt", "max_new_tokens", "max_batch_size"):
            check(getattr(self, k) >= 1, k, f"expected >= 1, got {getattr(self, k)}")
        check(self.eval_samples >= 0, "eval_samples", f"expected >= 0, got {self.eval_samples}")
        check(self.temperature > 0, "temperature", "expected > 0 (RL samples)")
        check(0 < self.top_p <= 1, "top_p", f"expected in (0, 1], got {self.top_p}")
        check(self.top_k >= 0, "top_k", "expected >= 0")
        check(self.verifier_workers >= 0, "verifier_workers", "expected >= 0")
        check(self.verifier_timeout_s > 0, "verifier_timeout_s", "expected > 0")
        b = self.overlong_buffer
        check(b is None or 1 <= b <= self.max_new_tokens, "overlong_buffer",
              f"expected 1..max_new_tokens={self.max_new_tokens} or null, got {b}")  # fmt: skip
        check(self.overlong_penalty >= 0, "overlong_penalty", "expected >= 0")
        check(self.max_sampling_rounds >= 1, "max_sampling_rounds", "expected >= 1")
        check(not self.dynamic_sampling or self.samples_per_prompt >= 2, "dynamic_sampling",
              "needs rollout.samples_per_prompt >= 2 (a group of one never varies)")  # fmt: skip
        try:
            self.reward_config()
        except ValueError as e:
            raise ConfigError("truncated_reward", str(e)) from None

    def reward_config(self) -> RewardConfig:
        return RewardConfig(self.verified_reward, self.unverified_reward, self.truncated_reward)

    @property
    def overlong(self) -> tuple[int, int, float] | None:
        b = self.overlong_buffer
        return None if b is None else (self.max_new_tokens, b, self.overlong_penalty)


@dataclass
class RLVRLossSection:
    """The recipe's `loss:` section: advantages, policy loss, KL, value loss, update plan."""

    advantage: str = "grpo"
    """A registered estimator (nova_engine.rl.estimators): gae (PPO with the critic), grpo,
    dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline."""
    gamma: float = 1.0
    """Discount (gae, reinforce_pp)."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """gae: whiten the advantages over the step's tokens (all DP ranks)."""
    adv_eps: float = 1e-6
    """Group-std epsilon: grpo's (r - mean) / (std + eps) with the DP-reduced group std (the
    only group estimator dividing by a std: dr_grpo, rloo and reinforce_pp_baseline do not;
    reinforce_pp* / gae whitening has its own 1e-8). Zero-variance groups get advantage 0."""
    zero_variance_groups: str = "keep"
    """Groups whose rewards are all equal (no signal, advantage 0): "keep" counts their
    tokens in the policy loss's normalizer and KL term (TRL's "dapo" token mean), "drop"
    leaves them out of the policy loss entirely, numerator and denominator (open-instruct).
    Group estimators only (grpo, dr_grpo, rloo, reinforce_pp_baseline)."""
    mask_truncated: bool = False
    """Responses that hit rollout.max_new_tokens without a stop token get loss mask 0 in the
    policy loss (not in the advantages' statistics; open-instruct's mask_truncated_completions)."""
    ppo_epochs: int = 1
    """Passes over the step's responses."""
    num_mini_batches: int = 1
    """Optimizer steps per pass (the responses split into this many mini-batches)."""
    policy_loss: str = "ppo"
    """ppo (clipped ratio), reinforce (no clipping), gspo (sequence-level ratio; agg
    seq-mean-token-mean) or cispo (clipped stop-gradient IS weights; agg token-mean)."""
    clip_low: float = 0.2
    """The ratio is clipped to >= 1 - clip_low."""
    clip_high: float | None = None
    """... and <= 1 + clip_high (None: clip_low; DAPO: 0.28)."""
    dual_clip: float | None = 3.0
    """Dual clip c > 1 on negative advantages (None: off)."""
    agg: str = "token-mean"
    """token-mean, seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm."""
    loss_scale_length: int | None = None
    """seq-mean-token-sum-norm's constant length (default rollout.max_new_tokens: Dr. GRPO)."""
    kl_coef: float = 0.0
    """beta of the KL to the reference (Tülu 3 PPO: 0.05 at 8B, 0.07 at 70B)."""
    kl_type: str = "k3"
    """k1, k2 or k3."""
    kl_in: str = "loss"
    """loss (a loss term), reward (a token-reward penalty; gae / reinforce_pp) or none."""
    kl_log_ratio_clamp: float | None = 20.0
    """Clamp of the log-ratio before the KL estimator (None: off)."""
    kl_value_clamp: float | None = 10.0
    """Clamp of the KL estimate (None: off)."""
    tis: bool = False
    """Truncated importance sampling: weight each token by min(e^(old - gen), tis_cap)."""
    tis_cap: float | None = 2.0
    """Cap of the truncated importance weight."""
    tis_mode: str = "truncate"
    """truncate (min(w, tis_cap): TIS) or mask (w, tokens with w > tis_cap dropped: AReaL's
    decoupled PPO) — how the behaviour weight w = e^(old - gen) enters when loss.tis is on."""
    vf_coef: float = 0.1
    """Value-loss coefficient (PPO)."""
    value_clip: float | None = 0.2
    """Value clipping around the pre-update values (None: off)."""

    def __post_init__(self) -> None:
        a = self.advantage
        check(a in ESTIMATORS, "advantage",
              f"expected one of {', '.join(estimator_names())}, got {a!r}")  # fmt: skip
        est = ESTIMATORS[a]
        check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma", "gamma, lam in [0, 1]")
        check(self.adv_eps >= 0, "adv_eps", f"expected >= 0, got {self.adv_eps}")
        check(self.zero_variance_groups in ("keep", "drop"), "zero_variance_groups",
              f'expected "keep" or "drop", got {self.zero_variance_groups!r}')  # fmt: skip
        check(self.zero_variance_groups == "keep" or est.group_baseline, "zero_variance_groups",
              f'"drop" needs a group estimator ({", ".join(group_estimators())}), not {a}')  # fmt: skip
        check(self.ppo_epochs >= 1, "ppo_epochs", "expected >= 1")
        check(self.num_mini_batches >= 1, "num_mini_batches", "expected >= 1")
        names = policy_loss_names()
        check(self.policy_loss in names, "policy_loss", f"expected one of {names}")
        check(self.kl_in in KL_PLACES, "kl_in", f"expected one of {KL_PLACES}")
        check(not (self.tis and self.policy_loss == "gspo"), "tis",
              "gspo's ratio is per sequence: the per-token truncated IS weight does not apply")  # fmt: skip
        check(
            not (self.kl_in == "reward" and not est.token_rewards), "kl_in",
            f'"reward" needs per-token rewards ({", ".join(token_reward_estimators())}), not {a}',
        )  # fmt: skip
        check(self.vf_coef > 0, "vf_coef", "expected > 0")
        check(self.value_clip is None or self.value_clip > 0, "value_clip", "expected > 0 or null")
        check(self.loss_scale_length is None or self.loss_scale_length >= 1,
              "loss_scale_length", "expected >= 1")  # fmt: skip
        try:
            self.policy_config()
        except ValueError as e:  # PolicyLossConfig.<field>=...: name the recipe key
            msg = str(e).removeprefix("PolicyLossConfig.")
            raise ConfigError(msg.split("=", 1)[0], msg) from None

    def policy_config(self) -> PolicyLossConfig:
        return PolicyLossConfig(
            name=self.policy_loss, clip_low=self.clip_low, clip_high=self.clip_high,
            dual_clip=self.dual_clip, tis_cap=self.tis_cap, tis_mode=self.tis_mode, agg=self.agg,
            kl_coef=self.kl_coef,
            kl_type=self.kl_type, kl_log_ratio_clamp=self.kl_log_ratio_clamp,
            kl_value_clamp=self.kl_value_clamp, kl_in=self.kl_in,
        )  # fmt: skip

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0 and self.kl_in != "none"

    @property
    def needs_critic(self) -> bool:
        return ESTIMATORS[self.advantage].needs_critic

    @property
    def estimator(self) -> Estimator:
        return ESTIMATORS[self.advantage]


@dataclass
class CriticSection:
    """The recipe's `critic:` section (PPO's value model; advantage gae)."""

    init_from: str | None = None
    """HF directory the critic starts from: the reward-model stage's export (a
    *ForSequenceClassification: decoder + score head) or a causal LM (a new seeded head)."""
    output: str | None = None
    """Which output of a multi-output head (e.g. a regression RM's "helpfulness")."""
    init_seed: int = 0
    """Seed of a new score head."""
    optim: OptimConfig | None = None
    """The critic's optimizer (default: the policy's optim section)."""
    lora: LoRAConfig | None = None
    """LoRA adapters on the critic's decoder (its score head trains in full); None: the whole
    critic trains."""


def group_estimators() -> list[str]:
    """The registered estimators with a group baseline."""
    return [n for n, e in ESTIMATORS.items() if e.group_baseline]


def token_reward_estimators() -> list[str]:
    """The registered estimators on per-token rewards."""
    return [n for n, e in ESTIMATORS.items() if e.token_rewards]


RLVR_MODES = ("colocated", "async")


@dataclass
class RLVRSection:
    """The recipe's `rlvr:` section: where generation runs (issue #27).

    colocated (default): every rank generates on the policy's own training shards, then
    trains; one phase idles while the other runs, and no weight moves.
    async: the world splits into a training group (the first world - generation.ranks ranks,
    laid out by `parallel:`) and a generation group (the last generation.ranks ranks, laid out
    by generation.tp x generation.pp, frozen, no gradients, no optimizer). Step k+1's rollouts
    are generated while step k trains; after every update the trainer's weights are
    broadcast to the generators by HF name in buckets (nova_engine.model.weight_sync).
    Rollouts of step k come from policy version max(0, k - max_staleness) exactly, so a run
    is repeatable and resumes bit for bit."""

    mode: str = "colocated"
    """colocated | async."""
    max_staleness: int = 1
    """async: how many updates the generating policy may lag the trained one (0 = strictly
    on-policy: no overlap, the losses of colocated mode)."""
    generation_ranks: int = 1
    """async: ranks of the world that generate (the last ones)."""
    generation_tp: int = 1
    """async: tensor parallelism of the generation group."""
    generation_pp: int = 1
    """async: pipeline parallelism of the generation group."""
    partial_rollouts: bool = False
    """async, max_staleness >= 1: partial rollouts (AReaL, OpenRLHF). The generation of step
    k's rollouts is interrupted by a weight update after `interrupt_at` tokens: the prefix
    is sampled by version max(0, k - s), the rest, continued after the prefix, by version
    max(0, k - s + 1), so more tokens come from the newer policy; every token records its
    version. The cut is at a fixed token index, so runs stay repeatable."""
    interrupt_at: int | None = None
    """partial_rollouts: tokens generated before the interruption (default: half of
    rollout.max_new_tokens)."""
    sync_bucket_mb: int = 256
    """async: weight-sync bucket size (MiB)."""
    generation_timeout_s: float = 1800.0
    """async: the trainer's longest wait for a step's rollouts before it declares the
    generation group dead (saves a checkpoint and stops with one line)."""

    def __post_init__(self) -> None:
        check(self.mode in RLVR_MODES, "rlvr.mode", f"expected one of {', '.join(RLVR_MODES)}")
        for key in ("max_staleness",):
            v = getattr(self, key)
            check(isinstance(v, int) and v >= 0, f"rlvr.{key}", f"{v!r}: expected an integer >= 0")
        for key in ("generation_ranks", "generation_tp", "generation_pp", "sync_bucket_mb"):
            v = getattr(self, key)
            check(isinstance(v, int) and v >= 1, f"rlvr.{key}", f"{v!r}: expected an integer >= 1")
        check(not self.partial_rollouts or self.max_staleness >= 1, "rlvr.partial_rollouts",
              "needs rlvr.max_staleness >= 1 (the continuation's version is one newer)")  # fmt: skip
        check(self.interrupt_at is None or self.interrupt_at >= 1, "rlvr.interrupt_at",
              f"{self.interrupt_at!r}: expected an integer >= 1")  # fmt: skip
        check(self.generation_timeout_s > 0, "rlvr.generation_timeout_s", "expected > 0 seconds")
        check(
            self.generation_ranks % (self.generation_tp * self.generation_pp) == 0,
            "rlvr.generation_ranks",
            f"{self.generation_ranks} is not divisible by generation_tp * generation_pp = "
            f"{self.generation_tp} * {self.generation_pp}",
        )

    @property
    def is_async(self) -> bool:
        return self.mode == "async"

    def split(self, world_size: int, tp: int, pp: int) -> tuple[range, range]:
        """(training ranks, generation ranks) of a world of `world_size` (async), checked
        before any process group exists; ConfigError naming the key otherwise."""
        g = self.generation_ranks
        check(world_size > g, "rlvr.generation_ranks",
              f"{g} leaves no training rank in a world of {world_size}")  # fmt: skip
        t = world_size - g
        check(t % (tp * pp) == 0, "parallel.tp",
              f"the training group of {t} ranks (world {world_size} - rlvr.generation_ranks "
              f"{g}) is not divisible by parallel.tp * parallel.pp = {tp} * {pp}")  # fmt: skip
        return range(0, t), range(t, world_size)

    def check_dims(self, dims: dict, source: str) -> None:
        """The generation layout against the model's dimensions (as parallel.* is checked)."""
        for key, div, dim in (
            ("rlvr.generation_tp", self.generation_tp, "num_attention_heads"),
            ("rlvr.generation_tp", self.generation_tp, "num_key_value_heads"),
            ("rlvr.generation_tp", self.generation_tp, "vocab_size"),
            ("rlvr.generation_tp", self.generation_tp, "intermediate_size"),
            ("rlvr.generation_pp", self.generation_pp, "num_hidden_layers"),
        ):
            check(dims[dim] % div == 0, key, f"{div} does not divide {dim}={dims[dim]} of {source}")
