"""linear_pair_logprobs (3 GEMMs, the pair's loss gradient formed in the forward pass) against
the 4-GEMM path it replaces (linear_logprobs -> seq_reduce -> loss) and the float64
materialized logits: loss, per-sequence sums, dh, dW on ragged packed pairs with a padding
tail; one chunk, one pair per chunk, pairs longer than the row budget (recomputed); bf16 by
the flash-attention rule; TP=2 with and without sequence parallel on gloo. Every test runs the
Triton row kernels and the torch row pass (backend=)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from nova_engine.parallel.spawn import run_distributed
from nova_kernels import linear_logprobs_reference
from nova_kernels._testing import assert_verbose_allclose, assert_within_torch_error
from nova_kernels.ops.linear_pair_logprobs import (
    linear_pair_logprobs,
    linear_pair_logprobs_reference,
)

IGNORE = -100
ll = importlib.import_module("nova_kernels.ops.linear_logprobs")  # owns the workspace budget
lpl = importlib.import_module("nova_kernels.ops.linear_pair_logprobs")
BACKENDS = ["triton", "torch"]
# the gloo workers hold CPU tensors: the Triton backend runs there through the interpreter only
TP_BACKENDS = BACKENDS if not torch.cuda.is_available() else ["torch"]


def _batch(pairs: int, h: int, v: int, dtype, seed: int, pad: int = 5, tp: int = 1):
    """Ragged packed pairs + a padding tail: hidden, weight, targets, cu, mask, refs."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(2, 13, 2 * pairs)
    total = int(lens.sum()) + pad
    total += -total % (2 * tp)  # SP splits the rows evenly
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens), [total]]), dtype=torch.int32)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(total, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.25).to(dtype)
    targets = torch.randint(0, v, (total,), generator=g)
    mask = (torch.rand(total, generator=g) < 0.75).to(torch.uint8)
    targets[int(cu[-2]) :] = IGNORE  # the padding tail
    mask[int(cu[-2]) :] = 0
    targets[torch.randperm(int(cu[-2]), generator=g)[:2]] = IGNORE
    refs = torch.randn(2 * pairs, generator=g) * 3 - 20
    return hidden, weight, targets, cu, mask, refs


def _dpo_norm(refs: torch.Tensor, beta: float = 0.7, total_pairs: float = 3.0):
    """Length-normalized sigmoid DPO over whole pairs, summed and scaled by a global count."""

    def loss(logps, counts, first):
        assert first % 2 == 0 and len(logps) % 2 == 0, "whole pairs only"
        ref = refs[first : first + len(logps)].to(logps.dtype)
        ratio = (logps - ref) / counts.clamp_min(1)
        return -F.logsigmoid(beta * (ratio[0::2] - ratio[1::2])).sum() / total_pairs

    return loss


def _run(fn, hidden, weight, targets, cu, mask, refs, num_seq, device="cpu", cpu=True, **kw):
    """loss, sums, counts, grad_hidden, grad_weight with inputs on `device` (returned on CPU)."""
    h = hidden.detach().clone().to(device).requires_grad_()
    w = weight.detach().clone().to(device).requires_grad_()
    if "seq_index" in kw:
        kw["seq_index"] = kw["seq_index"].to(device)
    targets, cu, mask, refs = (x.to(device) for x in (targets, cu, mask, refs))
    loss, sums, counts = fn(h, w, targets, cu, mask, _dpo_norm(refs), num_sequences=num_seq, **kw)
    (loss * 1.5).backward()  # a non-unit upstream gradient
    out = loss.detach(), sums, counts, h.grad, w.grad
    return tuple(x.cpu() for x in out) if cpu else out


def _fused(backend):
    return lambda *a, **kw: linear_pair_logprobs(*a, backend=backend, **kw)


def _ref64(h, w, t, cu, mask, group_loss, *, num_sequences, dtype=torch.float64, **_):
    """float64 (or `dtype`: None = the inputs' dtype) materialized logits -> log_softmax ->
    per-sequence sums -> loss."""
    lp = linear_logprobs_reference(h, w, t, IGNORE, dtype=dtype).double()
    seg = torch.repeat_interleave(torch.arange(num_sequences), (cu[1:] - cu[:-1])[:num_sequences])
    n = int(cu[num_sequences])
    m = (mask[:n] != 0).double()
    sums = torch.zeros(num_sequences, dtype=torch.float64).index_add(0, seg, lp[:n] * m)
    counts = torch.zeros(num_sequences, dtype=torch.float64).index_add(0, seg, m)
    return group_loss(sums, counts, 0), sums.detach(), counts


NAMES = ["loss", "sums", "counts", "grad_hidden", "grad_weight"]


WORKSPACES = {  # (chunk budget, whole-group cap) in elements; V = 1000, pairs of 4-24 rows
    "one_chunk": None,
    "pair_per_chunk": (12_000, 12_000),  # 12 rows per chunk: about one pair each
    "whole_pairs_over_budget": (3000, 10**6),  # 3-row budget, pairs still run whole
    "oversize_pairs": (3000, 3000),  # pairs in 3-row sub-chunks, logits recomputed
}


