"""RLVR rewards from a reward model: a frozen RM engine scores every (prompt, response) of the
step at its last token, alone or mixed with the verifiers (Tülu 3 / NeMo-RL style).

    reward_model:                      # recipe section of the rlvr stage
      path: runs/rm/hf                 # the RM stage's export (*ForSequenceClassification)
      weight: 1.0                      # w_rm
      verifier_weight: 1.0             # w_v
    scorer = RMScorer.build(run, ps, RewardEngine)           # None when path is unset
    scores = scorer(first, mine, gens, text)                  # [p][i] RM scores (floats)

Reward of a response: `w_v * verifier_reward + w_rm * rm_score` (+ DAPO's overlong shaping),
verifier_reward being the shaped verifier reward (rollout.verified_reward, ...); an open-ended
prompt (a data line without ground_truth, allowed only with an RM) has no verifier part:
`w_rm * rm_score`. With `normalize: true` the RM scores are standardized over the step's
responses (all DP ranks): (s - mean) / (std + 1e-6) before weighting (off by default).

Scoring: each response is rendered as the RM saw its training pairs: the prompt's messages +
{"role": "assistant", "content": decoded response}, through the chat template of the RM's
tokenizer (`tokenizer_path`, default the RM directory when it holds a tokenizer, else
model.tokenizer_path; `template`, default data.template), cut to train.micro_batch_tokens.
The step's sequences are gathered over the policy's DP group, split over the RM engine's DP
ranks, packed (capacity train.micro_batch_tokens), scored with `forward_collect`
(`sequence_scores` at each sequence's last token, fp32) and the scores all-gathered over the
world: the scoring does not depend on the RM's layout. The RM engine is frozen (no gradient
buffers, no optimizer) and not checkpointed; it uses the policy's layout (parallel section).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from nova_engine.config import ConfigError, check
from nova_engine.data.packing import PackedBatch
from nova_engine.data.sample import Sample
from nova_engine.model.heads import sequence_scores


@dataclass
class RewardModelSection:
    """The recipe's `reward_model:` section (rlvr): a reward model as (part of) the reward."""

    path: str | None = None
    """HF *ForSequenceClassification directory (the rm stage's export); None: verifiers only."""
    weight: float = 1.0
    """w_rm: the RM score's weight in the reward."""
    verifier_weight: float = 1.0
    """w_v: the shaped verifier reward's weight (used only with `path`; 0: RM alone)."""
    output: str | None = None
    """Which output of a multi-output head (e.g. a regression RM's "helpfulness")."""
    normalize: bool = False
    """Standardize the RM scores over the step's responses before weighting."""
    tokenizer_path: str | None = None
    """The RM's tokenizer (default: `path` when it holds one, else model.tokenizer_path)."""
    template: str | None = None
    """Chat template the RM was trained with (default: data.template)."""

    def __post_init__(self) -> None:
        for k in ("weight", "verifier_weight"):
            v = getattr(self, k)
            check(isinstance(v, (int, float)) and math.isfinite(v), k, f"expected a finite "
                  f"number, got {v!r}")  # fmt: skip
        check(isinstance(self.normalize, bool), "normalize", "expected true or false")

    @property
    def enabled(self) -> bool:
        return self.path is not None


def combine(verifier: float | None, rm: float, cfg: RewardModelSection) -> float:
    """w_v * verifier + w_rm * rm; an open-ended prompt (verifier None) gets w_rm * rm."""
    v = 0.0 if verifier is None else cfg.verifier_weight * verifier
    return float(v + cfg.weight * rm)


def normalize_scores(s: np.ndarray) -> np.ndarray:
    """(s - mean) / (std + 1e-6) over all of the step's scores (float64)."""
    s = np.asarray(s, np.float64)
    return (s - s.mean()) / (s.std() + 1e-6) if s.size else s


def check_rm_dir(path: str, key: str = "reward_model.path") -> list[str]:
    """The head's output names of the *ForSequenceClassification directory `path`;
    ConfigError naming `key` otherwise."""
    from nova_engine.model.hf_io import score_labels

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(key, f"{path} is not a HF model directory (no config.json)")
    labels = score_labels(path)
    if labels is None:
        raise ConfigError(key, f"{path} is not a *ForSequenceClassification export (a reward "
                          "model from the rm stage)")  # fmt: skip
    return labels


