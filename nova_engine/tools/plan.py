"""`nova plan`: per-GPU memory of a recipe's layout, whether it fits, and the layouts that
do, ranked by projected step time.

    nova plan --recipe recipes/llama3_70b.yaml --stage sft --world 64 --gpu-mem 80
    nova plan --recipe recipes/qwen2_72b.yaml --stage rlvr --world 64 --rollout-batch 32
    nova plan --recipe recipes/llama3_70b.yaml --stage dpo --world 8 model.lora.rank=16

The model's dimensions come from its HF config.json: `--config`, else the recipe's
`model.hf_path`, else recipes/configs/<model dir name>/config.json (the published configs
of Llama-3.1-8B/70B and Qwen2-72B ship there, so planning needs no weights). The world size
defaults to the recipe's own `torchrun --nnodes N --nproc_per_node M ... <stage>` comment.
Stages without a section in the recipe (rm, rlvr today) use the dpo (rm) or sft (rlvr)
section's layout and batch, and say so.

The memory model, its sources (Korthikanti et al. 2022; megatron's theoretical memory
estimate) and where Nova departs from them are in nova_engine/tools/plan_terms.py; the
weights it counts are checked rank by rank against a meta-device build by `nova dryrun`,
its activation terms against measured saved tensors in tests/tools/test_plan.py.
With `model.lora` (a recipe key or an override) the base is frozen and only the adapters
train: no base grads / optimizer state and no reference copy (plan_terms: LoRA). Throughput
figures are PROJECTED (FLOPs at a stated efficiency plus the pipeline bubble),
not measured.

RLVR with `rlvr.mode: async` (the recipe's rlvr section, or an override `rlvr.mode=async`):
the world splits as the run splits it (RLVRSection.split: the last rlvr.generation_ranks
ranks generate) and the two groups are planned separately: the training group is the
recipe's layout over the remaining ranks (policy, reference, critic: as colocated, but no
KV cache), the generation group rlvr.generation_tp x generation_pp (frozen weights in the
training precision, the KV cache of rollout.max_batch_size sequences of data.max_length +
rollout.max_new_tokens tokens, nothing else). The split and both layouts are validated
first (exit 2 naming the key); exit 0 only when both groups fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re

from nova_engine.progress import emit
from nova_engine.tools import plan_terms as P

_TORCHRUN = re.compile(
    r"torchrun\s+--nnodes\s+(\d+)\s+--nproc_per_node\s+(\d+)\s.*?\b(\w+)\s+--recipe"
)


def recipe_world(recipe: str, stage: str) -> int | None:
    """GPUs of the recipe's `torchrun --nnodes N --nproc_per_node M -m ... <stage>` comment."""
    with open(recipe) as f:
        for line in f:
            m = _TORCHRUN.search(line)
            if m and line.lstrip().startswith("#") and m.group(3) == stage:
                return int(m.group(1)) * int(m.group(2))
    return None


def find_config(recipe: str, hf_path: str, config: str | None) -> str:
    """The config.json to plan with (see the module docstring); OSError naming the tries."""
    import yaml

    tries = []
    if config:
        tries.append(os.path.join(config, "config.json") if os.path.isdir(config) else config)
    else:
        tries.append(os.path.join(hf_path, "config.json"))
        with open(recipe) as f:
            top = (yaml.safe_load(f) or {}).get("model") or {}
        for path in (hf_path, top.get("hf_path") or ""):
            name = os.path.basename(os.path.normpath(path)) if path else ""
            if name:
                here = os.path.join(os.path.dirname(os.path.abspath(recipe)), "configs", name)
                tries.append(os.path.join(here, "config.json"))
    for t in tries:
        if os.path.isfile(t):
            return t
    raise OSError(f"no config.json for {recipe}: tried {', '.join(tries)} (pass --config)")


