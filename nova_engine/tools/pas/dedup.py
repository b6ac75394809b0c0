"""Near-duplicate removal of prompts: normalized word n-gram shingles, compared by exact
Jaccard similarity (small pools) or found through MinHash + LSH banding and then confirmed by
exact Jaccard (large pools).

Normalization: Unicode NFKC, case folding, every character that is not a letter or a digit
becomes a space, whitespace collapsed. Words are the space-separated pieces, except that each
CJK / kana / hangul character is a word of its own (those scripts do not separate words by
spaces). Shingles are the word n-grams (n = 3 by default); a text of fewer than n words is one
shingle (its whole normalized text).

A prompt is dropped when its normalized text equals that of an earlier kept prompt (an exact
duplicate) or when the Jaccard similarity of its shingle set with an earlier kept prompt's is
>= `threshold` (0.7 by default; a near duplicate). The first occurrence is kept, so the
result depends only on the pool's order.

Methods: "exact" compares each prompt with every kept prompt that shares a shingle with it
(an inverted index: the exact Jaccard of every pair that can reach the threshold);
"minhash" computes `num_perm` MinHash values per prompt (universal hashing mod the Mersenne
prime 2^31 - 1 over blake2b shingle hashes), cuts them into `bands` bands of
num_perm / bands rows, and compares a prompt only with the kept prompts that share a band
(the LSH candidates), by exact Jaccard. With 128 permutations in 16 bands of 8 rows, the
probability that a pair of similarity s becomes a candidate is 1 - (1 - s^8)^16: 0.98 at
s = 0.8, 0.86 at s = 0.7, 0.25 at s = 0.5 — so a few near duplicates just above the
threshold can be missed (the price of not comparing all pairs); a prompt that is not a
near duplicate is never dropped.
"auto" = exact up to `exact_max` prompts, minhash beyond.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)
_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff])")
_PRIME = (1 << 31) - 1  # Mersenne prime of the MinHash permutations


@dataclass
class DedupConfig:
    """How near duplicates are found."""

    method: Literal["auto", "exact", "minhash"] = "auto"
    """"exact" Jaccard against every kept prompt, "minhash" LSH candidates, "auto" = exact up
    to `exact_max` prompts."""
    threshold: float = 0.7
    """Jaccard similarity of shingle sets at or above which a prompt is a near duplicate."""
    ngram: int = 3
    """Words per shingle."""
    num_perm: int = 128
    """MinHash values per prompt."""
    bands: int = 16
    """LSH bands (num_perm must divide by it)."""
    exact_max: int = 2000
    """Largest pool "auto" compares exactly."""
    seed: int = 0
    """Seed of the MinHash permutations."""

    def __post_init__(self) -> None:
        if self.method not in ("auto", "exact", "minhash"):
            raise ValueError(f'method={self.method!r}: expected "auto", "exact" or "minhash"')
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold}: expected 0 < threshold <= 1")
        if self.ngram < 1:
            raise ValueError(f"ngram={self.ngram}: expected >= 1")
        if self.bands < 1 or self.num_perm < 1 or self.num_perm % self.bands:
            raise ValueError(
                f"num_perm={self.num_perm}, bands={self.bands}: expected bands >= 1 dividing "
                "num_perm"
            )
        if self.exact_max < 0:
            raise ValueError(f"exact_max={self.exact_max}: expected >= 0")


@dataclass
class DedupResult:
    """Which prompts survive, and why the others did not."""

    keep: list[int]
    """Indices of the kept prompts, in order."""
    method: str
    """"exact" or "minhash" (what "auto" resolved to)."""
    exact: list[tuple[int, int]] = field(default_factory=list)
    """(dropped, the kept prompt it repeats) for exact duplicates (same normalized text)."""
    near: list[tuple[int, int, float]] = field(default_factory=list)
    """(dropped, the kept prompt it resembles, Jaccard) for near duplicates."""


def normalize(text: str) -> str:
    """NFKC, case-folded, non-alphanumerics to spaces, CJK characters spaced, collapsed."""
    t = unicodedata.normalize("NFKC", text).casefold()
    t = _CJK.sub(r" \1 ", t)
    return " ".join(_NON_WORD.sub(" ", t).split())


def shingles(normalized: str, n: int = 3) -> frozenset[str]:
    """Word n-grams of a normalized text (one shingle when it has fewer than n words)."""
    words = normalized.split()
    if not words:
        return frozenset()
    if len(words) < n:
        return frozenset([" ".join(words)])
    return frozenset(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


class MinHasher:
    """MinHash signatures: h_k(x) = (a_k * x + b_k) mod p with p = 2^31 - 1 (a Mersenne
    prime) over 31-bit shingle hashes x (blake2b mod p); a_k, b_k < p, so a_k * x + b_k <
    2^63 never overflows uint64."""

    def __init__(self, num_perm: int = 128, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.a = rng.integers(1, _PRIME, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, _PRIME, size=num_perm, dtype=np.uint64)

    @staticmethod
    def hash_shingle(s: str) -> int:
        digest = hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "little") % _PRIME

    def signature(self, shingle_set: frozenset[str]) -> np.ndarray:
        """[num_perm] uint64 minima (all p for an empty set)."""
        if not shingle_set:
            return np.full(self.num_perm, _PRIME, dtype=np.uint64)
        x_S = np.array([self.hash_shingle(s) for s in shingle_set], dtype=np.uint64)
        vals_PS = (self.a[:, None] * x_S[None, :] + self.b[:, None]) % np.uint64(_PRIME)
        return vals_PS.min(axis=1)


def deduplicate(texts: Sequence[str], cfg: DedupConfig | None = None) -> DedupResult:
    """Keep the first of every group of exact / near duplicates (module docstring)."""
    cfg = cfg or DedupConfig()
    method = cfg.method
    if method == "auto":
        method = "exact" if len(texts) <= cfg.exact_max else "minhash"
    res = DedupResult(keep=[], method=method)
    seen: dict[str, int] = {}
    kept_sh: dict[int, frozenset] = {}
    hasher = MinHasher(cfg.num_perm, cfg.seed) if method == "minhash" else None
    rows = cfg.num_perm // cfg.bands
    index: dict = defaultdict(list)  # shingle (exact) or (band, rows) (minhash) -> kept prompts
    for i, text in enumerate(texts):
        norm = normalize(text)
        if norm in seen:
            res.exact.append((i, seen[norm]))
            continue
        sh = shingles(norm, cfg.ngram)
        keys: list = []
        if hasher is None:  # every kept prompt sharing a shingle, by an inverted index
            shared: Counter = Counter()
            for s in sh:
                shared.update(index.get(s, ()))
            sims = {j: c / (len(sh) + len(kept_sh[j]) - c) for j, c in shared.items()}
            keys = list(sh)
        else:  # the kept prompts sharing an LSH band
            sig = hasher.signature(sh)
            keys = [(b, sig[b * rows : (b + 1) * rows].tobytes()) for b in range(cfg.bands)]
            cands = {j for k in keys for j in index.get(k, ())}
            sims = {j: jaccard(sh, kept_sh[j]) for j in cands}
        best_j, best_s = -1, -1.0
        for j in sorted(sims):
            if sims[j] >= cfg.threshold and sims[j] > best_s:
                best_j, best_s = j, sims[j]
        if best_j >= 0:
            res.near.append((i, best_j, best_s))
            continue
        seen[norm] = i
        kept_sh[i] = sh
        res.keep.append(i)
        for k in keys:
            index[k].append(i)
    return res
