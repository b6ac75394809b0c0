"""Ahead-of-time compile check of every Triton kernel of nova_kernels, without a GPU.

Each `@triton.jit` kernel is compiled through Triton's own compiler (`triton.compile` on an
`ASTSource`) for sm_90 (H100/H200) and sm_80 (A100), for every launch configuration its
launcher or config selector may pick and every input dtype its public op accepts; ptxas ships
in the Triton wheel, so no GPU and no CUDA driver are needed. Per compile we read from the
cubin (`cuobjdump -res-usage`): registers per thread, local memory (stack frame + local:
Triton's `n_spills` is the driver's LOCAL_SIZE_BYTES / 4, i.e. this), and Triton's shared
memory per block. A compile FAILS on a compile error, shared memory above the target's opt-in
limit per block, or any spill.

    python -m nova_kernels._aot [--fast] [--targets 90,80] [--jobs 2]     (JSON rows on stdout)

Used by tests/kernels/test_aot_compile.py and benchmarks/aot_compile.py. `run_matrix` can be
called from a process where the Triton interpreter is on (the test session sets
TRITON_INTERPRET=1 before triton is imported, which turns every @triton.jit into an
interpreted function): it then runs the compiles in a fresh Python with the interpreter off.

The spec of what to compile lives here, in `specs()`: per kernel the pointer element types
(the input dtype where marked "in"), the flag variants (feature constexprs: the variant with
every optional code path on, which has the highest register pressure, plus the other
code-path choices that change the kernel substantially), and the launch configs, read from the
op modules' own config tables (`_GPU_BLOCK`, `linear_logprobs._CONFIGS`, ...) so that the check
and the launchers cannot drift apart. The signature is built from the kernel's own argument
list: a new argument needs no change here unless it is a constexpr without a default or a
pointer whose element type is not fp32 (runtime scalars default to i32 when their names say
so, fp32 otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

# Max shared memory per block (opt-in) by compute capability, bytes (CUDA programming guide,
# "Technical specifications per compute capability": 227 KiB on sm_90, 163 KiB on sm_80).
SMEM_LIMIT = {90: 232448, 80: 166912}
TARGETS = (90, 80)
DTYPES = ("fp32", "bf16", "fp16")

# runtime scalars that are integers (shapes, strides, offsets); every other scalar is fp32
_INT_SCALARS = re.compile(
    r"^(n|N|H|T|R|B|G|NC|Vp|n_rows|n_cols|col0|n_splits|group_size|stride_\w+)$"
)


@dataclass(frozen=True)
class Launch:
    """One compile of one kernel: constexprs, launch options and the input dtype."""

    kernel: str  # "<op module>.<kernel function>"
    config: str  # short label of the launch config (tile sizes, warps, stages)
    variant: str  # short label of the flag constexprs
    dtype: str  # input dtype: fp32 | bf16 | fp16
    constexprs: dict = field(hash=False)
    num_warps: int = 4
    num_stages: int = 3
    fast: bool = False  # part of the fast (always-run) subset of the test


@dataclass(frozen=True)
class KernelSpec:
    """What to compile of one kernel. pointers: argument -> element type ("in" = the input
    dtype; unlisted pointers are fp32); variants: flag constexpr dicts; configs: (label,
    constexprs, num_warps, num_stages) per input dtype (a callable of the dtype)."""

    module: str
    name: str
    pointers: dict
    variants: list
    configs: Callable[[str], list[tuple[str, dict, int, int]]]
    dtypes: tuple = DTYPES


def _pow2(lo: int, hi: int) -> list[int]:
    out, x = [], lo
    while x <= hi:
        out.append(x)
        x *= 2
    return out


def _block(values, key: str = "BLOCK", warps=lambda b: 4):
    """Configs of a 1-D block kernel: one per block size the launcher may pick."""
    values = sorted(values, reverse=True)  # the largest (default) first: the fast subset's
    return lambda dtype: [(f"{key}={b}", {key: b}, warps(b), 3) for b in values]


def specs() -> list[KernelSpec]:
    """Every Triton kernel of nova_kernels with what its launchers may pass (see module doc)."""
    from .ops import _linear_configs as llc
    from .ops import gae, group_advantages, kl, lm_head_rows, policy_loss, seq_reduce, whiten

    def ll_configs(name):
        def configs(dtype):
            cfgs = [llc.config_for_class(name, dtype, c) for c in ("wide", "narrow")]
            cfgs += llc.autotune_configs(name, dtype)  # the NOVA_AUTOTUNE=1 candidates
            out: dict[str, tuple[str, dict, int, int]] = {}
            for cfg in cfgs:
                kw = dict(cfg.kwargs)
                label = "BN{BLOCK_N}_BV{BLOCK_V}_BK{BLOCK_K}".format(**kw)
                label += f"_w{cfg.num_warps}_s{cfg.num_stages}"
                consts = {**kw, **llc.dot_flags(dtype)}
                out.setdefault(label, (label, consts, cfg.num_warps, cfg.num_stages))
            return list(out.values())

        return configs

    def rows_configs(dtype):  # the dz dtype; z is always fp32
        blocks = _pow2(16, lm_head_rows._GPU_BLOCK_V)[::-1]
        consts = dict(NARROW=dtype != "fp32", RNE_BF16=False)
        warps = lm_head_rows._GPU_WARPS
        return [(f"BLOCK_V={b}", dict(consts, BLOCK_V=b), warps.get(b, 4), 3) for b in blocks]

    pl_flags = dict(HAS_DUAL=True, HAS_TIS=True, HAS_KL=True, KL_TYPE=2)
    pl_ptrs = dict(lp_ptr="in", old_ptr="in", adv_ptr="in", m_ptr="u8", rl_ptr="in")
    pl_ptrs.update(ref_ptr="in", cu_ptr="i64")
    gae_ptrs = dict(r_ptr="in", v_ptr="in", m_ptr="u8", cu_ptr="i64")
    gae_variants = [dict(CHUNKS_PER_SPLIT=2)]
    ga_ptrs = dict(x_ptr="in", perm_ptr="i64", off_ptr="i64")
    ga_group = _block([group_advantages._GPU_BLOCK_GROUP])
    gae_blocks = _block(gae._GPU_BLOCK_TS, "BLOCK_T", gae._num_warps)
    pl_blocks = _block(policy_loss._GPU_BLOCK_TS, "BLOCK_T")
    return [
        KernelSpec(
            "linear_logprobs",
            "_fwd_stats_kernel",
            dict(h_ptr="in", w_ptr="in", tgt_ptr="i64"),
            [dict(WITH_ENTROPY=True), dict(WITH_ENTROPY=False)],
            ll_configs("fwd"),
        ),
        KernelSpec(
            "linear_logprobs",
            "_bwd_dlogits_kernel",
            dict(h_ptr="in", w_ptr="in", tgt_ptr="i64", dz_ptr="in"),
            [dict(WITH_ENTROPY=True), dict(WITH_ENTROPY=False)],
            ll_configs("bwd"),
        ),
        KernelSpec(
            "lm_head_rows",
            "_rows_kernel",
            dict(dz_ptr="in", tgt_ptr="i64"),
            [dict(STATS=True, DZ=True)],  # both loops; STATS-only / DZ-only launches run a part
            rows_configs,
        ),
        KernelSpec(
            "seq_reduce",
            "_seq_reduce_fwd_kernel",
            dict(v_ptr="in", m_ptr="u8", cu_ptr="i64"),
            [dict(MEAN=True, HAS_MASK=True)],
            _block([seq_reduce._GPU_BLOCK_FWD]),
        ),
        KernelSpec(
            "seq_reduce",
            "_seq_reduce_bwd_kernel",
            dict(seg_ptr="i64", m_ptr="u8", dv_ptr="in"),
            [dict(MEAN=True, HAS_MASK=True)],
            _block([seq_reduce._GPU_BLOCK_BWD]),
        ),
        # rows split over several programs only when the longest row has several chunks of
        # the default (largest) BLOCK_T: smaller explicit block_t / n_splits are test knobs
        KernelSpec(
            "gae",
            "_scan_split_agg_kernel",
            gae_ptrs,
            gae_variants,
            _block([gae._GPU_BLOCK_T], "BLOCK_T", gae._num_warps),
        ),
        KernelSpec(
            "gae",
            "_scan_apply_kernel",
            gae_ptrs,
            gae_variants,
            gae_blocks,
        ),
        KernelSpec("group_advantages", "_group_partials_kernel", ga_ptrs, [{}], ga_group),
        KernelSpec("group_advantages", "_group_centered_kernel", ga_ptrs, [{}], ga_group),
        KernelSpec(
            "group_advantages",
            "_group_apply_kernel",
            dict(x_ptr="in", ids_ptr="i64"),
            [dict(MODE=0), dict(MODE=2)],  # grpo (sqrt + division) and rloo
            _block([group_advantages._GPU_BLOCK_APPLY]),
        ),
        KernelSpec(
            "whiten",
            "_partial_sums_kernel",
            dict(x_ptr="in", m_ptr="u8"),
            [dict(CENTERED=True), dict(CENTERED=False)],
            _block([whiten._GPU_BLOCK]),
        ),
        KernelSpec(
            "whiten",
            "_apply_kernel",
            dict(x_ptr="in"),
            [dict(SHIFT_MEAN=False)],
            _block([whiten._GPU_BLOCK]),
        ),
        KernelSpec(
            "kl",
            "_kl_fwd_kernel",
            dict(lp_ptr="in", ref_ptr="in"),
            [dict(KL_TYPE=2)],
            _block([kl._GPU_BLOCK]),
        ),
        KernelSpec(
            "kl",
            "_kl_bwd_kernel",
            dict(lp_ptr="in", ref_ptr="in", dlp_ptr="in"),
            [dict(KL_TYPE=2)],
            _block([kl._GPU_BLOCK]),
        ),
        KernelSpec(
            "policy_loss",
            "_policy_loss_fwd_kernel",
            pl_ptrs,
            [dict(pl_flags, PACKED=True), dict(pl_flags, PACKED=False)],
            pl_blocks,
        ),
        KernelSpec(
            "policy_loss",
            "_policy_loss_bwd_kernel",
            dict(pl_ptrs, dlp_ptr="in"),
            [dict(pl_flags, PACKED=True), dict(pl_flags, PACKED=False)],
            pl_blocks,
        ),
    ]


def launches(fast: bool = False) -> list[Launch]:
    """The compile matrix (without targets). fast: per kernel its first variant and first
    config, bf16 only (plus fp32 for linear_logprobs, whose fp32 path has its own tiles)."""
    out = []
    for spec in specs():
        for dtype in spec.dtypes:
            for vi, variant in enumerate(spec.variants):
                for ci, (label, consts, warps, stages) in enumerate(spec.configs(dtype)):
                    first = vi == 0 and ci == 0
                    is_fast = first and (
                        dtype == "bf16" or (spec.module == "linear_logprobs" and dtype == "fp32")
                    )
                    vlabel = ",".join(f"{k}={v}" for k, v in variant.items()) or "-"
                    out.append(
                        Launch(
                            f"{spec.module}.{spec.name}",
                            label,
                            vlabel,
                            dtype,
                            {**variant, **consts},
                            warps,
                            stages,
                            is_fast,
                        )
                    )
    return [x for x in out if x.fast] if fast else out


_TRITON_TYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "u8": "u8"}


def _signature(fn, launch: Launch, pointers: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ASTSource, from the kernel's own argument list."""
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            if p.name in launch.constexprs:
                consts[p.name] = launch.constexprs[p.name]
            elif p.has_default:
                consts[p.name] = p.default
            else:
                raise ValueError(
                    f"nova_kernels._aot: {launch.kernel} has constexpr {p.name!r} without a "
                    "default and its spec gives no value: add it to the spec's variants"
                )
        elif p.name.endswith("_ptr"):
            kind = pointers.get(p.name, "fp32")
            sig[p.name] = "*" + (_TRITON_TYPES[launch.dtype] if kind == "in" else kind)
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-B aligned
        else:
            sig[p.name] = "i32" if _INT_SCALARS.match(p.name) else "fp32"
    unknown = set(launch.constexprs) - {p.name for p in fn.params if p.is_constexpr}
    if unknown:
        raise ValueError(f"nova_kernels._aot: {launch.kernel} has no constexpr {sorted(unknown)}")
    return sig, consts, attrs


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _res_usage(cubin: bytes) -> dict:
    """REG / STACK / LOCAL of the (only) function in a cubin, via cuobjdump -res-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"nova_kernels._aot: cannot read cuobjdump output:\n{text}")
    reg, stack, _, local = (int(x) for x in m.groups())
    return {"registers": reg, "local_bytes": stack + local}


def compile_one(launch: Launch, arch: int) -> dict:
    """Compile one launch for sm_<arch>; -> a tidy row (ok False with the error on failure)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    row = {k: v for k, v in asdict(launch).items() if k not in ("constexprs", "fast")}
    row.update(target=f"sm_{arch}", smem_limit=SMEM_LIMIT[arch])
    spec = next(s for s in specs() if f"{s.module}.{s.name}" == launch.kernel)
    fn = getattr(importlib.import_module(f"nova_kernels.ops.{spec.module}"), spec.name)
    try:
        sig, consts, attrs = _signature(fn, launch, spec.pointers)
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        opts = dict(num_warps=launch.num_warps, num_stages=launch.num_stages)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
        usage = _res_usage(compiled.asm["cubin"])
    except Exception as e:  # noqa: BLE001 - reported in the row, the caller fails on it
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}")
        return row
    shared = int(compiled.metadata.shared)
    n_spills = usage["local_bytes"] // 4
    errors = []
    if shared > SMEM_LIMIT[arch]:
        errors.append(f"shared memory {shared} B > {SMEM_LIMIT[arch]} B")
    if usage["local_bytes"] > 0:
        errors.append(f"spills: {usage['local_bytes']} B local memory per thread")
    row.update(
        registers=usage["registers"],
        n_spills=n_spills,
        spill_bytes=usage["local_bytes"],
        shared_bytes=shared,
        ok=not errors,
        error="; ".join(errors),
    )
    return row