class RMScorer:
    """The frozen RM engine and its tokenizer; called once per step on every rank."""

    def __init__(self, engine, ct, cfg: RewardModelSection, policy_ps, capacity: int):
        self.engine, self.ct, self.cfg = engine, ct, cfg
        self.policy_ps, self.capacity = policy_ps, capacity
        self.limit = min(capacity, engine.arch.max_position_embeddings)

    @classmethod
    def build(cls, run: Any, ps, engine_class: Any) -> RMScorer | None:
        """The scorer of an RLVRRunConfig's reward_model section (None when off); the frozen
        RM is an `engine_class` (nova_engine.train.engine.RewardEngine: rl/ sits below the
        engines, the stage hands it the class)."""
        from nova_engine.data.tokenize import ChatTokenizer, load_tokenizer
        from nova_engine.model.arch import load_arch

        cfg: RewardModelSection = run.reward_model
        if not cfg.enabled:
            return None
        assert cfg.path is not None
        labels, rows = check_rm_dir(cfg.path), None
        if len(labels) > 1 or cfg.output is not None:
            if cfg.output not in labels:
                raise ConfigError("reward_model.output", f"name one of the head's outputs {labels}")
            rows = [labels.index(cfg.output)]
        tok_dir = cfg.tokenizer_path or (
            cfg.path if os.path.isfile(os.path.join(cfg.path, "tokenizer_config.json"))
            else run.model.tokenizer_dir
        )  # fmt: skip
        ct = ChatTokenizer(load_tokenizer(tok_dir, cfg.template or run.data.template))
        t = run.train
        engine = engine_class(
            load_arch(cfg.path), ps, labels=("reward",), score_rows=rows,
            pad_token_id=ct.tokenizer.pad_token_id or 0, name="reward_model",
            weights_dir=cfg.path, trainable=False, precision=t.precision,
            fuse_elementwise=t.fuse_elementwise,
        )  # fmt: skip
        return cls(engine, ct, cfg, ps, t.micro_batch_tokens)

    def encode(self, messages: list | None, text: str) -> np.ndarray:
        """The tokens the RM scores: messages + the assistant reply, rendered as in RM training."""
        if messages is None:
            raise ValueError("reward model scoring needs the prompt's messages (RLVRPrompt)")
        ids = self.ct.ids([*messages, {"role": "assistant", "content": text}])
        return np.asarray(ids[: self.limit], np.int64)

    def _pack(self, seqs: list[np.ndarray]) -> list[PackedBatch]:
        rps, used = self.engine.ps, 0
        out: list[list[Sample]] = []
        cur: list[Sample] = []
        fixed = self.capacity if rps.pp > 1 else None
        for i, s in enumerate(seqs):
            if cur and used + len(s) > self.capacity:
                out.append(cur)
                cur, used = [], 0
            cur.append(Sample(s, np.zeros(len(s), np.uint8), i))
            used += len(s)
        if cur:
            out.append(cur)
        return [PackedBatch.from_samples(b, pad_to_multiple=rps.tp, pad_id=self.engine.pad_token_id,
                                         pad_to_length=fixed).to(rps.device) for b in out]  # fmt: skip

    def score_sequences(self, seqs: list[np.ndarray]) -> np.ndarray:
        """[len(seqs)] float64 scores of the same list `seqs` given on every rank: each RM DP
        rank scores its contiguous share, the scores are all-gathered over the world."""
        rps = self.engine.ps
        share = np.array_split(np.arange(len(seqs)), rps.dp)[rps.dp_rank]
        mine = np.zeros((0, 2))
        if len(share):
            outs = self.engine.forward_collect(
                self._pack([seqs[int(i)] for i in share]),
                lambda m, h, b: sequence_scores(m, h, b, rps)[:, 0],
            )  # fmt: skip
            if outs and rps.tp_rank == 0:  # the last stage; one host copy per step
                vals = torch.cat(outs).double().cpu().numpy()
                mine = np.stack([share.astype(np.float64), vals], 1)
        parts: list = [mine]
        if rps.world_size > 1:
            parts = [None] * rps.world_size
            dist.all_gather_object(parts, mine, group=rps.layout_group)
        out = np.full(len(seqs), np.nan)
        for p in parts:
            for i, v in p:
                out[int(i)] = v
        if np.isnan(out).any():
            raise RuntimeError("reward model: some responses got no score")
        return out

    def __call__(self, prompts: list, gens: list[list], text) -> list[list[float]]:
        """[p][i] RM scores (normalized when configured) of this DP rank's `prompts`
        ([(k, RLVRPrompt)]) and their generations `gens` [p][i]; `text(g)` decodes one."""
        ps = self.policy_ps
        mine = [self.encode(p.messages, text(g)) for (_, p), gs in zip(prompts, gens) for g in gs]
        parts: list = [mine]
        if ps.dp > 1:
            parts = [None] * ps.dp
            dist.all_gather_object(parts, mine, group=ps.dp_group)
        offset = sum(len(parts[d]) for d in range(ps.dp_rank)) if ps.dp > 1 else 0
        scores = self.score_sequences([s for part in parts for s in part])
        if self.cfg.normalize:
            scores = normalize_scores(scores)
        flat = scores[offset : offset + len(mine)].tolist()
        n = len(gens[0]) if gens else 0
        return [flat[j * n : (j + 1) * n] for j in range(len(prompts))]
