"""Run configuration: small nested dataclasses (this module) read from YAML recipes with
`key=value` overrides (`nova_engine.recipe.load_recipe`).

A recipe is one YAML file per model: sections shared by every stage at the top (any
RunConfig section: model, parallel, data, optim, train, checkpoint, loss), then one section
per stage (`sft:`, `dpo:`) that overrides any of them (see recipes/tiny_cpu.yaml).
`load_recipe(path, "sft", ["optim.lr=1e-5", "parallel.tp=2"])` deep-merges the shared
sections with the stage's and applies the overrides (dotted keys relative to the stage's
RunConfig), typed by the dataclass fields. Unknown keys raise `ConfigError` naming the key
and the valid keys; bad values name the key and what was expected.

Batch size convention: `train.global_batch_size` counts *sequences* per optimizer step (SFT
conversations, DPO pairs), as Tülu 3's "batch 128" does. A step's sequences are split evenly
over the DP ranks and packed into micro-batches of at most `train.micro_batch_tokens` tokens
(the count of micro-batches varies per step); the loss is normalized by the step's global
count of loss tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

# The names of nova_engine.losses.dpo.DPO_LOSSES (kept here so loading a config needs no torch;
# tests/engine/test_config.py checks the two agree).
DPO_LOSS_TYPES = ("sigmoid", "dpo_norm", "ipo", "simpo", "hinge", "cdpo")


class ConfigError(ValueError):
    """A bad recipe key or value: the message names the dotted key and what was expected."""

    def __init__(self, key: str, msg: str, source: str | None = None):
        self.key, self.msg, self.source = key, msg, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {msg}")


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(key, msg)


# ---------------------------------------------------------------------------- sections


@dataclass
class TinyModelConfig:
    """A randomly initialized model built locally (the CPU demo); field names are HF
    config.json keys (`hf_config_kwargs()` passes them on, e.g. to
    nova_engine.model.tiny.build_tiny_hf_model)."""

    family: Literal["llama", "qwen2"] = "llama"
    """Architecture family."""
    hidden_size: int = 64
    """Model width."""
    intermediate_size: int = 172
    """SwiGLU inner width."""
    num_hidden_layers: int = 2
    """Decoder layers."""
    num_attention_heads: int = 4
    """Attention heads."""
    num_key_value_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    max_position_embeddings: int = 512
    """Longest position the RoPE tables cover."""
    rope_theta: float = 10000.0
    """RoPE base."""
    tie_word_embeddings: bool = True
    """Share the input embedding and the LM head."""
    init_seed: int = 0
    """Seed of the random initialization."""

    def __post_init__(self) -> None:
        dims = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for k in (*dims, "num_key_value_heads"):
            _check(getattr(self, k) >= 1, k, f"expected >= 1, got {getattr(self, k)}")
        h, nh, nkv = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        _check(h % nh == 0, "hidden_size", f"{h} does not divide by num_attention_heads={nh}")
        _check(
            nh % nkv == 0,
            "num_attention_heads",
            f"{nh} does not divide by num_key_value_heads={nkv}",
        )

    def hf_config_kwargs(self) -> dict[str, Any]:
        """The HF config.json fields (everything but family and init_seed)."""
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if k not in ("family", "init_seed")}


@dataclass
class ModelConfig:
    hf_path: str = ""
    """Local Hugging Face model directory (config.json, safetensors, tokenizer files)."""
    tokenizer_path: str | None = None
    """Tokenizer directory when it differs from hf_path."""
    build: TinyModelConfig | None = None
    """If set and hf_path holds no model yet, a random model of these dimensions is built
    there first (the CPU demo); vocab size comes from the tokenizer."""

    def __post_init__(self) -> None:
        _check(bool(self.hf_path), "hf_path", "expected a local HF model directory")

    @property
    def tokenizer_dir(self) -> str:
        return self.tokenizer_path or self.hf_path


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    vpp: int = 1
    """Virtual pipeline stages (model chunks) per pipeline rank; 1 = no interleaving."""
    sp: bool = False
    """Sequence parallelism (needs tp > 1): LayerNorm/dropout activations sharded over TP."""
    distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""

    def __post_init__(self) -> None:
        for k in ("tp", "pp", "vpp"):
            _check(getattr(self, k) >= 1, k, f"expected an integer >= 1, got {getattr(self, k)}")
        _check(not self.sp or self.tp > 1, "sp", "sequence parallelism needs tp > 1")
        _check(self.vpp == 1 or self.pp > 1, "vpp", "virtual stages need pp > 1")

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp

    def validate_world(self, world_size: int) -> int:
        """Data-parallel size for `world_size` ranks (ConfigError unless tp*pp divides it)."""
        mp, tp, pp = self.model_parallel_size, self.tp, self.pp
        msg = f"world size {world_size} is not a multiple of tp*pp = {tp}*{pp} = {mp}"
        _check(world_size >= 1 and world_size % mp == 0, "parallel", msg)
        return world_size // mp

    def validate_layers(self, num_layers: int) -> None:
        """The model's layers must split evenly over pp*vpp chunks."""
        chunks = self.pp * self.vpp
        msg = f"{num_layers} layers do not split over pp*vpp = {chunks} chunks"
        _check(num_layers % chunks == 0, "parallel", msg)