def _host_facts(cu: torch.Tensor, total: int, num_seq: int) -> dict:
    """What the packer hands over on the host: cu_seqlens as a list, each row's sequence."""
    seq = torch.full((total,), -1, dtype=torch.long)
    for s in range(num_seq):
        seq[int(cu[s]) : int(cu[s + 1])] = s
    return {"cu_seqlens_host": cu.tolist(), "seq_index": seq}


# the host facts change only where the chunk schedule comes from: Triton runs with them
BACKEND_FACTS = [("torch", False), ("torch", True), ("triton", True)]


@pytest.mark.parametrize("backend,host_facts", BACKEND_FACTS)
@pytest.mark.parametrize("workspace", list(WORKSPACES))
def test_fused_equals_4gemm_fp32(workspace, host_facts, backend, device, monkeypatch):
    hidden, weight, targets, cu, mask, refs = _batch(4, 72, 1000, torch.float32, seed=3)
    kw = _host_facts(cu, hidden.shape[0], 8) if host_facts else {}
    if WORKSPACES[workspace] is not None:
        budget, group_cap = WORKSPACES[workspace]
        monkeypatch.setattr(ll, "_WORKSPACE_ELEMS", budget)
        monkeypatch.setattr(lpl, "_GROUP_WORKSPACE_ELEMS", group_cap)
    args = (hidden, weight, targets, cu, mask, refs, 8)
    got = _run(_fused(backend), *args, device, **kw)
    four = _run(linear_pair_logprobs_reference, *args)
    ref = _run(_ref64, *args)
    for name, a, b, e in zip(NAMES, got, four, ref):
        assert_verbose_allclose(a, b, rtol=1e-5, atol=1e-5, name=f"{backend} vs 4-GEMM {name}")
        assert_verbose_allclose(a, e, rtol=1e-4, atol=2e-5, name=f"{backend} vs fp64 {name}")
    gh = got[3]
    assert gh[int(cu[8]) :].abs().max() == 0, "padding rows get no gradient"
    assert gh[: int(cu[8])].abs().max() > 0 and got[4].abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("workspace", ["one_chunk", "pair_per_chunk"])
def test_fused_bf16_within_torch_error(backend, workspace, device, monkeypatch):
    if WORKSPACES[workspace] is not None:  # grad_W accumulates over several chunks
        monkeypatch.setattr(ll, "_WORKSPACE_ELEMS", WORKSPACES[workspace][0])
        monkeypatch.setattr(lpl, "_GROUP_WORKSPACE_ELEMS", WORKSPACES[workspace][1])
    hidden, weight, targets, cu, mask, refs = _batch(3, 72, 1000, torch.bfloat16, seed=4)
    args = (hidden, weight, targets, cu, mask, refs, 6)
    got = _run(_fused(backend), *args, device)
    same = _run(_ref64, *args, dtype=None)  # the plain path in bf16 sets the error budget
    ref = _run(_ref64, *args)
    for i, name in enumerate(NAMES):
        if name == "counts":
            assert torch.equal(got[i].double(), ref[i])
            continue
        assert_within_torch_error(got[i], same[i], ref[i], name=f"{backend} bf16 {name}",
                                  floor=1e-3)  # fmt: skip
    assert got[3].dtype == torch.bfloat16 and got[4].dtype == torch.bfloat16


@pytest.mark.parametrize("workspace", ["one_chunk", "oversize_pairs"])
def test_triton_equals_torch_backend(workspace, device, monkeypatch):
    """fp32: the Triton row kernels and the torch row pass give the same outputs and grads."""
    if WORKSPACES[workspace] is not None:
        monkeypatch.setattr(ll, "_WORKSPACE_ELEMS", WORKSPACES[workspace][0])
        monkeypatch.setattr(lpl, "_GROUP_WORKSPACE_ELEMS", WORKSPACES[workspace][1])
    hidden, weight, targets, cu, mask, refs = _batch(2, 40, 1000, torch.float32, seed=12)
    args = (hidden, weight, targets, cu, mask, refs, 4, device)
    got = _run(_fused("triton"), *args)
    want = _run(_fused("torch"), *args)
    for name, a, b in zip(NAMES, got, want):
        assert_verbose_allclose(a, b, rtol=1e-5, atol=1e-6, name=f"triton vs torch {name}")


