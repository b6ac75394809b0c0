"""Weight sync trainer -> generator over the process group, by HF parameter name, in buckets
(issue #27: a generation group and a training group, each with its own TP x PP layout).

    train_ps = new_parallel_state(tp=2, ranks=range(0, 2))    # None on ranks 2..3
    gen_ps = new_parallel_state(tp=1, ranks=range(2, 4))      # None on ranks 0..1
    trainer = ModelEngine.from_hf(d, train_ps, optim=...) if train_ps else None
    generator = ModelEngine.from_hf(d, gen_ps, trainable=False) if gen_ps else None
    ws = WeightSync(trainer, generator, bucket_mb=256)   # every rank of the world calls it
    ...
    stats = ws.sync()   # after each update, every rank (others return at once):
                        # {"weight_sync_s": ..., "weight_sync_gb": ..., "weight_sync_buckets": ...}

The wire format is the HF checkpoint's: the trainer's TP shards of each parameter are gathered
to TP rank 0 of DP replica 0 of its pipeline stage (the stage's *source*) and converted to HF
tensors (`hf_io._to_hf`, the export path; LoRA merged in first, as an export does). Each
source writes its stage's tensors, in a fixed order, into one byte stream cut into buckets of
`bucket_mb` (a tensor may span buckets: the size bound holds for every tensor) and broadcasts
each bucket over a group of itself and every generation rank (gloo on CPU, NCCL on GPU:
buckets live on `ps.device`). Generation ranks copy out the bytes of the tensors their own
parameters read and load each parameter as soon as its HF tensors are complete, through the
import path (`hf_io._hf_value` over a `TensorReader` of the received tensors), so the
generator's TP/PP slicing is the one a HF load does: the two layouts may differ in TP, PP, DP.
No file system and no per-tensor message: the order, names, shapes and dtypes (the manifest)
are exchanged once, when the WeightSync is built, with the architectures, which must agree
(else `WeightSyncError` on every rank, before any weight moves).

Metrics: weight_sync_s (this rank's wall time of `sync`), weight_sync_gb (bytes of the
stream, 1e9), weight_sync_buckets.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from nova_engine.logging import get_logger
from nova_engine.model.arch import ModelArch
from nova_engine.model.hf_io import (
    _LORA_MARK,
    SCORE_PARAM,
    _gather_tp,
    _hf_value,
    _split_name,
    _to_hf,
    hf_expected_names,
)
from nova_engine.parallel.state import ParallelState

log = get_logger(__name__)

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
    for name, layer, p in side.params():
        meta = torch.empty(p.shape, dtype=dtype or p.dtype, device="meta")
        for hf_name, t in _to_hf(side.arch, name, layer, [meta] * side.ps.tp).items():
            e = _Entry(hf_name, t.dtype, tuple(t.shape), offset)
            out.append(e)
            offset = -(-(offset + e.nbytes) // _ALIGN) * _ALIGN
    return out


def _stream_bytes(entries: list[_Entry]) -> int:
    return entries[-1].offset + entries[-1].nbytes if entries else 0


class _Recorder:
    """A TensorReader that records the names `_hf_value` reads (and returns nothing)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None):
        self.names.append(name)
        return torch.empty(0)


