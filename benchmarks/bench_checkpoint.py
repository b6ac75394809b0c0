"""Step time with a checkpoint every step: synchronous vs asynchronous saves
(`checkpoint.async_save`) in format torch and format dist, world of one, random Llama
weights, nothing downloaded.

One timed call = a block of `--block` SFT steps, each followed by a save of the whole
training state (model, Adam moments, schedule, data position, RNG; no hf/ export), and
for async the wait for the last write, so that no write spills into the next call; sync
and async blocks are timed interleaved (`time_interleaved`). Rows per impl: seconds per
step (block time / block steps), and peak_mem_bytes: the highest over the timed blocks
of the process's resident high-water mark above its level before the block (the host
buffers are reused across saves, so this is what saving costs on top of them), plus the
peak of the first save (mode first_save: it allocates the host buffers, one copy of the
state). Each block is measured once for both (`peak_memory` wraps the timed call).
A no-save block (impl none) gives the step time without checkpoints. Format dist
(megatron dist_checkpointing, `checkpoint.format: dist`): impls dist_sync and dist_async
(its save planning stays on the step; the files are written by the saver's thread). With
`--formats dist` alone the first save is a dist one and the shape's state is the bytes of
that checkpoint on disk (with torch: the host copies of a format-torch save).

    python -m benchmarks.bench_checkpoint                 # tiny and ~1 GB models, both formats
    python -m benchmarks.bench_checkpoint --models tiny   # seconds
    python -m benchmarks.bench_checkpoint --models tiny --formats dist --append

--models big: Llama-shaped, hidden 1024, 16 layers, GQA 16/8, vocab 32000 untied: 254M
parameters, 1.0 GB of fp32 weights, a 3.0 GB checkpoint with the Adam moments; each step
trains on 64 tokens so that the save, not the step, dominates on a 2-core CPU.

Rows: benchmarks/results/checkpoint_<cuda|cpu>.csv.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile

import numpy as np
import torch

from benchmarks._common import peak_memory, results_path, time_interleaved, write_rows

MODELS = {
    "tiny": dict(
        hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=2048, max_position_embeddings=256,
    ),
    "big": dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=256,
    ),
}  # fmt: skip
# (samples per step, tokens per sample, block steps, rounds)
RUNS = {"tiny": (8, 32, 4, 6), "big": (2, 32, 2, 2)}


def _samples(n: int, length: int, vocab: int):
    from nova_engine.data.sample import Sample

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        mask = np.ones(length, dtype=np.uint8)
        mask[0] = 0
        out.append(Sample(rng.integers(0, vocab, length), mask, index=i))
    return out


def _state_bytes(loop) -> int:
    from nova_engine.train.checkpoint import host_buffers

    return sum(b.numel() * b.element_size() for b in host_buffers(loop).buffers.values())


def bench_model(name: str, ps, root: str, formats=("torch", "dist")) -> list[dict]:
    from nova_engine.config import OptimConfig
    from nova_engine.model.arch import arch_from_hf_config
    from nova_engine.model.tiny import tiny_hf_config
    from nova_engine.train import checkpoint as ck
    from nova_engine.train import checkpoint_io as cio
    from nova_engine.train.async_checkpoint import AsyncSaver
    from nova_engine.train.data_source import PackedDataSource
    from nova_engine.train.engine import ModelEngine
    from nova_engine.train.loop import Loop
    from nova_engine.train.stages.sft import SFTStage

    per_step, length, block, rounds = RUNS[name]
    cfg = tiny_hf_config("llama", tie_word_embeddings=False, **MODELS[name]).to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    arch = arch_from_hf_config(cfg)
    total = block * 3 * (rounds + 2) + 1  # every block of every impl, warm-ups included
    data = PackedDataSource(
        _samples(per_step * 4, length, arch.vocab_size), global_batch_size=per_step,
        micro_batch_tokens=per_step * length, ps=ps, epochs=total, max_steps=total,
    )  # fmt: skip
    optim = OptimConfig(lr=1e-5, schedule="constant")
    engine = ModelEngine(arch, ps, optim=optim, total_steps=total, precision="fp32")
    loop, stage = Loop(engine, data), SFTStage(ps)
    saver, dsaver = AsyncSaver(), AsyncSaver(format="dist")

    def steps(save) -> None:
        for _ in range(block):
            loop.fit(stage, stop_after=loop.step + 1)
            save()
        saver.wait()
        dsaver.wait()

    impls = {"none": lambda: steps(lambda: None)}
    if "torch" in formats:
        impls["sync"] = lambda: steps(lambda: ck.save_checkpoint(root, loop, keep_last=1))
        impls["async"] = lambda: steps(lambda: saver.save(root, loop, keep_last=1))
    if "dist" in formats:
        impls["dist_sync"] = lambda: steps(
            lambda: ck.save_checkpoint(root, loop, keep_last=1, format="dist")
        )
        impls["dist_async"] = lambda: steps(lambda: dsaver.save(root, loop, keep_last=1))
    loop.fit(stage, stop_after=1)  # the Adam moments exist from the first step on
    if "torch" in formats:  # the state: the host copies a format-torch save makes
        first = peak_memory(lambda: ck.save_checkpoint(root, loop, keep_last=1))
        state = _state_bytes(loop)
    else:  # the state: a format-dist checkpoint's bytes on disk
        first = peak_memory(lambda: ck.save_checkpoint(root, loop, keep_last=1, format="dist"))
        state = sum(cio.read_manifest(cio.latest_complete(root))["files"].values())
    print(f"{name}: {arch.num_params / 1e6:.0f}M parameters, checkpoint state "
          f"{state / 2**30:.2f} GiB per save")  # fmt: skip
    peaks: dict[str, list[int]] = {k: [] for k in impls}
    timed = {k: (lambda k=k, f=f: peaks[k].append(peak_memory(f))) for k, f in impls.items()}
    times = time_interleaved(timed, warmup=1, reps=rounds)
    shape = f"{arch.num_params / 1e6:.0f}M params,{state / 2**30:.2f} GiB state"
    rows = [dict(op="checkpoint", impl="sync" if "torch" in formats else "dist_sync",
                 shape=shape, mode="first_save", metric="peak_mem_bytes", p50=first)]  # fmt: skip
    for impl, t in times.items():
        base = dict(op="checkpoint", impl=impl, shape=shape, mode="step")
        p50, p20, p80 = (x / block for x in t)
        rows.append({**base, "metric": "seconds", "p50": p50, "p20": p20, "p80": p80})
        rows.append({**base, "metric": "peak_mem_bytes", "p50": max(peaks[impl][1:])})
        print(f"  {impl:10s} {p50:.3f} s/step (p20 {p20:.3f}, p80 {p80:.3f})")

    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    ap.add_argument("--formats", nargs="+", choices=("torch", "dist"), default=["torch", "dist"])
    ap.add_argument("--out", default=None, help="CSV path (default: results_path)")
    ap.add_argument("--append", action="store_true", help="add the rows to the CSV")
    args = ap.parse_args(argv)
    from nova_engine.parallel.state import initialize_parallel
    from nova_engine.train.runner import ensure_process_group_env

    ensure_process_group_env()
    ps = initialize_parallel()
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        root = tempfile.mkdtemp(prefix=f"nova-bench-ckpt-{name}-", dir=args.dir)
        try:
            rows += bench_model(name, ps, root, tuple(args.formats))
            gc.collect()
        finally:
            shutil.rmtree(root, ignore_errors=True)
    path = args.out or results_path("checkpoint")
    write_rows(path, rows, append=args.append)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
