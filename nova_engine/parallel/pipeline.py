"""Forward/backward over pipeline stages with megatron-core's schedules.

`forward_backward(chunks, ps, microbatches, step_fn, ...)` runs megatron's no-pipelining,
1F1B or interleaved 1F1B schedule (picked from the layout) over a list of micro-batches.
`step_fn(model_chunk, microbatch)` runs one chunk and returns `(output, loss_fn)`;
`loss_fn(output)` (called on the last stage only) returns `(loss, num_tokens, metrics)`.

Loss normalization is the engine's, not megatron's: each stage loss arrives already
divided by the *global* number of loss tokens of the step (across micro-batches and DP
ranks), so the schedule runs with `calculate_per_token_loss=True` (no division by the
number of micro-batches, DP gradients summed, not averaged) and grads are finalized
without megatron's per-token rescale.

DP communication overlap (on by default with CUDA; `wrap_ddp`): with `overlap_grad_reduce`
the DDP wrappers reduce gradient buckets during backward, so the schedules get megatron's
hooks as its own training loop sets them: `config.no_sync_func` (no reduction before the
last micro-batch), `config.grad_sync_func` (PP: a chunk's reduce starts when its last
backward is done) and `finalize_model_grads` waits for them (`finish_grad_sync`). With
`overlap_param_gather` (distributed optimizer only) the optimizer step leaves the updated
parameters sharded and the next forward's pre-hooks all-gather them bucket by bucket:
anything that reads parameters outside a forward calls `sync_params` first.

Every megatron call gets the layout's explicit groups (`ps.pg_collection`, and a
`P2PCommunicator` over `ps.pp_group` when pipelining), never megatron's globals, so engines
of different layouts can share one world.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.utils import get_model_config

from nova_engine.parallel.state import ParallelState

if TYPE_CHECKING:
    from nova_engine.config import SpeedConfig

StepFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, Callable]]


def _finalize_grads(model, num_tokens=None, **kwargs):
    # our losses are pre-normalized by the global token count: never rescale by num_tokens
    return finalize_model_grads(model, num_tokens=None, **kwargs)


def _per_chunk(fns: list[Callable]) -> Callable | list[Callable]:
    return fns[0] if len(fns) == 1 else fns


def configure_for_engine(chunks: Sequence[torch.nn.Module]) -> None:
    """Set the megatron config switches the engine's loss convention relies on, and for
    DDP-wrapped chunks the schedule's sync hooks (as megatron's training loop sets them)."""
    ddp = [c for c in chunks if isinstance(c, DistributedDataParallel)]
    for chunk in chunks:
        config = get_model_config(chunk)
        config.calculate_per_token_loss = True
        config.finalize_model_grads_func = _finalize_grads
        if len(ddp) != len(chunks) or not ddp[0].ddp_config.overlap_grad_reduce:
            continue  # without overlap the reduction is all in finalize_model_grads
        cfg = ddp[0].ddp_config
        config.no_sync_func = _per_chunk([c.no_sync for c in ddp])
        config.grad_sync_func = _per_chunk([c.start_grad_sync for c in ddp])
        config.param_sync_func = None
        if cfg.overlap_param_gather and cfg.align_param_gather:
            config.param_sync_func = _per_chunk([c.start_param_sync for c in ddp])


def ddp_overlap(
    cuda: bool, use_distributed_optimizer: bool, speed: SpeedConfig | None = None
) -> tuple[bool, bool]:
    """(overlap_grad_reduce, overlap_param_gather): on with CUDA by default (the latter only
    with the distributed optimizer), off on CPU; `speed` fields that are not None force them."""
    grad = getattr(speed, "overlap_grad_reduce", None)
    param = getattr(speed, "overlap_param_gather", None)
    if param and not use_distributed_optimizer:
        raise ValueError(
            "train.speed.overlap_param_gather=true needs parallel.distributed_optimizer=true"
        )
    grad = cuda if grad is None else bool(grad)
    param = (cuda and use_distributed_optimizer) if param is None else bool(param)
    if param and not grad:
        raise ValueError(
            "train.speed.overlap_param_gather needs overlap_grad_reduce (megatron's rule)"
        )
    return grad, param


def wrap_ddp(
    chunks: Sequence[torch.nn.Module],
    ps: ParallelState,
    use_distributed_optimizer: bool = False,
    speed: SpeedConfig | None = None,
    cuda: bool | None = None,
) -> list[DistributedDataParallel]:
    """megatron DDP around each chunk: fp32 grad buffers (param.main_grad), DP sum-reduce;
    communication overlap per `ddp_overlap` (cuda None: ps.device is CUDA)."""
    if cuda is None:
        cuda = ps.device.type == "cuda"
    overlap_grad, overlap_param = ddp_overlap(cuda, use_distributed_optimizer, speed)
    configure_for_engine(chunks)  # DDP reads calculate_per_token_loss when it is built
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad,
        overlap_param_gather=overlap_param,
        use_distributed_optimizer=use_distributed_optimizer,
        average_in_collective=False,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(
            DistributedDataParallel(
                config=get_model_config(chunk),
                ddp_config=ddp_config,
                module=chunk,
                # only the first chunk gets the default bucket layout (megatron's convention)
                disable_bucketing=i > 0,
                pg_collection=ps.pg_collection,
            )
        )
    configure_for_engine(wrapped)
    return wrapped


def sync_params(models: Sequence[torch.nn.Module]) -> None:
    """Finish the overlapped parameter all-gather of DDP-wrapped chunks (a no-op without
    overlap_param_gather): call before reading parameters outside a forward (export,
    checkpoint, finiteness checks). Collective over the DP group."""
    for m in models:
        if getattr(m, "use_forward_hook", False):
            start = cast(Callable[..., None], m.start_param_sync)  # megatron DDP's method
            start(force_sync=True)


def forward_backward(
    chunks: Sequence[torch.nn.Module],
    ps: ParallelState,
    microbatches: Sequence[Any],
    step_fn: StepFn,
    *,
    seq_length: int,
    micro_batch_size: int = 1,
    forward_only: bool = False,
    collect_non_loss_data: bool = False,
) -> list[Any]:
    """Run all micro-batches through the pipeline; returns the last stage's metrics dicts
    (one per micro-batch, empty list on other stages). `seq_length` is the (padded) token
    count of every micro-batch — equal for all, so stages need no shape exchange.

    collect_non_loss_data (forward only): loss_fn is called as `loss_fn(output,
    non_loss_data=True)` and whatever it returns is collected (no loss, no zero-loss trick).
    """
    if not microbatches:
        raise ValueError(
            "forward_backward: no micro-batches on this rank (deal every rank at least one, "
            "e.g. an all-padding batch); an empty rank would stall the others"
        )
    configure_for_engine(chunks)
    fb = get_forward_backward_func(ps.pp, ps.vpp)
    kw: dict[str, Any] = {}
    if ps.pg_collection is not None:
        kw["pg_collection"] = ps.pg_collection
        if ps.pp > 1:
            kw["p2p_communicator"] = P2PCommunicator(ps.pp_group, get_model_config(chunks[0]))

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        return step_fn(model, batch)

    n = len(chunks)
    iters = [iter(microbatches) for _ in range(n)] if n > 1 else iter(microbatches)
    return fb(
        forward_step_func=forward_step,
        data_iterator=iters,
        model=list(chunks) if n > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        collect_non_loss_data=collect_non_loss_data,
        **kw,
    )
