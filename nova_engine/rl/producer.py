"""RLVR rollouts: the prompt stream, generation + verification on the policy, and the step's
responses with their rewards and group advantages, gathered over DP (packing into PPO
mini-batches: nova_engine.rl.minibatch).

    source = PromptSource(prompts, prompts_per_step=P, seed=s, total_steps=T)  # a DataSource
    step = source.next_batch()                           # StepPrompts: the step's P prompts
    mine = step.share(ps)                                 # this DP rank's P/dp prompts
    gens, results, times = producer(step.step, mine)     # EngineRollouts: generate + verify
    resp = gather_responses(mine, gens, results, ...)     # rewards, group advantages, DP gather
    mbs = minibatches(resp, ps, ...)   # rl.minibatch: this rank's packed mini-batches

Prompt stream. Stream position k = step * P + j holds prompt perm_e[k mod N] of the seeded
permutation of epoch e = k // N (N prompts): a step always takes P prompts, wrapping into the
next epoch when the data set ends (or holds fewer than P prompts). k is the prompt's sampling
key: sample i of it draws its t-th token from U(rollout seed, k, i, t)
(nova_engine.generate.sampling), so rollouts depend on (seed, step, prompt, sample) only, never
on the layout or the batch a row lands in, and a resumed run regenerates them exactly.

DP. Rank d generates the prompts [d P/dp, (d+1) P/dp) of the step (group id = position j in
the step); the model-parallel ranks of a replica generate the same rows and split the
verification between them. Rewards are shaped (RewardConfig), outcome advantages computed by
the estimator (nova_engine.rl.estimators: group statistics reduced over DP), then every rank
gathers the step's responses (a few MB at Tülu scale), so the packing (rl.minibatch) is a pure
function of (responses, seed, step).

DAPO (Yu et al. 2025), both off by default: overlong reward shaping adds
`overlong_penalty(|y|)` to the shaped reward of every response; dynamic sampling
(`dynamic_sampling`) drops the groups whose rewards are all equal and refills the step with
the informative groups of extra rounds of `PromptSource.refill_prompts` (seeded draws with
their own sampling keys) until the step holds P informative groups or max rounds are spent.

Reward models (rl.reward_model): with `rm_scores`, gather_responses combines each response's shaped
verifier reward (None for an open-ended prompt, whose verification is skipped: OPEN_RESULT)
with its RM score; both parts are kept on the Response for the per-source metrics.

Empty generations (a prompt that fills the model's context gets none) keep their reward and
group membership but are not packed. A response that hit max_new_tokens without a stop token
is `finished=False`: RewardConfig.truncated_reward replaces its reward when set (Tülu 3: -10).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from nova_engine.data.rlvr import RLVRPrompt
from nova_engine.logging import get_logger
from nova_engine.rl.estimators import get_estimator
from nova_engine.rl.rollouts import (
    Generation,
    informative_groups,
    overlong_penalty,
)
from nova_engine.rl.verifiers import RewardConfig, VerifierResult, VerifyItem, shape_rewards

logger = get_logger(__name__)

OPEN_RESULT = VerifierResult(0.0, "no_answer: open-ended prompt (no verifier; reward model only)")
"""The verifier result of a response to an open-ended prompt (no ground_truth)."""

# ------------------------------------------------------------------------------ prompts


@dataclass
class StepPrompts:
    """The P prompts of one step: (stream position k, prompt) in step order."""

    step: int
    items: list[tuple[int, RLVRPrompt]]

    def share(self, ps) -> tuple[int, list[tuple[int, RLVRPrompt]]]:
        """(first position j in the step, this DP rank's contiguous block of prompts)."""
        per = len(self.items) // ps.dp
        return ps.dp_rank * per, self.items[ps.dp_rank * per : (ps.dp_rank + 1) * per]


class PromptSource:
    """The prompt stream as a DataSource (nova_engine.train.data_source.DataSource): see the
    module docstring. Its state is the position and the seeds (permutations and sampling are
    pure functions of them), which is all a resume needs."""

    def __init__(
        self,
        prompts: Sequence[RLVRPrompt],
        *,
        prompts_per_step: int,
        total_steps: int,
        seed: int = 1234,
        shuffle: bool = True,
        sampling_seed: int = 0,
    ):
        if not prompts:
            raise ValueError("rlvr: no prompts (empty data set, or every prompt too long?)")
        if prompts_per_step < 1 or total_steps < 1:
            raise ValueError(f"prompts_per_step={prompts_per_step}, total_steps={total_steps}")
        self.samples = list(prompts)  # (runner.mfu_inputs reads prompt lengths from here)
        self.P, self.total_steps = prompts_per_step, total_steps
        self.seed, self.shuffle, self.sampling_seed = seed, shuffle, sampling_seed
        self.position = 0
        self._perm: tuple[int, np.ndarray] | None = None
        if len(self.samples) < prompts_per_step:
            logger.warning(
                "rlvr: %d prompts, fewer than the %d of one step: the stream wraps (a prompt "
                "can appear twice in a step, as separate groups)", len(self.samples), self.P,
            )  # fmt: skip

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            n = len(self.samples)
            perm = np.arange(n)
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm = (epoch, perm)
        return self._perm[1]

    def step_prompts(self, step: int) -> StepPrompts:
        n, items = len(self.samples), []
        for k in range(step * self.P, (step + 1) * self.P):
            epoch, i = divmod(k, n)
            items.append((k, self.samples[int(self._order(epoch)[i])]))
        return StepPrompts(step, items)

    def next_batch(self) -> StepPrompts:
        out = self.step_prompts(self.position)
        self.position += 1
        return out

    def refill_prompts(self, step: int, round: int) -> StepPrompts:
        """Dynamic sampling's extra round `round` >= 1 of `step`: P prompts drawn with the
        seeded generator (seed, step, round) (without replacement when the set allows), keyed
        (round << 40) + step * P + j: sampling keys no stream position uses, so the extra
        samples are fresh draws, a pure function of (seed, step, round): repeatable, resumable.
        The stream position does not move (the loop's step count stays the data step count)."""
        if round < 1:
            raise ValueError(f"refill_prompts: round={round}: expected >= 1")
        n = len(self.samples)
        rng = np.random.default_rng([self.seed, step, round, 17])
        pick = rng.choice(n, self.P, replace=n < self.P)
        base = (round << 40) + step * self.P
        return StepPrompts(step, [(base + j, self.samples[int(i)]) for j, i in enumerate(pick)])

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "rng": {"seed": self.seed, "shuffle": self.shuffle, "sampling": self.sampling_seed},
            "num_prompts": len(self.samples),
            "prompts_per_step": self.P,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("rng", "num_prompts", "prompts_per_step"):
            if state.get(key) != mine[key]:
                logger.warning(
                    "rlvr prompt source %s changed since the checkpoint: %s -> %s (the resumed "
                    "run does not repeat the interrupted one)", key, state.get(key), mine[key],
                )  # fmt: skip
        self.position = int(state["position"])


# ------------------------------------------------------------------------------ generation


Producer = Callable[[int, list], tuple[list[list[Generation]], list[list[VerifierResult]], dict]]
"""(step, this rank's [(k, prompt)]) -> (generations [p][i], verifier results [p][i],
{"generate": s, "verify": s}). Every rank of a DP replica gets the same prompts and returns
the same values."""


class EngineRollouts:
    """The default producer: `params.n` samples per prompt from the policy engine's own
    shards (ModelEngine.generate), decoded and verified (`verify`: a VerifierPool's
    verify_batch, or in-process verify_one calls when no pool is used).

    Verification runs off the critical path: the prompts are generated in chunks of
    max_batch_size sequences, and while chunk c+1 generates, a background thread verifies
    this rank's share of chunk c's responses (the model-parallel ranks of a replica split
    each chunk: rank r takes its items r, r + mp, ...); one all_gather over the
    model-parallel group at the end, from the main thread, so no collective ever runs beside
    the generation's. Samples do not depend on the chunking (sampling keys are per prompt and
    sample), so neither do the results. Times: "generate" (the chunks' generation),
    "verify" (the wait for verification after the last chunk: the exposed part) and
    "verify_total" (the verifier's own wall time, overlapped or not)."""

    def __init__(self, engine, tokenizer, params, verify: Callable, *, max_batch_size: int = 64):
        self.engine, self.tok, self.params, self.verify = engine, tokenizer, params, verify
        self.max_batch_size = max_batch_size
        self.context = engine.arch.max_position_embeddings
        self.stops = set(params.stop_token_ids)

    def text(self, g: Generation) -> str:
        toks = (
            g.tokens[:-1] if g.finished and len(g) and int(g.tokens[-1]) in self.stops else g.tokens
        )
        return self.tok.decode([int(t) for t in toks], skip_special_tokens=True)

    def _generate(self, prompts: list, idx: range, params, gens: list, prefixes=None) -> None:
        from nova_engine.generate import Request

        fits = [j for j in idx if len(prompts[j][1]) < self.context]
        reqs = []
        for j in fits:
            pre = None if prefixes is None else prefixes[j]  # a partial rollout: continue it
            reqs.append(Request(
                [int(t) for t in prompts[j][1].tokens], index=prompts[j][0],
                prefix=None if pre is None else [g.tokens.tolist() for g in pre],
                prefix_logprobs=None if pre is None else [g.logprobs.tolist() for g in pre],
            ))  # fmt: skip
        outs = self.engine.generate(reqs, params, max_batch_size=self.max_batch_size)
        for j, group in zip(fits, outs):
            gens[j] = [Generation(np.asarray(g.tokens, np.int64), np.asarray(g.logprobs),
                                  g.finish_reason == "stop") for g in group]  # fmt: skip

    def _timed_verify(self, items: list[VerifyItem]) -> tuple[list[VerifierResult], float]:
        t0 = time.perf_counter()
        out = list(self.verify(items)) if items else []
        return out, time.perf_counter() - t0

    def __call__(self, step: int, prompts: list, params=None, *, prefixes=None, verify=True):
        """`prefixes` [p][i]: Generations to continue (partial rollouts; a finished one comes
        back as it was); verify=False: generation only (the results are all OPEN_RESULT)."""
        from concurrent.futures import ThreadPoolExecutor

        params = params or self.params
        n, ps = params.n, self.engine.ps
        mp = dist.get_world_size(ps.mp_group) if ps.world_size > 1 else 1
        me = dist.get_rank(ps.mp_group) if mp > 1 else 0
        per = max(1, self.max_batch_size // max(n, 1))  # prompts per generation chunk
        gens = [
            [Generation(np.zeros(0, np.int64), np.zeros(0, np.float32), False)] * n for _ in prompts
        ]  # fmt: skip  (no room in the context: empty generations)
        items: list = [None] * (len(prompts) * n)
        jobs, t_gen = [], 0.0
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify") as pool:
            for c in range(0, len(prompts), per):
                idx = range(c, min(c + per, len(prompts)))
                t0 = time.perf_counter()
                self._generate(prompts, idx, params, gens, prefixes)
                t_gen += time.perf_counter() - t0
                if not verify:
                    continue
                ask = []  # not open-ended: a verifier decides
                for j in idx:
                    p = prompts[j][1]
                    for i, g in enumerate(gens[j]):
                        items[j * n + i] = VerifyItem(p.dataset, self.text(g), p.ground_truth)
                        if p.ground_truth is not None:
                            ask.append(j * n + i)
                mine = ask[me::mp]
                jobs.append((mine, pool.submit(self._timed_verify, [items[q] for q in mine])))
            t1 = time.perf_counter()
            done = [(mine, *f.result()) for mine, f in jobs]
        t_wait = time.perf_counter() - t1
        local = [(mine, res) for mine, res, _ in done]
        parts: list = [local]
        if mp > 1:
            parts = [None] * mp
            dist.all_gather_object(parts, local, group=ps.mp_group)
        flat: list = [OPEN_RESULT] * len(items)
        for part in parts:
            for mine, res in part:
                for q, r in zip(mine, res):
                    flat[q] = r
        results = [flat[j * n : (j + 1) * n] for j in range(len(prompts))]
        times = {"generate": t_gen, "verify": t_wait, "verify_total": sum(t for *_, t in done)}
        return gens, results, times


def make_verifier(run) -> tuple[Callable, Any]:
    """(verify(items) -> results, the VerifierPool or None) of an RLVRRunConfig's rollout
    section (verifier_workers 0: in-process calls)."""
    from nova_engine.rl.verifiers import VerifierPool, verify_one

    r = run.rollout
    if r.verifier_workers == 0:
        return (lambda items: [verify_one(it) for it in items]), None
    pool = VerifierPool(r.verifier_workers, r.verifier_timeout_s)
    return pool.verify_batch, pool


def load_prompts(run, ct, paths) -> list[RLVRPrompt]:
    """The tokenized prompts of `paths` for an RLVRRunConfig (open-ended lines allowed when a
    reward model is configured)."""
    from nova_engine.rl.prompts import load_rlvr_prompts

    prompts, _, _ = load_rlvr_prompts(paths, ct, max_prompt_length=run.data.max_length,
                                      on_bad_line=run.data.on_bad_line,
                                      allow_open=run.reward_model.enabled)  # fmt: skip
    return prompts


# ------------------------------------------------------------------------------ responses


@dataclass
class Response:
    """One response of the step (the same list on every rank after the DP gather)."""

    prompt: np.ndarray  # [Lp] int64
    gen: Generation
    reward: float
    advantage: float  # outcome advantage of the group estimators (0 for gae, reinforce_pp)
    group: int  # position j of its prompt in the step
    dataset: str
    score: float  # verifier score in [0, 1]
    reason: str  # verifier result kind (correct, wrong, timeout, ...)
    zero_var: bool = False  # its group's rewards are all equal (group estimators only)
    verifier_reward: float | None = None  # shaped verifier reward (None: open-ended prompt)
    rm_score: float | None = None  # reward-model score (None: no reward model)


@dataclass
class StepResponses:
    responses: list[Response]
    degenerate_groups: int  # groups whose rewards are all equal (no group signal)
    num_groups: int
    times: dict[str, float] = field(default_factory=dict)


def gather_responses(
    first: int,
    prompts: list,
    gens: list[list[Generation]],
    results: list[list[VerifierResult]],
    *,
    num_groups: int,
    reward: RewardConfig,
    estimator: str,
    ps,
    eps: float = 1e-6,
    overlong: tuple[int, int, float] | None = None,
    rm_scores: list[list[float]] | None = None,
    combine: Callable[[float | None, float], float] | None = None,
) -> StepResponses:
    """Shape rewards (+ DAPO's overlong_penalty with overlong = (L_max, L_cache, factor)),
    compute group advantages (statistics over DP) and gather every rank's responses in step
    order (see the module docstring). With `rm_scores` [p][i] (a reward model's), the reward
    is combine(shaped verifier reward or None for an open-ended prompt, rm score)."""
    flat = [(j, g, r) for j, (gs, rs) in enumerate(zip(gens, results)) for g, r in zip(gs, rs)]
    rewards = shape_rewards([r for _, _, r in flat], [g.finished for _, g, _ in flat], reward)
    ver: list = [None if prompts[j][1].ground_truth is None else x
                 for x, (j, _, _) in zip(rewards, flat)]  # fmt: skip
    rms: list = [None] * len(flat)
    if rm_scores is not None:
        assert combine is not None, "rm_scores need combine"
        rms = [s for ss in rm_scores for s in ss]
        rewards = [combine(v, s) for v, s in zip(ver, rms)]
    if overlong is not None:
        rewards = [x + overlong_penalty(len(g), *overlong) for x, (_, g, _) in zip(rewards, flat)]
    gids = torch.tensor([first + j for j, _, _ in flat], dtype=torch.int64, device=ps.device)
    rew = torch.tensor(rewards, dtype=torch.float32, device=ps.device)
    degenerate, zero_var = 0, [False] * len(flat)
    adv, deg = get_estimator(estimator).response_advantages(rew, gids, num_groups, eps=eps,
                                                            group=ps.dp_group)  # fmt: skip
    if deg is not None:
        degenerate = int(deg.sum())
        zero_var = deg[gids].cpu().tolist()
    adv_list = adv.cpu().tolist()
    mine = [
        Response(prompts[j][1].tokens, g, rewards[i], adv_list[i], first + j,
                 prompts[j][1].dataset, r.score, r.kind, bool(zero_var[i]), ver[i], rms[i])
        for i, (j, g, r) in enumerate(flat)
    ]  # fmt: skip
    if ps.dp > 1:
        parts: list = [None] * ps.dp
        dist.all_gather_object(parts, mine, group=ps.dp_group)
        mine = [x for part in parts for x in part]
    return StepResponses(mine, degenerate, num_groups)


def dynamic_sampling(
    first: StepResponses, more: Callable[[int], StepResponses], *, target: int, max_rounds: int
) -> tuple[StepResponses, list[Response], dict[str, float]]:
    """DAPO's dynamic sampling: keep the informative groups (rewards not all equal) of `first`
    and of the extra rounds `more(1)`, `more(2)`, ... (each a StepResponses with group ids
    in [0, P)) until `target` groups are kept or `max_rounds` rounds (the first included) ran;
    the first `target` informative groups in (round, group) order are kept. Returns (the kept
    responses, group ids renumbered round * P + group, as a StepResponses; every generated
    response, for the rollout metrics; the counts as metrics)."""
    rounds = [first]
    found = len(informative_groups([r.reward for r in first.responses],
                                   [r.group for r in first.responses]))  # fmt: skip
    while found < target and len(rounds) < max_rounds:
        sr = more(len(rounds))
        rounds.append(sr)
        found += len(informative_groups([r.reward for r in sr.responses],
                                        [r.group for r in sr.responses]))  # fmt: skip
    kept: list[Response] = []
    every: list[Response] = []
    n_kept = generated = 0
    for k, sr in enumerate(rounds):
        rs = sr.responses
        every += rs
        generated += sr.num_groups
        ok = informative_groups([r.reward for r in rs], [r.group for r in rs])
        take = set(ok[: max(target - n_kept, 0)])
        n_kept += len(take)
        off = k * first.num_groups
        kept += [dataclasses.replace(r, group=r.group + off) for r in rs if r.group in take]
    times: dict[str, float] = {}
    for sr in rounds:
        for key, v in sr.times.items():
            times[key] = times.get(key, 0.0) + v
    metrics = {
        "dynamic_sampling/rounds": float(len(rounds)),
        "dynamic_sampling/groups_kept": float(n_kept),
        "dynamic_sampling/groups_dropped": float(generated - n_kept),
        "dynamic_sampling/groups_short": float(max(target - n_kept, 0)),
    }
    degenerate = sum(sr.degenerate_groups for sr in rounds)
    out = StepResponses(kept, degenerate, max(generated, 1), times)
    return out, every, metrics


def rollout_metrics(sr: StepResponses) -> dict[str, float]:
    """Reward, verified fraction (overall and per data source), lengths, truncation."""
    rs = sr.responses
    n = max(len(rs), 1)
    lens = np.array([len(r.gen) for r in rs] or [0])
    out = {
        "reward_mean": float(sum(r.reward for r in rs) / n),
        "verified": float(sum(r.score >= 1.0 for r in rs) / n),
        "response_len": float(lens.mean()),
        "response_len_max": float(lens.max()),
        "truncated": float(sum(not r.gen.finished for r in rs) / n),
        "empty": float(sum(len(r.gen) == 0 for r in rs)),
        "degenerate_groups": sr.degenerate_groups / max(sr.num_groups, 1),
    }
    for ds in sorted({r.dataset for r in rs}):
        mine = [r for r in rs if r.dataset == ds]
        out[f"verified/{ds}"] = sum(r.score >= 1.0 for r in mine) / len(mine)
    for kind in ("timeout", "error"):
        c = sum(r.reason == kind for r in rs)
        if c:
            out[f"verifier_{kind}"] = float(c)
    if any(r.rm_score is not None for r in rs):  # per-source rewards (reward model runs)
        ver = [r.verifier_reward for r in rs if r.verifier_reward is not None]
        rm = [r.rm_score for r in rs if r.rm_score is not None]
        out["reward/verifier_mean"] = float(np.mean(ver)) if ver else 0.0
        out["reward/rm_mean"] = float(np.mean(rm))
        out["reward/total_mean"] = out["reward_mean"]
        out["open_ended"] = float(sum(r.verifier_reward is None for r in rs) / n)
        verifiable = [r for r in rs if r.verifier_reward is not None]  # open ones: no verdict
        out["verified"] = float(sum(r.score >= 1.0 for r in verifiable) / max(len(verifiable), 1))
        for ds in sorted({r.dataset for r in rs} - {r.dataset for r in verifiable}):
            del out[f"verified/{ds}"]
    return out