def test_score_only_and_checks():
    hidden, weight, targets, cu, mask, _ = _batch(2, 24, 300, torch.float32, seed=5)
    loss, sums, counts = linear_pair_logprobs(hidden, weight, targets, cu, mask, None,
                                              num_sequences=4)  # fmt: skip
    _, rsums, rcounts = _ref64(hidden, weight, targets, cu, mask, lambda s, c, f: s.sum(),
                               num_sequences=4)  # fmt: skip
    assert float(loss) == 0.0
    assert_verbose_allclose(sums, rsums, rtol=1e-5, atol=1e-5, name="score-only sums")
    assert torch.equal(counts.double(), rcounts)
    # no sequence at all (a rank dealt nothing gets an all-padding batch): zero loss and grads
    h = hidden.clone().requires_grad_()
    loss0, sums0, _ = linear_pair_logprobs(h, weight, targets, cu[-2:] * 0, mask, lambda *a: 1 / 0,
                                           num_sequences=0)  # fmt: skip
    loss0.backward()
    assert float(loss0.detach()) == 0.0 and sums0.numel() == 0 and h.grad.abs().max() == 0
    with pytest.raises(ValueError, match="multiple of group_size"):
        linear_pair_logprobs(hidden, weight, targets, cu, mask, None, num_sequences=3)
    with pytest.raises(ValueError, match="loss_mask"):
        linear_pair_logprobs(hidden, weight, targets, cu, mask[:-1], None, num_sequences=4)
    with pytest.raises(ValueError, match="cu_seqlens_host"):
        linear_pair_logprobs(hidden, weight, targets, cu, mask, None, num_sequences=4,
                             cu_seqlens_host=cu.tolist()[:-1])  # fmt: skip
    with pytest.raises(ValueError, match="seq_index"):
        linear_pair_logprobs(hidden, weight, targets, cu, mask, None, num_sequences=4,
                             seq_index=torch.zeros(3, dtype=torch.long))  # fmt: skip
    with pytest.raises(ValueError, match="fp64"):
        linear_pair_logprobs(hidden.double(), weight.double(), targets, cu, mask, None,
                             num_sequences=4, backend="triton")  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync_with_host_facts(backend, device):
    """Given the packer's host facts, forward and backward read nothing back to the host
    (nova_kernels._sync raises on any read); without them the guard catches cu_seqlens."""
    from nova_kernels._sync import HostSyncError, forbid_host_sync

    hidden, weight, targets, cu, mask, refs = _batch(3, 24, 300, torch.float32, seed=8)
    kw = _host_facts(cu, hidden.shape[0], 6)
    args = (hidden, weight, targets, cu, mask, refs, 6, device)
    with forbid_host_sync():
        got = _run(_fused(backend), *args, cpu=False, **kw)
    got = [x.cpu() for x in got]
    want = _run(_fused(backend), *args)
    for name, a, b in zip(NAMES, got, want):
        assert torch.equal(a, b), name
    with pytest.raises(HostSyncError), forbid_host_sync():
        _run(_fused(backend), *args, cpu=False)


# ------------------------------------------------------------------------- TP=2 (+SP), gloo

TP_PAIRS, TP_H, TP_V = 4, 72, 1000


def _tp_worker(rank, world):
    hidden, weight, targets, cu, mask, refs = _batch(TP_PAIRS, TP_H, TP_V, torch.float32, 7, tp=2)
    vp, ns = TP_V // world, hidden.shape[0] // world
    out = {}
    for backend in TP_BACKENDS:
        for sp in (False, True):
            h = hidden[rank * ns : (rank + 1) * ns] if sp else hidden
            w = weight[rank * vp : (rank + 1) * vp]
            kw = dict(tp_group=dist.group.WORLD, sequence_parallel=sp, backend=backend)
            kw |= _host_facts(cu, hidden.shape[0], 2 * TP_PAIRS) if sp else {}
            fn = linear_pair_logprobs
            out[backend, sp] = _run(fn, h, w, targets, cu, mask, refs, 2 * TP_PAIRS, **kw)
    return out


@pytest.fixture(scope="module")
def tp_results():
    return run_distributed(_tp_worker, 2)


@pytest.mark.slow  # spawned process group
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sp", [False, True])
def test_tp2_equals_4gemm_tp1(tp_results, sp, backend):
    if backend not in TP_BACKENDS:
        pytest.skip("Triton on gloo CPU workers needs the interpreter (no CUDA)")
    hidden, weight, targets, cu, mask, refs = _batch(TP_PAIRS, TP_H, TP_V, torch.float32, 7, tp=2)
    valid = targets[targets != IGNORE]
    assert (valid < TP_V // 2).any() and (valid >= TP_V // 2).any(), "targets on both shards"
    four = _run(linear_pair_logprobs_reference, hidden, weight, targets, cu, mask, refs, 8)
    vp, ns = TP_V // 2, hidden.shape[0] // 2
    for rank, res in enumerate(tp_results):
        want = list(four)
        want[3] = want[3][rank * ns : (rank + 1) * ns] if sp else want[3]
        want[4] = want[4][rank * vp : (rank + 1) * vp]
        for name, a, e in zip(NAMES, res[backend, sp], want):
            tag = f"{backend} sp={sp} r{rank} {name}"
            assert_verbose_allclose(a, e, rtol=1e-5, atol=1e-5, name=tag)
