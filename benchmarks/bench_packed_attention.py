"""Packed causal attention (forward + backward) by segment: cost per token vs sample length
and micro-batch size.

    python -m benchmarks.bench_packed_attention            # GPU: bf16, varlen kernels
    python -m benchmarks.bench_packed_attention --quick    # CPU: fp32, small heads

A micro-batch of T tokens packs T/L samples of L tokens (and one ragged, log-normal mix).
Impls, timed interleaved (`_common.time_interleaved`):
- nova: `nova_engine.model.attention.packed_attention` (CPU / fp32: Nova's C++ kernel,
  csrc/attention.cpp; CUDA bf16: torch varlen / flash varlen);
- nova_grouped_sdpa (CPU): the CPU fallback for other dtypes and head dims, and the CPU
  fp32 path before the kernel: segments grouped by length, one ATen SDPA is_causal call
  (CPU flash attention) per group;
- dense_mask: SDPA over the whole micro-batch with the [T, T] block-causal mask (what
  Nova's CPU path did before; its cost is the square of T whatever the samples), only where
  T <= 4096 on CPU (the mask path holds [heads, T, T] scores);
- per_sample: one SDPA call per sample, a Python loop (the reference).
Rows (benchmarks/results/packed_attention_<cpu|cuda>.csv): seconds, tokens_per_s,
peak_mem_bytes, per (T, L). The claim the rows test: nova's tokens/s depends on L (the
segments' squares), not on T; dense_mask's falls with T.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks._common import bench_args, finish, measure_impls, summary
from nova_engine.model.attention import (
    _grouped_causal_attention,
    block_causal_mask,
    packed_attention,
)

CPU_HEADS = (4, 2, 32)  # query heads, KV heads, head dim (bench_vs_peers' tiny Llama)
GPU_HEADS = (32, 8, 128)
CPU_GRID = [(4096, L) for L in (256, 512, 1024, 2048, 4096)] + [(8192, 512), (8192, 2048)]
GPU_GRID = [(T, L) for T in (16384, 65536) for L in (512, 2048, 8192)]


def _lengths(T: int, L: int | None, seed: int = 0) -> list[int]:
    """T/L samples of L tokens, or (L None) a log-normal mix (median ~400) filling T."""
    if L is not None:
        return [L] * (T // L)
    rng = np.random.default_rng(seed)
    out: list[int] = []
    while sum(out) < T:
        out.append(int(np.clip(rng.lognormal(6.0, 0.8), 16, 4096)))
    out[-1] -= sum(out) - T
    return [n for n in out if n > 0]


def bench_one(T, lengths, heads, device, dtype, reps, rows, label):
    nq, nkv, hn = heads
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (
        torch.randn(T, n, hn, generator=g).to(device, dtype).requires_grad_()
        for n in (nq, nkv, nkv)
    )
    go = torch.randn(T, nq, hn, generator=g).to(device, dtype)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=device)
    scale = hn**-0.5

    def nova():
        out = packed_attention(q, k, v, cu, max(lengths), scale)
        torch.autograd.backward(out, go)

    def per_sample():
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                               enable_gqa=nq != nkv)  # fmt: skip
            torch.autograd.backward(o[0].transpose(0, 1), go[a:b])

    impls = {"per_sample": per_sample, "nova": nova}  # the baseline first
    if device.type == "cpu":

        def nova_grouped_sdpa():
            out = _grouped_causal_attention(q, k, v, cu, scale)
            torch.autograd.backward(out, go)

        impls["nova_grouped_sdpa"] = nova_grouped_sdpa
    if device.type == "cuda" or T <= 4096:
        mask = block_causal_mask(cu, T)

        def dense_mask():
            qs, ks, vs = (t.transpose(0, 1)[None] for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale,
                                               enable_gqa=nq != nkv)  # fmt: skip
            torch.autograd.backward(o[0].transpose(0, 1), go)

        impls["dense_mask"] = dense_mask
    shape = f"T={T},L={label},{nq}/{nkv}x{hn}"
    times = measure_impls(rows, op="packed_attention", shape=shape, mode="fwd_bwd",
                          impls=impls, reps=reps, baseline="per_sample")  # fmt: skip
    for impl, t in times.items():
        base = dict(op="packed_attention", impl=impl, shape=shape, mode="fwd_bwd")
        rows.append({**base, "metric": "tokens_per_s", "p50": T / t[0], "p20": T / t[2],
                     "p80": T / t[1]})  # fmt: skip
    print(f"{shape}: {summary(times)}; nova {T / times['nova'][0]:,.0f} tok/s")


def main(argv=None):
    args, device, quick = bench_args(__doc__, argv)
    heads, grid = (CPU_HEADS, CPU_GRID) if quick else (GPU_HEADS, GPU_GRID)
    dtype = torch.float32 if quick else torch.bfloat16
    reps = min(args.reps, 8) if quick else args.reps
    rows: list[dict] = []
    for T, L in grid:
        bench_one(T, _lengths(T, L), heads, device, dtype, reps, rows, str(L))
    T = grid[0][0]
    bench_one(T, _lengths(T, None), heads, device, dtype, reps, rows, "lognormal")
    finish("packed_attention", rows)


if __name__ == "__main__":
    main()
