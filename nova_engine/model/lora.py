"""LoRA adapters on Nova's megatron layers, tensor- and sequence-parallel.

    adapters = apply_lora(chunks, lora_cfg)      # freezes the base, B = 0: step 0 == base
    with lora_disabled(chunks): ...              # the reference policy: base weights only
    with lora_merged(chunks): export_hf(...)     # W + (alpha/r) B A in place, restored after
    export_peft_adapter(chunks, arch, ps, dir)   # adapter_config.json + adapter_model.safetensors

Each target linear `y = W x` gets `y + s * B A dropout(x)` with s = alpha / rank, computed by a
forward hook on the megatron module (parameter names of the base are unchanged; the adapter
lives at `<linear>.lora.A` / `<linear>.lora.B`). Shapes on TP rank t of tp (r = rank):

| layer kind (megatron)                   | W (this rank)   | A           | B            |
| --------------------------------------- | --------------- | ----------- | ------------ |
| ColumnParallelLinear (linear_qkv, fc1)  | [out/tp, in]    | [r, in] rep | [out/tp, r]  |
| RowParallelLinear (linear_proj, fc2)    | [out, in/tp]    | [r, in/tp]  | [out, r] rep |

Communication is on the r-sized intermediate u = A x, never on hidden-sized tensors:
- column, no SP: x is replicated, u = A x is too; `copy_to_tensor_model_parallel_region(u)`
  (identity forward, all-reduce of du backward: each rank's B shard contributes to du).
- column, SP: x is this rank's sequence chunk [S/tp, B, in]; u_local = A x_local, then
  `gather_from_sequence_parallel_region(u)` -> [S, B, r] (backward: reduce-scatter); A's
  grad covers the local chunk only, so A is marked `sequence_parallel` (megatron's
  finalize_model_grads sums it over TP, like the norms' weights).
- row, no SP: u = sum over TP of A_t x_t: `reduce_from_tensor_model_parallel_region` (exact:
  B is applied after the reduce, to the full u), then y = B u (replicated, as W x is).
- row, SP: `reduce_scatter_to_sequence_parallel_region(u)` -> [S/tp, B, r], y = B u on the
  local chunk (W x is reduce-scattered the same way); B is marked `sequence_parallel`.
Replicated adapter params carry tensor_model_parallel=False (the grad norm counts them once),
split ones the layer's partition dim. A is initialized (kaiming-uniform, as PEFT) from a
generator seeded by (seed, layer, kind) on the full [r, in] matrix and then sliced, so the
adapters are identical at every TP size; B = 0.

LM head (target "lm_head", untied heads only): the fused log-prob / cross-entropy kernels
read the head's weight, never call the layer, so the adapter enters as an effective weight
`lm_head_weight() = W + s B A` ([V/tp, H] per rank: A [r, H] replicated, B [V/tp, r] split
like W), materialized once per call in W's dtype (one rounding of the fp32 sum, as a merged
model's head) and differentiated by autograd from the kernel's dW; A passes through
`copy_to_tensor_model_parallel_region`, which sums its partial grads over TP. The chunk's
`lm_head_weight` is patched on the instance, so SFT/DPO/RL losses and generation all read
it. Cost: one extra [V/tp, H] tensor per micro-batch in flight and the head's weight grad
(~1 GB at 8B, TP1, bf16). No dropout on the head's adapter.

Dropout draws from the default generator; with TP it is only exact for dropout = 0 (the masks
of a replicated A's input must agree over TP ranks).

PEFT layout (Llama / Qwen2): megatron's fused linear_qkv becomes q_proj, k_proj, v_proj
adapters that share A and split B by rows (exact: [Bq; Bk; Bv] A x = fused B A x);
linear_fc1 likewise gate_proj / up_proj; linear_proj = o_proj, linear_fc2 = down_proj.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import types
import zlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel import layers as tp_layers
from megatron.core.tensor_parallel import mappings
from torch import nn

from nova_engine.logging import get_logger

if TYPE_CHECKING:
    from nova_engine.config import LoRAConfig
    from nova_engine.model.arch import ModelArch
    from nova_engine.parallel.state import ParallelState

# config target -> megatron module name
TARGETS = {
    "qkv": "linear_qkv", "proj": "linear_proj", "fc1": "linear_fc1", "fc2": "linear_fc2",
    "lm_head": "output_layer",
}  # fmt: skip
# megatron module name -> PEFT (HF) module names
PEFT_MODULES = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
    "output_layer": ("lm_head",),
}
ROW_PARALLEL = ("linear_proj", "linear_fc2")  # the others are column-parallel
LORA_MARK = ".lora."
logger = get_logger(__name__)


def is_lora_param(name: str) -> bool:
    """True for an adapter parameter name (`...linear_qkv.lora.A`)."""
    return LORA_MARK in name or name.startswith("lora.")


class LoRAAdapter(nn.Module):
    """A [r, in(/tp)] and B [out(/tp), r] of one megatron linear (see the module docstring).

    x: the linear's input ([S, B, in] or its SP chunk [S/tp, B, in] for a column layer;
    [S, B, in/tp] for a row layer). forward(x) -> the delta in the linear's output layout."""

    def __init__(self, linear: Any, rank: int, alpha: float, dropout: float, seed: int):
        super().__init__()
        self.row = isinstance(linear, tp_layers.RowParallelLinear)
        if not self.row and not isinstance(linear, tp_layers.ColumnParallelLinear):
            raise TypeError(
                f"LoRA needs megatron's Column/RowParallelLinear, got {type(linear).__name__} "
                "(Transformer Engine's layer spec is not supported with model.lora: use_te=False)"
            )
        w: torch.Tensor = linear.weight
        self.tp_group: Any = linear.tp_group
        tp = dist.get_world_size(self.tp_group) if self.tp_group is not None else 1
        t = dist.get_rank(self.tp_group) if self.tp_group is not None else 0
        self.sp = bool(getattr(linear, "sequence_parallel", False)) and tp > 1
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        out_local, in_local = w.shape
        in_full = in_local * tp if self.row else in_local
        gen = torch.Generator().manual_seed(seed)
        a_full = torch.empty(rank, in_full)
        bound = 1.0 / math.sqrt(in_full)  # kaiming_uniform(a=sqrt(5)), as PEFT / nn.Linear
        a_full.uniform_(-bound, bound, generator=gen)
        a = a_full[:, t * in_local : (t + 1) * in_local] if self.row else a_full
        self.A = nn.Parameter(a.to(device=w.device, dtype=w.dtype).contiguous())
        self.B = nn.Parameter(torch.zeros(out_local, rank, device=w.device, dtype=w.dtype))
        if self.row:
            tp_layers.set_tensor_model_parallel_attributes(self.A, True, 1, 1)
            tp_layers.set_tensor_model_parallel_attributes(self.B, False, -1, 1)
            self.B.sequence_parallel = self.sp  # type: ignore[attr-defined]
        else:
            tp_layers.set_tensor_model_parallel_attributes(self.A, False, -1, 1)
            tp_layers.set_tensor_model_parallel_attributes(self.B, True, 0, 1)
            self.A.sequence_parallel = self.sp  # type: ignore[attr-defined]

    def delta_weight(self) -> torch.Tensor:
        """s * B A for this rank's shard of W (same shape as W)."""
        return (self.B.float() @ self.A.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = F.linear(self.dropout(x), self.A)
        g = self.tp_group
        if self.row:
            if self.sp:
                u = mappings.reduce_scatter_to_sequence_parallel_region(u, group=g)
            else:
                u = mappings.reduce_from_tensor_model_parallel_region(u, group=g)
        elif self.sp:
            u = mappings.gather_from_sequence_parallel_region(u, group=g)
        else:
            u = mappings.copy_to_tensor_model_parallel_region(u, group=g)
        return F.linear(u, self.B) * self.scaling


def _lora_hook(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
    adapter: LoRAAdapter = module.lora
    if not adapter.enabled:
        return output
    x = args[0] if args else kwargs["input_"]
    out, bias = output
    return out + adapter(x).to(out.dtype), bias


def _sharded_state_dict(module: Any, prefix="", sharded_offsets=(), metadata=None):
    """megatron's Column/RowParallelLinear.sharded_state_dict with the adapter's split matrix
    (column: lora.B on axis 0; row: lora.A on axis 1) sharded over TP like W; the other
    adapter matrix is replicated (dist checkpoints, nova_engine.train.dist_checkpoint).
    A gated fc1's B goes through megatron's swiglu factory, as fc1's weight does (MLP's
    sharded_state_dict only wraps `weight` / `bias`): its global tensor is [gate; up], not
    the ranks' [gate_t; up_t] blocks in a row, so it reshards into another TP size."""
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    axes = {"weight": 1, "lora.A": 1} if module.lora.row else {"weight": 0, "bias": 0, "lora.B": 0}
    sd = make_sharded_tensors_for_checkpoint(
        module.state_dict(prefix="", keep_vars=True), prefix, axes, sharded_offsets,
        tp_group=module.tp_group, dp_cp_group=(metadata or {}).get("dp_cp_group"),
    )  # fmt: skip
    if getattr(module, "lora_gated", False):  # fc1's B rows are [gate_t; up_t] on rank t:
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

        key = f"{prefix}lora.B"  # the global tensor is [gate; up], as megatron's fc1 weight
        singleton = (metadata or {}).get("singleton_local_shards", False)
        sd[key] = apply_swiglu_sharded_factory(sd[key], sharded_offsets, singleton)
    return sd


def _targets(chunk: Any, kinds: Iterable[str]) -> Iterator[tuple[int | None, str, Any]]:
    """(global layer index, megatron module name, module) of the target linears of a chunk;
    the LM head (`output_layer`, last stage only) comes last with layer index None."""
    names = {TARGETS[k] for k in kinds}
    for layer in chunk.decoder.layers:
        i = layer.layer_number - 1
        for sub in (layer.self_attention, layer.mlp):
            for name in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"):
                mod = getattr(sub, name, None)
                if mod is not None and name in names:
                    yield i, name, mod
    head = getattr(chunk, "output_layer", None)
    if "output_layer" in names and head is not None:
        yield None, "output_layer", head


def _lm_head_weight(model: Any) -> torch.Tensor:
    """NovaGPTModel.lm_head_weight with the head's adapter: w_VpH + s B_Vpr A_rH (one
    rounding to W's dtype). A enters through copy_to_tensor_model_parallel_region: each TP
    rank's dW shard gives a partial s B_t^T dW_t, summed over TP in A's backward."""
    w = type(model).lm_head_weight(model)
    ad: LoRAAdapter = model.output_layer.lora
    if not ad.enabled:
        return w
    a = ad.A
    if ad.tp_group is not None and ad.tp_group.size() > 1:
        a = mappings.copy_to_tensor_model_parallel_region(a, group=ad.tp_group)
    return (w.float() + (ad.B.float() @ a.float()) * ad.scaling).to(w.dtype)


def _attach_head(model: Any, mod: Any, cfg: LoRAConfig, seed: int) -> LoRAAdapter:
    """The LM head's adapter: no forward hook (Nova never calls output_layer; every reader of
    the head weight goes through the chunk's lm_head_weight(), patched on this instance)."""
    from nova_engine.config import ConfigError

    if getattr(model, "share_embeddings_and_output_weights", False) or mod.weight is None:
        raise ConfigError(
            "model.lora.targets",
            "'lm_head' needs an untied LM head (tie_word_embeddings=false): with a tied head "
            "the merged weights would change the input embedding too",
        )
    mod.lora = LoRAAdapter(mod, cfg.rank, cfg.alpha, 0.0, seed)  # no dropout: enters as W
    # A's grad is complete on every rank (copy_to region's all-reduce), also under SP:
    # not `sequence_parallel`, else finalize_model_grads would sum it over TP a second time
    mod.lora.A.sequence_parallel = False
    model.lm_head_weight = types.MethodType(_lm_head_weight, model)
    mod.sharded_state_dict = types.MethodType(_sharded_state_dict, mod)
    return mod.lora


def apply_lora(
    chunks: Iterable[nn.Module], cfg: LoRAConfig, *, keep_trainable: Iterable[str] = ()
) -> list[LoRAAdapter]:
    """Attach adapters to the target linears of this rank's chunks (the layers its pipeline
    stage owns) and freeze everything else but parameters whose name ends with one of
    `keep_trainable` (e.g. a score head trained in full). Returns the adapters."""
    keep = tuple(keep_trainable)
    adapters = []
    warn_dropout = False
    for chunk in chunks:
        for i, name, mod in _targets(chunk, cfg.targets):
            if hasattr(mod, "lora"):
                raise RuntimeError(f"layer {i} {name} already has a LoRA adapter")
            key = name if i is None else f"{i}.{name}"
            seed = cfg.seed * 1_000_003 + zlib.crc32(key.encode())
            if i is None:  # the LM head; a score model never reads it: no adapter there
                if getattr(chunk, "score", None) is None:
                    adapters.append(_attach_head(chunk, mod, cfg, seed))
                continue
            mod.lora = LoRAAdapter(mod, cfg.rank, cfg.alpha, cfg.dropout, seed)
            mod.register_forward_hook(_lora_hook, with_kwargs=True)
            mod.sharded_state_dict = types.MethodType(_sharded_state_dict, mod)
            mod.lora_gated = name == "linear_fc1" and bool(
                getattr(getattr(mod, "config", None), "gated_linear_unit", False)
            )
            adapters.append(mod.lora)
            if cfg.dropout > 0 and mod.tp_group is not None and mod.tp_group.size() > 1:
                warn_dropout = True
        for pname, p in chunk.named_parameters():
            p.requires_grad_(is_lora_param(pname) or pname.endswith(keep))
    if warn_dropout:
        logger.warning(
            "model.lora.dropout=%s with tensor parallelism: the dropout masks come from the "
            "default generator, so they are not the masks of a TP1 run (only dropout=0 is "
            "layout-exact)", cfg.dropout,
        )  # fmt: skip
    return adapters


def adapters_of(chunks: Iterable[nn.Module]) -> list[LoRAAdapter]:
    return [m for c in chunks for m in c.modules() if isinstance(m, LoRAAdapter)]


@contextlib.contextmanager
def lora_disabled(chunks: Iterable[nn.Module]) -> Iterator[None]:
    """Run the base model: every adapter's path is skipped (its output is exactly W x)."""
    ads = adapters_of(chunks)
    before = [a.enabled for a in ads]
    for a in ads:
        a.enabled = False
    try:
        yield
    finally:
        for a, e in zip(ads, before):
            a.enabled = e


@contextlib.contextmanager
def lora_merged(chunks: Iterable[nn.Module]) -> Iterator[None]:
    """W <- W + s B A on every shard (local: a column layer's B and a row layer's A are split
    like W), adapters off; the original weights (kept on the host) come back after."""
    chunks = list(chunks)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for c in chunks:
            for m in c.modules():
                ad = getattr(m, "lora", None)
                if isinstance(ad, LoRAAdapter):
                    w = cast(torch.Tensor, m.weight)
                    saved.append((w, w.detach().to("cpu", copy=True)))
                    w.copy_((w.float() + ad.delta_weight()).to(w.dtype))
    try:
        with lora_disabled(chunks):
            yield
    finally:
        with torch.no_grad():
            for w, orig in saved:
                w.copy_(orig.to(w.device))


def _gather(t: torch.Tensor, ps: ParallelState) -> list[torch.Tensor]:
    if ps.tp == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(ps.tp)]
    dist.all_gather(parts, t.contiguous(), group=ps.tp_group)
    return parts


def _module_name(i: int | None, name: str) -> str:
    """megatron weight name of a target (global layer index i; None for the LM head)."""
    if i is None:
        return "output_layer.weight"
    return f"decoder.layers.{i}.{'mlp' if 'fc' in name else 'self_attention'}.{name}.weight"


def peft_tensors(
    arch: ModelArch,
    i: int | None,
    name: str,
    a_parts: list[torch.Tensor],
    b_parts: list[torch.Tensor],
) -> dict[str, torch.Tensor]:
    """One target's adapter from its TP shards (a_parts, b_parts: A and B of TP ranks 0..tp-1)
    -> PEFT tensors (fp32, CPU): base_model.model.<hf module>.lora_{A,B}.weight."""
    from nova_engine.model.hf_io import _to_hf

    mname = _module_name(i, name)
    if name in ROW_PARALLEL:  # A split like W (columns), B replicated
        a_hf = _to_hf(arch, mname, i, a_parts)
        b_hf = {k: b_parts[0] for k in a_hf}
    else:  # B split like W (rows, incl. qkv / gate-up layout), A replicated
        b_hf = _to_hf(arch, mname, i, b_parts)
        a_hf = {k: a_parts[0] for k in b_hf}
    out = {}
    for k in a_hf:
        base = "base_model.model." + k.removesuffix(".weight")
        out[base + ".lora_A.weight"] = a_hf[k].float().cpu().clone()
        out[base + ".lora_B.weight"] = b_hf[k].float().cpu().clone()
    return out


def peft_state_dict(
    chunks: Iterable[nn.Module], arch: ModelArch, ps: ParallelState
) -> dict[str, torch.Tensor]:
    """This rank's adapters as PEFT tensors (full, gathered over TP; collective over TP).
    Keys: base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight etc."""
    out: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        for i, name, mod in _targets(chunk, TARGETS):
            ad = getattr(mod, "lora", None)
            if isinstance(ad, LoRAAdapter):
                a_parts, b_parts = _gather(ad.A.detach(), ps), _gather(ad.B.detach(), ps)
                out.update(peft_tensors(arch, i, name, a_parts, b_parts))
    return out


def peft_config_dict(cfg: LoRAConfig, base_model: str = "") -> dict[str, Any]:
    modules = sorted({n for k in cfg.targets for n in PEFT_MODULES[TARGETS[k]]})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }


