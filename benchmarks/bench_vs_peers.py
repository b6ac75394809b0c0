"""Nova vs the trainers users would otherwise pick, end to end on one tiny Llama-shaped model:
SFT and DPO real tokens/s and peak memory of Nova's loop, TRL's SFTTrainer / DPOTrainer and
a plain Hugging Face training loop (the model's own forward + loss, torch AdamW), on the same
weights, data and order. Step-1 losses are checked equal (SFT: mean token NLL; DPO: log 2 at
the reference weights) before any timing counts.

    python -m benchmarks.bench_vs_peers            # CPU (fp32); TRL rows need the bench extra

Every step is timed interleaved: TRL's `train()` drives the rounds and, from a callback at
the end of each of its steps (its own step excluded from the timing), runs one step of the
plain loop and one of Nova, each timed on its own (A B C A B C ...). Without TRL the plain
loop and Nova alternate. All three see the same batch every step (the data set is one global
batch, so order cannot differ). Peak memory: one step of each after the timings
(`_common.peak_memory`, RSS high-water mark on CPU: weights and optimizer state excluded
once allocated, activations and gradients included).

Rows (benchmarks/results/vs_peers_cpu.csv): op sft_step / dpo_step, impl nova | trl |
hf_loop, shape (samples x tokens per step), metric real_tokens_per_s (p50/p20/p80 over
steps), peak_mem_bytes, step1_loss.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from benchmarks._common import peak_memory, results_path, write_rows

MODEL = dict(
    hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=2048, max_position_embeddings=4096,
    tie_word_embeddings=False,
)  # fmt: skip
LR = 1e-5


def _samples(n: int, length: int, vocab: int, seed: int = 0):
    from nova_engine.data.sample import Sample

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        mask = np.ones(length, dtype=np.uint8)
        mask[0] = 0  # the first token is never a target (HF: labels shift by one)
        out.append(Sample(rng.integers(4, vocab, length), mask, index=i))
    return out


def _hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    m.config.use_cache = False
    return m.train()


# ----------------------------------------------------------------------------- the three


def hf_loop_sft(model_dir, samples):
    """The plain loop: model(input_ids, labels=input_ids).loss, backward, AdamW."""
    model = _hf_model(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    ids = torch.tensor(np.stack([s.tokens for s in samples]))

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def nova_sft(model_dir, samples, capacity):
    from nova_engine.config import OptimConfig
    from nova_engine.parallel.state import initialize_parallel
    from nova_engine.train.data_source import PackedDataSource
    from nova_engine.train.engine import ModelEngine
    from nova_engine.train.loop import Loop
    from nova_engine.train.runner import ensure_process_group_env
    from nova_engine.train.stages.sft import SFTStage

    ensure_process_group_env()
    ps = initialize_parallel()
    optim = OptimConfig(lr=LR, schedule="constant", grad_clip=1.0)
    engine = ModelEngine.from_hf(model_dir, ps, optim=optim, total_steps=10_000)
    data = PackedDataSource(samples, global_batch_size=len(samples), micro_batch_tokens=capacity,
                            ps=ps, shuffle=False, max_steps=10_000)  # fmt: skip
    loop, stage = Loop(engine, data), SFTStage(ps)
    batch = data.rank_microbatches(0)  # the same global batch every step, packed once

    def step() -> float:
        return float(loop.train_step(stage, batch).metrics["loss"])

    return step


def trl_sft(model_dir, tok_dir, samples, out_dir, steps, on_step_end):
    """TRL's SFTTrainer on the pre-tokenized samples; `on_step_end()` runs after each of its
    steps (outside its timing). Returns (per-step seconds, step-1 loss)."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    ds = Dataset.from_dict({"input_ids": [s.tokens.tolist() for s in samples]})
    cfg = SFTConfig(
        output_dir=out_dir, per_device_train_batch_size=len(samples), max_steps=steps,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        max_length=len(samples[0]), packing=False, dataloader_num_workers=0, seed=0,
        bf16=False, fp16=False, disable_tqdm=True,
    )  # fmt: skip
    times, losses = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)
            on_step_end()

    class Recording(SFTTrainer):
        def compute_loss(self, *a, **k):
            out = super().compute_loss(*a, **k)
            losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
            return out

    trainer = Recording(model=_hf_model(model_dir), args=cfg, train_dataset=ds,
                        processing_class=AutoTokenizer.from_pretrained(tok_dir),
                        callbacks=[Timer()])  # fmt: skip
    trainer.train()
    return times, losses[0], trainer


