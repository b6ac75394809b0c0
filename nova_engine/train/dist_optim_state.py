"""The optimizer part of a format-dist checkpoint (nova_engine.train.dist_checkpoint):
megatron-core 0.16.1's sharded optimizer state dicts, with and without the distributed
optimizer, and the conversion between the two at load (`parallel.distributed_optimizer` may
change between runs).

What the two forms hold (torch Adam, no apex/TE; keys are the model parameters' sharded keys
K, prefixed `chained_<i>.` when the optimizer chains several megatron optimizers):

    tensors      without it: optimizer.state.exp_avg.K, optimizer.state.exp_avg_sq.K, and
                 with bf16 weights the fp32 master weights optimizer.state.fp32_param.K
                 (fp32 weights: the model's K is the master weight);
                 with it (`fully_reshardable`): optimizer.state.{param,exp_avg,exp_avg_sq}.K,
                 `param` being the fp32 master weight in either precision
    common.pt    without it: {"state": {"common_step"}, "param_groups": [hyperparameters]}
                 (bf16: both under "optimizer"); with it: {"optimizer": {"param_groups":
                 [hyperparameters + "step"]}, "param_state_sharding_type"}

The moments are the same global tensors under the same keys, so they carry over as they are;
the master weights are renamed (param <-> fp32_param; an fp32 model's master weight is its
own K, already loaded with the model); the step and the param groups are moved between the
two common layouts (groups matched by megatron's identifier keys: wd_mult, lr_mult, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from nova_engine.train.checkpoint_io import CheckpointIOError
from nova_engine.train.optim import _leaves

OPT_METADATA = {"distrib_optim_sharding_type": "fully_sharded_model_space"}
DOPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
_MAIN, _FP32 = "optimizer.state.param.", "optimizer.state.fp32_param."
_DROPPED = object()  # a master weight that is the model's own tensor (fp32 weights)


def gloo_dp_groups(opt) -> None:
    """Without CUDA the DP group is a gloo group already: the distributed optimizer's
    gloo-side gather uses it when megatron built no separate gloo group."""
    for leaf in _leaves(opt):
        if getattr(leaf, "data_parallel_group_gloo", "absent") is None:
            leaf.data_parallel_group_gloo = leaf.data_parallel_group


def patch_set_states(opt) -> None:
    """Two gaps of megatron-core 0.16.1's fully_reshardable load with torch Adam (no
    apex/TE), bridged per parameter in `_set_main_param_and_optimizer_states`: the 'step'
    is restored from the param groups by load_state_dict, but the per-parameter copy wants
    one from the file too, which fully_reshardable does not hold (hand it the restored one);
    and a checkpoint written without the distributed optimizer at fp32 holds no master
    weight besides the model's own tensor, already loaded (the master shard is a view of it:
    nothing to copy)."""
    for leaf in _leaves(opt):
        if getattr(leaf.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
            continue
        orig = leaf._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, leaf=leaf, orig=orig):
            g, i = leaf.model_param_group_index_map[model_param]
            main = leaf.optimizer.param_groups[g]["params"][i]
            state = leaf.optimizer.state[main]
            if "step" in state and "step" not in tensors:
                tensors = {**tensors, "step": state["step"]}
            if "param" not in tensors:
                tensors = {**tensors, "param": main}
            orig(model_param, tensors)

        leaf._set_main_param_and_optimizer_states = set_states


def own_step_tensors(opt) -> None:
    """Give every parameter's Adam 'step' a tensor of its own: megatron's load_state_dict
    (no apex/TE) sets one shared tensor for all of them, which torch's foreach Adam then
    increments once per parameter per step (the bias correction drifts from the second
    step after a resume on)."""
    for leaf in _leaves(opt):
        seen: set[int] = set()
        for st in leaf.optimizer.state.values():
            step = st.get("step")
            if isinstance(step, torch.Tensor):
                if id(step) in seen:
                    st["step"] = step.clone()
                seen.add(id(st["step"]))


def init_optimizer_state(opt) -> None:
    """Zero Adam moments and step for a not-yet-stepped optimizer, so its state dict has
    the shape of a saved one (the distributed optimizer's state_dict reads every
    parameter's 'step' when neither apex nor TE provides the fused Adam)."""
    for leaf in _leaves(opt):
        inner = leaf.optimizer
        if getattr(leaf, "init_state_fn", None) is not None:
            leaf.init_state_fn(inner, leaf.config)
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p].setdefault("step", torch.zeros((), dtype=torch.float32))


# ------------------------------------------------------------- distributed optimizer switch


