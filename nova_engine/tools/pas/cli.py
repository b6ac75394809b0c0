"""`nova pas`: Baichuan's Prompt Augmentation System (arXiv 2407.06027) — build its SFT data
with a teacher and a judge model, train it with the SFT stage, apply it to prompts.

    nova pas build-data --prompts pool.jsonl --teacher models/teacher --judge models/judge \\
        --out pas_sft.jsonl [--classifier DIR] [--categories qa,coding,...] [--max-regen 2] \\
        [--seeds seeds.jsonl] [--report pas_sft.report.json]
    nova sft --recipe recipes/pas_7b.yaml                # train the PAS model on pas_sft.jsonl
    nova pas augment --pas-model runs/pas_7b/sft/hf --in prompts.jsonl --out augmented.jsonl

build-data: near-duplicate removal (word 3-gram shingles, Jaccard >= 0.7: exact comparison up
to 2000 prompts, MinHash + LSH beyond), a category per prompt (--classifier: a
*ForSequenceClassification directory's labels, or a generative model asked like the teacher;
default: the teacher), complements from few-shot seeds per category (--seeds, default the
shipped nova_engine/tools/pas/seeds.jsonl), the judge's JSON verdict (malformed replies asked
again --judge-retries times, then dropped), regeneration of rejected complements up to
--max-regen times. Output: SFT chat lines {"messages": [user prompt, assistant complement],
"category", "id"?}. The counts of every step are printed as a table and written to --report.

augment: the PAS model's complement appended to each line's prompt after a blank line (the
original text kept verbatim; see nova_engine.tools.pas.augment), every other field kept, plus
"pas_complement": SFT, preference and RLVR lines stay loadable by their readers.

Models are local HF directories (or training checkpoints with an hf/ export) run through Nova's
own KV-cache generation, in one process. Exit status 0, or 2 with one line naming the file:line
or option for a user error.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from nova_engine.logging import get_logger
from nova_engine.progress import emit, format_duration

log = get_logger(__name__)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tokenizer", help="tokenizer directory for every model (default: each model's own)"
    )
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--batch-size", type=int, default=32, help="rows per decode batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--report", help="JSON report (default: <out>.report.json)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nova pas", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-data", help="prompt pool -> (prompt, complement) SFT data")
    b.add_argument("--prompts", required=True, help="pool JSONL (prompt or messages per line)")
    b.add_argument("--teacher", required=True, help="model writing categories and complements")
    b.add_argument("--judge", required=True, help="model judging complements (JSON verdicts)")
    b.add_argument("--out", required=True, help="SFT JSONL to write")
    b.add_argument("--classifier", help="category model (*ForSequenceClassification or generative)")
    b.add_argument(
        "--categories", action="append", help="comma-separated names (default: the seeds')"
    )
    b.add_argument("--seeds", help="few-shot seeds JSONL (default: the shipped seeds.jsonl)")
    b.add_argument("--shots", type=int, default=3, help="seeds per teacher prompt")
    b.add_argument(
        "--max-regen", type=int, default=2, help="regenerations of a rejected complement"
    )
    b.add_argument("--judge-retries", type=int, default=2, help="re-asks after a malformed verdict")
    b.add_argument("--dedup", default="auto", choices=("auto", "exact", "minhash"))
    b.add_argument("--dedup-threshold", type=float, default=0.7, help="near-duplicate Jaccard")
    b.add_argument("--ngram", type=int, default=3, help="words per shingle")
    b.add_argument("--no-script-check", action="store_true",
                   help="do not reject complements in another script than the prompt")  # fmt: skip
    b.add_argument("--teacher-temperature", type=float, default=0.7)
    b.add_argument("--judge-temperature", type=float, default=0.0)
    b.add_argument("--max-new-tokens", type=int, default=256, help="complement length cap")
    b.add_argument("--judge-max-new-tokens", type=int, default=128)
    _common(b)
    a = sub.add_parser("augment", help="append the PAS model's complement to each prompt")
    a.add_argument(
        "--pas-model", required=True, help="the trained PAS model (HF dir or checkpoint)"
    )
    a.add_argument("--in", dest="inp", required=True, help="JSONL with prompt or messages per line")
    a.add_argument("--out", required=True, help="augmented JSONL to write")
    a.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    a.add_argument("--max-new-tokens", type=int, default=256)
    _common(a)
    return p


def format_table(title: str, rows: list[tuple[str, Any]]) -> str:
    w = max(len(k) for k, _ in rows)
    lines = [title, "-" * (w + 10)]
    lines += [f"{k:<{w}}  {v:>8}" for k, v in rows]
    return "\n".join(lines)


def _write_report(path: str, report: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)


def build_data_cmd(args: argparse.Namespace, models) -> int:
    from nova_engine.tools.pas.dedup import DedupConfig
    from nova_engine.tools.pas.generator import (
        GenConfig,
        SequenceClassifier,
        is_sequence_classifier,
    )
    from nova_engine.tools.pas.pipeline import BuildConfig, build_data
    from nova_engine.tools.pas.records import (
        DEFAULT_SEEDS,
        PASError,
        parse_categories,
        read_pool,
        read_seeds,
        write_jsonl,
    )  # fmt: skip

    seeds = read_seeds(args.seeds or DEFAULT_SEEDS)
    categories = parse_categories(args.categories, seeds)
    try:
        dedup = DedupConfig(method=args.dedup, threshold=args.dedup_threshold, ngram=args.ngram)
    except ValueError as e:
        raise PASError(f"dedup options: {e}") from None
    cfg = BuildConfig(categories=categories, shots=args.shots, max_regen=args.max_regen,
                      judge_retries=args.judge_retries, script_check=not args.no_script_check,
                      dedup=dedup)  # fmt: skip
    tcfg = GenConfig(
        temperature=args.teacher_temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    jcfg = GenConfig(temperature=args.judge_temperature, top_p=args.top_p,
                     max_new_tokens=args.judge_max_new_tokens, seed=args.seed + 1_000_003,
                     batch_size=args.batch_size)  # fmt: skip
    pool = read_pool(args.prompts)
    teacher = models.generator(args.teacher, tcfg, "--teacher")
    judge = models.generator(args.judge, jcfg, "--judge")
    # categories: a sequence classifier's labels, or a generative model's (the teacher's by
    # default) greedy short answer to the constrained question
    if args.classifier and is_sequence_classifier(args.classifier):
        classifier = SequenceClassifier(args.classifier, args.tokenizer)
    else:
        ccfg = GenConfig(
            temperature=0.0, max_new_tokens=16, seed=args.seed, batch_size=args.batch_size
        )
        option = "--classifier" if args.classifier else "--teacher"
        gen = models.generator(args.classifier or args.teacher, ccfg, option)
        classifier = _as_classifier(gen, categories)
    t0 = time.perf_counter()
    records, report = build_data(pool, seeds, teacher, judge, cfg, classifier=classifier)
    if not records:  # nothing to train on: say why, with the first rejected example
        report_path = args.report or args.out + ".report.json"
        report.update(prompts=args.prompts, out=None, teacher=args.teacher, judge=args.judge)
        _write_report(report_path, report)
        counts = ", ".join(f"{k}={v}" for k, v in report["counts"].items() if v)
        ex = report["rejected_examples"][:1]
        first = (
            f"; first rejected: prompt {_short(ex[0]['prompt'])}, complement "
            f"{_short(ex[0]['complement'])}: {ex[0]['reason']}"
            if ex
            else ""
        )
        raise PASError(
            f"no prompt passed, {args.out} NOT written ({counts}){first}; report: {report_path}"
        )
    write_jsonl(args.out, records)
    report.update(prompts=args.prompts, out=args.out, teacher=args.teacher, judge=args.judge,
                  classifier=args.classifier, seconds=round(time.perf_counter() - t0, 3))  # fmt: skip
    report_path = args.report or args.out + ".report.json"
    _write_report(report_path, report)
    rows = [(k, v) for k, v in report["counts"].items()]
    rows += [(f"category {k}", v) for k, v in report["categories"].items()]
    d = report["dedup"]
    emit(format_table(f"[pas build-data] {args.prompts} -> {args.out} "
                      f"({d['method']} dedup, Jaccard >= {d['threshold']}, {d['ngram']}-gram shingles; "
                      f"{format_duration(report['seconds'])})", rows))  # fmt: skip
    emit(f"[pas build-data] report: {report_path}")
    return 0


def _short(text: str, n: int = 80) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def _as_classifier(gen, categories):
    from nova_engine.tools.pas.prompts import category_prompt

    return lambda texts: gen([category_prompt(t, categories) for t in texts])


def augment_cmd(args: argparse.Namespace, models) -> int:
    from nova_engine.tools.pas.augment import augment_records, read_inputs
    from nova_engine.tools.pas.generator import GenConfig
    from nova_engine.tools.pas.records import write_jsonl

    inputs = read_inputs(args.inp)
    cfg = GenConfig(temperature=args.temperature, top_p=args.top_p,
                    max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size)  # fmt: skip
    pas = models.generator(args.pas_model, cfg, "--pas-model")
    t0 = time.perf_counter()
    out, counts = augment_records(inputs, pas)
    write_jsonl(args.out, out)
    report = {"counts": counts, "in": args.inp, "out": args.out, "pas_model": args.pas_model,
              "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    report_path = args.report or args.out + ".report.json"
    _write_report(report_path, report)
    emit(format_table(f"[pas augment] {args.inp} -> {args.out}", list(counts.items())))
    return 0


def main(argv: list[str] | None = None) -> int:
    from nova_engine.generate import GenerationError
    from nova_engine.model.hf_io import CheckpointError
    from nova_engine.tools.pas.generator import ModelSet
    from nova_engine.tools.pas.records import PASError

    args = parser().parse_args(argv)
    models = ModelSet(precision=args.precision, tokenizer=args.tokenizer)
    try:
        if args.cmd == "build-data":
            return build_data_cmd(args, models)
        return augment_cmd(args, models)
    except (PASError, GenerationError, CheckpointError) as e:
        emit(f"nova pas {args.cmd}: {e}", err=True)
        return 2
    finally:
        models.close()