def export_peft_adapter(
    chunks: Iterable[nn.Module],
    arch: ModelArch,
    ps: ParallelState,
    cfg: LoRAConfig,
    out_dir: str,
    base_model: str = "",
) -> None:
    """Write the adapters alone in PEFT's layout (collective over the world; rank 0 writes
    adapter_config.json + adapter_model.safetensors, fp32)."""
    from safetensors.torch import save_file

    local = peft_state_dict(chunks, arch, ps)
    mine = local if (ps.tp_rank == 0 and ps.dp_rank == 0) else {}
    gathered: list[Any] = [None] * ps.world_size
    dist.all_gather_object(gathered, mine, group=ps.layout_group)
    if ps.rank == ps.first_rank:
        tensors = {k: v for g in gathered if g for k, v in g.items()}
        os.makedirs(out_dir, exist_ok=True)
        save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), {"format": "pt"})
        with open(os.path.join(out_dir, "adapter_config.json"), "w") as fh:
            json.dump(peft_config_dict(cfg, base_model), fh, indent=2)
    dist.barrier(group=ps.layout_group)


class _AdapterReader:
    """A TensorReader (nova_engine.model.hf_io) over one PEFT matrix (lora_A or lora_B) of
    every target: HF weight name -> that module's adapter matrix, sliced on request."""

    def __init__(self, tensors: dict[str, torch.Tensor], which: str, where: str):
        self.tensors, self.which, self.where = tensors, which, where

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None):
        key = "base_model.model." + name.removesuffix(".weight") + f".{self.which}.weight"
        if key not in self.tensors:
            raise ValueError(f"{self.where}: no tensor {key!r} (a target of model.lora)")
        t = self.tensors[key]
        return t[rows or slice(None), cols or slice(None)]


