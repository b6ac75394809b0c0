"""Offline LoRA exports of a checkpoint (`nova export --merge-lora | --adapter-only`).

    nova export runs/dpo/checkpoints/step_00000200 out/merged --merge-lora
    nova export runs/dpo/checkpoints/step_00000200 out/adapter --adapter-only

What a checkpoint of a run with `model.lora` holds (format torch, nova_engine.train.checkpoint):
- `mp_<engine>_tpXX_ppYY.pt`: per (TP, PP) coordinate the shard's parameters by name, per
  model chunk: the frozen base weights and the adapters `<linear>.lora.A` / `.lora.B` (TP
  shards as in the layer: nova_engine.model.lora). The adapters are the only trained state.
- `hf/` (only with checkpoint.hf_in_checkpoints): the MERGED weights W + (alpha/r) B A,
  written at save time by the engine (lora_merged around export_hf). A plain `nova export`
  copies it.
- the manifest's run config: model.lora (rank, alpha, targets), model.hf_path (the base).

Both exports here read only the adapters from the shards (memory-mapped: a 70B shard's
base weights are not read), so they work without hf/ in the checkpoint — at 70B that hf/
costs ~140 GB per save, and with LoRA the adapters are all that changed:
- `--adapter-only`: adapter_config.json + adapter_model.safetensors in PEFT's layout (fp32),
  which `peft.PeftModel.from_pretrained(base, dir)` loads on the transformers base model.
- `--merge-lora`: the base model's safetensors files (model.hf_path of the run, checked
  against the checkpoint's own copy of one adapted base weight) with every adapted tensor
  replaced by W + (alpha/r) B A, summed in fp32 and rounded once to the base's dtype (what
  the engine's merge does), plus the tokenizer files as the run's own export has them.
A checkpoint without model.lora, a reward model's (its score head trains in full: hf/ is
its export) and a format-dist checkpoint are refused in one line naming the checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch

from nova_engine.model.lora import LORA_MARK, _module_name, peft_config_dict, peft_tensors


class LoRAExportError(ValueError):
    """A checkpoint that cannot give a LoRA export; the message names it and why."""


def run_config(ckpt: str) -> dict[str, Any]:
    """The run config recorded in checkpoint `ckpt`'s manifest (read_manifest checks it)."""
    from nova_engine.train.checkpoint_io import read_manifest

    cfg = (read_manifest(ckpt).get("extra") or {}).get("config")
    if not cfg:
        raise LoRAExportError(
            f"{ckpt}: the manifest records no run config (not a run's checkpoint)"
        )
    return cfg


def lora_config(ckpt: str, cfg: dict[str, Any]):
    """The checkpoint's LoRAConfig; refused when the run had no model.lora."""
    from nova_engine.config import LoRAConfig

    lora = (cfg.get("model") or {}).get("lora")
    if not lora:
        raise LoRAExportError(
            f"{ckpt}: trained without model.lora (full weights): export it without "
            "--merge-lora / --adapter-only"
        )
    return LoRAConfig(**lora)


def _layer_offset(pp_rank: int, chunk: int, pp: int, vpp: int, num_layers: int) -> int:
    """Global index of the first layer of model chunk `chunk` on pipeline rank `pp_rank`
    (megatron's even split; interleaved: chunk c of rank p is stage c * pp + p)."""
    return (chunk * pp + pp_rank) * (num_layers // (pp * vpp))


def _target_of(key: str, offset: int) -> tuple[str, int | None, str]:
    """A shard's `<module>.lora.A` key -> (module path, global layer index or None for the
    LM head, megatron module name), e.g. decoder.layers.3.mlp.linear_fc1 -> (.., 3 + offset,
    linear_fc1)."""
    mod = key[: -len(LORA_MARK + "A")]
    kind = mod.rsplit(".", 1)[-1]
    return mod, None if kind == "output_layer" else offset + int(mod.split(".")[2]), kind


def _open_shard(path: str) -> dict[str, Any]:
    """A shard file, memory-mapped: only the tensors read are paged in."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise LoRAExportError(f"{path}: missing (a checkpoint of another layout?)") from None
    except Exception as e:  # noqa: BLE001 — one line naming the file, whatever torch raised
        raise LoRAExportError(f"{path}: unreadable ({str(e).splitlines()[0][:200]})") from None


def checkpoint_adapters(ckpt: str, arch) -> dict[str, torch.Tensor]:
    """The PEFT tensors of checkpoint `ckpt`'s policy adapters (format torch), from its
    shards: A/B of every TP rank of a target -> lora.peft_tensors (the live export's code)."""
    from nova_engine.train.checkpoint_io import read_manifest, verify_checksums

    extra = read_manifest(ckpt).get("extra") or {}
    if extra.get("format") == "dist":
        raise LoRAExportError(
            f"{ckpt}: a format-dist checkpoint: the LoRA exports read format-torch shards "
            "(mp_*.pt); use its hf/ (merged) with a plain `nova export`"
        )
    engines = extra.get("engines") or {}
    if not engines:
        raise LoRAExportError(f"{ckpt}: the manifest records no engine layout")
    name, lay = next(iter(engines.items()))  # the first trainable engine: the policy
    tp, pp, vpp = lay["tp"], lay["pp"], lay.get("vpp") or 1
    files = {(t, p): f"mp_{name}_tp{t:02d}_pp{p:02d}.pt" for t in range(tp) for p in range(pp)}
    verify_checksums(ckpt, files.values())
    out: dict[str, torch.Tensor] = {}
    for p in range(pp):
        shards = [_open_shard(os.path.join(ckpt, files[(t, p)]))["model"] for t in range(tp)]
        for c, chunk in enumerate(shards[0]):
            if "score.weight" in chunk:
                raise LoRAExportError(
                    f"{ckpt}: a reward model (its score head trains in full): export its hf/ "
                    "with a plain `nova export`"
                )
            off = _layer_offset(p, c, pp, vpp, arch.num_layers)
            for key in chunk:
                if not key.endswith(LORA_MARK + "A"):
                    continue
                mod, i, kind = _target_of(key, off)
                a_parts = [s[c][key] for s in shards]
                b_parts = [s[c][mod + LORA_MARK + "B"] for s in shards]
                out.update(peft_tensors(arch, i, kind, a_parts, b_parts))
    if not out:
        raise LoRAExportError(f"{ckpt}: model.lora is set but the shards hold no adapters")
    return out


def _arch_and_base(ckpt: str, cfg: dict[str, Any]):
    from nova_engine.model.arch import load_arch

    base = (cfg.get("model") or {}).get("hf_path") or ""
    src = base if os.path.isfile(os.path.join(base, "config.json")) else os.path.join(ckpt, "hf")
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise LoRAExportError(
            f"{ckpt}: the run's base model {base!r} (model.hf_path) has no config.json and the "
            "checkpoint has no hf/: the model's shape is unknown"
        )
    return load_arch(src), base


def export_adapter(ckpt: str, out_dir: str) -> None:
    """Write checkpoint `ckpt`'s adapters in PEFT's layout into out_dir (a new directory)."""
    from safetensors.torch import save_file

    cfg = run_config(ckpt)
    lora = lora_config(ckpt, cfg)
    arch, base = _arch_and_base(ckpt, cfg)
    tensors = checkpoint_adapters(ckpt, arch)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), {"format": "pt"})
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as fh:
        json.dump(peft_config_dict(lora, base), fh, indent=2)