# ----------------------------------------------------------------------------- driver


def _stats(tokens: int, secs: list[float]) -> tuple[float, float, float]:
    t = np.asarray(secs[1:] if len(secs) > 2 else secs)  # the first step warms up
    return tokens / np.median(t), tokens / np.quantile(t, 0.8), tokens / np.quantile(t, 0.2)


def bench_sft(root, tok_dir, length, n, steps, rows, use_trl):
    from nova_engine.model.tiny import build_tiny_hf_model

    model_dir = os.path.join(root, "model")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        build_tiny_hf_model(model_dir, "llama", seed=0, **MODEL)
    samples = _samples(n, length, MODEL["vocab_size"])
    tokens = n * length
    hf = hf_loop_sft(model_dir, samples)
    nova = nova_sft(model_dir, samples, capacity=tokens)
    secs: dict[str, list[float]] = {"hf_loop": [], "nova": [], "trl": []}
    first: dict[str, float] = {}

    def others():
        for name, fn in (("hf_loop", hf), ("nova", nova)):
            t0 = time.perf_counter()
            loss = fn()
            secs[name].append(time.perf_counter() - t0)
            first.setdefault(name, loss)

    if use_trl:
        secs["trl"], first["trl"], _ = trl_sft(model_dir, tok_dir, samples,
                                               os.path.join(root, "trl"), steps, others)  # fmt: skip
    else:
        del secs["trl"]
        for _ in range(steps):
            others()
    ref = first["hf_loop"]
    for name, loss in first.items():
        if abs(loss - ref) > 1e-4 * abs(ref):
            raise AssertionError(f"step-1 SFT loss of {name} {loss:.6f} != hf_loop {ref:.6f}")
    mem = {"hf_loop": peak_memory(hf), "nova": peak_memory(nova)}
    shape = f"{n}x{length} tokens,{MODEL['hidden_size']}h{MODEL['num_hidden_layers']}L"
    for name, s in secs.items():
        p50, p20, p80 = _stats(tokens, s)
        base = dict(op="sft_step", impl=name, shape=shape, mode="step")
        rows.append({**base, "metric": "real_tokens_per_s", "p50": p50, "p20": p20, "p80": p80})
        rows.append({**base, "metric": "step1_loss", "p50": first[name]})
        if name in mem:
            rows.append({**base, "metric": "peak_mem_bytes", "p50": float(mem[name])})
    tps = {name: _stats(tokens, s)[0] for name, s in secs.items()}
    print(f"SFT {shape}: " + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in tps.items())
          + f"; nova/hf_loop {tps['nova'] / tps['hf_loop']:.2f}x"
          + (f", nova/trl {tps['nova'] / tps['trl']:.2f}x" if "trl" in tps else "")
          + f"; step-1 loss {ref:.5f}; peak MiB "
          + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in mem.items()))  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--no-trl", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    try:
        import trl  # noqa: F401

        use_trl = not args.no_trl
    except ImportError:
        print("trl not installed (pip install -e '.[bench]'): plain loop vs Nova only")
        use_trl = False
    from nova_engine.data.tiny import build_tiny_tokenizer

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as root:
        tok_dir = build_tiny_tokenizer(os.path.join(root, "tok"))
        for length, n in ((512, 8), (128, 32)):  # the same 4096 tokens per step
            bench_sft(root, tok_dir, length, n, args.steps, rows, use_trl)
    path = results_path("vs_peers")
    write_rows(path, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
