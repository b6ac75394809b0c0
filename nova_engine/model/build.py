"""Llama-3 / Qwen2 as megatron-core `GPTModel` chunks for a given parallel layout.

`build_model(arch, ps, ...)` returns this rank's model chunks (one per virtual pipeline
stage), each a `NovaGPTModel`: megatron's GPTModel whose last stage can hand back the final
hidden states (after the final RMSNorm) instead of logits, so the loss can go through
`nova_kernels.linear_logprobs` without ever materializing [tokens x vocab] logits.

Layer spec: megatron's local spec with Nova's core attention (packed batches) everywhere;
Transformer Engine's spec when TE is importable and `use_te=True`.
"""

from __future__ import annotations

import dataclasses

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

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return torch.cuda.is_available()


def transformer_config(
    arch: ModelArch,
    ps: ParallelState,
    precision: str = "fp32",
    recompute: str = "none",
    fuse_elementwise: bool = False,
) -> TransformerConfig:
    """megatron TransformerConfig for `arch` on layout `ps`.

    precision: "fp32" | "bf16" | "fp16" — the dtype of the model's parameters and activations
    (the optimizer keeps fp32 master weights). recompute: "none" | "selective" | "full".
    fuse_elementwise: the local spec's MLP takes its activation module from the spec
    (`NovaSwiGLU`, compiled) — megatron's switch for that is `use_te_activation_func`.
    """
    if precision not in _DTYPES:
        raise ValueError(f"precision={precision!r}: expected one of {sorted(_DTYPES)}")
    if recompute not in ("none", "selective", "full"):
        raise ValueError(f"recompute={recompute!r}: expected 'none', 'selective' or 'full'")
    arch.check_layout(ps.tp, ps.pp, ps.vpp)
    dtype = _DTYPES[precision]
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
        use_cpu_initialization=True,
        perform_initialization=True,
        # fused paths that need apex/TE/CUDA-only kernels stay off on the local spec
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
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
):
    """Decoder block spec for one model chunk: its layers and the final norm."""
    layer = layer_spec(use_te, fuse)
    if use_te:
        return layer
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    final_norm = ModuleSpec(module=NovaRMSNorm, params={"fused": fuse})
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=final_norm)


class NovaGPTModel(GPTModel):
    """GPTModel whose last stage returns final hidden states when `return_hidden` is set.

    Hidden states are [S, B, H] ([S/tp, B, H] with sequence parallelism), the input that
    `nova_kernels.linear_logprobs(..., sequence_parallel=...)` expects, together with
    `lm_head_weight()` ([V/tp, H], this rank's vocab shard).
    """

    return_hidden: bool = False
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
) -> list[NovaGPTModel]:
    """This rank's model chunks (len = vpp or 1), on `ps.device`, randomly initialized
    (load weights with `nova_engine.model.hf_io.load_hf_weights`). fuse_elementwise:
    compiled RMSNorm + SwiGLU in the local spec (TE's spec fuses its own)."""
    use_te = te_available() if use_te is None else use_te
    fuse = fuse_elementwise and not use_te
    config = transformer_config(arch, ps, precision, recompute, fuse)
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
        model.packed_rope = not use_te
        # RoPE frequencies exactly as HF computes them (incl. llama3 scaling with the
        # checkpoint's own factors; megatron hard-codes some of them)
        model.rotary_pos_emb.inv_freq = arch.inv_freq().to(ps.device)
        model.to(ps.device)
        chunks.append(model)
    return chunks
