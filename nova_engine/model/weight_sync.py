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

Speed (issue #27: within 2x of bytes / link bandwidth). The two bucket buffers of each side
are allocated at the first sync and kept (a fresh buffer costs its page faults on every
sync: more than the copy on a CPU). A source writes each HF tensor that fits in the current
bucket straight from the parameter's TP shards (the inverse of the HF import's reads,
planned once: no concatenated or reordered intermediate, the dtype cast in the same copy;
a tensor spanning buckets goes through `_to_hf`) and packs the next bucket while the
previous one is on the wire; at TP > 1 the shards of consecutive parameters are gathered
to the source together (one gather per up to bucket/tp bytes a rank, 32 MiB at most), the
next group on the wire while this one is packed. A generation rank receives the next bucket while it copies the bytes of this one
straight into its parameters (`direct=True`, the default): the HF load of each parameter is
planned once at construction as pieces (HF tensor, rows, cols) -> rows of the parameter,
and a piece that is a plain element range (whole tensors, row slices: every piece but a
column slice at generation TP > 1) is copied from the bucket into the parameter even when
the tensor spans buckets; a column slice waits for its whole HF tensor. `direct=False`
loads through `_hf_value` (the import path itself) instead: the reference the fast path is
tested against, bit for bit.

Metrics: weight_sync_s (this rank's wall time of `sync`), weight_sync_wait_s (of it, the
time blocked on the wire: broadcasts and, at TP > 1, gathers), weight_sync_gb (bytes of the
stream, 1e9), weight_sync_buckets.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from nova_engine.logging import get_logger
from nova_engine.model.arch import ModelArch
from nova_engine.model.hf_io import _hf_value, _to_hf, hf_expected_names
from nova_engine.model.sync_plan import (
    _ALIGN,
    WeightSyncError,
    _align,
    _arch_diff,
    _Entry,
    _export_plan,
    _manifest,
    _pack_shards,
    _plan,
    _Received,
    _Side,
    _side,
    _Stage,
)

log = get_logger(__name__)

GATHER_MAX_BYTES = 32 * 2**20  # a TP > 1 source gathers its shards in groups of at most this


