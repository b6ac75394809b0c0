"""The DPO reference log-prob cache on disk.

DPO needs, for every pair, the reference model's summed log-probs of the chosen and the
rejected response. They are computed once (one forward pass with the same engine) and stored
here, so training holds no reference model in memory.

The cache is keyed by three fingerprints, and a key maps to its own file
`<dir>/ref_<digest>.npz`, so a change of any of them starts a new cache (old ones are listed
by `stale()`, never silently reused):
- model: `model_fingerprint(hf_dir)` = sha256 over config.json's bytes and, for every weight
  file (*.safetensors, *.bin, *.pt), its name, size and sampled content: the first MiB
  (the safetensors header: names, dtypes, shapes, offsets) and 16 blocks of 64 KiB spread
  evenly over the file. Any retraining or re-export changes the sampled bytes; copying the
  directory elsewhere does not. `full=True` hashes every byte instead (minutes for 70B).
- data: `data_fingerprint(paths)` = sha256 of the files' full contents, in order.
- config: `config_hash(run.ref_config())` with the tokenizer directory replaced by
  `tokenizer_fingerprint` (its files' contents): max length, truncation, precision, ...

Entries are per sample index (`PairSample.index`): chosen/rejected log-prob sums (float64)
and response token counts. Writes are atomic (temp file + fsync + rename). With data
parallelism the ranks' entries are gathered to rank 0, which writes the one file
(`nova_engine.train.stages.dpo.reference_pass`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import uuid
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from nova_engine.logging import get_logger

logger = get_logger(__name__)

_SAMPLE_BLOCK = 64 * 1024
_HEAD_BYTES = 1024 * 1024
_N_BLOCKS = 16
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.safetensors.index.json")


class RefCacheError(ValueError):
    """A cache file that does not match its key or is damaged, or a lookup of a sample the
    cache does not hold."""


def _hash_file(h, path: str, full: bool) -> None:
    size = os.path.getsize(path)
    h.update(f"{os.path.basename(path)}:{size}\n".encode())
    with open(path, "rb") as f:
        if full or size <= _HEAD_BYTES + _N_BLOCKS * _SAMPLE_BLOCK:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
            return
        h.update(f.read(_HEAD_BYTES))
        for i in range(_N_BLOCKS):
            f.seek(_HEAD_BYTES + (size - _HEAD_BYTES - _SAMPLE_BLOCK) * i // (_N_BLOCKS - 1))
            h.update(f.read(_SAMPLE_BLOCK))


def model_fingerprint(hf_dir: str | os.PathLike, *, full: bool = False) -> str:
    """Fingerprint of a HF model directory (see the module docstring)."""
    hf_dir = os.fspath(hf_dir)
    cfg = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(cfg):
        raise RefCacheError(f"{hf_dir}: no config.json (expected a HF model directory)")
    h = hashlib.sha256()
    with open(cfg, "rb") as f:
        h.update(f.read())
    files = sorted({p for pat in WEIGHT_PATTERNS for p in glob.glob(os.path.join(hf_dir, pat))})
    if not any(not p.endswith(".json") for p in files):
        raise RefCacheError(f"{hf_dir}: no weight files ({', '.join(WEIGHT_PATTERNS[:3])})")
    for p in files:
        _hash_file(h, p, full)
    return h.hexdigest()[:20]


def data_fingerprint(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    """sha256 of the data files' contents, in the given order (paths themselves excluded)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    h = hashlib.sha256()
    for p in paths:
        h.update(f"file:{os.path.getsize(p)}\n".encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:20]


TOKENIZER_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template*",
    "vocab*",
    "merges.txt",
    "*.model",
)


def tokenizer_fingerprint(tok_dir: str | os.PathLike) -> str:
    """sha256 of a tokenizer directory's tokenizer files (vocab, merges, config, chat
    template), by name and content."""
    tok_dir = os.fspath(tok_dir)
    files = sorted({p for pat in TOKENIZER_PATTERNS for p in glob.glob(os.path.join(tok_dir, pat))})
    if not files:
        raise RefCacheError(f"{tok_dir}: no tokenizer files")
    h = hashlib.sha256()
    for p in files:
        if os.path.isfile(p):
            _hash_file(h, p, full=True)
    return h.hexdigest()[:20]


