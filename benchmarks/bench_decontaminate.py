"""`nova decontaminate` benchmark (CPU, one thread): the compiled n-gram index against the
plain-Python n-gram-set reference, and the whole command end to end.

    python -m benchmarks.bench_decontaminate           # 100k training prompts (~30 s CPU)
    python -m benchmarks.bench_decontaminate --full    # 1M training prompts (the issue's goal)

Synthetic data, generated here (seed fixed): a Zipf(1) vocabulary of 30k made-up words, some
capitalized or carrying punctuation, 5% of the items with a non-ASCII phrase (the Python
normalization path). 10k eval items of 20-100 words (`{"question": ...}`); training items
are RLVR prompts `{"messages": [{"role": "user", "content": <50-150 words>}],
"ground_truth": ...}`, with 0.05% of them planted copies of eval items (half exact inside
extra words, half with 3 words changed). n = 8, threshold 0.5.

Rows (benchmarks/results/decontaminate_cpu.csv), timed A B A B ... and summarized as
p50 (p20, p80):
  build        eval file -> frozen compiled index (reading and parsing included)
  core         training texts already in memory (their segments) -> hits:
               cpp = prepare + NgramIndex.scan; python_sets = RefIndex.hits (plain Python:
               normalization, word tuples, an inverted dict) on a subsample (its time for
               all items is the linear extrapolation `est_seconds_all`, exact for this
               per-item algorithm up to cache effects); both on the same subsample for the
               speedup row, and cpp on all items
  read_parse   reading the training file and json.loads + layout extraction of every line
  end_to_end   `nova decontaminate` (decontaminate.run): eval index, reading, parsing,
               scanning, writing the cleaned file; items_per_s over the training items
The machine is shared (2 cores, other jobs running): every row carries the load average
at the start; `cpu_seconds` rows are process CPU time, less sensitive to that contention.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import results_path, write_rows
from nova_engine.data.decontam import RefIndex, build_index, eval_segments, prepare
from nova_engine.data.decontam import train_segments as get_train_segments
from nova_engine.tools.decontaminate import DecontamConfig, run

N_EVAL = 10_000
NGRAM, THRESHOLD = 8, 0.5
VOCAB = 30_000
PLANT_FRACTION = 0.0005
UNICODE_PHRASE = " café — naïve ﬁnal"


def make_vocab(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    lengths = rng.integers(2, 10, VOCAB)
    letters = rng.integers(97, 123, int(lengths.sum())).astype(np.uint8).tobytes().decode()
    words, pos = [], 0
    for k in lengths.tolist():
        words.append(letters[pos : pos + k])
        pos += k
    r = rng.random(VOCAB)
    words = [
        w.capitalize() if x < 0.05 else w + "," if x < 0.12 else w + "." if x < 0.16 else w
        for w, x in zip(words, r)
    ]
    p = 1.0 / np.arange(1, VOCAB + 1)
    return np.array(words, dtype=object), p / p.sum()


def texts(rng, vocab, p, n_items: int, lo: int, hi: int) -> list[str]:
    out = []
    for start in range(0, n_items, 20_000):
        m = min(20_000, n_items - start)
        lengths = rng.integers(lo, hi + 1, m)
        idx = rng.choice(len(vocab), size=int(lengths.sum()), p=p)
        words = vocab[idx].tolist()
        pos = 0
        for k, u in zip(lengths.tolist(), (rng.random(m) < 0.05).tolist()):
            out.append(" ".join(words[pos : pos + k]) + (UNICODE_PHRASE if u else ""))
            pos += k
    return out


def make_data(tmp: Path, n_train: int, seed: int = 0) -> tuple[Path, Path, int]:
    """(eval file, training file, planted items)."""
    rng = np.random.default_rng(seed)
    vocab, p = make_vocab(rng)
    evals = texts(rng, vocab, p, N_EVAL, 20, 100)
    ev = tmp / "eval.jsonl"
    with ev.open("w") as f:
        f.writelines(json.dumps({"question": q, "answer": "1"}) + "\n" for q in evals)
    train = texts(rng, vocab, p, n_train, 50, 150)
    planted = rng.choice(n_train, max(2, int(n_train * PLANT_FRACTION)), replace=False)
    for j, i in enumerate(planted.tolist()):
        e = evals[int(rng.integers(N_EVAL))]
        if j % 2:
            w = e.split()
            for k in rng.choice(len(w), 3, replace=False).tolist():
                w[k] = "edited"
            e = " ".join(w)
        train[i] = f"Please solve this: {e} Show your work."
    tr = tmp / "train.jsonl"
    with tr.open("w") as f:
        for i, t in enumerate(train):
            msg = {"messages": [{"role": "user", "content": t}], "ground_truth": str(i % 97)}
            f.write(json.dumps(msg) + "\n")
    return ev, tr, len(planted)


def read_parse(path: Path) -> list[list[str]]:
    with path.open("rb") as f:
        return [get_train_segments(json.loads(line)) for line in f]


def timed(fn) -> tuple[float, float, object]:
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def summarize(xs: list[float]) -> dict[str, float]:
    if len(xs) == 1:
        return {"p50": xs[0], "p20": xs[0], "p80": xs[0]}
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return {"p50": statistics.median(xs), "p20": q[1], "p80": q[7]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--full", action="store_true", help="1M training prompts")
    ap.add_argument("--quick", action="store_true", help="the default size (make bench)")
    ap.add_argument("--train-items", type=int, help="override the number of training prompts")
    ap.add_argument("--reps", type=int, help="interleaved repetitions (default 3, full 2)")
    ap.add_argument("--subsample", type=int, default=5000, help="items for the A/B core")
    ap.add_argument("--out", default=results_path("decontaminate"))
    args = ap.parse_args(argv)
    n_train = args.train_items or (1_000_000 if args.full else 100_000)
    reps = args.reps or (2 if args.full else 3)
    load = f"{os.getloadavg()[0]:.1f}"
    device_note = f"cpu, 1 thread, 2-core machine shared with other jobs (load avg {load})"
    shape = f"train={n_train},eval={N_EVAL},train_words=50-150,eval_words=20-100,n={NGRAM}"
    rows: list[dict] = []

    def row(impl, mode, metric, values, **extra):
        rows.append(
            {
                "op": "decontaminate",
                "impl": impl,
                "shape": shape,
                "mode": mode,
                "metric": metric,
                **summarize(values),
                "note": device_note,
                **extra,
            }
        )

    with tempfile.TemporaryDirectory(prefix="bench_decontam_") as tmp:
        t0 = time.perf_counter()
        ev, tr, n_planted = make_data(Path(tmp), n_train)
        size_mb = tr.stat().st_size / 1e6
        print(
            f"data: {n_train} training items ({size_mb:.0f} MB), {N_EVAL} eval items, "
            f"{n_planted} planted; generated in {time.perf_counter() - t0:.1f} s; load {load}"
        )
        cfg = DecontamConfig(ngram=NGRAM, threshold=THRESHOLD)
        eval_items = [eval_segments(json.loads(x)) for x in ev.open("rb")]
        train_items = read_parse(tr)
        sub = train_items[: args.subsample]
        ref = RefIndex(eval_items, NGRAM, THRESHOLD)
        index = build_index(eval_items, NGRAM, THRESHOLD)
        ab = {
            "cpp": lambda: index.scan([prepare(s) for s in sub]),
            "python_sets": lambda: [ref.hits(s) for s in sub],
        }
        # the two must agree on the subsample
        cpp_hits = ab["cpp"]()
        py_hits = ab["python_sets"]()
        offsets, ids, counts = cpp_hits
        flat = [
            sorted(zip(ids[a:b].tolist(), counts[a:b].tolist()))
            for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())
        ]
        assert flat == py_hits, "compiled index and reference disagree"

        times: dict[str, list[float]] = {
            k: [] for k in ("build", "cpp", "python_sets", "cpp_all", "read_parse", "end_to_end")
        }
        cpu: dict[str, list[float]] = {k: [] for k in times}
        report = None
        for r in range(reps):
            for name, fn in (
                (
                    "build",
                    lambda: build_index(
                        (eval_segments(json.loads(x)) for x in ev.open("rb")), NGRAM, THRESHOLD
                    ),
                ),
                ("cpp", ab["cpp"]),
                ("python_sets", ab["python_sets"]),
                ("cpp_all", lambda: index.scan([prepare(s) for s in train_items])),
                ("read_parse", lambda: read_parse(tr)),
                ("end_to_end", lambda: run([str(tr)], [str(ev)], cfg, str(Path(tmp) / "clean"))),
            ):
                wall, cpu_s, out = timed(fn)
                times[name].append(wall)
                cpu[name].append(cpu_s)
                if name == "end_to_end":
                    report = out
                print(f"rep {r}: {name:<12} {wall:8.3f} s (cpu {cpu_s:.3f} s)", flush=True)
        sub_n = len(sub)
        row("cpp", "build", "seconds", times["build"], items=N_EVAL)
        for impl in ("cpp", "python_sets"):
            row(impl, "core", "seconds", times[impl], items=sub_n)
            row(impl, "core", "cpu_seconds", cpu[impl], items=sub_n)
            row(impl, "core", "items_per_s", [sub_n / t for t in times[impl]], items=sub_n)
        row(
            "python_sets",
            "core",
            "est_seconds_all",
            [t * n_train / sub_n for t in times["python_sets"]],
            items=n_train,
        )
        speed = [p / c for p, c in zip(times["python_sets"], times["cpp"])]
        row("cpp", "core", "speedup_vs_python_sets", speed, items=sub_n)
        row("cpp", "core", "seconds", times["cpp_all"], items=n_train)
        row("cpp", "core", "cpu_seconds", cpu["cpp_all"], items=n_train)
        row("python", "read_parse", "seconds", times["read_parse"], items=n_train)
        row("cpp", "end_to_end", "seconds", times["end_to_end"], items=n_train)
        row("cpp", "end_to_end", "cpu_seconds", cpu["end_to_end"], items=n_train)
        row(
            "cpp",
            "end_to_end",
            "items_per_s",
            [n_train / t for t in times["end_to_end"]],
            items=n_train,
        )
        removed = report["train_files"][str(tr)]["removed"]
        print(
            f"end to end: removed {removed} of {n_train} ({n_planted} planted); "
            f"p50 {statistics.median(times['end_to_end']):.1f} s"
        )
        row("cpp", "end_to_end", "removed", [removed], items=n_train, planted=n_planted)
    for r in rows:
        if r["metric"] in ("seconds", "cpu_seconds", "est_seconds_all"):
            print(
                f"{r['impl']:>12} {r['mode']:<11} {r['metric']:<16} items={r['items']:<8} "
                f"p50 {r['p50']:9.3f} (p20 {r['p20']:.3f}, p80 {r['p80']:.3f})"
            )
    write_rows(args.out, rows, append=Path(args.out).exists())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
