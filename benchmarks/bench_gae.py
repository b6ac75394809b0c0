"""GAE and REINFORCE++ returns: the loop over t (verl), the chunked PyTorch path, Triton.

    python -m benchmarks.bench_gae            # GPU: B in {64, 512} x T in {1024, 8192}
    python -m benchmarks.bench_gae --quick    # CPU: small shapes

Rows (benchmarks/results/gae_<cuda|cpu>.csv): seconds (p50/p20/p80) and peak extra memory
per impl; `speedup_vs_loop`; for every impl the achieved bandwidth GB/s over the bytes GAE
must move (read rewards fp32, values fp32, mask bool; write advantages fp32, returns fp32 =
17 B/token) and `frac_copy_bw`, that bandwidth over a device-to-device copy measured in the
same run (impl=copy, bytes read + written). REINFORCE++ returns: 13 B/token.

Without CUDA there are no Triton rows: the interpreter (TRITON_INTERPRET=1, set here before
triton is imported) is no timing.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks._common import GPU_BT_SHAPES, bench_args, finish, measure_impls, summary, time_fn  # noqa: E402
from nova_kernels import discounted_returns, gae  # noqa: E402
from nova_kernels.reference import discounted_returns_reference, gae_reference  # noqa: E402

INTERPRETER_MAX_TOKENS = 0  # no interpreter timings (they are no performance figures)


def copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> float:
    """GB/s of dst.copy_(src) counting bytes read + written."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    p50, _, _ = time_fn(lambda: dst.copy_(src), warmup=3, reps=reps)
    return 2 * n * 4 / p50 / 1e9


def make_inputs(B, T, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    lens = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lens[:, None]) & (torch.rand(B, T, generator=g) > 0.1)
    return rewards.to(device), values.to(device), mask.to(device)


def bench_shape(B, T, device, copy_gbs, reps, rows):
    r, v, m = make_inputs(B, T, device)
    on_gpu = device.type == "cuda"
    triton_name = "triton" if on_gpu else "triton_interpreter"
    run_triton = on_gpu or B * T <= INTERPRETER_MAX_TOKENS
    shape = f"B={B},T={T}"
    cases = {
        "gae": (
            17,
            {
                "loop": lambda: gae_reference(r, v, m, 0.99, 0.95),
                "torch": lambda: gae(r, v, m, 0.99, 0.95, backend="torch"),
                triton_name: lambda: gae(r, v, m, 0.99, 0.95, backend="triton"),
            },
        ),
        "reinforce_pp_returns": (
            13,
            {
                "loop": lambda: discounted_returns_reference(r, m, 0.99),
                "torch": lambda: discounted_returns(r, m, 0.99, backend="torch"),
                triton_name: lambda: discounted_returns(r, m, 0.99, backend="triton"),
            },
        ),
    }
    for op, (bytes_per_token, impls) in cases.items():
        if not run_triton:
            impls.pop(triton_name)
        times = measure_impls(
            rows,
            op=op,
            shape=shape,
            mode="fwd",
            impls=impls,
            reps=reps,
            baseline="loop",
            bytes_moved=bytes_per_token * B * T,
            copy_gbs=copy_gbs,
        )
        print(f"{op:22s} {shape:16s} {summary(times)}")


def main(argv=None):
    args, device, quick = bench_args(__doc__, argv)
    shapes = [(8, 128), (8, 1024), (64, 1024)] if quick else GPU_BT_SHAPES
    copy_gbs = copy_bandwidth(device, (1 << 26) if quick else (1 << 30), args.reps)
    rows = [dict(op="copy", impl="copy", shape="bytes_rw", mode="fwd", metric="GB/s", p50=copy_gbs)]
    print(f"copy bandwidth {copy_gbs:.1f} GB/s on {device}")
    for B, T in shapes:
        bench_shape(B, T, device, copy_gbs, args.reps, rows)
    finish("gae", rows)


if __name__ == "__main__":
    main()
