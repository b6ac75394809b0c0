"""nova_engine.model.heads (single process, no model build): the score head reads the last
token of each packed sequence (not the padding segment), forward and backward equal a plain
gather + matmul on fresh random inputs at odd sizes, its init is seeded and identical across
constructions (TP/DP replicas), and `score.weight` loads from a HF safetensors directory
(shape errors name the tensor). The tensor-parallel / sequence-parallel path is checked
against TP1 in tests/engine/test_train_sft.py (spawned group)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from nova_engine.model.heads import (
    HF_NAMES,
    SCORE_PARAM,
    ScoreHead,
    last_token_index,
    load_score_weight,
)

PS1 = SimpleNamespace(tp=1, sp=False, tp_rank=0, tp_group=None)


@pytest.mark.parametrize("H,K,lengths", [(72, 1, [5, 1, 9]), (64, 3, [4, 4]), (37, 2, [1])])
def test_scores_at_last_tokens_forward_and_backward(H, K, lengths):
    g = torch.Generator().manual_seed(H * 10 + K)
    pad = 3  # trailing padding segment: never read
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist(), sum(lengths) + pad])
    T, S = int(cu[-1]), len(lengths)
    hidden = torch.randn(T, 1, H, generator=g, dtype=torch.float64, requires_grad=True)
    head = ScoreHead(H, K, dtype=torch.float64, init_seed=11)
    torch.testing.assert_close(last_token_index(cu, S), cu[1 : S + 1] - 1)
    scores = head(hidden, cu, S, PS1)
    assert scores.shape == (S, K) and scores.dtype == torch.float32
    # reference: explicit rows, fp64
    h_ref = hidden.detach().clone().requires_grad_(True)
    w_ref = head.weight.detach().clone().requires_grad_(True)
    rows = torch.stack([h_ref[int(cu[i + 1]) - 1, 0] for i in range(S)])
    ref = rows @ w_ref.t()
    torch.testing.assert_close(scores.double(), ref, rtol=1e-6, atol=1e-6)
    up = torch.randn(S, K, generator=g, dtype=torch.float64)
    (scores.double() * up).sum().backward()
    (ref * up).sum().backward()
    torch.testing.assert_close(head.weight.grad, w_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad, h_ref.grad, rtol=1e-6, atol=1e-6)
    assert hidden.grad[int(cu[-2]) :].abs().sum() == 0  # the padding gets no gradient


def test_init_is_seeded_and_replicated():
    a, b, c = ScoreHead(48, 2, init_seed=5), ScoreHead(48, 2, init_seed=5), ScoreHead(48, 2)
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)
    assert 0.01 < float(a.weight.std()) < 0.04  # normal(0, 0.02)
    assert a.weight.tensor_model_parallel is False
    with pytest.raises(ValueError, match="num_outputs=0"):
        ScoreHead(8, 0)


def test_score_weight_from_a_hf_directory(tmp_path):
    assert SCORE_PARAM == HF_NAMES[SCORE_PARAM] == "score.weight"
    w = torch.randn(3, 16)
    save_file(
        {"score.weight": w, "model.norm.weight": torch.ones(16)},
        str(tmp_path / "model.safetensors"),
    )
    head = ScoreHead(16, 3)
    assert load_score_weight(head, str(tmp_path)) and torch.equal(head.weight.data, w)
    wrong = ScoreHead(16, 2)
    with pytest.raises(ValueError, match=r"score\.weight has shape \[3, 16\]"):
        load_score_weight(wrong, str(tmp_path))
    save_file({"model.norm.weight": torch.ones(16)}, str(tmp_path / "model.safetensors"))
    assert not load_score_weight(ScoreHead(16, 3), str(tmp_path))  # a causal-LM checkpoint
