"""Hugging Face checkpoints <-> megatron-core model chunks at any TP x PP layout.

Import: every rank opens the safetensors files lazily and reads only the slices its own
parameters need (rows of a vocab shard, the KV groups of its TP rank, the layers of its
pipeline stage), so no rank ever reads the whole model. Export: TP shards are gathered to
TP rank 0 of each pipeline stage, which writes that stage's tensors in HF layout; global
rank 0 writes the index and config.json. Layout conversions, per decoder layer i:

| HF tensor (shape)                               | megatron parameter on TP rank r (of tp)          |
| ----------------------------------------------- | ------------------------------------------------ |
| embed_tokens.weight [V, H], lm_head.weight      | word_embeddings / output_layer: rows r*V/tp..    |
| q_proj [nh*d, H], k_proj, v_proj [ng*d, H]      | linear_qkv.weight [(ng/tp)*(nh/ng+2)*d, H]: for  |
|   (+ .bias for Qwen2)                           |   each KV group g of rank r: the nh/ng query     |
|                                                 |   heads of g, then k_g, then v_g (megatron's     |
|                                                 |   grouped QKV layout)                            |
| o_proj [H, nh*d]                                | linear_proj.weight [H, nh*d/tp]: columns of r    |
| gate_proj, up_proj [F, H]                       | linear_fc1.weight [2F/tp, H] = [gate_r; up_r]    |
| down_proj [H, F]                                | linear_fc2.weight [H, F/tp]: columns of r        |
| input_layernorm, post_attention_layernorm [H]   | input_layernorm, pre_mlp_layernorm (replicated)  |
| norm.weight [H]                                 | decoder.final_layernorm.weight (last stage)      |

Tied embeddings: HF stores only embed_tokens; megatron's last stage (when it is not also
the first) holds a copy as output_layer.weight, loaded from the same tensor.

Reward / value models (`*ForSequenceClassification`): the decoder as above plus `score.weight`
[num_labels, H] (no bias), which is the last stage's score head (nova_engine.model.heads,
replicated over TP) and replaces the LM head. Import reads it when the checkpoint has one
(`score_rows` picks rows, e.g. a regression model's helpfulness output for a one-output head)
and leaves the head's seeded init when it does not (a *ForCausalLM); a checkpoint without
`lm_head.weight` leaves an untied model's unused output layer at its init. Export with
`sequence_classifier=ScoreExport(pad_token_id, labels)` writes Llama/Qwen2ForSequenceClassification
with num_labels, id2label and pad_token_id set: transformers then reads the score at the last
token that is not padding, the last token of each sequence as Nova packs it, so pad_token_id
must differ from every token a sequence can end with (`choose_pad_token_id`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from megatron.core.utils import init_method_normal
from safetensors import safe_open
from safetensors.torch import save_file

from nova_engine.logging import get_logger
from nova_engine.model.arch import ModelArch
from nova_engine.parallel.state import ParallelState

log = get_logger(__name__)

_SAFE_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class CheckpointError(ValueError):
    """A checkpoint with missing, extra or mis-shaped tensors (names the tensor)."""


SCORE_PARAM = "score.weight"  # the score head on the last stage's chunk (model.heads)
SCORE_HF = "score.weight"  # *ForSequenceClassification: [num_labels, H], no bias
SEQUENCE_CLASSIFIER_CLASSES = {
    "llama": "LlamaForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
}


@dataclass
class ScoreExport:
    """How to write a model with a score head as *ForSequenceClassification."""

    pad_token_id: int
    """Written to config.json: transformers reads the score at the last token != pad."""
    labels: Sequence[str] | None = None
    """Names of the K outputs (id2label), e.g. the HelpSteer2 attributes; None: LABEL_i."""


# ----------------------------------------------------------------------------- the names


def hf_layer_names(arch: ModelArch, i: int) -> dict[str, tuple[int, ...]]:
    """HF tensor names of decoder layer i with their expected shapes."""
    p = f"model.layers.{i}."
    h, f, d = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q, kv = arch.num_heads * d, arch.num_kv_heads * d
    names = {
        p + "input_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (q, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, q),
        p + "post_attention_layernorm.weight": (h,),
        p + "mlp.gate_proj.weight": (f, h),
        p + "mlp.up_proj.weight": (f, h),
        p + "mlp.down_proj.weight": (h, f),
    }
    if arch.qkv_bias:
        names[p + "self_attn.q_proj.bias"] = (q,)
        names[p + "self_attn.k_proj.bias"] = (kv,)
        names[p + "self_attn.v_proj.bias"] = (kv,)
    return names


def hf_expected_names(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    names: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (arch.vocab_size, arch.hidden_size)
    }
    for i in range(arch.num_layers):
        names.update(hf_layer_names(arch, i))
    names["model.norm.weight"] = (arch.hidden_size,)
    if not arch.tie_word_embeddings:
        names["lm_head.weight"] = (arch.vocab_size, arch.hidden_size)
    return names


# tensors some checkpoints carry that carry no information for us
_IGNORABLE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# ------------------------------------------------------------------------- lazy reading


class TensorReader(Protocol):
    """What `_hf_value` reads from: HF tensors by name, optionally a slice of rows/cols."""

    def read(
        self, name: str, rows: slice | None = None, cols: slice | None = None
    ) -> torch.Tensor: ...


def _safe_open(path: str):
    """safe_open, or CheckpointError naming the file when its header is damaged or the file
    is shorter than the header says (a truncated shard)."""
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # noqa: BLE001 - safetensors' own error type (SafetensorError)
        raise CheckpointError(f"{path}: damaged safetensors file ({e})") from None


class HFCheckpoint:
    """A HF safetensors directory (one file, or sharded with model.safetensors.index.json),
    read lazily: `read(name, rows=..., cols=...)` loads only that slice from disk."""

    def __init__(self, model_dir: str):
        self.dir = model_dir
        index = os.path.join(model_dir, "model.safetensors.index.json")
        single = os.path.join(model_dir, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as fh:
                self.weight_map: dict[str, str] = json.load(fh)["weight_map"]
        elif os.path.isfile(single):
            with _safe_open(single) as fh:
                self.weight_map = {k: "model.safetensors" for k in fh.keys()}
        else:
            raise CheckpointError(
                f"{model_dir}: no model.safetensors or model.safetensors.index.json "
                "(expected a Hugging Face safetensors directory)"
            )
        self._handles: dict[str, object] = {}

    def _file(self, name: str):
        fname = self.weight_map[name]
        if fname not in self._handles:
            path = os.path.join(self.dir, fname)
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: listed in the index for {name!r} but missing")
            self._handles[fname] = _safe_open(path)
        return self._handles[fname]

    def names(self) -> set[str]:
        return set(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(name).get_shape())

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        sl = self._file(name).get_slice(name)
        if cols is not None:
            return sl[rows or slice(None), cols]
        if rows is not None:
            return sl[rows]
        return sl[:]

    @property
    def is_sequence_classifier(self) -> bool:
        """Whether this is a *ForSequenceClassification checkpoint (it has score.weight)."""
        return SCORE_HF in self.weight_map

    def validate(self, arch: ModelArch) -> None:
        """Missing, extra or mis-shaped tensors -> CheckpointError naming the tensor."""
        expected = hf_expected_names(arch)
        if self.is_sequence_classifier:
            expected.pop("lm_head.weight", None)
            k = self.shape(SCORE_HF)
            expected[SCORE_HF] = (k[0] if len(k) == 2 else -1, arch.hidden_size)
        present = self.names()
        missing = sorted(set(expected) - present)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{self.dir}: missing tensor {missing[0]!r}{more}")
        allowed_extra = {"lm_head.weight"} if arch.tie_word_embeddings else set()
        extra = sorted(
            n for n in present - set(expected) - allowed_extra if not _IGNORABLE.search(n)
        )
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise CheckpointError(
                f"{self.dir}: unexpected tensor {extra[0]!r}{more} for a "
                f"{arch.architecture} with {arch.num_layers} layers"
            )
        for name, shape in expected.items():
            got = self.shape(name)
            if got != shape:
                raise CheckpointError(
                    f"{self.dir}: tensor {name!r} has shape {list(got)}, expected {list(shape)}"
                )


# ------------------------------------------------------------------- slices for one rank


def _rows(n: int, tp: int, r: int) -> slice:
    k = n // tp
    return slice(r * k, (r + 1) * k)


def _qkv_slices(arch: ModelArch, tp: int, r: int) -> list[tuple[str, slice]]:
    """(q|k|v, row slice) pieces, in megatron's grouped order, for TP rank r."""
    d = arch.head_dim
    hpg = arch.num_heads // arch.num_kv_heads
    groups = arch.num_kv_heads // tp
    pieces = []
    for g in range(r * groups, (r + 1) * groups):
        pieces.append(("q", slice(g * hpg * d, (g + 1) * hpg * d)))
        pieces.append(("k", slice(g * d, (g + 1) * d)))
        pieces.append(("v", slice(g * d, (g + 1) * d)))
    return pieces


