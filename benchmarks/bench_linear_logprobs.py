"""linear_logprobs: time and peak memory, forward and forward+backward, against the naive path
(logits -> log_softmax -> gather), the naive path under torch.compile, and Liger-Kernel's
fused linear DPO loss. (The SFT loss, linear_cross_entropy vs Liger's fused linear cross
entropy, is bench_linear_cross_entropy.py, which uses this module's driver.)

    python -m benchmarks.bench_linear_logprobs            # GPU: N {4k,16k,64k} x H {4096,8192}
                                                          #      x V {128256,152064}, bf16
    python -m benchmarks.bench_linear_logprobs --quick    # CPU: small shapes, fp32

Impls: naive, naive_compile (GPU), nova_triton (GPU), nova_torch (the chunked PyTorch path),
and for DPO (B pairs of T=1024 tokens, reference-free
sigmoid on mean log-probs, = SimPO with gamma 0): nova_dpo (linear_logprobs + seq_reduce +
loss) vs liger_dpo (LigerFusedLinearDPOLoss, use_ref_model=False), when liger_kernel imports.

Rows (benchmarks/results/linear_logprobs_<cuda|cpu>.csv), per impl/shape/mode:
  seconds (p50/p20/p80, all impls timed interleaved), peak_mem_bytes (one call; inputs excluded, outputs and grads
  included), and for fwd_bwd `x_gemm3` = time / (3 x the time of one N x H x V GEMM measured
  in the same run, impl=gemm, the bar's floor) and `mem_vs_naive`. A shape/impl that runs out
  of memory gets one row with metric=oom. On CPU the Triton impls are skipped (the interpreter
  is no timing); CPU memory is the RSS high-water mark method of `_common.peak_memory`.
"""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks._common import peak_memory, results_dir, time_interleaved, write_rows  # noqa: E402
from nova_kernels import linear_logprobs, seq_reduce  # noqa: E402
from nova_kernels.reference import linear_logprobs_reference  # noqa: E402

RESULTS = str(results_dir())
DPO_SEQ = 1024  # tokens per sequence in the DPO comparison
GPU_SHAPES = [
    (n, h, v) for n in (4096, 16384, 65536) for h in (4096, 8192) for v in (128256, 152064)
]
CPU_SHAPES = [(1024, 256, 32000), (4096, 256, 32000)]


def naive(h, w, t):
    return linear_logprobs_reference(h, w, t)


def _liger():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss, LigerFusedLinearDPOLoss


def _dpo_nova(h, w, t, cu, n_pairs):
    lp = linear_logprobs(h, w, t)
    means = seq_reduce(lp, cu, reduction="mean")
    return -torch.nn.functional.logsigmoid(0.1 * (means[:n_pairs] - means[n_pairs:])).sum()