@dataclass
class DataConfig:
    train_paths: list[str] = field(default_factory=list)
    """Training JSONL files (read in this order; sample indices are dense across them)."""
    eval_paths: list[str] = field(default_factory=list)
    """Held-out JSONL files of the same format (empty = no evaluation)."""
    format: Literal["auto", "chat", "pairs"] = "auto"
    """"chat" (messages), "pairs" (preferences); "auto" = what the stage reads."""
    max_length: int = 4096
    """Maximum tokens per sequence (for pairs: chosen and rejected each)."""
    truncation: Literal["truncate", "drop"] = "truncate"
    """Longer sequences are cut (dropped if no loss token is left) or dropped."""
    on_bad_line: Literal["error", "skip"] = "error"
    """A malformed line stops the run (file:line) or is skipped and counted."""
    margin_key: str = "margin"
    """Preference-strength field of pair records (default 1 when absent)."""
    shuffle: bool = True
    """Shuffle samples each epoch (seeded by `seed` and the epoch)."""
    seed: int = 1234
    """Data order seed."""
    eval_max_samples: int | None = None
    """Evaluate on at most this many held-out samples."""

    def __post_init__(self) -> None:
        _check(self.max_length >= 2, "max_length", f"expected >= 2, got {self.max_length}")
        _check(bool(self.margin_key), "margin_key", "expected a non-empty key name")


