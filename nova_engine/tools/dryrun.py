"""`nova dryrun`: every rank of a recipe's layout built on the meta device, one process.

    nova dryrun --recipe recipes/llama3_70b.yaml --stage sft --world 64
    nova dryrun --recipe recipes/qwen2_72b.yaml --stage all          # every stage, one process

For rank 0 .. world-1 in turn: torch.distributed is initialized with the `fake` backend
(torch.testing's FakeStore: collectives return at once, nothing is sent), megatron-core's
groups are built for the layout, and this rank's models are built with meta tensors (shapes
and dtypes, no storage): the causal LM's chunks (megatron `GPTModel`, Nova's layer spec)
wrapped in megatron DDP with fp32 grad buffers, and megatron's (distributed) optimizer over
them, whose fp32 main-parameter shards give the optimizer state shapes (Adam's m and v have
the same shapes); for rm and the rlvr critic the same trunk with a [1, h] score head instead
of the LM head. The rlvr reference is frozen and has exactly the policy's shards (counted
from the policy's build); stages on one layout share one build per rank.

What megatron-core 0.16.1 needs for this, set here for the dry run only: `pipeline_dtype`
(Nova's transformer_config sets it); device initialization (`use_cpu_initialization=False`)
with `torch.cuda.current_device()` answering "meta", so weights and DDP buffers are meta
tensors; init methods that draw nothing (megatron still tags each weight's TP attributes,
which `perform_initialization=False` would skip -- the dry run counts replicated
parameters by them); the CPU RNG tracker of nova_engine.parallel.cpu_support instead of
CUDA seeding; and the optimizer's `torch.cuda.*Tensor` type check accepting meta tensors.

Checks (exit code 1 when one fails):
- the per-rank parameter counts add up to the model's total (TP-replicated parameters,
  e.g. RMSNorm weights, counted once; the tied embedding's copy on the last stage once);
- every rank's parameter count and weight bytes equal the planner's
  (`nova_engine.tools.plan_terms.stage_params`); DP replicas hold identical shards;
- the optimizer's fp32 shards over the DP group cover the grad buffer exactly.
Not done yet: a pipeline step on meta tensors (the CPU core-attention path and the fused
loss kernels need host values of cu_seqlens / chunk bounds).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from nova_engine.progress import emit

STAGES = ("sft", "dpo", "rm", "rlvr")


@dataclass
class RankReport:
    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    params: dict[str, int] = field(default_factory=dict)  # engine -> params on this rank
    replicated: dict[str, int] = field(default_factory=dict)  # engine -> TP-replicated params
    tied_copy: dict[str, int] = field(default_factory=dict)  # engine -> tied-head copy
    weight_bytes: dict[str, int] = field(default_factory=dict)
    grad_buffer: dict[str, int] = field(default_factory=dict)  # engine -> fp32 grad elements
    optim_shard: dict[str, int] = field(default_factory=dict)  # engine -> fp32 shard elements


@contextlib.contextmanager
def meta_megatron() -> Iterator[None]:
    """The patches a meta-device build of megatron-core 0.16.1 needs, undone on exit."""
    import torch

    from nova_engine.model import build
    from nova_engine.parallel import cpu_support

    cpu_support.apply_cpu_support()  # CPU RNG tracker, cuda literals (no-op with CUDA)
    saved = [
        (torch.cuda, "current_device", torch.cuda.current_device),
        (torch.Tensor, "type", torch.Tensor.type),
        (build, "transformer_config", build.transformer_config),
    ]
    tensor_type, make_config = torch.Tensor.type, build.transformer_config

    def type_(self, dtype=None, non_blocking=False, **kw):
        if dtype is None and not kw:
            return tensor_type(self).replace("torch.meta.", "torch.cuda.")
        return tensor_type(self, dtype, non_blocking, **kw)

    def no_init(weight):  # shapes only: no values to draw
        return weight

    def device_init_config(*args, **kwargs):
        config = make_config(*args, **kwargs)
        # allocate on current_device(), i.e. meta; megatron still tags the TP attributes
        # (`tensor_model_parallel`, which perform_initialization=False would skip) and
        # calls the init methods, which draw nothing here
        config.use_cpu_initialization = False
        config.init_method = config.output_layer_init_method = no_init
        config.embedding_init_method = no_init
        return config

    def meta_device() -> torch.device:  # megatron allocates on torch.cuda.current_device()
        return torch.device("meta")

    # deliberate patches against the declared types (current_device returns an int index)
    torch.cuda.current_device = meta_device  # type: ignore[assignment]
    torch.Tensor.type = type_  # type: ignore[method-assign]
    build.transformer_config = device_init_config
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _score_head(chunks, arch, num_labels: int = 1) -> None:
    """Replace the last stage's LM head by a [num_labels, h] score head (reward / value
    models; nova_engine.model.heads' parameter contract: `score.weight`, replicated)."""
    import torch

    for c in chunks:
        if c.post_process:
            c.output_layer = None
            dtype = c.config.params_dtype
            c.score = torch.nn.Linear(
                arch.hidden_size, num_labels, bias=False, dtype=dtype, device="meta"
            )


