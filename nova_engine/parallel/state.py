"""The engine's parallel layout, as one explicit object.

This module (with `cpu_support`) is the only code in Nova Engine that touches
`megatron.core.parallel_state`. `initialize_parallel()` validates the layout against the
world size *before* any collective runs, sets up megatron's groups (TP, PP, virtual PP, DP;
SP is a flag on TP), seeds megatron's model-parallel RNG tracker, and returns a
`ParallelState` that the rest of the engine receives as an argument.

`new_parallel_state()` builds a second layout in the same world without touching megatron's
globals: its own process groups, handed to megatron through `ps.pg_collection` (a
`ProcessGroupCollection`, which GPTModel, DDP, the optimizer, the schedules and
finalize_model_grads accept in megatron-core 0.16.1). So a policy at TP2xDP2 and a reward
model at TP1xPP2xDP2 can live in one torchrun world (`nova_engine.train.engine`). With
`ranks=range(a, b)` the layout covers only those global ranks (a generation group beside a
training group, issue #27): the ranks outside get None.

Rank order is megatron's default "tp-cp-ep-dp-pp": TP ranks are adjacent, PP outermost:
    rank = tp_rank + tp * (dp_rank + dp * pp_rank)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nova_engine.logging import get_logger
from nova_engine.parallel import cpu_support

log = get_logger(__name__)


class LayoutError(ValueError):
    """A parallel layout that cannot work (raised before any collective)."""


@dataclass(frozen=True)
class ParallelState:
    """Sizes, this rank's coordinates and process groups of the layout.

    tp/pp/dp: tensor-, pipeline- and data-parallel sizes (world = tp*pp*dp).
    vpp: virtual pipeline stages (model chunks) per PP rank, None = not interleaved.
    sp: sequence parallelism (activations outside TP regions split along the sequence).
    """

    tp: int
    pp: int
    dp: int
    vpp: int | None
    sp: bool
    rank: int
    world_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    mp_group: dist.ProcessGroup
    embd_group: dist.ProcessGroup | None
    device: torch.device
    on_gloo: bool
    pg_collection: Any = None
    """megatron's ProcessGroupCollection of this layout (passed to every megatron piece)."""
    ranks: tuple[int, ...] | None = None
    """The global ranks the layout spans (`new_parallel_state(ranks=...)`); None = the whole
    world. `rank` is always the global rank; `world_size` is the layout's size (tp*pp*dp)."""
    layout_group: dist.ProcessGroup | None = None
    """A process group of exactly `ranks` (None = the default group: the whole world)."""

    @property
    def first_rank(self) -> int:
        """The layout's lowest global rank (its 'rank 0': the one that writes shared files)."""
        return self.ranks[0] if self.ranks else 0

    @property
    def num_chunks(self) -> int:
        """Model chunks held by this rank (virtual stages)."""
        return self.vpp or 1

    def is_first_stage(self, vp_stage: int | None = None) -> bool:
        return self.pp_rank == 0 and (vp_stage is None or vp_stage == 0)

    def is_last_stage(self, vp_stage: int | None = None) -> bool:
        last_chunk = vp_stage is None or vp_stage == self.num_chunks - 1
        return self.pp_rank == self.pp - 1 and last_chunk

    def barrier(self) -> None:
        """A barrier over the layout's ranks (no-op for a layout of one rank)."""
        if self.world_size > 1:
            dist.barrier(group=self.layout_group)

    def describe(self) -> str:
        v = f" VP{self.vpp}" if self.vpp else ""
        s = " SP" if self.sp else ""
        return f"TP{self.tp} PP{self.pp}{v} DP{self.dp}{s} (world {self.world_size})"


def validate_layout(world_size: int, tp: int, pp: int, vpp: int | None = None) -> int:
    """Check that world_size = tp * pp * dp for an integer dp >= 1; return dp."""
    for key, v in (("tp", tp), ("pp", pp)):
        if not isinstance(v, int) or v < 1:
            raise LayoutError(f"parallel.{key}={v!r}: expected an integer >= 1")
    if vpp is not None and (not isinstance(vpp, int) or vpp < 1):
        raise LayoutError(f"parallel.vpp={vpp!r}: expected None or an integer >= 1")
    if vpp is not None and vpp > 1 and pp < 2:
        raise LayoutError(f"parallel.vpp={vpp} needs pipeline parallelism (pp >= 2), got pp={pp}")
    if world_size % (tp * pp) != 0:
        raise LayoutError(
            f"world size {world_size} is not divisible by tp*pp = {tp}*{pp} = {tp * pp}; "
            "expected world_size = tp * pp * dp"
        )
    return world_size // (tp * pp)


