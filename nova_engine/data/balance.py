"""DP balancing: deal one step's items (sequences, or DPO/RM pairs kept whole) over the DP
ranks so that every rank carries about the same number of tokens.

Every rank waits for the slowest at the gradient all-reduce, so a step costs the heaviest
rank's tokens. Round-robin dealing (`items[r::dp]`) on a log-normal length mix leaves the
heaviest rank 1.06x / 1.16x / 1.33x the mean at DP 2 / 4 / 8 (global batch 128, median 600,
max 4096); this split is within ~1.01x (benchmarks/bench_balance.py).

    shares = balanced_split(costs, dp, seed=seed, step=step)   # [dp] arrays of item indices
    mine = [items[i] for i in shares[dp_rank]]

Algorithm: longest-processing-time first (items by decreasing cost onto the least-loaded
rank; a heap) and then a bounded local search that moves or swaps single items between the
heaviest rank and the others while that lowers the heaviest load. Ties (equal costs, equal
loads) are broken by a permutation seeded by (seed, step), so the split is a pure function
of (costs, dp, seed, step): every rank computes the same assignment without communication,
and a resumed run reproduces it. Each rank's items keep their order in `costs` (the step's
seeded order), so only the assignment changes: the losses, normalized by the step's global
counts, do not depend on it.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any

import numpy as np

_MAX_ROUNDS = 64  # bound on the local-search improvements per split


def item_tokens(items: Sequence) -> np.ndarray:
    """[n] int64 token counts: len(sample), or chosen + rejected for a pair."""
    return np.fromiter((len(x) for x in items), dtype=np.int64, count=len(items))


def round_robin_split(n: int, dp: int) -> list[np.ndarray]:
    """The unbalanced baseline: item i to rank i % dp."""
    return [np.arange(r, n, dp) for r in range(dp)]


def _lpt(costs: np.ndarray, dp: int, order: np.ndarray) -> np.ndarray:
    """rank of every item: items in `order` onto the least-loaded rank (ties: lowest rank)."""
    owner = np.empty(len(costs), dtype=np.int64)
    heap = [(0, r) for r in range(dp)]
    for i in order:
        load, r = heapq.heappop(heap)
        owner[i] = r
        heapq.heappush(heap, (load + int(costs[i]), r))
    return owner


def _improve(costs: np.ndarray, owner: np.ndarray, dp: int) -> None:
    """Move or swap one item between the heaviest rank and another while the heaviest load
    drops (in place). Each round takes the best single move/swap with the heaviest rank."""
    loads = np.bincount(owner, weights=costs, minlength=dp).astype(np.int64)
    for _ in range(_MAX_ROUNDS):
        hi = int(np.argmax(loads))
        mine = np.flatnonzero(owner == hi)
        best, best_max = None, loads[hi]
        for lo in range(dp):
            if lo == hi:
                continue
            theirs = np.flatnonzero(owner == lo)
            # moving item a: hi - c_a, lo + c_a; swapping a<->b: hi - c_a + c_b, lo + c_a - c_b
            give = costs[mine][:, None] - np.concatenate([[0], costs[theirs]])[None, :]
            new_max = np.maximum(loads[hi] - give, loads[lo] + give)
            new_max = np.where(give > 0, new_max, np.iinfo(np.int64).max)
            a, b = np.unravel_index(int(np.argmin(new_max)), new_max.shape)
            if new_max[a, b] < best_max:
                best_max = new_max[a, b]
                best = (lo, mine[a], theirs[b - 1] if b > 0 else None, give[a, b])
        if best is None:
            return
        lo, moved, swapped, give = best
        owner[moved] = lo
        if swapped is not None:
            owner[swapped] = hi
        loads[hi] -= give
        loads[lo] += give


def balanced_split(costs, dp: int, *, seed: int = 0, step: int = 0) -> list[np.ndarray]:
    """Indices of the items each of `dp` ranks takes, balancing the sum of `costs` ([n]
    nonnegative ints, e.g. `item_tokens`). Deterministic in (costs, dp, seed, step); each
    share sorted (the items keep their relative order). Every item lands on exactly one rank;
    with fewer items than ranks some shares are empty."""
    costs = np.asarray(costs, dtype=np.int64)
    if dp < 1:
        raise ValueError(f"balanced_split: dp={dp}, expected >= 1")
    if costs.ndim != 1 or (costs < 0).any():
        raise ValueError("balanced_split: costs must be a 1-D array of nonnegative ints")
    if dp == 1:
        return [np.arange(len(costs))]
    tie = np.random.default_rng([seed, step, 0x6261]).permutation(len(costs))
    order = np.lexsort((tie, -costs))  # decreasing cost, seeded ties
    owner = _lpt(costs, dp, order)
    _improve(costs, owner, dp)
    return [np.flatnonzero(owner == r) for r in range(dp)]


def max_over_mean(costs, shares: Sequence[np.ndarray]) -> float:
    """The heaviest share's load / the mean load (1.0 = perfectly balanced)."""
    costs = np.asarray(costs, dtype=np.int64)
    loads = np.array([costs[s].sum() for s in shares], dtype=np.float64)
    return float(loads.max() / max(loads.mean(), 1e-12))


def deal(samples: Sequence[Any], dp: int, dp_rank: int, *, seed: int = 0, step: int = 0):
    """The sequences (pairs) of one step that DP rank `dp_rank` (of `dp`) gets, balanced by
    tokens (`balanced_split`: deterministic in (seed, step), pairs kept whole, each
    share in step order). The single place a step's sequences are dealt to ranks."""
    if dp == 1:
        return list(samples)
    shares = balanced_split(item_tokens(samples), dp, seed=seed, step=step)
    return [samples[int(i)] for i in shares[dp_rank]]
