"""Score a reward model exported as *ForSequenceClassification with `transformers` (no Nova
engine, no process group): the held-out check `make demo` runs, and the reference of the
export parity test.

    scores = evaluate_hf_reward_model("runs/rm/hf", ["rm_eval.jsonl"], "tokenizer_dir")
    emit(format_table(scores))                # nova_engine.eval.rewardbench, progress.emit

Pairs are tokenized exactly as the rm stage tokenizes them (chat template, prompt + response),
right-padded with the model's pad_token_id: transformers reads the score at the last token
that is not padding, the end-of-turn token the stage reads. A K-output model is compared
through one output (`reward_attribute`, by its id2label name) or a weighted sum.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from nova_engine.eval.rewardbench import RewardBenchScores, score_comparisons


def load_hf_reward_model(model_dir: str):
    """AutoModelForSequenceClassification from a local directory, fp32, eval mode."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True)
    return model.float().eval()


def output_weights(model, reward_attribute: str | None = None) -> list[float]:
    """One-hot weights over the model's outputs: `reward_attribute` by name (id2label), the
    only output of a one-output model, else ValueError."""
    names = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    if len(names) == 1:
        return [1.0]
    if reward_attribute not in names:
        raise ValueError(f"reward_attribute={reward_attribute!r}: expected one of {names}")
    return [float(n == reward_attribute) for n in names]


@torch.no_grad()
def sequence_rewards(model, sequences: Sequence, weights: Sequence[float], batch: int = 32):
    """[N] rewards of token sequences (each a 1-D int array) under `model`."""
    pad = model.config.pad_token_id
    w = torch.tensor(weights, dtype=torch.float32)
    out = []
    for i in range(0, len(sequences), batch):
        chunk = [torch.as_tensor(s, dtype=torch.long) for s in sequences[i : i + batch]]
        ids = torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True, padding_value=pad)
        mask = torch.arange(ids.shape[1])[None] < torch.tensor([len(c) for c in chunk])[:, None]
        logits = model(input_ids=ids, attention_mask=mask.long()).logits.float()
        out.append(logits @ w)
    return torch.cat(out) if out else torch.zeros(0)


def evaluate_hf_reward_model(
    model_dir: str | os.PathLike,
    eval_paths: Sequence[str],
    tokenizer_dir: str | os.PathLike,
    *,
    reward_attribute: str | None = "helpfulness",
    max_length: int | None = None,
    include_prior_sets: bool = False,
) -> RewardBenchScores:
    """RewardBench scores of an exported reward model on RewardBench-layout files."""
    from nova_engine.data.reward import read_rewardbench, tokenize_rewardbench

    recs, _ = read_rewardbench(list(eval_paths))
    pairs, subsets, _ = tokenize_rewardbench(
        recs, os.fspath(tokenizer_dir), max_length=max_length, truncation="drop"
    )
    model = load_hf_reward_model(os.fspath(model_dir))
    w = output_weights(model, reward_attribute)
    r = sequence_rewards(model, [h.tokens for p in pairs for h in (p.chosen, p.rejected)], w)
    return score_comparisons(
        [subsets[p.index] for p in pairs], r[0::2].tolist(), r[1::2].tolist(),
        include_prior_sets=include_prior_sets,
    )  # fmt: skip