def load_peft_adapter(
    chunks: Iterable[nn.Module], arch: ModelArch, ps: ParallelState, adapter_dir: str
) -> None:
    """Fill this rank's adapters from a PEFT directory (adapter_config.json +
    adapter_model.safetensors), e.g. to continue training. The directory's r must be the
    adapters' rank; lora_alpha is the caller's (model.lora.alpha) to match. q/k/v (gate/up)
    must share lora_A, as export_peft_adapter writes them (fused linears have one A)."""
    from safetensors.torch import load_file

    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    load_peft_tensors(chunks, arch, ps, load_file(path), path)


def load_peft_tensors(
    chunks: Iterable[nn.Module],
    arch: ModelArch,
    ps: ParallelState,
    tensors: dict[str, torch.Tensor],
    where: str,
) -> None:
    """Fill this rank's adapters from PEFT tensors (full matrices, e.g. peft_state_dict's or
    a file's), each rank taking its TP slice; `where` names the source in errors."""
    from nova_engine.model.hf_io import _hf_value

    path = where
    readers = {w: _AdapterReader(tensors, w, path) for w in ("lora_A", "lora_B")}
    with torch.no_grad():
        for chunk in chunks:
            for i, name, mod in _targets(chunk, TARGETS):
                ad = getattr(mod, "lora", None)
                if not isinstance(ad, LoRAAdapter):
                    continue
                mname = _module_name(i, name)
                hf = PEFT_MODULES[name]
                if ad.row:
                    a = _hf_value(readers["lora_A"], arch, mname, i, ps.tp, ps.tp_rank)
                    b = readers["lora_B"].read(_hf_name(i, name, hf[0]))
                else:
                    a_all = [readers["lora_A"].read(_hf_name(i, name, h)) for h in hf]
                    if any(not torch.equal(a_all[0], x) for x in a_all[1:]):
                        raise ValueError(
                            f"{path}: layer {i} {'/'.join(hf)} have different lora_A; the fused "
                            f"megatron {name} has one A (train them as one adapter)"
                        )
                    a = a_all[0]
                    b = _hf_value(readers["lora_B"], arch, mname, i, ps.tp, ps.tp_rank)
                for p, v, what in ((ad.A, a, "lora_A"), (ad.B, b, "lora_B")):
                    if tuple(v.shape) != tuple(p.shape):
                        raise ValueError(
                            f"{path}: layer {i} {name} {what} slice has shape {list(v.shape)}, "
                            f"the adapter expects {list(p.shape)} (model.lora.rank?)"
                        )
                    p.copy_(v.to(p.dtype))


def _hf_name(i: int | None, name: str, hf_module: str) -> str:
    if i is None:
        return f"{hf_module}.weight"
    sub = "mlp" if "fc" in name else "self_attn"
    return f"model.layers.{i}.{sub}.{hf_module}.weight"