def initialize_parallel(
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    sp: bool = False,
    seed: int = 1234,
) -> ParallelState:
    """Set up megatron's groups for a TP×PP(×VP)×DP layout on the running process group.

    Initializes torch.distributed from the torchrun environment when it is not yet
    initialized (nccl with CUDA, gloo otherwise). Applies the CPU support patches when CUDA
    is absent.
    """
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    world_size = dist.get_world_size()
    if vpp == 1:
        vpp = None
    dp = validate_layout(world_size, tp, pp, vpp)
    if sp and tp == 1:
        log.warning("sequence parallelism requested with tp=1: it has no effect, turning it off")
        sp = False

    on_gloo = dist.get_backend() == "gloo"
    cpu_support.apply_cpu_support()
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        create_gloo_process_groups=not on_gloo,  # the default groups already are gloo
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)

    device = (
        torch.device("cuda", torch.cuda.current_device()) if not on_gloo else torch.device("cpu")
    )
    state = _state_from_megatron(
        tp, pp, dp, vpp, sp, device, on_gloo, pg_collection=_mpu_collection(mpu)
    )
    log.info("parallel layout: %s", state.describe())
    return state


def _state_from_megatron(
    tp: int,
    pp: int,
    dp: int,
    vpp: int | None,
    sp: bool,
    device: torch.device,
    on_gloo: bool,
    pg_collection: Any = None,
) -> ParallelState:
    """The ParallelState of megatron's just-initialized global groups (this rank's view)."""
    from megatron.core import parallel_state as mpu

    return ParallelState(
        tp=tp,
        pp=pp,
        dp=dp,
        vpp=vpp,
        sp=sp,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        dp_rank=mpu.get_data_parallel_rank(),
        tp_group=mpu.get_tensor_model_parallel_group(),
        pp_group=mpu.get_pipeline_model_parallel_group(),
        dp_group=mpu.get_data_parallel_group(),
        mp_group=mpu.get_model_parallel_group(),
        embd_group=mpu.get_embedding_group(check_initialized=False),
        device=device,
        on_gloo=on_gloo,
        pg_collection=pg_collection,
    )


def initialize_fake_parallel(
    rank: int, world_size: int, tp: int, pp: int, vpp: int | None, sp: bool
) -> ParallelState:
    """Rank `rank` of a `world_size` layout under torch's `fake` process-group backend
    (FakeStore: collectives are no-ops), with megatron's groups on top and tensors on the
    meta device — what `nova dryrun` builds every rank's shard on. Tear down with
    `destroy_fake_parallel()`."""
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel
    from torch.testing._internal.distributed.fake_pg import FakeStore

    vpp = vpp if vpp and vpp > 1 else None
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        create_gloo_process_groups=False,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(1234)  # the CPU RNG tracker (cpu_support)
    dp = world_size // (tp * pp)
    return _state_from_megatron(tp, pp, dp, vpp, sp, torch.device("meta"), on_gloo=False)


