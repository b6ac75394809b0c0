"""`nova doctor` on this (CPU) machine, and `make install-gpu`'s commands (#32 item 3).

doctor: every finding and every engine choice has its line, and the values agree with what
the process itself sees (torch's version and CUDA build, the installed megatron-core,
Triton's version, NOVA_KERNELS' backend, the fusion switches off without CUDA) — read
independently here, not from doctor's own helpers. install-gpu: never run here (it would
install CUDA torch); `make -n` shows that every pip call is pinned, binary-only unless the
from-source switch is set, and separate from the CPU venv.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess

import pytest
import torch

from nova_engine import cli

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
FOUND = ("python", "torch", "cuda (torch build)", "gpu", "nccl", "triton", "triton target",
         "megatron-core", "transformers", "transformer-engine", "flash-attn", "apex",
         "liger-kernel")  # fmt: skip
ENGINE = ("attention (training)", "attention (generation)", "lm-head kernels",
          "transformer-engine spec", "fusions", "dp overlap")  # fmt: skip


def _lines(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^  (.+?):\s+(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def test_doctor_lines_on_cpu(capsys, monkeypatch):
    import triton

    monkeypatch.delenv("NOVA_KERNELS", raising=False)
    assert cli.main(["doctor"]) == 0
    cap = capsys.readouterr()
    got = _lines(cap.out)
    assert set(FOUND) | set(ENGINE) <= set(got), sorted(set(FOUND) | set(ENGINE) - set(got))
    assert got["torch"] == torch.__version__
    assert got["megatron-core"] == md.version("megatron-core")
    assert got["triton"] == triton.__version__
    assert not torch.cuda.is_available()  # this file's expectations are the CPU ones
    assert got["gpu"] == "none" and got["cuda (torch build)"].startswith("none")
    assert got["transformer-engine spec"].startswith("off")
    assert got["lm-head kernels"].startswith("torch")
    assert "on" not in re.findall(r"=(on|off)", got["fusions"])
    assert "overlap_grad_reduce=off" in got["dp overlap"]
    for name in ("transformer-engine", "flash-attn", "apex", "liger-kernel"):
        have = any(d.metadata["Name"].lower().replace("_", "-") == name for d in md.distributions())
        assert (got[name] == "not installed") == (not have), (name, got[name])
    assert "interpreter" in got["triton target"] or "no GPU driver" in got["triton target"]
    assert "UserWarning" not in cap.err and "Transformer Engine" not in cap.err


def test_doctor_json_and_backend_override(capsys, monkeypatch):
    monkeypatch.setenv("NOVA_KERNELS", "triton")
    assert cli.main(["doctor", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert set(FOUND) <= set(obj["found"]) and set(ENGINE) <= set(obj["engine"])
    assert obj["engine"]["lm-head kernels"].startswith("triton")


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_install_gpu_is_pinned_and_binary_only():
    out = subprocess.run(["make", "-n", "install-gpu"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = out.stdout.replace("\\\n", " ")
    pips = [ln for ln in text.splitlines() if " -m pip install" in ln]
    assert len(pips) >= 3
    assert all(".venv-gpu/bin/python" in ln for ln in pips)  # never the CPU .venv
    for ln in pips:
        if "--upgrade" in ln:  # pip, setuptools, wheel themselves
            continue
        words = ln.split(" install ", 1)[1].split(";")[0].split()
        pkgs = [w.strip("'") for i, w in enumerate(words)
                if not w.startswith("-") and words[i - 1] != "-e" and w not in ("fi", "\\")]  # fmt: skip
        assert pkgs, ln
        for p in pkgs:  # every requirement is pinned with ==
            assert "==" in p, (p, ln)
    default = [ln for ln in pips if "GPU_BUILD_FROM_SOURCE" not in ln and "flash-attn" not in ln]
    for ln in default[1:]:  # after pip/setuptools themselves: wheels only
        assert "--only-binary=:all:" in ln, ln
    assert any("torch==2.13.0" in ln for ln in default)
    assert "cpu" not in " ".join(default).lower().replace("cpu_count", "")
    assert 'if [ "0" = 1 ]' in text  # the source builds stay off by default
    assert "nova_engine.cli doctor" in text
    src = subprocess.run(["make", "-n", "install-gpu", "GPU_BUILD_FROM_SOURCE=1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    assert "transformer-engine[pytorch,core_cu13]==2.20.2" in src and "flash-attn==" in src


def test_doctor_gpu_branch_with_a_faked_cuda(monkeypatch):
    """No GPU here: the CUDA branch of doctor's report with torch.cuda faked (an H100, NCCL
    2.27.3): it names the GPU and NCCL, and the engine's GPU choices come from the same
    selectors a GPU run uses (torch's varlen attention, Triton LM head, fusions and DP
    overlap on where their kernels exist, no TE spec without Transformer Engine)."""
    from types import SimpleNamespace

    from nova_engine.tools import doctor

    props = SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * 2**30, major=9,
                            minor=0)  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 27, 3))
    monkeypatch.delenv("NOVA_KERNELS", raising=False)
    f, c = doctor.found(), doctor.chosen()
    assert f["gpu"] == "8 x NVIDIA H100 80GB HBM3 (80 GiB, sm_90)" and f["nccl"] == "2.27.3"
    assert "varlen_attn" in c["attention (training)"]
    assert c["lm-head kernels"].startswith("triton")
    assert c["transformer-engine spec"].startswith("off")  # not installed here
    assert "masked_softmax_fusion=on" in c["fusions"] and "apply_rope_fusion=off" in c["fusions"]
    assert c["dp overlap"].startswith("overlap_grad_reduce=on, overlap_param_gather=on")
