"""benchmarks/bench_train_throughput.py: the 1b preset is the Llama-3.2-1B shape (its
parameter count equals transformers' model of that config, built on the meta device), the
MFU's FLOPs per token are 6 N + 12 L H S counted by hand, and a tiny run writes tokens/s,
peak memory and an MFU row consistent with them."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _arch(dims):
    from nova_engine.model.arch import arch_from_hf_config
    from nova_engine.model.tiny import tiny_hf_config

    cfg = tiny_hf_config("llama", tie_word_embeddings=False, **dims)
    d = cfg.to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    return cfg, arch_from_hf_config(d)


def _bench(monkeypatch):
    import importlib

    monkeypatch.syspath_prepend(os.path.abspath(ROOT))  # the benchmarks package
    return importlib.import_module("benchmarks.bench_train_throughput")


def test_1b_preset_and_flops_by_hand(monkeypatch):
    from transformers import LlamaForCausalLM

    b = _bench(monkeypatch)

    cfg, arch = _arch(b.GPU_MODEL)
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    n_hf = sum(p.numel() for p in hf.parameters())
    assert arch.num_params == n_hf
    H, L, V, I = 2048, 16, 128256, 8192  # noqa: E741
    kv = 8 * (H // 32)  # 8 KV heads of 64
    layer = H * H * 2 + 2 * H * kv + 3 * H * I + 2 * H  # q, o, k+v, MLP, two norms
    assert n_hf == L * layer + 2 * V * H + H  # + embedding, LM head, final norm (1.50B)
    lengths = [7, 30, 100]
    samples = b._samples(torch.tensor(lengths).numpy(), V)
    s_eff = sum(n * n for n in lengths) / sum(lengths)
    want = 6 * (n_hf - V * H) + 12 * L * H * s_eff  # the embedding lookup is no matmul
    assert b._flops_per_token(arch, samples) == pytest.approx(want, rel=1e-12)


@pytest.mark.slow  # a subprocess that trains (world 1, ~20 s)
def test_tiny_run_writes_consistent_rows(tmp_path, monkeypatch):
    b = _bench(monkeypatch)

    out = tmp_path / "tt.csv"
    cmd = [sys.executable, "-m", "benchmarks.bench_train_throughput", "--model", "tiny",
           "--steps", "1", "--samples", "24", "--no-padded", "--peak-tflops", "0.5",
           "--out", str(out)]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["metric"]: r for r in csv.DictReader(open(out))}
    assert set(rows) == {"tokens_per_s", "peak_mem_bytes", "mfu"}
    tps, mem, mfu = (float(rows[k]["p50"]) for k in ("tokens_per_s", "peak_mem_bytes", "mfu"))
    assert tps > 0 and mem > 2**20
    _, arch = _arch(b.CPU_MODEL)
    samples = b._samples(b._lengths(24, 40, 256), arch.vocab_size)
    assert mfu == pytest.approx(tps * b._flops_per_token(arch, samples) / 0.5e12, rel=1e-9)
    assert "MFU" in proc.stdout and "peak memory" in proc.stdout