class _Received:
    """A TensorReader over the HF tensors received so far."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None):
        t = self.tensors[name]
        if cols is not None:
            return t[rows or slice(None), cols]
        return t[rows] if rows is not None else t


def _needs(side: _Side) -> list[tuple[torch.Tensor, str, int | None, list[str]]]:
    """(param, megatron name, layer, HF names it reads) for every parameter of the side."""
    out = []
    for name, layer, p in side.params():
        rec = _Recorder()
        _hf_value(rec, side.arch, name, layer, side.ps.tp, side.ps.tp_rank)
        out.append((p, name, layer, sorted(set(rec.names))))
    return out


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


class WeightSync:
    """Trainer -> generator weight sync in HF layout over the process group (module docstring).

    Args:
        src: the training engine on ranks of the training layout, None elsewhere (an engine
            with .chunks/.arch/.ps, or a (chunks, arch, ps) tuple).
        dst: the generation engine on ranks of the generation layout, None elsewhere.
        bucket_mb: size of one broadcast bucket in MiB; a source and a generation rank hold
            two (one on the wire while the other fills or is read) plus, on a generation
            rank, the received tensors a parameter still waits for; bucket_bytes overrides
            it (tests).
        dtype: cast the HF tensors to this dtype on the wire (None: the trainer's dtype).

    Building it is collective over the whole world (it exchanges the manifest and creates the
    broadcast groups); a rank in neither group passes (None, None)."""

    def __init__(
        self,
        src: Any,
        dst: Any,
        *,
        bucket_mb: float = 256,
        bucket_bytes: int | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.src, self.dst = _side(src), _side(dst)
        if self.src is not None and self.dst is not None:
            raise WeightSyncError(
                f"rank {dist.get_rank()} is in both the training and the generation layout: "
                "the two groups must be disjoint"
            )
        size = int(bucket_bytes if bucket_bytes is not None else bucket_mb * 2**20)
        if size < _ALIGN:
            raise WeightSyncError(
                f"bucket_mb={bucket_mb}: a bucket must hold at least {_ALIGN} bytes"
            )
        self.bucket_bytes = size // _ALIGN * _ALIGN
        self.dtype = dtype
        me = dist.get_rank()
        info: dict[str, Any] = {"rank": me, "role": None}
        if self.src is not None:
            ps = self.src.ps
            info.update(role="train", arch=self.src.arch.to_dict(), stage=ps.pp_rank)
            if ps.tp_rank == 0 and ps.dp_rank == 0:
                info["manifest"] = _manifest(self.src, dtype)
        if self.dst is not None:
            self._needs = _needs(self.dst)
            names = sorted({n for *_, ns in self._needs for n in ns})
            info.update(role="gen", arch=self.dst.arch.to_dict(), needs=names)
        infos: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(infos, info)
        self._check(infos)  # the same verdict on every rank: all raise, or none
        self.gen_ranks = [i["rank"] for i in infos if i["role"] == "gen"]
        sources = sorted((i["stage"], i["rank"]) for i in infos if "manifest" in i)
        by_rank = {i["rank"]: i for i in infos}
        self.stages = [_Stage(r, by_rank[r]["manifest"]) for _, r in sources]
        for st in self.stages:  # collective: every rank creates every group, in one order
            st.group = dist.new_group(sorted([st.src, *self.gen_ranks]))
        self.total_bytes = sum(st.nbytes for st in self.stages)
        self.last: dict[str, float] = {}

    # -- the handshake -------------------------------------------------------------------

    @staticmethod
    def _check(infos: list[dict]) -> None:
        train = [i for i in infos if i["role"] == "train"]
        gen = [i for i in infos if i["role"] == "gen"]
        if not train or not gen:
            raise WeightSyncError(
                f"weight sync needs a training and a generation side: got {len(train)} "
                f"training and {len(gen)} generation ranks (pass the engine as src on the "
                "training ranks and as dst on the generation ranks)"
            )
        ref = train[0]
        for i in train[1:] + gen:
            diff = _arch_diff(ref["arch"], i["arch"])
            if diff:
                what = "generation" if i["role"] == "gen" else "training"
                raise WeightSyncError(
                    f"the {what} model on rank {i['rank']} differs from the training model "
                    f"on rank {ref['rank']}: {'; '.join(diff[:4])}"
                )
        arch = ModelArch(**ref["arch"])
        expected = hf_expected_names(arch)
        sent: dict[str, tuple[int, ...]] = {}
        for i in train:
            for e in i.get("manifest", []):
                sent[e.name] = e.shape
        bad = [n for n, s in sent.items() if expected.get(n) != s]
        if bad:
            raise WeightSyncError(
                f"training tensor {bad[0]!r} has shape {list(sent[bad[0]])}, the architecture "
                f"expects {list(expected.get(bad[0], ()))}"
            )
        for i in gen:
            missing = sorted(set(i["needs"]) - set(sent))
            if missing:
                raise WeightSyncError(
                    f"generation rank {i['rank']} needs {missing[0]!r}, which no training "
                    "stage sends"
                )

    # -- one sync ------------------------------------------------------------------------

    def sync(self) -> dict[str, float]:
        """Send the trainer's weights to every generation rank (collective over both sides;
        other ranks return {} at once). Returns this rank's metrics."""
        if self.src is None and self.dst is None:
            return {}
        t0 = time.perf_counter()
        buckets = 0
        with torch.no_grad():
            if self.src is not None:
                buckets = self._send()
            else:
                buckets = self._recv()
        dt = time.perf_counter() - t0
        self.last = {
            "weight_sync_s": dt,
            "weight_sync_gb": self.total_bytes / 1e9,
            "weight_sync_buckets": float(buckets),
        }
        return self.last

    def _send(self) -> int:
        side = self.src
        assert side is not None
        ps = side.ps
        if ps.dp_rank != 0:
            return 0  # DP replica 0 holds the same weights
        if side.engine is not None and hasattr(side.engine, "sync_params"):
            side.engine.sync_params()
        source = ps.tp_rank == 0
        stage = next((s for s in self.stages if s.src == ps.rank), None) if source else None
        # two buckets: one fills while the other is on the wire
        bufs = [
            torch.empty(self.bucket_bytes if stage else 0, dtype=torch.uint8, device=ps.device)
            for _ in range(2)
        ]
        works: list[Any] = [None, None]
        cur, fill, sent, count = 0, 0, 0, 0  # buffer, bytes in it, bytes sent, buckets

        def flush(n: int) -> None:
            nonlocal cur, fill, sent, count
            assert stage is not None
            works[cur] = dist.broadcast(
                bufs[cur][:n], src=stage.src, group=stage.group, async_op=True
            )
            sent, fill, count, cur = sent + n, 0, count + 1, 1 - cur
            if works[cur] is not None:  # the next buffer's last broadcast is done
                works[cur].wait()
                works[cur] = None

        with side.merged():
            entries = iter(stage.entries) if stage else iter(())
            for name, layer, p in side.params():
                parts = _gather_tp(p.detach(), ps)
                if stage is None:
                    continue
                for hf_name, t in _to_hf(side.arch, name, layer, parts, copy=False).items():
                    e = next(entries)
                    assert e.name == hf_name, (e.name, hf_name)
                    data = t.to(e.dtype).contiguous().view(-1).view(torch.uint8)
                    pos = e.offset - sent  # alignment padding: skip to the entry's offset
                    while pos >= self.bucket_bytes:  # (only when the padding fills a bucket)
                        flush(self.bucket_bytes)
                        pos -= self.bucket_bytes
                    fill = pos
                    done = 0
                    while done < data.numel():
                        k = min(self.bucket_bytes - fill, data.numel() - done)
                        bufs[cur][fill : fill + k].copy_(data[done : done + k])
                        fill, done = fill + k, done + k
                        if fill == self.bucket_bytes:
                            flush(fill)
            if stage is not None and fill:
                flush(fill)
            for w in works:
                if w is not None:
                    w.wait()
            if stage is not None:
                assert sent == stage.nbytes, (sent, stage.nbytes)
        return count

    def _recv(self) -> int:
        side = self.dst
        assert side is not None
        ps = side.ps
        reader = _Received()
        pending = list(self._needs)
        uses: dict[str, int] = {}
        for *_, names in pending:
            for n in names:
                uses[n] = uses.get(n, 0) + 1
        # two buckets: the next one arrives while this one is read. A tensor inside one
        # bucket is read in place (a view), and copied out only if a parameter still waits
        # for it when its buffer is about to be overwritten.
        bufs = [torch.empty(self.bucket_bytes, dtype=torch.uint8, device=ps.device) for _ in "ab"]
        views: list[set[str]] = [set(), set()]  # names read in place from each buffer
        count = 0
        for stage in self.stages:
            sizes = [
                min(self.bucket_bytes, stage.nbytes - a)
                for a in range(0, stage.nbytes, self.bucket_bytes)
            ]
            works: list[Any] = [None, None]

            def post(j: int, stage: _Stage = stage, sizes: list = sizes, works: list = works):
                b = j % 2
                for n in views[b]:  # still waited for: copy out before the buffer is reused
                    if n in reader.tensors:
                        reader.tensors[n] = reader.tensors[n].clone()
                views[b] = set()
                works[b] = dist.broadcast(
                    bufs[b][: sizes[j]], src=stage.src, group=stage.group, async_op=True
                )

            wanted = [e for e in stage.entries if e.name in uses]
            dest: dict[str, torch.Tensor] = {}  # wanted tensors spanning buckets
            k = 0  # first wanted entry not yet complete
            if sizes:
                post(0)
            for j, size in enumerate(sizes):
                if j + 1 < len(sizes):
                    post(j + 1)
                b = j % 2
                works[b].wait()
                buf, start = bufs[b], j * self.bucket_bytes
                count += 1
                end = start + size
                done = False
                while k < len(wanted) and wanted[k].offset < end:
                    e = wanted[k]
                    lo, hi = max(e.offset, start), min(e.offset + e.nbytes, end)
                    if e.offset >= start and e.offset + e.nbytes <= end:  # all in this bucket
                        t = buf[lo - start : hi - start]
                        views[b].add(e.name)
                    else:
                        if e.name not in dest:
                            dest[e.name] = torch.empty(
                                e.nbytes, dtype=torch.uint8, device=ps.device
                            )
                        dest[e.name][lo - e.offset : hi - e.offset].copy_(
                            buf[lo - start : hi - start]
                        )
                        if e.offset + e.nbytes > end:
                            break  # continues in the next bucket
                        t = dest.pop(e.name)
                    reader.tensors[e.name] = t.view(e.dtype).view(e.shape)
                    done, k = True, k + 1
                if done:
                    pending = self._load_ready(pending, reader, uses)
        assert not pending, [m for _, m, _, _ in pending][:3]
        return count

    def _load_ready(self, pending: list, reader: _Received, uses: dict[str, int]) -> list:
        """Load every pending parameter whose HF tensors are all here; free the tensors no
        parameter of this rank reads any more. Returns what is still pending."""
        side = self.dst
        assert side is not None
        left = []
        for item in pending:
            p, name, layer, names = item
            if not all(n in reader.tensors for n in names):
                left.append(item)
                continue
            value = _hf_value(reader, side.arch, name, layer, side.ps.tp, side.ps.tp_rank)
            if tuple(value.shape) != tuple(p.shape):
                raise WeightSyncError(
                    f"received slice for {name!r} has shape {list(value.shape)}, the "
                    f"generator's parameter is {list(p.shape)}"
                )
            p.copy_(value.to(p.dtype))
            for n in names:
                uses[n] -= 1
                if uses[n] == 0:
                    del reader.tensors[n]
        return left


