"""The ExPO alpha sweep: merge a candidate per alpha, score each on held-out pairs, keep the
best as the output.

    rows = expo_sweep("runs/rm_init", "runs/rm", [0.1, 0.3, 0.5, 1.0], "heldout.jsonl", "out/rm_expo")

Every check (inputs agree, --out free, the pairs parse and tokenize) runs before the first
candidate is written. Candidates are written into a hidden work directory next to --out;
alpha = 0 is scored on the aligned model itself (it is that model). The best candidate (the
highest primary metric, its mean margin breaking ties, then the earlier alpha in the list)
is renamed to --out with the table in its nova_merge.json; the others are deleted as soon as
they lose, or, with keep_all, moved to `<out>.candidates/alpha_<a>`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Sequence

import torch

from nova_engine.logging import get_logger
from nova_engine.tools.merge.core import (
    CHUNK_ELEMS,
    MERGE_RECORD,
    MergeError,
    check_compatible,
    check_out,
    make_tmp_dir,
    merge_models,
    open_inputs,
    replace_dir,
)
from nova_engine.tools.merge.methods import ExPO

logger = get_logger(__name__)

Scorer = Callable[[str], dict[str, float]]


def _check_alphas(alphas: Sequence[float]) -> list[float]:
    alphas = [float(a) for a in alphas]
    if not alphas:
        raise MergeError("--alphas: expected at least one value")
    bad = [a for a in alphas if not math.isfinite(a)]
    if bad:
        raise MergeError(f"--alphas: {bad[0]} is not a finite number")
    if len(set(alphas)) != len(alphas):
        raise MergeError(f"--alphas {alphas}: a value is repeated")
    return alphas


def _candidate_name(alpha: float) -> str:
    return f"alpha_{alpha:g}"


def expo_sweep(
    init_dir: str,
    aligned_dir: str,
    alphas: Sequence[float],
    eval_path: str,
    out_dir: str,
    *,
    ref_dir: str | None = None,
    keep_all: bool = False,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
    dtype: torch.dtype | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    tokenizer_dir: str | None = None,
    template: str | None = None,
    scorer: Scorer | None = None,
    metric: str | None = None,
    margin: str | None = None,
    chunk_elems: int = CHUNK_ELEMS,
) -> list[dict]:
    """Sweep ExPO's alpha; returns one row per alpha, in the given order:
    {"alpha", <metrics...>, "n_pairs", "selected"}. The selected candidate is at `out_dir`.

    The pairs are tokenized with the tokenizer of `tokenizer_dir` (default: the aligned
    model's directory) and its chat template, or `template` (a built-in name or a Jinja
    file, see nova_engine.data.tokenize). `scorer(model_dir) -> {metric: value}` replaces
    the default PairScorer (transformers, float32, CPU; see nova_engine.tools.merge.score);
    pass `metric` (maximized) with it, and optionally `margin` (the tie-breaker)."""
    from nova_engine.tools.merge.score import PairScorer, load_pairs, model_kind

    alphas = _check_alphas(alphas)
    inputs = [init_dir, aligned_dir] + ([ref_dir] if ref_dir else [])
    check_out(out_dir, inputs, overwrite)
    cand_dir = out_dir.rstrip("/\\") + ".candidates"
    if keep_all:
        check_out(cand_dir, inputs, overwrite)
    models = open_inputs([init_dir, aligned_dir], ExPO().roles(2))
    try:
        check_compatible(models, ExPO.reference)
    finally:
        for m in models:
            m.weights.close()
    n_pairs = None
    if scorer is None:
        config = models[1].config
        kind = model_kind(config, f"--aligned {aligned_dir}")
        max_length = max_length or config.get("max_position_embeddings")
        pairs = load_pairs(eval_path, tokenizer_dir or aligned_dir, max_length, template)
        n_pairs = len(pairs)
        default = PairScorer(pairs, kind, ref_dir, batch_size)
        scorer, metric, margin = default, default.primary, default.margin
    elif metric is None:
        raise MergeError("expo_sweep: a custom scorer needs the name of the metric to maximize")

    work = make_tmp_dir(out_dir, "sweep")
    rows: list[dict] = []
    best: tuple[int, tuple[float, float]] | None = None
    try:
        for k, alpha in enumerate(alphas):
            cand = aligned_dir
            if alpha != 0:
                cand = os.path.join(work, _candidate_name(alpha))
                merge_models(ExPO(alpha), [init_dir, aligned_dir], cand,
                             max_shard_size=max_shard_size, dtype=dtype,
                             chunk_elems=chunk_elems)  # fmt: skip
            scores = scorer(cand)
            if metric not in scores:
                raise MergeError(f"the scorer gave {sorted(scores)}, not the metric {metric!r}")
            rows.append({"alpha": alpha, **scores, **({"n_pairs": n_pairs} if n_pairs else {})})
            key = (scores[metric], scores.get(margin, 0.0) if margin else 0.0)
            logger.info("alpha %g: %s", alpha, ", ".join(f"{n} {v:.4f}" for n, v in scores.items()))
            if best is None or key > best[1]:
                if best is not None and not keep_all:
                    _drop(work, alphas[best[0]])
                best = (k, key)
            elif not keep_all:
                _drop(work, alpha)
        assert best is not None
        for k, row in enumerate(rows):
            row["selected"] = k == best[0]
        record = {"sweep": {"eval": os.path.abspath(eval_path) if eval_path else None,
                            "metric": metric, "rows": rows}}  # fmt: skip
        best_alpha = alphas[best[0]]
        if best_alpha == 0:  # the aligned model itself: a streamed copy
            merge_models(ExPO(0.0), [init_dir, aligned_dir], out_dir, overwrite=overwrite,
                         max_shard_size=max_shard_size, dtype=dtype, chunk_elems=chunk_elems,
                         extra_record=record)  # fmt: skip
        else:
            src = os.path.join(work, _candidate_name(best_alpha))
            with open(os.path.join(src, MERGE_RECORD)) as fh:
                rec = json.load(fh)
            with open(os.path.join(src, MERGE_RECORD), "w") as fh:
                json.dump({**rec, **record}, fh, indent=2)
            replace_dir(src, out_dir)
        if keep_all:
            replace_dir(work, cand_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def _drop(work: str, alpha: float) -> None:
    shutil.rmtree(os.path.join(work, _candidate_name(alpha)), ignore_errors=True)


def format_table(rows: list[dict]) -> str:
    """The sweep as a plain-text table (the selected row marked with *)."""
    keys = [k for k in rows[0] if k not in ("alpha", "selected")]
    header = ["alpha"] + keys + ["kept"]
    lines = [header]
    for r in rows:
        cells = [f"{r['alpha']:g}"]
        cells += [f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        lines.append(cells + ["*" if r.get("selected") else ""])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)
