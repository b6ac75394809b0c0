"""linear_logprobs: both backends (Triton under the interpreter on CPU, chunked torch) against
the materialized float64 reference, forward and backward (log-probs and entropy), fp32 tight,
bf16/fp16 by the flash-attention rule; TP=2 (with and without sequence parallel) against TP=1
on gloo in one spawned group."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from nova_engine.parallel.spawn import run_distributed
from nova_kernels import linear_logprobs
from nova_kernels._common import poisoned
from nova_kernels._testing import assert_verbose_allclose, assert_within_torch_error
from nova_kernels._testing import linear_inputs as _inputs
from nova_kernels.ops import linear_logprobs as ll
from nova_kernels.reference import linear_logprobs_reference

BACKENDS = ["triton", "torch"]
IGNORE = -100


def _run(fn, hidden, weight, targets, g_lp, g_ent, entropy=True):
    """Outputs and (grad_hidden, grad_weight) of sum(g_lp * logp + g_ent * entropy)."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = fn(h, w, targets)
    lp, ent = out if entropy else (out, None)
    loss = (lp * g_lp.to(lp.dtype)).sum()
    if entropy:
        loss = loss + (ent * g_ent.to(ent.dtype)).sum()
    loss.backward()
    return lp.detach(), (ent.detach() if entropy else None), h.grad, w.grad


def _nova(backend, entropy=True, temperature=1.0):
    return lambda h, w, t: linear_logprobs(
        h, w, t, ignore_index=IGNORE, return_entropy=entropy, backend=backend,
        temperature=temperature,
    )  # fmt: skip


def _ref(dtype=None, entropy=True, temperature=1.0):
    return lambda h, w, t: linear_logprobs_reference(
        h, w, t, IGNORE, entropy, dtype=dtype, temperature=temperature
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(37, 72, 1000), (32, 64, 256)])
def test_fp32_matches_float64_reference(backend, shape):
    args = _inputs(*shape, torch.float32)
    got = _run(_nova(backend), *args)
    ref = _run(_ref(torch.float64), *args)
    names = ["logp", "entropy", "grad_hidden", "grad_weight"]
    for name, a, e in zip(names, got, ref):
        assert_verbose_allclose(a, e, rtol=1e-4, atol=2e-5, name=f"{backend} {name}")
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
    ignored = args[2] == IGNORE
    assert (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all()
    assert (got[2][ignored] == 0).all(), "ignored rows must get no gradient"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 0.7, 1.3])
def test_temperature_matches_float64_reference(backend, temperature, device):
    """log_softmax(z / T): log-probs, entropy and both grads against the float64 reference
    (odd shape), and against T = 1 to show the temperature is not a no-op."""
    args = _inputs(37, 72, 301, torch.float32, seed=int(temperature * 10))
    on_dev = [x.to(device) for x in args]
    got = [x.cpu() for x in _run(_nova(backend, temperature=temperature), *on_dev)]
    ref = _run(_ref(torch.float64, temperature=temperature), *args)
    untempered = _run(_ref(torch.float64), *args)
    names = ["logp", "entropy", "grad_hidden", "grad_weight"]
    for name, a, e, u in zip(names, got, ref, untempered):
        assert_verbose_allclose(
            a, e, rtol=1e-4, atol=2e-5, name=f"{backend} T={temperature} {name}"
        )
        assert (e - u).abs().max() > 1e-2, f"{name}: T={temperature} changes nothing?"
    # one row by hand: log of softmax(z / T) at the target
    z = (args[0][0].double() @ args[1].double().T) / temperature
    p = torch.softmax(z, -1)
    if args[2][0] != IGNORE:
        want = torch.log(p[args[2][0]])
        assert abs(got[0][0].item() - want.item()) < 1e-4


def test_temperature_one_is_the_untempered_op():
    """T = 1 goes through the same arithmetic as before (x * 1.0 is exact): bit-identical."""
    args = _inputs(19, 24, 130, torch.float32, seed=5)
    for backend in BACKENDS:
        a = _run(_nova(backend, temperature=1.0), *args)
        b = _run(_nova(backend), *args)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    with pytest.raises(ValueError, match="temperature=0"):
        linear_logprobs(args[0], args[1], args[2], temperature=0.0)


