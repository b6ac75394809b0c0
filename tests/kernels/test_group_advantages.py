"""GRPO / Dr. GRPO / RLOO group advantages and degenerate-group flags: Triton (interpreter)
and torch paths against a loop over groups written the straightforward way."""

from __future__ import annotations

import importlib

import pytest
import torch

from nova_kernels import group_advantages
from nova_kernels._testing import assert_verbose_allclose
from nova_kernels.reference import group_advantages_reference as loop_group_adv

ga_mod = importlib.import_module("nova_kernels.ops.group_advantages")
BACKENDS = ["triton", "torch"]
ESTIMATORS = ["grpo", "dr_grpo", "rloo"]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    def poison(*a, dtype=None, **k):
        fill = float("nan") if dtype.is_floating_point else -128
        return torch.full(*a, fill, dtype=dtype, **k)

    monkeypatch.setattr(ga_mod, "_empty", poison)


def make_groups(seed):
    """Shuffled ids, sizes 1..9 and 40 (more than one Triton block), one empty id, and
    groups whose scores are all equal (0/1 rewards as verifiers give)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [4, 1, 7, 9, 40, 2, 3]
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    ids[ids == 5] = 8  # group 5 is empty, G = 9 with group 7 empty too
    scores = torch.randn(len(ids), generator=g)
    scores[ids == 2] = 1.0  # degenerate
    scores[ids == 3] = torch.randint(0, 2, (9,), generator=g).float()
    scores[(ids == 0)] = 0.0  # degenerate
    perm = torch.randperm(len(ids), generator=g)
    return scores[perm], ids[perm], 9


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_group_advantages_matches_loop(backend, estimator, device):
    scores, ids, G = make_groups(seed=3)
    kw = dict(estimator=estimator, num_groups=G, backend=backend)
    adv, deg = group_advantages(scores.to(device), ids.to(device), **kw)
    adv, deg = adv.cpu(), deg.cpu()
    ref, equal = loop_group_adv(scores, ids, estimator)
    assert adv.dtype == torch.float32 and deg.dtype == torch.bool and deg.shape == (G,)
    assert_verbose_allclose(adv, ref, rtol=1e-5, atol=1e-5, name=f"{estimator} advantages")
    expected = torch.tensor([equal.get(g, True) for g in range(G)])
    assert torch.equal(deg, expected), (deg, expected)
    mod_ref = ga_mod.group_advantages_reference(scores.double(), ids, estimator)
    assert_verbose_allclose(mod_ref, ref, rtol=1e-10, atol=1e-10, name="module reference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("n", [1, 5, 16])
def test_group_advantages_contiguous_layout(backend, estimator, n, device):
    g = torch.Generator().manual_seed(n)
    scores = torch.randn(7, n, generator=g)
    scores[2] = 0.5
    kw = dict(group_size=n, estimator=estimator, backend=backend)
    adv, deg = group_advantages(scores.view(-1).to(device), **kw)
    adv, deg = adv.cpu(), deg.cpu()
    ids = torch.arange(7).repeat_interleave(n)
    ref, equal = loop_group_adv(scores.view(-1), ids, estimator)
    assert_verbose_allclose(adv, ref, rtol=1e-5, atol=1e-5, name="advantages")
    assert deg.tolist() == [equal[i] for i in range(7)]


def test_rloo_is_leave_one_out(device):
    """n/(n-1) (s - mean) == s - mean of the others, by hand."""
    s = torch.tensor([1.0, 4.0, 10.0], device=device)
    adv, _ = group_advantages(s, group_size=3, estimator="rloo", backend="triton")
    adv = adv.cpu()
    expected = torch.tensor([1 - 7.0, 4 - 5.5, 10 - 2.5])
    assert_verbose_allclose(adv, expected, rtol=1e-6, atol=1e-6)


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(torch.randn(4), torch.zeros(4, dtype=torch.long), estimator="ppo")
    with pytest.raises(ValueError, match="groups of"):
        group_advantages(torch.randn(5), group_size=2)
    with pytest.raises(ValueError, match="num_groups"):
        group_advantages(torch.randn(3), torch.tensor([0, 1, 4]), num_groups=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int64, torch.float32])
@pytest.mark.parametrize("B, T", [(5, 37), (3, 130), (1, 1)])
def test_broadcast_advantages(backend, mask_dtype, B, T, device):
    """out[b, t] = adv[b] where the 0/1 mask is set, 0 elsewhere; every element written."""
    g = torch.Generator().manual_seed(B * T)
    adv = torch.randn(B, generator=g)
    mask_BT = (torch.rand(B, T, generator=g) < 0.6).to(mask_dtype)
    out = ga_mod.broadcast_advantages(adv.to(device), mask_BT.to(device), backend=backend)
    out = out.cpu()
    want = torch.where(mask_BT != 0, adv[:, None], torch.zeros(()))
    assert out.dtype == torch.float32
    assert_verbose_allclose(out, want, rtol=0, atol=0, name=f"broadcast {backend}")
    # a non-contiguous mask (a column slice) reads the same
    wide = torch.zeros(B, T + 3, dtype=mask_dtype)
    wide[:, 1 : T + 1] = mask_BT
    out2 = ga_mod.broadcast_advantages(
        adv.to(device), wide.to(device)[:, 1 : T + 1], backend=backend
    )
    assert torch.equal(out2.cpu(), out)


def test_broadcast_advantages_checks():
    with pytest.raises(ValueError, match="adv \\[B\\] and mask \\[B, T\\]"):
        ga_mod.broadcast_advantages(torch.zeros(3), torch.zeros(4, 2))
