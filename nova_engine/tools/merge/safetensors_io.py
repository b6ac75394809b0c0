"""Safetensors files read and written one tensor, or one flat element range, at a time.

The format (github.com/huggingface/safetensors): an 8-byte little-endian header length N, a
JSON header `{"__metadata__": {...}, name: {"dtype": "BF16", "shape": [...],
"data_offsets": [begin, end]}, ...}` padded with spaces, then the data; offsets count from
the end of the header, tensors are row-major and little-endian, so any flat element range
[start, stop) of a tensor is one contiguous byte range.

Why not `safetensors.safe_open`: it memory-maps the file, and every page a read touches stays
resident in the process until the handle is closed (reading a 400 MB file through one handle
raised the peak RSS by 412 MB here). Reads here are `preadv` into a fresh tensor, so the
resident memory is the tensors alive and nothing else. The writer knows every tensor's
dtype and shape up front, writes the header first and then the bytes as they come, so an
output file of any size never has to be held in memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch

# safetensors dtype code -> torch dtype
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
CODE_OF: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


class SafetensorsError(ValueError):
    """A missing, unreadable or inconsistent safetensors file or index (names the path)."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file (name inside the model directory), safetensors dtype
    code, shape, and absolute byte offset of its data in the file."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def itemsize(code: str) -> int:
    return torch.empty(0, dtype=DTYPES[code]).element_size()


def read_header(path: str) -> tuple[list[TensorInfo], dict]:
    """(tensors in data order, __metadata__) of one safetensors file, validated: every entry
    has a known dtype, a shape, offsets that match its size and lie inside the file."""
    fname = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{path}: {size} bytes, too short for a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise SafetensorsError(f"{path}: header length {n} is past the end of the file")
            header = json.loads(fh.read(n))
    except OSError as e:
        raise SafetensorsError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{path}: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    data_start, data_len = 8 + n, size - 8 - n
    infos = []
    for name, entry in header.items():
        try:
            code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(
                f"{path}: tensor {name!r} lacks dtype / shape / data_offsets"
            ) from None
        if code not in DTYPES:
            raise SafetensorsError(
                f"{path}: tensor {name!r} has dtype {code!r}; expected one of {', '.join(DTYPES)}"
            )
        info = TensorInfo(name, fname, code, shape, data_start + begin)
        if end - begin != info.nbytes or not 0 <= begin <= end <= data_len:
            raise SafetensorsError(
                f"{path}: tensor {name!r} ({code}, shape {list(shape)}) has data_offsets "
                f"[{begin}, {end}] that do not fit its size or the file"
            )
        infos.append(info)
    infos.sort(key=lambda t: t.offset)
    return infos, meta


class SafetensorsDir:
    """A Hugging Face weights directory: `model.safetensors`, or the shards listed in
    `model.safetensors.index.json`. `tensors` maps every name to its TensorInfo, in file
    order (the index's files sorted by name, each in data order); `read` loads a flat
    element range of one tensor. File descriptors stay open until `close()`."""

    def __init__(self, path: str):
        self.path = path
        index, single = os.path.join(path, INDEX_NAME), os.path.join(path, SINGLE_NAME)
        self.tensors: dict[str, TensorInfo] = {}
        if os.path.isfile(index):
            self.sharded = True
            try:
                with open(index) as fh:
                    weight_map = json.load(fh)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (OSError, ValueError, KeyError, TypeError):
                raise SafetensorsError(
                    f"{index}: unreadable, or no 'weight_map' object of tensor name -> file"
                ) from None
            for fname in sorted(set(weight_map.values())):
                fpath = os.path.join(path, fname)
                if not os.path.isfile(fpath):
                    raise SafetensorsError(f"{fpath}: listed in {INDEX_NAME} but missing")
                for info in read_header(fpath)[0]:
                    if weight_map.get(info.name) != fname:
                        raise SafetensorsError(
                            f"{fpath}: holds {info.name!r}, which {INDEX_NAME} does not map "
                            "to this file"
                        )
                    self.tensors[info.name] = info
            missing = sorted(set(weight_map) - set(self.tensors))
            if missing:
                raise SafetensorsError(
                    f"{index}: {len(missing)} tensors not found in their files, e.g. "
                    f"{missing[0]!r} (expected in {weight_map[missing[0]]})"
                )
        elif os.path.isfile(single):
            self.sharded = False
            self.tensors = {t.name: t for t in read_header(single)[0]}
        else:
            raise SafetensorsError(
                f"{path}: no {SINGLE_NAME} or {INDEX_NAME} (expected a Hugging Face "
                "safetensors model directory)"
            )
        self._fds: dict[str, int] = {}

    @property
    def files(self) -> list[str]:
        return list(dict.fromkeys(t.file for t in self.tensors.values()))

    def _fd(self, fname: str) -> int:
        if fname not in self._fds:
            self._fds[fname] = os.open(os.path.join(self.path, fname), os.O_RDONLY)
        return self._fds[fname]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements [start, stop) of tensor `name`, flattened, in its stored dtype (a fresh
        tensor the caller owns)."""
        info = self.tensors[name]
        stop = info.numel if stop is None else stop
        out = torch.empty(stop - start, dtype=DTYPES[info.dtype])
        if out.numel():
            buf = memoryview(out.view(torch.uint8).numpy().data).cast("B")
            _pread_full(self._fd(info.file), buf, info.offset + start * info.itemsize)
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> SafetensorsDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pread_full(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise SafetensorsError(f"unexpected end of file at byte {offset + done}")
        done += n


class ShardWriter:
    """Writes one safetensors file whose tensors (name, dtype code, shape) are known up front:
    the header at once, then each tensor's bytes with `write`, in the listed order, in as
    many flat chunks as the caller likes. `close()` checks that every byte came and fsyncs."""

    def __init__(
        self, path: str, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None
    ):
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self._sizes: list[tuple[str, str, int]] = []
        pos = 0
        for name, code, shape in entries:
            nbytes = math.prod(shape) * itemsize(code)
            header[name] = {
                "dtype": code,
                "shape": list(shape),
                "data_offsets": [pos, pos + nbytes],
            }
            self._sizes.append((name, code, nbytes))
            pos += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.path, self.data_bytes = path, pos
        self._fh = open(path, "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._k, self._left = 0, self._sizes[0][2] if self._sizes else 0

    def write(self, chunk: torch.Tensor) -> None:
        """Append `chunk`'s elements to the current tensor (its dtype must be the tensor's)."""
        while self._left == 0 and self._k + 1 < len(self._sizes):  # skip empty tensors
            self._k += 1
            self._left = self._sizes[self._k][2]
        name, code, _ = self._sizes[self._k] if self._sizes else ("?", "?", 0)
        if chunk.dtype != DTYPES.get(code):
            raise SafetensorsError(f"{self.path}: {name}: got {chunk.dtype}, expected {code}")
        data = chunk.contiguous().view(-1).view(torch.uint8).numpy()
        if data.nbytes > self._left:
            raise SafetensorsError(f"{self.path}: {name}: more bytes than its shape holds")
        self._fh.write(data.data)
        self._left -= data.nbytes
        if self._left == 0 and self._k + 1 < len(self._sizes):
            self._k += 1
            self._left = self._sizes[self._k][2]

    def abort(self) -> None:
        """Close without the completeness check (the caller deletes the file)."""
        self._fh.close()

    def close(self) -> None:
        short = self._left + sum(s for _, _, s in self._sizes[self._k + 1 :])
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        if short:
            raise SafetensorsError(f"{self.path}: closed with {short} bytes still unwritten")
