"""Ahead-of-time compile check: every Triton kernel of the project compiles for sm_90 (H100)
and sm_80 (A100) through Triton's own compiler, without a GPU, for every config its launcher,
selector or NOVA_AUTOTUNE candidates may pick and every input dtype: no compile error, shared
memory within the target's per-block limit, no register spill (nova_kernels._aot). The fast
subset (each kernel once, bf16; linear_logprobs also fp32) always runs; the full matrix is
marked slow. Also: linear_logprobs' config selector has a bounded number of keys over
N = 4..4096 (the backward's chunk widths included) and is deterministic across processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nova_kernels import _aot
from nova_kernels.ops import _linear_configs as llc
from nova_kernels.ops import linear_logprobs as ll

ROOT = Path(__file__).resolve().parents[2]


def _failures(rows):
    bad = [r for r in rows if not r["ok"]]
    return "\n".join(
        f"{r['kernel']} [{r['config']}; {r['variant']}] {r['dtype']} {r['target']}: {r['error']}"
        for r in bad
    )


def test_every_jitted_kernel_has_an_aot_spec():
    """Every @triton.jit function named *_kernel in nova_kernels/ and nova_engine/ (helpers are
    compiled inside the kernels that call them) is in the compile matrix, fast subset too."""
    found = set()
    for pkg in ("kernels/nova_kernels", "nova_engine"):
        for path in (ROOT / pkg).rglob("*.py"):
            for name in re.findall(r"@triton\.jit\s*\ndef (\w+)", path.read_text()):
                if name.endswith("_kernel"):
                    found.add(f"{path.stem}.{name}")
    specs = {f"{s.module}.{s.name}" for s in _aot.specs()}
    assert found and found == specs, (found - specs, specs - found)
    assert {x.kernel for x in _aot.launches(fast=True)} == specs


def test_fast_subset_compiles_for_sm90_and_sm80():
    rows = _aot.run_matrix(fast=True)
    assert len(rows) == 2 * len(_aot.launches(fast=True))
    assert {r["target"] for r in rows} == {"sm_90", "sm_80"}
    assert all(r["ok"] for r in rows), _failures(rows)
    for r in rows:  # the numbers were read, not defaulted
        assert 0 < r["registers"] <= 255 and r["n_spills"] == 0
        assert 0 <= r["shared_bytes"] <= r["smem_limit"]


def test_the_check_fails_on_a_spilling_config():
    """The old autotune table's (128, 256, 64) bf16 tile with 8 warps spills on both targets
    (255 registers): compile_one must report it, with the spill and the register count."""
    code = (
        "import json; from nova_kernels import _aot; "
        "c = dict(BLOCK_N=128, BLOCK_V=256, BLOCK_K=64, WITH_ENTROPY=True, CAST_FP32=False, "
        "DOT_PRECISION='tf32'); "
        "x = _aot.Launch('linear_logprobs._fwd_stats_kernel', 'old', '-', 'bf16', c, 8, 3); "
        "print(json.dumps(_aot.compile_one(x, 90)))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, env=env
    ).stdout
    row = json.loads(out)
    assert not row["ok"] and "spills" in row["error"], row
    assert row["n_spills"] > 0 and row["registers"] == 255


@pytest.mark.slow  # ~500 compiles: a few minutes on 2 cores
def test_full_matrix_compiles_for_sm90_and_sm80():
    rows = _aot.run_matrix(fast=False)
    assert len(rows) == 2 * len(_aot.launches())
    assert all(r["ok"] for r in rows), _failures(rows)


# --- linear_logprobs' config selector ------------------------------------------------------

VOCAB_SHARDS = [128256 // 8, 152064 // 4, 32000, 1000, 100]  # Llama-3 tp8, Qwen2 tp4, ...


def _launch_widths(N: int, vp: int) -> list[int]:
    """The vocab widths the launchers pass for N tokens: Vp (forward) and every backward
    chunk's n_cols (the last chunk may be partial)."""
    _, vc = ll._chunks(N, vp, ll._WORKSPACE_ELEMS)
    return sorted({min(vc, vp - c0) for c0 in range(0, vp, vc)})


def test_selector_keys_do_not_grow_with_tokens():
    keys, old_keys = set(), set()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for vp in VOCAB_SHARDS:
            for N in range(4, 4097, 3):
                keys.add(llc.selector_key("fwd", dtype, vp))
                for n_cols in _launch_widths(N, vp):
                    keys.add(llc.selector_key("bwd", dtype, n_cols))
                    old_keys.add((4096, n_cols, dtype))  # the old autotune key (H, n_cols)
    # 2 kernels x 2 dtype classes x 2 shape classes, whatever N
    assert len(keys) <= 8, sorted(keys)
    assert len(old_keys) > 100  # what the timing autotuner re-benchmarked for
    for key in keys:  # every key has a config of the table (the AOT check compiles them)
        assert llc.select(
            key[0], "fp32" if key[1] == "fp32" else "bf16", 1 if key[2] == "narrow" else 4096
        )


def test_selector_is_deterministic_across_processes():
    grid = [
        (name, dt, n)
        for name in ("fwd", "bwd")
        for dt in ("fp32", "bf16", "fp16")
        for n in (1, 64, 127, 128, 1000, 16032, 1 << 20)
    ]

    def picks():
        return [
            [c.kwargs, c.num_warps, c.num_stages]
            for c in (llc.select(name, dt, n) for name, dt, n in grid)
        ]

    here = picks()
    assert picks() == here
    code = (
        "import json, sys; from nova_kernels.ops import _linear_configs as c; "
        "g = json.loads(sys.argv[1]); "
        "print(json.dumps([[x.kwargs, x.num_warps, x.num_stages] "
        "for x in (c.select(*a) for a in g)]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(grid)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    assert json.loads(out) == json.loads(json.dumps(here))


def test_kernel_launch_uses_the_selector(monkeypatch):
    """Off the interpreter the launchers get the selector's config as plain meta-params (no
    autotuner); NOVA_AUTOTUNE=1 gives Triton's autotuner over the spill-free candidates, keyed
    on H only; the interpreter keeps its fixed small tiles."""
    assert ll._kernel("fwd", torch.bfloat16, 5)[1] == llc.INTERP_META
    monkeypatch.setattr(ll, "interpreting", lambda: False)
    monkeypatch.delenv("NOVA_AUTOTUNE", raising=False)
    for name, dtype, n_cols in [("fwd", torch.bfloat16, 16032), ("bwd", torch.float32, 77)]:
        kernel, meta = ll._kernel(name, dtype, n_cols)
        cfg = llc.select(name, dtype, n_cols)
        assert kernel is {"fwd": ll._fwd_stats_kernel, "bwd": ll._bwd_dlogits_kernel}[name]
        assert meta == {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    monkeypatch.setenv("NOVA_AUTOTUNE", "1")
    monkeypatch.setattr(ll, "_TUNED", {})
    tuned, meta = ll._kernel("bwd", torch.bfloat16, 4096)
    assert meta == {} and list(tuned.keys) == ["H"]
    want = llc.autotune_configs("bwd", torch.bfloat16)
    assert [str(c) for c in tuned.configs] == [str(c) for c in want]


def test_selector_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="unsupported input dtype"):
        llc.select("fwd", torch.float64, 100)
