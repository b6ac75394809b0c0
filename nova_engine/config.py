"""Run configuration: small nested dataclasses (this module) read from YAML recipes with
`key=value` overrides (`nova_engine.recipe.load_recipe`).

This module holds the sections every stage shares (model, parallel, data, optim, train,
checkpoint) and `RunConfig`; each stage's RunConfig subclass (with its own sections, e.g.
DPO's `loss`) lives next to the stage in nova_engine.train.stages, whose registry names the
stages (`nova_engine.recipe.run_config_class`); this module never imports a stage.

A recipe is one YAML file per model: sections shared by every stage at the top (any
RunConfig section of any stage), then one section per stage (`sft:`, `dpo:`) that overrides
any of them (see recipes/tiny_cpu.yaml).
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
import importlib.util
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A bad recipe key or value: the message names the dotted key and what was expected."""

    def __init__(self, key: str, msg: str, source: str | None = None):
        self.key, self.msg, self.source = key, msg, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {msg}")


def check(cond: bool, key: str, msg: str) -> None:
    """Raise ConfigError(key, msg) unless `cond` (for __post_init__ validation)."""
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
            check(getattr(self, k) >= 1, k, f"expected >= 1, got {getattr(self, k)}")
        h, nh, nkv = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        check(h % nh == 0, "hidden_size", f"{h} does not divide by num_attention_heads={nh}")
        check(
            nh % nkv == 0,
            "num_attention_heads",
            f"{nh} does not divide by num_key_value_heads={nkv}",
        )

    def hf_config_kwargs(self) -> dict[str, Any]:
        """The HF config.json fields (everything but family and init_seed)."""
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if k not in ("family", "init_seed")}


@dataclass
class LoRAConfig:
    """LoRA adapters on the decoder's linears (nova_engine.model.lora): the base weights are
    frozen (no gradient buffers, no optimizer state), only A and B (and a score head) train."""

    rank: int = 16
    """Adapter rank r."""
    alpha: float = 32.0
    """Scaling numerator: the adapter adds (alpha / rank) * B A x."""
    dropout: float = 0.0
    """Dropout on the adapter's input (exact under TP only at 0)."""
    targets: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    """Module kinds that get adapters: qkv, proj (attention output), fc1 (gate+up), fc2, and
    optionally lm_head (an untied LM head; its adapter enters as W + (alpha/r) B A)."""
    seed: int = 0
    """Seed of A's init (B starts at 0, so step 0 is the base model)."""

    def __post_init__(self) -> None:
        kinds = ("qkv", "proj", "fc1", "fc2", "lm_head")
        check(self.rank >= 1, "rank", f"expected an integer >= 1, got {self.rank}")
        check(self.alpha > 0, "alpha", f"expected a number > 0, got {self.alpha}")
        check(0 <= self.dropout < 1, "dropout", f"expected 0 <= dropout < 1, got {self.dropout}")
        bad = [t for t in self.targets if t not in kinds]
        check(
            bool(self.targets) and not bad, "targets",
            f"expected a non-empty list of {list(kinds)}, got {self.targets}",
        )  # fmt: skip
        check(len(set(self.targets)) == len(self.targets), "targets", "expected no repeats")


@dataclass
class ModelConfig:
    hf_path: str = ""
    """Local Hugging Face model directory (config.json, safetensors, tokenizer files)."""
    tokenizer_path: str | None = None
    """Tokenizer directory when it differs from hf_path."""
    build: TinyModelConfig | None = None
    """If set and hf_path holds no model yet, a random model of these dimensions is built
    there first (the CPU demo); vocab size comes from the tokenizer."""
    lora: LoRAConfig | None = None
    """LoRA adapters ({rank, alpha, dropout, targets}); None = full training (all weights)."""

    def __post_init__(self) -> None:
        check(bool(self.hf_path), "hf_path", "expected a local HF model directory")

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
            check(getattr(self, k) >= 1, k, f"expected an integer >= 1, got {getattr(self, k)}")
        check(not self.sp or self.tp > 1, "sp", "sequence parallelism needs tp > 1")
        check(self.vpp == 1 or self.pp > 1, "vpp", "virtual stages need pp > 1")

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp

    def validate_world(self, world_size: int) -> int:
        """Data-parallel size for `world_size` ranks (ConfigError unless tp*pp divides it)."""
        mp, tp, pp = self.model_parallel_size, self.tp, self.pp
        msg = f"world size {world_size} is not a multiple of tp*pp = {tp}*{pp} = {mp}"
        check(world_size >= 1 and world_size % mp == 0, "parallel", msg)
        return world_size // mp

    def validate_layers(self, num_layers: int) -> None:
        """The model's layers must split evenly over pp*vpp chunks."""
        chunks = self.pp * self.vpp
        msg = f"{num_layers} layers do not split over pp*vpp = {chunks} chunks"
        check(num_layers % chunks == 0, "parallel", msg)


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
    template: str | None = None
    """Chat template replacing the tokenizer's: a built-in name ("tulu", "chatml") or a
    Jinja file (for a base model without one, e.g. Tülu 3's format on Llama-3.1-8B)."""

    def __post_init__(self) -> None:
        check(self.max_length >= 2, "max_length", f"expected >= 2, got {self.max_length}")
        check(bool(self.margin_key), "margin_key", "expected a non-empty key name")


