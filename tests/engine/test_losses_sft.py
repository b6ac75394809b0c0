"""SFT loss (fused linear cross-entropy) with global loss-token normalization: 2 micro-batches
x DP=2 (simulated, and on gloo with the real all_reduce) give exactly the single-rank
full-batch mean and its gradient (float64, against a materialized log_softmax)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from nova_engine.losses.sft import all_reduce_count, global_loss_token_count, sft_loss_fused
from nova_engine.parallel.spawn import run_distributed
from nova_kernels import linear_logprobs

H, V = 12, 40
# (rank, micro-batch) -> token count: uneven on purpose
SIZES = {(0, 0): 9, (0, 1): 4, (1, 0): 6, (1, 1): 11}


def _model():
    g = torch.Generator().manual_seed(0)
    return torch.randn(V, H, generator=g, dtype=torch.float64)


def _micro_batch(rank, mb):
    g = torch.Generator().manual_seed(100 + 10 * rank + mb)
    n = SIZES[(rank, mb)]
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (n,), generator=g)
    mask = torch.rand(n, generator=g) > 0.35
    return hidden, labels, mask


def _full_batch_mean_grad():
    w = _model().requires_grad_()
    parts = [_micro_batch(r, m) for r in range(2) for m in range(2)]
    hidden = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    mask = torch.cat([p[2] for p in parts])
    nll = -torch.log_softmax(hidden @ w.T, -1).gather(1, labels[:, None])[:, 0]
    loss = nll[mask].mean()
    loss.backward()
    return loss.detach(), w.grad, int(mask.sum())


def _rank_step(rank, w, global_count, dp_average_size=1):
    total = 0.0
    for mb in range(2):
        hidden, labels, mask = _micro_batch(rank, mb)
        loss = sft_loss_fused(
            hidden, w, labels, mask, global_count, dp_average_size=dp_average_size
        )
        assert loss.dtype == torch.float64
        loss.backward()  # gradient accumulation: grads add up over micro-batches
        total += loss.item()
    return total


def test_simulated_ranks_equal_full_batch():
    want_loss, want_grad, n_tokens = _full_batch_mean_grad()
    masks = [_micro_batch(r, m)[2] for r in range(2) for m in range(2)]
    assert global_loss_token_count(masks).item() == n_tokens
    grads, losses = [], []
    for rank in range(2):
        w = _model().requires_grad_()
        losses.append(_rank_step(rank, w, n_tokens))
        grads.append(w.grad)
    assert sum(losses) == pytest.approx(want_loss.item(), rel=1e-12)
    torch.testing.assert_close(grads[0] + grads[1], want_grad, rtol=1e-10, atol=1e-12)
    # the naive per-micro-batch mean is NOT the full-batch mean here (uneven token counts)
    naive = sum(
        -linear_logprobs(h, _model(), y, backend="torch")[m].mean().item() / 4
        for h, y, m in (_micro_batch(r, mb) for r in range(2) for mb in range(2))
    )
    assert abs(naive - want_loss.item()) > 1e-3


def test_sft_loss_by_hand():
    """H = 1 and weight = the logits of a 2-token vocabulary: logp by hand, summed over the
    masked tokens, divided by G (times dp_average_size); G = 0 is taken as 1."""
    hidden = torch.tensor([[1.0], [1.0], [1.0], [1.0]])
    weight = torch.tensor([[0.0], [math.log(3.0)]])  # p = (1/4, 3/4) on every row
    labels = torch.tensor([0, 1, 1, 0])
    mask = torch.tensor([1, 0, 1, 1])
    nll = -(2 * math.log(0.25) + math.log(0.75))  # rows 0, 2, 3
    loss = sft_loss_fused(hidden, weight, labels, mask, 10)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(nll / 10, rel=1e-6)
    assert sft_loss_fused(hidden, weight, labels, mask, 10, dp_average_size=4).item() == (
        pytest.approx(4 * nll / 10, rel=1e-6)
    )
    assert sft_loss_fused(hidden, weight, labels, torch.zeros(4), 0).item() == 0.0
    # an ignored label inside the mask contributes nothing
    ignored = torch.tensor([0, -100, 1, 0])
    loss_ign = sft_loss_fused(hidden, weight, ignored, torch.ones(4), 10)
    assert loss_ign.item() == pytest.approx(nll / 10, rel=1e-6)
    with pytest.raises(ValueError, match="loss_mask"):
        sft_loss_fused(hidden, weight, labels, mask[:3], 10)


def _dp_worker(rank, world):
    group = dist.group.WORLD
    masks = [_micro_batch(rank, mb)[2] for mb in range(2)]
    count = global_loss_token_count(masks, group)
    out = {"count": count.item(), "pairs": all_reduce_count(rank + 1, group).item()}
    for avg in (False, True):
        w = _model().requires_grad_()
        loss = _rank_step(rank, w, count, dp_average_size=world if avg else 1)
        dist.all_reduce(w.grad, group=group)  # DP gradient reduction: SUM ...
        if avg:
            w.grad /= world  # ... or AVERAGE (torch DDP / megatron default)
        loss_t = torch.tensor(loss, dtype=torch.float64)
        dist.all_reduce(loss_t, group=group)
        out[avg] = (loss_t.item() / (world if avg else 1), w.grad)
    return out


@pytest.fixture(scope="module")
def dp_results():
    return run_distributed(_dp_worker, 2)


@pytest.mark.slow  # spawned process group
def test_dp2_gloo_equals_full_batch(dp_results):
    want_loss, want_grad, n_tokens = _full_batch_mean_grad()
    for res in dp_results:
        assert res["count"] == n_tokens
        assert res["pairs"] == 3
        for avg in (False, True):
            loss, grad = res[avg]
            assert loss == pytest.approx(want_loss.item(), rel=1e-12)
            torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
