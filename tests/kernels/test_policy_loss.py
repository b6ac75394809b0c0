"""Policy loss (PPO clip, dual clip, TIS, KL term, aggregation modes): Triton (interpreter on
CPU) and torch paths, forward, metrics and gradients, against a reference written one token
at a time in float64 (its gradients come from autograd). The KL estimators on their own
(kl_divergence, kl_penalty) are tested in test_kl.py."""

from __future__ import annotations

import pytest
import torch

from nova_kernels import policy_loss
from nova_kernels._sync import HostSyncError, forbid_host_sync
from nova_kernels._testing import assert_verbose_allclose
from nova_kernels.reference import policy_loss_reference

BACKENDS = ["triton", "torch"]
AGGS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


# --- inputs -------------------------------------------------------------------------------


def make_inputs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(shape, generator=g, dtype=torch.float64) * 3
    lp = old + 0.4 * torch.randn(shape, generator=g, dtype=torch.float64)
    adv = torch.randn(shape, generator=g, dtype=torch.float64)
    rl = old + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    ref = lp + 1.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    far = torch.rand(shape, generator=g) < 0.05  # |ref - lp| > 20: log-ratio clamp
    ref = torch.where(far, lp + 25 * torch.sign(torch.randn(shape, generator=g)), ref)
    mask = torch.rand(shape, generator=g) > 0.3
    if len(shape) == 2:
        lens = torch.randint(0, shape[1] + 1, (shape[0],), generator=g)
        mask &= torch.arange(shape[1])[None, :] < lens[:, None]
        mask[1] = False  # an empty row
        mask[0, : shape[1] // 2] = True
    return lp, old, adv, mask, rl, ref


def padded_rows(B, T):
    return [list(range(b * T, (b + 1) * T)) for b in range(B)]


FULL = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, tis_cap=2.0, kl_coef=0.1, kl_type="k3")


def run_and_compare(
    backend,
    inputs,
    rows,
    cfg,
    cu=None,
    lp_dtype=torch.float32,
    tol=1e-5,
    device="cpu",
    host_facts=False,
):
    lp64, old, adv, mask, rl, ref = inputs
    kw = dict(cfg)
    kw["rollout_logprobs"] = rl.float().to(device) if rl is not None else None
    kw["ref_logprobs"] = ref.float().to(device) if ref is not None else None
    lp = lp64.to(device=device, dtype=lp_dtype).requires_grad_(True)
    dcu = cu.to(device) if cu is not None else None
    args = (old.float().to(device), adv.float().to(device), mask.to(device))
    if host_facts:  # the packer's cu_seqlens_host: fwd + bwd read nothing back to the host
        kw["cu_seqlens_host"] = cu.tolist()
        with forbid_host_sync():
            loss, metrics = policy_loss(lp, *args, cu_seqlens=dcu, backend=backend, **kw)
            loss.backward()
    else:
        loss, metrics = policy_loss(lp, *args, cu_seqlens=dcu, backend=backend, **kw)
        loss.backward()
    loss, lp_grad = loss.detach().cpu(), lp.grad.cpu()
    metrics = {k: v.cpu() if torch.is_tensor(v) else v for k, v in metrics.items()}
    # the reference sees the very values the kernel saw
    lp_ref = lp.detach().cpu().double().requires_grad_(True)
    r_old, r_adv = old.float().double(), adv.float().double()
    r_rl = rl.float().double() if rl is not None else None
    r_ref = ref.float().double() if ref is not None else None
    ref_loss, ref_metrics = policy_loss_reference(
        lp_ref, r_old, r_adv, mask, rows, **cfg, rollout_logprobs=r_rl, ref_logprobs=r_ref
    )
    ref_loss.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_verbose_allclose(loss, ref_loss, rtol=tol, atol=tol, name="loss")
    assert lp_grad.dtype == lp_dtype
    gtol = max(tol, 1e-2 if lp_dtype == torch.bfloat16 else tol)
    assert_verbose_allclose(lp_grad, lp_ref.grad, rtol=gtol, atol=gtol, name="grad logprobs")
    for k, v in ref_metrics.items():
        if k == "kl_loss" and ref is None:
            continue
        assert abs(float(metrics[k]) - v) <= 1e-5 * (1 + abs(v)), (k, float(metrics[k]), v)
    assert_verbose_allclose(
        metrics["pg_loss"],
        loss - cfg.get("kl_coef", 0.0) * metrics.get("kl_loss", 0.0),
        rtol=1e-6,
        atol=1e-6,
        name="pg_loss",
    )