MAX_LR = 1.0  # above this no AdamW run trains: the weights turn to garbage within a step


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
        check(
            0 < self.lr <= MAX_LR,
            "lr",
            f"expected a learning rate in (0, {MAX_LR:g}] (AdamW rates are ~1e-7..1e-3), "
            f"got {self.lr}",
        )
        check(0 <= self.min_lr <= self.lr, "min_lr", f"expected 0 <= min_lr <= lr={self.lr}")
        check(self.weight_decay >= 0, "weight_decay", "expected >= 0")
        check(all(0 <= b < 1 for b in self.betas), "betas", "expected two values in [0, 1)")
        check(self.eps > 0, "eps", "expected > 0")
        check(self.grad_clip >= 0, "grad_clip", "expected >= 0 (0 = off)")
        check(
            self.warmup_steps is None or self.warmup_ratio is None,
            "warmup_steps",
            "set warmup_steps or warmup_ratio, not both",
        )
        check(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps", "expected >= 0")
        r = self.warmup_ratio
        check(r is None or 0 <= r < 1, "warmup_ratio", f"expected in [0, 1), got {r}")

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps for a run of `total_steps`."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int(total_steps * (self.warmup_ratio or 0.0))


@dataclass
class SpeedConfig:
    """GPU speed switches (`train.speed.<key>`). None = automatic: on when CUDA is available
    and the kernel exists (TE/apex-dependent ones only when importable), off on CPU (CPU
    numerics never change); true/false forces the switch."""

    overlap_grad_reduce: bool | None = None
    """megatron DDP: reduce gradient buckets during backward (auto: on with CUDA)."""
    overlap_param_gather: bool | None = None
    """Distributed optimizer: all-gather updated parameters during the next forward (auto: on
    with CUDA and parallel.distributed_optimizer; true needs distributed_optimizer)."""
    bias_swiglu_fusion: bool | None = None
    """megatron's fused SwiGLU in the MLP (not with train.fuse_elementwise)."""
    apply_rope_fusion: bool | None = None
    """Transformer Engine's fused RoPE kernel (needs TE's layer spec)."""
    masked_softmax_fusion: bool | None = None
    """megatron's fused scale-mask-softmax (only read by megatron's local attention)."""
    bias_dropout_fusion: bool | None = None
    """megatron's fused bias-dropout-add after attention and MLP."""
    gradient_accumulation_fusion: bool | None = None
    """Weight gradients accumulated into the fp32 main_grad in the GEMM (TE or apex)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            check(
                v is None or isinstance(v, bool), f.name, f"expected true, false or null, got {v!r}"
            )


REPORT_TO = ("tensorboard", "wandb", "mlflow")  # train.report_to: trackers (metrics.py)


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
    fuse_elementwise: bool = False
    """RMSNorm and SwiGLU through torch.compile (nova_engine.model.fused; the saving per
    step: benchmarks/bench_vs_peers.py); the first step pays a one-time compile. Transformer
    Engine's layer spec, when used, fuses its own."""
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    """GPU speed switches (overlap of DP communication, megatron's fusions); automatic."""
    tensorboard: bool = True
    """Write TensorBoard events under out_dir/tensorboard (when tensorboard is importable)."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that get every metric besides metrics.jsonl: any of "tensorboard"
    (out_dir/tensorboard, required to import), "wandb" (project $WANDB_PROJECT or "nova";
    WANDB_MODE=offline works without an account), "mlflow" ($MLFLOW_TRACKING_URI, default
    out_dir/mlruns). Each package must be installed (checked when the config loads)."""
    max_bad_steps: int = 3
    """A NaN/Inf loss or gradient skips the update; this many in a row stop the run
    (0 = never stop)."""
    divergence_factor: float = 10.0
    """Warn when the loss exceeds this multiple of its running mean (0 = off)."""
    zero_grad_steps: int = 3
    """Warn when the gradient norm is 0 for this many steps in a row (0 = off)."""
    save_on_signal: bool = True
    """SIGINT/SIGTERM (Ctrl-C, preemption): save a checkpoint at the next step boundary and
    exit quietly (False: exit at that boundary without saving)."""

    def __post_init__(self) -> None:
        for k in ("global_batch_size", "micro_batch_tokens", "epochs", "log_every"):
            check(getattr(self, k) >= 1, k, f"expected >= 1, got {getattr(self, k)}")
        for k in ("eval_every", "save_every", "max_bad_steps", "zero_grad_steps"):
            check(getattr(self, k) >= 0, k, f"expected >= 0, got {getattr(self, k)}")
        check(self.max_steps is None or self.max_steps >= 1, "max_steps", "expected >= 1")
        check(self.divergence_factor >= 0, "divergence_factor", "expected >= 0 (0 = off)")
        for name in self.report_to:
            check(
                name in REPORT_TO,
                "report_to",
                f"unknown tracker {name!r}; expected any of {', '.join(REPORT_TO)}",
            )
            check(
                importlib.util.find_spec(name) is not None,
                "report_to",
                f"{name} is not installed (pip install {name}, or remove it from the list)",
            )
        check(len(set(self.report_to)) == len(self.report_to), "report_to", "a tracker twice")

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
    """"auto": the latest intact checkpoint under dir, if any, refusing when the run's
    model/data/training config changed since (the error lists the keys); "force": the same
    but resuming despite a changed config; "none"; or a checkpoint path (resumed despite a
    changed config, with a warning listing the changes)."""
    export_hf: bool = True
    """Export the final model to <train.out_dir>/hf as a HF directory."""
    hf_in_checkpoints: bool = True
    """Also write a HF export (hf/) into every checkpoint: it is what loads a checkpoint into
    another TP x PP layout and what `nova export` copies. At 70B it costs a full gather and
    ~140 GB per save: turn it off there (checkpoints then resume on the same layout only)."""

    check_free_space: bool = True
    """Before the model loads, check that dir has room for one checkpoint (turn off where
    each node writes to its own disk: the estimate is for the whole checkpoint)."""
    format: Literal["torch", "dist"] = "torch"
    """"torch": per-rank files, resume at the same layout only; "dist": megatron-core
    dist_checkpointing (nova_engine.train.dist_checkpoint), resumes into another
    TP/PP/VPP/SP/DP layout with the optimizer state, with the distributed optimizer on or
    off (either may change between runs). Needs the training ranks to be the whole world
    (megatron-core 0.16.1 checkpoints over the default group). Resuming reads a checkpoint
    in the format it was written in, whatever this key says."""
    async_save: bool = False
    """Write checkpoints in the background (nova_engine.train.async_checkpoint, either
    format): a save stages the rank's state into host buffers (format dist: after
    megatron's save planning, which stays synchronous) and training goes on while a writer
    thread writes the same files. Extra host memory: one copy of what the rank writes (a
    save waits for the previous one). The hf/ export (a gather) stays synchronous. The final
    save and a SIGTERM save are complete before the run exits; a crash mid-write leaves the
    previous checkpoint the newest."""

    def __post_init__(self) -> None:
        check(self.keep_last >= 0, "keep_last", "expected >= 0 (0 = keep all)")
        check(isinstance(self.async_save, bool), "async_save", "expected true or false")
        check(
            self.format in ("torch", "dist"),
            "format",
            f'expected "torch" or "dist", got {self.format!r}',
        )
        check(bool(self.resume), "resume", 'expected "auto", "force", "none" or a path')


@dataclass
class EvalConfig:
    """An evaluation hook run on exports (`eval.<key>`)."""

    command: str | None = None
    """Shell command run on rank 0 after each HF export (the final out_dir/hf, and every
    checkpoint's hf/ with on_checkpoints): "{export}" and $NOVA_EXPORT_DIR are the export's
    directory, "{step}" and $NOVA_STEP its step. Exit code and output tail go to
    metrics.jsonl; a failure is logged, it never stops the run."""
    timeout_s: float = 3600.0
    """Stop the command after this many seconds (logged as timed out)."""
    on_checkpoints: bool = False
    """Also run it on each checkpoint's hf/ export (the other ranks wait: keep timeout_s
    under the process group's timeout)."""

    def __post_init__(self) -> None:
        check(self.command is None or bool(self.command.strip()), "command", "empty command")
        check(self.timeout_s > 0, "timeout_s", f"expected > 0, got {self.timeout_s}")


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
    eval: EvalConfig = field(default_factory=EvalConfig)

    stage: typing.ClassVar[str] = ""
    data_format: typing.ClassVar[str] = "chat"

    def __post_init__(self) -> None:
        fmt = self.data.format
        check(
            fmt in ("auto", self.data_format),
            "data.format",
            f'the {self.stage} stage reads "{self.data_format}" data, got "{fmt}"',
        )
        need = self.data.max_length * (2 if self.data_format == "pairs" else 1)
        check(
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

    def model_dims(self) -> tuple[dict[str, int], str] | None:
        """(the model dimensions a layout must divide, where they were read): the model's
        config.json, or (a model still to be built) `model.build` with the tokenizer's vocab.
        None when neither exists yet (the model loader then reports it)."""
        keys = ("num_attention_heads", "num_key_value_heads", "vocab_size",
                "intermediate_size", "num_hidden_layers")  # fmt: skip
        path = os.path.join(self.model.hf_path, "config.json")
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    cfg = json.load(f)
            except (OSError, json.JSONDecodeError):
                return None  # unreadable: the model loader names the problem
            cfg.setdefault("num_key_value_heads", cfg.get("num_attention_heads"))
            if not all(isinstance(cfg.get(k), int) for k in keys):
                return None
            return {k: cfg[k] for k in keys}, path
        b = self.model.build
        if b is None:
            return None
        from nova_engine.data.tokenize import load_tokenizer

        dims = {k: getattr(b, k) for k in keys if k != "vocab_size"}
        dims["vocab_size"] = len(load_tokenizer(self.model.tokenizer_dir))
        return dims, "model.build (+ the tokenizer's vocab)"

    def validate_layout(self, world_size: int) -> int:
        """Everything about the layout that can be checked before any process group
        exists: `validate_world`, then TP/PP/VP against the model's heads, KV heads, vocab,
        FFN width and layers. Returns dp; ConfigError names the parallel key."""
        dp = self.validate_world(world_size)
        tp, mbt = self.parallel.tp, self.train.micro_batch_tokens
        if mbt % tp:  # packed micro-batches are split over the TP ranks (sequence dim)
            raise ConfigError(
                "train.micro_batch_tokens", f"{mbt} is not a multiple of parallel.tp={tp}"
            )
        found = self.model_dims()
        if found is None:
            return dp
        dims, source = found
        p = self.parallel
        checks = [
            ("parallel.tp", p.tp, k)
            for k in (
                "num_attention_heads",
                "num_key_value_heads",
                "vocab_size",
                "intermediate_size",
            )
        ]
        checks.append(("parallel.pp", p.pp * p.vpp, "num_hidden_layers"))  # fmt: skip
        for key, div, dim in checks:
            if dims[dim] % div:
                what = f"pp*vpp = {p.pp}*{p.vpp} = {div}" if key == "parallel.pp" else f"tp={div}"
                raise ConfigError(key, f"{what} does not divide {dim}={dims[dim]} of {source}")
        return dp

    def tokenizer(self) -> Any:
        """The run's HF tokenizer: model.tokenizer_dir with data.template applied."""
        from nova_engine.data.tokenize import load_tokenizer

        return load_tokenizer(self.model.tokenizer_dir, self.data.template)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, **dataclasses.asdict(self)}

    def hash(self) -> str:
        return config_hash(self)


def config_hash(obj: Any, length: int = 16) -> str:
    """Stable hex digest of a config (dataclass or JSON-able value): sha256 of its canonical
    JSON (sorted keys, tuples as lists). Equal configs hash equal across runs/processes."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
