"""`nova decontaminate`: drop training items that overlap evaluation items by word n-grams.

    nova decontaminate --train sft.jsonl prefs.jsonl rlvr.jsonl \\
        --eval gsm8k_test.jsonl math_test.jsonl --ngram 8 --threshold 0.5 \\
        --out clean/ --report decontam_report.json
    nova decontaminate --train sft.jsonl --eval ifeval.jsonl --report-only --report r.json

Every eval item's grams go into a compiled index (nova_engine/data/decontam.py has the
normalization, the layouts and the exact rule); the training files are streamed in batches
through it. A training item whose score against any eval item reaches the threshold is
removed. Two scores (`--score`), both per (training item, eval item):
  ngram  (default) the fraction of the eval item's distinct n-grams the training item
         contains (data/decontam.py's coverage);
  token  open-instruct's: the fraction of the eval item's words covered by its n-grams found
         in the training item (0 for an eval item of fewer than n words). A 12-word item
         whose first 7 words appear: ngram 4/9 at n = 4, token 7/12.
Removed items: `--out DIR` gets one file per
training file, same name, holding every other line byte for byte and in order (blank lines
included; bad lines skipped with `--on-bad-line skip` are left out). `--report-only` writes
nothing but the report. The report (JSON) lists, per eval set, the contaminated eval items
(index, line, excerpt) and the training items that hit them (file:line, coverage: the
score named in settings.score); per training file the items kept and removed. A short table goes to the terminal.

Exit status: 0 (contaminated or not), 2 for a user error (a bad line names file:line).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from nova_engine.data.decontam import LayoutError, build_index, eval_segments, prepare, words
from nova_engine.data.decontam import train_segments as _train_segments
from nova_engine.data.formats import DataError, ReadStats
from nova_engine.logging import get_logger
from nova_engine.progress import emit

logger = get_logger(__name__)

EXCERPT_CHARS = 160
SCORES = ("ngram", "token")


@dataclass
class DecontamConfig:
    """Settings of one decontamination run."""

    ngram: int = 8
    """n: words per gram (segments shorter than n are one gram)."""
    threshold: float = 0.5
    """a training item is contaminated when its score against an eval item is >= this; in
    (0, 1]."""
    score: str = "ngram"
    """"ngram": the fraction of the eval item's distinct grams in the training item; "token"
    (open-instruct's): the fraction of the eval item's words covered by those grams."""
    all_turns: bool = False
    """chat messages: every turn, not just the user turns (training and eval items)."""
    eval_field: str | None = None
    """the eval items' text field; default: the first of prompt, question, problem, messages."""
    on_bad_line: str = "error"
    """"error": stop at the first bad line (file:line); "skip": count it and go on."""
    max_hits: int = 50
    """training hits listed per contaminated eval item in the report (all are counted)."""
    batch_size: int = 8192
    """training items per call into the compiled index."""

    def __post_init__(self) -> None:
        if self.ngram < 1:
            raise ValueError(f"ngram={self.ngram}: expected >= 1")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold}: expected a fraction in (0, 1]")
        if self.score not in SCORES:
            raise ValueError(f"score={self.score!r}: expected one of {', '.join(SCORES)}")
        if self.on_bad_line not in ("error", "skip"):
            raise ValueError(f'on_bad_line={self.on_bad_line!r}: expected "error" or "skip"')
        if self.max_hits < 0 or self.batch_size < 1:
            raise ValueError("max_hits must be >= 0 and batch_size >= 1")


@dataclass
class EvalSet:
    """The items of one eval file; global eval ids first_id .. first_id + len(lines) - 1."""

    path: str
    first_id: int
    lines: list[int] = field(default_factory=list)
    excerpts: list[str] = field(default_factory=list)
    segments: list[list[str]] = field(default_factory=list)  # kept for --score token
    bad: ReadStats = field(default_factory=ReadStats)


