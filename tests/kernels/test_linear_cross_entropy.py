"""linear_cross_entropy (3 GEMMs, grads formed in the forward pass), Triton row kernel and torch
backends, against the float64 materialized reference -sum w logp and against each other: fp32
tight, bf16 by the flash-attention rule, odd shapes, one and many row chunks, masked rows;
TP=2 (with and without sequence parallel) equal to TP=1 on gloo, both backends."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from nova_engine.parallel.spawn import run_distributed
from nova_kernels import linear_cross_entropy
from nova_kernels._testing import assert_verbose_allclose, assert_within_torch_error
from nova_kernels._testing import linear_inputs as _inputs
from nova_kernels.ops import linear_logprobs as ll  # owns the workspace budget
from nova_kernels.reference import linear_cross_entropy_reference

IGNORE = -100


BACKENDS = ["triton", "torch"]
# the gloo workers hold CPU tensors: the Triton backend runs there through the interpreter only
TP_BACKENDS = BACKENDS if not torch.cuda.is_available() else ["torch"]


def _ce_run(fn, hidden, weight, targets, wts, device="cpu", cpu=True):
    """loss, grad_hidden, grad_weight of fn with inputs on `device` (returned on CPU)."""
    h = hidden.detach().clone().to(device).requires_grad_()
    w = weight.detach().clone().to(device).requires_grad_()
    wts = wts.to(device) if wts is not None else None
    loss = fn(h, w, targets.to(device), wts)
    (loss * 1.5).backward()  # a non-unit upstream gradient
    out = loss.detach(), h.grad, w.grad
    return tuple(x.cpu() for x in out) if cpu else out


def _fused(backend, **kw):
    return lambda h, w, t, x: linear_cross_entropy(h, w, t, x, backend=backend, **kw)


def _ce_ref(h, w, t, wts, dtype=torch.float64):
    return linear_cross_entropy_reference(h, w, t, wts, IGNORE, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiny_workspace", [False, True])
def test_fused_cross_entropy(dtype, tiny_workspace, backend, device, monkeypatch):
    if tiny_workspace:  # 5000 // 1000 -> 5 rows per chunk: grad_W accumulates over 8 chunks
        monkeypatch.setattr(ll, "_WORKSPACE_ELEMS", 5000)
    hidden, weight, targets, g_lp, _ = _inputs(37, 72, 1000, dtype, seed=5)
    wts = g_lp.abs()  # per-token weights, e.g. mask / global count
    got = _ce_run(_fused(backend), hidden, weight, targets, wts, device)
    ref = _ce_run(_ce_ref, hidden, weight, targets, wts)
    names = ["loss", "grad_hidden", "grad_weight"]
    same = None
    if dtype != torch.float32:
        same = _ce_run(lambda *x: _ce_ref(*x, dtype=None), hidden, weight, targets, wts)
    for i, (name, a, e) in enumerate(zip(names, got, ref)):
        if dtype == torch.float32:
            assert_verbose_allclose(a, e, rtol=1e-4, atol=2e-5, name=f"{backend} {name}")
        else:
            assert_within_torch_error(a, same[i], e, name=f"{backend} bf16 {name}")
    assert got[1].dtype == dtype and got[2].dtype == dtype


@pytest.mark.parametrize("tiny_workspace", [False, True])
def test_triton_equals_torch_backend(tiny_workspace, device, monkeypatch):
    """fp32: the Triton row kernel and the torch row pass give the same loss and grads."""
    if tiny_workspace:
        monkeypatch.setattr(ll, "_WORKSPACE_ELEMS", 3000)  # 3 rows per chunk
    hidden, weight, targets, g_lp, _ = _inputs(19, 40, 1000, torch.float32, seed=9)
    wts = g_lp.abs()
    got = _ce_run(_fused("triton"), hidden, weight, targets, wts, device)
    want = _ce_run(_fused("torch"), hidden, weight, targets, wts, device)
    for name, a, b in zip(["loss", "grad_hidden", "grad_weight"], got, want):
        assert_verbose_allclose(a, b, rtol=1e-5, atol=1e-6, name=f"triton vs torch {name}")


def test_backend_checked():
    h, w, t = (
        torch.randn(4, 8, dtype=torch.float64),
        torch.randn(16, 8, dtype=torch.float64),
        torch.zeros(4, dtype=torch.long),
    )
    with pytest.raises(ValueError, match="fp64"):
        linear_cross_entropy(h, w, t, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        linear_cross_entropy(h.float(), w.float(), t, backend="cuda")
    loss = linear_cross_entropy(h, w, t)  # fp64: the torch path in fp64
    want = linear_cross_entropy_reference(h, w, t, None, IGNORE)
    assert loss.dtype == torch.float64 and torch.allclose(loss, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_rows", [False, True])
@pytest.mark.parametrize("tiny_workspace", [False, True])
def test_rows_without_loss_skipped(tiny_workspace, with_rows, backend, device, monkeypatch):
    """Rows of weight 0 (a masked prompt) or ignore_index: with `rows` (the counted rows, as
    the packer computes them) they leave the GEMMs; with or without, loss and grads equal the
    reference and those rows' grad_hidden is exactly 0."""
    if tiny_workspace:
        monkeypatch.setattr(ll, "_WORKSPACE_ELEMS", 5000)
    hidden, weight, targets, g_lp, _ = _inputs(41, 72, 1000, torch.float32, seed=11)
    wts = g_lp.abs()
    wts[:17] = 0.0  # a prompt of 17 tokens
    wts[30:33] = 0.0
    dropped = (wts == 0) | (targets == IGNORE)
    assert dropped.any() and (~dropped).any()
    rows = torch.arange(41)[~dropped].to(device) if with_rows else None
    got = _ce_run(_fused(backend, rows=rows), hidden, weight, targets, wts, device)
    ref = _ce_run(_ce_ref, hidden, weight, targets, wts)
    for name, a, e in zip(["loss", "grad_hidden", "grad_weight"], got, ref):
        assert_verbose_allclose(a, e, rtol=1e-4, atol=2e-5, name=f"{backend} masked {name}")
    assert bool((got[1][dropped] == 0).all())
    rows0 = torch.zeros(0, dtype=torch.long, device=device) if with_rows else None
    none = _ce_run(
        _fused(backend, rows=rows0), hidden, weight, targets, torch.zeros_like(wts), device
    )
    assert float(none[0]) == 0.0 and not none[1].any() and not none[2].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync_with_rows(backend, device):
    """With the packer's `rows` (or none) forward and backward read nothing back to the host;
    the guard (nova_kernels._sync) catches a boolean-mask read."""
    from nova_kernels._sync import HostSyncError, forbid_host_sync

    hidden, weight, targets, g_lp, _ = _inputs(23, 40, 300, torch.float32, seed=3)
    wts = g_lp.abs()
    wts[:9] = 0.0
    rows = torch.arange(23)[(wts != 0) & (targets != IGNORE)].to(device)
    with forbid_host_sync():
        got = _ce_run(_fused(backend, rows=rows), hidden, weight, targets, wts, device, False)
        plain = _ce_run(_fused(backend), hidden, weight, targets, wts, device, False)
    got, plain = [x.cpu() for x in got], [x.cpu() for x in plain]
    ref = _ce_run(_ce_ref, hidden, weight, targets, wts)
    for name, a, b, e in zip(["loss", "grad_hidden", "grad_weight"], got, plain, ref):
        assert_verbose_allclose(a, e, rtol=1e-4, atol=2e-5, name=f"rows {name}")
        assert_verbose_allclose(b, e, rtol=1e-4, atol=2e-5, name=f"all rows {name}")
    with pytest.raises(HostSyncError), forbid_host_sync():
        hidden[wts != 0]