_LAYER_PARAM = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# LoRA adapter parameters (`<linear>.lora.A`, nova_engine.model.lora): no HF tensor of their own
_LORA_MARK = ".lora."


def _hf_value(
    ckpt: TensorReader, arch: ModelArch, mname: str, layer: int | None, tp: int, r: int
) -> torch.Tensor:
    """The slice of the HF checkpoint that megatron parameter `mname` holds on TP rank r."""
    v = arch.vocab_size
    if mname == "embedding.word_embeddings.weight":
        return ckpt.read("model.embed_tokens.weight", rows=_rows(v, tp, r))
    if mname == "output_layer.weight":
        src = "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
        return ckpt.read(src, rows=_rows(v, tp, r))
    if mname == "decoder.final_layernorm.weight":
        return ckpt.read("model.norm.weight")
    p = f"model.layers.{layer}."
    if mname.endswith(("input_layernorm.weight", "linear_qkv.layer_norm_weight")):
        return ckpt.read(p + "input_layernorm.weight")
    if mname.endswith(("pre_mlp_layernorm.weight", "linear_fc1.layer_norm_weight")):
        return ckpt.read(p + "post_attention_layernorm.weight")
    if mname.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        kind = mname.rsplit(".", 1)[1]
        parts = [
            ckpt.read(f"{p}self_attn.{w}_proj.{kind}", rows=rows)
            for w, rows in _qkv_slices(arch, tp, r)
        ]
        return torch.cat(parts, dim=0)
    if mname.endswith("linear_proj.weight"):
        q = arch.num_heads * arch.head_dim
        return ckpt.read(p + "self_attn.o_proj.weight", cols=_rows(q, tp, r))
    if mname.endswith("linear_fc1.weight"):
        rows = _rows(arch.intermediate_size, tp, r)
        gate = ckpt.read(p + "mlp.gate_proj.weight", rows=rows)
        up = ckpt.read(p + "mlp.up_proj.weight", rows=rows)
        return torch.cat([gate, up], dim=0)
    if mname.endswith("linear_fc2.weight"):
        return ckpt.read(p + "mlp.down_proj.weight", cols=_rows(arch.intermediate_size, tp, r))
    raise CheckpointError(f"no HF source known for megatron parameter {mname!r}")