def impls(device, dtype, h, w, t, compile_naive):
    """name -> (forward fn or None, fwd+bwd fn). fwd_bwd fns leave grads in h.grad / w.grad."""
    g = torch.randn(h.shape[0], device=device)
    on_gpu = device.type == "cuda"

    def logp_pair(fn):
        def fwd():
            with torch.no_grad():
                return fn(h, w, t)

        def fwd_bwd():
            h.grad = w.grad = None
            (fn(h, w, t) * g).sum().backward()

        return fwd, fwd_bwd

    def loss_only(fn):
        def fwd_bwd():
            h.grad = w.grad = None
            fn().backward()

        return None, fwd_bwd

    out = {"naive": logp_pair(naive)}
    if on_gpu and compile_naive:
        out["naive_compile"] = logp_pair(torch.compile(naive))
    if on_gpu:
        out["nova_triton"] = logp_pair(lambda *a: linear_logprobs(*a, backend="triton"))
    out["nova_torch"] = logp_pair(lambda *a: linear_logprobs(*a, backend="torch"))
    liger = _liger()
    n_pairs = h.shape[0] // (2 * DPO_SEQ)
    if n_pairs > 0:
        n = 2 * n_pairs * DPO_SEQ
        cu = torch.arange(0, n + 1, DPO_SEQ, device=device, dtype=torch.int32)
        out["nova_dpo"] = loss_only(lambda: _dpo_nova(h[:n], w, t[:n], cu, n_pairs))
        if liger is not None:
            dpo = liger[1](beta=0.1, use_ref_model=False, compute_nll_loss=False)
            x = h[:n].view(2 * n_pairs, DPO_SEQ, -1)
            y = t[:n].view(2 * n_pairs, DPO_SEQ)
            out["liger_dpo"] = loss_only(lambda: _first(dpo(w, x, y)))
    return out


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def bench_shape(N, H, V, device, dtype, reps, compile_naive, rows, phase, oom, impls_fn, op):
    """phase "time": seconds, x_gemm3; phase "memory": peak_mem_bytes, mem_vs_naive. On CPU
    every timing runs before the first memory measurement (that one changes glibc's malloc
    settings for the rest of the process, which would slow later timings)."""
    shape = f"N={N},H={H},V={V},{str(dtype).removeprefix('torch.')}"
    gen = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(N, H, generator=gen).to(device, dtype).requires_grad_()
    w = (torch.randn(V, H, generator=gen) / H**0.5).to(device, dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=gen).to(device)
    base = dict(op=op, shape=shape)

    def row(impl, mode, metric, p50, p20=None, p80=None):
        p20 = p50 if p20 is None else p20
        p80 = p50 if p80 is None else p80
        rows.append(dict(base, impl=impl, mode=mode, metric=metric, p50=p50, p20=p20, p80=p80))

    def try_run(name, mode, fn) -> bool:
        """Run once (probe / memory phase); False (and an oom row) when out of memory."""
        nonlocal mem
        try:
            mem = peak_memory(fn) if phase == "memory" else fn()
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            if not _is_oom(e):
                raise
            row(name, mode, "oom", float("nan"))
            oom.add((shape, name, mode))
            h.grad = w.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return False
        return True

    mem = None
    candidates = {}
    if phase == "time":
        hd, wd = h.detach(), w.detach()
        candidates[("gemm", "fwd")] = lambda: hd @ wd.T
    naive_mem = {}
    for name, (fwd, fwd_bwd) in impls_fn(device, dtype, h, w, t, compile_naive).items():
        for mode, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            if fn is None or (shape, name, mode) in oom or not try_run(name, mode, fn):
                continue
            if phase == "time":
                candidates[(name, mode)] = fn
                continue
            row(name, mode, "peak_mem_bytes", float(mem))
            if name.startswith("naive") and not name.endswith("compile"):
                naive_mem[mode] = mem
            elif mode in naive_mem and naive_mem[mode] > 0:
                row(name, mode, "mem_vs_naive", mem / naive_mem[mode])
    if phase == "time":  # every impl and mode interleaved (A B A B ...)
        times = time_interleaved(
            {f"{n}|{m}": fn for (n, m), fn in candidates.items()}, warmup=2, reps=reps
        )
        gemm = times["gemm|fwd"]
        for (name, mode), _ in candidates.items():
            t3 = times[f"{name}|{mode}"]
            row(name, mode, "seconds", *t3)
            if mode == "fwd_bwd" and not name.endswith("dpo"):
                row(name, mode, "x_gemm3", t3[0] / (3 * gemm[0]))
    h.grad = w.grad = None


def main(argv=None, op="linear_logprobs", impls_fn=impls):
    ap = argparse.ArgumentParser(description=f"{op}: time and peak memory vs the naive path")
    ap.add_argument("--quick", action="store_true", help="CPU-sized shapes")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip naive under torch.compile")
    ap.add_argument("--out", default=None, help=f"CSV path (default results/{op}_<dev>.csv)")
    args = ap.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    quick = args.quick or not on_gpu
    shapes = CPU_SHAPES if quick else GPU_SHAPES
    dtype = torch.bfloat16 if on_gpu else torch.float32
    reps = args.reps or (5 if quick else 20)
    rows: list[dict] = []
    oom: set = set()
    for phase in ("time", "memory"):
        for N, H, V in shapes:
            bench_shape(
                N, H, V, device, dtype, reps, not args.no_compile, rows, phase, oom, impls_fn, op
            )
            if on_gpu:
                torch.cuda.empty_cache()
    out = args.out or os.path.join(RESULTS, f"{op}_{'cuda' if on_gpu else 'cpu'}.csv")
    write_rows(out, rows)
    for r in rows:
        print(f"{r['impl']:>14} {r['shape']:>32} {r['mode']:>8} {r['metric']:>16} {r['p50']:.4g}")


if __name__ == "__main__":
    main()
