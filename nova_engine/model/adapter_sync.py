"""LoRA adapters only, trainer -> generator over the process group (issue #31; the full-model
sync is nova_engine.model.weight_sync).

    sync = AdapterSync(trainer, generator)   # every rank of the world calls it
    stats = sync.sync()                      # after each update: weight_sync_s, weight_sync_gb
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist

from nova_engine.model.sync_plan import WeightSyncError, _arch_diff, _side


class AdapterSync:
    """LoRA adapters only, trainer -> generator (issue #31: with LoRA the base weights never
    change, so a sync moves the adapters: a few MB instead of the model). Both sides are
    LoRA engines with the same model.lora (rank, alpha, targets) over the same frozen base
    (the generator loaded from the trainer's starting weights); the layouts may differ.

    Each training pipeline stage's TP0/DP0 rank sends its stage's adapters as full PEFT
    matrices (nova_engine.model.lora.peft_state_dict: gathered over TP) in one flat fp32
    buffer broadcast over a group of itself and every generation rank; generation ranks
    load their TP slices (lora.load_peft_tensors). Building it is collective over the world:
    it refuses, on every rank, sides whose architecture or LoRA settings differ, and sends
    each stage's metadata (PEFT names and shapes, in buffer order) once; a sync moves only
    the buffers."""

    def __init__(self, src: Any, dst: Any):
        from nova_engine.model.lora import peft_state_dict

        self.src, self.dst = _side(src), _side(dst)
        me = dist.get_rank()
        info: dict[str, Any] = {"rank": me, "role": None}
        for role, side in (("train", self.src), ("gen", self.dst)):
            if side is None:
                continue
            lora = getattr(side.engine, "lora", None)
            if lora is None:
                raise WeightSyncError(f"rank {me}: the {role} engine has no LoRA adapters")
            info.update(role=role, arch=side.arch.to_dict(), lora=asdict(lora))
            if role == "train":
                ps = side.ps
                info.update(stage=ps.pp_rank, source=ps.tp_rank == 0 and ps.dp_rank == 0)
                # collective over the trainer's TP group: the names and shapes, once
                peft = peft_state_dict(side.chunks, side.arch, ps)
                if info["source"]:
                    info["meta"] = [(k, tuple(v.shape)) for k, v in peft.items()]
        infos: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(infos, info)
        sides = [i for i in infos if i["role"] is not None]
        if not any(i["role"] == "train" for i in sides) or not any(
            i["role"] == "gen" for i in sides
        ):
            raise WeightSyncError("adapter sync needs a training and a generation side")
        ref = next(i for i in sides if i["role"] == "train")
        for i in sides:
            diff = _arch_diff(ref["arch"], i["arch"])
            diff += [f"model.lora.{k}: {ref['lora'][k]!r} vs {i['lora'][k]!r}"
                     for k in ("rank", "alpha", "targets") if ref["lora"][k] != i["lora"][k]]  # fmt: skip
            if diff:
                raise WeightSyncError(
                    f"the {i['role']} engine on rank {i['rank']} differs from the training "
                    f"engine on rank {ref['rank']}: {'; '.join(diff[:4])}"
                )
        self.gen_ranks = [i["rank"] for i in sides if i["role"] == "gen"]
        src_infos = sorted((i["stage"], i["rank"], i["meta"]) for i in sides if i.get("source"))
        self.sources = [r for _, r, _ in src_infos]
        self.metas: list[list[tuple[str, tuple[int, ...]]]] = [m for *_, m in src_infos]
        self.groups = [dist.new_group(sorted([r, *self.gen_ranks])) for r in self.sources]

    def sync(self) -> dict[str, float]:
        """Send the trainer's adapters to every generation rank (collective over both sides;
        other ranks return {} at once). Returns weight_sync_s / weight_sync_gb."""
        from nova_engine.model.lora import load_peft_tensors, peft_state_dict

        if self.src is None and self.dst is None:
            return {}
        t0, me, nbytes = time.perf_counter(), dist.get_rank(), 0
        mine = {}
        if self.src is not None:  # collective over the trainer's TP group
            mine = peft_state_dict(self.src.chunks, self.src.arch, self.src.ps)
        dev = (self.src or self.dst).ps.device  # type: ignore[union-attr]
        received: dict[str, torch.Tensor] = {}
        for src, group, meta in zip(self.sources, self.groups, self.metas):
            if me != src and self.dst is None:
                continue
            sizes = [int(torch.Size(shape).numel()) for _, shape in meta]
            if me == src:
                got = [(k, tuple(v.shape)) for k, v in mine.items()]
                assert got == meta, "the trainer's adapters changed since the AdapterSync"
                flat = torch.cat([mine[k].reshape(-1) for k, _ in meta]).to(dev, torch.float32)
            else:
                flat = torch.empty(sum(sizes), dtype=torch.float32, device=dev)
            dist.broadcast(flat, src=src, group=group)
            nbytes += flat.numel() * 4
            if self.dst is not None:
                for (k, shape), part in zip(meta, flat.cpu().split(sizes)):
                    received[k] = part.reshape(shape)
        if self.dst is not None:
            load_peft_tensors(self.dst.chunks, self.dst.arch, self.dst.ps, received,
                              "the trainer's adapters")  # fmt: skip
        return {"weight_sync_s": time.perf_counter() - t0, "weight_sync_gb": nbytes / 1e9}
