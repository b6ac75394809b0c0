"""Checks, output layout and the streamed merge loop.

`merge_models(method, model_dirs, out)`:
1. opens every input (config.json + the safetensors headers, no tensor data) and checks,
   before anything is written, that architectures, vocab sizes, tensor names, shapes and
   dtypes agree, that --out does not exist (unless overwrite) and is not an input, and
   that the disk has room; each failure is one MergeError line;
2. plans the output files: the reference model's own files and tensor order when it is
   sharded and no max shard size is given, else greedy shards of at most max_shard_size
   (one `model.safetensors` when everything fits);
3. writes into a temporary directory next to --out: for every tensor, in the output order,
   the method combines flat chunks of `chunk_elems` elements (float32 math, float64 for
   float64 inputs) and the result goes straight to disk in the output dtype, so the
   resident memory is a few chunks plus what a method's whole-tensor pass needs;
   non-float tensors are copied from the reference model;
4. adds the index (sharded output), every non-weight file of the reference model (config,
   generation config, tokenizer, chat template) and `nova_merge.json` (method, parameters,
   inputs), then renames the directory to --out; an interrupted merge leaves only the
   hidden temporary directory, never a directory that looks whole.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial

import torch

from nova_engine.logging import get_logger
from nova_engine.tools.merge.methods import MergeMethod, Read, bind
from nova_engine.tools.merge.safetensors_io import (
    CODE_OF,
    DTYPES,
    FLOAT_CODES,
    INDEX_NAME,
    SINGLE_NAME,
    SafetensorsDir,
    SafetensorsError,
    ShardWriter,
    itemsize,
)

logger = get_logger(__name__)

CHUNK_ELEMS = 1 << 20  # 1M elements: 4 MiB per float32 chunk
MERGE_RECORD = "nova_merge.json"
_WEIGHT_FILE = re.compile(
    r"(\.safetensors|\.safetensors\.index\.json|\.bin|\.bin\.index\.json|\.pt|\.pth|\.ckpt|"
    r"\.h5|\.msgpack|\.gguf|\.onnx)$"
)


class MergeError(ValueError):
    """A merge the inputs or options do not allow; `str(err)` is one line saying what and
    where."""


@dataclass
class ModelInput:
    """One input model: its directory, the role it plays (for messages), its config.json
    and its tensors (headers only until read)."""

    path: str
    role: str
    config: dict
    weights: SafetensorsDir


@dataclass
class MergeResult:
    out: str
    n_tensors: int
    total_bytes: int
    files: list[str]
    seconds: float
    record: dict = field(default_factory=dict)


def parse_size(text: str | int | None) -> int | None:
    """'5GB' (10^9), '2GiB' (2^30), '500MB', '1048576' -> bytes; None stays None."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise MergeError(f"--max-shard-size {text!r}: expected e.g. 5GB, 500MB, 2GiB or bytes")
    unit = (m.group(2) or "B").upper()
    power = "BKMGT".index(unit[0])
    base = 1024 if "I" in unit else 1000
    size = int(float(m.group(1)) * base**power)
    if size <= 0:
        raise MergeError(f"--max-shard-size {text!r}: expected a positive size")
    return size


def open_inputs(paths: list[str], roles: list[str]) -> list[ModelInput]:
    out = []
    for path, role in zip(paths, roles):
        if not os.path.isdir(path):
            raise MergeError(f"{role} {path}: not a directory (expected a HF model directory)")
        cfg_path = os.path.join(path, "config.json")
        try:
            with open(cfg_path) as fh:
                config = json.load(fh)
        except FileNotFoundError:
            raise MergeError(
                f"{role} {cfg_path}: missing (expected a HF model directory)"
            ) from None
        except (OSError, ValueError) as e:
            raise MergeError(f"{role} {cfg_path}: unreadable ({e})") from None
        try:
            weights = SafetensorsDir(path)
        except SafetensorsError as e:
            raise MergeError(f"{role} {e}") from None
        out.append(ModelInput(path, role, config, weights))
    return out


def _vocab_size(config: dict) -> int | None:
    if "vocab_size" in config:
        return config["vocab_size"]
    return (config.get("text_config") or {}).get("vocab_size")


