"""The CPU packed attention kernel (csrc/attention.cpp) built with AddressSanitizer and
UndefinedBehaviorSanitizer and run over every instruction-set build, head dim and segment
shape class (tests/engine/csrc/attention_sanitize.cpp): no out-of-bounds access, no UB, no
NaN from finite inputs. Each workspace buffer is its own allocation in this build
(NOVA_ATTN_SEPARATE_BUFFERS), so an overrun of one is caught too."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_attention_kernel_under_sanitizers(tmp_path):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found")
    exe = tmp_path / "attention_sanitize"
    build = [
        cxx, "-std=c++17", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
        "-fno-omit-frame-pointer", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi",
        "-DNOVA_ATTN_SEPARATE_BUFFERS",
        f"-I{ROOT}/csrc", f"{ROOT}/tests/engine/csrc/attention_sanitize.cpp",
        f"{ROOT}/csrc/attention.cpp", "-o", str(exe),
    ]  # fmt: skip
    r = subprocess.run(build, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1", "OMP_NUM_THREADS": "3"}
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and r.stdout.startswith("ok:"), (r.stdout + r.stderr)[-3000:]
