"""GRPO / Dr. GRPO / RLOO group advantages and degenerate-group flags: Triton (interpreter)
and torch paths against a loop over groups in float64 (nova_kernels.reference), and their
composition with a data-parallel all-reduce supplied by the caller: k identical ranks, and
two ranks holding different shards of the same groups (a group split over both, groups on
one rank only, a group of two with one member per rank), against the single-process result
over the concatenation. No host sync on the torch path; the same bits on every run."""

from __future__ import annotations

import pytest
import torch

from nova_kernels import group_advantages
from nova_kernels._sync import forbid_host_sync
from nova_kernels._testing import assert_verbose_allclose
from nova_kernels.reference import group_advantages_reference

BACKENDS = ["triton", "torch"]
ESTIMATORS = ["grpo", "dr_grpo", "rloo"]
TOL = dict(rtol=1e-5, atol=1e-5)

# group sizes per case: 0 = an empty group; 40 > the interpreter's 32-wide block
CASES = {
    "mixed": [4, 1, 7, 9, 40, 0, 3, 0, 2],
    "singles": [1, 1, 1, 1, 1],
    "round": [16] * 8,
    "empty": [0, 0, 0],
}


def make_groups(sizes, seed, dtype=torch.float32, shuffle=True):
    """scores [R], ids [R] (shuffled unless not `shuffle`), G = len(sizes). Group 0 is all
    equal (0.0), group 2 all 1.0 when it has members, group 3 holds 0/1 rewards. Scores are
    multiples of 1/64, so that fp32 sums of copies are exact: k copies of one score (a group
    of one on k ranks) must be seen as equal, else grpo divides an fp32 rounding error of
    the mean by std + eps ~ 1e-6 (the same in verl; not the kernel's error)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(sizes)])
    scores = torch.round((torch.randn(ids.numel(), generator=g) * 2 + 0.5) * 64) / 64
    scores[ids == 0] = 0.0
    scores[ids == 2] = 1.0
    scores[ids == 3] = torch.randint(0, 2, (int((ids == 3).sum()),), generator=g).float()
    if shuffle:
        perm = torch.randperm(ids.numel(), generator=g)
        scores, ids = scores[perm], ids[perm]
    return scores.to(dtype), ids, len(sizes)


def reference(scores, ids, G, estimator):
    """(advantages float64, degenerate [G] bool) of the loop over groups."""
    adv, equal = group_advantages_reference(scores.double(), ids, estimator)
    return adv, torch.tensor([equal.get(g, True) for g in range(G)], dtype=torch.bool)


def check(adv, deg, ref_adv, ref_deg, name):
    adv, deg = adv.cpu(), deg.cpu()
    assert adv.dtype == torch.float32 and deg.dtype == torch.bool
    assert_verbose_allclose(adv, ref_adv, name=name, **TOL)
    assert deg.shape == ref_deg.shape and torch.equal(deg, ref_deg), (deg, ref_deg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("case", list(CASES))
def test_group_advantages_matches_loop(backend, estimator, case, device):
    scores, ids, G = make_groups(CASES[case], seed=len(case))
    adv, deg = group_advantages(
        scores.to(device), ids.to(device), num_groups=G, estimator=estimator, backend=backend
    )
    check(adv, deg, *reference(scores, ids, G, estimator), f"{estimator} {case}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_group_advantages_input_dtypes(backend, dtype, device):
    """Scores in any float dtype, contiguous runs of ids (the usual layout on a rank)."""
    scores, ids, G = make_groups(CASES["mixed"], seed=5, dtype=dtype, shuffle=False)
    adv, deg = group_advantages(scores.to(device), ids.to(device), num_groups=G, backend=backend)
    check(adv, deg, *reference(scores, ids, G, "grpo"), str(dtype))


def _k_ranks(k):
    """k identical ranks: a sum all-reduce multiplies by k, a max leaves the value."""

    def reduce(t, op):
        if op == "sum":
            t.mul_(k)

    return reduce


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("k", [2, 3])
def test_reduce_over_identical_ranks(backend, estimator, k, device):
    """k ranks holding the same responses = one process over the k-fold concatenation (a
    group of one becomes a group of k: its mean and scale change)."""
    scores, ids, G = make_groups(CASES["mixed"], seed=k)
    adv, deg = group_advantages(
        scores.to(device), ids.to(device), num_groups=G, estimator=estimator,
        backend=backend, reduce=_k_ranks(k),
    )  # fmt: skip
    ref_adv, ref_deg = reference(scores.repeat(k), ids.repeat(k), G, estimator)
    check(adv, deg, ref_adv[: scores.numel()], ref_deg, f"{estimator} k={k}")


class OtherShard:
    """The reduce callback of a rank whose only peer holds (scores, ids): each all-reduce
    adds (or maxes in) the peer's partials, computed here in float64 from the peer's data
    and the statistics the call before produced. Records the calls (op, shape)."""

    def __init__(self, scores, ids, G):
        self.x, self.ids, self.G = scores.double(), ids, G
        self.calls = []
        self.mean = None

    def __call__(self, t, op):
        self.calls.append((op, tuple(t.shape)))
        x, ids, G = self.x, self.ids, self.G
        if op == "sum" and t.shape == (2, G):  # (count, sum)
            part = torch.zeros(2, G, dtype=torch.float64)
            part[0].index_add_(0, ids, torch.ones_like(x))
            part[1].index_add_(0, ids, x)
            t.add_(part.to(t.device, t.dtype))
            total = t.double().cpu()
            self.mean = total[1] / total[0].clamp_min(1)
        elif op == "sum":  # centered sum of squares around the global mean
            ss = torch.zeros(G, dtype=torch.float64).index_add_(0, ids, (x - self.mean[ids]) ** 2)
            t.add_(ss.to(t.device, t.dtype))
        else:  # (max, -min)
            ext = torch.full((2, G), float("-inf"), dtype=torch.float64)
            ext[0].scatter_reduce_(0, ids, x, "amax")
            ext[1].scatter_reduce_(0, ids, -x, "amax")
            torch.maximum(t, ext.to(t.device, t.dtype), out=t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_reduce_over_two_different_shards(backend, estimator, device):
    """Two ranks with different responses of the same step: each rank's advantages and the
    degenerate flags equal the single process over both shards."""
    g = torch.Generator().manual_seed(11)
    # group 0 split 3/4, 1 only on A, 2 only on B, 3 one member each (a group of two),
    # 4 empty, 5 all-equal split 2/2, 6 equal on A alone but not over both
    ids_a = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 3, 5, 5, 6, 6])
    ids_b = torch.tensor([0, 0, 0, 0, 2, 2, 2, 3, 5, 5, 6])
    G = 7
    x_a = torch.randn(ids_a.numel(), generator=g) * 3
    x_b = torch.randn(ids_b.numel(), generator=g) * 3
    x_a[ids_a == 5], x_b[ids_b == 5] = 1.0, 1.0
    x_a[ids_a == 6], x_b[ids_b == 6] = 0.0, 1.0
    ref_adv, ref_deg = reference(torch.cat([x_a, x_b]), torch.cat([ids_a, ids_b]), G, estimator)
    assert ref_deg.tolist() == [False, False, False, False, True, True, False]
    ra = ids_a.numel()
    for x, ids, other, want in (
        (x_a, ids_a, OtherShard(x_b, ids_b, G), ref_adv[:ra]),
        (x_b, ids_b, OtherShard(x_a, ids_a, G), ref_adv[ra:]),
    ):
        kw = dict(num_groups=G, estimator=estimator, backend=backend)
        adv, deg = group_advantages(x.to(device), ids.to(device), reduce=other, **kw)
        check(adv, deg, want, ref_deg, f"{estimator} shard")
        assert other.calls == [("sum", (2, G)), ("sum", (G,)), ("max", (2, G))]
        alone, alone_deg = group_advantages(x.to(device), ids.to(device), **kw)
        assert not torch.allclose(alone.cpu(), want.float(), **TOL)  # the reduce matters
        assert not torch.equal(alone_deg.cpu(), ref_deg)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_torch_path_has_no_host_sync(estimator):
    scores, ids, G = make_groups(CASES["mixed"], seed=2)
    with forbid_host_sync():
        adv, deg = group_advantages(
            scores, ids, num_groups=G, estimator=estimator, backend="torch", reduce=_k_ranks(2)
        )
    ref_adv, ref_deg = reference(scores.repeat(2), ids.repeat(2), G, estimator)
    check(adv, deg, ref_adv[: scores.numel()], ref_deg, "under forbid_host_sync")


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_bits_every_run(backend, device):
    scores, ids, G = make_groups(CASES["mixed"], seed=8)
    scores, ids = scores.to(device), ids.to(device)
    a1, d1 = group_advantages(scores, ids, num_groups=G, backend=backend, reduce=_k_ranks(3))
    a2, d2 = group_advantages(scores, ids, num_groups=G, backend=backend, reduce=_k_ranks(3))
    assert torch.equal(a1, a2) and torch.equal(d1, d2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rloo_is_leave_one_out(backend, device):
    """n/(n-1) (s - mean) == s - mean of the others, by hand."""
    s = torch.tensor([1.0, 4.0, 10.0, 3.0], device=device)
    ids = torch.tensor([0, 0, 0, 1], device=device)
    adv, deg = group_advantages(s, ids, num_groups=2, estimator="rloo", backend=backend)
    expected = torch.tensor([1 - 7.0, 4 - 5.5, 10 - 2.5, 3.0])
    assert_verbose_allclose(adv.cpu(), expected, rtol=1e-6, atol=1e-6)
    assert deg.tolist() == [False, True]


def test_triton_out_of_range_id_is_nan(device):
    """Ids are not validated (a host sync): on the Triton path an id outside [0, G) joins no
    group and gets NaN; the other groups are unaffected."""
    s = torch.tensor([1.0, 2.0, 5.0, 7.0], device=device)
    ids = torch.tensor([0, 0, 2, -1], device=device)
    adv, deg = group_advantages(s, ids, num_groups=2, estimator="dr_grpo", backend="triton")
    adv = adv.cpu()
    assert adv[2:].isnan().all() and adv[:2].tolist() == [-0.5, 0.5]
    assert deg.tolist() == [False, True]


def test_group_advantages_rejects_bad_input():
    ids = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(torch.randn(4), ids, num_groups=1, estimator="ppo")
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(torch.randn(4), ids[:3], num_groups=1)
    with pytest.raises(ValueError, match="integers"):
        group_advantages(torch.randn(4), ids.float(), num_groups=1)
    with pytest.raises(ValueError, match="num_groups"):
        group_advantages(torch.randn(4), ids, num_groups=-1)