def check_compatible(models: list[ModelInput], ref: int) -> None:
    """Raise MergeError (one line) unless every model has the reference's architectures,
    vocab size, tensor names, shapes and dtypes."""
    r = models[ref]
    archs = r.config.get("architectures")
    if not archs:
        raise MergeError(f"{r.role} {r.path}/config.json: no 'architectures' list")
    for m in models:
        if m is r:
            continue
        this, that = f"{m.role} {m.path}", f"{r.role} {r.path}"
        if m.config.get("architectures") != archs:
            raise MergeError(
                f"architectures differ: {this} is {m.config.get('architectures')}, "
                f"{that} is {archs}"
            )
        vm, vr = _vocab_size(m.config), _vocab_size(r.config)
        if vm != vr:
            raise MergeError(f"vocab sizes differ: {this} has {vm}, {that} has {vr}")
        a, b = set(m.weights.tensors), set(r.weights.tensors)
        if a != b:
            missing, extra = sorted(b - a), sorted(a - b)
            parts = (
                [f"lacks {len(missing)} of its tensors (e.g. {missing[0]!r})"] if missing else []
            )
            parts += [f"has {len(extra)} others (e.g. {extra[0]!r})"] if extra else []
            raise MergeError(f"tensor names differ: {this} {' and '.join(parts)} vs {that}")
        for name, info in r.weights.tensors.items():
            other = m.weights.tensors[name]
            if other.shape != info.shape:
                raise MergeError(
                    f"tensor {name!r}: shape {list(other.shape)} in {this}, "
                    f"{list(info.shape)} in {that}"
                )
            if other.dtype != info.dtype:
                raise MergeError(
                    f"tensor {name!r}: dtype {other.dtype} in {this}, {info.dtype} in {that} "
                    "(convert one model first)"
                )


def check_out(out: str, inputs: list[str], overwrite: bool) -> None:
    """--out must not exist (unless overwrite) and must be neither an input nor hold one."""
    real = os.path.realpath(out)
    for p in inputs:
        rp = os.path.realpath(p)
        if real == rp or rp.startswith(real + os.sep) or real.startswith(rp + os.sep):
            raise MergeError(f"--out {out} overlaps the input {p}: choose another directory")
    if os.path.lexists(out) and not overwrite:
        raise MergeError(f"--out {out} exists: pass --overwrite to replace it")


@dataclass
class OutFile:
    name: str
    tensors: list[str]


def plan_files(
    ref: SafetensorsDir, out_codes: dict[str, str], max_shard_size: int | None
) -> list[OutFile]:
    """Output files in writing order: the reference's own files when it is sharded and no
    size is given; else greedy shards of <= max_shard_size bytes (a bigger tensor gets a
    shard of its own), in the reference's tensor order; one model.safetensors if one fits."""
    names = list(ref.tensors)
    if max_shard_size is None:
        if not ref.sharded:
            return [OutFile(SINGLE_NAME, names)]
        files: dict[str, list[str]] = {}
        for n in names:
            files.setdefault(ref.tensors[n].file, []).append(n)
        return [OutFile(f, ts) for f, ts in files.items()]
    groups: list[list[str]] = [[]]
    size = 0
    for n in names:
        nbytes = ref.tensors[n].numel * itemsize(out_codes[n])
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += nbytes
    if len(groups) == 1:
        return [OutFile(SINGLE_NAME, groups[0])]
    k = len(groups)
    return [OutFile(f"model-{i + 1:05d}-of-{k:05d}.safetensors", g) for i, g in enumerate(groups)]


def _out_codes(ref: SafetensorsDir, dtype: torch.dtype | None) -> dict[str, str]:
    codes = {}
    for name, info in ref.tensors.items():
        codes[name] = (
            CODE_OF[dtype] if dtype is not None and info.dtype in FLOAT_CODES else info.dtype
        )
    return codes


def _check_space(parent: str, nbytes: int) -> None:
    probe = parent
    while not os.path.isdir(probe):
        probe = os.path.dirname(probe) or "."
    free = shutil.disk_usage(probe).free
    if free < nbytes * 1.02 + (16 << 20):
        raise MergeError(
            f"not enough disk space in {probe}: the output needs {nbytes / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free"
        )


def _merge_tensor(
    method: MergeMethod,
    models: list[ModelInput],
    name: str,
    out_code: str,
    writer: ShardWriter,
    chunk: int,
) -> None:
    infos = [m.weights.tensors[name] for m in models]
    ref = infos[method.reference]
    numel, out_dtype = ref.numel, DTYPES[out_code]
    if ref.dtype not in FLOAT_CODES:  # integer / bool buffers: the reference's, as stored
        for s in range(0, numel, chunk):
            writer.write(models[method.reference].weights.read(name, s, min(numel, s + chunk)))
        return
    calc = torch.float64 if ref.dtype == "F64" else torch.float32

    def read(i: int, s: int, e: int) -> torch.Tensor:
        return models[i].weights.read(name, s, e).to(calc)

    state = method.prepare(numel, read, chunk)
    for s in range(0, numel, chunk):
        out = method.combine(partial(_chunk, read, s, min(numel, s + chunk)), state).to(out_dtype)
        finite = torch.isfinite(out)
        if not bool(finite.all()):  # a NaN/Inf in an input, or a value past --dtype's range
            bad = out.numel() - int(finite.sum())
            raise MergeError(
                f"{method.name}: merged tensor {name!r} has {bad} non-finite value(s) "
                f"(elements {s}..{min(numel, s + chunk) - 1} of {numel}, as {out_code}): an "
                "input holds NaN/Inf or the result overflows the output dtype; nothing written"
            )
        writer.write(out)


