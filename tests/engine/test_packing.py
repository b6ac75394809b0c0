"""Sequence packing: the C++ packer against plain-Python references (exact bin assignment),
packing invariants, input errors, pairs mode, the epoch plan, PackedBatch, pack/unpack.

The `ref_*` functions are the plain-Python reference of each algorithm (also timed by
benchmarks/bench_packing.py): obviously-correct O(n · bins) scans with the same tie rules as
csrc/packer.cpp (order: length descending, ties by index; first fit: lowest bin; best fit:
least remaining room, ties by lowest bin; a bin with max_seqs_per_bin items takes no more).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nova_engine import _C
from nova_engine.data.packing import (
    IGNORE_INDEX,
    PackedBatch,
    PackingPlan,
    attach_extra,
    pack_lengths,
    pack_padded,
    pack_pairs,
    truncate_pair,
    unpack_to_padded,
)
from nova_engine.data.sample import PairSample, Sample

# ---------------------------------------------------------------- plain-Python references


def _to_csr(bins: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.cumsum([0] + [len(b) for b in bins]).astype(np.int64)
    items = np.array([i for b in bins for i in b], dtype=np.int64)
    return offsets, items


def ref_next_fit(lengths, capacity, max_seqs=0):
    bins, room = [], []
    for i, n in enumerate(lengths):
        if not bins or n > room[-1] or (max_seqs and len(bins[-1]) == max_seqs):
            bins.append([])
            room.append(capacity)
        bins[-1].append(i)
        room[-1] -= n
    return _to_csr(bins)


def _decreasing(lengths):
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def ref_first_fit_decreasing(lengths, capacity, max_seqs=0):
    bins, room = [], []
    for i in _decreasing(lengths):
        for b in range(len(bins)):
            if room[b] >= lengths[i] and not (max_seqs and len(bins[b]) == max_seqs):
                break
        else:
            b = len(bins)
            bins.append([])
            room.append(capacity)
        bins[b].append(i)
        room[b] -= lengths[i]
    return _to_csr(bins)


def ref_best_fit_decreasing(lengths, capacity, max_seqs=0):
    bins, room = [], []
    for i in _decreasing(lengths):
        best = None
        for b in range(len(bins)):
            fits = room[b] >= lengths[i] and not (max_seqs and len(bins[b]) == max_seqs)
            if fits and (best is None or room[b] < room[best]):
                best = b
        if best is None:
            best = len(bins)
            bins.append([])
            room.append(capacity)
        bins[best].append(i)
        room[best] -= lengths[i]
    return _to_csr(bins)


REFERENCES = {
    "nextfit": ref_next_fit,
    "ffd": ref_first_fit_decreasing,
    "bfd": ref_best_fit_decreasing,
}


def ref_packed_batch(samples, pad_to_multiple=1, pad_id=0):
    """Token-by-token construction of a PackedBatch's fields."""
    tokens, pos, labels, mask, seq_index, cu = [], [], [], [], [], [0]
    for k, s in enumerate(samples):
        n = len(s)
        for j in range(n):
            tokens.append(int(s.tokens[j]))
            pos.append(j)
            is_target = j + 1 < n and bool(s.loss_mask[j + 1])
            labels.append(int(s.tokens[j + 1]) if is_target else IGNORE_INDEX)
            mask.append(1.0 if is_target else 0.0)
            seq_index.append(k)
        cu.append(cu[-1] + n)
    pad = -len(tokens) % pad_to_multiple
    for j in range(pad):
        tokens.append(pad_id)
        pos.append(j)
        labels.append(IGNORE_INDEX)
        mask.append(0.0)
        seq_index.append(-1)
    if pad:
        cu.append(cu[-1] + pad)
    return dict(
        tokens=tokens,
        position_ids=pos,
        labels=labels,
        loss_mask=mask,
        seq_index=seq_index,
        cu_seqlens=cu,
    )


# ---------------------------------------------------------------- helpers


def random_lengths(rng, n, capacity, zero_frac=0.0):
    lens = np.minimum(rng.lognormal(np.log(capacity / 6), 1.0, n).astype(np.int64) + 1, capacity)
    lens[rng.random(n) < zero_frac] = 0
    return lens