def _count(chunks) -> tuple[int, int, int, int]:
    """(params, TP-replicated params, tied-head copy, weight bytes) of a rank's chunks."""
    total = repl = tied = nbytes = 0
    for c in chunks:
        for name, p in c.named_parameters():
            n = p.numel()
            total += n
            nbytes += n * p.element_size()
            if not getattr(p, "tensor_model_parallel", False):
                repl += n
            is_head = name.startswith("output_layer.")
            if is_head and c.share_embeddings_and_output_weights and not c.pre_process:
                tied += n  # the last stage's copy of the tied embedding
    return total, repl, tied, nbytes


def _engines(stage: str) -> list[tuple[str, str, bool]]:
    """(engine, model kind, trained) per stage. Kinds: "lm" (the causal LM) and "score" (the
    same trunk with a score head). Engines of one kind share one build per rank: the frozen
    reference holds exactly the policy's shards, the critic the reward model's."""
    if stage == "rm":
        return [("reward", "score", True)]
    if stage == "rlvr":
        return [("policy", "lm", True), ("reference", "lm", False), ("critic", "score", True)]
    return [("policy", "lm", True)]


def build_rank(run, arch, kinds: dict[str, bool], rank: int, world: int) -> RankReport:
    """Build each model kind (with DDP and the optimizer when trained) for `rank` on the
    meta device; count what it holds."""
    from nova_engine.model.build import build_model
    from nova_engine.parallel.pipeline import wrap_ddp
    from nova_engine.parallel.state import destroy_fake_parallel, initialize_fake_parallel
    from nova_engine.train.optim import build_optimizer

    par, tr = run.parallel, run.train
    ps = initialize_fake_parallel(rank, world, par.tp, par.pp, par.vpp, par.sp)
    try:
        rep = RankReport(rank, ps.tp_rank, ps.pp_rank, ps.dp_rank)
        for kind, trained in kinds.items():
            chunks = build_model(arch, ps, tr.precision, tr.recompute, use_te=False)
            if kind == "score":
                _score_head(chunks, arch)
            total, repl, tied, nbytes = _count(chunks)
            rep.params[kind], rep.replicated[kind] = total, repl
            rep.tied_copy[kind], rep.weight_bytes[kind] = tied, nbytes
            if not trained:
                continue
            dist_opt = par.distributed_optimizer
            ddp = wrap_ddp(chunks, ps, use_distributed_optimizer=dist_opt)
            rep.grad_buffer[kind] = sum(b.grad_data.numel() for d in ddp for b in d.buffers)
            opt = build_optimizer(ddp, run.optim, precision=tr.precision, distributed=dist_opt)
            leaves = getattr(opt, "chained_optimizers", [opt])
            rep.optim_shard[kind] = sum(
                p.numel()
                for leaf in leaves
                for g in leaf.optimizer.param_groups
                for p in g["params"]
            )
        return rep
    finally:
        destroy_fake_parallel()