@dataclass(frozen=True)
class RefCacheKey:
    model: str
    """model_fingerprint of the reference model."""
    data: str
    """data_fingerprint of the preference files."""
    config: str
    """config_hash of the settings that change log-probs (DPORunConfig.ref_config())."""

    @property
    def digest(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:20]

    @classmethod
    def for_run(
        cls, run, ref_model_dir: str | None = None, data_paths: list[str] | None = None
    ) -> RefCacheKey:
        """The key of a DPORunConfig: its model directory (or `ref_model_dir`), training
        files (or `data_paths`, e.g. the held-out pairs) and ref_config()."""
        from nova_engine.config import config_hash

        ref = dict(run.ref_config())
        ref["tokenizer_dir"] = tokenizer_fingerprint(run.model.tokenizer_dir)  # content, not path
        return cls(
            model=model_fingerprint(ref_model_dir or run.model.hf_path),
            data=data_fingerprint(data_paths or run.data.train_paths),
            config=config_hash(ref),
        )


_FIELDS = ("chosen_logp", "rejected_logp", "chosen_tokens", "rejected_tokens")


class RefCache:
    """Reference log-probs of one (model, data, config) key; see the module docstring.

    cache = RefCache.open(run.ref_cache_dir, key, expected=[p.index for p in pairs])
    if not cache.complete:
        for batch in ...:                       # only cache.missing() indices
            cache.put(indices, chosen_logp, rejected_logp, chosen_n, rejected_n)
        cache.save()
    c, r, cn, rn = cache.lookup(indices)
    """

    def __init__(self, directory: str, key: RefCacheKey, expected: Sequence[int] | None):
        self.dir, self.key = directory, key
        self.expected = None if expected is None else np.unique(np.asarray(expected, np.int64))
        n = 0 if self.expected is None or not len(self.expected) else int(self.expected[-1]) + 1
        self.present = np.zeros(n, dtype=bool)
        self.chosen_logp = np.zeros(n, dtype=np.float64)
        self.rejected_logp = np.zeros(n, dtype=np.float64)
        self.chosen_tokens = np.zeros(n, dtype=np.int64)
        self.rejected_tokens = np.zeros(n, dtype=np.int64)

    # -- files ----------------------------------------------------------------------

    @property
    def path(self) -> str:
        return os.path.join(self.dir, f"ref_{self.key.digest}.npz")

    @classmethod
    def open(
        cls, directory: str | os.PathLike, key: RefCacheKey, expected: Sequence[int] | None = None
    ) -> RefCache:
        """The cache for `key` under `directory`, loaded if its file exists. `expected`:
        the sample indices the run needs (decides `complete` and `missing()`)."""
        cache = cls(os.fspath(directory), key, expected)
        if os.path.exists(cache.path):
            try:
                cache._load(cache.path)
            except RefCacheError as e:  # a damaged cache is rebuilt, not fatal
                logger.warning("%s; recomputing the reference log-probs", e)
                cache = cls(os.fspath(directory), key, expected)
        stale = cache.stale()
        if stale:
            logger.info(
                "reference caches for other models/data/configs in %s: %s", cache.dir, stale
            )
        return cache

    def _load(self, path: str) -> None:
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {f: z[f] for f in ("present", *_FIELDS)}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise RefCacheError(f"{path}: damaged reference cache ({e})") from None
        if meta.get("key") != asdict(self.key):
            raise RefCacheError(
                f"{path}: stored for key {meta.get('key')}, expected {asdict(self.key)}"
            )
        self._merge(arrays)

    def _merge(self, arrays: dict[str, np.ndarray]) -> None:
        n = len(arrays["present"])
        if n > len(self.present):
            self._grow(n)
        idx = np.flatnonzero(arrays["present"])
        self.present[idx] = True
        for f in _FIELDS:
            getattr(self, f)[idx] = arrays[f][idx]

    def _grow(self, n: int) -> None:
        for f in ("present", *_FIELDS):
            old = getattr(self, f)
            new = np.zeros(n, dtype=old.dtype)
            new[: len(old)] = old
            setattr(self, f, new)

    def save(self) -> str:
        """Write the cache file atomically (temp file + fsync + rename); returns its path."""
        path = self.path
        os.makedirs(self.dir, exist_ok=True)
        meta = {"key": asdict(self.key), "num_present": int(self.present.sum())}
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}.npz"
        try:
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    meta=np.array(json.dumps(meta)),
                    present=self.present,
                    **{k: getattr(self, k) for k in _FIELDS},
                )
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return path

    def stale(self) -> list[str]:
        """Other keys' cache files in the directory (kept; delete them by hand if unwanted)."""
        mine = os.path.basename(self.path)
        files = glob.glob(os.path.join(self.dir, "ref_*.npz"))
        return sorted(p for p in files if os.path.basename(p) != mine and ".tmp-" not in p)

    # -- entries --------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Every expected index is present (without `expected`: the file exists)."""
        if self.expected is None:
            return os.path.exists(self.path)
        return bool(len(self.expected) == 0 or self.present[self.expected].all())

    def missing(self) -> np.ndarray:
        """Expected indices not cached yet (sorted)."""
        if self.expected is None:
            return np.zeros(0, dtype=np.int64)
        return self.expected[~self.present[self.expected]]

    def put(
        self,
        indices: Iterable[int],
        chosen_logp: Iterable[float],
        rejected_logp: Iterable[float],
        chosen_tokens: Iterable[int],
        rejected_tokens: Iterable[int],
    ) -> None:
        """Store entries (overwrites earlier values of the same indices)."""
        idx = np.asarray(
            list(indices) if not isinstance(indices, np.ndarray) else indices, np.int64
        )
        if idx.size and idx.min() < 0:
            raise RefCacheError(f"negative sample index {int(idx.min())}")
        if idx.size and idx.max() >= len(self.present):
            self._grow(int(idx.max()) + 1)
        values = [chosen_logp, rejected_logp, chosen_tokens, rejected_tokens]
        for f, v in zip(_FIELDS, values):
            arr = np.asarray(v.tolist() if hasattr(v, "tolist") else list(v))
            if arr.shape != idx.shape:
                raise RefCacheError(f"{f}: {arr.shape} values for {idx.shape} indices")
            getattr(self, f)[idx] = arr
        self.present[idx] = True

    def lookup(
        self, indices: Iterable[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(chosen_logp, rejected_logp, chosen_tokens, rejected_tokens) for `indices`;
        RefCacheError naming the first index not cached."""
        idx = np.asarray(
            list(indices) if not isinstance(indices, np.ndarray) else indices, np.int64
        )
        ok = (idx >= 0) & (idx < len(self.present))
        ok[ok] = self.present[idx[ok]]
        if not ok.all():
            bad = int(idx[~ok][0])
            raise RefCacheError(
                f"sample {bad} is not in the reference cache {self.path} "
                f"({int(self.present.sum())} entries): run the reference pass first"
            )
        chosen_logp, rejected_logp, chosen_tokens, rejected_tokens = (
            getattr(self, f)[idx].copy() for f in _FIELDS
        )
        return chosen_logp, rejected_logp, chosen_tokens, rejected_tokens

    def check_token_counts(
        self, indices: Sequence[int], chosen: Sequence[int], rejected: Sequence[int]
    ) -> None:
        """Raise if the cached response lengths differ from the current samples' (the
        tokenization changed without the key noticing)."""
        _, _, cn, rn = self.lookup(indices)
        for i, a, b, c, d in zip(indices, cn, chosen, rn, rejected):
            if a != b or c != d:
                raise RefCacheError(
                    f"sample {i}: cached response lengths ({a}, {c}) != current ({b}, {d})"
                )