def check_invariants(offsets, items, lengths, capacity, max_seqs=0):
    assert offsets[0] == 0 and offsets[-1] == len(items) and np.all(np.diff(offsets) >= 1)
    assert sorted(items.tolist()) == list(range(len(lengths)))  # every item exactly once
    loads = np.add.reduceat(lengths[items], offsets[:-1]) if len(items) else np.zeros(0)
    assert np.all(loads <= capacity)
    if max_seqs:
        assert np.all(np.diff(offsets) <= max_seqs)


# ---------------------------------------------------------------- C++ packer vs reference


@pytest.mark.parametrize("algorithm", ["nextfit", "ffd", "bfd"])
@pytest.mark.parametrize(
    "n, capacity, max_seqs, zero_frac",
    [
        (1, 7, 0, 0.0),
        (37, 100, 0, 0.0),
        (300, 1000, 0, 0.05),
        (300, 997, 3, 0.0),
        (256, 64, 2, 0.1),
        (200, 300_000, 0, 0.0),  # BFD via std::set (capacity > 2^18), FFD order via std::sort
        (150, 500_000, 4, 0.0),
    ],
)
def test_cpp_matches_reference(algorithm, n, capacity, max_seqs, zero_frac):
    rng = np.random.default_rng(n * 1009 + capacity + max_seqs)
    for _ in range(3):
        lengths = random_lengths(rng, n, capacity, zero_frac)
        offsets, items = _C.pack(lengths, capacity, algorithm, max_seqs)
        ref_offsets, ref_items = REFERENCES[algorithm](lengths.tolist(), capacity, max_seqs)
        np.testing.assert_array_equal(offsets, ref_offsets)
        np.testing.assert_array_equal(items, ref_items)
        check_invariants(offsets, items, lengths, capacity, max_seqs)


@pytest.mark.parametrize("scale", [1, 3001])  # 100 × 3001 > 2^18: BFD's std::set path
def test_cpp_many_ties_and_exact_fits(scale):
    # Few distinct lengths: exercises the tie rules and bins filled exactly to capacity.
    rng = np.random.default_rng(5)
    lengths = scale * rng.choice([0, 1, 25, 50, 75, 100], size=400).astype(np.int64)
    for algorithm, ref in REFERENCES.items():
        for cap in (0, 5):
            offsets, items = _C.pack(lengths, 100 * scale, algorithm, cap)
            ref_offsets, ref_items = ref(lengths.tolist(), 100 * scale, cap)
            np.testing.assert_array_equal(offsets, ref_offsets)
            np.testing.assert_array_equal(items, ref_items)


@pytest.mark.parametrize("capacity", [1000, 400_000])
def test_cpp_uniform_lengths_ffd_differs_from_bfd(capacity):
    # Lengths up to capacity/2: FFD and BFD choose different bins here, so each is checked
    # against its own reference on inputs where a mix-up would show.
    rng = np.random.default_rng(capacity)
    lengths = rng.integers(1, capacity // 2, size=300)
    results = {}
    for algorithm in ("ffd", "bfd"):
        for cap in (0, 3):
            offsets, items = _C.pack(lengths, capacity, algorithm, cap)
            ref_offsets, ref_items = REFERENCES[algorithm](lengths.tolist(), capacity, cap)
            np.testing.assert_array_equal(offsets, ref_offsets)
            np.testing.assert_array_equal(items, ref_items)
            results[algorithm, cap] = items
    assert not np.array_equal(results["ffd", 0], results["bfd", 0])


def test_empty_inputs():
    res = pack_lengths([], 10)
    assert res.num_bins == 0 and res.bins() == [] and res.efficiency == 0.0
    assert PackingPlan(res).num_bins == 0
    b = PackedBatch.from_samples([], pad_to_multiple=4)
    assert b.num_tokens == 0 and b.cu_seqlens.tolist() == [0] and b.max_seqlen == 0


def test_cpp_empty_input():
    offsets, items = _C.pack(np.zeros(0, np.int64), 10, "ffd", 0)
    assert offsets.tolist() == [0] and items.size == 0


def test_ffd_bfd_near_lower_bound():
    rng = np.random.default_rng(0)
    lengths = np.clip(np.round(rng.lognormal(np.log(600), 1.0, 50_000)), 1, 4096).astype(np.int64)
    for algorithm in ("ffd", "bfd"):
        res = pack_lengths(lengths, 8192, algorithm)
        assert res.lower_bound / res.num_bins >= 0.99, (algorithm, res.num_bins, res.lower_bound)


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.array([3, -2, 1]), 10, "ffd", 0), "index 1 is negative"),
        ((np.array([3, 11, 1]), 10, "bfd", 0), "index 1 .11. exceeds the capacity 10"),
        ((np.array([3]), 0, "ffd", 0), "capacity must be > 0"),
        ((np.array([3]), 10, "ffd", -1), "max_seqs_per_bin must be >= 0"),
        ((np.array([3]), 10, "worst", 0), "algorithm must be"),
        ((np.array([3.0]), 10, "ffd", 0), "dtype int64"),
        ((np.array([3, 2], dtype=np.int32), 10, "ffd", 0), "dtype int64"),
        ((np.zeros((2, 2), np.int64), 10, "ffd", 0), "1-D"),
    ],
)
def test_cpp_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        _C.pack(*args)


