"""CPU stand-ins that let megatron-core 0.16.1 run on gloo without CUDA.

Applied only when CUDA is absent (`apply_cpu_support()` is a no-op otherwise), always through
this one module. Each patch is named; `tests/engine/test_cpu_support.py` removes them one at
a time and checks that the thing it makes work then fails.

| patch              | what megatron does on CPU without it                                    |
| ------------------ | ----------------------------------------------------------------------- |
| current_device     | `torch.cuda.current_device()` for allocations (RoPE, mappings, layers,   |
|                    | p2p shape tensors, grad buffers) raises "Torch not compiled with CUDA"  |
| rng                | the CUDA RNG tracker (`model_parallel_cuda_manual_seed`, `fork()`) calls  |
|                    | `torch.cuda.manual_seed` / `get_rng_state` / `default_generators`; the   |
|                    | stand-in keeps the tracker's per-name states on the CPU generator       |
| cuda_literals      | `device="cuda"` literals in the pipeline schedules (`total_num_tokens`)  |
|                    | and the optimizer (grad-norm, found-inf, zero-count tensors)            |
| float_tensor_type  | the optimizer's `param.type() == 'torch.cuda.FloatTensor'` checks (mixed |
|                    | precision and distributed optimizer set-up, clipping by the total norm) |
| tensor_cuda        | `weight.data.cuda()` in the tied-embedding sync across PP stages: on    |
|                    | CPU the tensor stays where it is                                        |
| multi_tensor_l2norm| the local (no apex/TE) multi-tensor L2 norm in megatron.core.utils,     |
|                    | used for the optimizer's grad norm, allocates its result on "cuda"      |
| dist_ckpt_preload  | dist_checkpointing's torch_dist save stages tensors to host with        |
|                    | non-blocking copies, then `torch.cuda.synchronize()` (checkpoint format |
|                    | `dist`): on CPU the copies are blocking and nothing is synchronized     |

The two tensor-method patches are scoped: `torch.Tensor.type` / `torch.Tensor.cuda` answer
as on CUDA only while the megatron functions listed in `_TYPE_CALLS` / `_CUDA_CALLS` run
(those functions are wrapped), so a stray `.cuda()` anywhere else still fails on CPU.

Not patches but settings, made by `nova_engine.model.build.transformer_config`: on gloo,
pipeline p2p runs with `batch_p2p_comm=False` (with the default, PP=2 VP=2 gives silently
wrong gradients), and micro-batches have a fixed length (`variable_seq_lengths=False`), so
the p2p paths that call `torch.cuda.synchronize()` are never taken.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from nova_engine.logging import get_logger

log = get_logger(__name__)

_CPU = torch.device("cpu")


@dataclass
class _Patch:
    name: str
    apply: Callable[[], list[tuple[object, str, object]]]
    # (owner, attribute, original value) triples recorded when applied, restored on removal
    saved: list[tuple[object, str, object]] = field(default_factory=list)


def _set(owner: object, attr: str, value: object) -> tuple[object, str, object]:
    original = getattr(owner, attr)
    setattr(owner, attr, value)
    return (owner, attr, original)


# --------------------------------------------------------------------------- current_device


def _patch_current_device() -> list[tuple[object, str, object]]:
    return [_set(torch.cuda, "current_device", lambda: _CPU)]


# --------------------------------------------------------------------------------------- rng


def _cpu_get_rng_state(device: object = "cuda", clone: bool = False, graph_safe: bool = False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: object = -1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


def _patch_rng() -> list[tuple[object, str, object]]:
    rnd = importlib.import_module("megatron.core.tensor_parallel.random")
    saved = [
        # seed the CPU generator directly: torch.manual_seed would call back into
        # torch.cuda.manual_seed_all
        _set(
            torch.cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed))
        ),
        _set(torch.cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state()),
        _set(torch.cuda, "set_rng_state", lambda s, device="cuda": torch.set_rng_state(s)),
        _set(rnd, "_get_cuda_rng_state", _cpu_get_rng_state),
        _set(rnd, "_set_cuda_rng_state", _cpu_set_rng_state),
    ]
    return saved


# ----------------------------------------------------------------------------- cuda_literals


def _cpu_device(device: object) -> object:
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


class _TorchOnCpu(types.ModuleType):
    """A stand-in for the `torch` module inside one megatron module: factory calls with
    `device="cuda"` allocate on the CPU; everything else is torch itself."""

    _FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange")

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> object:
        attr = getattr(torch, name)
        if name in self._FACTORIES:

            def factory(*args: object, _f: Callable = attr, **kwargs: object) -> torch.Tensor:
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                return _f(*args, **kwargs)

            return factory
        return attr


_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
)


def _patch_cuda_literals() -> list[tuple[object, str, object]]:
    saved = []
    for name in _CUDA_LITERAL_MODULES:
        mod = importlib.import_module(name)
        saved.append(_set(mod, "torch", _TorchOnCpu()))
    return saved


# ------------------------------------------------- scoped tensor methods (type, cuda)


@contextlib.contextmanager
def _tensor_method(name: str, make: Callable[[Callable], Callable]) -> Iterator[None]:
    """torch.Tensor.<name> replaced by make(original) inside the block, restored after."""
    original = getattr(torch.Tensor, name)
    setattr(torch.Tensor, name, make(original))
    try:
        yield
    finally:
        setattr(torch.Tensor, name, original)


def _wrap_calls(
    calls: tuple[tuple[str, str], ...], scope: Callable[[], contextlib.AbstractContextManager]
):
    """Replace each megatron function `module:Qual.name` by one that runs it inside scope()."""
    saved = []
    for module, qualname in calls:
        owner: object = importlib.import_module(module)
        *path, attr = qualname.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, attr)

        @functools.wraps(original)
        def wrapped(*args: object, _f: Callable = original, **kwargs: object) -> object:
            with scope():
                return _f(*args, **kwargs)

        saved.append(_set(owner, attr, wrapped))
    return saved


_CPU_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _cuda_type_names(original: Callable) -> Callable:
    """`t.type()` with the CUDA name for CPU floating tensors when asked without arguments
    (the only form megatron uses); `t.type(dtype)` casts are untouched."""

    def type_(self: torch.Tensor, dtype: object = None, non_blocking: bool = False, **kw: object):
        if dtype is None and not kw:
            name = original(self)
            return _CPU_TYPE_NAMES.get(name, name)
        return original(self, dtype, non_blocking, **kw)

    return type_


# megatron functions that compare `param.type()` with "torch.cuda.*Tensor" names (the
# distributed optimizer's parameter groups are built inside its __init__)
_TYPE_CALLS = (
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),  # imported by name
)


def _patch_float_tensor_type() -> list[tuple[object, str, object]]:
    return _wrap_calls(_TYPE_CALLS, lambda: _tensor_method("type", _cuda_type_names))


# `weight.data.cuda()` before the all-reduce that syncs tied embeddings across PP stages
_CUDA_CALLS = (
    (
        "megatron.core.models.common.language_module.language_module",
        "LanguageModule.setup_embeddings_and_output_layer",
    ),
)


def _patch_tensor_cuda() -> list[tuple[object, str, object]]:
    stay = lambda original: lambda self, *args, **kwargs: self  # noqa: E731 - on CPU: no move
    return _wrap_calls(_CUDA_CALLS, lambda: _tensor_method("cuda", stay))


# ----------------------------------------------------------------------- multi_tensor_l2norm


def _patch_multi_tensor_l2norm() -> list[tuple[object, str, object]]:
    """`megatron.core.utils.local_multi_tensor_l2_norm` (the fallback without apex/TE that
    the optimizer's grad norm goes through) builds its result with `device="cuda"`."""
    utils = importlib.import_module("megatron.core.utils")
    return [_set(utils, "torch", _TorchOnCpu())]


# ------------------------------------------------------------------------ dist_ckpt_preload


def _patch_dist_ckpt_preload() -> list[tuple[object, str, object]]:
    """`FileSystemWriterAsync.preload_tensors(buckets, non_blocking=True)` (every torch_dist
    save, sync or async) ends with `torch.cuda.synchronize()`; on CPU: blocking copies."""
    fs = importlib.import_module("megatron.core.dist_checkpointing.strategies.filesystem_async")
    writer = fs.FileSystemWriterAsync
    original = writer.__dict__["preload_tensors"].__func__

    def preload_tensors(write_buckets, non_blocking=True):
        return original(write_buckets, False)

    return [_set(writer, "preload_tensors", staticmethod(preload_tensors))]


PATCHES: dict[str, _Patch] = {
    p.name: p
    for p in (
        _Patch("current_device", _patch_current_device),
        _Patch("rng", _patch_rng),
        _Patch("cuda_literals", _patch_cuda_literals),
        _Patch("float_tensor_type", _patch_float_tensor_type),
        _Patch("tensor_cuda", _patch_tensor_cuda),
        _Patch("multi_tensor_l2norm", _patch_multi_tensor_l2norm),
        _Patch("dist_ckpt_preload", _patch_dist_ckpt_preload),
    )
}


def needed() -> bool:
    return not torch.cuda.is_available()


def applied() -> list[str]:
    return [name for name, p in PATCHES.items() if p.saved]


def apply_cpu_support(exclude: tuple[str, ...] = ()) -> list[str]:
    """Apply every CPU stand-in (except `exclude`) when CUDA is absent. Idempotent.
    Returns the names applied by this call."""
    if not needed():
        return []
    unknown = set(exclude) - set(PATCHES)
    if unknown:
        raise ValueError(f"unknown CPU patch(es) {sorted(unknown)}; known: {sorted(PATCHES)}")
    done = []
    for name, patch in PATCHES.items():
        if name in exclude or patch.saved:
            continue
        patch.saved = patch.apply()
        done.append(name)
    if done:
        log.debug("CPU support patches applied: %s", ", ".join(done))
    return done


def remove_cpu_support(names: tuple[str, ...] | None = None) -> None:
    """Undo patches (all when `names` is None), restoring the original attributes."""
    for name in names if names is not None else tuple(PATCHES):
        patch = PATCHES[name]
        for owner, attr, original in reversed(patch.saved):
            setattr(owner, attr, original)
        patch.saved = []


@contextlib.contextmanager
def without_patch(name: str) -> Iterator[None]:
    """Temporarily remove one patch (tests prove each patch is needed)."""
    was_applied = bool(PATCHES[name].saved)
    remove_cpu_support((name,))
    try:
        yield
    finally:
        if was_applied:
            PATCHES[name].saved = PATCHES[name].apply()
