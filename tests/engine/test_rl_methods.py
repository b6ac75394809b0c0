"""The RL methods of issue #26 item 2 against float64 references of their papers' formulas:

- GSPO (Zheng et al. 2025; policy loss "gspo"): the sequence-level ratio
  s_i = exp(mean_t (logp - old)), loss = -1/G sum_i min(s_i A_i, clip(s_i) A_i), forward and
  gradient w.r.t. the log-probs, packed [N] and padded [B, T], both backends, with the
  GSPO-token variant for per-token advantages; under forbid_host_sync with the host facts;
- CISPO (MiniMax-M1; policy loss "cispo"): -sum_t sg(clip(r_t)) A_t logp_t / tokens (+ TIS, KL);
- DAPO overlong reward shaping (`overlong_penalty`) against the paper's piecewise formula;
- DAPO dynamic sampling (`dynamic_sampling`, `PromptSource.refill_prompts`): all-equal groups
  dropped, the batch refilled in (round, group) order from seeded extra prompt draws with
  fresh sampling keys, bounded by max rounds, counted in metrics;
- their config errors name the recipe key.
Through the RLVR stage at TP1xDP2, TP2 and PP2 against the single-rank run (the spawned
group): tests/engine/test_rl_invariants.py.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from nova_kernels.reference import cispo_loss_reference, gspo_loss_reference

BACKENDS = ("torch", "triton")


def _packed(seed: int, lens=(7, 1, 12, 5), prompt=(3, 1, 4, 2), pad: int = 3):
    """Packed [N] log-probs / old / advantages / mask of len(lens) sequences (prompt tokens
    masked out, a padding segment at the end), float64; A constant per sequence."""
    g = torch.Generator().manual_seed(seed)
    cu, mask, adv = [0], [], []
    for n, p in zip(lens, prompt):
        cu.append(cu[-1] + n)
        mask += [0.0] * min(p, n - 1) + [1.0] * (n - min(p, n - 1))
        adv += [float(torch.randn((), generator=g))] * n
    cu.append(cu[-1] + pad)
    mask += [0.0] * pad
    adv += [0.0] * pad
    N = cu[-1]
    lp = -torch.rand(N, generator=g, dtype=torch.float64) * 4 - 0.5
    old = lp + 0.15 * torch.randn(N, generator=g, dtype=torch.float64)
    rows = [list(range(a, b)) for a, b in zip(cu[:-1], cu[1:])]
    m = torch.tensor(mask, dtype=torch.float64)
    return lp, old, torch.tensor(adv, dtype=torch.float64), m, cu, rows


def _cfg(name, **kw):
    from nova_engine.losses.policy import PolicyLossConfig

    agg = {"gspo": "seq-mean-token-mean", "cispo": "token-mean"}[name]
    return PolicyLossConfig(name=name, agg=agg, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_gspo_equals_sequence_ratio_formula_float64(backend, seed):
    from nova_engine.losses.policy import compute_policy_loss

    lp, old, adv, m, cu, rows = _packed(seed)
    cfg = _cfg("gspo", clip_low=0.05, clip_high=0.08, dual_clip=None)
    dt = torch.float64 if backend == "torch" else torch.float32
    x = lp.detach().clone().to(dt).requires_grad_()
    cu_t = torch.tensor(cu, dtype=torch.int32)
    loss, met = compute_policy_loss(cfg, x, old.to(dt), adv.to(dt), m.to(dt), cu_seqlens=cu_t,
                                    cu_seqlens_host=cu, backend=backend)  # fmt: skip
    loss.backward()
    x64 = lp.clone().requires_grad_()
    ref = gspo_loss_reference(x64, old, adv, m, rows, clip_low=0.05, clip_high=0.08)
    ref.backward()
    tol = 1e-8 if backend == "torch" else 2e-6  # torch: verl's 1 / (len + 1e-8) per row
    assert abs(loss.item() - ref.item()) <= tol * max(1.0, abs(ref.item())), (loss, ref)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol * 10, atol=tol)
    # some sequence ratios are clipped, some not: both branches of the min are exercised
    s = torch.stack(
        [torch.exp(sum(lp[i] - old[i] for i in r if m[i]) / sum(m[r])) for r in rows[:-1]]
    )
    outside = ((s < 0.95) | (s > 1.08)).sum().item()
    assert 0 < outside < len(s), s
    assert met["pg_clipfrac"].item() >= 0
    # the token ratio (ppo) is another loss: the test can tell them apart
    lpp = lp.clone().requires_grad_()
    ppo, _ = compute_policy_loss(_cfg_ppo(), lpp, old, adv, m, cu_seqlens=cu_t, backend="torch")
    assert abs(ppo.item() - ref.item()) > 1e-4


def _cfg_ppo():
    from nova_engine.losses.policy import PolicyLossConfig

    return PolicyLossConfig(
        clip_low=0.03, clip_high=0.04, dual_clip=None, agg="seq-mean-token-mean"
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_gspo_token_variant_with_per_token_advantages_and_kl(backend):
    from nova_engine.losses.policy import compute_policy_loss

    lp, old, _, m, cu, rows = _packed(5, lens=(9, 6, 13), prompt=(2, 5, 3), pad=0)
    g = torch.Generator().manual_seed(9)
    adv = torch.randn(lp.numel(), generator=g, dtype=torch.float64)
    ref_lp = lp + 0.1 * torch.randn(lp.numel(), generator=g, dtype=torch.float64)
    cfg = _cfg("gspo", clip_low=0.05, clip_high=0.1, kl_coef=0.1, kl_type="k3",
               kl_value_clamp=None)  # fmt: skip
    dt = torch.float64 if backend == "torch" else torch.float32
    x = lp.detach().clone().to(dt).requires_grad_()
    loss, met = compute_policy_loss(cfg, x, old.to(dt), adv.to(dt), m.to(dt), ref_logprobs=ref_lp.to(dt),
                                    cu_seqlens=torch.tensor(cu), backend=backend)  # fmt: skip
    loss.backward()
    x64 = lp.clone().requires_grad_()
    ref = gspo_loss_reference(x64, old, adv, m, rows, clip_low=0.05, clip_high=0.1,
                              token_level=True, ref_logprobs=ref_lp, kl_coef=0.1)  # fmt: skip
    ref.backward()
    tol = 1e-8 if backend == "torch" else 2e-6  # torch: verl's 1 / (len + 1e-8) per row
    assert abs(loss.item() - ref.item()) <= tol * max(1.0, abs(ref.item()))
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol * 10, atol=tol)
    assert "kl_loss" in met


def test_gspo_padded_rows_and_sequence_equals_token_form():
    """[B, T] rows: same as the packed layout; with A constant per response the GSPO-token
    reference equals the sequence-level one (value and gradient)."""
    from nova_engine.losses.policy import compute_policy_loss

    lp, old, adv, m, cu, rows = _packed(3, lens=(6, 6, 6), prompt=(1, 3, 2), pad=0)
    cfg = _cfg("gspo", clip_low=0.05, clip_high=0.05)
    x = lp.view(3, 6).clone().requires_grad_()
    loss, _ = compute_policy_loss(cfg, x, old.view(3, 6), adv.view(3, 6), m.view(3, 6),
                                  backend="torch")  # fmt: skip
    loss.backward()
    a64, b64 = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    seq = gspo_loss_reference(a64, old, adv, m, rows, clip_low=0.05)
    tok = gspo_loss_reference(b64, old, adv, m, rows, clip_low=0.05, token_level=True)
    seq.backward()
    tok.backward()
    assert abs(seq.item() - tok.item()) < 1e-12 and abs(loss.item() - seq.item()) < 1e-8
    torch.testing.assert_close(a64.grad, b64.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad.reshape(-1), a64.grad, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tis_kl", [False, True])
def test_cispo_equals_minimax_formula_float64(backend, tis_kl):
    from nova_engine.losses.policy import compute_policy_loss

    lp, old, _, m, cu, _ = _packed(7, lens=(11, 4, 8, 3), prompt=(2, 1, 3, 1), pad=2)
    g = torch.Generator().manual_seed(11)
    N = lp.numel()
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    old = lp + 0.4 * torch.randn(N, generator=g, dtype=torch.float64)  # many weights clipped
    extra = {}
    if tis_kl:
        extra = dict(rollout_logprobs=old + 0.3 * torch.randn(N, generator=g, dtype=torch.float64),
                     ref_logprobs=lp + 0.2 * torch.randn(N, generator=g, dtype=torch.float64))  # fmt: skip
    kl = dict(kl_coef=0.05, kl_value_clamp=None) if tis_kl else {}
    cfg = _cfg("cispo", clip_low=0.9, clip_high=0.25, tis_cap=1.5, **kl)
    dt = torch.float64 if backend == "torch" else torch.float32
    x = lp.detach().clone().to(dt).requires_grad_()
    loss, met = compute_policy_loss(cfg, x, old.to(dt), adv.to(dt), m.to(dt),
                                    **{k: v.to(dt) for k, v in extra.items()},
                                    cu_seqlens=torch.tensor(cu), cu_seqlens_host=cu,
                                    num_tokens=float(m.sum()), backend=backend)  # fmt: skip
    loss.backward()
    x64 = lp.clone().requires_grad_()
    ref = cispo_loss_reference(x64, old, adv, m, clip_low=0.9, clip_high=0.25, tis_cap=1.5,
                               kl_coef=0.05 if tis_kl else 0.0, **extra)  # fmt: skip
    ref.backward()
    tol = 1e-10 if backend == "torch" else 2e-6
    assert abs(loss.item() - ref.item()) <= tol * max(1.0, abs(ref.item()))
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol * 10, atol=tol)
    r = torch.exp(lp - old)[m != 0]
    frac = ((r > 1.25) | (r < 0.1)).double().mean().item()
    assert 0 < frac < 1 and abs(met["pg_clipfrac"].item() - frac) < 1e-6
    # clipped tokens keep their gradient (CISPO's point): no masked-token gradient is zero
    assert (x.grad[m != 0] != 0).all() and (x.grad[m == 0] == 0).all()


def test_gspo_and_cispo_read_nothing_on_the_host():
    from nova_engine.losses.policy import compute_policy_loss
    from nova_kernels._sync import HostSyncError, forbid_host_sync

    lp, old, adv, m, cu, _ = _packed(2)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    f = [t.float() for t in (lp, old, adv, m)]
    n_tok = float(m.sum())
    for name in ("gspo", "cispo"):
        x = f[0].clone().requires_grad_()
        with forbid_host_sync():
            loss, _ = compute_policy_loss(_cfg(name), x, *f[1:], cu_seqlens=cu_t,
                                          cu_seqlens_host=cu, num_tokens=n_tok,
                                          num_seqs=4.0, backend="triton")  # fmt: skip
            loss.backward()
        assert torch.isfinite(x.grad).all()
    with pytest.raises(HostSyncError), forbid_host_sync():  # without the host facts: caught
        compute_policy_loss(_cfg("gspo"), f[0], *f[1:], cu_seqlens=cu_t, backend="triton")


def test_policy_loss_config_errors_name_the_key():
    from nova_engine.config import ConfigError
    from nova_engine.rl.config import RLVRLossSection

    with pytest.raises(ConfigError, match="agg.*seq-mean-token-mean"):
        RLVRLossSection(policy_loss="gspo")
    with pytest.raises(ConfigError, match="agg.*token-mean"):
        RLVRLossSection(policy_loss="cispo", agg="seq-mean-token-sum")
    with pytest.raises(ConfigError, match="tis"):
        RLVRLossSection(policy_loss="gspo", agg="seq-mean-token-mean", tis=True)
    RLVRLossSection(policy_loss="gspo", agg="seq-mean-token-mean")
    RLVRLossSection(policy_loss="cispo", tis=True)


# ------------------------------------------------------------------------------ DAPO


def _dapo_length_reward(n: int, l_max: int, l_cache: int) -> float:
    """DAPO eq. 13 written out."""
    if n <= l_max - l_cache:
        return 0.0
    if n <= l_max:
        return ((l_max - l_cache) - n) / l_cache
    return -1.0


def test_overlong_penalty_equals_dapo_formula():
    from nova_engine.rl.rollouts import overlong_penalty

    rng = np.random.default_rng(0)
    for _ in range(200):
        l_max = int(rng.integers(1, 60))
        l_cache = int(rng.integers(1, l_max + 1))
        n = int(rng.integers(0, l_max + 5))
        f = float(rng.uniform(0.1, 3))
        want = f * _dapo_length_reward(n, l_max, l_cache)
        assert overlong_penalty(n, l_max, l_cache, f) == pytest.approx(want, abs=1e-12)
    assert overlong_penalty(16, 20, 4) == 0.0 and overlong_penalty(20, 20, 4) == -1.0
    assert overlong_penalty(18, 20, 4) == -0.5 and overlong_penalty(21, 20, 4) == -1.0
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(3, 10, 11)


def _ps1():
    return types.SimpleNamespace(tp=1, pp=1, dp=1, sp=False, tp_group=None, dp_group=None,
                                 dp_rank=0, device=torch.device("cpu"))  # fmt: skip


def _gather(first_key, rewards_by_group, lens=None, overlong=None):
    """gather_responses on groups with the given verifier scores (reward 10 * score)."""
    from nova_engine.data.rlvr import RLVRPrompt
    from nova_engine.rl.producer import gather_responses
    from nova_engine.rl.rollouts import Generation
    from nova_engine.rl.verifiers import RewardConfig, VerifierResult

    P = len(rewards_by_group)
    prompts = [
        (first_key + j, RLVRPrompt(np.arange(3) + j, "x", "arith", j, "ds")) for j in range(P)
    ]
    lens = lens or [[2] * len(s) for s in rewards_by_group]
    gens = [[Generation(np.arange(n) + 6, None, True) for n in ls] for ls in lens]
    res = [
        [VerifierResult(float(x), "correct" if x else "wrong") for x in s] for s in rewards_by_group
    ]
    return gather_responses(0, prompts, gens, res, num_groups=P, reward=RewardConfig(10.0, 0.0),
                            estimator="grpo", ps=_ps1(), overlong=overlong)  # fmt: skip


def test_overlong_shaping_is_added_to_the_shaped_reward():
    sr = _gather(0, [[1, 0, 1]], lens=[[3, 9, 10]], overlong=(10, 4, 2.0))
    want = [10.0 + 0.0, 0.0 + 2.0 * (6 - 9) / 4, 10.0 - 2.0]
    assert [r.reward for r in sr.responses] == pytest.approx(want)


def test_dynamic_sampling_drops_equal_groups_and_refills_in_order():
    from nova_engine.rl.producer import dynamic_sampling

    first = _gather(0, [[1, 1], [1, 0], [0, 0], [0, 1]])  # groups 1, 3 informative
    rounds = {
        1: _gather(100, [[0, 0], [1, 1], [1, 0], [0, 0]]),  # group 2
        2: _gather(200, [[1, 0], [0, 1], [1, 1], [0, 1]]),
    }  # 0, 1, 3: only one needed
    calls = []

    def more(r):
        calls.append(r)
        return rounds[r]

    sr, every, met = dynamic_sampling(first, more, target=4, max_rounds=5)
    assert calls == [1, 2] and len(every) == 24
    assert sorted({r.group for r in sr.responses}) == [1, 3, 4 + 2, 8 + 0]
    assert all(not r.zero_var for r in sr.responses) and len(sr.responses) == 8
    assert met == {"dynamic_sampling/rounds": 3.0, "dynamic_sampling/groups_kept": 4.0,
                   "dynamic_sampling/groups_dropped": 8.0, "dynamic_sampling/groups_short": 0.0}  # fmt: skip
    # advantages unchanged by the selection (group-local statistics)
    keep = [r for r in first.responses if r.group in (1, 3)]
    assert [r.advantage for r in sr.responses[:4]] == [r.advantage for r in keep]
    # max_rounds bounds the refill: a short step trains on what it has, counted
    calls.clear()
    sr, _, met = dynamic_sampling(first, more, target=4, max_rounds=2)
    assert calls == [1] and met["dynamic_sampling/groups_short"] == 1.0
    assert met["dynamic_sampling/groups_kept"] == 3.0 and len(sr.responses) == 6
    sr, _, met = dynamic_sampling(first, more, target=2, max_rounds=3)  # enough: no refill
    assert met["dynamic_sampling/rounds"] == 1.0 and len(sr.responses) == 4


def test_refill_prompts_are_seeded_fresh_keys():
    from nova_engine.data.rlvr import RLVRPrompt
    from nova_engine.rl.producer import PromptSource

    prompts = [RLVRPrompt(np.arange(3) + j, "x", "arith", j, "ds") for j in range(10)]

    def src(seed):
        return PromptSource(prompts, prompts_per_step=4, total_steps=5, seed=seed)

    a, b = src(1), src(1)
    ra, rb = a.refill_prompts(2, 1), b.refill_prompts(2, 1)
    assert [k for k, _ in ra.items] == [k for k, _ in rb.items]
    assert [p.index for _, p in ra.items] == [p.index for _, p in rb.items]
    assert len({p.index for _, p in ra.items}) == 4  # without replacement
    main = {k for s in range(5) for k, _ in a.step_prompts(s).items}
    keys = {k for r in (1, 2) for s in range(5) for k, _ in a.refill_prompts(s, r).items}
    assert not main & keys and len(keys) == 2 * 5 * 4
    assert [p.index for _, p in a.refill_prompts(2, 2).items] != [p.index for _, p in ra.items] \
        or [p.index for _, p in a.refill_prompts(3, 1).items] != [p.index for _, p in ra.items]  # fmt: skip
    assert a.position == 0  # the stream does not move


def test_dapo_config_errors_name_the_key():
    from nova_engine.config import ConfigError
    from nova_engine.rl.config import RolloutSection

    with pytest.raises(ConfigError, match="overlong_buffer"):
        RolloutSection(max_new_tokens=8, overlong_buffer=9)
    with pytest.raises(ConfigError, match="overlong_penalty"):
        RolloutSection(overlong_buffer=4, overlong_penalty=-1.0)
    with pytest.raises(ConfigError, match="dynamic_sampling"):
        RolloutSection(samples_per_prompt=1, dynamic_sampling=True)
    with pytest.raises(ConfigError, match="max_sampling_rounds"):
        RolloutSection(max_sampling_rounds=0)
    assert RolloutSection(max_new_tokens=8, overlong_buffer=8).overlong == (8, 8, 1.0)