def _compile_job(job):
    return compile_one(*job)


def _run_here(fast: bool, targets, jobs: int) -> list[dict]:
    import multiprocessing

    work = [(x, arch) for x in launches(fast) for arch in targets]
    if jobs <= 1:
        return [_compile_job(w) for w in work]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_compile_job, work, chunksize=1)


def run_matrix(fast: bool = False, targets=TARGETS, jobs: int | None = None) -> list[dict]:
    """Compile the matrix; -> one row per (launch, target). Runs in a fresh Python with the
    Triton interpreter off (the interpreter replaces every @triton.jit at import)."""
    jobs = jobs or max(1, min(4, os.cpu_count() or 1))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    cmd = [sys.executable, "-m", "nova_kernels._aot", "--jobs", str(jobs)]
    cmd += ["--targets", ",".join(str(t) for t in targets)] + (["--fast"] if fast else [])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nova_kernels._aot failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast", action="store_true", help="the fast subset only")
    ap.add_argument("--targets", default=",".join(str(t) for t in TARGETS))
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("nova_kernels._aot: unset TRITON_INTERPRET (or call run_matrix)")
    targets = [int(t) for t in args.targets.split(",")]
    rows = _run_here(args.fast, targets, args.jobs)
    sys.stdout.write(json.dumps(rows))


if __name__ == "__main__":
    main()