@dataclass
class OptimConfig:
    lr: float = 1e-5
    """Peak learning rate (after warmup)."""
    min_lr: float = 0.0
    """Floor of the decay (linear and cosine end here)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    """LR decay after warmup (see nova_engine.train.schedules)."""
    warmup_steps: int | None = None
    """Linear warmup steps; exclusive with warmup_ratio."""
    warmup_ratio: float | None = None
    """Warmup as a fraction of the total steps (floor), as open-instruct computes it."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "lr", f"expected > 0, got {self.lr}")
        _check(0 <= self.min_lr <= self.lr, "min_lr", f"expected 0 <= min_lr <= lr={self.lr}")
        _check(self.weight_decay >= 0, "weight_decay", "expected >= 0")
        _check(all(0 <= b < 1 for b in self.betas), "betas", "expected two values in [0, 1)")
        _check(self.eps > 0, "eps", "expected > 0")
        _check(self.grad_clip >= 0, "grad_clip", "expected >= 0 (0 = off)")
        _check(
            self.warmup_steps is None or self.warmup_ratio is None,
            "warmup_steps",
            "set warmup_steps or warmup_ratio, not both",
        )
        _check(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps", "expected >= 0")
        r = self.warmup_ratio
        _check(r is None or 0 <= r < 1, "warmup_ratio", f"expected in [0, 1), got {r}")

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps for a run of `total_steps`."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int(total_steps * (self.warmup_ratio or 0.0))


@dataclass
class TrainConfig:
    global_batch_size: int = 128
    """Sequences (SFT conversations / DPO pairs) per optimizer step, over all DP ranks."""
    micro_batch_tokens: int = 8192
    """Token capacity of one packed micro-batch (a DPO pair is packed whole)."""
    epochs: int = 1
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    eval_every: int = 0
    """Evaluate every N steps (0 = only at the end, if eval_paths is set)."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    log_every: int = 1
    """Progress line / metrics every N steps."""
    seed: int = 1234
    """Seed for weights init (when built), dropout and the RNG states saved in checkpoints."""
    out_dir: str = "runs/run"
    """Run directory: metrics.jsonl, tensorboard/, checkpoints/, hf/ (the final export)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute: none, selective (core attention), full (every layer)."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16 weights/activations with fp32 master weights and grads, or fp32 throughout."""
    tensorboard: bool = True
    """Write TensorBoard events under out_dir/tensorboard (when tensorboard is importable)."""

    def __post_init__(self) -> None:
        for k in ("global_batch_size", "micro_batch_tokens", "epochs", "log_every"):
            _check(getattr(self, k) >= 1, k, f"expected >= 1, got {getattr(self, k)}")
        for k in ("eval_every", "save_every"):
            _check(getattr(self, k) >= 0, k, f"expected >= 0, got {getattr(self, k)}")
        _check(self.max_steps is None or self.max_steps >= 1, "max_steps", "expected >= 1")

    def total_steps(self, num_samples: int) -> int:
        """Optimizer steps of the run for a data set of `num_samples` sequences (the last
        partial batch of an epoch counts as a step)."""
        if self.max_steps is not None:
            return self.max_steps
        return self.epochs * math.ceil(num_samples / self.global_batch_size)


@dataclass
class CheckpointConfig:
    dir: str | None = None
    """Checkpoint root (default: <train.out_dir>/checkpoints)."""
    keep_last: int = 2
    """Complete checkpoints kept (older ones are deleted); 0 = keep all."""
    resume: str = "auto"
    """"auto" (latest complete checkpoint under dir, if any), "none", or a checkpoint path."""
    export_hf: bool = True
    """Export the final model to <train.out_dir>/hf as a HF directory."""
    hf_in_checkpoints: bool = True
    """Also write a HF export (hf/) into every checkpoint: it is what loads a checkpoint into
    another TP x PP layout and what `nova export` copies. At 70B it costs a full gather and
    ~140 GB per save: turn it off there (checkpoints then resume on the same layout only)."""

    def __post_init__(self) -> None:
        _check(self.keep_last >= 0, "keep_last", "expected >= 0 (0 = keep all)")
        _check(bool(self.resume), "resume", 'expected "auto", "none" or a path')


@dataclass
class DPOConfig:
    loss_type: str = "dpo_norm"
    """One of DPO_LOSS_TYPES: sigmoid (DPO), dpo_norm (length-normalized, Tülu 3), ipo,
    simpo, hinge, cdpo (label-smoothed)."""
    beta: float = 5.0
    """Inverse temperature of the implicit reward (Tülu 3 dpo_norm: 5; sigmoid DPO ~0.1)."""
    label_smoothing: float = 0.0
    """Assumed probability that a label is flipped (cdpo needs it in (0, 0.5); ipo and
    hinge take none)."""
    gamma_beta_ratio: float = 0.5
    """SimPO target margin gamma / beta."""
    ref_cache_dir: str | None = None
    """Where reference log-probs are cached (default: <train.out_dir>/ref_cache)."""

    def __post_init__(self) -> None:
        t, eps = self.loss_type, self.label_smoothing
        _check(
            t in DPO_LOSS_TYPES,
            "loss_type",
            f"expected one of {', '.join(DPO_LOSS_TYPES)}, got {t!r}",
        )
        _check(self.beta > 0, "beta", f"expected > 0, got {self.beta}")
        _check(0 <= eps < 0.5, "label_smoothing", f"expected in [0, 0.5), got {eps}")
        _check(t != "cdpo" or eps > 0, "label_smoothing", "cdpo needs a value in (0, 0.5)")
        _check(t not in ("ipo", "hinge") or eps == 0, "label_smoothing", f"{t} takes none")

    @property
    def needs_reference(self) -> bool:
        return self.loss_type != "simpo"

    def to_loss_config(self) -> Any:
        """The nova_engine.losses.dpo.DPOConfig with these settings."""
        from nova_engine.losses.dpo import DPOConfig as LossDPOConfig

        return LossDPOConfig(
            loss_type=self.loss_type,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            gamma_beta_ratio=self.gamma_beta_ratio,
        )


# ---------------------------------------------------------------------------- run configs


@dataclass
class RunConfig:
    """What every stage has. `stage` is set by the subclass."""

    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    stage: typing.ClassVar[str] = ""
    data_format: typing.ClassVar[str] = "chat"

    def __post_init__(self) -> None:
        fmt = self.data.format
        _check(
            fmt in ("auto", self.data_format),
            "data.format",
            f'the {self.stage} stage reads "{self.data_format}" data, got "{fmt}"',
        )
        need = self.data.max_length * (2 if self.data_format == "pairs" else 1)
        _check(
            self.train.micro_batch_tokens >= need,
            "train.micro_batch_tokens",
            f"{self.train.micro_batch_tokens} cannot hold one {self.stage} sample of up to "
            f"{need} tokens (data.max_length={self.data.max_length})",
        )

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.train.out_dir, "checkpoints")

    def validate_world(self, world_size: int) -> int:
        """Data-parallel size; checks tp*pp | world_size and dp | global_batch_size."""
        dp = self.parallel.validate_world(world_size)
        if self.train.global_batch_size % dp:
            raise ConfigError(
                "train.global_batch_size",
                f"{self.train.global_batch_size} sequences do not split over dp={dp} ranks",
            )
        return dp

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, **dataclasses.asdict(self)}

    def hash(self) -> str:
        return config_hash(self)


