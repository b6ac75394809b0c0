"""Llama-3 / Qwen2 as megatron-core `GPTModel` chunks for a given parallel layout.

`build_model(arch, ps, ...)` returns this rank's model chunks (one per virtual pipeline
stage), each a `NovaGPTModel`: megatron's GPTModel whose last stage can hand back the final
hidden states (after the final RMSNorm) instead of logits, so the loss can go through
`nova_kernels.linear_logprobs` without ever materializing [tokens x vocab] logits.

Layer spec: megatron's local spec with Nova's core attention (packed batches) everywhere;
Transformer Engine's spec (megatron's `get_gpt_layer_with_transformer_engine_spec`: fused
norm+linear, TE's DotProductAttention, megatron's per-segment RoPE for packed batches) when TE
is importable and `use_te` is not False. Generation swaps Nova's core attention in for the
call (nova_engine.generate.kv_cache), so it is correct under either spec.

GPU speed switches (`speed_switches`): with CUDA, megatron's fused SwiGLU, bias-dropout-add
and RoPE (the latter only with TE's kernel), gradient-accumulation fusion (TE or apex's
kernel) and the masked-softmax switch are on by default; on CPU all stay off (the numerics of
CPU runs never change). Each can be forced by `train.speed.<key>` (nova_engine.config).
Weights: `init_weights=False` (a model about to load a checkpoint) skips megatron's random
init, and on GPU allocates the shards on the device directly instead of building full fp32
master weights on the CPU of every TP rank.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from nova_engine.model.arch import ModelArch
from nova_engine.model.attention import NovaCoreAttention
from nova_engine.model.fused import NovaSwiGLU
from nova_engine.model.norm import NovaRMSNorm
from nova_engine.model.packed import NovaPackedSeqParams
from nova_engine.model.rope import packed_rope_table
from nova_engine.parallel.state import ParallelState

if TYPE_CHECKING:
    from nova_engine.config import SpeedConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# train.speed key -> megatron TransformerConfig field
FUSION_KEYS = {
    "bias_swiglu_fusion": "bias_activation_fusion",
    "apply_rope_fusion": "apply_rope_fusion",
    "masked_softmax_fusion": "masked_softmax_fusion",
    "bias_dropout_fusion": "bias_dropout_fusion",
    "gradient_accumulation_fusion": "gradient_accumulation_fusion",
}


# TransformerConfig init methods replaced by `_no_init` when a checkpoint fills the weights
_INIT_KEYS = ("init_method", "output_layer_init_method", "embedding_init_method")


def _no_init(weight: torch.Tensor) -> None:
    """Init method of a model whose weights come from a checkpoint: leaves them as allocated."""


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return torch.cuda.is_available()


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _te_rope_available() -> bool:
    from megatron.core.models.common.embeddings import rope_utils

    return rope_utils.fused_apply_rotary_pos_emb is not None


def speed_switches(
    cuda: bool, use_te: bool, fuse_elementwise: bool = False, speed: SpeedConfig | None = None
) -> dict[str, bool]:
    """megatron TransformerConfig fusion fields: on with CUDA where the kernel exists
    (TE/apex-dependent ones only when importable), off without CUDA; a `speed` field that is
    not None forces its switch (ValueError when its kernel is missing)."""
    kernels = {  # key -> (kernel there, what it needs)
        "bias_swiglu_fusion": (
            not fuse_elementwise,
            "train.fuse_elementwise off (megatron refuses both)",
        ),  # fmt: skip
        "apply_rope_fusion": (
            cuda and use_te and _te_rope_available(),
            "Transformer Engine's fused RoPE (CUDA)",
        ),  # fmt: skip
        "masked_softmax_fusion": (True, ""),
        "bias_dropout_fusion": (True, ""),
        "gradient_accumulation_fusion": (
            cuda and (use_te or _importable("fused_weight_gradient_mlp_cuda")),
            "Transformer Engine or apex's fused_weight_gradient_mlp_cuda (CUDA)",
        ),
    }
    out = {}
    for key, field in FUSION_KEYS.items():
        there, needs = kernels[key]
        forced = getattr(speed, key, None) if speed is not None else None
        if forced and not there:
            raise ValueError(f"train.speed.{key}=true needs {needs}")
        out[field] = (cuda and there) if forced is None else bool(forced)
    return out


def transformer_config(
    arch: ModelArch,
    ps: ParallelState,
    precision: str = "fp32",
    recompute: str = "none",
    fuse_elementwise: bool = False,
    *,
    use_te: bool = False,
    init_weights: bool = True,
    cuda: bool | None = None,
    speed: SpeedConfig | None = None,
) -> TransformerConfig:
    """megatron TransformerConfig for `arch` on layout `ps`.

    precision: "fp32" | "bf16" | "fp16" — the dtype of the model's parameters and activations
    (the optimizer keeps fp32 master weights). recompute: "none" | "selective" | "full".
    fuse_elementwise: the local spec's MLP takes its activation module from the spec
    (`NovaSwiGLU`, compiled) — megatron's switch for that is `use_te_activation_func`.
    init_weights: False skips megatron's random init (the weights come from a checkpoint).
    cuda (None: torch.cuda.is_available() and ps.device is CUDA) picks the GPU speed
    switches (`speed_switches`; `speed` overrides them) and, without init, device allocation.
    """
    if precision not in _DTYPES:
        raise ValueError(f"precision={precision!r}: expected one of {sorted(_DTYPES)}")
    if recompute not in ("none", "selective", "full"):
        raise ValueError(f"recompute={recompute!r}: expected 'none', 'selective' or 'full'")
    arch.check_layout(ps.tp, ps.pp, ps.vpp)
    dtype = _DTYPES[precision]
    if cuda is None:
        cuda = torch.cuda.is_available() and ps.device.type == "cuda"
    fusions = speed_switches(cuda, use_te, fuse_elementwise, speed)
    recompute_kwargs: dict = {}
    if recompute == "selective":
        recompute_kwargs = {"recompute_granularity": "selective"}
    elif recompute == "full":
        recompute_kwargs = {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        }
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=ps.tp,
        pipeline_model_parallel_size=ps.pp,
        virtual_pipeline_model_parallel_size=ps.vpp,
        sequence_parallel=ps.sp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        attention_softmax_in_fp32=True,
        # a random init builds each full weight on the CPU (the same init at every TP size);
        # a model about to load a checkpoint gets no-op init methods (megatron's
        # perform_initialization=False would also skip setting the weights' tensor-parallel
        # attributes, which the grad norm and checkpoints read) and, on GPU, allocates its
        # shards on the device directly
        use_cpu_initialization=init_weights or not cuda,
        perform_initialization=True,
        **({} if init_weights else dict.fromkeys(_INIT_KEYS, _no_init)),
        persist_layer_norm=False,
        **fusions,
        # with gloo, batched isend/irecv gives silently wrong interleaved-PP gradients
        batch_p2p_comm=not ps.on_gloo,
        variable_seq_lengths=False,
        use_te_activation_func=fuse_elementwise,
        **recompute_kwargs,
    )


def layer_spec(use_te: bool = False, fuse_elementwise: bool = False) -> ModuleSpec:
    """The decoder layer spec: local modules + Nova core attention, or TE's spec (which has
    its own fused norms and activations). fuse_elementwise: RMSNorm and SwiGLU compiled
    (`nova_engine.model.fused`)."""
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    attn = spec.submodules.self_attention
    new_attn_sub = dataclasses.replace(attn.submodules, core_attention=NovaCoreAttention)
    new_attn = dataclasses.replace(attn, submodules=new_attn_sub)
    norm = ModuleSpec(module=NovaRMSNorm, params={"fused": fuse_elementwise})
    mlp = spec.submodules.mlp
    if fuse_elementwise:
        mlp_sub = dataclasses.replace(mlp.submodules, activation_func=ModuleSpec(NovaSwiGLU))
        mlp = dataclasses.replace(mlp, submodules=mlp_sub)
    return dataclasses.replace(
        spec,
        submodules=dataclasses.replace(
            spec.submodules,
            self_attention=new_attn,
            input_layernorm=norm,
            pre_mlp_layernorm=norm,
            mlp=mlp,
        ),
    )


def block_spec(
    config: TransformerConfig, use_te: bool, vp_stage: int | None, pp_rank: int, fuse: bool
) -> TransformerBlockSubmodules:
    """Decoder block spec for one model chunk: its layers and the final norm (Nova's RMSNorm,
    or TE's norm with the TE spec, as megatron's own TE block would use)."""
    layer = layer_spec(use_te, fuse)
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    final_norm: Any
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = ModuleSpec(module=NovaRMSNorm, params={"fused": fuse})
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=final_norm)


class NovaGPTModel(GPTModel):
    """GPTModel whose last stage returns final hidden states when `return_hidden` is set.

    Hidden states are [S, B, H] ([S/tp, B, H] with sequence parallelism), the input that
    `nova_kernels.linear_logprobs(..., sequence_parallel=...)` expects, together with
    `lm_head_weight()` ([V/tp, H], this rank's vocab shard).
    """

    return_hidden: bool = False
    # False: built without megatron's random init (a checkpoint fills the weights)
    weights_initialized: bool = True
    # Nova's core attention applies RoPE to packed batches (False with TE's layer spec,
    # whose attention relies on megatron's RoPE)
    packed_rope: bool = True

    def _preprocess(self, *args, packed_seq_params=None, **kwargs):
        """megatron's preprocessing; for a Nova packed batch the RoPE table of its tokens is
        built here once (positions restart in every segment) and megatron's per-segment RoPE
        is switched off: Nova's core attention rotates q and k with the table."""
        out = super()._preprocess(*args, packed_seq_params=packed_seq_params, **kwargs)
        nova_packed = isinstance(packed_seq_params, NovaPackedSeqParams)
        if not (self.packed_rope and nova_packed) or out[1] is None:
            return out
        position_ids = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        if position_ids is None:
            raise ValueError("a packed batch needs its position_ids for RoPE")
        rope = self.rotary_pos_emb
        packed_seq_params.rope = packed_rope_table(
            position_ids, rope.inv_freq, self.config.params_dtype,
            getattr(rope, "seq_len_interpolation_factor", None),
        )  # fmt: skip
        return (out[0], None, *out[2:])

    def _postprocess(self, hidden_states, *args, **kwargs):
        if self.return_hidden and self.post_process:
            return hidden_states
        return super()._postprocess(hidden_states, *args, **kwargs)

    def lm_head_weight(self) -> torch.Tensor:
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight


def build_model(
    arch: ModelArch,
    ps: ParallelState,
    precision: str = "fp32",
    recompute: str = "none",
    use_te: bool | None = None,
    fuse_elementwise: bool = False,
    *,
    init_weights: bool = True,
    speed: SpeedConfig | None = None,
) -> list[NovaGPTModel]:
    """This rank's model chunks (len = vpp or 1), on `ps.device`, randomly initialized, or
    with `init_weights=False` left uninitialized for a checkpoint to fill (load weights with
    `nova_engine.model.hf_io.load_hf_weights`, which initializes what the checkpoint lacks).
    use_te: None = Transformer Engine's spec when TE is importable (with CUDA).
    fuse_elementwise: compiled RMSNorm + SwiGLU in the local spec (TE's spec fuses its own).
    speed: forced GPU speed switches (nova_engine.config.SpeedConfig; None = automatic)."""
    use_te = te_available() if use_te is None else use_te
    fuse = fuse_elementwise and not use_te
    config = transformer_config(
        arch, ps, precision, recompute, fuse, use_te=use_te, init_weights=init_weights,
        speed=speed,
    )  # fmt: skip
    chunks = []
    for vp in range(ps.num_chunks):
        vp_stage = vp if ps.vpp else None
        model = NovaGPTModel(
            config=config,
            transformer_layer_spec=block_spec(config, use_te, vp_stage, ps.pp_rank, fuse),
            vocab_size=arch.vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=ps.is_first_stage(vp_stage),
            post_process=ps.is_last_stage(vp_stage),
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(arch.rope_theta),
            vp_stage=vp_stage,
            pg_collection=ps.pg_collection,  # the layout's own groups (None: megatron's)
        )
        # TE's attention takes packed (thd) batches with megatron's per-segment RoPE
        model.packed_rope = not use_te
        model.weights_initialized = init_weights
        # RoPE frequencies exactly as HF computes them (incl. llama3 scaling with the
        # checkpoint's own factors; megatron hard-codes some of them)
        model.rotary_pos_emb.inv_freq = arch.inv_freq().to(ps.device)
        model.to(ps.device)
        chunks.append(model)
    return chunks