def _sharded_leaves(obj: Any, out: list) -> None:
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    if isinstance(obj, ShardedBase):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _sharded_leaves(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _sharded_leaves(v, out)


def _swap(key: str, src: str, dst: str) -> str | None:
    i = key.find(src)
    return None if i < 0 else key[:i] + dst + key[i + len(src) :]


def switch_requests(opt_sd: Any, file_keys: set[str], path: str) -> dict[str, Any]:
    """The sharded tensors to load for this run's optimizer state dict `opt_sd` (its
    sharded_state_dict for loading) from a checkpoint of the other optimizer form whose
    global tensor keys are `file_keys`: {str(i): the i-th sharded leaf, renamed where the
    two forms name it differently}; leaves that need nothing from the file (an fp32 master
    weight that is the model's own tensor) are left out. CheckpointIOError naming the
    key when the file lacks one."""
    leaves: list = []
    _sharded_leaves(opt_sd, leaves)
    out: dict[str, Any] = {}
    for i, leaf in enumerate(leaves):
        key = leaf.key
        if key not in file_keys:
            alt = _swap(key, _MAIN, _FP32) or _swap(key, _FP32, _MAIN)
            if alt is not None and alt in file_keys:
                leaf = dataclasses.replace(leaf, key=alt)
            elif key.find(_MAIN) >= 0 and key[key.find(_MAIN) + len(_MAIN) :] in file_keys:
                continue  # fp32 weights: the master weight is the model's K (loaded with it)
            else:
                raise CheckpointIOError(
                    f"{path}: the optimizer state has no {key!r} (nor its counterpart under "
                    "the other parallel.distributed_optimizer setting)"
                )
        out[str(i)] = leaf
    return out


def _fill(obj: Any, loaded: dict[str, Any], counter: list[int]) -> Any:
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    if isinstance(obj, ShardedBase):
        i = counter[0]
        counter[0] += 1
        return loaded.get(str(i), _DROPPED)
    if isinstance(obj, LocalNonpersistentObject):
        return obj.unwrap()
    if isinstance(obj, dict):
        filled = {k: _fill(v, loaded, counter) for k, v in obj.items()}
        return {k: v for k, v in filled.items() if v is not _DROPPED}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill(v, loaded, counter) for v in obj)
    return obj


def _per_leaf(obj: Any, n: int) -> list:
    return [obj] if n == 1 else [obj[i] for i in range(n)]


def _groups_and_step(common: dict[str, Any]) -> tuple[list[dict], Any]:
    """A saved leaf's param groups (hyperparameters) and Adam step, either form."""
    if "param_state_sharding_type" in common:  # distributed optimizer
        groups = common["optimizer"]["param_groups"]
        return groups, groups[0].get("step") if groups else None
    inner = common["optimizer"] if "optimizer" in common else common  # bf16 wraps it
    return inner["param_groups"], inner.get("state", {}).get("common_step")


def _ident(group: dict[str, Any]) -> tuple:
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    return tuple(group.get(k, group.get(f"pre_{k}")) for k in param_group_identifier_keys)


def _carry_groups(groups: list[dict], saved: list[dict], path: str) -> None:
    by_ident = {_ident(g): g for g in saved}
    for g in groups:
        src = by_ident.get(_ident(g))
        if src is None:
            raise CheckpointIOError(
                f"{path}: no saved optimizer param group matches {_ident(g)} (wd_mult, "
                "lr_mult, is_expert_parallel, is_decoupled_lr)"
            )
        g.update({k: v for k, v in src.items() if k not in ("params", "step")})


def switched_state(opt, opt_sd: Any, loaded: dict[str, Any], common: Any, path: str) -> Any:
    """This run's optimizer state dict (what its load_state_dict takes) from the tensors
    loaded for `switch_requests` and the checkpoint's optimizer common state (the other
    form's): the step and the param groups moved to this form's places."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    state = _fill(opt_sd, loaded, [0])
    leaves = _leaves(opt)
    for leaf, mine, saved in zip(
        leaves, _per_leaf(state, len(leaves)), _per_leaf(common, len(leaves))
    ):
        groups_saved, step = _groups_and_step(saved)
        if step is None:
            raise CheckpointIOError(f"{path}: the saved optimizer has no step (never stepped?)")
        step = float(step)
        if isinstance(leaf, DistributedOptimizer):
            groups = mine["optimizer"]["param_groups"]
            _carry_groups(groups, groups_saved, path)
            for g in groups:
                g["step"] = step
        else:
            inner = mine["optimizer"] if "fp32_from_fp16_params" in mine else mine
            _carry_groups(inner["param_groups"], groups_saved, path)
            inner["state"]["common_step"] = torch.tensor(step, dtype=torch.float32)
    return state