# ---------------------------------------------------------------- Python API


@pytest.mark.parametrize("algorithm", ["nextfit", "ffd", "bfd"])
def test_pack_lengths_overlong(algorithm):
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 150, size=120)
    over = np.flatnonzero(lengths > 100)
    assert over.size > 0
    res = pack_lengths(lengths, 100, algorithm, overlong="truncate")
    assert res.num_truncated == over.size and res.num_dropped == 0
    np.testing.assert_array_equal(res.lengths, np.minimum(lengths, 100))
    check_invariants(res.bin_offsets, res.items, res.lengths, 100)
    # the truncated lengths packed by the reference give the same bins
    np.testing.assert_array_equal(
        res.items, REFERENCES[algorithm](np.minimum(lengths, 100).tolist(), 100)[1]
    )

    res = pack_lengths(lengths, 100, algorithm, max_seqs_per_bin=4, overlong="drop")
    assert res.num_truncated == 0 and res.dropped.tolist() == over.tolist()
    assert sorted(res.items.tolist()) == sorted(set(range(120)) - set(over.tolist()))
    assert np.all(np.diff(res.bin_offsets) <= 4)
    kept = np.setdiff1d(np.arange(120), over)
    ref_offsets, ref_items = REFERENCES[algorithm](lengths[kept].tolist(), 100, 4)
    np.testing.assert_array_equal(res.items, kept[ref_items])
    np.testing.assert_array_equal(res.bin_offsets, ref_offsets)
    assert res.real_tokens == lengths[kept].sum()
    assert res.efficiency == pytest.approx(lengths[kept].sum() / (res.num_bins * 100))
    assert res.lower_bound == -(-lengths[kept].sum() // 100)
    assert [b.tolist() for b in res.bins()] == [res.bin(b).tolist() for b in range(res.num_bins)]

    with pytest.raises(ValueError, match=f"sequence {over[0]} of length"):
        pack_lengths(lengths, 100, algorithm, overlong="error")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lengths=[1, 2, -3], capacity=10), "index 2 is negative"),
        (dict(lengths=[1, 2], capacity=0), "capacity must be a positive int"),
        (dict(lengths=[1, 2], capacity=-5), "capacity must be a positive int"),
        (dict(lengths=[1.5, 2], capacity=10), "must be integers"),
        (dict(lengths=[1, 2], capacity=10, algorithm="wf"), "algorithm must be"),
        (dict(lengths=[1, 2], capacity=10, overlong="wrap"), "overlong must be"),
        (dict(lengths=[1, 2], capacity=10, max_seqs_per_bin=0), "max_seqs_per_bin must be"),
    ],
)
def test_pack_lengths_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pack_lengths(**kwargs)