def _split_name(mname: str, model) -> tuple[str, int | None]:
    m = _LAYER_PARAM.match(mname)
    if not m:
        return mname, None
    local = int(m.group(1))
    return mname, model.decoder.layers[local].layer_number - 1


def score_labels(model_dir: str) -> list[str] | None:
    """The output names (config.json id2label, in index order) of a *ForSequenceClassification
    directory; None for any other model."""
    with open(os.path.join(model_dir, "config.json")) as fh:
        cfg = json.load(fh)
    archs = cfg.get("architectures") or []
    if not archs or archs[0] not in SEQUENCE_CLASSIFIER_CLASSES.values():
        return None
    id2label = cfg.get("id2label") or {}
    n = int(cfg.get("num_labels", len(id2label) or 1))
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]


def _score_value(
    ckpt: HFCheckpoint, param: torch.Tensor, rows: Sequence[int] | None
) -> torch.Tensor:
    """score.weight [K', H] of the checkpoint, rows `rows` (all when None), for a head [K, H]."""
    value = ckpt.read(SCORE_HF)
    if rows is not None:
        bad = [r for r in rows if not 0 <= r < value.shape[0]]
        if bad:
            raise CheckpointError(
                f"{ckpt.dir}: {SCORE_HF} has {value.shape[0]} outputs, no row {bad[0]}"
            )
        value = value[list(rows)]
    if tuple(value.shape) != tuple(param.shape):
        raise CheckpointError(
            f"{ckpt.dir}: {SCORE_HF} gives shape {list(value.shape)}, the score head is "
            f"{list(param.shape)} [num_outputs, hidden_size] (pick rows with score_rows)"
        )
    return value