def _chunk(read: Read, start: int, stop: int, i: int) -> torch.Tensor:
    return read(i, start, stop)


def _copy_aux(src: str, dst: str, dtype: torch.dtype | None) -> list[str]:
    """Every regular non-weight file of `src` (config, generation config, tokenizer, chat
    template, ...) to `dst`; config.json's dtype updated when the output dtype changes."""
    copied = []
    for fname in sorted(os.listdir(src)):
        path = os.path.join(src, fname)
        if not os.path.isfile(path) or _WEIGHT_FILE.search(fname) or fname == MERGE_RECORD:
            continue
        shutil.copy2(path, os.path.join(dst, fname))
        copied.append(fname)
    if dtype is not None:
        cfg_path = os.path.join(dst, "config.json")
        with open(cfg_path) as fh:
            cfg = json.load(fh)
        for key in ("torch_dtype", "dtype"):
            if key in cfg or key == "torch_dtype":
                cfg[key] = str(dtype).removeprefix("torch.")
        with open(cfg_path, "w") as fh:
            json.dump(cfg, fh, indent=2)
    return copied


def replace_dir(tmp: str, out: str) -> None:
    """Rename the finished `tmp` to `out`, moving an existing `out` aside first and deleting
    it after (the caller checked that overwriting is allowed)."""
    old = None
    if os.path.lexists(out):
        old = tmp + ".old"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old)
        else:
            os.unlink(old)


def make_tmp_dir(out: str, tag: str = "merge") -> str:
    """A hidden temporary directory next to `out` (same filesystem, so the rename is atomic)."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.nova-{tag}-",
                            dir=parent)  # fmt: skip


def merge_models(
    method: MergeMethod,
    model_dirs: list[str],
    out: str,
    *,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
    dtype: torch.dtype | None = None,
    chunk_elems: int = CHUNK_ELEMS,
    extra_record: dict | None = None,
) -> MergeResult:
    """Merge the HF model directories `model_dirs` (in the method's role order, see
    nova_engine.tools.merge.methods) into the new HF directory `out`. Raises MergeError
    before writing anything when the inputs or options do not fit."""
    t0 = time.perf_counter()
    try:
        bind(method, len(model_dirs))
    except ValueError as e:
        raise MergeError(f"{method.name}: {e}") from None
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise MergeError(f"--dtype {dtype}: expected float32, bfloat16 or float16")
    if chunk_elems < 1:
        raise MergeError(f"chunk_elems={chunk_elems}: expected >= 1")
    max_shard = parse_size(max_shard_size)
    check_out(out, model_dirs, overwrite)
    models = open_inputs(model_dirs, method.roles(len(model_dirs)))
    try:
        check_compatible(models, method.reference)
        ref = models[method.reference]
        codes = _out_codes(ref.weights, dtype)
        files = plan_files(ref.weights, codes, max_shard)
        total = sum(ref.weights.tensors[n].numel * itemsize(c) for n, c in codes.items())
        _check_space(os.path.dirname(os.path.abspath(out)), total)
        record = {
            "method": method.name,
            "params": method.params(),
            "inputs": {m.role.lstrip("-"): os.path.abspath(m.path) for m in models},
            "reference": os.path.abspath(ref.path),
            "dtype": str(dtype).removeprefix("torch.") if dtype else "as input",
            **(extra_record or {}),
        }
        tmp = make_tmp_dir(out)
        try:
            _write(method, models, files, codes, tmp, chunk_elems)
            if len(files) > 1:
                index = {
                    "metadata": {"total_size": total},
                    "weight_map": dict(sorted((n, f.name) for f in files for n in f.tensors)),
                }
                with open(os.path.join(tmp, INDEX_NAME), "w") as fh:
                    json.dump(index, fh, indent=2)
            _copy_aux(ref.path, tmp, dtype)
            with open(os.path.join(tmp, MERGE_RECORD), "w") as fh:
                json.dump(record, fh, indent=2)
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        for m in models:
            m.weights.close()
    seconds = time.perf_counter() - t0
    logger.info("%s: %d tensors, %.2f GB in %.1f s -> %s", method.name, len(codes),
                total / 1e9, seconds, out)  # fmt: skip
    return MergeResult(out, len(codes), total, [f.name for f in files], seconds, record)


def _write(method, models, files, codes, tmp, chunk) -> None:
    ref = models[method.reference].weights
    for k, f in enumerate(files):
        entries = [(n, codes[n], ref.tensors[n].shape) for n in f.tensors]
        writer = ShardWriter(os.path.join(tmp, f.name), entries, {"format": "pt"})
        try:
            for n in f.tensors:
                _merge_tensor(method, models, n, codes[n], writer, chunk)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        logger.info("%s: wrote %s (%d/%d)", method.name, f.name, k + 1, len(files))
