"""Reward-model data for the synthetic arithmetic task (nova_engine.data.synthetic): correct
answers are preferred, and the further a wrong answer is from the right one, the worse.

`write_reward_task(out_dir, ...)` writes, from one seed:
- `rm_regression.jsonl`  HelpSteer2 layout: {"id", "prompt", "response", helpfulness,
                         correctness, coherence, complexity, verbosity}; a right answer
                         scores helpfulness = correctness = 4, a wrong one 2 (off by one),
                         1 (off by 2..10) or 0 (further); coherence 4, complexity 1,
                         verbosity 1; every 4th record leaves verbosity out (a missing score)
- `rm_pref.jsonl`        HelpSteer2-Preference layout: {"id", "prompt", "response_1",
                         "response_2", "preference_strength"}; the right answer wins with
                         strength 1 (off by one), 2 (off by 2..10) or 3 (further); its side
                         (response_1 or response_2, i.e. the sign) is drawn at random
- `rm_eval.jsonl`        RewardBench layout on held-out problems: {"id", "prompt", "chosen",
                         "rejected", "subset": "synthetic-arith"}
Held-out problems never occur in the two training files (compared as (a, op, b)).
`far=f` draws a fraction f of all wrong answers (in every file) far off instead, 11 to 60 away
from the right one (wrongness 3): a reward model that knows an answer's magnitude tells those
apart (the near misses need the ones digit); `max_value` / `ops` / `in_words` / `step` shape the problems
as in nova_engine.data.synthetic.
"""

from __future__ import annotations

import json
import os
import random

from nova_engine.data.synthetic import Problem, make_splits
from nova_engine.data.synthetic import wrong_answer as near_answer

EVAL_SUBSET = "synthetic-arith"
_FILES = {"regression": "rm_regression.jsonl", "pref": "rm_pref.jsonl", "eval": "rm_eval.jsonl"}


def wrongness(right: int, wrong: int, step: int = 1) -> int:
    """1 (off by one, or by `step`), 2 (off by up to 10) or 3 (further): the preference
    strength of the right answer over `wrong`."""
    d = abs(right - wrong)
    return 1 if d <= step else 2 if d <= 10 else 3


def far_answer(problem: Problem, rng: random.Random, step: int = 1) -> int:
    """A wrong answer 11 to 60 away from the right one (either side, never negative), a
    multiple of `step` away."""
    right = problem.answer
    ds = [d for d in range(11, 61) if d % step == 0]
    return rng.choice([right + d for d in ds] + [right - d for d in ds if d <= right])


def write_reward_task(
    out_dir: str | os.PathLike,
    *,
    n_regression: int = 1000,
    n_pref: int = 1000,
    n_eval: int = 200,
    seed: int = 0,
    far: float = 0.0,
    max_value: int = 99,
    ops: tuple[str, ...] = ("plus", "minus"),
    in_words: bool = True,
    step: int = 1,
) -> dict[str, str]:
    """Write the three files under `out_dir`; returns {"regression", "pref", "eval"} -> path.
    Same arguments -> same bytes."""
    if not 0.0 <= far <= 1.0:
        raise ValueError(f"far={far}: expected a fraction in [0, 1]")
    reg, pref, ev = make_splits(n_regression // 2, n_pref, n_eval, seed=seed + 100,
                                max_value=max_value, ops=ops, in_words=in_words,
                                step=step)  # fmt: skip
    rng, far_rng = random.Random(seed + 101), random.Random(seed + 102)

    def wrong_answer(p: Problem, rng: random.Random) -> int:  # near miss, or far with `far`
        if far > 0 and far_rng.random() < far:
            return far_answer(p, far_rng, step)
        return near_answer(p, rng, step=step)

    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f) for k, f in _FILES.items()}
    with open(paths["regression"], "w") as f:
        for i, p in enumerate(reg):
            wrong = wrong_answer(p, rng)
            for j, (ans, score) in enumerate(
                [(p.answer, 4), (wrong, 3 - wrongness(p.answer, wrong, step))]
            ):
                row = {"id": f"reg-{i}-{j}", "prompt": p.question(), "response": str(ans),
                       "helpfulness": score, "correctness": score, "coherence": 4,
                       "complexity": 1, "verbosity": 1}  # fmt: skip
                if (2 * i + j) % 4 == 3:
                    del row["verbosity"]
                f.write(json.dumps(row) + "\n")
    with open(paths["pref"], "w") as f:
        for i, p in enumerate(pref):
            wrong = wrong_answer(p, rng)
            m = wrongness(p.answer, wrong, step)
            first_right = rng.random() < 0.5
            r1, r2 = (p.answer, wrong) if first_right else (wrong, p.answer)
            row = {"id": f"pref-{i}", "prompt": p.question(), "response_1": str(r1),
                   "response_2": str(r2), "preference_strength": -m if first_right else m}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    with open(paths["eval"], "w") as f:
        for i, p in enumerate(ev):
            row = {"id": f"rm-eval-{i}", "prompt": p.question(), "chosen": str(p.answer),
                   "rejected": str(wrong_answer(p, rng)), "subset": EVAL_SUBSET}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return paths
