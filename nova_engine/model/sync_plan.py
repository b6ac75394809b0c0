"""The stream layout and the load plans of the weight sync (nova_engine.model.weight_sync):
which HF tensors a training stage sends, where each sits in its byte stream, and how a
generation rank's parameters are filled from them (the reads of the HF import, `_hf_value`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from nova_engine.model.arch import ModelArch
from nova_engine.model.hf_io import (
    _LORA_MARK,
    SCORE_PARAM,
    _hf_value,
    _split_name,
    _to_hf,
    hf_expected_names,
)
from nova_engine.parallel.state import ParallelState

_ALIGN = 16  # every tensor starts at a multiple of 16 bytes of its stage's stream
# fields a generator may have of its own: the dtype its weights are kept in, token ids
_ARCH_FREE = ("torch_dtype", "bos_token_id", "eos_token_id")


class WeightSyncError(ValueError):
    """Two sides that cannot exchange weights (the message names what differs)."""


@dataclass
class _Side:
    """One engine's view: its chunks, architecture, layout, and whether LoRA is merged in."""

    chunks: list[torch.nn.Module]
    arch: ModelArch
    ps: ParallelState
    engine: Any = None

    def merged(self) -> contextlib.AbstractContextManager:
        if self.engine is not None and getattr(self.engine, "lora", None) is not None:
            from nova_engine.model.lora import lora_merged

            return lora_merged(self.chunks)
        return contextlib.nullcontext()

    def params(self) -> Iterator[tuple[str, int | None, torch.Tensor]]:
        """(megatron name, global layer, parameter) of the decoder, chunk by chunk (no LoRA
        adapters, no score head: neither has a HF tensor of the causal LM)."""
        for model in self.chunks:
            for mname, p in model.named_parameters():
                name, layer = _split_name(mname, model)
                if _LORA_MARK in name or name == SCORE_PARAM:
                    continue
                yield name, layer, p


def _side(obj: Any) -> _Side | None:
    """An engine (.chunks, .arch, .ps) or a (chunks, arch, ps) tuple as a _Side."""
    if obj is None:
        return None
    if isinstance(obj, tuple):
        chunks, arch, ps = obj
        return _Side(list(chunks), arch, ps)
    return _Side(list(obj.chunks), obj.arch, obj.ps, engine=obj)


@dataclass(frozen=True)
class _Entry:
    """One HF tensor of a stage's stream."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the stage's stream
    param: int = -1  # index of the megatron parameter it comes from (in _Side.params order)

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty(0, dtype=self.dtype).element_size()


def _manifest(side: _Side, dtype: torch.dtype | None) -> list[_Entry]:
    """The HF tensors this source's stage sends, in stream order (shapes from meta tensors:
    nothing is gathered)."""
    out: list[_Entry] = []
    offset = 0
    for i, (name, layer, p) in enumerate(side.params()):
        meta = torch.empty(p.shape, dtype=dtype or p.dtype, device="meta")
        for hf_name, t in _to_hf(side.arch, name, layer, [meta] * side.ps.tp).items():
            e = _Entry(hf_name, t.dtype, tuple(t.shape), offset, i)
            out.append(e)
            offset = _align(offset + e.nbytes)
    return out


def _stream_bytes(entries: list[_Entry]) -> int:
    return entries[-1].offset + entries[-1].nbytes if entries else 0


class _Received:
    """A TensorReader over the HF tensors received so far."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None):
        t = self.tensors[name]
        if cols is not None:
            return t[rows or slice(None), cols]
        return t[rows] if rows is not None else t


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclass
class _Piece:
    """Rows [row0, row0 + n) of a generator parameter = HF tensor[rows][:, cols] (a read of
    `_hf_value`); `flat` = (first, end, dst): when the piece is the HF tensor's elements
    [first, end) and the parameter's from dst on (contiguous parameter, no column slice)."""

    param: torch.Tensor
    row0: int
    rows: slice | None
    cols: slice | None
    flat: tuple[int, int, int] | None


