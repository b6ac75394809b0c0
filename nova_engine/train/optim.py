"""The optimizer: megatron-core's (Adam with decoupled weight decay, fp32 master weights for
bf16 models, optional distributed optimizer = ZeRO-1 over DP, global-norm clipping).

    opt = build_optimizer(ddp_chunks, run.optim, precision="bf16", distributed=True)
    sched = LRScheduler.from_config(run.optim, total_steps)      # nova_engine.train.schedules
    sched.apply(opt)
    ok, grad_norm, _ = opt.step(); sched.step(opt)

The learning rate comes from `schedules.LRScheduler` (it writes param_groups[...]["lr"]);
megatron's own scheduler is not used. `optimizer_state` / `load_optimizer_state` give a
per-rank state (this rank's Adam moments and fp32 master weights or master-weight shards)
that restores the optimizer exactly on the same layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer

from nova_engine.parallel.state import default_group_as

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection

    from nova_engine.config import OptimConfig


def build_optimizer(
    chunks: Sequence[torch.nn.Module],
    optim: OptimConfig,
    *,
    precision: str = "fp32",
    distributed: bool = False,
    pg_collection: ProcessGroupCollection | None = None,
) -> MegatronOptimizer:
    """megatron optimizer over DDP-wrapped chunks (`nova_engine.parallel.pipeline.wrap_ddp`,
    built with the same `distributed` flag). `optim` is a nova_engine.config.OptimConfig;
    pg_collection: the layout's groups (ParallelState.pg_collection; None = megatron's)."""
    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1],
        adam_eps=optim.eps,
        clip_grad=optim.grad_clip,
        bf16=precision == "bf16",
        fp16=False,
        params_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
        use_distributed_optimizer=distributed,
    )
    subset = getattr(pg_collection, "intra_dist_opt", None)  # the layout's ranks
    with default_group_as(subset):  # megatron aligns param groups over the default group
        return get_megatron_optimizer(
            config, list(chunks), use_gloo_process_groups=False, pg_collection=pg_collection
        )


def _leaves(opt: MegatronOptimizer) -> list[MegatronOptimizer]:
    """The megatron optimizers under a (possibly chained) optimizer."""
    return list(getattr(opt, "chained_optimizers", [opt]))


def dp_sharded(opt: MegatronOptimizer) -> bool:
    """True when the optimizer state is sharded over DP (megatron's distributed optimizer)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(leaf, DistributedOptimizer) for leaf in _leaves(opt))


def _torch_opt(leaf: MegatronOptimizer) -> torch.optim.Optimizer:
    return leaf.optimizer


def optimizer_state(opt: MegatronOptimizer) -> dict[str, Any]:
    """This rank's optimizer state: per leaf optimizer the torch optimizer's state_dict and
    the values of the parameters it updates (fp32 master weights / their DP shards). The
    tensors are the live ones, not copies: the caller copies them (checkpoint.HostBuffers
    stages them into host memory, with no clone on the device)."""
    out = []
    for leaf in _leaves(opt):
        inner = _torch_opt(leaf)
        params = [p.detach() for g in inner.param_groups for p in g["params"]]
        out.append({"torch": inner.state_dict(), "main_params": params})
    return {"leaves": out}


def load_optimizer_state(opt: MegatronOptimizer, state: dict[str, Any]) -> None:
    """Inverse of `optimizer_state` (same layout, same model)."""
    leaves = _leaves(opt)
    if len(leaves) != len(state["leaves"]):
        raise ValueError(
            f"checkpoint has {len(state['leaves'])} optimizer parts, this run {len(leaves)}"
        )
    for leaf, saved in zip(leaves, state["leaves"]):
        inner = _torch_opt(leaf)
        params = [p for g in inner.param_groups for p in g["params"]]
        if len(params) != len(saved["main_params"]):
            raise ValueError("optimizer parameter count differs from the checkpoint's")
        with torch.no_grad():
            for p, v in zip(params, saved["main_params"]):
                if p.shape != v.shape:
                    raise ValueError(f"optimizer parameter shape {p.shape} != saved {v.shape}")
                p.copy_(v)
        inner.load_state_dict(saved["torch"])
