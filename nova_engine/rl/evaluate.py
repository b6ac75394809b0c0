"""RLVR held-out evaluation: greedy (and optionally sampled) responses to data.eval_paths,
verified (verifier rewards only; open-ended prompts count as unverified).

    evaluate = eval_fn(producer, held_out, ps, reward_config, greedy_params, sampled_params)
    metrics = evaluate()          # verified, verified/<dataset>, reward_mean, verified_at_t
"""

from __future__ import annotations

import numpy as np
import torch.distributed as dist

from nova_engine.rl.producer import EngineRollouts
from nova_engine.rl.verifiers import RewardConfig


def eval_fn(producer: EngineRollouts, prompts: list, ps, reward: RewardConfig, params,
            sampled=None):  # fmt: skip
    """An eval_fn for Loop.fit: greedy responses to held-out prompts (`params`), verified:
    verified fraction (overall and per data source) and mean reward; with `sampled`
    (SamplingParams at the training temperature, n = k) also `verified_at_t` (and per data
    source): the mean verified fraction of the k samples per prompt, pass@1 at T."""
    from nova_engine.rl.verifiers import shape_rewards

    def responses(p) -> list:
        ids = np.array_split(np.arange(len(prompts)), ps.dp)[ps.dp_rank]
        mine = [(int(i), prompts[int(i)]) for i in ids]  # key i: held-out prompt i
        gens, results, _ = producer(-1, mine, p)
        flat = [(prompts[int(i)].dataset, r.score, g.finished, r)
                for i, gs, rs in zip(ids, gens, results) for g, r in zip(gs, rs)]  # fmt: skip
        parts: list = [flat]
        if ps.dp > 1:
            parts = [None] * ps.dp
            dist.all_gather_object(parts, flat, group=ps.dp_group)
        return [x for part in parts for x in part]

    def verified(rows, suffix: str) -> dict[str, float]:
        out = {f"verified{suffix}": float(np.mean([x[1] >= 1 for x in rows]))}
        for ds in sorted({x[0] for x in rows}):
            out[f"verified{suffix}/{ds}"] = float(np.mean([x[1] >= 1 for x in rows if x[0] == ds]))
        return out

    def evaluate() -> dict[str, float]:
        rows = responses(params)
        rew = shape_rewards([x[3] for x in rows], [x[2] for x in rows], reward)
        out = {**verified(rows, ""), "reward_mean": float(np.mean(rew))}
        if sampled is not None:
            out.update(verified(responses(sampled), "_at_t"))
        return out

    return evaluate