class _Planner:
    """A TensorReader over meta tensors of the HF shapes that records `_hf_value`'s reads."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes = shapes
        self.reads: list[tuple[str, slice | None, slice | None, tuple[int, ...]]] = []

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None):
        t = torch.empty(self.shapes[name], device="meta")
        t = t[rows] if rows is not None else t
        t = t[:, cols] if cols is not None else t
        self.reads.append((name, rows, cols, tuple(t.shape)))
        return t


def _full(s: slice | None, n: int) -> tuple[int, int] | None:
    """(start, stop) of a unit-step slice of range(n) (None: the whole range)."""
    if s is None:
        return 0, n
    start, stop, step = s.indices(n)
    return (start, stop) if step == 1 else None


Read = tuple[str, "slice | None", "slice | None", int, int]  # HF name, rows, cols, row0, n


def _reads(side: _Side, shapes: dict, name: str, layer: int | None, r: int) -> list[Read]:
    """`_hf_value`'s reads for megatron parameter `name` on TP rank r of the side's TP, each
    as (HF name, rows, cols, row0, n): rows [row0, row0 + n) of the parameter (its value
    is their concatenation along dim 0). Raises WeightSyncError where they do not tile it."""
    rec = _Planner(shapes)
    value = _hf_value(rec, side.arch, name, layer, side.ps.tp, r)
    out, row0 = [], 0
    for hf, rows, cols, shape in rec.reads:
        if shape[1:] != tuple(value.shape[1:]):
            break
        out.append((hf, rows, cols, row0, shape[0]))
        row0 += shape[0]
    if row0 != value.shape[0] or len(out) != len(rec.reads):
        raise WeightSyncError(
            f"parameter {name!r} {list(value.shape)} is not the rows of its HF reads "
            f"{[(x[0], list(x[3])) for x in rec.reads]}"
        )
    return out


def _plan(side: _Side) -> tuple[list, dict[str, list[_Piece]], list[str]]:
    """How a HF load fills each of the side's parameters: (param, megatron name, layer, HF
    names) per parameter (the general path's bookkeeping), the pieces by HF name (the
    direct path), and errors (a parameter its reads do not tile, or of another shape)."""
    shapes = hf_expected_names(side.arch)
    needs, pieces, errors = [], {}, []
    for name, layer, p in side.params():
        try:
            reads = _reads(side, shapes, name, layer, side.ps.tp_rank)
        except WeightSyncError as e:
            errors.append(str(e))
            continue
        needs.append((p, name, layer, sorted({r[0] for r in reads})))
        if sum(r[4] for r in reads) != p.shape[0]:
            errors.append(f"the HF reads of {name!r} do not fit its shape {list(p.shape)}")
            continue
        row_len = math.prod(p.shape[1:])
        for hf, rows, cols, row0, _ in reads:
            full = shapes[hf]
            rr = _full(rows, full[0])
            whole_cols = cols is None or (len(full) > 1 and _full(cols, full[1]) == (0, full[1]))
            flat = None
            if p.is_contiguous() and rr is not None and whole_cols:
                flat = (rr[0] * row_len, rr[1] * row_len, row0 * row_len)
            pieces.setdefault(hf, []).append(_Piece(p, row0, rows, cols, flat))
    return needs, pieces, errors


def _export_plan(side: _Side) -> list[list[list[Read]]]:
    """For a source at TP > 1: per parameter, per TP rank r, the reads that fill shard r; the
    inverse writes HF tensor[rows][:, cols] = shard_r[row0 : row0 + n] (the export without
    concatenating the shards first)."""
    shapes = hf_expected_names(side.arch)
    return [
        [_reads(side, shapes, name, layer, r) for r in range(side.ps.tp)]
        for name, layer, _ in side.params()
    ]


def _sub(t: torch.Tensor, rows: slice | None, cols: slice | None) -> torch.Tensor:
    t = t[rows] if rows is not None else t
    return t[:, cols] if cols is not None else t


def _key(s: slice | None) -> tuple | None:
    return None if s is None else (s.start, s.stop, s.step)


def _pack_shards(out: torch.Tensor, hf_name: str, reads: list[list[Read]], shards: list) -> None:
    """Write HF tensor `hf_name` (out: its bytes as a tensor of its shape and wire dtype) from
    the TP shards of its megatron parameter: each region once (a replicated parameter's
    shards are all the whole tensor; shard 0's copy is written)."""
    done = set()
    for r, shard_reads in enumerate(reads):
        for hf, rows, cols, row0, n in shard_reads:
            if hf != hf_name or (_key(rows), _key(cols)) in done:
                continue
            done.add((_key(rows), _key(cols)))
            _sub(out, rows, cols).copy_(shards[r][row0 : row0 + n])


def _arch_diff(a: dict, b: dict) -> list[str]:
    return [
        f"{k}: {a.get(k)!r} vs {b.get(k)!r}"
        for k in a
        if k not in _ARCH_FREE and a.get(k) != b.get(k)
    ]


@dataclass
class _Stage:
    """One source (a training pipeline stage) and its broadcast group."""

    src: int
    entries: list[_Entry]
    group: Any = None
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = _stream_bytes(self.entries)