@pytest.mark.slow  # three float64 / bf16 / fp16 runs per case
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_torch_error(backend, dtype):
    args = _inputs(37, 72, 1000, dtype, seed=1)
    got = _run(_nova(backend), *args)
    same = _run(_ref(None), *args)  # plain PyTorch in the input dtype
    ref = _run(_ref(torch.float64), *args)
    names = ["logp", "entropy", "grad_hidden", "grad_weight"]
    for name, k, t, r in zip(names, got, same, ref):
        assert k.dtype == t.dtype, f"{name}: dtype {k.dtype} != {t.dtype}"
        assert_within_torch_error(k, t, r, name=f"{backend} {dtype} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_chunks(backend, monkeypatch):
    """A tiny workspace forces several vocab chunks and row chunks (and the fp32 accumulation
    of grad_weight over row chunks)."""
    monkeypatch.setattr(ll, "_WORKSPACE_ELEMS", 40 * 128)
    monkeypatch.setattr(ll, "_MIN_VCHUNK", 128)
    budget = ll._budget(torch.device("cpu"))
    assert ll._chunks(37, 1000, budget) == (37, 138) and ll._chunks(64, 1000, budget) == (40, 128)
    args = _inputs(64, 40, 1000, torch.float32, seed=2)
    got = _run(_nova(backend), *args)
    ref = _run(_ref(torch.float64), *args)
    for name, a, e in zip(["logp", "entropy", "grad_hidden", "grad_weight"], got, ref):
        assert_verbose_allclose(a, e, rtol=1e-4, atol=2e-5, name=f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_logp_only_and_entropy_only_grads(backend):
    hidden, weight, targets, g_lp, g_ent = _inputs(37, 72, 1000, torch.float32, seed=3)
    got = _run(_nova(backend, entropy=False), hidden, weight, targets, g_lp, g_ent, entropy=False)
    ref = _run(_ref(torch.float64, False), hidden, weight, targets, g_lp, g_ent, entropy=False)
    for name, i in [("logp", 0), ("grad_hidden", 2), ("grad_weight", 3)]:
        assert_verbose_allclose(got[i], ref[i], rtol=1e-4, atol=2e-5, name=f"logp-only {name}")
    # entropy alone (logp unused: its upstream grad is None), weight frozen
    h = hidden.clone().requires_grad_()
    _, ent = linear_logprobs(h, weight, targets, return_entropy=True, backend=backend)
    (ent * g_ent).sum().backward()
    h64 = hidden.double().requires_grad_()
    _, ent64 = linear_logprobs_reference(h64, weight.double(), targets, return_entropy=True)
    (ent64 * g_ent.double()).sum().backward()
    assert_verbose_allclose(h.grad, h64.grad, rtol=1e-4, atol=2e-5, name="entropy-only grad")


def test_entropy_value_by_hand():
    """Two tokens, vocab 3, H=1 (weight = logits): entropy and logp from the definition."""
    hidden = torch.tensor([[1.0], [2.0]])
    weight = torch.tensor([[0.5], [-1.0], [2.0]])
    targets = torch.tensor([2, 0])
    for backend in BACKENDS:
        lp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
        for i in range(2):
            z = [hidden[i, 0].item() * w for w in (0.5, -1.0, 2.0)]
            zs = sum(torch.tensor(z).exp().tolist())
            p = [torch.tensor(x).exp().item() / zs for x in z]
            want_ent = -sum(q * torch.tensor(q).log().item() for q in p)
            assert abs(lp[i].item() - torch.tensor(p[targets[i]]).log().item()) < 1e-5
            assert abs(ent[i].item() - want_ent) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_logit", [47.0, 100.0, 195.0])
def test_entropy_at_large_logits_within_torch_error(backend, max_logit):
    """Entropy at max logit 47-195 within 2x plain torch's fp32 error (log_softmax) against
    float64. One-hot hidden rows make every logit exact in fp32, so the comparison isolates
    the entropy formula: (m + log s) - (m + a/s) cancelled to 5-8x torch's error here."""
    n, h, v = 37, 72, 1000
    g = torch.Generator().manual_seed(int(max_logit))
    hidden = torch.nn.functional.one_hot(torch.randint(0, h, (n,), generator=g), h).float()
    weight = max_logit - torch.empty(v, h).uniform_(3.0, 30.0, generator=g)
    weight[torch.randint(0, v, (h,), generator=g), torch.arange(h)] = max_logit
    targets = torch.randint(0, v, (n,), generator=g)
    _, ent = linear_logprobs(
        hidden, weight, targets, ignore_index=IGNORE, return_entropy=True, backend=backend
    )
    _, ent64 = linear_logprobs_reference(hidden, weight, targets, IGNORE, True, torch.float64)
    _, ent32 = linear_logprobs_reference(hidden, weight, targets, IGNORE, True, torch.float32)
    err = (ent.double() - ent64).abs().max().item()
    err_torch = (ent32.double() - ent64).abs().max().item()
    assert 0 < err_torch and err <= 2 * err_torch, (err, err_torch)


def test_input_errors():
    h, w = torch.randn(4, 8), torch.randn(16, 8)
    with pytest.raises(ValueError, match="targets has 3 rows"):
        linear_logprobs(h, w, torch.zeros(3, dtype=torch.long), backend="torch")
    with pytest.raises(ValueError, match="hidden H=8 != weight H=4"):
        linear_logprobs(h, torch.randn(16, 4), torch.zeros(4, dtype=torch.long), backend="torch")
    with pytest.raises(ValueError, match="backend="):
        linear_logprobs(h, w, torch.zeros(4, dtype=torch.long), backend="cuda")


# ----------------------------------------------------------------------------- TP = 2 on gloo

N_TP, H_TP, V_TP = 38, 72, 1000  # N even: sequence parallel splits it 19 + 19
# the TP combine and the SP gather / reduce-scatter are shared by both backends: Triton (slow
# under the interpreter) runs with SP only
# (and one tempered run: the TP combine of the statistics of z / T)
TP_CONFIGS = [
    ("torch", False, 1.0),
    ("torch", True, 1.0),
    ("triton", True, 1.0),
    ("torch", False, 0.7),
]


def _tp_worker(rank, world):
    with poisoned():
        return _tp_runs(rank, world)


def _tp_runs(rank, world):
    hidden, weight, targets, g_lp, g_ent = _inputs(N_TP, H_TP, V_TP, torch.float32, seed=7)
    vp = V_TP // world
    # targets on both shards (checked by the parent), a few ignored rows
    out = {"targets": targets}
    group = dist.group.WORLD
    for backend, sp, temp in TP_CONFIGS:
        h = hidden.clone()
        if sp:
            h = h[rank * (N_TP // world) : (rank + 1) * (N_TP // world)]
        h = h.requires_grad_()
        w = weight[rank * vp : (rank + 1) * vp].clone().requires_grad_()
        lp, ent = linear_logprobs(
            h,
            w,
            targets,
            tp_group=group,
            return_entropy=True,
            sequence_parallel=sp,
            backend=backend,
            temperature=temp,
        )
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        out[(backend, sp, temp)] = (lp.detach(), ent.detach(), h.grad, w.grad)
    return out


@pytest.fixture(scope="module")
def tp_results():
    return run_distributed(_tp_worker, 2)


@pytest.mark.slow  # spawned process group
def test_tp2_equals_tp1(tp_results):
    hidden, weight, targets, g_lp, g_ent = _inputs(N_TP, H_TP, V_TP, torch.float32, seed=7)
    valid = targets[targets != IGNORE]
    assert (valid < V_TP // 2).any() and (valid >= V_TP // 2).any(), "targets on both shards"
    vp, ns = V_TP // 2, N_TP // 2
    for backend, sp, temp in TP_CONFIGS:
        one = _nova("torch", temperature=temp)
        lp1, ent1, gh1, gw1 = _run(one, hidden, weight, targets, g_lp, g_ent)
        for rank, res in enumerate(tp_results):
            lp, ent, gh, gw = res[(backend, sp, temp)]
            tag = f"{backend} sp={sp} T={temp} rank {rank}"
            assert_verbose_allclose(lp, lp1, rtol=1e-5, atol=1e-5, name=f"{tag} logp")
            assert_verbose_allclose(ent, ent1, rtol=1e-5, atol=1e-5, name=f"{tag} entropy")
            gh_want = gh1[rank * ns : (rank + 1) * ns] if sp else gh1
            assert_verbose_allclose(gh, gh_want, rtol=1e-5, atol=1e-5, name=f"{tag} dh")
            gw_want = gw1[rank * vp : (rank + 1) * vp]
            assert_verbose_allclose(gw, gw_want, rtol=1e-5, atol=1e-5, name=f"{tag} dW")


@pytest.mark.slow  # numerical Jacobian through 6 chunks
def test_float64_gradcheck_torch_path(monkeypatch):
    """fp64 runs the torch path in fp64: gradcheck of logp and entropy through several chunks
    (the Triton path is fp32 inside: asking it for fp64 is an error, never a silent switch)."""
    monkeypatch.setattr(ll, "_WORKSPACE_ELEMS", 3 * 4)
    monkeypatch.setattr(ll, "_MIN_VCHUNK", 4)
    hidden, weight, targets, _, _ = _inputs(6, 5, 11, torch.float64, seed=4, n_ignored=1)
    assert ll._chunks(6, 11, ll._budget(torch.device("cpu"))) == (3, 4)  # 2 x 3 chunks
    fn = lambda h, w: linear_logprobs(h, w, targets, return_entropy=True, backend="torch")
    out = fn(hidden, weight)
    assert out[0].dtype == torch.float64 and out[1].dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (hidden.requires_grad_(), weight.requires_grad_()))
    with pytest.raises(ValueError, match="fp64 inputs run on the torch backend only"):
        linear_logprobs(hidden, weight, targets, backend="triton")
    # the default backend picks the torch path for fp64
    torch.testing.assert_close(linear_logprobs(hidden, weight, targets), out[0], rtol=0, atol=0)