def resolve(
    recipe: str,
    stage: str,
    config: str | None,
    world: int | None,
    overrides: list[str] | tuple[str, ...] = (),
):
    """(run config of the stage's section + overrides, ModelArch, config path, world size)."""
    import json

    from nova_engine.config import ConfigError
    from nova_engine.model.arch import arch_from_hf_config
    from nova_engine.recipe import load_recipe

    try:
        run = load_recipe(recipe, stage, overrides)
        section = stage
    except ConfigError as e:
        if e.key not in ("stage", stage):  # a bad recipe, not a missing stage section
            raise
        section = "dpo" if stage == "rm" else "sft"
        run = load_recipe(recipe, section, overrides)
    path = find_config(recipe, run.model.hf_path, config)
    with open(path) as f:
        arch = arch_from_hf_config(json.load(f), where=path)
    if world is None:
        world = recipe_world(recipe, stage) or recipe_world(recipe, section)
        world = world or run.parallel.tp * run.parallel.pp
    return run, arch, path, world


@dataclasses.dataclass(frozen=True)
class Options:
    """Workload knobs of `nova plan` beyond the recipe."""

    gpu_mem_gib: float = 80.0
    mean_len: float | None = None
    efficiency: float = P.DEFAULT_EFFICIENCY
    peak: float = P.H100_BF16_PEAK
    rollout_batch: int | None = None
    rollout_len: int | None = None
    critic: bool = True
    reserve_gib: float = 4.0


