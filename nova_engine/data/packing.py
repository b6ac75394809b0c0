"""Sequence packing: samples → bins of a token capacity → `PackedBatch` (THD layout).

    plan = PackingPlan.from_samples(samples, capacity=16384)                # or PairSamples
    batches = [plan.make_batch(samples, ids, pad_to_multiple=tp) for ids in plan.result.bins()]

The bin assignment comes from the C++ packer (`nova_engine._C.pack`, csrc/packer.cpp):
first-fit decreasing ("ffd"), best-fit decreasing ("bfd") or next-fit in arrival order
("nextfit", a baseline). It depends only on the lengths. The order in which a run sees its
samples (seeded epochs, resume positions) belongs to the data source
(`nova_engine.train.data_source`), which packs each step's samples.

Pairs mode (DPO, reward models): the unit is (chosen, rejected); the packer sees the pair's
total length and both halves land in the same bin, chosen immediately followed by rejected.
Sequence ids are then 2p (chosen of pair p) and 2p+1 (rejected of pair p).

Shape legend: T packed tokens (padding included), B rows of a padded batch, S padded length,
N sequences (samples) in a packed batch, P pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nova_engine import _C
from nova_engine.data.sample import PairSample, Sample

if TYPE_CHECKING:
    from typing_extensions import TypeIs

IGNORE_INDEX = -100
ALGORITHMS = ("ffd", "bfd", "nextfit")
OVERLONG = ("truncate", "drop", "error")


# --------------------------------------------------------------------------------------------
# Packing lengths into bins
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackResult:
    """A bin assignment (CSR): bin b holds sequences `items[bin_offsets[b]:bin_offsets[b+1]]`.

    Inside a bin, sequences are in placement order (longest first for ffd/bfd, arrival order
    for nextfit); in pairs mode a bin reads [2p, 2p+1, 2q, 2q+1, ...].
    """

    bin_offsets: np.ndarray  # [num_bins + 1] int64
    items: np.ndarray  # [num_kept_sequences] int64 sequence ids, grouped by bin
    lengths: np.ndarray  # [num_sequences] int64 lengths after truncation (dropped: original)
    dropped: np.ndarray  # [num_dropped] int64 ids of dropped units (pair ids in pairs mode)
    num_truncated: int  # units truncated to fit (pairs: a pair counts once)
    capacity: int
    pairs: bool = False

    @property
    def num_bins(self) -> int:
        return len(self.bin_offsets) - 1

    @property
    def num_dropped(self) -> int:
        return len(self.dropped)

    @property
    def real_tokens(self) -> int:
        """Tokens placed in bins (after truncation, without the dropped units)."""
        return int(self.lengths[self.items].sum())

    @property
    def efficiency(self) -> float:
        """real tokens / (num_bins × capacity)."""
        return self.real_tokens / max(1, self.num_bins * self.capacity)

    @property
    def lower_bound(self) -> int:
        """⌈Σ len / capacity⌉: no packing of these lengths uses fewer bins."""
        return -(-self.real_tokens // self.capacity)

    def bin(self, b: int) -> np.ndarray:
        """[n_b] int64 sequence ids of bin b."""
        return self.items[self.bin_offsets[b] : self.bin_offsets[b + 1]]

    def bins(self) -> list[np.ndarray]:
        if self.num_bins == 0:
            return []
        return np.split(self.items, self.bin_offsets[1:-1])


def _as_lengths(lengths, name: str) -> np.ndarray:
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    negative = np.flatnonzero(arr < 0)
    if negative.size:
        i = int(negative[0])
        raise ValueError(f"{name}: length at index {i} is negative ({arr[i]})")
    return arr


def _check_args(capacity: int, algorithm: str, max_seqs_per_bin: int | None, overlong: str):
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity <= 0:
        raise ValueError(f"capacity must be a positive int, got {capacity!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    if max_seqs_per_bin is not None and max_seqs_per_bin < 1:
        raise ValueError(f"max_seqs_per_bin must be >= 1 or None, got {max_seqs_per_bin}")


def pack_lengths(
    lengths,
    capacity: int,
    algorithm: str = "ffd",
    max_seqs_per_bin: int | None = None,
    overlong: str = "truncate",
) -> PackResult:
    """Packs sequences of `lengths` [N] into bins of `capacity` tokens.

    overlong: what to do with a sequence longer than `capacity`: "truncate" it to `capacity`,
    "drop" it, or raise ValueError ("error"). Each is counted in the result.
    max_seqs_per_bin: at most this many sequences per bin (None: no cap).
    """
    _check_args(capacity, algorithm, max_seqs_per_bin, overlong)
    lens = _as_lengths(lengths, "lengths")
    over = lens > capacity
    over_ids = np.flatnonzero(over)
    if over_ids.size and overlong == "error":
        i = int(over_ids[0])
        raise ValueError(f"sequence {i} of length {lens[i]} exceeds the capacity {capacity}")
    if overlong == "truncate":
        lens = np.minimum(lens, capacity)
        kept = np.arange(len(lens), dtype=np.int64)
    else:
        kept = np.flatnonzero(~over).astype(np.int64)
    offsets, items = _C.pack(lens[kept], int(capacity), algorithm, max_seqs_per_bin or 0)
    return PackResult(
        bin_offsets=offsets,
        items=kept[items],
        lengths=lens,
        dropped=over_ids.astype(np.int64) if overlong == "drop" else np.zeros(0, np.int64),
        num_truncated=int(over_ids.size) if overlong == "truncate" else 0,
        capacity=int(capacity),
    )


def truncate_pair(chosen: int, rejected: int, capacity: int) -> tuple[int, int]:
    """Lengths (c', r') <= (chosen, rejected) with c' + r' <= capacity, keeping as much as
    possible; when both halves are long, chosen gets ⌈capacity/2⌉ and rejected the rest."""
    c = min(chosen, max(capacity - rejected, (capacity + 1) // 2))
    return c, min(rejected, capacity - c)


def pack_pairs(
    chosen_lengths,
    rejected_lengths,
    capacity: int,
    algorithm: str = "ffd",
    max_seqs_per_bin: int | None = None,
    overlong: str = "truncate",
) -> PackResult:
    """Packs (chosen, rejected) pairs [P] as units of length chosen + rejected.

    Sequence ids in the result: 2p = chosen of pair p, 2p+1 = rejected; each bin holds whole
    pairs, chosen then rejected adjacent. max_seqs_per_bin counts sequences (a pair is 2), so
    it must be >= 2. overlong="truncate" shortens the halves per `truncate_pair`; a pair that
    cannot fit even so (a non-empty half would become empty) raises ValueError.
    """
    _check_args(capacity, algorithm, max_seqs_per_bin, overlong)
    c = _as_lengths(chosen_lengths, "chosen_lengths")
    r = _as_lengths(rejected_lengths, "rejected_lengths")
    if c.shape != r.shape:
        raise ValueError(f"chosen_lengths {c.shape} and rejected_lengths {r.shape} differ")
    if max_seqs_per_bin is not None and max_seqs_per_bin < 2:
        raise ValueError(f"max_seqs_per_bin={max_seqs_per_bin} cannot hold a pair (needs >= 2)")
    over_ids = np.flatnonzero(c + r > capacity)
    if over_ids.size and overlong == "error":
        p = int(over_ids[0])
        raise ValueError(f"pair {p} of length {c[p]} + {r[p]} exceeds the capacity {capacity}")
    if overlong == "truncate":
        c, r = c.copy(), r.copy()
        for p in over_ids.tolist():
            ct, rt = truncate_pair(int(c[p]), int(r[p]), int(capacity))
            if (c[p] > 0 and ct == 0) or (r[p] > 0 and rt == 0):
                raise ValueError(
                    f"pair {p} cannot fit: halves {c[p]} and {r[p]} in capacity {capacity}"
                )
            c[p], r[p] = ct, rt
        kept = np.arange(len(c), dtype=np.int64)
    else:
        kept = np.setdiff1d(np.arange(len(c), dtype=np.int64), over_ids)
    unit_cap = 0 if max_seqs_per_bin is None else max_seqs_per_bin // 2
    offsets, units = _C.pack((c + r)[kept], int(capacity), algorithm, unit_cap)
    pair_ids = kept[units]
    return PackResult(
        bin_offsets=offsets * 2,
        items=np.stack([2 * pair_ids, 2 * pair_ids + 1], axis=1).reshape(-1),
        lengths=np.stack([c, r], axis=1).reshape(-1),
        dropped=over_ids.astype(np.int64) if overlong == "drop" else np.zeros(0, np.int64),
        num_truncated=int(over_ids.size) if overlong == "truncate" else 0,
        capacity=int(capacity),
        pairs=True,
    )


# --------------------------------------------------------------------------------------------
# Packed batches
# --------------------------------------------------------------------------------------------


@dataclass
class PackedBatch:
    """N samples concatenated into one row of T tokens (THD layout), padded at the end.

    Label convention: `Sample.loss_mask[i] = 1` means token i is a target predicted from
    tokens < i. Here position j predicts the NEXT token of its own sample:
    labels[j] = tokens[j+1] if that token's loss_mask is 1 (same sample), else IGNORE_INDEX;
    a sample's last token and all padding get IGNORE_INDEX. loss_mask[j] = (labels[j] != -100).
    Padding (T - real tokens, to reach `pad_to_multiple` / `pad_to_length`) forms its own
    segment in cu_seqlens, so no real token attends to it; its seq_index is -1.
    In pairs mode sequence 2k is the chosen and 2k+1 the rejected half of pair k.

    Host facts: what the losses need to know on the host is computed here, when the batch is
    built on the CPU, so the per-micro-batch forward/backward never reads a device tensor
    back (a CUDA stream sync inside the pipeline schedule; `nova_kernels._sync`):
    `cu_seqlens_host` (Python ints, unchanged by `.to(device)`), `loss_rows` (moved with the
    batch), `pair_ids_host`, `sample_ids_host`, and the counts `num_loss_tokens` /
    `num_real_tokens`. Left out of the constructor they are derived from the (CPU) tensors in
    `__post_init__`.
    """

    tokens: torch.Tensor  # [T] int64
    position_ids: torch.Tensor  # [T] int64, restarting at 0 for every segment
    cu_seqlens: torch.Tensor  # [num_segments + 1] int32 (the padding segment last, if any)
    labels: torch.Tensor  # [T] int64, IGNORE_INDEX where no target
    loss_mask: torch.Tensor  # [T] float32, 1 where labels is a target
    seq_index: torch.Tensor  # [T] int64 sequence (0..N-1) of each token, -1 for padding
    sample_ids: torch.Tensor  # [N] int64 Sample.index of each sequence
    num_samples: int  # N
    max_seqlen: int  # longest segment, the padding segment included
    pair_ids: torch.Tensor | None = None  # [P] int64 PairSample.index (pairs mode)
    margins: torch.Tensor | None = None  # [P] float32 PairSample.margin (pairs mode)
    # host facts (class docstring); derived from the CPU tensors when not given
    cu_seqlens_host: tuple[int, ...] | None = None  # cu_seqlens as Python ints
    loss_rows: torch.Tensor | None = None  # [n] int64 increasing rows with loss_mask != 0
    pair_ids_host: np.ndarray | None = None  # [P] int64 pair_ids on the host (pairs mode)
    sample_ids_host: np.ndarray | None = None  # [N] int64 sample_ids on the host
    # per-step device tensors a loss attaches before the schedule (its `prepare`: DPO's
    # "ref_logps" [P, 2], the reward model's "targets" [N, K]); moved with the batch
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # batches are built on the host: these reads happen once, at packing time
        if self.cu_seqlens_host is None:
            self.cu_seqlens_host = tuple(int(x) for x in self.cu_seqlens.tolist())
        if self.loss_rows is None:
            rows = torch.from_numpy(np.flatnonzero(self.loss_mask.cpu().numpy() != 0))
            self.loss_rows = rows.to(device=self.loss_mask.device, dtype=torch.int64)
        if self.pair_ids_host is None and self.pair_ids is not None:
            self.pair_ids_host = self.pair_ids.cpu().numpy().astype(np.int64)
        if self.sample_ids_host is None:
            self.sample_ids_host = self.sample_ids.cpu().numpy().astype(np.int64)
        if len(self.cu_seqlens_host) != self.cu_seqlens.shape[0]:
            raise ValueError(
                f"PackedBatch: cu_seqlens_host has {len(self.cu_seqlens_host)} entries, "
                f"cu_seqlens {self.cu_seqlens.shape[0]}"
            )

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_segments(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1

    @property
    def is_pairs(self) -> bool:
        return self.pair_ids is not None

    @property
    def num_loss_tokens(self) -> int:
        """Tokens with loss_mask != 0 (a host count: no device read)."""
        assert self.loss_rows is not None  # set in __post_init__
        return int(self.loss_rows.shape[0])

    @property
    def num_real_tokens(self) -> int:
        """Tokens of the N samples, without the padding (seq_index >= 0; no device read)."""
        cu = self.cu_seqlens_host
        assert cu is not None  # set in __post_init__
        return cu[self.num_samples] - cu[0]

    @property
    def num_pairs(self) -> int:
        """P, pairs mode (0 otherwise)."""
        return 0 if self.pair_ids_host is None else len(self.pair_ids_host)

    def to(self, device) -> PackedBatch:
        moved: dict[str, Any] = {
            f.name: v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v
            for f in fields(self)
        }
        moved["extra"] = {k: v.to(device) for k, v in self.extra.items()}
        return PackedBatch(**moved)

    def split_pairs(self, x_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence values [N, ...] → (chosen [P, ...], rejected [P, ...])."""
        if not self.is_pairs:
            raise ValueError("split_pairs needs a pairs-mode PackedBatch")
        return x_N[0::2], x_N[1::2]

    @classmethod
    def from_samples(
        cls,
        samples: Sequence[Sample],
        pad_to_multiple: int = 1,
        pad_id: int = 0,
        pad_to_length: int | None = None,
        lengths: Sequence[int] | None = None,
    ) -> PackedBatch:
        """Concatenates `samples`, each cut to `lengths[i]` tokens when given (a plan's
        truncation), and pads to a multiple of `pad_to_multiple` or to exactly `pad_to_length`."""
        if pad_to_multiple < 1:
            raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
        n = len(samples)
        full = np.array([len(s) for s in samples], dtype=np.int64)
        lens = full if lengths is None else np.asarray(lengths, dtype=np.int64)
        if lens.shape != (n,):
            raise ValueError(f"lengths has shape {lens.shape}, expected ({n},)")
        bad = np.flatnonzero((lens < 0) | (lens > full))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"lengths[{i}]={lens[i]} is not in [0, len(sample)={full[i]}]")
        real = int(lens.sum())
        if pad_to_length is not None:
            if pad_to_length < real or pad_to_length % pad_to_multiple:
                raise ValueError(
                    f"pad_to_length={pad_to_length} must be >= the {real} real tokens and a "
                    f"multiple of pad_to_multiple={pad_to_multiple}"
                )
            total = pad_to_length
        else:
            total = -(-real // pad_to_multiple) * pad_to_multiple
        pad = total - real
        if n:
            tok = np.concatenate([s.tokens[:k] for s, k in zip(samples, lens)])
            mask = np.concatenate([s.loss_mask[:k] for s, k in zip(samples, lens)]).astype(bool)
        else:
            tok, mask = np.zeros(0, np.int64), np.zeros(0, bool)
        seg_lens = np.append(lens, pad) if pad else lens
        cu = np.zeros(len(seg_lens) + 1, dtype=np.int64)
        np.cumsum(seg_lens, out=cu[1:])
        # target[j]: token j+1 is a target of the same sample
        target = np.zeros(total, dtype=bool)
        target[: max(real - 1, 0)] = mask[1:]
        target[cu[1 : n + 1][lens > 0] - 1] = False  # each sample's last token
        nxt = np.full(total, pad_id, dtype=np.int64)
        nxt[: max(real - 1, 0)] = tok[1:]
        seg_of = np.repeat(np.arange(len(seg_lens)), seg_lens)
        seq_index = np.where(seg_of < n, seg_of, -1)
        return cls(
            tokens=torch.from_numpy(np.concatenate([tok, np.full(pad, pad_id, np.int64)])),
            position_ids=torch.from_numpy(np.arange(total, dtype=np.int64) - cu[seg_of]),
            cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
            labels=torch.from_numpy(np.where(target, nxt, IGNORE_INDEX)),
            loss_mask=torch.from_numpy(target.astype(np.float32)),
            seq_index=torch.from_numpy(seq_index.astype(np.int64)),
            sample_ids=torch.tensor([s.index for s in samples], dtype=torch.int64),
            num_samples=n,
            max_seqlen=int(seg_lens.max()) if len(seg_lens) else 0,
        )

    @classmethod
    def from_pairs(
        cls,
        pairs: Sequence[PairSample],
        pad_to_multiple: int = 1,
        pad_id: int = 0,
        pad_to_length: int | None = None,
        lengths: Sequence[int] | None = None,
    ) -> PackedBatch:
        """Pairs → sequences [c0, r0, c1, r1, ...]; `lengths` [2P] interleaved the same way."""
        seqs = [half for p in pairs for half in (p.chosen, p.rejected)]
        batch = cls.from_samples(seqs, pad_to_multiple, pad_id, pad_to_length, lengths)
        ids = np.array([p.index for p in pairs], dtype=np.int64)
        batch.pair_ids, batch.pair_ids_host = torch.from_numpy(ids.copy()), ids
        batch.margins = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
        return batch


def attach_extra(
    batches: Sequence[PackedBatch], name: str, parts: Sequence[np.ndarray], device
) -> list[PackedBatch]:
    """`batches` with `extra[name]` = parts[i] (host arrays, one per batch, equal trailing
    shapes) on `device`: concatenated, copied in ONE host-to-device transfer (pinned, async
    on CUDA), split back into views. For a loss's per-step `prepare`, before the schedule."""
    if len(parts) != len(batches):
        raise ValueError(f"attach_extra: {len(parts)} arrays for {len(batches)} batches")
    if not batches:
        return []
    host = torch.from_numpy(np.ascontiguousarray(np.concatenate(parts)))
    dev = torch.device(device)
    on_dev = host.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else host.to(dev)
    views = on_dev.split([len(p) for p in parts])
    return [replace(b, extra={**b.extra, name: v}) for b, v in zip(batches, views)]


# --------------------------------------------------------------------------------------------
# Packing plan: a packing of samples (or pairs) and the batches of its bins
# --------------------------------------------------------------------------------------------


def _are_pairs(samples: Sequence[Sample] | Sequence[PairSample]) -> TypeIs[Sequence[PairSample]]:
    """Whether `samples` holds pairs (the lists are homogeneous: the first item decides)."""
    return bool(samples) and isinstance(samples[0], PairSample)


class PackingPlan:
    """A packing of a list of samples or pairs (`result`: the bins) and the PackedBatch of
    each bin, truncated per the packing."""

    def __init__(self, result: PackResult):
        self.result = result

    @classmethod
    def from_lengths(cls, lengths, capacity: int, **kwargs) -> PackingPlan:
        """kwargs: algorithm, max_seqs_per_bin, overlong (see `pack_lengths`)."""
        return cls(pack_lengths(lengths, capacity, **kwargs))

    @classmethod
    def from_samples(
        cls, samples: Sequence[Sample] | Sequence[PairSample], capacity: int, **kwargs
    ) -> PackingPlan:
        """Samples or pairs (pairs mode) → plan; kwargs as for `pack_lengths`."""
        if _are_pairs(samples):
            chosen = [len(p.chosen) for p in samples]
            rejected = [len(p.rejected) for p in samples]
            return cls(pack_pairs(chosen, rejected, capacity, **kwargs))
        return cls(pack_lengths([len(s) for s in samples], capacity, **kwargs))

    @property
    def num_bins(self) -> int:
        return self.result.num_bins

    def make_batch(
        self, samples: Sequence[Sample] | Sequence[PairSample], seq_ids: np.ndarray, **kwargs
    ) -> PackedBatch:
        """The PackedBatch of one bin (`seq_ids`: an entry of `result.bins()`), truncated per
        the plan. kwargs: pad_to_multiple, pad_id, pad_to_length."""
        lengths = self.result.lengths[seq_ids]
        if self.result.pairs != _are_pairs(samples):
            kind = "PairSamples" if self.result.pairs else "Samples"
            raise ValueError(
                f"this plan packs {kind}: make_batch needs the {kind} it was built from"
            )
        if _are_pairs(samples):
            pairs = [samples[int(p)] for p in seq_ids[0::2] // 2]
            return PackedBatch.from_pairs(pairs, lengths=lengths, **kwargs)
        return PackedBatch.from_samples(
            [samples[int(i)] for i in seq_ids], lengths=lengths, **kwargs
        )


# --------------------------------------------------------------------------------------------
# Padded [B, S] <-> packed [T] layouts (index gathers; any device; differentiable)
# --------------------------------------------------------------------------------------------


def pack_padded(x_BS: torch.Tensor, lengths, total: int | None = None) -> torch.Tensor:
    """Right-padded x [B, S, *] with `lengths` [B] → packed [T = Σ lengths, *].

    Pass `total` (= Σ lengths) to avoid a device→host sync on GPU. Lengths are range-checked
    only when they live on the CPU.
    """
    B, S = x_BS.shape[:2]
    lens = torch.as_tensor(lengths, dtype=torch.int64, device=x_BS.device)
    if lens.shape != (B,):
        raise ValueError(f"lengths has shape {tuple(lens.shape)}, expected ({B},)")
    if lens.device.type == "cpu" and B and (lens.min() < 0 or lens.max() > S):
        raise ValueError(f"lengths must lie in [0, {S}], got {lens.tolist()}")
    total = int(lens.sum()) if total is None else int(total)
    rows = torch.repeat_interleave(torch.arange(B, device=x_BS.device), lens, output_size=total)
    starts = torch.cumsum(lens, 0) - lens
    flat = rows * S + torch.arange(total, device=x_BS.device) - starts[rows]
    return x_BS.reshape(B * S, *x_BS.shape[2:]).index_select(0, flat)


def unpack_to_padded(
    x_T: torch.Tensor, cu_seqlens: torch.Tensor, pad_value=0, max_seqlen: int | None = None
) -> torch.Tensor:
    """Packed x [T, *] with `cu_seqlens` [B+1] → right-padded [B, S, *], S = `max_seqlen` or
    the longest segment; positions past each length hold `pad_value`. Tokens after
    cu_seqlens[-1] are ignored."""
    cu = cu_seqlens.to(device=x_T.device, dtype=torch.int64)
    B = cu.shape[0] - 1
    lens = cu[1:] - cu[:-1]
    longest = int(lens.max()) if B else 0
    S = longest if max_seqlen is None else int(max_seqlen)
    if x_T.device.type == "cpu" and longest > S:
        raise ValueError(f"max_seqlen={S} is shorter than the longest segment ({longest})")
    first, end = (int(cu[0]), int(cu[-1])) if B else (0, 0)
    rows = torch.repeat_interleave(
        torch.arange(B, device=x_T.device), lens, output_size=end - first
    )
    flat = rows * S + torch.arange(first, end, device=x_T.device) - cu[:-1][rows]
    out = x_T.new_full((B * S, *x_T.shape[1:]), pad_value)
    return out.index_copy(0, flat, x_T[first:end]).reshape(B, S, *x_T.shape[1:])