class WeightSync:
    """Trainer -> generator weight sync in HF layout over the process group (module docstring).

    Args:
        src: the training engine on ranks of the training layout, None elsewhere (an engine
            with .chunks/.arch/.ps, or a (chunks, arch, ps) tuple).
        dst: the generation engine on ranks of the generation layout, None elsewhere.
        bucket_mb: size of one broadcast bucket in MiB; a source and a generation rank keep
            two from the first sync on (one on the wire while the other fills or is read),
            a training rank at TP > 1 also two gather buffers of up to bucket/tp bytes
            (GATHER_MAX_BYTES at most), and tp times that on the TP rank 0; a
            generation rank may also hold a HF tensor that spans buckets and that one of its
            parameters reads a column slice of. bucket_bytes overrides it (tests).
        dtype: cast the HF tensors to this dtype on the wire (None: the trainer's dtype).
        direct: copy received bytes straight into the generator's parameters (default);
            False loads each parameter through the HF import path (`_hf_value`), the
            reference the direct path is tested against.

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
        direct: bool = True,
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
        self.direct = direct
        self._bufs: dict[str, torch.Tensor] = {}  # kept across syncs (see _buf)
        self._export: list | None = None  # a source's _export_plan (at its first sync)
        me = dist.get_rank()
        info: dict[str, Any] = {"rank": me, "role": None}
        if self.src is not None:
            ps = self.src.ps
            info.update(role="train", arch=self.src.arch.to_dict(), stage=ps.pp_rank)
            if ps.tp_rank == 0 and ps.dp_rank == 0:
                info["manifest"] = _manifest(self.src, dtype)
        if self.dst is not None:
            self._needs, self._pieces, errors = _plan(self.dst)
            names = sorted(self._pieces)
            info.update(role="gen", arch=self.dst.arch.to_dict(), needs=names, errors=errors)
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
        for i in gen:
            if i["errors"]:
                raise WeightSyncError(f"generation rank {i['rank']}: {i['errors'][0]}")
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

    def _buf(self, key: str, nbytes: int, device: torch.device) -> torch.Tensor:
        """A byte buffer of at least nbytes, kept for the next syncs (grown when short)."""
        b = self._bufs.get(key)
        if b is None or b.numel() < nbytes:
            self._bufs.pop(key, None)  # free the short one first
            b = self._bufs[key] = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return b

    # -- one sync ------------------------------------------------------------------------

    def sync(self) -> dict[str, float]:
        """Send the trainer's weights to every generation rank (collective over both sides;
        other ranks return {} at once). Returns this rank's metrics."""
        if self.src is None and self.dst is None:
            return {}
        t0 = time.perf_counter()
        self._wait = 0.0
        with torch.no_grad():
            if self.src is not None:
                buckets = self._send()
            elif self.direct:
                buckets = self._recv_direct()
            else:
                buckets = self._recv()
        dt = time.perf_counter() - t0
        self.last = {
            "weight_sync_s": dt,
            "weight_sync_wait_s": self._wait,
            "weight_sync_gb": self.total_bytes / 1e9,
            "weight_sync_buckets": float(buckets),
        }
        return self.last

    def _waited(self, work: Any) -> None:
        t = time.perf_counter()
        work.wait()
        self._wait += time.perf_counter() - t

    def _gathered(self, side: _Side) -> Iterator[list[torch.Tensor]]:
        """The TP shards of every parameter, in `_Side.params` order, on the TP rank 0 (other
        TP ranks get []). At TP > 1 consecutive parameters are gathered together, one gather
        of up to min(bucket/tp, GATHER_MAX_BYTES) bytes of shards a rank (a larger shard
        alone), into two kept buffers: the next group is on the wire while this one is
        packed. The shards are views of the gather buffer, valid until the generator
        resumes after the group's last parameter."""
        ps = side.ps
        params = [p.detach() for *_, p in side.params()]
        if ps.tp == 1:
            yield from ([p] for p in params)
            return
        cap = max(min(self.bucket_bytes // ps.tp, GATHER_MAX_BYTES), _ALIGN)
        groups, i = [], 0  # (first, end, offsets, bytes a rank)
        while i < len(params):
            offs, n, j = [], 0, i
            while j < len(params):
                nb = params[j].numel() * params[j].element_size()
                if j > i and n + nb > cap:
                    break
                offs.append(n)
                n, j = _align(n + nb), j + 1
            groups.append((i, j, offs, n))
            i = j
        works: list[Any] = [None, None]
        outs: list[torch.Tensor | None] = [None, None]

        def post(g: int) -> None:
            i, j, offs, n = groups[g]
            local = self._buf(f"gather_in{g % 2}", n, ps.device)
            for p, o in zip(params[i:j], offs):
                local[o : o + p.numel() * p.element_size()].view(p.dtype).view(p.shape).copy_(p)
            out = self._buf(f"gather_out{g % 2}", n * ps.tp, ps.device) if ps.tp_rank == 0 else None
            parts = None if out is None else [out[r * n : (r + 1) * n] for r in range(ps.tp)]
            outs[g % 2] = out
            works[g % 2] = dist.gather(local[:n], parts, group=ps.tp_group, group_dst=0,
                                       async_op=True)  # fmt: skip

        post(0)
        for g, (i, j, offs, n) in enumerate(groups):
            if g + 1 < len(groups):  # its buffers held group g - 1, packed by now
                post(g + 1)
            self._waited(works[g % 2])
            out = outs[g % 2]
            for p, o in zip(params[i:j], offs):
                nb = p.numel() * p.element_size()
                yield [] if out is None else [
                    out[r * n + o : r * n + o + nb].view(p.dtype).view(p.shape)
                    for r in range(ps.tp)
                ]  # fmt: skip

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
        size = self.bucket_bytes
        if stage is not None:  # two buckets: one fills while the other is on the wire
            bufs = [self._buf(f"send{i}", size, ps.device) for i in range(2)]
            if self._export is None:
                self._export = _export_plan(side)
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
                self._waited(works[cur])
                works[cur] = None

        with side.merged():
            entries = list(stage.entries) if stage else []
            k = 0  # next entry
            params = list(side.params())
            for i, shards in enumerate(self._gathered(side)):
                hf: dict[str, torch.Tensor] | None = None  # _to_hf's tensors, when needed
                while k < len(entries) and entries[k].param == i:
                    e, k = entries[k], k + 1
                    pos = e.offset - sent  # alignment padding: skip to the entry's offset
                    while pos >= size:  # (only when the padding fills a bucket)
                        flush(size)
                        pos -= size
                    fill = pos
                    if fill + e.nbytes <= size:  # in this bucket: written in one pass
                        out = bufs[cur][fill : fill + e.nbytes].view(e.dtype).view(e.shape)
                        assert self._export is not None  # from the shards: no cat, no
                        _pack_shards(out, e.name, self._export[i], shards)  # q/k/v copy
                        fill += e.nbytes
                        if fill == size:
                            flush(fill)
                        continue
                    name, layer, _ = params[i]
                    hf = hf or _to_hf(side.arch, name, layer, shards, copy=False)
                    data = hf[e.name].to(e.dtype).contiguous().view(-1).view(torch.uint8)
                    done = 0
                    while done < data.numel():
                        n = min(size - fill, data.numel() - done)
                        bufs[cur][fill : fill + n].copy_(data[done : done + n])
                        fill, done = fill + n, done + n
                        if fill == size:
                            flush(fill)
            if stage is not None and fill:
                flush(fill)
            for w in works:
                if w is not None:
                    self._waited(w)
            if stage is not None:
                assert k == len(entries) and sent == stage.nbytes, (k, sent, stage.nbytes)
        return count

    def _sizes(self, stage: _Stage) -> list[int]:
        b = self.bucket_bytes
        return [min(b, stage.nbytes - a) for a in range(0, stage.nbytes, b)]

    def _arrivals(self, stage: _Stage, bufs: list, release=None):
        """(bucket index j, its buffer, start, end byte in the stage's stream) of each of the
        stage's buckets as it arrives, the next one on the wire meanwhile (two buffers, j % 2);
        `release(b)` runs before buffer b is reused."""
        sizes = self._sizes(stage)
        works: list[Any] = [None, None]

        def post(j: int) -> None:
            if release is not None:
                release(j % 2)
            works[j % 2] = dist.broadcast(
                bufs[j % 2][: sizes[j]], src=stage.src, group=stage.group, async_op=True
            )

        if sizes:
            post(0)
        for j, size in enumerate(sizes):
            if j + 1 < len(sizes):
                post(j + 1)
            self._waited(works[j % 2])
            start = j * self.bucket_bytes
            yield j, bufs[j % 2], start, start + size

    def _recv_direct(self) -> int:
        """Receive every stage's buckets (the next one on the wire while this one is read)
        and copy the planned pieces from them straight into the parameters."""
        side = self.dst
        assert side is not None
        dev = side.ps.device
        bufs = [self._buf(f"recv{i}", self.bucket_bytes, dev) for i in range(2)]
        count = 0
        for stage in self.stages:
            wanted = [e for e in stage.entries if e.name in self._pieces]
            whole: dict[str, torch.Tensor] = {}  # spanning tensors read by column slices
            k = 0  # first wanted entry not yet complete
            for _, buf, start, end in self._arrivals(stage, bufs):
                count += 1
                while k < len(wanted) and wanted[k].offset < end:
                    e = wanted[k]
                    lo, hi = max(e.offset, start), min(e.offset + e.nbytes, end)
                    self._copy_pieces(e, buf[lo - start : hi - start], lo - e.offset, whole)
                    if e.offset + e.nbytes > end:
                        break  # continues in the next bucket
                    k += 1
            assert k == len(wanted) and not whole, (k, len(wanted), list(whole)[:3])
        return count

    def _copy_pieces(self, e: _Entry, data: torch.Tensor, at: int, whole: dict) -> None:
        """Bytes [at, at + len(data)) of HF tensor e arrived: copy the element ranges of its
        plain pieces; a column-sliced piece waits for the whole tensor (a view when the
        tensor is in one bucket, else assembled in `whole`)."""
        esize = torch.empty(0, dtype=e.dtype).element_size()
        a0, a1 = at // esize, (at + data.numel()) // esize
        elems = data.view(e.dtype)
        strided = []
        for pc in self._pieces[e.name]:
            if pc.flat is None:
                strided.append(pc)
                continue
            first, last, dst = pc.flat
            s0, s1 = max(first, a0), min(last, a1)
            if s0 < s1:
                flat = pc.param.detach().view(-1)
                flat[dst + s0 - first : dst + s1 - first].copy_(elems[s0 - a0 : s1 - a0])
        if not strided:
            return
        if at == 0 and data.numel() == e.nbytes:
            t = elems.view(e.shape)
        else:
            if e.name not in whole:
                whole[e.name] = torch.empty(e.nbytes, dtype=torch.uint8, device=data.device)
            whole[e.name][at : at + data.numel()].copy_(data)
            if at + data.numel() < e.nbytes:
                return
            t = whole.pop(e.name).view(e.dtype).view(e.shape)
        for pc in strided:
            value = t[pc.rows] if pc.rows is not None else t
            value = value[:, pc.cols] if pc.cols is not None else value
            pc.param.detach()[pc.row0 : pc.row0 + value.shape[0]].copy_(value)

    def _recv(self) -> int:
        """The general path (direct=False): each parameter loads through `_hf_value` once
        its HF tensors are all here."""
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
        bufs = [self._buf(f"recv{i}", self.bucket_bytes, ps.device) for i in range(2)]
        views: list[set[str]] = [set(), set()]  # names read in place from each buffer
        count = 0

        def release(b: int) -> None:  # buffer b is about to be reused
            for n in views[b]:  # still waited for: copy out first
                if n in reader.tensors:
                    reader.tensors[n] = reader.tensors[n].clone()
            views[b] = set()

        for stage in self.stages:
            wanted = [e for e in stage.entries if e.name in uses]
            dest: dict[str, torch.Tensor] = {}  # wanted tensors spanning buckets
            k = 0  # first wanted entry not yet complete
            for j, buf, start, end in self._arrivals(stage, bufs, release):
                b = j % 2
                count += 1
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


# the adapters-only sync lives in its own module; importable from here as before
from nova_engine.model.adapter_sync import AdapterSync  # noqa: E402

__all__ = ["AdapterSync", "WeightSync", "WeightSyncError"]
