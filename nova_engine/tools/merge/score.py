"""Held-out preference pairs scored on a HF model directory: the alpha sweep's evaluation.

- reward model (`*ForSequenceClassification`, one output): `rm_accuracy`, the fraction of
  pairs with r(chosen) > r(rejected), r = the score head at the sequence's last token, and
  `rm_margin`, the mean r(chosen) - r(rejected);
- causal LM (`*ForCausalLM`): `logp_accuracy`, the fraction with
  sum log p(chosen response) > sum log p(rejected response) (response tokens only, given the
  prompt), and `logp_margin`; with a reference model also `implicit_accuracy` /
  `implicit_margin`, the DPO implicit reward (log p - log p_ref, summed over the response;
  beta scales both sides and does not change the comparison).
Comparisons are strict: a tie counts as wrong.

Pairs are read with nova_engine.data.formats (prompt/chosen/rejected strings or Tulu-3
message lists) and tokenized with the model's chat template (nova_engine.data.tokenize).
Each model is loaded with transformers in float32 on the CPU; sequences are scored in
length-sorted batches, right-padded with an id that no eval sequence contains, so the
sequence-classification head's "rightmost non-pad token" pooling finds the true last token.

The sweep only needs `scorer(model_dir) -> dict[str, float]` and the name of the metric to
maximize: `PairScorer` is that callable, and the engine's own evaluation can replace it.
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
import torch

from nova_engine.data.sample import PairSample

Kind = Literal["reward", "policy"]


class ScoreError(ValueError):
    """A model or eval set the scorer cannot use (one line)."""


def model_kind(config: dict, where: str) -> Kind:
    """'reward' for *ForSequenceClassification, 'policy' for *ForCausalLM."""
    archs = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        if int(config.get("num_labels", len(config.get("id2label") or {}) or 1)) != 1:
            raise ScoreError(
                f"{where}: a sequence-classification model with {config.get('num_labels')} "
                "outputs; the sweep scores scalar reward models (num_labels = 1)"
            )
        return "reward"
    if any(a.endswith("ForCausalLM") for a in archs):
        return "policy"
    raise ScoreError(
        f"{where}: architectures {archs}: expected a *ForCausalLM or *ForSequenceClassification"
    )


def load_pairs(
    eval_path: str,
    tokenizer_dir: str,
    max_length: int | None = None,
    template: str | None = None,
) -> list[PairSample]:
    """Read + validate + tokenize the pairs (DataError names path:line; TemplateError when the
    tokenizer has no usable chat template: pass `template`). Pairs too long are truncated
    (see ChatTokenizer)."""
    from nova_engine.data.formats import read_pref_jsonl
    from nova_engine.data.tokenize import ChatTokenizer, TemplateError

    if not os.path.isfile(eval_path):
        raise ScoreError(f"--eval {eval_path}: no such file (expected preference pairs JSONL)")
    records, _ = read_pref_jsonl(eval_path)
    if not records:
        raise ScoreError(f"--eval {eval_path}: no preference pairs in the file")
    try:
        ct = ChatTokenizer(tokenizer_dir, max_length=max_length, template=template)
    except TemplateError:
        raise
    except (OSError, ValueError) as e:
        raise ScoreError(
            f"{tokenizer_dir}: no tokenizer could be loaded ({str(e).splitlines()[0]}); "
            "pass --tokenizer <dir>"
        ) from None
    pairs = [p for p in (ct.pair_sample(r) for r in records) if p is not None]
    if not pairs:
        raise ScoreError(f"--eval {eval_path}: every pair was dropped by the length limit")
    return pairs


def _load(model_dir: str, kind: Kind):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM
    return cls.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()


def sequence_values(
    model, seqs: list[tuple[np.ndarray, np.ndarray]], kind: Kind, batch_size: int = 8
) -> torch.Tensor:
    """[S] float64: the reward (kind 'reward') or the sum of log p over the loss-mask tokens
    (kind 'policy') of each (tokens, loss_mask) sequence."""
    used = {int(t) for tokens, _ in seqs for t in tokens}
    pad_id: int | None = next(i for i in range(len(used) + 1) if i not in used)
    if pad_id is not None and pad_id >= model.config.get_text_config().vocab_size:
        pad_id, batch_size = None, 1  # every id is in use: no padding, one at a time
    model.config.pad_token_id = pad_id
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    out = torch.empty(len(seqs), dtype=torch.float64)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        t_max = max(len(seqs[i][0]) for i in idx)
        ids_BT = torch.full((len(idx), t_max), pad_id or 0, dtype=torch.long)
        att_BT = torch.zeros(len(idx), t_max, dtype=torch.long)
        mask_BT = torch.zeros(len(idx), t_max, dtype=torch.float64)
        for row, i in enumerate(idx):
            tokens, mask = seqs[i]
            ids_BT[row, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
            att_BT[row, : len(tokens)] = 1
            mask_BT[row, : len(tokens)] = torch.as_tensor(mask, dtype=torch.float64)
        with torch.no_grad():
            logits = model(input_ids=ids_BT, attention_mask=att_BT).logits.float()
        if kind == "reward":
            values = logits[:, 0].double()  # [B, 1] pooled at the last real token
        else:  # token t is predicted from positions < t
            logp_BT = torch.log_softmax(logits[:, :-1], dim=-1)
            logp_BT = logp_BT.gather(-1, ids_BT[:, 1:, None]).squeeze(-1).double()
            values = (logp_BT * mask_BT[:, 1:]).sum(-1)
        out[torch.as_tensor(idx)] = values
    return out


def _pair_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[float, float]:
    diff = chosen - rejected
    return float((diff > 0).double().mean()), float(diff.mean())


class PairScorer:
    """`scorer(model_dir) -> {metric: value}` on fixed tokenized pairs; `primary` names the
    metric the sweep maximizes (`rm_accuracy`, `implicit_accuracy` with a reference model,
    else `logp_accuracy`) and `margin` its tie-breaker. The reference's log-probs are
    computed once."""

    def __init__(
        self,
        pairs: list[PairSample],
        kind: Kind,
        ref_dir: str | None = None,
        batch_size: int = 8,
    ):
        if kind == "reward" and ref_dir is not None:
            raise ScoreError("--ref is for causal LMs (implicit reward); a reward model needs none")
        if batch_size < 1:
            raise ScoreError(f"--batch-size {batch_size}: expected >= 1")
        self.kind, self.batch_size, self.n_pairs = kind, batch_size, len(pairs)
        self._seqs = [(p.chosen.tokens, p.chosen.loss_mask) for p in pairs]
        self._seqs += [(p.rejected.tokens, p.rejected.loss_mask) for p in pairs]
        self._ref = None
        if ref_dir is not None:
            self._ref = self._values(ref_dir)
        name = "rm" if kind == "reward" else ("implicit" if ref_dir else "logp")
        self.primary, self.margin = f"{name}_accuracy", f"{name}_margin"

    def _values(self, model_dir: str) -> torch.Tensor:
        model = _load(model_dir, self.kind)
        try:
            return sequence_values(model, self._seqs, self.kind, self.batch_size)
        finally:
            del model

    def __call__(self, model_dir: str) -> dict[str, float]:
        v = self._values(model_dir)
        c, r = v[: self.n_pairs], v[self.n_pairs :]
        if self.kind == "reward":
            acc, margin = _pair_stats(c, r)
            return {"rm_accuracy": acc, "rm_margin": margin}
        acc, margin = _pair_stats(c, r)
        out = {"logp_accuracy": acc, "logp_margin": margin}
        if self._ref is not None:
            rc, rr = self._ref[: self.n_pairs], self._ref[self.n_pairs :]
            out["implicit_accuracy"], out["implicit_margin"] = _pair_stats(c - rc, r - rr)
        return out
