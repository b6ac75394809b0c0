"""Training checkpoints: model, optimizer, LR schedule, data position and RNG states, one file
per rank, written atomically (`checkpoint_io`: temp dir + COMPLETE manifest + rename).

    path = save_checkpoint(root, trainer, config_hash=run.hash(), arch=arch)   # all ranks
    step = load_checkpoint(latest_complete(root), trainer)                      # all ranks

Layout of `<root>/step_00000123/` (nothing is written twice across DP replicas):
    mp_tp01_pp00.pt  written by DP rank 0 of each (TP, PP) coordinate: that shard's parameters
                     (by name, per chunk) and, unless the optimizer is DP-sharded, its
                     optimizer state (Adam moments + fp32 master weights)
    rank_00003.pt    every rank: step, LR schedule, RNG states, and with the distributed
                     optimizer (ZeRO-1) this rank's shard of the optimizer state
    hf/              the model as a HF directory (`hf_io.export_hf`), when `arch` is given
    COMPLETE         the manifest (step, files + sizes, config hash, layout)

Same layout → exact resume: the per-step losses of a resumed run equal an uninterrupted
run's (the data position is the step count: StepBatcher batches depend only on seed and
step). A different TP×PP layout → `load_checkpoint(..., weights_only=True)` reads hf/ into
the new layout (the optimizer state does not carry over); `hf/` is also the HF export of
any checkpoint (`nova export`).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from nova_engine.logging import get_logger
from nova_engine.train import checkpoint_io
from nova_engine.train.checkpoint_io import CheckpointIOError
from nova_engine.train.optim import dp_sharded, load_optimizer_state, optimizer_state

logger = get_logger(__name__)

HF_SUBDIR = "hf"


def _layout(ps) -> dict[str, Any]:
    return {"tp": ps.tp, "pp": ps.pp, "vpp": ps.vpp, "dp": ps.dp, "world_size": ps.world_size}


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _shard_file(ps) -> str:
    return f"mp_tp{ps.tp_rank:02d}_pp{ps.pp_rank:02d}.pt"


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def rank_state(trainer) -> dict[str, Any]:
    """What this rank saves in its rank file (see the module docstring)."""
    opt = trainer.optimizer
    sharded = opt is not None and dp_sharded(opt)
    return {
        "step": trainer.step,
        "layout": _layout(trainer.ps),
        "optimizer": optimizer_state(opt) if sharded else None,
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler else None,
        "rng": _rng_state(),
    }


def shard_state(trainer) -> dict[str, Any]:
    """What DP rank 0 of a (TP, PP) coordinate saves for all its DP replicas."""
    opt = trainer.optimizer
    return {
        "model": [
            {n: p.detach().cpu().clone() for n, p in c.named_parameters()} for c in trainer.chunks
        ],
        "optimizer": optimizer_state(opt) if opt is not None and not dp_sharded(opt) else None,
    }


def _save_rank_file(state: dict[str, Any], path: str) -> None:
    torch.save(state, path)


def save_checkpoint(
    root: str | os.PathLike,
    trainer,
    *,
    config_hash: str | None = None,
    arch=None,
    keep_last: int = 0,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write `<root>/step_<trainer.step>` on all ranks (collective); returns its path."""
    ps = trainer.ps
    final = checkpoint_io.checkpoint_dir_for(root, trainer.step)
    state = rank_state(trainer)
    shard = shard_state(trainer) if ps.dp_rank == 0 else None

    def write(tmp: str) -> list[str]:
        path = os.path.join(tmp, _rank_file(ps.rank))
        _save_rank_file(state, path)
        written = [path]
        if shard is not None:
            written.append(os.path.join(tmp, _shard_file(ps)))
            _save_rank_file(shard, written[-1])
        if arch is not None:
            from nova_engine.model.hf_io import export_hf

            export_hf(trainer.chunks, arch, ps, os.path.join(tmp, HF_SUBDIR))
            if ps.rank == 0:
                hf = os.path.join(tmp, HF_SUBDIR)
                written += [os.path.join(hf, f) for f in os.listdir(hf)]
        return written

    path = checkpoint_io.write_checkpoint_dir(
        final,
        write,
        step=trainer.step,
        config_hash=config_hash,
        extra={"layout": _layout(ps), **(extra or {})},
        rank=ps.rank,
        barrier=dist.barrier if ps.world_size > 1 else None,
        overwrite=True,
    )
    if ps.rank == 0 and keep_last:
        checkpoint_io.prune(root, keep_last)
    if ps.world_size > 1:
        dist.barrier()
    logger.info("saved checkpoint %s", path)
    return path


def load_checkpoint(path: str | os.PathLike, trainer, *, weights_only: bool = False) -> int:
    """Restore `trainer` from a complete checkpoint; returns the step it was saved at.

    Same layout: everything (exact resume). `weights_only=True`: only the model, read from
    the checkpoint's hf/ export, which works for any TP×PP layout. A different layout
    without weights_only raises CheckpointIOError saying so.
    """
    path = os.fspath(path)
    manifest = checkpoint_io.read_manifest(path)
    ps = trainer.ps
    saved = manifest.get("extra", {}).get("layout")
    if weights_only:
        hf = os.path.join(path, HF_SUBDIR)
        if not os.path.isdir(hf):
            raise CheckpointIOError(f"{path}: no {HF_SUBDIR}/ export to load weights from")
        from nova_engine.model.arch import load_arch
        from nova_engine.model.hf_io import load_hf_weights

        load_hf_weights(trainer.chunks, load_arch(hf), ps, hf)
        return int(manifest["step"])
    if saved != _layout(ps):
        raise CheckpointIOError(
            f"{path}: saved with layout {saved}, this run is {_layout(ps)}; resume needs the "
            "same layout (load the weights alone with weights_only=True / checkpoint.resume "
            "on the hf/ export)"
        )
    state = torch.load(
        os.path.join(path, _rank_file(ps.rank)), map_location="cpu", weights_only=False
    )
    shard_path = os.path.join(path, _shard_file(ps))
    shard = torch.load(shard_path, map_location="cpu", weights_only=False)
    with torch.no_grad():
        for chunk, params in zip(trainer.chunks, shard["model"]):
            own = dict(chunk.named_parameters())
            if set(own) != set(params):
                raise CheckpointIOError(f"{shard_path}: parameter names differ from the model's")
            for n, v in params.items():
                own[n].copy_(v.to(own[n].dtype))
    opt_state = state["optimizer"] if state["optimizer"] is not None else shard["optimizer"]
    if trainer.optimizer is not None and opt_state is not None:
        load_optimizer_state(trainer.optimizer, opt_state)
    if trainer.scheduler is not None and state["scheduler"] is not None:
        trainer.scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    trainer.step = int(state["step"])
    logger.info("resumed from %s (step %d)", path, trainer.step)
    return trainer.step
