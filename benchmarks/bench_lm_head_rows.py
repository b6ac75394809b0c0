"""lm_head_rows: one chunk of the fused LM heads' row pass (GEMM 1, the row statistics,
log p(target), dz formed in place on the chunk) against the naive path (logits, log_softmax,
gather, softmax minus one-hot times the coefficient), time and peak memory.

    python -m benchmarks.bench_lm_head_rows            # GPU: n {4096, 16384} x H 4096 x Vp {32064, 128256}, bf16
    python -m benchmarks.bench_lm_head_rows --quick    # CPU: small shapes, fp32

Impls: naive, nova_torch (LogitsChunk, backend "torch"), nova_triton (GPU only: the Triton
row kernel; under the CPU interpreter it is no timing). Mode `rows`: one chunk's forward
statistics and dz, what linear_cross_entropy / linear_pair_logprobs run per row chunk.
Rows (benchmarks/results/lm_head_rows_<cuda|cpu>.csv): seconds (p50/p20/p80, interleaved),
peak_mem_bytes, speedup_vs_naive.
"""

from __future__ import annotations

import os
from functools import partial

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks._common import bench_args, finish, measure_impls  # noqa: E402
from nova_kernels.ops.lm_head_rows import LogitsChunk  # noqa: E402

GPU_SHAPES = [(n, 4096, v) for n in (4096, 16384) for v in (32064, 128256)]
CPU_SHAPES = [(512, 256, 32000), (2048, 256, 32000)]


def naive(h, w, t, c):
    """fp32 logits, log p(target), dz = c (softmax - onehot(target))."""
    z = h.float() @ w.float().t()
    logp = torch.log_softmax(z, dim=-1)
    lp_t = logp.gather(1, t[:, None]).squeeze(1)
    dz = logp.exp_()
    dz[torch.arange(len(t), device=t.device), t] -= 1.0
    return lp_t, (dz * c[:, None]).to(h.dtype)


def nova(h, w, t, c, backend):
    ch = LogitsChunk(h, w, t, backend, None, 1)
    return ch.logp, ch.dlogits(c, h.dtype)


def main(argv=None) -> None:
    args, device, quick = bench_args(__doc__, argv)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    rows: list[dict] = []
    for n, hdim, v in CPU_SHAPES if quick else GPU_SHAPES:
        gen = torch.Generator(device="cpu").manual_seed(0)
        h = (torch.randn(n, hdim, generator=gen) / hdim**0.5).to(device, dtype)
        w = torch.randn(v, hdim, generator=gen).to(device, dtype)
        t = torch.randint(0, v, (n,), generator=gen).to(device)
        c = torch.rand(n, generator=gen).to(device)
        impls = {
            "naive": partial(naive, h, w, t, c),
            "nova_torch": partial(nova, h, w, t, c, "torch"),
        }
        if device.type == "cuda":
            impls["nova_triton"] = partial(nova, h, w, t, c, "triton")
        times = measure_impls(rows, op="lm_head_rows", shape=f"n={n},H={hdim},Vp={v}",
                              mode="rows", impls=impls, reps=args.reps, baseline="naive")  # fmt: skip
        print(
            f"n={n} H={hdim} Vp={v}: "
            + ", ".join(f"{k} {x[0] * 1e3:.2f} ms" for k, x in times.items())
        )
    finish("lm_head_rows", rows)


if __name__ == "__main__":
    main()
