"""The PAS data pipeline (arXiv 2407.06027, section 3): prompt pool -> (prompt, complement)
SFT pairs.

    records, report = build_data(pool, seeds, teacher, judge, BuildConfig())

Steps, each counted in `report["counts"]`:
1. dedup      exact and near duplicates removed (nova_engine.tools.pas.dedup);
2. categorize one category per prompt: a classifier's label or the teacher's answer to the
              constrained question, parsed (unknown -> "other");
3. generate   the teacher writes a complement from up to `shots` seeds of the category;
              an empty complement, or one in another script than the prompt, is rejected by
              rule (no judge call);
4. judge      the judge's JSON verdict; an unparseable reply is asked again (with a reminder
              of the format) up to `judge_retries` times, then the prompt is dropped
              (dropped_malformed);
5. regenerate a rejected complement is written again (the rejection's reason in the teacher's
              prompt) up to `max_regen` times, then the prompt is dropped (dropped_rejected).
A prompt that does not fit a model's context is dropped (dropped_too_long).
Every unique prompt ends in exactly one of: written, dropped_malformed, dropped_rejected,
dropped_too_long.

Output records (the SFT stage's chat layout, nova_engine.data.formats):
    {"messages": [{"role": "user", "content": <prompt>},
                  {"role": "assistant", "content": <complement>}],
     "category": str, "id"?: the pool line's id}
in the pool's order. The PAS model is trained on exactly this: the raw prompt in, the
complement out (`nova pas augment` asks it the same way).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from nova_engine.logging import get_logger
from nova_engine.tools.pas import prompts as P
from nova_engine.tools.pas.dedup import DedupConfig, deduplicate
from nova_engine.tools.pas.generator import Generator
from nova_engine.tools.pas.records import OTHER, PASError, PoolPrompt, Seed

log = get_logger(__name__)

Classifier = Callable[[Sequence[str]], Sequence[str | None]]

COUNT_KEYS = (
    "read", "duplicates_exact", "duplicates_near", "unique", "generated", "regenerated",
    "rule_rejected", "judged", "accepted", "rejected", "malformed", "judge_retries",
    "dropped_malformed", "dropped_rejected", "dropped_too_long", "written",
)  # fmt: skip


@dataclass
class BuildConfig:
    """Settings of `build_data`."""

    categories: tuple[str, ...] = ()
    """Category names, "other" last (records.parse_categories); empty = the seeds'."""
    shots: int = 3
    """Seeds of the prompt's category in the teacher's prompt."""
    max_regen: int = 2
    """Regenerations of a rejected complement before the prompt is dropped."""
    judge_retries: int = 2
    """Times a malformed judge reply is asked again before the prompt is dropped."""
    script_check: bool = True
    """Reject complements in another script than the prompt before judging."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Near-duplicate removal."""
    examples: int = 3
    """Accepted examples kept in the report."""

    def __post_init__(self) -> None:
        for k in ("shots", "max_regen", "judge_retries", "examples"):
            if getattr(self, k) < 0:
                raise PASError(f"{k.replace('_', '-')} {getattr(self, k)}: expected >= 0")


@dataclass
class _Item:
    idx: int  # position in the pool
    prompt: PoolPrompt
    category: str = OTHER
    complement: str = ""
    reason: str | None = None  # the last rejection's reason
    attempts: int = 0


def _judge(items: list[_Item], judge: Generator, cfg: BuildConfig, counts: dict) -> list:
    """Verdict per item (a Verdict, "too_long" or None = malformed after the retries)."""
    out: list[Any] = [None] * len(items)
    pending = list(range(len(items)))
    for attempt in range(cfg.judge_retries + 1):
        if attempt:
            counts["judge_retries"] += len(pending)
        replies = judge([P.judge_prompt(items[k].prompt.text, items[k].complement, attempt > 0)
                         for k in pending])  # fmt: skip
        still = []
        for k, reply in zip(pending, replies):
            if reply is None:
                out[k] = "too_long"
                continue
            v = P.parse_verdict(reply)
            if v is None:
                counts["malformed"] += 1
                still.append(k)
            else:
                out[k] = v
        pending = still
        if not pending:
            break
    return out


def categorize(
    texts: Sequence[str], categories: Sequence[str], *, teacher: Generator | None = None,
    classifier: Classifier | None = None,
) -> list[str]:  # fmt: skip
    """One category per text: the classifier's labels, else the teacher's answers."""
    if classifier is not None:
        raw = list(classifier(texts))
    elif teacher is not None:
        raw = teacher([P.category_prompt(t, categories) for t in texts])
    else:
        raise ValueError("categorize needs a teacher or a classifier")
    return [P.parse_category(r, categories) for r in raw]