def load_hf_weights(
    chunks: Iterable[torch.nn.Module],
    arch: ModelArch,
    ps: ParallelState,
    model_dir: str,
    *,
    score_rows: Sequence[int] | None = None,
) -> None:
    """Copy a HF checkpoint into this rank's model chunks (each rank reads only its slices).

    A score head on the chunks (`score.weight`) takes the checkpoint's score.weight, rows
    `score_rows` when given, or keeps its seeded init when the checkpoint has none."""
    ckpt = HFCheckpoint(model_dir)
    ckpt.validate(arch)
    no_lm_head = ckpt.is_sequence_classifier and "lm_head.weight" not in ckpt.names()
    with torch.no_grad():
        for model in chunks:
            for mname, param in model.named_parameters():
                name, layer = _split_name(mname, model)
                if _LORA_MARK in name:  # LoRA adapters keep their init (model.lora)
                    continue
                if name == SCORE_PARAM:
                    if ckpt.is_sequence_classifier:
                        param.copy_(_score_value(ckpt, param, score_rows).to(param.dtype))
                    else:
                        log.info("%s has no %s: the score head keeps its init", model_dir, SCORE_HF)
                    continue
                if name == "output_layer.weight" and no_lm_head and not arch.tie_word_embeddings:
                    log.info("%s has no lm_head: the unused output layer keeps its init", model_dir)
                    if not getattr(model, "weights_initialized", True):  # built without init
                        init_method_normal(model.config.init_method_std)(param)
                    continue
                value = _hf_value(ckpt, arch, name, layer, ps.tp, ps.tp_rank)
                if tuple(value.shape) != tuple(param.shape):
                    raise CheckpointError(
                        f"{model_dir}: slice for {mname!r} has shape {list(value.shape)}, "
                        f"the model expects {list(param.shape)}"
                    )
                param.copy_(value.to(param.dtype))
    log.info("loaded %s into %s", model_dir, ps.describe())


# --------------------------------------------------------------------------------- export


def _gather_tp(t: torch.Tensor, ps: ParallelState) -> list[torch.Tensor]:
    if ps.tp == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(ps.tp)]
    dist.all_gather(parts, t.contiguous(), group=ps.tp_group)
    return parts


def _cat(parts: list[torch.Tensor], dim: int, copy: bool = True) -> torch.Tensor:
    """torch.cat; with copy=False a single part (TP1: the shard is the whole tensor) is
    returned as it is (a view of the parameter)."""
    return parts[0] if len(parts) == 1 and not copy else torch.cat(parts, dim)


def _to_hf(
    arch: ModelArch,
    mname: str,
    layer: int | None,
    parts: list[torch.Tensor],
    copy: bool = True,
) -> dict[str, torch.Tensor]:
    """Inverse of `_hf_value`: TP shards of one megatron parameter -> HF tensors (new
    tensors; with copy=False they may be views of the parts, e.g. at TP1, when the caller
    copies them anyway: the weight sync)."""
    if mname == "embedding.word_embeddings.weight":
        return {"model.embed_tokens.weight": _cat(parts, 0, copy)}
    if mname == "output_layer.weight":
        return {} if arch.tie_word_embeddings else {"lm_head.weight": _cat(parts, 0, copy)}
    if mname == "decoder.final_layernorm.weight":
        return {"model.norm.weight": parts[0]}
    p = f"model.layers.{layer}."
    if mname.endswith(("input_layernorm.weight", "linear_qkv.layer_norm_weight")):
        return {p + "input_layernorm.weight": parts[0]}
    if mname.endswith(("pre_mlp_layernorm.weight", "linear_fc1.layer_norm_weight")):
        return {p + "post_attention_layernorm.weight": parts[0]}
    if mname.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        kind = mname.rsplit(".", 1)[1]
        d, hpg = arch.head_dim, arch.num_heads // arch.num_kv_heads
        full = _cat(parts, 0, copy)  # [ng*(hpg+2)*d, ...]
        grouped = full.reshape(arch.num_kv_heads, hpg + 2, d, *full.shape[1:])
        q = grouped[:, :hpg].reshape(arch.num_heads * d, *full.shape[1:])
        k = grouped[:, hpg].reshape(arch.num_kv_heads * d, *full.shape[1:])
        v = grouped[:, hpg + 1].reshape(arch.num_kv_heads * d, *full.shape[1:])
        return {f"{p}self_attn.{n}_proj.{kind}": t for n, t in (("q", q), ("k", k), ("v", v))}
    if mname.endswith("linear_proj.weight"):
        return {p + "self_attn.o_proj.weight": _cat(parts, 1, copy)}
    if mname.endswith("linear_fc1.weight"):
        halves = [t.chunk(2, dim=0) for t in parts]
        return {
            p + "mlp.gate_proj.weight": _cat([g for g, _ in halves], 0, copy),
            p + "mlp.up_proj.weight": _cat([u for _, u in halves], 0, copy),
        }
    if mname.endswith("linear_fc2.weight"):
        return {p + "mlp.down_proj.weight": _cat(parts, 1, copy)}
    raise CheckpointError(f"no HF layout known for megatron parameter {mname!r}")


