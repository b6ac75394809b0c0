"""Shared benchmark helpers: timing, peak memory, environment info, tidy CSV rows.

Rows have the columns of `COLUMNS` (op, impl, shape, mode, metric, p50, p20, p80, device,
torch, triton, commit); extra keys in a row become extra columns after those.

One vocabulary for every bench: mode is fwd | fwd_bwd | bwd | plan | step | generate (or the
op's own verb); metric names in `METRICS` (seconds, peak_mem_bytes, GB/s, ...): a bench
that needs a new one adds it there. A/B comparisons are timed by `time_interleaved`.

Where rows go (`results_dir`): a results directory outside the repository, $NOVA_BENCH_OUT
or /tmp/nova-bench, so that running a bench never overwrites the committed rows; with
`--update-results` (any bench, or run_all.py; or NOVA_BENCH_UPDATE_RESULTS=1) they go to
benchmarks/results/, the committed ones. This module takes `--update-results` out of
sys.argv when it is imported, so every bench's own argument parser accepts it.
"""

from __future__ import annotations

import csv
import ctypes
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

COLUMNS = ("op", "impl", "shape", "mode", "metric", "p50", "p20", "p80")
METRICS = (
    "seconds",  # wall time of one call
    "peak_mem_bytes",  # peak extra memory of one call (`peak_memory`): inputs excluded
    "GB/s",
    "frac_copy_bw",
    "tokens_per_s",
    "real_tokens_per_s",
    "real_token_fraction",
    "mfu",
    "efficiency",
    "lb_over_bins",
    "bins",
    "seqs_per_s",
    "x_gemm3",
    "mem_vs_naive",
    "oom",
    "token_agreement",  # fraction of rows whose generated tokens equal the baseline's
    "reward",  # an RL run's mean reward (bench_async_rlvr: the last steps')
    "speedup",  # B's throughput over A's, measured interleaved in the same run
)
ENV_COLUMNS = ("device", "torch", "triton", "commit")

COMMITTED_RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = "/tmp/nova-bench"
UPDATE_FLAG, UPDATE_ENV = "--update-results", "NOVA_BENCH_UPDATE_RESULTS"

if UPDATE_FLAG in sys.argv[1:]:  # any bench: the flag becomes the environment variable
    sys.argv = [a for a in sys.argv if a != UPDATE_FLAG]
    os.environ[UPDATE_ENV] = "1"


def update_results() -> bool:
    """True when this run updates the committed rows (--update-results)."""
    return os.environ.get(UPDATE_ENV, "").lower() in ("1", "true", "yes")


def results_dir() -> Path:
    """benchmarks/results/ with --update-results, else $NOVA_BENCH_OUT or /tmp/nova-bench
    (created)."""
    if update_results():
        return COMMITTED_RESULTS
    d = Path(os.environ.get("NOVA_BENCH_OUT") or DEFAULT_OUT)
    d.mkdir(parents=True, exist_ok=True)
    return d


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], warmup: int = 3, reps: int = 20) -> tuple[float, ...]:
    """Wall time of `fn()` in seconds: (p50, p20, p80) over `reps` calls after `warmup` calls.
    Synchronizes CUDA around every call when CUDA is available."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    t = torch.tensor(times, dtype=torch.float64)
    return tuple(float(torch.quantile(t, q)) for q in (0.5, 0.2, 0.8))


def time_interleaved(
    impls: dict[str, Callable[[], object]], warmup: int = 3, reps: int = 20
) -> dict[str, tuple[float, ...]]:
    """Wall times of several implementations measured interleaved (A B A B ...: round r
    runs every impl once, in an order rotated by r), so that drift of a shared or busy
    machine falls on all of them alike. Returns name -> (p50, p20, p80) seconds; the one
    timing driver of every A/B comparison in the benchmarks."""
    names = list(impls)
    for _ in range(warmup):
        for name in names:
            impls[name]()
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            sync()
            t0 = time.perf_counter()
            impls[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, ts in times.items():
        t = torch.tensor(ts, dtype=torch.float64)
        out[name] = tuple(float(torch.quantile(t, q)) for q in (0.5, 0.2, 0.8))
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak extra memory of one `fn()` call, in bytes (inputs excluded; outputs and grads
    that `fn` creates included).

    CUDA: `torch.cuda.max_memory_allocated` above the allocation before the call.
    CPU (Linux): the kernel's resident-set high-water mark. glibc is told to mmap every
    allocation >= 128 KiB (so a free returns pages at once instead of recycling them in the
    heap, which would hide them from RSS), the high-water mark (VmHWM) is reset through
    /proc/self/clear_refs before the call and read after it. Exact to a page for the large
    tensors that matter; small allocations reused from the heap do not show.
    """
    if torch.cuda.is_available():
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        sync()
        return int(torch.cuda.max_memory_allocated() - before)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, big blocks always mmapped
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _rss_bytes()
    fn()
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    return max(0, hwm - before)