# --- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_policy_loss_full(backend, agg, device):
    B, T = 7, 53
    inputs = make_inputs((B, T), seed=AGGS.index(agg))
    cfg = dict(FULL, agg=agg, loss_scale_factor=40.0 if agg.endswith("norm") else None)
    run_and_compare(backend, inputs, padded_rows(B, T), cfg, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_policy_loss_kl_types_and_clamps(backend, kl_type, device):
    B, T = 4, 32
    lp, old, adv, mask, rl, ref = make_inputs((B, T), seed=10)
    ref = lp + 4.0 * torch.randn(B, T, dtype=torch.float64)  # k2/k3 values past 10
    cfg = dict(clip_low=0.2, kl_coef=0.5, kl_type=kl_type, agg="token-mean", tis_cap=None)
    run_and_compare(backend, (lp, old, adv, mask, None, ref), padded_rows(B, T), cfg, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_plain_ppo(backend, device):
    """No dual clip, no IS weights, no KL; asymmetric clip (clip-higher)."""
    B, T = 5, 21
    lp, old, adv, mask, _, _ = make_inputs((B, T), seed=4)
    cfg = dict(clip_low=0.1, clip_high=0.3, dual_clip=None, agg="seq-mean-token-mean")
    inputs = (lp, old, adv, mask, None, None)
    run_and_compare(backend, inputs, padded_rows(B, T), cfg, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_global_normalizers(backend, device):
    B, T = 3, 17
    inputs = make_inputs((B, T), seed=6)
    for agg, extra in (
        ("token-mean", {"num_tokens": 100.0}),
        ("seq-mean-token-sum", {"num_seqs": 8.0}),
    ):
        cfg = dict(FULL, agg=agg, **extra)
        run_and_compare(backend, inputs, padded_rows(B, T), cfg, device=device)


@pytest.mark.parametrize("host_facts", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_policy_loss_packed(backend, agg, host_facts, device):
    lens = [5, 0, 17, 70, 1]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    inputs = make_inputs((int(cu[-1]),), seed=8)
    rows = [list(range(int(cu[i]), int(cu[i + 1]))) for i in range(len(lens))]
    cfg = dict(FULL, agg=agg, loss_scale_factor=70.0 if agg.endswith("norm") else None)
    run_and_compare(backend, inputs, rows, cfg, cu=cu, device=device, host_facts=host_facts)


def test_policy_loss_packed_reads_back_without_host_facts(device):
    """Without cu_seqlens_host the packed loss reads cu_seqlens back (the guard sees it)."""
    cu = torch.tensor([0, 5, 9], dtype=torch.int32, device=device)
    lp, old, adv, mask, _, _ = (t.float().to(device) for t in make_inputs((9,), seed=2))
    for backend in BACKENDS:
        with pytest.raises(HostSyncError), forbid_host_sync():
            policy_loss(lp, old, adv, mask, cu_seqlens=cu, backend=backend)
    with pytest.raises(ValueError, match="cu_seqlens_host"):
        policy_loss(lp, old, adv, mask, cu_seqlens=cu, cu_seqlens_host=[0, 9])


def test_policy_loss_bf16_logprobs_triton(device):
    B, T = 3, 40
    inputs = make_inputs((B, T), seed=12)
    cfg = dict(FULL, agg="token-mean")
    run_and_compare(
        "triton", inputs, padded_rows(B, T), cfg, lp_dtype=torch.bfloat16, device=device
    )


def test_policy_loss_torch_gradcheck_float64():
    lp, old, adv, mask, rl, ref = make_inputs((3, 6), seed=2)
    mask[0] = True

    def f(x):
        return policy_loss(
            x,
            old,
            adv,
            mask,
            rollout_logprobs=rl,
            ref_logprobs=ref,
            kl_coef=0.2,
            agg="seq-mean-token-mean",
            backend="torch",
            **{"clip_high": 0.3},
        )[0]

    assert torch.autograd.gradcheck(f, (lp.clone().requires_grad_(True),))


def test_policy_loss_formula_by_hand(device):
    """Four tokens: clipped high, dual-clipped, unclipped negative, clipped low."""
    old = torch.zeros(1, 4)
    ratio = torch.tensor([[1.5, 5.0, 2.0, 0.5]])
    adv = torch.tensor([[1.0, -1.0, -1.0, -2.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    expected_loss = torch.tensor([-1.2, 3.0, 2.0, 2 * 0.8])  # -A*clip, -A*c, -A*r, -A*(1-eps)
    expected_grad = torch.tensor([0.0, 0.0, 2.0, 0.0]) / 4  # d(-A r)/dlp = -A r, token-mean
    old, adv, mask = old.to(device), adv.to(device), mask.to(device)
    for backend in BACKENDS:
        lp = ratio.log().to(device).requires_grad_(True)
        loss, m = policy_loss(lp, old, adv, mask, clip_low=0.2, backend=backend)
        loss.backward()
        assert abs(float(loss.detach()) - float(expected_loss.mean())) < 1e-6
        assert_verbose_allclose(lp.grad[0].cpu(), expected_grad, rtol=1e-6, atol=1e-6)
        assert float(m["pg_clipfrac"]) == pytest.approx(0.5)  # tokens 0 and 3
        assert float(m["pg_clipfrac_lower"]) == pytest.approx(0.25)  # token 1


def test_policy_loss_rejects_bad_config():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="agg"):
        policy_loss(x, x, x, x, agg="mean")
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(x, x, x, x, dual_clip=0.5)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(x, x, torch.zeros(2, 4), x)