def _file_name(k: int, n: int) -> str:
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def _hf_file_index(arch: ModelArch, hf_name: str) -> int:
    """Which output file a HF tensor goes to: 0 = embeddings, 1..L = layers, L+1 = head."""
    m = re.match(r"^model\.layers\.(\d+)\.", hf_name)
    if m:
        return int(m.group(1)) + 1
    if hf_name == "model.embed_tokens.weight":
        return 0
    return arch.num_layers + 1


def hf_config_dict(
    arch: ModelArch,
    dtype: torch.dtype,
    sequence_classifier: ScoreExport | None = None,
    num_labels: int = 1,
) -> dict:
    """config.json for `arch`, written through transformers' own config class (as a
    *ForSequenceClassification with `num_labels` outputs when `sequence_classifier` is set)."""
    from transformers import LlamaConfig, Qwen2Config

    cls = LlamaConfig if arch.family == "llama" else Qwen2Config
    kwargs: dict[str, Any] = dict(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        rms_norm_eps=arch.rms_norm_eps,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings,
        bos_token_id=arch.bos_token_id,
        eos_token_id=arch.eos_token_id,
    )
    rope = {"rope_type": "default", "rope_theta": arch.rope_theta}
    if arch.rope_scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": arch.rope_theta, **arch.rope_scaling}
    if arch.family == "llama":
        kwargs["head_dim"] = arch.head_dim
    seq = sequence_classifier
    if seq is not None:
        labels = list(seq.labels) if seq.labels is not None else None
        if labels is not None and len(labels) != num_labels:
            raise CheckpointError(f"{len(labels)} labels {labels} for a {num_labels}-output head")
        names = labels or [f"LABEL_{i}" for i in range(num_labels)]
        kwargs["id2label"] = dict(enumerate(names))
        kwargs["pad_token_id"] = int(seq.pad_token_id)
    cfg = cls(**kwargs, rope_parameters=rope)
    out = cfg.to_dict()
    out["architectures"] = [
        arch.architecture if seq is None else SEQUENCE_CLASSIFIER_CLASSES[arch.family]
    ]
    if seq is not None:  # (transformers 5 writes label2id as null; older versions read it)
        out["label2id"] = {name: i for i, name in kwargs["id2label"].items()}
    out["torch_dtype"] = str(dtype).removeprefix("torch.")
    return out


