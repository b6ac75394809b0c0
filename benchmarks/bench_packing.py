"""Sequence packing benchmark (CPU): packing efficiency and packer throughput.

    python -m benchmarks.bench_packing            # 1M sequences (the issue's setting), ~1-2 min
    python -m benchmarks.bench_packing --quick    # 100k sequences

Lengths: log-normal with median 600 tokens and σ = 1.0 (about 3% of the mass lies past 4096
before clipping, so the tail matters), rounded and clipped to [1, 4096], seed fixed.
Capacities 16384 and 8192 tokens per bin.

Efficiency = real tokens / (bins × capacity), for
  pad_to_longest  batches of B = capacity // 4096 consecutive samples (the most that always
                  fit a capacity-token budget), each padded to its longest: real / Σ B·max
  nextfit         greedy in arrival order (a new bin when the current one is full)
  ffd, bfd        first-fit / best-fit decreasing (csrc/packer.cpp)
against the lower bound LB = ⌈Σ len / capacity⌉ bins; `lb_over_bins` = LB / bins (for
pad_to_longest: its efficiency / the efficiency of LB bins). The bar is lb_over_bins ≥ 0.99.

Throughput (sequences/s): the C++ packer, one call on one thread (the packer is
single-threaded; the GIL is released), timed over several calls; `pack_lengths` (the Python
API around it) likewise, all interleaved (A B C A B C ...); TRL's BFD packer (`trl_rows`,
optional `bench` extra) against the C++ BFD on the first 100k (quick: 25k) lengths; the plain-Python references from tests/engine/test_packing.py on a
subsample (20k, quick: 5k), reported as measured on the subsample. They are O(n · bins), so
their time for 1M sequences is far worse than the linear extrapolation `est_s_linear_1M`
written next to them (a lower bound on that time).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import env_info, results_dir, time_interleaved, write_rows
from nova_engine import _C
from nova_engine.data.packing import pack_lengths

ROOT = Path(__file__).resolve().parent.parent
MAX_LEN = 4096
MEDIAN = 600
SIGMA = 1.0
CAPACITIES = (16384, 8192)


def lognormal_lengths(n: int, seed: int = 0) -> np.ndarray:
    """[n] int64 lengths: log-normal (median 600, σ 1.0), rounded, clipped to [1, 4096]."""
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(np.log(MEDIAN), SIGMA, n)
    return np.clip(np.round(raw), 1, MAX_LEN).astype(np.int64)


def pad_to_longest_tokens(lengths: np.ndarray, batch_size: int) -> int:
    """Tokens computed when consecutive batches of `batch_size` are padded to their longest."""
    n = len(lengths)
    full = n // batch_size * batch_size
    tokens = int(lengths[:full].reshape(-1, batch_size).max(axis=1).sum()) * batch_size
    if full < n:
        tokens += int(lengths[full:].max()) * (n - full)
    return tokens


def load_references():
    """The plain-Python packers, from the test file where they live."""
    path = ROOT / "tests" / "engine" / "test_packing.py"
    spec = importlib.util.spec_from_file_location("_packing_test_refs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.REFERENCES


def efficiency_rows(lengths: np.ndarray, capacity: int) -> list[dict]:
    n, real = len(lengths), int(lengths.sum())
    shape = f"n={n},cap={capacity}"
    lb = -(-real // capacity)
    lb_eff = real / (lb * capacity)
    rows = []

    def add(impl, metric, value):
        rows.append(
            dict(op="packing", impl=impl, shape=shape, mode="plan", metric=metric, p50=value)
        )

    batch = capacity // MAX_LEN
    padded = pad_to_longest_tokens(lengths, batch)
    eff = real / padded
    add(f"pad_to_longest_b{batch}", "efficiency", eff)
    add(f"pad_to_longest_b{batch}", "lb_over_bins", eff / lb_eff)
    for algorithm in ("nextfit", "ffd", "bfd"):
        offsets, items = _C.pack(lengths, capacity, algorithm, 0)
        bins = len(offsets) - 1
        assert np.array_equal(np.sort(items), np.arange(n))
        add(algorithm, "efficiency", real / (bins * capacity))
        add(algorithm, "bins", bins)
        add(algorithm, "lb_over_bins", lb / bins)
    add("lower_bound", "bins", lb)
    add("lower_bound", "efficiency", lb_eff)
    return rows


def throughput_rows(lengths, capacity, reps, references, ref_n) -> list[dict]:
    n = len(lengths)
    rows = []

    def add(impl, shape, seconds, metric="seqs_per_s", count=n, extra=None):
        p50, p20, p80 = seconds
        # a faster time is a higher throughput: the time's p20 is the throughput's p80
        row = dict(
            op="packing",
            impl=impl,
            shape=shape,
            mode="pack",
            metric=metric,
            p50=count / p50,
            p20=count / p80,
            p80=count / p20,
        )
        rows.append(row)
        rows.append({**row, "metric": "seconds", "p50": p50, "p20": p20, "p80": p80})
        if extra:
            rows.append({**row, "metric": extra[0], "p50": extra[1], "p20": "", "p80": ""})

    shape = f"n={n},cap={capacity}"
    impls = {
        f"cpp_{a}": (lambda a=a: _C.pack(lengths, capacity, a, 0))
        for a in ("nextfit", "ffd", "bfd")
    }
    impls["pack_lengths_ffd"] = lambda: pack_lengths(lengths, capacity, "ffd")
    for impl, t in time_interleaved(impls, warmup=1, reps=reps).items():  # A B C A B C ...
        add(impl, shape, t)

    sub = lengths[:ref_n]
    sub_list = sub.tolist()
    for algorithm, ref in references.items():
        t0 = time.perf_counter()
        ref_offsets, ref_items = ref(sub_list, capacity)
        dt = time.perf_counter() - t0
        offsets, items = _C.pack(sub, capacity, algorithm, 0)
        assert np.array_equal(offsets, ref_offsets) and np.array_equal(items, ref_items)
        add(
            f"python_ref_{algorithm}",
            f"n={ref_n}(subsample),cap={capacity}",
            (dt, dt, dt),
            count=ref_n,
            extra=("est_s_linear_1M", dt * 1_000_000 / ref_n),
        )
    return rows


def trl_rows(lengths: np.ndarray, capacity: int, reps: int) -> list[dict]:
    """TRL's best-fit decreasing (`trl.data_utils._pack_bfd`, the packer of its SFTTrainer:
    a segment tree over bin space, on a pyarrow table of token lists) vs Nova's C++ BFD on the
    same lengths, timed interleaved; bins of each (the same algorithm: equal counts expected).
    TRL also gathers the tokens into the packed table, Nova returns the plan only (the
    gather happens per micro-batch): so TRL does more work per call. Needs `trl` (the
    optional `bench` extra); skipped without it."""
    try:
        import pyarrow as pa
        from trl.data_utils import _pack_bfd
    except ImportError:
        print("trl not installed (pip install -e '.[bench]'): TRL BFD rows skipped")
        return []
    n = len(lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = pa.array(np.zeros(int(offsets[-1]), dtype=np.int8))
    table = pa.table({"input_ids": pa.LargeListArray.from_arrays(pa.array(offsets), values)})
    trl_bins = len(_pack_bfd(table, capacity)["seq_lengths"])
    nova_bins = len(_C.pack(lengths, capacity, "bfd", 0)[0]) - 1
    shape = f"n={n},cap={capacity}"
    times = time_interleaved(
        {
            "trl_bfd": lambda: _pack_bfd(table, capacity),
            "cpp_bfd": lambda: _C.pack(lengths, capacity, "bfd", 0),
        },
        warmup=1,
        reps=reps,
    )
    rows = []
    for impl, (p50, p20, p80) in times.items():
        base = dict(op="packing_vs_trl", impl=impl, shape=shape, mode="pack")
        rows.append({**base, "metric": "seconds", "p50": p50, "p20": p20, "p80": p80})
        rows.append(
            {**base, "metric": "seqs_per_s", "p50": n / p50, "p20": n / p80, "p80": n / p20}
        )
        rows.append({**base, "metric": "bins", "p50": trl_bins if impl == "trl_bfd" else nova_bins})
    speed = times["trl_bfd"][0] / times["cpp_bfd"][0]
    print(
        f"vs TRL BFD (n={n}, cap={capacity}): bins trl {trl_bins} nova {nova_bins}; "
        f"Nova {speed:.0f}x faster (p50 {times['cpp_bfd'][0] * 1e3:.1f} ms vs "
        f"{times['trl_bfd'][0] * 1e3:.1f} ms)"
    )
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'shape':<34}{'impl':<22}{'metric':<18}{'p50':>14}")
    for r in rows:
        if r["metric"] in ("efficiency", "lb_over_bins", "bins", "seqs_per_s", "seconds"):
            v = r["p50"]
            text = f"{v:.4f}" if isinstance(v, float) and v < 10 else f"{v:,.0f}"
            print(f"{r['shape']:<34}{r['impl']:<22}{r['metric']:<18}{text:>14}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k sequences, 5k for Python")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(results_dir() / "packing_cpu.csv"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    n, ref_n, reps = (100_000, 5_000, 3) if args.quick else (1_000_000, 20_000, 5)
    lengths = lognormal_lengths(n, args.seed)
    references = load_references()
    print(f"{env_info()}  n={n}  Σlen={int(lengths.sum()):,}  max={int(lengths.max())}")
    rows = []
    for capacity in CAPACITIES:
        rows += efficiency_rows(lengths, capacity)
        rows += throughput_rows(lengths, capacity, reps, references, ref_n)
        rows += trl_rows(lengths[: ref_n * 5], capacity, reps)
    for r in rows:
        r["mode"] = f"{r['mode']}{'-quick' if args.quick else ''}"
    write_rows(args.out, rows)
    print_table(rows)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
