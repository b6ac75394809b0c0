"""TIES with task vectors that cancel exactly: the elected sign of a zero sum is + (mergekit's
`sign_weight >= 0`), so the positive task vectors' disjoint mean is applied; an entry every
task vector trimmed to 0 stays the base. Against a float64 reference written out per entry."""

from __future__ import annotations

import torch

from nova_engine.tools.merge import Ties
from nova_engine.tools.merge.methods import bind


def _merge(method: Ties, tensors: list[torch.Tensor]) -> torch.Tensor:
    bind(method, len(tensors))
    state = method.prepare(tensors[0].numel(), lambda i, s, e: tensors[i][s:e].clone(), 7)
    return method.combine(lambda i: tensors[i].clone(), state)


def _reference(base, taus, weights, lam):
    """Per entry: elect + when sum_i w_i tau_i >= 0, else -; mean of the agreeing w_i tau_i."""
    out = base.double().clone()
    for j in range(base.numel()):
        wt = [w * float(t[j]) for t, w in zip(taus, weights)]
        elected = 1.0 if sum(wt) >= 0 else -1.0
        agree = [(x, w) for x, w in zip(wt, weights) if x != 0 and (x > 0) == (elected > 0)]
        if agree:
            out[j] += lam * sum(x for x, _ in agree) / sum(w for _, w in agree)
    return out


def test_cancelling_task_vectors_elect_plus():
    g = torch.Generator().manual_seed(3)
    n = 37

    def dyadic():  # m - base is exact in float64, so m1 - base and m2 - base cancel exactly
        return torch.randint(-64, 65, (n,), generator=g).double() / 16

    base, a, b = dyadic(), dyadic(), dyadic()
    a[a == 0] = 0.25
    # m1 = base + a, m2 = base - a: every entry cancels; m3 adds b on the odd entries only
    taus = [a, -a, torch.where(torch.arange(n) % 2 == 1, b, torch.zeros(n, dtype=torch.float64))]
    models = [base] + [base + t for t in taus]
    got = _merge(Ties(density=1.0), models[:3])
    want = base + a.abs()  # the positive side of each cancelling pair
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert not torch.equal(got, base)
    got3 = _merge(Ties(density=1.0, weights=[1.0, 1.0, 0.5], lam=0.7), models)
    want3 = _reference(base, [m - base for m in models[1:]], [1.0, 1.0, 0.5], 0.7)
    torch.testing.assert_close(got3, want3, rtol=1e-12, atol=1e-12)


def test_all_trimmed_entries_stay_base_and_trim_plus_tie():
    """density 0.3: most entries of each task vector trimmed to 0 (the sum there is 0, + is
    elected, nobody agrees: base); the kept entries follow the reference."""
    g = torch.Generator().manual_seed(5)
    n = 40
    base = torch.randn(n, generator=g, dtype=torch.float64)
    t1 = torch.randn(n, generator=g, dtype=torch.float64)
    models = [base, base + t1, base - t1, base + 0.5 * torch.randn(n, generator=g).double()]
    method = Ties(density=0.3)
    got = _merge(method, models)
    k = int(0.3 * n + 0.5)
    taus = []
    for m in models[1:]:
        t = m - base
        thr = torch.topk(t.abs(), k).values[-1]
        taus.append(t * (t.abs() >= thr))
    want = _reference(base, taus, [1.0, 1.0, 1.0], 1.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    untouched = torch.stack([t == 0 for t in taus]).all(0)
    assert untouched.any() and torch.equal(got[untouched], base[untouched])