def _check_base(ckpt: str, base: str, arch, adapters: dict[str, torch.Tensor]) -> None:
    """The base dir still holds the run's frozen weights: one adapted weight of TP rank 0,
    PP rank 0 (its copy in the checkpoint's shard) equals the base's slice exactly."""
    from nova_engine.model.hf_io import HFCheckpoint, _hf_value
    from nova_engine.train.checkpoint_io import read_manifest

    extra = read_manifest(ckpt).get("extra") or {}
    name, lay = next(iter(extra["engines"].items()))
    shard = _open_shard(os.path.join(ckpt, f"mp_{name}_tp00_pp00.pt"))["model"]
    for c, chunk in enumerate(shard):
        off = _layer_offset(0, c, lay["pp"], lay.get("vpp") or 1, arch.num_layers)
        for key in chunk:
            if key.endswith(LORA_MARK + "A"):
                mod, i, kind = _target_of(key, off)
                want = _hf_value(HFCheckpoint(base), arch, _module_name(i, kind), i, lay["tp"], 0)
                if not torch.equal(chunk[mod + ".weight"], want.to(chunk[mod + ".weight"].dtype)):
                    raise LoRAExportError(
                        f"{ckpt}: the base model {base} (model.hf_path) differs from the "
                        f"run's frozen weights ({_module_name(i, kind)}): it changed since"
                    )
                return


def export_merged(ckpt: str, out_dir: str) -> None:
    """Write base + (alpha/r) B A as a HF directory into out_dir (a new directory)."""
    from safetensors.torch import load_file, save_file

    from nova_engine.model.hf_export import complete_hf_export

    cfg = run_config(ckpt)
    lora = lora_config(ckpt, cfg)
    arch, base = _arch_and_base(ckpt, cfg)
    adapters = checkpoint_adapters(ckpt, arch)
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise LoRAExportError(
            f"{ckpt}: the run's base model {base!r} (model.hf_path) is gone: --merge-lora "
            "adds the adapters to it (--adapter-only needs no base; hf/ is merged)"
        )
    _check_base(ckpt, base, arch, adapters)
    s = lora.alpha / lora.rank
    os.makedirs(out_dir, exist_ok=True)
    merged = 0
    for f in sorted(os.listdir(base)):
        src = os.path.join(base, f)
        if not os.path.isfile(src):
            continue
        if not f.endswith(".safetensors"):
            shutil.copy2(src, os.path.join(out_dir, f))
            continue
        tensors = load_file(src)
        for name, w in tensors.items():
            key = "base_model.model." + name.removesuffix(".weight")
            if key + ".lora_A.weight" in adapters:
                delta = adapters[key + ".lora_B.weight"] @ adapters[key + ".lora_A.weight"]
                tensors[name] = (w.float() + s * delta).to(w.dtype)
                merged += 1
        save_file(tensors, os.path.join(out_dir, f), {"format": "pt"})
    if merged * 2 != len(adapters):
        raise LoRAExportError(
            f"{ckpt}: {len(adapters) // 2} adapted tensors, {merged} found in the base model "
            f"{base}: not the run's base"
        )
    model = cfg.get("model") or {}
    complete_hf_export(
        out_dir, source_dir=base, tokenizer_dir=model.get("tokenizer_path") or base,
        template=(cfg.get("data") or {}).get("template"),
    )  # fmt: skip
