"""The merge methods, each a small dataclass that combines one flat chunk of one tensor.

A method sees its models through `get(i)`: model i's elements of the current chunk as a
fresh float32 tensor (float64 when the inputs are float64) that it may overwrite; models it
does not ask for are never read. Methods that need a whole-tensor statistic (SLERP's norms
and angle, TIES's magnitude thresholds) compute it in `prepare`, which may read the tensor
in chunks before the combining pass. Terms with a zero coefficient are skipped, so ExPO with
alpha = 0 (or a linear merge with a single non-zero weight of 1) returns its model bit for bit.

Model order per method (the `roles`), and the reference model whose config, tokenizer and
file layout the output copies:
    expo             init, aligned            theta = aligned + alpha (aligned - init)   ref: aligned
    linear           m_1 .. m_N               theta = sum w_i m_i / sum w_i              ref: m_1
    task_arithmetic  base, m_1 .. m_N         theta = base + sum w_i (m_i - base)        ref: base
    slerp            a, b                     spherical interpolation at t               ref: a
    ties             base, m_1 .. m_N         trim, elect sign, disjoint mean            ref: base
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

Get = Callable[[int], torch.Tensor]  # model index -> fresh float chunk
Read = Callable[[int, int, int], torch.Tensor]  # (model, start, stop) -> fresh float elements


def _finite(name: str, x: float) -> None:
    if not math.isfinite(x):
        raise ValueError(f"{name}={x}: expected a finite number")


@dataclass
class MergeMethod:
    """Base class: `n_models` inputs, `reference` = index of the model copied for config and
    layout. `prepare(numel, read, chunk)` -> per-tensor state; `combine(get, state)` -> chunk."""

    name = "?"
    reference = 0
    _n = 0  # the number of models, set by bind()

    def roles(self, n_models: int) -> list[str]:
        return [f"--models[{i + 1}]" for i in range(n_models)]

    def check(self, n_models: int) -> None:
        """Raise ValueError when the method cannot take `n_models` inputs."""

    def prepare(self, numel: int, read: Read, chunk: int) -> object:
        return None

    def combine(self, get: Get, state: object) -> torch.Tensor:
        raise NotImplementedError

    def params(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


@dataclass
class ExPO(MergeMethod):
    """Model extrapolation (arXiv 2404.16792): theta = aligned + alpha (aligned - init).
    Models: [init, aligned]."""

    alpha: float = 0.3
    name = "expo"
    reference = 1

    def __post_init__(self):
        _finite("alpha", self.alpha)

    def roles(self, n_models: int) -> list[str]:
        return ["--init", "--aligned"]

    def check(self, n_models: int) -> None:
        if n_models != 2:
            raise ValueError(f"expo takes 2 models (init, aligned), got {n_models}")

    def combine(self, get: Get, state: object) -> torch.Tensor:
        aligned = get(1)
        if self.alpha != 0:
            diff = get(0).sub_(aligned)  # init - aligned
            aligned.sub_(diff, alpha=self.alpha)
        return aligned


@dataclass
class Linear(MergeMethod):
    """Weighted average sum_i w_i m_i / sum_i w_i (raw sum_i w_i m_i with normalize=False).
    Equal weights when none are given."""

    weights: Sequence[float] | None = None
    normalize: bool = True
    name = "linear"

    def __post_init__(self):
        for w in self.weights or ():
            _finite("weight", w)

    def check(self, n_models: int) -> None:
        if n_models < 2:
            raise ValueError(f"linear takes 2 or more models, got {n_models}")
        if self.weights is not None and len(self.weights) != n_models:
            raise ValueError(f"{len(self.weights)} weights for {n_models} models")
        if self.normalize and self.weights is not None and sum(self.weights) == 0:
            raise ValueError("the weights sum to 0: cannot normalize (use --no-normalize)")

    def coefficients(self, n_models: int) -> list[float]:
        w = list(self.weights) if self.weights is not None else [1.0] * n_models
        total = sum(w) if self.normalize else 1.0
        return [x / total for x in w]

    def combine(self, get: Get, state: object) -> torch.Tensor:
        acc = None
        for i, w in enumerate(self.coefficients(self._n)):
            if w == 0:
                continue
            if acc is None:
                acc = get(i).mul_(w)
            else:
                acc.add_(get(i), alpha=w)
        return acc if acc is not None else get(0).zero_()


@dataclass
class TaskArithmetic(MergeMethod):
    """theta = base + sum_i w_i (m_i - base); weights default to 1 each.
    Models: [base, m_1 .. m_N]."""

    weights: Sequence[float] | None = None
    name = "task_arithmetic"

    def __post_init__(self):
        for w in self.weights or ():
            _finite("weight", w)

    def roles(self, n_models: int) -> list[str]:
        return ["--base"] + [f"--models[{i}]" for i in range(1, n_models)]

    def check(self, n_models: int) -> None:
        if n_models < 2:
            raise ValueError("task_arithmetic takes a base and 1 or more models")
        if self.weights is not None and len(self.weights) != n_models - 1:
            raise ValueError(f"{len(self.weights)} weights for {n_models - 1} models")

    def combine(self, get: Get, state: object) -> torch.Tensor:
        base = get(0)
        acc = base.clone()
        weights = self.weights if self.weights is not None else [1.0] * (self._n - 1)
        for i, w in enumerate(weights, start=1):
            if w != 0:
                acc.add_(get(i).sub_(base), alpha=w)
        return acc


# SLERP falls back to linear interpolation when the two tensors are this close to parallel
# (or anti-parallel), where sin(angle) -> 0 makes the spherical weights ill-conditioned; the
# value is mergekit's. Also when either tensor is (near) zero.
SLERP_DOT_THRESHOLD = 0.9995


@dataclass
class Slerp(MergeMethod):
    """Spherical interpolation of two models per tensor, at t in [0, 1] (0 = the first):
    with Omega the angle between the flattened tensors a and b,
        theta = sin((1 - t) Omega) / sin(Omega) a + sin(t Omega) / sin(Omega) b,
    and the plain lerp (1 - t) a + t b when |cos Omega| > 0.9995 or a norm is ~0. The norms
    and the angle are computed in a first pass over the tensor (float64 sums)."""

    t: float = 0.5
    name = "slerp"

    def __post_init__(self):
        if not 0.0 <= self.t <= 1.0:
            raise ValueError(f"t={self.t}: expected 0 <= t <= 1")

    def check(self, n_models: int) -> None:
        if n_models != 2:
            raise ValueError(f"slerp takes exactly 2 models, got {n_models}")

    def prepare(self, numel: int, read: Read, chunk: int) -> tuple[float, float]:
        dot = n0 = n1 = 0.0
        for s in range(0, numel, chunk):
            a = read(0, s, min(numel, s + chunk)).double()
            b = read(1, s, min(numel, s + chunk)).double()
            dot += float(a @ b)
            n0 += float(a @ a)
            n1 += float(b @ b)
        return slerp_coefficients(self.t, dot, math.sqrt(n0), math.sqrt(n1))

    def combine(self, get: Get, state: object) -> torch.Tensor:
        c0, c1 = cast(tuple[float, float], state)
        acc = get(0).mul_(c0) if c0 != 0 else None
        if c1 == 0:
            return acc if acc is not None else get(0).zero_()
        return get(1).mul_(c1) if acc is None else acc.add_(get(1), alpha=c1)


def slerp_coefficients(t: float, dot: float, norm0: float, norm1: float) -> tuple[float, float]:
    """(c0, c1) with theta = c0 a + c1 b for SLERP at t (see `Slerp`)."""
    if norm0 < 1e-12 or norm1 < 1e-12:
        return 1.0 - t, t
    cos = max(-1.0, min(1.0, dot / (norm0 * norm1)))
    if abs(cos) > SLERP_DOT_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(cos)
    sin = math.sin(omega)
    return math.sin((1.0 - t) * omega) / sin, math.sin(t * omega) / sin


@dataclass
class Ties(MergeMethod):
    """TIES-Merging (arXiv 2306.01708), per tensor, with task vectors tau_i = m_i - base:
    1. trim: keep the k = round(density * numel) (at least 1) largest |tau_i|, zero the
       rest (entries tied with the k-th largest are all kept);
    2. elect: the sign of sum_i w_i tau_i (the sign with the larger total weighted mass);
       a sum of exactly 0 (task vectors that cancel) elects + as mergekit does
       (`sign_weight >= 0`), so the positive side's mean is applied, not nothing;
    3. disjoint mean: tau = sum over agreeing i of w_i tau_i / sum over agreeing i of w_i,
       agreeing = sign(w_i tau_i) equals the elected sign (0 where none agree);
    theta = base + lam * tau. Weights default to 1 (the paper's plain disjoint mean).
    Models: [base, m_1 .. m_N]. Each trim threshold is found exactly in 2 passes over the
    tensor (4 for float64, see `kth_largest_abs`), so memory stays a few chunks; the price is
    reading base and m_i twice more per task vector."""

    density: float = 0.2
    weights: Sequence[float] | None = None
    lam: float = 1.0
    name = "ties"

    def __post_init__(self):
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density={self.density}: expected 0 < density <= 1")
        _finite("lambda", self.lam)
        for w in self.weights or ():
            _finite("weight", w)

    def roles(self, n_models: int) -> list[str]:
        return ["--base"] + [f"--models[{i}]" for i in range(1, n_models)]

    def check(self, n_models: int) -> None:
        if n_models < 2:
            raise ValueError("ties takes a base and 1 or more models")
        if self.weights is not None and len(self.weights) != n_models - 1:
            raise ValueError(f"{len(self.weights)} weights for {n_models - 1} models")

    def prepare(self, numel: int, read: Read, chunk: int) -> list[float | None]:
        if self.density >= 1.0 or numel == 0:
            return [None] * (self._n - 1)
        k = max(1, int(self.density * numel + 0.5))
        dtype = read(0, 0, 1).dtype
        thresholds: list[float | None] = []
        for i in range(1, self._n):

            def taus(i: int = i) -> Iterator[torch.Tensor]:
                for s in range(0, numel, chunk):
                    e = min(numel, s + chunk)
                    yield read(i, s, e).sub_(read(0, s, e))

            thresholds.append(kth_largest_abs(taus, k, dtype))
        return thresholds

    def combine(self, get: Get, state: object) -> torch.Tensor:
        thresholds = cast(list[float | None], state)
        weights = self.weights if self.weights is not None else [1.0] * (self._n - 1)
        base = get(0)
        deltas = []
        for i, (w, thr) in enumerate(zip(weights, thresholds), start=1):
            if w == 0:
                continue
            tau = get(i).sub_(base)
            if thr is not None:
                tau.masked_fill_(tau.abs() < thr, 0.0)
            deltas.append((tau.mul_(w), w))
        if not deltas:
            return base
        total = torch.zeros_like(base)
        for tau, _ in deltas:
            total.add_(tau)
        sign = torch.where(total >= 0, 1.0, -1.0).to(base.dtype)  # sgn(0) elects + (mergekit)
        num, den = torch.zeros_like(base), torch.zeros_like(base)
        for tau, w in deltas:
            agree = tau.sign() == sign
            num.add_(tau * agree)
            den.add_(agree, alpha=w)
        den.masked_fill_(den.abs() < 1e-12, 1.0)
        return base.add_(num.div_(den), alpha=self.lam)


def kth_largest_abs(
    chunks: Callable[[], Iterable[torch.Tensor]], k: int, dtype: torch.dtype
) -> float:
    """The k-th largest |x| (1 <= k <= numel) of a tensor given as re-iterable chunks of
    `dtype` (float32 or float64), exactly, one chunk in memory at a time: a radix select on
    the bit patterns of |x| (for x >= 0 they order like the values), 16 bits per pass, each
    pass a 65536-bin histogram of the next 16 bits among the entries whose higher bits equal
    the digits found so far (2 passes for float32, 4 for float64)."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"kth_largest_abs: dtype {dtype}, expected float32 or float64")
    int_type, n_bits = (torch.int32, 32) if dtype == torch.float32 else (torch.int64, 64)
    prefix = 0
    for shift in range(n_bits - 16, -1, -16):
        hist = np.zeros(1 << 16, dtype=np.int64)  # numpy: single-threaded, no OpenMP overhead
        for c in chunks():
            bits = c.abs().view(int_type)
            if shift + 16 < n_bits:
                bits = bits[(bits >> (shift + 16)) == prefix]
            hist += np.bincount(((bits >> shift) & 0xFFFF).numpy(), minlength=1 << 16)
        from_top = np.cumsum(hist[::-1])  # [j] = entries whose digit is >= 65535 - j
        j = int(np.searchsorted(from_top, k))
        k -= int(from_top[j - 1]) if j else 0
        prefix = (prefix << 16) | (65535 - j)
    return float(torch.tensor([prefix], dtype=int_type).view(dtype)[0])


METHODS: dict[str, type[MergeMethod]] = {
    m.name: m for m in (ExPO, Linear, TaskArithmetic, Slerp, Ties)
}


def bind(method: MergeMethod, n_models: int) -> MergeMethod:
    """Check the model count and tell the method how many models it merges."""
    method.check(n_models)
    method._n = n_models
    return method