class AdapterSync:
    """LoRA adapters only, trainer -> generator (issue #31: with LoRA the base weights never
    change, so a sync moves the adapters: a few MB instead of the model). Both sides are
    LoRA engines with the same model.lora (rank, alpha, targets) over the same frozen base
    (the generator loaded from the trainer's starting weights); the layouts may differ.

    Each training pipeline stage's TP0/DP0 rank sends its stage's adapters as full PEFT
    matrices (nova_engine.model.lora.peft_state_dict: gathered over TP) in one flat fp32
    buffer broadcast over a group of itself and every generation rank; generation ranks
    load their TP slices (lora.load_peft_tensors). Building it is collective over the world
    and refuses, on every rank, sides whose architecture or LoRA settings differ."""

    def __init__(self, src: Any, dst: Any):
        from dataclasses import asdict

        self.src, self.dst = _side(src), _side(dst)
        me = dist.get_rank()
        info: dict[str, Any] = {"rank": me, "role": None}
        for role, side in (("train", self.src), ("gen", self.dst)):
            if side is None:
                continue
            lora = getattr(side.engine, "lora", None)
            if lora is None:
                raise WeightSyncError(f"rank {me}: the {role} engine has no LoRA adapters")
            info.update(role=role, arch=side.arch.to_dict(), lora=asdict(lora))
            if role == "train":
                ps = side.ps
                info.update(stage=ps.pp_rank, source=ps.tp_rank == 0 and ps.dp_rank == 0)
        infos: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(infos, info)
        sides = [i for i in infos if i["role"] is not None]
        if not any(i["role"] == "train" for i in sides) or not any(
            i["role"] == "gen" for i in sides
        ):
            raise WeightSyncError("adapter sync needs a training and a generation side")
        ref = next(i for i in sides if i["role"] == "train")
        for i in sides:
            diff = _arch_diff(ref["arch"], i["arch"])
            diff += [f"model.lora.{k}: {ref['lora'][k]!r} vs {i['lora'][k]!r}"
                     for k in ("rank", "alpha", "targets") if ref["lora"][k] != i["lora"][k]]  # fmt: skip
            if diff:
                raise WeightSyncError(
                    f"the {i['role']} engine on rank {i['rank']} differs from the training "
                    f"engine on rank {ref['rank']}: {'; '.join(diff[:4])}"
                )
        self.gen_ranks = [i["rank"] for i in sides if i["role"] == "gen"]
        self.sources = [r for _, r in sorted((i["stage"], i["rank"]) for i in sides
                                             if i.get("source"))]  # fmt: skip
        self.groups = [dist.new_group(sorted([r, *self.gen_ranks])) for r in self.sources]

    def sync(self) -> dict[str, float]:
        """Send the trainer's adapters to every generation rank (collective over both sides;
        other ranks return {} at once). Returns weight_sync_s / weight_sync_gb."""
        from nova_engine.model.lora import load_peft_tensors, peft_state_dict

        if self.src is None and self.dst is None:
            return {}
        t0, me, nbytes = time.perf_counter(), dist.get_rank(), 0
        mine = {}
        if self.src is not None:  # collective over the trainer's TP group
            mine = peft_state_dict(self.src.chunks, self.src.arch, self.src.ps)
        received: dict[str, torch.Tensor] = {}
        for src, group in zip(self.sources, self.groups):
            if me != src and self.dst is None:
                continue
            meta: list[Any] = [None]
            if me == src:
                meta = [[(k, tuple(v.shape)) for k, v in mine.items()]]
            dist.broadcast_object_list(meta, src=src, group=group)
            sizes = [int(torch.Size(shape).numel()) for _, shape in meta[0]]
            dev = (self.src or self.dst).ps.device  # type: ignore[union-attr]
            if me == src:
                flat = torch.cat([mine[k].reshape(-1) for k, _ in meta[0]]).to(dev)
            else:
                flat = torch.empty(sum(sizes), dtype=torch.float32, device=dev)
            dist.broadcast(flat, src=src, group=group)
            nbytes += flat.numel() * 4
            if self.dst is not None:
                for (k, shape), part in zip(meta[0], flat.cpu().split(sizes)):
                    received[k] = part.reshape(shape)
        if self.dst is not None:
            load_peft_tensors(self.dst.chunks, self.dst.arch, self.dst.ps, received,
                              "the trainer's adapters")  # fmt: skip
        return {"weight_sync_s": time.perf_counter() - t0, "weight_sync_gb": nbytes / 1e9}
