"""GAE over an RLVR step's packed responses: verl's loop over t on the padded [R, L] layout
(impl verl_padded_loop: pad, loop, gather back), the production call
`nova_kernels.gae_packed` on its torch path (log-step scan on the unpacked rows) and (GPU)
its Triton path (one reverse associative scan per sequence, rows split when they are few).

    python -m benchmarks.bench_gae            # GPU: (R, T) in {(512, 64k), (2048, 256k), (8192, 1M)}
    python -m benchmarks.bench_gae --quick    # CPU: the first two (torch path)

R sequences of random lengths (cuts of T at random points: mean T / R, a long tail) packed
into T tokens, a 0/1 mask with holes. Ops: gae (gamma 0.99, lam 0.95) and
reinforce_pp_returns (what the trainer computes for REINFORCE++: values 0, lam 1, gamma 1).
Rows (benchmarks/results/gae_<cuda|cpu>.csv): seconds and peak extra memory, timed
interleaved (A B A B); speedup_vs_verl_padded_loop; GB/s over the bytes GAE must move (read
rewards, values fp32, mask bool, cu_seqlens; write advantages, returns fp32: 17 B/token) and
`frac_copy_bw`, that over a device-to-device copy measured in the same run (impl copy).
Without CUDA there are no Triton rows: the interpreter's timings are no performance figures.
"""

from __future__ import annotations

import os
from functools import partial

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks._common import bench_args, finish, measure_impls, summary, time_fn  # noqa: E402
from nova_kernels import gae_packed  # noqa: E402
from nova_kernels.reference import gae_reference  # noqa: E402

SHAPES = ((512, 1 << 16), (2048, 1 << 18), (8192, 1 << 20))  # (responses R, packed tokens T)


def copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> float:
    """GB/s of dst.copy_(src) counting bytes read + written."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    p50, _, _ = time_fn(lambda: dst.copy_(src), warmup=3, reps=reps)
    return 2 * n * 4 / p50 / 1e9


def make_packed(R, T, device, seed=0):
    """rewards, values, mask [T], cu_seqlens [R+1] int32 (lengths: random cuts of T)."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randint(0, T + 1, (R - 1,), generator=g)).values
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.full((1,), T)]).int()
    rewards, values = torch.randn(T, generator=g), torch.randn(T, generator=g)
    mask = torch.rand(T, generator=g) > 0.1
    return [t.to(device) for t in (rewards, values, mask, cu)]


def verl_padded_loop(r, v, m, cu, gamma, lam):
    """What a padded-layout trainer does: [T] -> [R, L] padded, verl's loop over t, back."""
    lens = (cu[1:] - cu[:-1]).long()
    L = int(lens.max())
    pos = torch.arange(L, device=r.device)
    valid = pos[None, :] < lens[:, None]
    src = (cu[:-1].long()[:, None] + pos[None, :]).clamp_max(r.numel() - 1)
    pad = [torch.where(valid, t[src], 0) for t in (r, v, m)]
    adv, ret = gae_reference(pad[0], pad[1], pad[2], gamma, lam)
    return adv[valid], ret[valid]


def bench_shape(R, T, device, copy_gbs, reps, rows):
    r, v, m, cu = make_packed(R, T, device)
    zeros = torch.zeros_like(v)
    on_gpu = device.type == "cuda"
    shape = f"R={R},T={T}"
    cases = {
        "gae": (v, 0.99, 0.95),
        "reinforce_pp_returns": (zeros, 1.0, 1.0),
    }
    for op, (values, gamma, lam) in cases.items():
        args = (r, values, m, cu, gamma, lam)
        impls = {
            "verl_padded_loop": partial(verl_padded_loop, *args),
            "torch": partial(gae_packed, *args, backend="torch"),
        }
        if on_gpu:  # the interpreter is no timing
            impls["triton"] = partial(gae_packed, *args, backend="triton")
        ref = impls["verl_padded_loop"]()
        for name, fn in impls.items():
            torch.testing.assert_close(fn(), ref, rtol=1e-3, atol=1e-3, msg=name)
        times = measure_impls(
            rows, op=op, shape=shape, mode="fwd", impls=impls, reps=reps,
            baseline="verl_padded_loop", bytes_moved=17 * T, copy_gbs=copy_gbs,
        )  # fmt: skip
        print(f"{op:22s} {shape:18s} {summary(times)}")


def main(argv=None):
    args, device, quick = bench_args(__doc__, argv)
    copy_gbs = copy_bandwidth(device, (1 << 26) if quick else (1 << 30), args.reps)
    rows = [dict(op="copy", impl="copy", shape="bytes_rw", mode="fwd", metric="GB/s", p50=copy_gbs)]
    print(f"copy bandwidth {copy_gbs:.1f} GB/s on {device}")
    for R, T in SHAPES[:2] if quick else SHAPES:
        bench_shape(R, T, device, copy_gbs, args.reps, rows)
    finish("gae", rows)


if __name__ == "__main__":
    main()
