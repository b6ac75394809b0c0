"""linear_pair_logprobs (the fused 3-GEMM preference head): DPO's LM-head forward+backward time
and peak memory of the head's Triton row kernels and torch row pass against the 3-GEMM floor
(three bare GEMMs of the batch's shapes: z = h W^T, dh = z W, dW = z^T h), the naive path
(logits -> log_softmax -> gather -> per-sequence sums -> loss) and the 4-GEMM path it replaces
(linear_logprobs -> seq_reduce -> loss).

    python -m benchmarks.bench_linear_pair_logprobs            # GPU: bf16, Llama-3 vocab
    python -m benchmarks.bench_linear_pair_logprobs --quick    # smaller (CPU: fp32, torch only)

The loss is Tülu 3's length-normalized sigmoid DPO (beta 5) against fixed reference log-probs,
over P pairs of ragged packed sequences (log-normal lengths). All impls are timed interleaved
(A B C A B C ..., `_common.time_interleaved`), then their peak memory measured one by one.
Rows (benchmarks/results/linear_pair_logprobs_<cuda|cpu>.csv): seconds (p50/p20/p80),
peak_mem_bytes, and per impl `x_naive` (p50 time / naive p50), `x_gemm3` (p50 / the floor's
p50) and `mem_vs_naive`. The Triton impl runs on GPU only (the interpreter is no timing).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks._common import finish, peak_memory, summary, time_interleaved
from nova_kernels import linear_logprobs_reference
from nova_kernels.ops.linear_pair_logprobs import (
    linear_pair_logprobs,
    linear_pair_logprobs_reference,
)

# pairs, median length, H, V; 16 pairs of ~1024-token sequences: ~32k tokens (the goal shape)
GPU_SHAPES = [(16, 1024, 4096, 128256), (32, 1024, 8192, 128256)]
GPU_QUICK = [(4, 1024, 4096, 128256)]
CPU_SHAPES = [(8, 128, 256, 32000), (8, 256, 256, 32000)]


def _batch(pairs, median, H, V, device, dtype, seed=0):
    rng = np.random.default_rng(seed)
    lens = np.clip(rng.lognormal(np.log(median), 0.5, 2 * pairs), 8, 4 * median).astype(int)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device=device)
    n = int(cu[-1])
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H**0.5).to(device, dtype).requires_grad_()
    t = torch.randint(0, V, (n,), generator=g).to(device)
    mask = (torch.rand(n, generator=g) < 0.8).to(device)
    refs = (-torch.rand(2 * pairs, generator=g) * 50).to(device)
    return h, w, t, cu, mask, refs


def dpo_norm(refs, beta=5.0):
    def loss(logps, counts, first):
        ratio = (logps - refs[first : first + len(logps)]) / counts.clamp_min(1)
        return -F.logsigmoid(beta * (ratio[0::2] - ratio[1::2])).sum() / (len(refs) // 2)

    return loss


def naive(h, w, t, cu, mask, group_loss):
    lp = linear_logprobs_reference(h, w, t)
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1, device=h.device), cu.diff())
    m = (mask != 0).float()
    sums = torch.zeros(len(cu) - 1, device=h.device).index_add(0, seg, lp * m)
    counts = torch.zeros(len(cu) - 1, device=h.device).index_add(0, seg, m)
    return group_loss(sums, counts, 0)


def gemm3_floor(h, w):
    """The head's three GEMMs at full shape, operands in h's dtype: z, dh, dW."""
    z = h @ w.T
    return z @ w, z.T @ h


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    reps = args.reps or (20 if on_gpu else 6)
    shapes = (GPU_QUICK if args.quick else GPU_SHAPES) if on_gpu else CPU_SHAPES
    rows, memory_jobs = [], []
    for pairs, median, H, V in shapes:
        h, w, t, cu, mask, refs = _batch(pairs, median, H, V, device, dtype)
        shape = f"P={pairs},N={h.shape[0]},H={H},V={V},{str(dtype).removeprefix('torch.')}"
        loss_fn = dpo_norm(refs)

        def run(fn, h=h, w=w, t=t, cu=cu, mask=mask, loss_fn=loss_fn):
            def fwd_bwd():
                h.grad = w.grad = None
                out = fn(h, w, t, cu, mask, loss_fn)
                (out[0] if isinstance(out, tuple) else out).backward()

            return fwd_bwd

        hd, wd = h.detach(), w.detach()
        impls = {"gemm3_floor": lambda hd=hd, wd=wd: gemm3_floor(hd, wd), "naive": run(naive)}
        impls["nova_4gemm"] = run(linear_pair_logprobs_reference)
        for b in ("triton", "torch") if on_gpu else ("torch",):
            impls[f"nova_fused_{b}"] = run(
                lambda *a, b=b, **kw: linear_pair_logprobs(*a, backend=b, **kw)
            )
        times = time_interleaved(impls, warmup=1, reps=reps)
        print(f"{shape}: {summary(times)}")
        for impl, (p50, p20, p80) in times.items():
            base = dict(op="linear_pair_logprobs", impl=impl, shape=shape, mode="fwd_bwd")
            rows.append({**base, "metric": "seconds", "p50": p50, "p20": p20, "p80": p80})
            rows.append({**base, "metric": "x_naive", "p50": p50 / times["naive"][0]})
            rows.append({**base, "metric": "x_gemm3", "p50": p50 / times["gemm3_floor"][0]})
        memory_jobs.append((shape, impls))
    # memory after every timing: peak_memory changes glibc's malloc settings for the process
    for shape, impls in memory_jobs:
        mem = {impl: peak_memory(fn) for impl, fn in impls.items()}
        print(f"{shape}: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in mem.items()))
        for impl, m in mem.items():
            base = dict(op="linear_pair_logprobs", impl=impl, shape=shape, mode="fwd_bwd")
            rows.append({**base, "metric": "peak_mem_bytes", "p50": float(m)})
            rows.append({**base, "metric": "mem_vs_naive", "p50": m / max(mem["naive"], 1)})
    finish("linear_pair_logprobs", rows)


if __name__ == "__main__":
    main()