def check(reports: list[RankReport], arch, run, stage: str) -> list[str]:
    """The dry run's checks (see the module docstring); returns the failures."""
    from nova_engine.tools import plan_terms as P

    par = run.parallel
    lay = P.Layout(par.tp, par.pp, len(reports) // (par.tp * par.pp), par.vpp, par.sp)
    b = 2 if run.train.precision == "bf16" else 4
    errors = []
    for name, head, trained in _engines(stage):
        unique = 0
        for r in reports:
            if r.dp_rank == 0:
                unique += r.params[head] - r.replicated[head] - r.tied_copy[head]
                unique += r.replicated[head] if r.tp_rank == 0 else 0
        expect = P.model_params(arch, head)
        if unique != expect:
            errors.append(f"{name}: ranks add up to {unique:,} params, the model has {expect:,}")
        for r in reports:
            plan = sum(P.stage_params(arch, lay, r.pp_rank, head).values())
            if r.params[head] != plan or r.weight_bytes[head] != plan * b:
                errors.append(
                    f"{name} rank {r.rank}: {r.params[head]:,} params / {r.weight_bytes[head]:,}"
                    f" bytes, planner {plan:,} / {plan * b:,}"
                )
        if trained:
            for r in reports:
                shards = sum(
                    o.optim_shard[head]
                    for o in reports
                    if (o.tp_rank, o.pp_rank) == (r.tp_rank, r.pp_rank)
                )
                if par.distributed_optimizer and shards != r.grad_buffer[head]:
                    errors.append(
                        f"{name} rank {r.rank}: optimizer shards {shards:,} != grad "
                        f"buffer {r.grad_buffer[head]:,}"
                    )
    return errors


def format_reports(reports: list[RankReport], stage: str) -> str:
    """Per-rank table: params, fp32 grad-buffer and optimizer-shard elements per model kind."""
    names = list(dict.fromkeys(k for _, k, _ in _engines(stage)))
    head = f"{'rank':>5} {'tp':>3} {'pp':>3} {'dp':>3} " + " ".join(
        f"{n + ' params':>17} {'grad buf':>13} {'opt shard':>13}" for n in names
    )
    lines = [head]
    for r in reports:
        cells = []
        for n in names:
            cells.append(
                f"{r.params[n]:>17,} {r.grad_buffer.get(n, 0):>13,} {r.optim_shard.get(n, 0):>13,}"
            )
        lines.append(f"{r.rank:>5} {r.tp_rank:>3} {r.pp_rank:>3} {r.dp_rank:>3} " + " ".join(cells))
    return "\n".join(lines)


def build_all(run, arch, kinds: dict[str, bool], world: int) -> tuple[list[RankReport], float]:
    """Build every rank in turn; -> (reports, seconds)."""
    t0 = time.perf_counter()
    with meta_megatron():
        reports = [build_rank(run, arch, kinds, rank, world) for rank in range(world)]
    return reports, time.perf_counter() - t0


def _layout_key(run, cfg_path: str, world: int) -> tuple:
    tr = run.train
    return (repr(run.parallel), tr.precision, tr.recompute, world, cfg_path)


def main(argv: list[str] | None = None) -> int:
    from nova_engine.config import ConfigError
    from nova_engine.model.arch import ArchitectureError
    from nova_engine.tools import plan_terms as P
    from nova_engine.tools.plan import resolve

    p = argparse.ArgumentParser(
        prog="nova dryrun",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--recipe", required=True)
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides (parallel.pp=2)")
    p.add_argument("--stage", default="sft", choices=(*STAGES, "all"))
    p.add_argument(
        "--config",
        help="HF config.json (default: the recipe's model, else "
        "recipes/configs/<model name>/config.json)",
    )
    p.add_argument("--world", type=int, help="GPUs (default: the recipe's torchrun command)")
    p.add_argument("--quiet", action="store_true", help="no per-rank table")
    args = p.parse_intermixed_args(argv)
    import warnings

    warnings.filterwarnings("ignore")  # megatron's "no apex / TE" warnings, once per import
    stages = STAGES if args.stage == "all" else (args.stage,)
    resolved = {}
    for stage in stages:
        try:
            run, arch, cfg_path, world = resolve(
                args.recipe, stage, args.config, args.world, args.overrides
            )
            run.validate_world(world)
            arch.check_layout(run.parallel.tp, run.parallel.pp, run.parallel.vpp)
        except (ConfigError, ArchitectureError, OSError) as e:
            emit(f"nova dryrun: {e}", err=True)
            return 2
        resolved[stage] = (run, arch, cfg_path, world)
    # stages on the same layout share one build per rank of each model kind they use
    groups: dict[tuple, dict[str, bool]] = {}
    for stage, (run, _, cfg_path, world) in resolved.items():
        kinds = groups.setdefault(_layout_key(run, cfg_path, world), {})
        for _, kind, trained in _engines(stage):
            kinds[kind] = kinds.get(kind, False) or trained
    built: dict[tuple, tuple[list[RankReport], float]] = {}
    failed = False
    for stage, (run, arch, cfg_path, world) in resolved.items():
        key = _layout_key(run, cfg_path, world)
        if key not in built:
            built[key] = build_all(run, arch, groups[key], world)
        reports, secs = built[key]
        errors = check(reports, arch, run, stage)
        par = run.parallel
        emit(
            f"== {args.recipe} [{stage}] {arch.family} {cfg_path}: TP{par.tp} PP{par.pp}"
            f"{f' VP{par.vpp}' if par.vpp > 1 else ''} DP{world // (par.tp * par.pp)}"
            f"{' SP' if par.sp else ''}, {world} ranks built on meta in {secs:.1f}s "
            f"(models: {', '.join(groups[key])})"
        )
        if not args.quiet:
            emit(format_reports(reports, stage))
        for name, head, _ in _engines(stage):
            total = P.model_params(arch, head)
            ok = not any(e.startswith((name + ":", name + " ")) for e in errors)
            emit(
                f"{name}: {total / 1e9:.2f}B params ({total:,}); per-rank counts add up and "
                f"equal the planner's weights: {'OK' if ok else 'FAILED'}"
            )
        for err in errors:
            emit(f"FAIL {err}", err=True)
        failed |= bool(errors)
    return 1 if failed else 0