@dataclass
class SFTRunConfig(RunConfig):
    stage: typing.ClassVar[str] = "sft"
    data_format: typing.ClassVar[str] = "chat"


@dataclass
class DPORunConfig(RunConfig):
    loss: DPOConfig = field(default_factory=DPOConfig)

    stage: typing.ClassVar[str] = "dpo"
    data_format: typing.ClassVar[str] = "pairs"

    @property
    def ref_cache_dir(self) -> str:
        return self.loss.ref_cache_dir or os.path.join(self.train.out_dir, "ref_cache")

    def ref_config(self) -> dict[str, Any]:
        """The settings that change reference log-probs (beyond model and data content):
        tokenization and numeric precision. Hash it into the reference-cache key."""
        keys = ("max_length", "truncation", "on_bad_line", "margin_key")
        out = {k: getattr(self.data, k) for k in keys}
        out["tokenizer_dir"] = os.path.abspath(self.model.tokenizer_dir)
        return out | {"precision": self.train.precision}


STAGES: dict[str, type[RunConfig]] = {"sft": SFTRunConfig, "dpo": DPORunConfig}


def config_hash(obj: Any, length: int = 16) -> str:
    """Stable hex digest of a config (dataclass or JSON-able value): sha256 of its canonical
    JSON (sorted keys, tuples as lists). Equal configs hash equal across runs/processes."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