def workload(run, stage: str, lay: P.Layout, opt: Options) -> tuple[P.Workload, float]:
    """(Workload for one DP rank, tokens per optimizer step over all ranks)."""
    d, tr = run.data, run.train
    mean = opt.mean_len or d.max_length / 2
    per_seq = 2 * mean if stage in ("dpo", "rm") else mean  # a pair is chosen + rejected
    tokens = tr.global_batch_size * per_seq
    m = max(1, math.ceil(tokens / (lay.dp * tr.micro_batch_tokens)))
    rows = opt.rollout_batch or max(1, tr.global_batch_size // lay.dp)
    critic_lora = getattr(getattr(run, "critic", None), "lora", None)  # rlvr's critic.lora
    wl = P.Workload(
        stage=stage,
        micro_batch_tokens=tr.micro_batch_tokens,
        microbatches=m,
        precision=tr.precision,
        mean_doc_len=mean,
        critic=opt.critic,
        rollout_batch=rows,
        rollout_len=opt.rollout_len or 2 * d.max_length,
        reserve_gib=opt.reserve_gib,
        lora_rank=run.model.lora.rank if run.model.lora else 0,
        lora_targets=tuple(run.model.lora.targets) if run.model.lora else ("qkv",),
        critic_lora_rank=critic_lora.rank if critic_lora else 0,
        critic_lora_targets=tuple(critic_lora.targets) if critic_lora else ("qkv",),
        generates=async_rlvr(run, stage) is None,
    )
    return wl, tokens


def async_rlvr(run, stage: str):
    """The recipe's `rlvr:` section (RLVRSection) when the stage is rlvr in async mode."""
    r = getattr(run, "rlvr", None) if stage == "rlvr" else None
    return r if r is not None and r.is_async else None


def async_split(run, arch, world: int, source: str) -> tuple[range, range]:
    """(training ranks, generation ranks) of an async RLVR world, checked as the run checks
    them before any process group (RLVRSection.split, the training group's layout and batch,
    the generation layout against the model's dimensions); ConfigError naming the key."""
    r, par = run.rlvr, run.parallel
    train, gen = r.split(world, par.tp, par.pp)
    dims = {"num_attention_heads": arch.num_heads, "num_key_value_heads": arch.num_kv_heads,
            "vocab_size": arch.vocab_size, "intermediate_size": arch.intermediate_size,
            "num_hidden_layers": arch.num_layers}  # fmt: skip
    r.check_dims(dims, source)
    run.validate_world(len(train))
    return train, gen


def generation_workload(run, opt: Options) -> P.Workload:
    """Async RLVR's generation group: rollout.max_batch_size rows (or --rollout-batch) of
    data.max_length + rollout.max_new_tokens tokens (or --rollout-len), training precision."""
    lora = run.model.lora
    return P.Workload(
        stage="rlvr",
        precision=run.train.precision,
        critic=False,
        rollout_batch=opt.rollout_batch or run.rollout.max_batch_size,
        rollout_len=opt.rollout_len or run.data.max_length + run.rollout.max_new_tokens,
        reserve_gib=opt.reserve_gib,
        lora_rank=lora.rank if lora else 0,
        lora_targets=tuple(lora.targets) if lora else ("qkv",),
    )


def evaluate_generation(arch, run, gen_ranks: range, opt: Options) -> Evaluated:
    """The generation group of an async RLVR run: per stage of its TP x PP layout."""
    r = run.rlvr
    lay = P.Layout(r.generation_tp, r.generation_pp,
                   len(gen_ranks) // (r.generation_tp * r.generation_pp), recompute="none")  # fmt: skip
    stages = P.generation_memory(arch, lay, generation_workload(run, opt))
    return Evaluated(lay, stages, None, max(s.total for s in stages) <= opt.gpu_mem_gib * P.GiB)


def recipe_layout(run, world: int) -> P.Layout:
    par = run.parallel
    return P.Layout(
        par.tp,
        par.pp,
        world // (par.tp * par.pp),
        par.vpp,
        par.sp,
        par.distributed_optimizer,
        run.train.recompute,
    )


@dataclasses.dataclass
class Evaluated:
    layout: P.Layout
    stages: list[P.RankMemory]
    time: P.StepTime | None
    fits: bool

    @property
    def peak(self) -> float:
        return max(s.total for s in self.stages)

    def reason(self, gpu_mem_gib: float) -> str:
        """Why it does not fit: the worst stage and its largest terms."""
        worst = max(self.stages, key=lambda s: s.total)
        top = sorted(worst.terms.items(), key=lambda kv: -kv[1])[:3]
        terms = ", ".join(f"{k} {v / P.GiB:.1f}" for k, v in top)
        return (
            f"stage {worst.pp_rank} needs {worst.total / P.GiB:.1f} GiB > {gpu_mem_gib:g} "
            f"GiB (largest: {terms})"
        )


def evaluate(arch, run, stage: str, lay: P.Layout, opt: Options) -> Evaluated:
    wl, tokens = workload(run, stage, lay, opt)
    stages = P.plan(arch, lay, wl)
    fits = max(s.total for s in stages) <= opt.gpu_mem_gib * P.GiB
    t = None if stage == "rlvr" else P.step_time(arch, lay, wl, tokens, opt.peak, opt.efficiency)
    return Evaluated(lay, stages, t, fits)


def candidate_layouts(arch, world: int, global_batch: int, max_tp: int = 8) -> list[P.Layout]:
    """Layouts of `world` GPUs the model divides into (TP inside a node of 8, dp | batch)."""
    out = []
    for tp in (t for t in (1, 2, 4, 8) if t <= max_tp and world % t == 0):
        for pp in (p for p in range(1, arch.num_layers + 1) if world % (tp * p) == 0):
            dp = world // (tp * pp)
            if global_batch % dp:
                continue
            vpps = [1] + [v for v in (2, 4, 5) if pp > 1 and arch.num_layers % (pp * v) == 0]
            for vpp in vpps:
                try:
                    arch.check_layout(tp, pp, vpp)
                except ValueError:
                    continue
                for rec in P.RECOMPUTE:
                    out.append(P.Layout(tp, pp, dp, vpp, tp > 1, True, rec))
    return out


def rank_alternatives(arch, run, stage: str, world: int, opt: Options) -> list[Evaluated]:
    """Every candidate layout evaluated; fitting ones first, by projected step time."""
    evs = [
        evaluate(arch, run, stage, lay, opt)
        for lay in candidate_layouts(arch, world, run.train.global_batch_size)
    ]

    def key(e: Evaluated):
        return (not e.fits, e.time.seconds if e.time else e.peak, e.peak)

    return sorted(evs, key=key)


WORLDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def smallest_fit(arch, run, stage: str, opt: Options) -> tuple[int, Evaluated] | None:
    """The smallest world of WORLDS (nodes of 8 beyond one) with a layout that fits, and its
    fastest fitting layout; None when none of them fits."""
    for world in WORLDS:
        for e in rank_alternatives(arch, run, stage, world, opt):
            if e.fits:
                return world, e
            break  # fitting layouts come first
    return None


def _gib(x: float) -> str:
    return f"{x / P.GiB:8.2f}"


def format_memory(ev: Evaluated) -> str:
    names: list[str] = []
    for s in ev.stages:
        names += [k for k in s.terms if k not in names]
    head = f"{'GiB per GPU':<38}" + "".join(f"{'stage ' + str(s.pp_rank):>9}" for s in ev.stages)
    rows = [head]
    rows.append(
        f"{'params (this rank)':<38}" + "".join(f"{s.params / 1e9:8.3f}B" for s in ev.stages)
    )
    for n in names:
        rows.append(f"{n:<38}" + "".join(_gib(s.terms.get(n, 0.0)) + " " for s in ev.stages))
    rows.append(f"{'total':<38}" + "".join(_gib(s.total) + " " for s in ev.stages))
    return "\n".join(rows)


def format_time(t: P.StepTime | None, opt: Options) -> str:
    if t is None:
        return "projected throughput: n/a for rlvr (generation-bound; memory only)"
    return (
        f"PROJECTED step {t.seconds:.2f} s, {t.tokens_per_s_gpu:,.0f} tokens/s/GPU, MFU "
        f"{100 * t.mfu:.1f}% (FLOPs at {100 * opt.efficiency:.0f}% of "
        f"{opt.peak / 1e12:.0f} TFLOP/s bf16, bubble {100 * t.bubble:.1f}%)"
    )


def format_alternatives(evs: list[Evaluated], opt: Options, top: int) -> str:
    rows = [
        f"{'#':>3}  {'layout':<34} {'peak GiB':>9} {'fits':>5} {'step s':>8} "
        f"{'tok/s/GPU':>10} {'MFU':>6} {'bubble':>7}"
    ]
    for i, e in enumerate(evs[:top], 1):
        t = e.time
        tail = (
            (
                f"{t.seconds:8.2f} {t.tokens_per_s_gpu:10,.0f} {100 * t.mfu:5.1f}% "
                f"{100 * t.bubble:6.1f}%"
            )
            if t
            else f"{'n/a':>8}"
        )
        rows.append(
            f"{i:>3}  {e.layout.describe():<34} {e.peak / P.GiB:9.1f} "
            f"{'yes' if e.fits else 'NO':>5} {tail}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from nova_engine.config import ConfigError
    from nova_engine.model.arch import ArchitectureError

    p = argparse.ArgumentParser(
        prog="nova plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--recipe", required=True)
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides (parallel.pp=2)")
    p.add_argument("--stage", default="sft", choices=P.STAGE_KINDS)
    p.add_argument("--config", help="HF config.json or model directory")
    p.add_argument("--world", type=int, help="GPUs (default: the recipe's torchrun comment)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80)")
    p.add_argument(
        "--mean-len", type=float, help="mean tokens per sequence (default: data.max_length / 2)"
    )
    p.add_argument(
        "--efficiency",
        type=float,
        default=P.DEFAULT_EFFICIENCY,
        help="fraction of bf16 peak for the projection (default 0.40)",
    )
    p.add_argument(
        "--rollout-batch", type=int, help="rlvr: sequences generated at once per DP rank"
    )
    p.add_argument(
        "--rollout-len", type=int, help="rlvr: prompt+response tokens (default 2x max_length)"
    )
    p.add_argument("--no-critic", action="store_true", help="rlvr without a value model (GRPO)")
    p.add_argument(
        "--reserve", type=float, default=4.0, help="GiB kept for CUDA/NCCL/fragmentation"
    )
    p.add_argument("--top", type=int, default=8, help="alternative layouts to list")
    args = p.parse_intermixed_args(argv)
    if not 0 < args.efficiency <= 1:
        emit("nova plan: --efficiency must be in (0, 1]", err=True)
        return 2
    for flag, value, ok in (
        ("--gpu-mem", args.gpu_mem, lambda v: 0 < v < 1e6),
        ("--world", args.world, lambda v: v >= 1),
        ("--mean-len", args.mean_len, lambda v: v > 0),
        ("--rollout-batch", args.rollout_batch, lambda v: v >= 1),
        ("--rollout-len", args.rollout_len, lambda v: v >= 1),
        ("--reserve", args.reserve, lambda v: 0 <= v < args.gpu_mem),
        ("--top", args.top, lambda v: v >= 0),
    ):
        if value is not None and not (math.isfinite(value) and ok(value)):
            emit(f"nova plan: {flag} {value:g}: expected a positive, finite value"
                 + (" below --gpu-mem" if flag == "--reserve" else ""), err=True)  # fmt: skip
            return 2
    opt = Options(
        args.gpu_mem,
        args.mean_len,
        args.efficiency,
        P.H100_BF16_PEAK,
        args.rollout_batch,
        args.rollout_len,
        not args.no_critic,
        args.reserve,
    )
    split = None  # async RLVR: (training ranks, generation ranks)
    try:
        run, arch, cfg, world = resolve(
            args.recipe, args.stage, args.config, args.world, args.overrides
        )
        if async_rlvr(run, args.stage) is not None:
            split = async_split(run, arch, world, cfg)
            r = run.rlvr
            arch.check_layout(r.generation_tp, r.generation_pp, 1)
        else:
            run.validate_world(world)
        arch.check_layout(run.parallel.tp, run.parallel.pp, run.parallel.vpp)
    except (ConfigError, ArchitectureError, OSError) as e:
        emit(f"nova plan: {e}", err=True)
        return 2
    total_world = world
    if split is not None:
        world = len(split[0])  # from here on: the training group
    lay = recipe_layout(run, world)
    ev = evaluate(arch, run, args.stage, lay, opt)
    wl, tokens = workload(run, args.stage, lay, opt)
    lora = run.model.lora
    emit(
        f"nova plan: {args.recipe} [{args.stage}], {arch.family} from {cfg}: "
        f"{arch.num_params / 1e9:.2f}B params, {total_world} GPUs of {args.gpu_mem:g} GiB"
        + (f"; LoRA r={lora.rank} on {','.join(lora.targets)} (base frozen)" if lora else "")
    )
    emit(
        f"layout {lay.describe()}, {'distributed' if lay.distributed_optimizer else 'replicated'}"
        f" optimizer, {run.train.precision}; micro-batch {wl.micro_batch_tokens} tokens, "
        f"m={wl.microbatches} per DP rank per step ({tokens:,.0f} tokens/step at mean length "
        f"{wl.mean_doc_len:g})"
    )
    if args.stage != run.stage:
        emit(
            f"(no {args.stage} section in the recipe: layout and batch of its {run.stage} section)"
        )
    gen = None
    if split is not None:
        gen = evaluate_generation(arch, run, split[1], opt)
        t, g = split
        emit(f"rlvr.mode async: {total_world} GPUs = training group of {len(t)} (ranks "
             f"{t.start}..{t.stop - 1}) + generation group of {len(g)} (ranks {g.start}.."
             f"{g.stop - 1})\n\ntraining group (no KV cache: the generation group samples):")  # fmt: skip
    emit(format_memory(ev))
    verdict = "fits" if ev.fits else "DOES NOT FIT: " + ev.reason(args.gpu_mem)
    emit(f"{lay.describe()}: {verdict}")
    emit(format_time(ev.time, opt))
    if gen is not None:
        wl_gen = generation_workload(run, opt)
        gl = gen.layout
        emit(f"\ngeneration group TP{gl.tp} PP{gl.pp} DP{gl.dp}: frozen weights "
             f"({run.train.precision}), KV cache of {wl_gen.rollout_batch} sequences x "
             f"{wl_gen.rollout_len} tokens (prompt + response); no grads, optimizer, "
             "reference or critic")  # fmt: skip
        emit(format_memory(gen))
        verdict = "fits" if gen.fits else "DOES NOT FIT: " + gen.reason(args.gpu_mem)
        emit(f"generation group TP{gl.tp} PP{gl.pp} DP{gl.dp}: {verdict}")
    alts = rank_alternatives(arch, run, args.stage, world, opt)
    what = " (the training group)" if split is not None else ""
    emit(f"\nlayouts of {world} GPUs{what}, fitting first, by projected step time:")
    emit(format_alternatives(alts, opt, args.top))
    least = None if split is not None else smallest_fit(arch, run, args.stage, opt)
    if least is not None:
        emit(f"smallest world that fits: {least[0]} GPUs, {least[1].layout.describe()} "
             f"({least[1].peak / P.GiB:.1f} GiB peak)")  # fmt: skip
    if not ev.fits:
        good = [e for e in alts if e.fits]
        if good:
            emit(
                f"a layout that fits: {good[0].layout.describe()} "
                f"({good[0].peak / P.GiB:.1f} GiB peak)"
            )
        else:
            emit(f"no layout of {world} GPUs fits {args.gpu_mem:g} GiB: use more GPUs")
    return 0 if ev.fits and (gen is None or gen.fits) else 1