def test_token_weights_and_rows_checked():
    h, w = torch.randn(4, 8), torch.randn(16, 8)
    with pytest.raises(ValueError, match="token_weights"):
        linear_cross_entropy(h, w, torch.zeros(4, dtype=torch.long), torch.ones(3))
    with pytest.raises(ValueError, match="rows"):
        linear_cross_entropy(h, w, torch.zeros(4, dtype=torch.long), rows=torch.ones(2))


N_TP, H_TP, V_TP = 38, 72, 1000  # N even: sequence parallel splits it 19 + 19


def _tp_weights(g_lp):
    """Per-token weights with a masked prompt (rows 0..9 weigh 0: they leave the GEMMs)."""
    wts = g_lp.abs()
    wts[:10] = 0.0
    return wts


def _tp_worker(rank, world):
    hidden, weight, targets, g_lp, _ = _inputs(N_TP, H_TP, V_TP, torch.float32, seed=7)
    vp, ns = V_TP // world, N_TP // world
    out = {}
    for backend in TP_BACKENDS:
        for sp in (False, True):
            h = hidden[rank * ns : (rank + 1) * ns] if sp else hidden
            h = h.clone().requires_grad_()
            w = weight[rank * vp : (rank + 1) * vp].clone().requires_grad_()
            wts = _tp_weights(g_lp)
            rows = torch.arange(N_TP)[(wts != 0) & (targets != IGNORE)]  # the prompt leaves
            loss = linear_cross_entropy(
                h, w, targets, wts, rows=rows, tp_group=dist.group.WORLD, sequence_parallel=sp,
                backend=backend,
            )  # fmt: skip
            loss.backward()
            out[backend, sp] = (loss.detach(), h.grad, w.grad)
    return out


@pytest.fixture(scope="module")
def tp_results():
    return run_distributed(_tp_worker, 2)


@pytest.mark.slow  # spawned process group
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sp", [False, True])
def test_tp2_equals_tp1(tp_results, sp, backend):
    if backend not in TP_BACKENDS:
        pytest.skip("Triton on gloo CPU workers needs the interpreter (no CUDA)")
    hidden, weight, targets, g_lp, _ = _inputs(N_TP, H_TP, V_TP, torch.float32, seed=7)
    valid = targets[targets != IGNORE]
    assert (valid < V_TP // 2).any() and (valid >= V_TP // 2).any(), "targets on both shards"
    loss1, gh1, gw1 = _ce_run(_fused(backend), hidden, weight, targets, _tp_weights(g_lp))
    gh1, gw1 = gh1 / 1.5, gw1 / 1.5  # _ce_run scales the upstream gradient
    vp, ns = V_TP // 2, N_TP // 2
    for rank, res in enumerate(tp_results):
        loss, gh, gw = res[backend, sp]
        tag = f"{backend} sp={sp} rank {rank}"
        assert_verbose_allclose(loss, loss1, rtol=1e-6, atol=1e-5, name=f"{tag} loss")
        gh_want = gh1[rank * ns : (rank + 1) * ns] if sp else gh1
        assert_verbose_allclose(gh, gh_want, rtol=1e-5, atol=1e-5, name=f"{tag} dh")
        gw_want = gw1[rank * vp : (rank + 1) * vp]
        assert_verbose_allclose(gw, gw_want, rtol=1e-5, atol=1e-5, name=f"{tag} dW")
