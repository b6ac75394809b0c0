"""`ModelEngine`: one model on one parallel layout — its megatron chunks, heads, and (when it
trains) DDP, optimizer and LR schedule.

    ps = initialize_parallel(tp=2, seed=1)                       # the world's first layout
    policy = ModelEngine.from_hf(model_dir, ps, optim=run.optim, total_steps=T)
    rm_ps = new_parallel_state(tp=1, pp=2)                       # another layout, same world
    rm = ModelEngine.from_hf(rm_dir, rm_ps, trainable=False, score_outputs=1)

    results = policy.forward_backward(mbs, loss_fn)   # grads of one optimizer step
    ok, grad_norm, lr = policy.step()                 # clip + Adam + LR schedule
    scores = rm.forward_collect(mbs, lambda model, hidden, mb: sequence_scores(model, hidden, mb, rm_ps))

Every megatron piece gets the layout's explicit groups (`ps.pg_collection`): GPTModel, DDP, the
optimizer and the pipeline schedules (nova_engine.parallel.pipeline), so engines at different
layouts share one torchrun world. A frozen engine (`trainable=False`) is neither DDP-wrapped
nor given an optimizer: its parameters do not require grad and no gradient buffer exists.

Callbacks (run on the last pipeline stage, once per micro-batch, with hidden [T(/tp), 1, H]):
    loss_fn(model, hidden, mb) -> (loss, count, {metric: value})   # forward_backward
    fn(model, hidden, mb) -> tensor | dict of tensors               # forward_collect
`model` is the chunk (pass it to nova_engine.model.heads: token_logprobs, sequence_scores).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from nova_engine.logging import get_logger
from nova_engine.model.heads import ScoreHead, attach_score_head, unwrap
from nova_engine.parallel.state import ParallelState

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import MegatronOptimizer

    from nova_engine.config import LoRAConfig, OptimConfig, SpeedConfig
    from nova_engine.generate import Generation, Request, SamplingParams
    from nova_engine.model.arch import ModelArch
    from nova_engine.model.build import NovaGPTModel
    from nova_engine.train.schedules import LRScheduler

logger = get_logger(__name__)

# A micro-batch: a PackedBatch, or an object that reads as one (the RL micro-batches of
# nova_engine.rl.minibatch carry their per-token tensors alongside).
MicroBatch = Any
LossFn = Callable[
    [torch.nn.Module, torch.Tensor, MicroBatch], tuple[torch.Tensor, Any, dict[str, Any]]
]
CollectFn = Callable[[torch.nn.Module, torch.Tensor, MicroBatch], Any]


class ModelEngine:
    """One model (this rank's chunks of it) on the layout `ps`.

    Args:
        arch: nova_engine.model.arch.ModelArch.
        ps: the layout (initialize_parallel or new_parallel_state).
        name: the engine's name in a loop and in checkpoints ("policy", "reference", ...).
        weights_dir: HF directory to load (None: megatron's random init, for benchmarks).
        trainable: False = frozen (no DDP wrapper, no grad buffers, no optimizer).
        optim: nova_engine.config.OptimConfig (None: no optimizer, e.g. eval-only).
        total_steps: optimizer steps of the run (the LR schedule's length).
        precision, recompute, fuse_elementwise: as TrainConfig.
        distributed_optimizer: shard the optimizer state over DP (ZeRO-1).
        speed: GPU speed switches (nova_engine.config.SpeedConfig; None = automatic: DP
            communication overlap and megatron's fusions on with CUDA, off on CPU).
        score_outputs: K > 0 attaches a K-output score head (`nova_engine.model.heads`) to
            the last stage; score_init_seed seeds its init.
        lora: nova_engine.config.LoRAConfig: LoRA adapters on the decoder linears, base
            weights frozen (a score head still trains in full); None = all weights train.
    """

    def __init__(
        self,
        arch: ModelArch,
        ps: ParallelState,
        *,
        name: str = "policy",
        weights_dir: str | None = None,
        trainable: bool = True,
        optim: OptimConfig | None = None,
        total_steps: int = 1,
        precision: str = "fp32",
        recompute: str = "none",
        fuse_elementwise: bool = False,
        distributed_optimizer: bool = False,
        score_outputs: int = 0,
        score_init_seed: int = 0,
        speed: SpeedConfig | None = None,
        lora: LoRAConfig | None = None,
    ):
        from nova_engine.model.build import build_model
        from nova_engine.parallel.pipeline import wrap_ddp

        self.arch, self.ps, self.name = arch, ps, name
        self.trainable, self.precision = trainable, precision
        # a checkpoint fills the weights: no random init (nor, on GPU, CPU master weights)
        self.chunks = build_model(
            arch, ps, precision=precision, recompute=recompute, fuse_elementwise=fuse_elementwise,
            init_weights=weights_dir is None, speed=speed,
            use_te=False if lora is not None else None,  # LoRA hooks megatron's local linears
        )  # fmt: skip
        for c in self.chunks:
            c.return_hidden = True
        if score_outputs and ps.is_last_stage():
            attach_score_head(self.chunks[-1], score_outputs, init_seed=score_init_seed)
        if score_outputs and not arch.tie_word_embeddings:
            # a score model never reads its (untied) LM head: no gradient buffer, no optimizer
            # state (at 8B with a 128k vocab, ~6 GB of Adam state), no weight decay on it
            for c in self.chunks:
                if getattr(c, "output_layer", None) is not None:
                    c.output_layer.weight.requires_grad_(False)
        self.lora = lora
        if lora is not None:  # before DDP: frozen base weights get no grad buffers
            from nova_engine.model.heads import SCORE_PARAM
            from nova_engine.model.lora import apply_lora

            apply_lora(self.chunks, lora, keep_trainable=(SCORE_PARAM,) if score_outputs else ())
        if weights_dir is not None:
            self.load_hf(weights_dir)
        self.optimizer: MegatronOptimizer | None = None
        self.scheduler: LRScheduler | None = None
        # what the schedules run: the chunks' megatron DDP wrappers, or the frozen chunks
        self.models: list[DistributedDataParallel] | list[NovaGPTModel]
        if not trainable:
            for c in self.chunks:
                c.requires_grad_(False)
            self.models = list(self.chunks)
            return
        dist_opt = distributed_optimizer and optim is not None
        self.models = wrap_ddp(self.chunks, ps, use_distributed_optimizer=dist_opt, speed=speed)
        if optim is not None:
            from nova_engine.train.optim import build_optimizer
            from nova_engine.train.schedules import LRScheduler

            self.optimizer = build_optimizer(
                self.models, optim, precision=precision, distributed=dist_opt,
                pg_collection=ps.pg_collection,
            )  # fmt: skip
            self.scheduler = LRScheduler.from_config(optim, total_steps)

    @classmethod
    def from_hf(cls, model_dir: str, ps: ParallelState, **kwargs: Any) -> ModelEngine:
        """The model of a HF directory (its config.json gives the architecture)."""
        from nova_engine.model.arch import load_arch

        return cls(load_arch(model_dir), ps, weights_dir=model_dir, **kwargs)

    # -- properties ----------------------------------------------------------------------

    @property
    def has_score_head(self) -> bool:
        return any(hasattr(unwrap(c), "score") for c in self.chunks)

    def train(self, mode: bool = True) -> None:
        for m in self.models:
            m.train(mode)

    # -- forward / backward --------------------------------------------------------------

    def _schedule(
        self,
        microbatches: Sequence[MicroBatch],
        step_fn: Callable[..., tuple[torch.Tensor, Callable[..., Any]]],
        *,
        forward_only: bool,
        collect: bool = False,
    ) -> list[Any]:
        from nova_engine.parallel.pipeline import forward_backward

        return forward_backward(
            self.models,
            self.ps,
            list(microbatches),
            step_fn,
            seq_length=max(mb.num_tokens for mb in microbatches),
            forward_only=forward_only,
            collect_non_loss_data=collect,
        )

    def forward_backward(
        self, microbatches: Sequence[MicroBatch], loss_fn: LossFn, *, forward_only: bool = False
    ) -> list[dict[str, Any]]:
        """Forward and backward over this rank's micro-batches (packed batches on
        `ps.device`); gradients (zeroed first, summed over DP, finalized) are ready for
        `step()`. Returns the last stage's metric dicts (one per micro-batch; [] on other
        stages). `forward_only=True`: the same loss_fn without backward (evaluation)."""
        from nova_engine.model.packed import packed_forward

        if not forward_only:
            if not self.trainable:
                raise RuntimeError(f"engine {self.name!r} is frozen: forward_backward needs a "
                                   "trainable engine (use forward_collect)")  # fmt: skip
            for m in self.models:
                m.zero_grad_buffer()
            if self.optimizer is not None:
                self.optimizer.zero_grad()

        def step(model, mb):
            out = packed_forward(model, mb)
            return out, lambda hidden: loss_fn(model, hidden, mb)

        ctx = torch.no_grad() if forward_only else contextlib.nullcontext()
        with ctx:
            return self._schedule(microbatches, step, forward_only=forward_only)

    @torch.no_grad()
    def forward_collect(self, microbatches: Sequence[MicroBatch], fn: CollectFn) -> list[Any]:
        """Forward only (eval mode); `fn(model, hidden, mb)` runs on the last stage for each
        micro-batch and what it returns (per-token or per-sequence outputs) is collected:
        a list in micro-batch order on last-stage ranks, [] on the others. No loss, no
        gradient, no grad buffers touched."""
        from nova_engine.model.packed import packed_forward

        was_training = [m.training for m in self.models]
        self.train(False)

        def step(model, mb):
            out = packed_forward(model, mb)

            def collect(hidden, non_loss_data=False):
                return fn(model, hidden, mb)

            return out, collect

        try:
            return self._schedule(microbatches, step, forward_only=True, collect=True)
        finally:
            for m, mode in zip(self.models, was_training):
                m.train(mode)

    def step(self) -> tuple[bool, float, float]:
        """One optimizer update from the gradients of the last forward_backward:
        (applied, grad norm, learning rate used); the LR schedule advances."""
        if self.optimizer is None or self.scheduler is None:
            raise RuntimeError(f"engine {self.name!r} has no optimizer")
        lr = self.scheduler.apply(self.optimizer)
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(self.optimizer)
        return bool(ok), float(grad_norm or 0.0), lr

    def skip_step(self) -> float:
        """Drop the gradients of the last forward_backward without updating (a non-finite
        step); the LR schedule still advances, so LR stays tied to the data step. Returns
        the learning rate the skipped step would have used."""
        if self.optimizer is None or self.scheduler is None:
            raise RuntimeError(f"engine {self.name!r} has no optimizer")
        lr = self.scheduler.apply(self.optimizer)
        for m in self.models:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.scheduler.step(self.optimizer)
        return lr

    def local_grads_finite(self) -> torch.Tensor:
        """0-dim bool tensor on the device: every gradient this rank holds is finite (no
        collective; the loop reduces it with the step's metrics)."""
        ok = torch.ones((), dtype=torch.bool, device=self.ps.device)
        for m in self.models:
            for buf in getattr(m, "buffers", []) or []:
                ok &= torch.isfinite(buf.grad_data).all()
        return ok

    def sync_params(self) -> None:
        """Finish an overlapped parameter all-gather (overlap_param_gather): every read of
        the parameters outside a forward calls this first (collective over DP)."""
        from nova_engine.parallel.pipeline import sync_params

        sync_params(self.models)

    def local_params_finite(self) -> torch.Tensor:
        """0-dim bool tensor: every parameter of this rank's chunks is finite."""
        self.sync_params()
        ok = torch.ones((), dtype=torch.bool, device=self.ps.device)
        for c in self.chunks:
            for p in c.parameters():
                ok &= torch.isfinite(p).all()
        return ok

    def generate(
        self,
        requests: Sequence[Request | Sequence[int]],
        params: SamplingParams,
        **kwargs: Any,
    ) -> list[list[Generation]]:
        """KV-cache decoding on this engine's own shards (nova_engine.generate.generate:
        requests = token-id lists or Requests, params = SamplingParams; every rank of the
        layout calls it). Returns per request its `params.n` Generations."""
        from nova_engine.generate import generate

        self.sync_params()
        return generate(self.chunks, self.ps, self.arch, requests, params, **kwargs)

    # -- weights and state ---------------------------------------------------------------

    @contextlib.contextmanager
    def _without_heads(self) -> Iterator[dict[int, ScoreHead]]:
        """Detach the score head while HF I/O walks the decoder's parameters (hf_io maps
        the decoder; the head has its own name map in nova_engine.model.heads)."""
        heads: dict[int, ScoreHead] = {}
        for i, c in enumerate(self.chunks):
            m = unwrap(c)
            if hasattr(m, "score"):
                heads[i] = m.score
                del m.score
        try:
            yield heads
        finally:
            for i, h in heads.items():
                unwrap(self.chunks[i]).score = h

    def load_hf(self, model_dir: str) -> None:
        """Load a HF directory into this layout (each rank reads only its slices); a
        `score.weight` there (a *ForSequenceClassification checkpoint) fills the head."""
        from nova_engine.model.heads import load_score_weight
        from nova_engine.model.hf_io import load_hf_weights

        with self._without_heads() as heads:
            load_hf_weights(self.chunks, self.arch, self.ps, model_dir)
        for h in heads.values():
            load_score_weight(h, model_dir)

    def _merged(self) -> contextlib.AbstractContextManager:
        """LoRA merged into the weights for an export (nothing without LoRA)."""
        from nova_engine.model.lora import lora_merged

        return lora_merged(self.chunks) if self.lora is not None else contextlib.nullcontext()

    def adapters_disabled(self) -> contextlib.AbstractContextManager:
        """The base model (LoRA adapters off): the reference policy on the same shards."""
        from nova_engine.model.lora import lora_disabled

        return lora_disabled(self.chunks)

    def export_hf(self, out_dir: str) -> None:
        """Write the decoder as a HF directory (collective; see hf_io.export_hf); with LoRA
        the merged weights W + (alpha/r) B A."""
        from nova_engine.model.hf_io import export_hf

        self.sync_params()
        with self._without_heads(), self._merged():
            export_hf(self.chunks, self.arch, self.ps, out_dir)

    def load_peft(self, adapter_dir: str) -> None:
        """Fill the LoRA adapters from a PEFT adapter directory (continue training)."""
        from nova_engine.model.lora import load_peft_adapter

        if self.lora is None:
            raise RuntimeError(f"engine {self.name!r} has no LoRA adapters to load into")
        load_peft_adapter(self.chunks, self.arch, self.ps, adapter_dir)

    def export_peft(self, out_dir: str, base_model: str = "") -> None:
        """Write the LoRA adapters alone in PEFT's layout (collective)."""
        from nova_engine.model.lora import export_peft_adapter

        if self.lora is None:
            raise RuntimeError(f"engine {self.name!r} has no LoRA adapters to export")
        self.sync_params()
        export_peft_adapter(self.chunks, self.arch, self.ps, self.lora, out_dir, base_model)

    def layout(self) -> dict[str, Any]:
        ps = self.ps
        return {"tp": ps.tp, "pp": ps.pp, "vpp": ps.vpp, "dp": ps.dp, "world_size": ps.world_size}

    def model_state(self) -> list[dict[str, torch.Tensor]]:
        """This rank's parameters by name, per chunk: the live tensors, detached (the
        checkpoint copies them into its host buffers; nothing is cloned on the device)."""
        self.sync_params()
        return [{n: p.detach() for n, p in c.named_parameters()} for c in self.chunks]

    def load_model_state(self, state: list[dict[str, torch.Tensor]], where: str = "") -> None:
        from nova_engine.train.checkpoint_io import CheckpointIOError

        with torch.no_grad():
            for chunk, params in zip(self.chunks, state):
                own = dict(chunk.named_parameters())
                if set(own) != set(params):
                    raise CheckpointIOError(
                        f"{where}: parameter names of engine {self.name!r} differ from the "
                        f"checkpoint's ({sorted(set(own) ^ set(params))[:4]} ...)"
                    )
                for n, v in params.items():
                    if v.shape != own[n].shape or v.dtype != own[n].dtype:
                        raise CheckpointIOError(
                            f"{where}: parameter {n} of engine {self.name!r} is "
                            f"{tuple(v.shape)} {v.dtype} in the checkpoint, "
                            f"{tuple(own[n].shape)} {own[n].dtype} in this run"
                        )
                    own[n].copy_(v)


class RewardEngine(ModelEngine):
    """A ModelEngine whose HF I/O is *ForSequenceClassification: loads pick `score_rows` of
    the checkpoint's head, exports write `score.weight` with the output names and pad id."""

    def __init__(self, arch: ModelArch, ps: ParallelState, *, labels: Sequence[str],
                 pad_token_id: int, score_rows: Sequence[int] | None = None,
                 **kwargs: Any):  # fmt: skip
        self.labels, self.pad_token_id, self.score_rows = tuple(labels), pad_token_id, score_rows
        super().__init__(arch, ps, score_outputs=len(self.labels), **kwargs)

    def load_hf(self, model_dir: str) -> None:
        from nova_engine.model.hf_io import load_hf_weights

        load_hf_weights(self.chunks, self.arch, self.ps, model_dir, score_rows=self.score_rows)

    def export_hf(self, out_dir: str) -> None:
        from nova_engine.model.hf_io import ScoreExport, export_hf

        seq = ScoreExport(self.pad_token_id, self.labels)
        with self._merged():
            export_hf(self.chunks, self.arch, self.ps, out_dir, sequence_classifier=seq)


class AdaptersOffReference:
    """The frozen reference policy of a LoRA engine without a second model: forward passes
    of the same shards with the adapters off (the base weights, which LoRA never updates).
    Read-only: no optimizer (a loop's `trainable` and its checkpoints skip it)."""

    optimizer = None

    def __init__(self, engine: ModelEngine, name: str = "reference"):
        if engine.lora is None:
            raise ValueError(f"engine {engine.name!r} has no LoRA adapters to switch off")
        self.engine, self.name = engine, name
        self.ps, self.arch = engine.ps, engine.arch

    def forward_collect(self, microbatches: Sequence[MicroBatch], fn: CollectFn) -> list[Any]:
        with self.engine.adapters_disabled():
            return self.engine.forward_collect(microbatches, fn)
