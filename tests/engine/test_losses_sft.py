"""SFT loss (fused linear cross-entropy) with global loss-token normalization: 2 micro-batches
x DP=2 (simulated, and on gloo with the real all_reduce) give exactly the single-rank
full-batch mean and its gradient (float64, against a materialized log_softmax)."""

from __future__ import annotations

import ast
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from nova_engine.losses.sft import sft_loss_fused
from nova_engine.parallel.spawn import run_distributed
from nova_engine.train.loop import Loop
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


def _rank_step(rank, w, global_count):
    total = 0.0
    for mb in range(2):
        hidden, labels, mask = _micro_batch(rank, mb)
        loss = sft_loss_fused(hidden, w, labels, mask, global_count)
        assert loss.dtype == torch.float64
        loss.backward()  # gradient accumulation: grads add up over micro-batches
        total += loss.item()
    return total


def test_simulated_ranks_equal_full_batch():
    want_loss, want_grad, n_tokens = _full_batch_mean_grad()
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
    masked tokens, divided by G; G = 0 is taken as 1."""
    hidden = torch.tensor([[1.0], [1.0], [1.0], [1.0]])
    weight = torch.tensor([[0.0], [math.log(3.0)]])  # p = (1/4, 3/4) on every row
    labels = torch.tensor([0, 1, 1, 0])
    mask = torch.tensor([1, 0, 1, 1])
    nll = -(2 * math.log(0.25) + math.log(0.75))  # rows 0, 2, 3
    loss = sft_loss_fused(hidden, weight, labels, mask, 10)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(nll / 10, rel=1e-6)
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
    # the loop's one reduction of a step's normalizers (a rank without micro-batches adds 0)
    engine = SimpleNamespace(ps=SimpleNamespace(dp=world, dp_group=group, device="cpu"))
    local = {"tokens": sum(int(m.sum()) for m in masks), "only0": 0 if rank else len(masks[0])}
    norms = Loop.reduce_counts(engine, local)
    count = norms["tokens"]
    out = {"count": count.item(), "only0": norms["only0"].item(), "dtype": count.dtype}
    w = _model().requires_grad_()
    loss = _rank_step(rank, w, count)
    dist.all_reduce(w.grad, group=group)  # DP gradient reduction: SUM (the engine's DDP)
    loss_t = torch.tensor(loss, dtype=torch.float64)
    dist.all_reduce(loss_t, group=group)
    out["step"] = (loss_t.item(), w.grad)
    return out


@pytest.fixture(scope="module")
def dp_results():
    return run_distributed(_dp_worker, 2)


@pytest.mark.slow  # spawned process group
def test_dp2_gloo_equals_full_batch(dp_results):
    want_loss, want_grad, n_tokens = _full_batch_mean_grad()
    for res in dp_results:
        assert res["count"] == n_tokens
        assert res["only0"] == SIZES[(0, 0)]
        assert res["dtype"] == torch.float64
        loss, grad = res["step"]
        assert loss == pytest.approx(want_loss.item(), rel=1e-12)
        torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)


# ------------------------------------------------- collectives take device tensors (#34.7)

COLLECTIVES = {
    "all_reduce", "all_gather", "broadcast", "reduce", "reduce_scatter", "reduce_scatter_tensor",
    "all_gather_into_tensor", "all_to_all_single", "send", "recv", "isend", "irecv",
}  # fmt: skip
FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn"}


def _root_call(node):
    """The first call of a method chain: torch.as_tensor(x).clone().reshape(()) -> as_tensor."""
    while isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        inner = node.func.value
        if not isinstance(inner, ast.Call):
            break
        node = inner
    return node


def _host_tensors_in_collectives(source: str, name: str) -> list[str]:
    """`file:line name` for each tensor a torch.distributed collective reduces that its
    function makes with a torch factory (tensor, zeros, as_tensor, ...) without device=:
    such a tensor is on the CPU, and NCCL (the engine's backend on GPUs) rejects it."""
    bad = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        made: dict[str, list[ast.Call]] = {}
        for node in ast.walk(fn):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name):
                        made.setdefault(t.id, []).append(_root_call(node.value))
        for node in ast.walk(fn):
            f = node.func if isinstance(node, ast.Call) else None
            if not (isinstance(f, ast.Attribute) and f.attr in COLLECTIVES):
                continue
            if not (isinstance(f.value, ast.Name) and f.value.id == "dist"):
                continue
            args = [*node.args, *(k.value for k in node.keywords if k.arg == "tensor")]
            for a in args:
                for call in made.get(a.id, []) if isinstance(a, ast.Name) else []:
                    g = call.func if isinstance(call, ast.Call) else None
                    if not (isinstance(g, ast.Attribute) and g.attr in FACTORIES):
                        continue
                    if not (isinstance(g.value, ast.Name) and g.value.id == "torch"):
                        continue
                    if not any(k.arg == "device" for k in call.keywords):
                        bad.append(f"{name}:{node.lineno} {a.id}")
    return bad


def test_collectives_get_device_tensors():
    """No collective in nova_engine / nova_kernels reduces a tensor its function made on the
    host (the bug of the removed sft.all_reduce_count: fine on gloo, a crash on NCCL). The
    checker flags that function's code, and passes it once the tensor takes a device."""
    old = (
        "def all_reduce_count(local, dp_group=None):\n"
        "    t = torch.as_tensor(local, dtype=torch.float64).clone().reshape(())\n"
        "    dist.all_reduce(t, group=dp_group)\n"
        "    return t\n"
    )
    assert _host_tensors_in_collectives(old, "old.py") == ["old.py:3 t"]
    fixed = old.replace("dtype=torch.float64)", "dtype=torch.float64, device=dev)")
    assert _host_tensors_in_collectives(fixed, "fixed.py") == []
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    bad, seen = [], 0
    for pkg in ("nova_engine", os.path.join("kernels", "nova_kernels")):
        for dirpath, _, files in os.walk(os.path.join(root, pkg)):
            for f in sorted(files):
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    with open(path) as fh:
                        src = fh.read()
                    seen += "dist.all_reduce(" in src
                    bad += _host_tensors_in_collectives(src, os.path.relpath(path, root))
    assert seen >= 4  # the engine's reductions were read (loop, runner, rollouts, kernels)
    assert bad == [], bad