def export_hf(
    chunks: Iterable[torch.nn.Module],
    arch: ModelArch,
    ps: ParallelState,
    out_dir: str,
    dtype: torch.dtype | None = None,
    *,
    sequence_classifier: ScoreExport | None = None,
) -> None:
    """Write this layout's model as a HF directory (safetensors shards + index + config).

    Collective over the layout's ranks (all of the world unless `ps.ranks` says otherwise);
    only DP rank 0 writes. The caller makes the
    directory atomic if it needs to (nova_engine.train.checkpoint_io). With
    `sequence_classifier`, the chunks' score head becomes `score.weight` and the LM head is
    left out (*ForSequenceClassification); without it a score head is not exported."""
    dtype = dtype or _SAFE_DTYPES.get(arch.torch_dtype, torch.float32)
    seq = sequence_classifier
    n_files = arch.num_layers + 2
    files: dict[int, dict[str, torch.Tensor]] = {}
    score_shape: list[int] = []
    for model in chunks:
        for mname, param in model.named_parameters():
            name, layer = _split_name(mname, model)
            if _LORA_MARK in name:  # merged into the weights first (model.lora.lora_merged)
                continue
            if name == SCORE_PARAM:  # replicated over TP: no gather
                if seq is not None and ps.tp_rank == 0 and ps.dp_rank == 0:
                    score_shape = list(param.shape)
                    idx = _hf_file_index(arch, SCORE_HF)
                    files.setdefault(idx, {})[SCORE_HF] = (
                        param.detach().to(dtype).contiguous().cpu()
                    )
                continue
            parts = _gather_tp(param.detach(), ps)
            if ps.tp_rank != 0 or ps.dp_rank != 0:
                continue
            if name == "output_layer.weight" and (arch.tie_word_embeddings or seq is not None):
                continue
            for hf_name, t in _to_hf(arch, name, layer, parts).items():
                idx = _hf_file_index(arch, hf_name)
                files.setdefault(idx, {})[hf_name] = t.to(dtype).contiguous().cpu()
    if ps.dp_rank == 0 and ps.tp_rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        for idx, tensors in files.items():
            save_file(tensors, os.path.join(out_dir, _file_name(idx, n_files)), {"format": "pt"})
    # rank 0 collects the weight map from the writers and writes the index + config
    local_map = {
        name: _file_name(idx, n_files) for idx, tensors in files.items() for name in tensors
    }
    gathered: list[tuple[dict[str, str], list[int]] | None] = [None] * ps.world_size
    dist.all_gather_object(gathered, (local_map, score_shape), group=ps.layout_group)
    if ps.rank == ps.first_rank:  # the layout's first rank (0 unless it spans a subset)
        weight_map: dict[str, str] = {}
        shapes = hf_expected_names(arch)
        for g in gathered:
            if g is not None:
                weight_map.update(g[0])
                if g[1]:
                    score_shape = g[1]
        if seq is not None:
            shapes.pop("lm_head.weight", None)
            if not score_shape:
                raise CheckpointError(
                    "export as a sequence classifier: the model has no score head"
                )
            shapes[SCORE_HF] = tuple(score_shape)
        expected = set(shapes)
        if set(weight_map) != expected:
            missing = sorted(expected - set(weight_map))[:3]
            raise CheckpointError(f"export incomplete: missing {missing}")
        itemsize = torch.empty(0, dtype=dtype).element_size()
        total = sum(math.prod(shape) * itemsize for shape in shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as fh:
            json.dump(index, fh, indent=2)
        num_labels = score_shape[0] if score_shape else 1
        with open(os.path.join(out_dir, "config.json"), "w") as fh:
            json.dump(hf_config_dict(arch, dtype, seq, num_labels), fh, indent=2)
    dist.barrier(group=ps.layout_group)


PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<|endoftext|>", "<|end_of_text|>")


def choose_pad_token_id(tokenizer, avoid: Iterable[int] = ()) -> int:
    """A pad_token_id for a *ForSequenceClassification export: the tokenizer's pad token, else
    a reserved one (Llama 3.1's <|finetune_right_pad_id|>, <|pad|>, Qwen2's <|endoftext|>,
    <|end_of_text|>), never one of `avoid` (the tokens sequences end with: transformers reads
    the score at the last token that is not the pad token)."""
    bad = set(avoid)
    ids = [tokenizer.pad_token_id] + [tokenizer.convert_tokens_to_ids(t) for t in PAD_CANDIDATES]
    unk = getattr(tokenizer, "unk_token_id", None)
    for i in ids:
        if isinstance(i, int) and i >= 0 and i != unk and i not in bad:
            return i
    raise CheckpointError(
        f"no pad token for the sequence-classification export: the tokenizer's pad token and "
        f"{', '.join(PAD_CANDIDATES)} are absent or end sequences ({sorted(bad)[:5]})"
    )
