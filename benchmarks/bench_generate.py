"""Generation throughput: Nova's KV-cache decoding on the engine's megatron chunks against
`transformers` `generate` (its default KV cache) on the same model, prompts and settings.

Greedy, no stop token, exactly `--new` tokens per row (128), batches of 1, 8 and 32 rows
with prompts of 64 and 512 tokens, plus a ragged batch of 32 prompts of 64..512 tokens
(transformers left-pads the batch to its longest prompt; Nova cuts length-sorted batches,
see nova_engine.generate.decode). Timed interleaved (A B A B ...); rows per impl and shape:
seconds, tokens_per_s (generated tokens / wall time), peak_mem_bytes, and for Nova
speedup_vs_transformers and token_agreement (fraction of rows whose greedy tokens equal
transformers').

    python -m benchmarks.bench_generate             # GPU: a ~1.2B Llama in bf16
    python -m benchmarks.bench_generate --quick     # CPU: a small Llama in fp32 (minutes)

Rows: benchmarks/results/generate_<cuda|cpu>.csv.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from benchmarks._common import finish, peak_memory, time_interleaved

GPU_MODEL = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
)  # fmt: skip
CPU_MODEL = dict(
    hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, vocab_size=8192, max_position_embeddings=1024,
)  # fmt: skip


def _prompts(batch: int, lengths, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = list(lengths) if isinstance(lengths, (list, tuple)) else [lengths] * batch
    return [torch.randint(10, vocab, (n,), generator=g).tolist() for n in lens]


def _hf_runner(model, prompts: list[list[int]], new: int, device):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)

    @torch.no_grad()
    def run():
        out = model.generate(
            input_ids=ids, attention_mask=attn, max_new_tokens=new, min_new_tokens=new,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip
        return out[:, width:].tolist()

    return run


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU model and shapes")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new", type=int, default=128, help="new tokens per row")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU default 1)")
    ap.add_argument("--shapes", default=None, help="e.g. 32x64,32x512,32xragged")
    args = ap.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    quick = args.quick or not on_gpu
    # one thread per process by default on CPU: on a shared machine, two-thread ops of a
    # busy process wait on a descheduled thread (both impls alike, but noisier)
    torch.set_num_threads(args.threads or (torch.get_num_threads() if on_gpu else 1))
    device = torch.device("cuda" if on_gpu else "cpu")
    from nova_engine.generate import SamplingParams, generate
    from nova_engine.model.arch import load_arch
    from nova_engine.model.build import build_model
    from nova_engine.model.hf_io import load_hf_weights
    from nova_engine.model.tiny import build_tiny_hf_model
    from nova_engine.parallel.state import initialize_parallel
    from nova_engine.train.runner import ensure_process_group_env

    cfg = CPU_MODEL if quick else GPU_MODEL
    precision = "fp32" if quick else "bf16"
    dtype = torch.float32 if quick else torch.bfloat16
    tmp = tempfile.mkdtemp(prefix="bench_generate_")
    hf = build_tiny_hf_model(tmp, "llama", **cfg).to(device=device, dtype=dtype).eval()
    ensure_process_group_env()
    ps = initialize_parallel()
    arch = load_arch(tmp)
    chunks = build_model(arch, ps, precision=precision)
    load_hf_weights(chunks, arch, ps, tmp)
    params = SamplingParams(temperature=0.0, max_new_tokens=args.new)
    n_params = sum(p.numel() for p in hf.parameters())
    shapes = args.shapes.split(",") if args.shapes else [
        f"{b}x{p}" for b in (1, 8, 32) for p in (64, 512)
    ] + ["32xragged"]  # fmt: skip
    rows: list[dict] = []
    for k, shape in enumerate(shapes):
        b, p = shape.split("x")
        b = int(b)
        lengths = [64 + (448 * i) // max(b - 1, 1) for i in range(b)] if p == "ragged" else int(p)
        prompts = _prompts(b, lengths, cfg["vocab_size"], seed=k)
        tag = f"B{b}xP{p}+{args.new} ({n_params / 1e6:.0f}M {precision}, {torch.get_num_threads()} thr)"
        impls = {
            "nova": lambda pr=prompts: [
                o[0].tokens for o in generate(chunks, ps, arch, pr, params)
            ],
            "transformers": _hf_runner(hf, prompts, args.new, device),
        }
        agree = sum(a == c for a, c in zip(impls["nova"](), impls["transformers"]())) / b
        times = time_interleaved(impls, warmup=0, reps=args.reps)  # (warmed by the check)
        for impl, fn in impls.items():
            t = times[impl]
            base = dict(op="generate", impl=impl, shape=tag, mode="generate")
            toks = b * args.new
            rows.append({**base, "metric": "seconds", "p50": t[0], "p20": t[1], "p80": t[2]})
            rows.append({**base, "metric": "tokens_per_s", "p50": toks / t[0],
                         "p20": toks / t[2], "p80": toks / t[1]})  # fmt: skip
            rows.append({**base, "metric": "peak_mem_bytes", "p50": peak_memory(fn)})
        base = dict(op="generate", impl="nova", shape=tag, mode="generate")
        speedup = times["transformers"][0] / times["nova"][0]
        rows.append({**base, "metric": "speedup_vs_transformers", "p50": speedup})
        rows.append({**base, "metric": "token_agreement", "p50": agree})
        print(f"{tag}: nova {b * args.new / times['nova'][0]:.0f} tok/s, transformers "
              f"{b * args.new / times['transformers'][0]:.0f} tok/s, x{speedup:.2f}, "
              f"greedy agreement {agree:.2f}", flush=True)  # fmt: skip
    finish("generate", rows)


if __name__ == "__main__":
    main()