def build_data(
    pool: Sequence[PoolPrompt],
    seeds: Sequence[Seed],
    teacher: Generator,
    judge: Generator,
    cfg: BuildConfig | None = None,
    *,
    classifier: Classifier | None = None,
) -> tuple[list[dict], dict[str, Any]]:
    """(SFT records, report) — see the module docstring. The report holds "counts" (the
    COUNT_KEYS), "categories" (unique prompts per category), "dedup" (method, threshold,
    n-gram) and "examples" (a few accepted pairs)."""
    cfg = cfg or BuildConfig()
    names = cfg.categories or tuple(s.category for s in seeds)
    categories = (*dict.fromkeys(c for c in names if c != OTHER), OTHER)
    counts = dict.fromkeys(COUNT_KEYS, 0)
    counts["read"] = len(pool)

    dd = deduplicate([p.text for p in pool], cfg.dedup)
    counts["duplicates_exact"], counts["duplicates_near"] = len(dd.exact), len(dd.near)
    counts["unique"] = len(dd.keep)
    items = [_Item(i, pool[i]) for i in dd.keep]
    log.info("pas: %d prompts, %d unique (%s dedup)", len(pool), len(items), dd.method)

    cats = categorize([it.prompt.text for it in items], categories, teacher=teacher,
                      classifier=classifier) if items else []  # fmt: skip
    per_cat = dict.fromkeys(categories, 0)
    for it, c in zip(items, cats):
        it.category = c
        per_cat[c] += 1

    accepted: list[_Item] = []
    dropped: list[tuple[_Item, str]] = []  # (item, why) of the prompts that were not written
    active = items
    for round_ in range(cfg.max_regen + 1):
        if not active:
            break
        if round_:
            counts["regenerated"] += len(active)
        texts = teacher([
            P.complement_prompt(it.prompt.text,
                                P.pick_seeds(seeds, it.category, it.prompt.text, cfg.shots),
                                it.reason if round_ else None)
            for it in active
        ])  # fmt: skip
        counts["generated"] += len(active)
        to_judge, rejected = [], []
        for it, text in zip(active, texts):
            it.attempts += 1
            if text is None:
                counts["dropped_too_long"] += 1
                dropped.append((it, "the teacher's complement exceeded max_new_tokens"))
                continue
            it.complement = P.clean_complement(text)
            rule = "empty complement" if not it.complement else None
            if rule is None and cfg.script_check:
                rule = P.script_switch(it.prompt.text, it.complement)
            if rule is not None:
                counts["rule_rejected"] += 1
                it.reason = rule
                rejected.append(it)
            else:
                to_judge.append(it)
        verdicts = _judge(to_judge, judge, cfg, counts) if to_judge else []
        for it, v in zip(to_judge, verdicts):
            if v == "too_long":
                counts["dropped_too_long"] += 1
                dropped.append((it, "the judge's prompt exceeded the model's length"))
            elif v is None:
                counts["dropped_malformed"] += 1
                dropped.append((it, "the judge's verdict could not be parsed"))
            else:
                counts["judged"] += 1
                if v.accept:
                    counts["accepted"] += 1
                    accepted.append(it)
                else:
                    counts["rejected"] += 1
                    it.reason = v.reason or "rejected by the judge"
                    rejected.append(it)
        if round_ == cfg.max_regen:
            counts["dropped_rejected"] += len(rejected)
            dropped += [(it, it.reason or "rejected") for it in rejected]
        active = rejected

    accepted.sort(key=lambda it: it.idx)
    records = []
    for it in accepted:
        rec: dict[str, Any] = {
            "messages": [
                {"role": "user", "content": it.prompt.text},
                {"role": "assistant", "content": it.complement},
            ],
            "category": it.category,
        }
        if it.prompt.id is not None:
            rec["id"] = it.prompt.id
        records.append(rec)
    counts["written"] = len(records)
    report = {
        "counts": counts,
        "categories": per_cat,
        "dedup": {"method": dd.method, **{k: v for k, v in asdict(cfg.dedup).items()
                                          if k in ("threshold", "ngram", "num_perm", "bands")}},
        "examples": [
            {"category": it.category, "prompt": it.prompt.text, "complement": it.complement,
             "attempts": it.attempts}
            for it in accepted[: cfg.examples]
        ],
        "rejected_examples": [
            {"category": it.category, "prompt": it.prompt.text, "complement": it.complement,
             "attempts": it.attempts, "reason": why}
            for it, why in sorted(dropped, key=lambda d: d[0].idx)[: cfg.examples]
        ],
    }  # fmt: skip
    return records, report
