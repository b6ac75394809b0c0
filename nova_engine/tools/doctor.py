"""`nova doctor`: what this machine has, and which paths the engine will take on it.

    nova doctor            # one `name: value` line per finding, then the engine's choices
    nova doctor --json     # the same as one JSON object

Found: Python, torch (and the CUDA / NCCL it was built with), the GPU, Triton and the target
it compiles for, megatron-core, transformers, and the optional accelerators the design names
(Transformer Engine, flash-attn and its major version, apex, liger-kernel). Chosen (the
engine's own selectors, not a guess): packed attention for training and for generation, the
LM-head kernel backend (NOVA_KERNELS), Transformer Engine's layer spec on/off, and
megatron's fusion / DP-overlap switches as a run with default `train.speed` sets them.
Exit 0 whatever is found (a CPU machine is a supported machine); `make install-gpu` installs
the GPU set.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import platform
from typing import Any

from nova_engine.logging import quiet_third_party, verbose_requested
from nova_engine.progress import emit

# optional packages: (import name, distribution names to read the version from)
OPTIONAL = {
    "transformer_engine": ("transformer_engine", ("transformer-engine", "transformer_engine")),
    "flash_attn": ("flash_attn", ("flash-attn", "flash_attn")),
    "flash_attn_3": ("flash_attn_interface", ("flash-attn-3", "flash_attn_3")),
    "apex": ("apex", ("apex",)),
    "liger_kernel": ("liger_kernel", ("liger-kernel", "liger_kernel")),
}


def _version(dists: tuple[str, ...]) -> str | None:
    for d in dists:
        try:
            return md.version(d)
        except md.PackageNotFoundError:
            continue
    return None


def _optional(import_name: str, dists: tuple[str, ...]) -> str:
    """'<version>' when the module imports, 'not installed', or 'broken (<error>)'."""
    if importlib.util.find_spec(import_name) is None:
        return "not installed"
    try:
        importlib.import_module(import_name)
    except Exception as e:  # noqa: BLE001 - a wheel built for another torch / CUDA
        return f"broken ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    return _version(dists) or "installed (version unknown)"


def _triton() -> tuple[str, str]:
    try:
        import triton
    except Exception as e:  # noqa: BLE001
        return f"not importable ({e})", "none"
    from nova_kernels._backend import interpreting

    if interpreting():
        return triton.__version__, "CPU interpreter (TRITON_INTERPRET=1)"
    try:
        t = triton.runtime.driver.active.get_current_target()
        return triton.__version__, f"{t.backend} {t.arch}"
    except Exception:  # noqa: BLE001 - no GPU driver
        return triton.__version__, "none (no GPU driver: kernels run only with TRITON_INTERPRET=1)"


def found() -> dict[str, Any]:
    """What is installed and what the hardware is."""
    import torch

    cuda = torch.cuda.is_available()
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda (torch build)": torch.version.cuda or "none (CPU build)",
        "gpu": "none",
        "nccl": "none",
    }
    if cuda:
        n = torch.cuda.device_count()
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = f"{n} x {p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})"
    if torch.distributed.is_available() and torch.distributed.is_nccl_available():
        try:
            out["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception:  # noqa: BLE001 - NCCL built in but no CUDA runtime
            out["nccl"] = "built in (no CUDA runtime)"
    out["triton"], out["triton target"] = _triton()
    out["megatron-core"] = _version(("megatron-core", "megatron_core")) or "not installed"
    out["transformers"] = _version(("transformers",)) or "not installed"
    for name, (mod, dists) in OPTIONAL.items():
        out[name.replace("_", "-")] = _optional(mod, dists)
    return out


def chosen() -> dict[str, Any]:
    """The engine's choices on this machine, from its own selectors."""
    import torch

    from nova_engine.model import attention
    from nova_engine.model.build import speed_switches, te_available
    from nova_engine.parallel.pipeline import ddp_overlap
    from nova_kernels._backend import default_backend

    cuda = torch.cuda.is_available()
    use_te = te_available()
    if cuda:
        if attention._varlen_api() is not None:
            train_attn = "torch.nn.attention.varlen.varlen_attn (bf16/fp16 packed batches)"
        elif attention._flash_varlen_api() is not None:
            train_attn = "flash-attn varlen (bf16/fp16 packed batches)"
        else:
            train_attn = "grouped SDPA (no varlen kernel: torch < 2.10 and no flash-attn)"
        if use_te:
            train_attn += "; Transformer Engine's DotProductAttention in the TE spec"
    else:
        from nova_engine import _C

        isa = _C.attention_isas()[-1]
        train_attn = (
            f"Nova's C++ CPU kernel ({isa}; fp32), else grouped SDPA"
            if isa != "baseline"
            else "grouped SDPA (no AVX2/AVX-512 for the C++ kernel)"
        )
    switches = speed_switches(cuda, use_te)
    overlap_grad, overlap_param = ddp_overlap(cuda, True)
    return {
        "attention (training)": train_attn,
        "attention (generation)": "Nova's KV cache + SDPA (nova_engine.generate.kv_cache)",
        "lm-head kernels": f"{default_backend()} (NOVA_KERNELS=triton|torch overrides)",
        "transformer-engine spec": "on" if use_te else "off (local spec + Nova attention)",
        "fusions": ", ".join(f"{k}={'on' if v else 'off'}" for k, v in switches.items()),
        "dp overlap": (
            f"overlap_grad_reduce={'on' if overlap_grad else 'off'}, "
            f"overlap_param_gather={'on' if overlap_param else 'off'} (distributed optimizer)"
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nova doctor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    args = p.parse_args(argv)
    quiet_third_party(verbose_requested())
    f, c = found(), chosen()
    if args.json:
        emit(json.dumps({"found": f, "engine": c}, indent=2))
        return 0
    width = max(len(k) for k in (*f, *c)) + 1
    emit("found:")
    for k, v in f.items():
        emit(f"  {k + ':':<{width}} {v}")
    emit("engine will use:")
    for k, v in c.items():
        emit(f"  {k + ':':<{width}} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