@dataclass
class TrainStats:
    path: str
    out: str | None
    items: int = 0
    removed: int = 0
    blank_lines: int = 0
    bad: ReadStats = field(default_factory=ReadStats)
    removed_by_eval_set: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------- reading


_RAW_DECODE = json.JSONDecoder().raw_decode


def _parse(raw: bytes) -> Any:
    """json.loads(raw), without its encoding detection and whitespace regexes for the usual
    line (UTF-8, the value, trailing JSON whitespace); anything else takes json.loads."""
    try:
        text = raw.decode()
        obj, end = _RAW_DECODE(text)
    except ValueError:
        return json.loads(raw)  # the exact error, or a BOM / leading whitespace handled
    if end != len(text) and text[end:].strip(" \t\n\r"):
        return json.loads(raw)  # raises "Extra data"
    return obj


def _records(path: str, on_bad_line: str, bad: ReadStats):
    """(lineno, raw bytes, parsed dict | None for a blank line); bad lines raise DataError or
    are counted in `bad` and left out."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                yield lineno, raw, None
                continue
            try:
                obj = _parse(raw)
            except UnicodeDecodeError as e:
                reason = f"not valid UTF-8 ({e.reason} at byte {e.start})"
                _bad(path, lineno, reason, "bad_utf8", on_bad_line, bad)
                continue
            except json.JSONDecodeError as e:
                reason = f"bad JSON: {e.msg} at column {e.colno}"
                _bad(path, lineno, reason, "bad_json", on_bad_line, bad)
                continue
            if not isinstance(obj, dict):
                _bad(
                    path,
                    lineno,
                    f"expected a JSON object per line, got {type(obj).__name__}",
                    "not_object",
                    on_bad_line,
                    bad,
                )
                continue
            yield lineno, raw, obj


def _bad(path, lineno, reason, kind, on_bad_line, bad: ReadStats) -> None:
    err = DataError(path, lineno, reason, kind)
    if on_bad_line == "error":
        raise err
    if bad.n_skipped < 3:
        logger.warning("skipping %s", err)
    bad.add_skip(err)


def _excerpt(segments: list[str]) -> str:
    text = " | ".join(" ".join(s.split()) for s in segments)
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 3] + "..."


def load_eval_sets(paths: list[str], cfg: DecontamConfig):
    """(compiled index, [EvalSet]) over all eval files, ids dense in file order."""
    sets: list[EvalSet] = []
    texts: list[list[str]] = []
    for path in paths:
        es = EvalSet(path, first_id=len(texts))
        for lineno, _, obj in _records(path, cfg.on_bad_line, es.bad):
            if obj is None:
                continue
            try:
                segs = eval_segments(obj, cfg.eval_field, cfg.all_turns)
            except LayoutError as e:
                _bad(path, lineno, e.reason, e.kind, cfg.on_bad_line, es.bad)
                continue
            texts.append(segs)
            es.lines.append(lineno)
            es.excerpts.append(_excerpt(segs))
            if cfg.score == "token":
                es.segments.append(segs)
        sets.append(es)
    # token: the index finds every pair sharing a gram, the token score then decides
    threshold = cfg.threshold if cfg.score == "ngram" else _ANY_GRAM
    return build_index(texts, cfg.ngram, threshold), sets


_ANY_GRAM = 1e-12  # an index threshold every pair with one shared gram reaches


def _contains(seq: list[str], sub: tuple[str, ...]) -> bool:
    k = len(sub)
    return any(tuple(seq[i : i + k]) == sub for i in range(len(seq) - k + 1))


def token_coverage(eval_segs: list[str], train_segs: list[str], n: int) -> float:
    """open-instruct's score of one pair: the fraction of the eval item's words that lie in
    one of its grams (data/decontam.py: n-grams per segment, a shorter segment whole) whose
    words appear contiguously in a segment of the training item; 0 when the eval item has
    fewer than n words."""
    ev = [w for w in (words(s) for s in eval_segs) if w]
    total = sum(len(w) for w in ev)
    if total < n:
        return 0.0
    tr = [w for w in (words(s) for s in train_segs) if w]
    train_grams = {tuple(w[i : i + n]) for w in tr for i in range(len(w) - n + 1)}
    covered = 0
    for w in ev:
        if len(w) < n:  # one gram: the whole segment
            covered += len(w) if any(_contains(t, tuple(w)) for t in tr) else 0
            continue
        hit = [False] * len(w)
        for i in range(len(w) - n + 1):
            if tuple(w[i : i + n]) in train_grams:
                hit[i : i + n] = [True] * n
        covered += sum(hit)
    return covered / total


# ---------------------------------------------------------------------------- scanning


class _Hits:
    """Training hits per eval id: the first max_hits (source, coverage) and a total."""

    def __init__(self, gram_counts: np.ndarray, max_hits: int):
        self.gram_counts, self.max_hits = gram_counts, max_hits
        self.listed: dict[int, list[dict[str, Any]]] = {}
        self.total: dict[int, int] = {}

    def add(self, eval_id: int, source: str, count: int, score: float | None = None) -> None:
        self.total[eval_id] = self.total.get(eval_id, 0) + 1
        listed = self.listed.setdefault(eval_id, [])
        if len(listed) < self.max_hits:
            coverage = count / int(self.gram_counts[eval_id]) if score is None else score
            listed.append({"source": source, "coverage": round(coverage, 6), "count": count})


def scan_train_file(path, out_path, index, cfg, set_of_id, sets, hits) -> TrainStats:
    """Streams one training file through the index; writes the clean lines to out_path
    (atomically: a temporary file renamed at the end) unless it is None."""
    st = TrainStats(path, out_path)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    out = None if out_path is None else open(tmp, "wb")
    lines: list[bytes] = []  # this batch's lines to write, items included
    pos: list[int] = []  # position in `lines` of each item of the batch
    linenos: list[int] = []
    texts: list[str | bytes] = []  # prepared item texts
    segments: list[list[str]] = []  # the items' segments (--score token)

    def flush() -> None:
        removed = set()
        if texts:
            offsets, ids, counts = index.scan(texts)
            for i in np.flatnonzero(np.diff(offsets)).tolist():
                source = f"{path}:{linenos[i]}"
                hit_sets = set()
                for j in range(int(offsets[i]), int(offsets[i + 1])):
                    e, score = int(ids[j]), None
                    if cfg.score == "token":
                        es = sets[set_of_id[e]]
                        score = token_coverage(es.segments[e - es.first_id], segments[i], cfg.ngram)
                        if score < cfg.threshold:
                            continue
                    hits.add(e, source, int(counts[j]), score)
                    hit_sets.add(set_of_id[e])
                if hit_sets:
                    removed.add(pos[i])
                for s in hit_sets:
                    name = sets[s].path
                    st.removed_by_eval_set[name] = st.removed_by_eval_set.get(name, 0) + 1
        st.items += len(texts)
        st.removed += len(removed)
        if out is not None and removed:
            out.writelines(ln for k, ln in enumerate(lines) if k not in removed)
        elif out is not None:
            out.writelines(lines)
        for buffered in (lines, pos, linenos, texts, segments):
            buffered.clear()

    try:
        for lineno, raw, obj in _records(path, cfg.on_bad_line, st.bad):
            if obj is None:
                st.blank_lines += 1
                lines.append(raw)
                continue
            try:
                segs = _train_segments(obj, cfg.all_turns)
            except LayoutError as e:
                _bad(path, lineno, e.reason, e.kind, cfg.on_bad_line, st.bad)
                continue
            pos.append(len(lines))
            lines.append(raw)
            linenos.append(lineno)
            texts.append(prepare(segs))
            if cfg.score == "token":
                segments.append(segs)
            if len(texts) == cfg.batch_size:
                flush()
        flush()
        if out is not None:
            out.close()
            os.replace(tmp, out_path)
    except BaseException:
        if out is not None:
            out.close()
            os.remove(tmp)
        raise
    return st


# ---------------------------------------------------------------------------- the run


def run(
    train: list[str],
    evals: list[str],
    cfg: DecontamConfig,
    out_dir: str | None = None,
    report_path: str | None = None,
) -> dict[str, Any]:
    """Decontaminates `train` against `evals`; returns the report (also written to
    report_path). out_dir None = report only."""
    t0 = time.perf_counter()
    _check_paths(train, evals, out_dir)
    index, sets = load_eval_sets(evals, cfg)
    for es in sets:  # an empty eval set would pass every training item unchecked
        if not es.lines:
            why = f"{es.bad.n_skipped} bad line(s) skipped" if es.bad.n_skipped else "no JSON line"
            raise _UserError(
                f"--eval {es.path}: no eval items ({why}): nothing to check the training "
                "data against; give a JSONL of eval items"
            )
    set_of_id = np.repeat(np.arange(len(sets)), [len(s.lines) for s in sets]).tolist()
    gram_counts = index.gram_counts()
    hits = _Hits(gram_counts, cfg.max_hits)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
    stats = []
    for path in train:
        out_path = None if out_dir is None else os.path.join(out_dir, os.path.basename(path))
        stats.append(scan_train_file(path, out_path, index, cfg, set_of_id, sets, hits))
        logger.info("%s: %d items, %d contaminated", path, stats[-1].items, stats[-1].removed)
    report = _report(cfg, sets, stats, hits, gram_counts, out_dir, time.perf_counter() - t0)
    if report_path is not None:
        parent = os.path.dirname(report_path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(report_path, "w") as f:
            json.dump(report, f, indent=1)
    return report


def _check_paths(train: list[str], evals: list[str], out_dir: str | None) -> None:
    for path in [*train, *evals]:
        if not os.path.isfile(path):
            raise _UserError(f"{path}: no such file")
    for kind, paths in (("--train", train), ("--eval", evals)):
        real = [os.path.realpath(p) for p in paths]
        if len(set(real)) != len(real):
            raise _UserError(f"{kind}: a file is given twice")
    if out_dir is None:
        return
    names = [os.path.basename(p) for p in train]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise _UserError(
            f"--train files share the name {sorted(dup)[0]!r}: --out holds one file per name"
        )
    for path in train:
        target = os.path.realpath(os.path.join(out_dir, os.path.basename(path)))
        if target == os.path.realpath(path):
            raise _UserError(f"--out {out_dir} would overwrite the input {path}")


class _UserError(Exception):
    pass


def _bad_report(bad: ReadStats) -> dict[str, Any]:
    return {
        "bad_lines_skipped": bad.n_skipped,
        "bad_lines_by_kind": dict(bad.skipped),
        "bad_line_examples": bad.examples,
    }


def _report(cfg, sets, stats, hits, gram_counts, out_dir, seconds) -> dict[str, Any]:
    eval_report = {}
    for es in sets:
        items = []
        for k, line in enumerate(es.lines):
            e = es.first_id + k
            if e in hits.total:
                items.append(
                    {
                        "index": k,
                        "line": line,
                        "ngrams": int(gram_counts[e]),
                        "excerpt": es.excerpts[k],
                        "training_hits": hits.total[e],
                        "hits": hits.listed[e],
                    }
                )
        n_items = len(es.lines)
        eval_report[es.path] = {
            "items": n_items,
            "items_without_text": int(
                (gram_counts[es.first_id : es.first_id + n_items] == 0).sum()
            ),
            **_bad_report(es.bad),
            "contaminated": len(items),
            "contaminated_items": items,
        }
    train_report = {
        st.path: {
            "out": st.out,
            "items": st.items,
            "kept": st.items - st.removed,
            "removed": st.removed,
            "blank_lines": st.blank_lines,
            **_bad_report(st.bad),
            "removed_by_eval_set": st.removed_by_eval_set,
        }
        for st in stats
    }
    return {
        "settings": {**asdict(cfg), "report_only": out_dir is None, "out": out_dir},
        "eval_sets": eval_report,
        "train_files": train_report,
        "totals": {
            "eval_items": sum(v["items"] for v in eval_report.values()),
            "eval_contaminated": sum(v["contaminated"] for v in eval_report.values()),
            "train_items": sum(st.items for st in stats),
            "train_removed": sum(st.removed for st in stats),
        },
        "seconds": round(seconds, 3),
    }


def format_table(report: dict[str, Any]) -> str:
    """The terminal summary of a report."""
    s = report["settings"]
    verb = "would remove" if s["report_only"] else "removed"
    rows = [
        f"decontaminate: {s['ngram']}-grams, {s['score']} score >= {s['threshold']}, "
        f"{report['seconds']:.1f} s" + (" (report only)" if s["report_only"] else "")
    ]
    w = max([len(p) for p in [*report["train_files"], *report["eval_sets"]]] + [13])
    rows.append(f"{'training file':<{w}}  {'items':>10}  {'kept':>10}  {verb:>12}  {'bad':>5}")
    for path, t in report["train_files"].items():
        rows.append(
            f"{path:<{w}}  {t['items']:>10,}  {t['kept']:>10,}  {t['removed']:>12,}  "
            f"{t['bad_lines_skipped']:>5,}"
        )
    rows.append(f"{'eval set':<{w}}  {'items':>10}  {'contaminated':>12}  {'training hits':>13}")
    for path, e in report["eval_sets"].items():
        n_hits = sum(i["training_hits"] for i in e["contaminated_items"])
        rows.append(f"{path:<{w}}  {e['items']:>10,}  {e['contaminated']:>12,}  {n_hits:>13,}")
    return "\n".join(rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nova decontaminate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--train", nargs="+", required=True, help="training JSONL files")
    p.add_argument("--eval", nargs="+", required=True, help="evaluation JSONL files")
    p.add_argument("--ngram", type=int, default=8, help="words per gram (default 8)")
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="score against an eval item that marks a training item (default 0.5)",
    )
    p.add_argument(
        "--score",
        choices=SCORES,
        default="ngram",
        help="ngram: fraction of the eval item's n-grams found (default); token: fraction of "
        "its words covered by found n-grams (open-instruct's)",
    )
    p.add_argument("--out", help="directory for the cleaned files (one per training file)")
    p.add_argument("--report", help="JSON report path")
    p.add_argument("--report-only", action="store_true", help="write no cleaned files")
    p.add_argument(
        "--all-turns", action="store_true", help="every chat turn, not only the user turns"
    )
    p.add_argument(
        "--eval-field",
        help="eval text field (default: prompt, question, problem, messages, the first present)",
    )
    p.add_argument("--on-bad-line", choices=("error", "skip"), default="error")
    p.add_argument(
        "--max-hits",
        type=int,
        default=50,
        help="training hits listed per contaminated eval item (default 50)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.report_only == (args.out is not None):
        emit("nova decontaminate: give --out DIR, or --report-only (not both)", err=True)
        return 2
    try:
        cfg = DecontamConfig(
            ngram=args.ngram,
            threshold=args.threshold,
            score=args.score,
            all_turns=args.all_turns,
            eval_field=args.eval_field,
            on_bad_line=args.on_bad_line,
            max_hits=args.max_hits,
        )
        report = run(args.train, args.eval, cfg, args.out, args.report)
    except (_UserError, DataError, ValueError, OSError) as e:
        emit(f"nova decontaminate: {e}", err=True)
        return 2
    emit(format_table(report))
    if args.out is not None:  # the one line saying what was written where
        files = report["train_files"]
        kept = sum(t["kept"] for t in files.values())
        removed = sum(t["removed"] for t in files.values())
        emit(f"decontaminate: wrote {kept:,} items ({removed:,} removed) in {len(files)} "
             f"file(s) -> {args.out}")  # fmt: skip
    if args.report:
        emit(f"report: {args.report}")
    return 0
