"""End-to-end training throughput on a Llama-shaped model (random weights, world of one):

1. packed vs padded: forward+backward of the same samples (log-normal lengths) as packed THD
   micro-batches of `capacity` tokens, and as right-padded [B, S] batches of the same token
   budget (B = capacity // longest sample, padded to the longest of each batch, arrival
   order), each through the SFT loss (hidden states -> linear_cross_entropy), timed
   interleaved (packed, padded, packed, ...). Reported in real (non-padding) tokens/s: the
   padding FLOPs packing saves.
2. SFT steps: the engine's trainer (megatron schedules + optimizer, packing, the SFT stage)
   for a few steps; tokens/s, MFU and the peak memory of the steps (CUDA: the allocator's
   peak; CPU: the process's resident high-water mark).
   MFU = tokens/s * (6 N + 12 L H S) / peak: N the parameters in matmuls (LM head included,
   embedding lookup not), S the attention span per token of the packed documents
   (nova_engine.train.metrics.flops_per_token); peak = dense bf16 FLOP/s of the GPU by its
   name (H100 SXM / H200: 989 TFLOP/s) or --peak-tflops.

    python -m benchmarks.bench_train_throughput                 # GPU: --model 1b, bf16
    python -m benchmarks.bench_train_throughput --model tiny    # CPU: a tiny Llama, fp32
    python -m benchmarks.bench_train_throughput --model 1b --steps 4 --no-padded   # GPU smoke

--model 1b: Llama-3.2-1B-like shape (hidden 2048, 16 layers, GQA 32/8, vocab 128256, untied
LM head: 1.50B parameters with the head), random init, nothing downloaded. --quick = --model
tiny.

Rows: benchmarks/results/train_throughput_<cuda|cpu>.csv.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks._common import results_path, sync, time_interleaved, write_rows

# Llama-3.2-1B-like (hidden 2048, 16 layers, GQA 32/8, vocab 128256): 1.24B parameters + head
GPU_MODEL = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
)
CPU_MODEL = dict(
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=2048,
    max_position_embeddings=1024,
)


def _lengths(n: int, median: float, max_len: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(median), 0.8, n), 8, max_len).astype(np.int64)


def _samples(lengths: np.ndarray, vocab: int, seed: int = 0):
    from nova_engine.data.sample import Sample

    rng = np.random.default_rng(seed + 1)
    out = []
    for i, n in enumerate(lengths):
        mask = np.ones(n, dtype=np.uint8)
        mask[0] = 0
        out.append(Sample(rng.integers(0, vocab, n), mask, index=i))
    return out


def packed_vs_padded(model, ps, samples, capacity: int, reps: int) -> list[dict]:
    """Real tokens/s of fwd+bwd for the packed and the padded layout of `samples`."""
    from nova_engine.data.packing import PackedBatch, PackingPlan
    from nova_engine.model.packed import packed_forward
    from nova_kernels import linear_cross_entropy

    dev = ps.device
    plan = PackingPlan.from_samples(samples, capacity=capacity)
    packed = [plan.make_batch(samples, ids).to(dev) for ids in plan.result.bins()]
    bsz = max(1, capacity // max(len(s) for s in samples))
    padded = []
    for i in range(0, len(samples), bsz):
        group = samples[i : i + bsz]
        width = max(len(s) for s in group)
        rows = [PackedBatch.from_samples([s], pad_to_length=width) for s in group]
        padded.append(
            (
                torch.stack([r.tokens for r in rows]).to(dev),
                torch.stack([r.labels for r in rows]).to(dev),
            )
        )
    weight = model.lm_head_weight()
    n_real = sum(len(s) for s in samples)

    def run_packed():
        for mb in packed:
            h = packed_forward(model, mb)
            linear_cross_entropy(h.reshape(-1, h.shape[-1]), weight, mb.labels).backward()

    def run_padded():
        for ids_BS, labels_BS in padded:
            pos = torch.arange(ids_BS.shape[1], device=dev).expand_as(ids_BS)
            h_SBH = model(ids_BS, pos, attention_mask=None)
            labels_SB = labels_BS.transpose(0, 1).reshape(-1)
            linear_cross_entropy(h_SBH.reshape(-1, h_SBH.shape[-1]), weight, labels_SB).backward()

    rows = []
    # A B A B ...: drift of a shared machine falls on both layouts alike
    times = time_interleaved({"packed": run_packed, "padded": run_padded}, warmup=1, reps=reps)
    model.zero_grad(set_to_none=True)
    for impl, (p50, p20, p80) in times.items():
        slots = (
            sum(mb.num_tokens for mb in packed)
            if impl == "packed"
            else sum(ids.numel() for ids, _ in padded)
        )
        base = dict(op="train_fwd_bwd", impl=impl, mode="fwd_bwd", shape=f"{len(samples)} samples")
        rows.append(
            {
                **base,
                "metric": "real_tokens_per_s",
                "p50": n_real / p50,
                "p20": n_real / p80,
                "p80": n_real / p20,
            }
        )
        rows.append({**base, "metric": "real_token_fraction", "p50": n_real / slots})
        print(f"{impl:7s} {n_real / p50:12.0f} real tokens/s  ({n_real / slots:.1%} of slots real)")
    return rows


def _peak_tflops(arg: float | None) -> float | None:
    """Dense bf16 peak of this device in FLOP/s: --peak-tflops, else the GPU's by name."""
    from nova_engine.train.metrics import peak_flops_for

    if arg is not None:
        return arg * 1e12
    return peak_flops_for(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


def _flops_per_token(arch, samples) -> float:
    """6 N + 12 L H S (see the module docstring) for these packed samples."""
    from nova_engine.train.metrics import effective_seq_len, flops_per_token

    n_params = arch.num_params - arch.vocab_size * arch.hidden_size  # no embedding lookup
    if arch.tie_word_embeddings:
        n_params += arch.vocab_size * arch.hidden_size  # the LM head matmul still counts
    seq = effective_seq_len([len(s) for s in samples])
    return flops_per_token(n_params, arch.num_layers, arch.hidden_size, seq)


def _peak_mem_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_mem() -> int:
    """Peak memory since `_peak_mem_reset` (CUDA allocator) / of the process (CPU VmHWM)."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def sft_steps(
    arch, ps, samples, capacity: int, steps: int, precision: str, peak: float | None
) -> list[dict]:
    """The trainer's SFT steps; tokens/s, MFU (with a known peak) and peak memory over
    steps 2..N+1 (step 1 warms up)."""
    from nova_engine.config import OptimConfig
    from nova_engine.train.data_source import PackedDataSource
    from nova_engine.train.engine import ModelEngine
    from nova_engine.train.loop import Loop
    from nova_engine.train.stages.sft import SFTStage

    gbs = max(1, len(samples) // (steps + 1))
    batcher = PackedDataSource(
        samples, global_batch_size=gbs, micro_batch_tokens=capacity, ps=ps, max_steps=steps + 1
    )
    optim = OptimConfig(lr=1e-5, schedule="constant")
    engine = ModelEngine(arch, ps, optim=optim, total_steps=steps + 1, precision=precision)
    trainer = Loop(engine)  # what runner.loop_for_run builds, without a RunConfig
    stage = SFTStage(ps)
    _peak_mem_reset()
    trainer.train_step(stage, batcher.rank_microbatches(0))  # warmup (allocations, autotune)
    sync()
    t0, tokens = time.perf_counter(), 0
    for step in range(1, steps + 1):
        tokens += trainer.train_step(stage, batcher.rank_microbatches(step)).tokens
    sync()
    secs = time.perf_counter() - t0
    mem = _peak_mem()
    base = dict(op="sft_step", impl="nova", mode="train", shape=f"gbs={gbs},cap={capacity}")
    rows = [
        {**base, "metric": "tokens_per_s", "p50": tokens / secs},
        {**base, "metric": "peak_mem_bytes", "p50": mem},
    ]
    msg = f"SFT steps: {tokens / secs:.0f} tokens/s"
    if peak is not None:
        fpt = _flops_per_token(arch, batcher.samples)
        mfu = tokens / secs * fpt / (peak * ps.world_size)
        rows.append({**base, "metric": "mfu", "p50": mfu, "peak_tflops": peak / 1e12})
        msg += f", MFU {mfu:.1%} (of {peak / 1e12:.0f} TFLOP/s, {fpt / 1e9:.2f} GFLOP/token)"
    else:
        msg += ", MFU n/a (no known peak: --peak-tflops)"
    print(f"{msg}, peak memory {mem / 2**30:.2f} GiB")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("tiny", "1b"), default=None,
                    help="tiny (CPU, fp32) or 1b (Llama-3.2-1B-like, bf16); default: 1b on "
                    "CUDA, tiny otherwise")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="= --model tiny")
    ap.add_argument("--reps", type=int, default=3, help="rounds of packed vs padded")
    ap.add_argument("--steps", type=int, default=None, help="timed SFT steps (after 1 warmup)")
    ap.add_argument("--samples", type=int, default=None, help="samples drawn (log-normal)")
    ap.add_argument("--no-padded", action="store_true", help="skip packed vs padded")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="dense bf16 peak for MFU (default: the GPU's by name)")  # fmt: skip
    ap.add_argument("--out", default=None, help="CSV path (default: benchmarks/results/)")
    args = ap.parse_args(argv)
    from nova_engine.model.arch import arch_from_hf_config
    from nova_engine.model.build import build_model
    from nova_engine.model.tiny import tiny_hf_config
    from nova_engine.parallel.state import initialize_parallel
    from nova_engine.train.runner import ensure_process_group_env

    model = args.model or ("tiny" if args.quick or not torch.cuda.is_available() else "1b")
    big = model == "1b"
    dims, precision = (GPU_MODEL, "bf16") if big else (CPU_MODEL, "fp32")
    n, median, max_len, capacity, steps = (
        (512, 600, 4096, 16384, 5) if big else (96, 40, 256, 1024, 3)
    )
    n, steps = args.samples or n, args.steps or steps
    cfg = tiny_hf_config("llama", tie_word_embeddings=False, **dims).to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    arch = arch_from_hf_config(cfg)
    ensure_process_group_env()
    ps = initialize_parallel()
    samples = _samples(_lengths(n, median, max_len), arch.vocab_size)
    print(f"model {model}: {arch.num_params / 1e6:.1f}M parameters, {precision}, on {ps.device}")
    rows = []
    if not args.no_padded:
        m = build_model(arch, ps, precision=precision)[0]
        m.return_hidden = True
        rows += packed_vs_padded(m, ps, samples, capacity, args.reps)
        del m
    rows += sft_steps(arch, ps, samples, capacity, steps, precision, _peak_tflops(args.peak_tflops))
    for r in rows:
        r["shape"] = f"{arch.num_params / 1e6:.0f}M params,{r['shape']}"
    path = args.out or results_path("train_throughput")
    write_rows(path, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