def destroy_fake_parallel() -> None:
    """Tear down megatron's groups and the fake default process group."""
    destroy_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _collection(
    tp_group, pp_group, dp_group, mp_group, embd_group, pos_embd_group, cp_group, ep_group, world
):
    """megatron's ProcessGroupCollection for a dense (no experts, no CP) layout."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection(
        tp=tp_group,
        pp=pp_group,
        mp=mp_group,
        embd=embd_group,
        pos_embd=pos_embd_group,
        cp=cp_group,
        tp_cp=tp_group,
        hcp=[cp_group],
        ep=ep_group,
        expt_tp=tp_group,
        tp_ep=tp_group,
        tp_ep_pp=mp_group,
        tp_dp_cp=world,
        dp=dp_group,
        dp_cp=dp_group,
        expt_dp=dp_group,
        intra_dp_cp=dp_group,
        intra_expt_dp=dp_group,
        intra_dist_opt=world,
    )


def _mpu_collection(mpu) -> Any:
    return _collection(
        mpu.get_tensor_model_parallel_group(),
        mpu.get_pipeline_model_parallel_group(),
        mpu.get_data_parallel_group(),
        mpu.get_model_parallel_group(),
        mpu.get_embedding_group(check_initialized=False),
        mpu.get_position_embedding_group(check_initialized=False),
        mpu.get_context_parallel_group(),
        mpu.get_expert_model_parallel_group(),
        mpu.get_intra_distributed_optimizer_instance_group(),
    )


_GROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}


def _group(ranks: list[int]) -> dist.ProcessGroup:
    """One process group per rank set, created once (every rank calls this for every group,
    in the same order, as dist.new_group requires)."""
    key = tuple(sorted(set(ranks)))
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(list(key))
    return _GROUPS[key]


def layout_ranks(world_size: int, tp: int, pp: int) -> dict[str, list[list[int]]]:
    """Every TP, DP, PP and model-parallel rank group of a layout (megatron's rank order)."""
    dp = world_size // (tp * pp)

    def rank(t: int, d: int, p: int) -> int:
        return t + tp * (d + dp * p)

    return {
        "tp": [[rank(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "dp": [[rank(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pp": [[rank(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)],
        "mp": [sorted(rank(t, d, p) for p in range(pp) for t in range(tp)) for d in range(dp)],
    }


def _check_ranks(ranks: Any, world: int) -> tuple[int, ...]:
    """`ranks` of new_parallel_state as a tuple: a non-empty contiguous ascending range of
    global ranks inside the world, else LayoutError naming the argument."""
    try:
        got = tuple(int(r) for r in ranks)
    except TypeError:
        msg = f"ranks={ranks!r}: expected a range of global ranks, e.g. range(2, 4)"
        raise LayoutError(msg) from None
    if not got or got != tuple(range(got[0], got[0] + len(got))):
        raise LayoutError(
            f"ranks={ranks!r}: expected a non-empty contiguous ascending range of global "
            "ranks, e.g. range(2, 4)"
        )
    if got[0] < 0 or got[-1] >= world:
        raise LayoutError(f"ranks={ranks!r}: outside the world of {world} ranks (0..{world - 1})")
    return got


def new_parallel_state(
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    sp: bool = False,
    ranks: Sequence[int] | None = None,
) -> ParallelState | None:
    """A layout with process groups of its own (collective: every rank of the world calls it
    with the same arguments, since `dist.new_group` is collective); megatron's global groups
    are left as they are. The model-parallel RNG tracker stays the one `initialize_parallel`
    seeded (it is only used for dropout and random init; engines load their weights).

    ranks: the contiguous global ranks the layout covers (e.g. range(2, 4): a generation group
    beside a training group on range(0, 2)); None = the whole world. The layout's rank order
    is megatron's, offset by ranks[0]; tp*pp must divide len(ranks). A rank outside `ranks`
    gets None (it still had to call, to take part in creating the groups)."""
    if not dist.is_initialized():
        raise LayoutError("new_parallel_state: call initialize_parallel() first")
    world, me = dist.get_world_size(), dist.get_rank()
    span = _check_ranks(range(world) if ranks is None else ranks, world)
    base, size = span[0], len(span)
    if vpp == 1:
        vpp = None
    try:
        dp = validate_layout(size, tp, pp, vpp)
    except LayoutError as e:
        if ranks is None:
            raise
        raise LayoutError(f"new_parallel_state(ranks={ranks!r}, {len(span)} ranks): {e}") from None
    sp = sp and tp > 1
    mine = me in span

    def shifted(sets: list[list[int]]) -> list[list[int]]:
        return [[base + r for r in rs] for rs in sets]

    layout = {kind: shifted(sets) for kind, sets in layout_ranks(size, tp, pp).items()}
    groups: dict[str, dist.ProcessGroup] = {}
    for kind, sets in layout.items():
        for rs in sets:
            g = _group(rs)
            if me in rs:
                groups[kind] = g
    embd: dist.ProcessGroup | None = None  # None on the ranks outside the group
    pos_embd: dist.ProcessGroup | None = None
    for rs in layout["pp"]:  # first and last stage share embeddings
        g = _group([rs[0], rs[-1]])
        pos = _group([rs[0]])
        if me in rs:
            embd, pos_embd = (
                (g if me in (rs[0], rs[-1]) else None),
                (pos if me == rs[0] else None),
            )
    for r in range(world):
        g = _group([r])
        if r == me:
            groups["self"] = g
    layout_group = _group(list(span))
    if not mine:
        return None
    local = me - base
    tp_rank = local % tp
    dp_rank = (local // tp) % dp
    pp_rank = local // (tp * dp)
    on_gloo = dist.get_backend() == "gloo"
    device = torch.device("cpu") if on_gloo else torch.device("cuda", torch.cuda.current_device())
    state = ParallelState(
        tp=tp,
        pp=pp,
        dp=dp,
        vpp=vpp,
        sp=sp,
        rank=me,
        world_size=size,
        tp_rank=tp_rank,
        pp_rank=pp_rank,
        dp_rank=dp_rank,
        tp_group=groups["tp"],
        pp_group=groups["pp"],
        dp_group=groups["dp"],
        mp_group=groups["mp"],
        embd_group=embd,
        device=device,
        on_gloo=on_gloo,
        pg_collection=_collection(
            groups["tp"],
            groups["pp"],
            groups["dp"],
            groups["mp"],
            embd,
            pos_embd,
            groups["self"],
            groups["self"],
            layout_group,
        ),
        ranks=None if ranks is None else span,
        layout_group=None if ranks is None else layout_group,
    )
    where = "" if ranks is None else f" on ranks {base}..{span[-1]}"
    log.info("extra parallel layout: %s%s", state.describe(), where)
    return state


def initialize_split(
    train_ranks: Sequence[int],
    gen_ranks: Sequence[int],
    *,
    tp: int,
    pp: int,
    vpp: int | None,
    sp: bool,
    gen_tp: int,
    gen_pp: int,
    seed: int = 1234,
) -> tuple[ParallelState | None, ParallelState | None]:
    """Two layouts side by side in one world (async RLVR, issue #27): the training layout on
    `train_ranks`, the generation layout on `gen_ranks` (collective over the world). Megatron's
    global groups are a plain DP layout of the whole world (every megatron piece of an engine
    gets its own layout's groups); the model-parallel RNG tracker is seeded with this rank's
    TP rank in its own layout, as initialize_parallel seeds it for a whole-world layout.
    Returns (training state or None, generation state or None): one of them is None."""
    from megatron.core import tensor_parallel

    initialize_parallel(tp=1, pp=1, seed=seed)
    train = new_parallel_state(tp=tp, pp=pp, vpp=vpp, sp=sp, ranks=train_ranks)
    gen = new_parallel_state(tp=gen_tp, pp=gen_pp, ranks=gen_ranks)
    mine = train if train is not None else gen
    assert mine is not None, "every rank is in one of the two layouts"
    tensor_parallel.model_parallel_cuda_manual_seed(
        seed, tp_rank=mine.tp_rank, ep_rank=0, etp_rank=0
    )
    return train, gen


@contextlib.contextmanager
def default_group_as(group: dist.ProcessGroup | None) -> Iterator[None]:
    """Inside: torch.distributed's world size and all_gather_object without a group mean
    `group` (None: no change). For megatron calls that gather over the default group with no
    way to pass one (megatron-core 0.16's optimizer aligns its param groups with a world
    all_gather_object), run on a layout that is a subset of the world (async RLVR: the
    generation ranks never make that call). Single-threaded construction code only."""
    if group is None:
        yield
        return
    world_size, gather = dist.get_world_size, dist.all_gather_object

    def sized(g=None):
        return world_size(group if g is None else g)

    def gathered(object_list, obj, group_=None, **kw):
        g = kw.pop("group", group_)
        return gather(object_list, obj, group=group if g is None else g)

    dist.get_world_size, dist.all_gather_object = sized, gathered  # type: ignore[assignment]
    try:
        yield
    finally:
        dist.get_world_size, dist.all_gather_object = world_size, gather  # type: ignore[assignment]


def destroy_parallel() -> None:
    """Tear down megatron's groups (the default process group stays)."""
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