def env_info() -> dict[str, str]:
    """device (GPU name, or 'cpu (<processor>)'), torch and triton versions, git commit."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu ({_cpu_name()})"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = ""
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_rows(path: str | Path, rows: list[dict], append: bool = False) -> None:
    """Writes tidy rows to a CSV (header included unless appending to an existing file).
    Missing env columns are filled from `env_info()`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = env_info()
    rows = [{**env, **row} for row in rows]
    extra = sorted({k for r in rows for k in r} - set(COLUMNS) - set(ENV_COLUMNS))
    columns = list(COLUMNS) + list(ENV_COLUMNS) + extra
    new_file = not (append and path.exists())
    with path.open("w" if new_file else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        if new_file:
            writer.writeheader()
        writer.writerows(rows)


SLOW_IMPLS = ("loop", "reference", "triton_interpreter")


def measure_impls(
    rows: list[dict],
    *,
    op: str,
    shape: str,
    mode: str,
    impls: dict[str, Callable[[], object]],
    reps: int,
    baseline: str | None = None,
    bytes_moved: int | None = None,
    copy_gbs: float | None = None,
) -> dict[str, tuple[float, ...]]:
    """Time (interleaved, `time_interleaved`) and measure the peak memory of each impl;
    append tidy rows; return the times.

    Rows per impl: seconds (p50/p20/p80), peak_mem_bytes; with `bytes_moved`, GB/s (and
    frac_copy_bw against `copy_gbs`); with `baseline` (an impl name), speedup_vs_<baseline>
    (ratio of p50s). Python loops, references and the Triton interpreter are timed in their
    own interleaved group with fewer reps.
    """
    slow = {k: f for k, f in impls.items() if k in SLOW_IMPLS}
    fast = {k: f for k, f in impls.items() if k not in SLOW_IMPLS}
    measured = time_interleaved(fast, warmup=3, reps=reps) if fast else {}
    if slow:
        measured.update(time_interleaved(slow, warmup=1, reps=max(3, reps // 4)))
    times: dict[str, tuple[float, ...]] = {}
    for impl, fn in impls.items():
        t = times[impl] = measured[impl]
        base = dict(op=op, impl=impl, shape=shape, mode=mode)
        rows.append({**base, "metric": "seconds", "p50": t[0], "p20": t[1], "p80": t[2]})
        rows.append({**base, "metric": "peak_mem_bytes", "p50": peak_memory(fn)})
        if bytes_moved is not None:
            gbs = [bytes_moved / x / 1e9 for x in t]  # from p50, p20 (fast), p80 (slow) times
            rows.append({**base, "metric": "GB/s", "p50": gbs[0], "p20": gbs[2], "p80": gbs[1]})
            if copy_gbs:
                rows.append({**base, "metric": "frac_copy_bw", "p50": gbs[0] / copy_gbs})
        if baseline is not None and impl != baseline:
            speedup = times[baseline][0] / t[0]
            rows.append({**base, "metric": f"speedup_vs_{baseline}", "p50": speedup})
    return times


def summary(times: dict[str, tuple[float, ...]]) -> str:
    return ", ".join(f"{k} {v[0] * 1e3:.3f} ms" for k, v in times.items())


def results_path(op: str) -> str:
    """<results_dir()>/<op>_<cuda|cpu>.csv"""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return str(results_dir() / f"{op}_{device}.csv")


# the RL benches' [B, T] shapes: the issue's grid on a GPU, small ones on CPU
GPU_BT_SHAPES = [(b, t) for b in (64, 512) for t in (1024, 8192)]
CPU_BT_SHAPES = [(8, 128), (64, 1024)]


def bench_args(doc: str | None, argv=None):
    """(args, device, quick) of a bench with the usual --quick / --reps flags; quick is
    forced on a machine without CUDA."""
    import argparse

    ap = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU)")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    return args, torch.device("cuda" if on_gpu else "cpu"), args.quick or not on_gpu


def finish(op: str, rows: list[dict]) -> None:
    """Write the rows to results_path(op) and say where."""
    path = results_path(op)
    write_rows(path, rows)
    print(f"wrote {path}")