def test_truncate_pair_formula():
    # by hand: capacity 11 → chosen gets at most ⌈11/2⌉ = 6 unless rejected leaves more room
    assert truncate_pair(10, 10, 11) == (6, 5)
    assert truncate_pair(2, 20, 11) == (2, 9)
    assert truncate_pair(20, 2, 11) == (9, 2)
    assert truncate_pair(3, 4, 11) == (3, 4)


@pytest.mark.parametrize("algorithm", ["nextfit", "ffd", "bfd"])
@pytest.mark.parametrize("max_seqs", [None, 5])
def test_pack_pairs(algorithm, max_seqs):
    rng = np.random.default_rng(2)
    chosen, rejected = rng.integers(1, 70, size=90), rng.integers(1, 70, size=90)
    res = pack_pairs(chosen, rejected, 100, algorithm, max_seqs_per_bin=max_seqs)
    over = np.flatnonzero(chosen + rejected > 100)
    assert res.pairs and res.num_truncated == over.size > 0
    for p in range(90):
        expected = truncate_pair(int(chosen[p]), int(rejected[p]), 100)
        assert tuple(res.lengths[2 * p : 2 * p + 2]) == expected
    check_invariants(res.bin_offsets, res.items, res.lengths, 100, max_seqs or 0)
    for b in res.bins():  # whole pairs, chosen then rejected adjacent
        assert len(b) % 2 == 0
        assert np.all(b[0::2] % 2 == 0) and np.all(b[1::2] == b[0::2] + 1)
    # the units packed are the pairs' total lengths
    totals = (res.lengths[0::2] + res.lengths[1::2]).tolist()
    unit_cap = 0 if max_seqs is None else max_seqs // 2
    ref_offsets, ref_units = REFERENCES[algorithm](totals, 100, unit_cap)
    np.testing.assert_array_equal(res.items[0::2] // 2, ref_units)
    np.testing.assert_array_equal(res.bin_offsets, 2 * ref_offsets)

    dropped = pack_pairs(chosen, rejected, 100, algorithm, overlong="drop")
    assert dropped.dropped.tolist() == over.tolist()
    assert sorted(dropped.items[0::2] // 2) == sorted(set(range(90)) - set(over.tolist()))
    with pytest.raises(ValueError, match=f"pair {over[0]} of length"):
        pack_pairs(chosen, rejected, 100, algorithm, overlong="error")


def test_pack_pairs_rejects_bad_input():
    with pytest.raises(ValueError, match="pair 1 cannot fit"):
        pack_pairs([0, 2, 1], [1, 3, 0], 1)
    with pytest.raises(ValueError, match="cannot hold a pair"):
        pack_pairs([1], [1], 10, max_seqs_per_bin=1)
    with pytest.raises(ValueError, match="rejected_lengths: length at index 1 is negative"):
        pack_pairs([1, 2], [1, -2], 10)
    with pytest.raises(ValueError, match="differ"):
        pack_pairs([1, 2], [1], 10)


# ---------------------------------------------------------------- plan


def _make_samples(rng, n, max_len=40):
    out = []
    for i in range(n):
        n_tok = int(rng.integers(1, max_len))
        out.append(Sample(rng.integers(1, 1000, n_tok), rng.random(n_tok) < 0.7, index=1000 + i))
    return out


def test_plan_batches_cover_every_sample_once():
    """A plan's bins hold every sample exactly once, each batch within the capacity, its
    tokens those of the samples in the bin (in the bin's order)."""
    rng = np.random.default_rng(3)
    samples = _make_samples(rng, 200, max_len=60)
    plan = PackingPlan.from_samples(samples, 128, algorithm="bfd")
    bins = plan.result.bins()
    assert len(bins) == plan.num_bins > 0
    assert sorted(np.concatenate(bins).tolist()) == list(range(200))
    for ids in bins:
        batch = plan.make_batch(samples, ids, pad_to_multiple=4)
        want = torch.cat([torch.as_tensor(samples[int(i)].tokens) for i in ids])
        assert batch.num_tokens % 4 == 0 and int(want.numel()) <= 128
        assert torch.equal(batch.tokens[: want.numel()], want.to(batch.tokens.dtype))
        assert batch.sample_ids.tolist() == [samples[int(i)].index for i in ids]


def test_plan_pairs_batches_truncate():
    rng = np.random.default_rng(4)
    singles = _make_samples(rng, 60, max_len=50)
    pairs = [
        PairSample(singles[2 * k], singles[2 * k + 1], index=k, margin=1 + k % 3) for k in range(30)
    ]
    plan = PackingPlan.from_samples(pairs, 64, algorithm="ffd", max_seqs_per_bin=6)
    seen = []
    for batch in (plan.make_batch(pairs, ids) for ids in plan.result.bins()):
        assert batch.is_pairs and batch.num_samples == 2 * len(batch.pair_ids) <= 6
        assert batch.num_tokens <= 64
        seen += batch.pair_ids.tolist()
        for k, pid in enumerate(batch.pair_ids.tolist()):
            p = pairs[pid]
            c_len, r_len = truncate_pair(len(p.chosen), len(p.rejected), 64)
            cu = batch.cu_seqlens.tolist()
            assert cu[2 * k + 1] - cu[2 * k] == c_len and cu[2 * k + 2] - cu[2 * k + 1] == r_len
            assert (
                batch.tokens[cu[2 * k] : cu[2 * k + 1]].tolist() == p.chosen.tokens[:c_len].tolist()
            )
            assert batch.margins[k] == p.margin
    assert sorted(seen) == list(range(30))


# ---------------------------------------------------------------- PackedBatch


@pytest.mark.parametrize("pad_to_multiple", [1, 4, 7])
def test_packed_batch_matches_loop(pad_to_multiple):
    rng = np.random.default_rng(pad_to_multiple)
    samples = _make_samples(rng, 9)
    samples[4:4] = [Sample([5], [1], index=7), Sample([], [], index=8)]  # 1 and 0 tokens
    batch = PackedBatch.from_samples(samples, pad_to_multiple=pad_to_multiple, pad_id=3)
    ref = ref_packed_batch(samples, pad_to_multiple, pad_id=3)
    for name, values in ref.items():
        assert getattr(batch, name).tolist() == values, name
    assert batch.tokens.dtype == torch.int64 and batch.cu_seqlens.dtype == torch.int32
    assert batch.loss_mask.dtype == torch.float32 and batch.num_tokens % pad_to_multiple == 0
    assert batch.sample_ids.tolist() == [s.index for s in samples] and batch.num_samples == 11
    seg = np.diff(ref["cu_seqlens"])
    assert batch.max_seqlen == seg.max() and batch.num_segments == len(seg)


def test_packed_batch_labels_by_hand():
    # tokens 10 11 12 | 20 21 ; loss_mask marks targets: 12 (sample 0), 21 (sample 1)
    samples = [Sample([10, 11, 12], [1, 0, 1], index=0), Sample([20, 21], [0, 1], index=1)]
    b = PackedBatch.from_samples(samples, pad_to_length=8, pad_id=0)
    assert b.labels.tolist() == [-100, 12, -100, 21, -100, -100, -100, -100]
    assert b.loss_mask.tolist() == [0, 1, 0, 1, 0, 0, 0, 0]
    assert b.position_ids.tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert b.cu_seqlens.tolist() == [0, 3, 5, 8] and b.seq_index.tolist() == [
        0,
        0,
        0,
        1,
        1,
        -1,
        -1,
        -1,
    ]
    assert b.max_seqlen == 3
    with pytest.raises(ValueError, match="pad_to_length=4"):
        PackedBatch.from_samples(samples, pad_to_length=4)
    with pytest.raises(ValueError, match="lengths.1.=3"):
        PackedBatch.from_samples(samples, lengths=[2, 3])


def test_packed_batch_pairs_layout():
    rng = np.random.default_rng(11)
    s = _make_samples(rng, 6)
    pairs = [PairSample(s[0], s[1], index=40, margin=2.0), PairSample(s[2], s[3], index=41)]
    pairs.append(PairSample(s[4], s[5], index=42, margin=3.0))
    b = PackedBatch.from_pairs(pairs, pad_to_multiple=8)
    ref = ref_packed_batch(s, 8)
    for name, values in ref.items():
        assert getattr(b, name).tolist() == values, name
    assert b.pair_ids.tolist() == [40, 41, 42] and b.margins.tolist() == [2.0, 1.0, 3.0]
    per_seq = torch.arange(6.0)
    chosen, rejected = b.split_pairs(per_seq)
    assert chosen.tolist() == [0, 2, 4] and rejected.tolist() == [1, 3, 5]
    moved = b.to("cpu")
    assert torch.equal(moved.tokens, b.tokens) and moved.num_samples == 6


def _check_host_facts(b: PackedBatch) -> None:
    """The host facts equal what reading the tensors back gives."""
    assert b.cu_seqlens_host == tuple(b.cu_seqlens.tolist())
    assert all(type(x) is int for x in b.cu_seqlens_host)
    want_rows = (b.loss_mask != 0).nonzero()[:, 0]
    assert b.loss_rows.dtype == torch.int64 and torch.equal(b.loss_rows, want_rows)
    assert b.num_loss_tokens == int((b.loss_mask != 0).sum())
    assert b.num_real_tokens == int((b.seq_index >= 0).sum())
    assert b.sample_ids_host.tolist() == b.sample_ids.tolist()
    if b.is_pairs:
        assert b.pair_ids_host.tolist() == b.pair_ids.tolist()
        assert b.num_pairs == len(b.pair_ids) == b.num_samples // 2
    else:
        assert b.pair_ids_host is None and b.num_pairs == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_host_facts_equal_the_tensors(seed):
    """cu_seqlens_host, loss_rows and the counts are computed at packing: equal to the device
    reads they replace (nonzero of the mask, seq_index >= 0, ...) for plain, pairs, plan,
    truncated, padded and empty batches; `.to()` carries them unchanged."""
    rng = np.random.default_rng(seed)
    samples = _make_samples(rng, 13)
    samples[3:3] = [Sample([5], [1], index=7), Sample([4, 4], [0, 0], index=8)]  # no loss
    batches = [
        PackedBatch.from_samples(samples, pad_to_multiple=int(rng.integers(1, 9)), pad_id=3),
        PackedBatch.from_samples([], pad_to_length=16),
        PackedBatch.from_samples([]),
        PackedBatch.from_pairs([]),
    ]
    plan = PackingPlan.from_samples(samples, 37, overlong="truncate")
    batches += [plan.make_batch(samples, ids, pad_to_multiple=4) for ids in plan.result.bins()]
    s = _make_samples(rng, 8)
    pairs = [PairSample(s[2 * k], s[2 * k + 1], index=50 + k, margin=1.0 + k) for k in range(4)]
    pplan = PackingPlan.from_samples(pairs, 48)
    batches += [pplan.make_batch(pairs, ids, pad_to_multiple=3) for ids in pplan.result.bins()]
    for b in batches:
        _check_host_facts(b)
        moved = b.to("cpu")
        assert moved.cu_seqlens_host is b.cu_seqlens_host
        assert torch.equal(moved.loss_rows, b.loss_rows)
        _check_host_facts(moved)
    assert any(b.num_loss_tokens < b.num_tokens for b in batches)  # rows really drop out


def test_host_facts_of_a_hand_built_batch():
    """A PackedBatch built from tensors derives its host facts; given ones must fit."""
    b = PackedBatch.from_samples([Sample([1, 2, 3], [0, 1, 1], index=4)], pad_to_length=6)
    fields = dict(tokens=b.tokens, position_ids=b.position_ids, cu_seqlens=b.cu_seqlens,
                  labels=b.labels, loss_mask=b.loss_mask, seq_index=b.seq_index,
                  sample_ids=b.sample_ids, num_samples=1, max_seqlen=3)  # fmt: skip
    built = PackedBatch(**fields)
    _check_host_facts(built)
    assert built.cu_seqlens_host == (0, 3, 6) and built.loss_rows.tolist() == [0, 1]
    with pytest.raises(ValueError, match="cu_seqlens_host has 2 entries"):
        PackedBatch(**fields, cu_seqlens_host=(0, 6))


def test_attach_extra_one_copy_split_per_batch():
    rng = np.random.default_rng(3)
    samples = _make_samples(rng, 3)
    batches = [PackedBatch.from_samples(samples[:k]) for k in (1, 3, 0)]
    parts = [rng.standard_normal((b.num_samples, 2)).astype(np.float32) for b in batches]
    got = attach_extra(batches, "x", parts, "cpu")
    assert len(got) == 3 and all(not b.extra for b in batches)  # new batches, inputs untouched
    for b, g, p in zip(batches, got, parts):
        assert g.extra["x"].shape == p.shape and np.array_equal(g.extra["x"].numpy(), p)
        assert torch.equal(g.tokens, b.tokens) and g.cu_seqlens_host == b.cu_seqlens_host
    # one buffer: every part is a view of the same storage
    ptrs = {g.extra["x"].untyped_storage().data_ptr() for g in got}
    assert len(ptrs) == 1
    assert torch.equal(got[1].to("cpu").extra["x"], got[1].extra["x"])
    with pytest.raises(ValueError, match="2 arrays for 3 batches"):
        attach_extra(batches, "x", parts[:2], "cpu")


# ---------------------------------------------------------------- pack / unpack


def loop_pack(x, lengths):
    return torch.cat([x[b, :n] for b, n in enumerate(lengths)])


def loop_unpack(x, cu, pad_value, S):
    out = torch.full((len(cu) - 1, S, *x.shape[1:]), pad_value, dtype=x.dtype)
    for b in range(len(cu) - 1):
        out[b, : cu[b + 1] - cu[b]] = x[cu[b] : cu[b + 1]]
    return out


@pytest.mark.parametrize("B, S, trailing", [(1, 1, ()), (5, 13, ()), (4, 32, (3,)), (7, 9, (2, 5))])
def test_pack_unpack_round_trip(B, S, trailing):
    g = torch.Generator().manual_seed(B * S)
    lengths = torch.randint(0, S + 1, (B,), generator=g)
    lengths[0] = S
    x = torch.randn(B, S, *trailing, generator=g, dtype=torch.float64, requires_grad=True)
    packed = pack_padded(x, lengths)
    torch.testing.assert_close(packed, loop_pack(x.detach(), lengths.tolist()), rtol=0, atol=0)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    padded = unpack_to_padded(packed, cu, pad_value=-7.0)
    torch.testing.assert_close(padded, loop_unpack(packed.detach(), cu.tolist(), -7.0, S))
    valid = torch.arange(S)[None, :] < lengths[:, None]
    torch.testing.assert_close(padded[valid], x.detach()[valid], rtol=0, atol=0)
    # gradients: flow back exactly to the valid positions
    w = torch.randn(padded.shape, generator=g, dtype=torch.float64)
    (padded * w).sum().backward()
    expected = torch.where(valid.reshape(B, S, *([1] * len(trailing))), w, torch.zeros_like(w))
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)
    # total given (no host sync), a wider max_seqlen, integer dtype
    xi = torch.randint(0, 100, (B, S), generator=g)
    pi = pack_padded(xi, lengths, total=int(lengths.sum()))
    assert torch.equal(pi, loop_pack(xi, lengths.tolist()))
    assert torch.equal(
        unpack_to_padded(pi, cu, -1, max_seqlen=S + 3), loop_unpack(pi, cu.tolist(), -1, S + 3)
    )


def test_unpack_packed_batch_and_errors():
    rng = np.random.default_rng(12)
    samples = _make_samples(rng, 5)
    b = PackedBatch.from_samples(samples, pad_to_multiple=16)
    rows = unpack_to_padded(b.tokens, b.cu_seqlens[: b.num_samples + 1], pad_value=0)
    for k, s in enumerate(samples):
        assert rows[k, : len(s)].tolist() == s.tokens.tolist() and not rows[k, len(s) :].any()
    with pytest.raises(ValueError, match="lengths must lie"):
        pack_padded(torch.zeros(2, 3), [1, 4])
    with pytest.raises(ValueError, match="expected .2,."):
        pack_padded(torch.zeros(2, 3), [1, 2, 3])
    with pytest.raises(ValueError, match="max_seqlen=2"):
        unpack_to_padded(torch.zeros(5), torch.tensor([0, 3, 5]), max_seqlen=2)
