"""RLVR at a sampling temperature T (issue #33) and its policy-loss options:

- the sampler's log-probs / entropies and the RL training forward's (nova_engine.rl.losses.prepass, the
  path the stage runs: old log-probs, entropy, the mismatch metric) are of the same
  distribution log_softmax(z / T): equal to fp32 rounding at T in {0.5, 0.7, 1.3} at TP1,
  TP2 and PP2 (one spawned group of 2 gloo ranks), while the untempered forward is far off;
- the policy loss's gradient (PolicyLoss at T, KL k3 in the loss) equals a float64 reference
  of TRL's tempered GRPO loss written out from log_softmax(logits / T);
- loss.mask_truncated and loss.zero_variance_groups ("drop") against hand-computed masks and
  normalizers; adv_eps in grpo's (r - mean) / (std + eps) by hand; their config errors;
- score / value heads on bf16 weights and hidden: fp32-level accuracy against float64.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from nova_engine.parallel.spawn import run_distributed

TEMPS = (0.5, 0.7, 1.3)
LAYOUTS = [(1, 1), (2, 1), (1, 2)]  # (tp, pp) in a world of 2
PROMPT_LENS = [5, 9, 3]


def _ps1():
    """A one-process stand-in of ParallelState for the single-rank tests."""
    return types.SimpleNamespace(tp=1, pp=1, dp=1, sp=False, tp_group=None, dp_group=None,
                                 dp_rank=0, device=torch.device("cpu"))  # fmt: skip


def _responses(prompts, gens, *, finished=None, zero_var=None, entropies=False):
    from nova_engine.rl.producer import Response
    from nova_engine.rl.rollouts import Generation

    out = []
    for j, group in enumerate(gens):
        for g in group:
            k = len(out)
            lp = g.entropies if entropies else g.logprobs
            fin = g.finish_reason == "stop" if finished is None else finished[k]
            out.append(Response(np.asarray(prompts[j]), Generation(g.tokens, lp, fin), 1.0, 0.5,
                                j, "x", 0.0, "wrong", bool(zero_var and zero_var[k])))  # fmt: skip
    return out


# ------------------------------------------------------------------------------ the group


def _layout_run(model_dir, prompts, tp, pp):
    from nova_engine.generate import Request, SamplingParams
    from nova_engine.losses.policy import PolicyLossConfig
    from nova_engine.model.arch import load_arch
    from nova_engine.parallel.state import destroy_parallel, initialize_parallel
    from nova_engine.rl.losses import prepass
    from nova_engine.rl.minibatch import pack_share
    from nova_engine.train.engine import ModelEngine

    ps = initialize_parallel(tp=tp, pp=pp, seed=3)
    eng = ModelEngine(load_arch(model_dir), ps, weights_dir=model_dir, trainable=False)
    out = {}
    for temp in TEMPS:
        params = SamplingParams(temperature=temp, n=2, seed=11, max_new_tokens=6,
                                return_entropy=True)  # fmt: skip
        gens = eng.generate([Request(p, index=j) for j, p in enumerate(prompts)], params)
        mbs = pack_share(_responses(prompts, gens), ps, capacity=64)
        ents = pack_share(_responses(prompts, gens, entropies=True), ps, capacity=64)
        cfg = PolicyLossConfig()
        sums = prepass(mbs, eng, None, None, ps, cfg, temperature=temp)
        m = torch.cat([mb.loss_mask for mb in mbs]) != 0
        if sums:  # the last stage
            old = torch.cat([mb.data["old_logprobs"] for mb in mbs])[m]
            ent = torch.cat([mb.data["entropy"] for mb in mbs])[m]
        prepass(mbs, eng, None, None, ps, cfg)  # the untempered forward (T = 1), every rank
        if not sums:
            continue
        gen_lp = torch.cat([mb.rb.gen_logprobs for mb in mbs])[m]
        gen_ent = torch.cat([mb.rb.gen_logprobs for mb in ents])[m]
        mismatch = sum(float(s["logprob_abs_diff"]) for s in sums) / float(m.sum())
        plain = torch.cat([mb.data["old_logprobs"] for mb in mbs])[m]
        out[temp] = {
            "n": int(m.sum()),
            "lp_err": (old - gen_lp).abs().max().item(),
            "ent_err": (ent - gen_ent).abs().max().item(),
            "mismatch": mismatch,
            "plain_err": (plain - gen_lp).abs().max().item(),
        }
    destroy_parallel()
    return out


def _worker(rank, world, model_dir, prompts):
    return {layout: _layout_run(model_dir, prompts, *layout) for layout in LAYOUTS}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from nova_engine.model.tiny import build_tiny_hf_model

    d = str(tmp_path_factory.mktemp("rlvr_temp") / "llama")
    build_tiny_hf_model(d, "llama", seed=3)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(6, 1000, (n,), generator=g).tolist() for n in PROMPT_LENS]
    return run_distributed(_worker, 2, d, prompts)


@pytest.mark.slow  # spawned process group
@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_logprobs_equal_the_samplers_at_temperature(runs, layout):
    last = [r[layout] for r in runs if r[layout]]
    assert last, f"{layout}: no last-stage result"
    for res in last:
        for temp in TEMPS:
            r = res[temp]
            tag = f"tp,pp={layout} T={temp}"
            assert r["n"] >= 12, tag
            assert r["lp_err"] <= 1e-5, f"{tag}: log-prob {r['lp_err']:.3g}"
            assert r["ent_err"] <= 1e-5, f"{tag}: entropy {r['ent_err']:.3g}"
            assert r["mismatch"] <= 1e-6, f"{tag}: mismatch metric {r['mismatch']:.3g}"
            # the untempered forward is another distribution: the check above can fail
            assert r["plain_err"] > 1e-2, f"{tag}: T changes nothing? {r['plain_err']:.3g}"


# ------------------------------------------------------------------------------ policy loss


class _Head(torch.nn.Module):
    """What token_logprobs reads of a model chunk: its LM-head shard."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def lm_head_weight(self) -> torch.Tensor:
        return self.w


def _rl_batch(seed=0, finished=None, zero_var=None):
    """One packed RL micro-batch of 5 random responses (sampler log-probs included)."""
    from nova_engine.generate.sampling import Generation as Gen
    from nova_engine.rl.minibatch import pack_share

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 50, (n,), generator=g).tolist() for n in (4, 7)]
    lens = [[3, 6, 1], [5, 2]]
    gens = [[Gen(j, i, torch.randint(0, 50, (n,), generator=g).tolist(),
                 torch.randn(n, generator=g).tolist(), None, "stop")
             for i, n in enumerate(ls)] for j, ls in enumerate(lens)]  # fmt: skip
    rs = _responses(prompts, gens, finished=finished, zero_var=zero_var)
    kw = {"mask_truncated": finished is not None, "drop_zero_var": zero_var is not None}
    (mb,) = pack_share(rs, _ps1(), capacity=64, **kw)
    return mb, rs


def _tempered_trl_loss(h, w, mb, temp, mask, beta, clip):
    """TRL's GRPO per-token loss written out in float64 from log_softmax(logits / T):
    -min(r A, clip(r) A) + beta * k3, token mean over the mask ("dapo")."""
    lab = mb.labels.clamp_min(0)
    logp = torch.log_softmax((h.reshape(-1, h.shape[-1]) @ w.T) / temp, -1)
    logp = logp.gather(1, lab[:, None])[:, 0]
    d = mb.data
    ratio = torch.exp(logp - d["old_logprobs"].double())
    adv = d["advantages"].double()
    pg = -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    delta = d["ref_logprobs"].double() - logp
    kl = torch.exp(delta) - delta - 1
    m = mask.double()
    return ((pg + beta * kl) * m).sum() / m.sum()


@pytest.mark.parametrize("temp", TEMPS)
@pytest.mark.parametrize("drop", [False, True])
def test_policy_loss_gradient_equals_trl_tempered_float64(temp, drop):
    from nova_engine.losses.policy import PolicyLossConfig
    from nova_engine.rl.losses import PolicyLoss

    zv = [True, True, True, False, False] if drop else None
    mb, _ = _rl_batch(seed=int(temp * 10), zero_var=zv)
    T, H, V = mb.num_tokens, 24, 50
    g = torch.Generator().manual_seed(1)
    h32, w32 = torch.randn(T, 1, H, generator=g), torch.randn(V, H, generator=g) / H**0.25
    with torch.no_grad():
        z = torch.log_softmax((h32[:, 0].double() @ w32.double().T) / temp, -1)
        lp0 = z.gather(1, mb.labels.clamp_min(0)[:, None])[:, 0].float()
    mask = mb.loss_mask
    mb.data["old_logprobs"] = (lp0 + 0.3 * torch.randn(T, generator=g)) * mask
    mb.data["ref_logprobs"] = (lp0 + 0.2 * torch.randn(T, generator=g)) * mask
    mb.data["advantages"] = torch.randn(T, generator=g) * mask
    beta, clip = 0.05, 0.2
    cfg = PolicyLossConfig(clip_low=clip, dual_clip=None, kl_coef=beta, kl_type="k3")
    pl = PolicyLoss(cfg, _ps1(), temperature=temp)
    norms = {k: torch.tensor(v) for k, v in pl.counts([mb]).items()}
    model, h = _Head(w32.clone()), h32.clone().requires_grad_()
    loss, n, _ = pl.loss_fn(norms)(model, h, mb)
    loss.backward()
    h64, w64 = h32.double().requires_grad_(), w32.double().requires_grad_()
    want_mask = mb.policy_mask
    if drop:  # hand-computed: only the two responses of prompt 1 remain (5 + 2 tokens)
        assert float(want_mask.sum()) == 7 and norms["tokens"] == 7 and norms["seqs"] == 2
        assert int(n) == 7
    ref = _tempered_trl_loss(h64, w64, mb, temp, want_mask, beta, clip)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
    # at T = 1 the loss is another one: the temperature reaches the gradient
    ref1 = _tempered_trl_loss(h32.double(), w32.double(), mb, 1.0, want_mask, beta, clip)
    assert abs(ref1.item() - ref.item()) > 1e-3


# ------------------------------------------------------------------------------ options


def test_mask_truncated_and_zero_variance_masks_by_hand():
    from nova_engine.rl.minibatch import policy_keep

    fin = [True, False, True, True, False]
    mb, rs = _rl_batch(finished=fin)
    # response lengths 3, 6, 1 | 5, 2; truncated: #1 (6 tokens) and #4 (2 tokens)
    assert float(mb.loss_mask.sum()) == 17 and float(mb.policy_mask.sum()) == 17 - 6 - 2
    assert mb.policy_seqs == 3 and mb.num_samples == 5
    # the masked positions are exactly the truncated responses' tokens
    seq = mb.seq_index.clamp_min(0)
    row = mb.rb.rows[seq]
    dropped = (mb.loss_mask != 0) & torch.isin(row, torch.tensor([1, 4]))
    assert torch.equal(mb.policy_mask != 0, (mb.loss_mask != 0) & ~dropped)
    zv = [False, False, False, True, True]
    assert policy_keep(rs) is None
    assert policy_keep(rs, drop_zero_var=True, mask_truncated=False) == [True] * 5  # flags unset
    for r, z in zip(rs, zv):
        r.zero_var = z
    keep_both = policy_keep(rs, mask_truncated=True, drop_zero_var=True)
    assert keep_both == [True, False, True, False, False]
    assert policy_keep(rs, drop_zero_var=True) == [True, True, True, False, False]


def test_zero_variance_flags_and_adv_eps_by_hand():
    from nova_engine.data.rlvr import RLVRPrompt
    from nova_engine.rl.producer import gather_responses
    from nova_engine.rl.rollouts import Generation
    from nova_engine.rl.verifiers import RewardConfig, VerifierResult

    prompts = [(j, RLVRPrompt(np.arange(3) + j, "x", "arith", j, "ds")) for j in range(2)]
    gens = [[Generation(np.array([1, 2]), None, True)] * 2 for _ in range(2)]
    res = [[VerifierResult(1.0, "correct"), VerifierResult(0.0, "wrong")],
           [VerifierResult(1.0, "correct"), VerifierResult(1.0, "correct")]]  # fmt: skip
    eps = 0.5
    sr = gather_responses(0, prompts, gens, res, num_groups=2, reward=RewardConfig(10.0, 0.0),
                          estimator="grpo", ps=_ps1(), eps=eps)  # fmt: skip
    assert [r.zero_var for r in sr.responses] == [False, False, True, True]
    assert sr.degenerate_groups == 1
    std = (2 * 5.0**2) ** 0.5  # rewards 10, 0: mean 5, unbiased std sqrt(50)
    want = [5.0 / (std + eps), -5.0 / (std + eps), 0.0, 0.0]
    assert np.allclose([r.advantage for r in sr.responses], want, rtol=1e-6, atol=1e-7)


def test_option_config_errors_name_the_key():
    from nova_engine.config import ConfigError
    from nova_engine.rl.config import RLVRLossSection, RolloutSection

    assert RLVRLossSection().zero_variance_groups == "keep"
    assert RLVRLossSection().mask_truncated is False
    with pytest.raises(ConfigError, match="zero_variance_groups"):
        RLVRLossSection(zero_variance_groups="ignore")
    with pytest.raises(ConfigError, match="zero_variance_groups.*group estimator"):
        RLVRLossSection(advantage="gae", zero_variance_groups="drop")
    with pytest.raises(ConfigError, match="adv_eps"):
        RLVRLossSection(adv_eps=-1.0)
    with pytest.raises(ConfigError, match="eval_samples"):
        RolloutSection(eval_samples=-1)


# ------------------------------------------------------------------------------ fp32 heads


def test_score_and_value_heads_are_fp32_accurate_from_bf16():
    """bf16 weights / hidden: values and scores within fp32 rounding of float64 (the old
    bf16 product was off by ~bf16's 2^-8 relative: 0.06 at 10)."""
    from nova_engine.model.heads import ScoreHead, matmul_fp32
    from nova_engine.rl.losses import token_values

    g = torch.Generator().manual_seed(0)
    T, H = 37, 72
    hidden = (torch.randn(T, 1, H, generator=g) * 3).bfloat16()
    head = ScoreHead(H, 3, dtype=torch.bfloat16, init_seed=1)
    with torch.no_grad():  # values near 10: where bf16 rounding is 0.06
        head.weight.mul_(6.0)
    cu = torch.tensor([0, 10, 25, 37], dtype=torch.int32)
    ps = _ps1()
    want = hidden[:, 0].double() @ head.weight.double().t()
    got = head(hidden, cu, 3, ps)
    assert got.dtype == torch.float32
    err = (got.double() - want[cu[1:].long() - 1]).abs().max().item()
    assert err <= 1e-5 * max(1.0, want.abs().max().item()), err
    model = types.SimpleNamespace(score=head)
    v = token_values(model, hidden, ps)
    assert v.dtype == torch.float32 and v.shape == (T,)
    assert (v.double() - want[:, 0]).abs().max().item() <= 1e-5 * want.abs().max().item()
    bf16_err = ((hidden[:, 0] @ head.weight[:1].t()).double()[:, 0] - want[:, 0]).abs().max()
    assert bf16_err > 100 * (v.double() - want[:, 0]).abs().max()  # the test can fail
    # gradients still reach the bf16 operands
    x = hidden[:, 0].clone().requires_grad_()
    matmul_fp32(x, head.weight).sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


def test_decode_logits_fp32_from_a_bf16_head(monkeypatch):
    """The decode step's logits from a bf16 head and bf16 hidden: fp32 values (not rounded to
    bf16), equal to the float64 product to fp32 accuracy, also when the head is upcast in
    several row slices (the CPU path: no fp32-output bf16 GEMM on CPU)."""
    from nova_engine.generate import decode

    g = torch.Generator().manual_seed(2)
    h = (torch.randn(5, 72, generator=g) * 2).bfloat16()
    w = torch.randn(301, 72, generator=g).bfloat16()
    want = h.double() @ w.double().t()
    monkeypatch.setattr(decode, "_UPCAST_ELEMS", 72 * 50)  # 7 slices of <= 50 rows
    got = decode._Decoder._logits(types.SimpleNamespace(w_VpH=w), h)
    assert got.dtype == torch.float32 and got.shape == (5, 301)
    err = (got.double() - want).abs().max().item()
    assert err <= 1e-5 * want.abs().max().item(), err
    bf16_err = ((h @ w.t()).double() - want).abs().max().item()
    assert bf16_err > 100 * err
    assert not decode._mm_out_fp32_ok(h, w)  # CPU tensors: the sliced upcast ran


def test_eval_reports_sampled_accuracy_at_t_next_to_greedy():
    """eval_fn: greedy verified fraction from the greedy params, verified_at_t = the mean
    verified fraction of the k samples per prompt drawn with the sampled params."""
    from nova_engine.data.rlvr import RLVRPrompt
    from nova_engine.generate import SamplingParams
    from nova_engine.rl.evaluate import eval_fn
    from nova_engine.rl.rollouts import Generation
    from nova_engine.rl.verifiers import RewardConfig, VerifierResult

    prompts = [RLVRPrompt(np.arange(3), "x", "ds_a" if j < 2 else "ds_b", j, "s") for j in range(3)]
    hits = {0.0: [[1], [0], [1]], 0.7: [[1, 0, 0, 0], [1, 1, 0, 1], [0, 0, 0, 0]]}
    seen = []

    def producer(step, mine, params):
        seen.append((step, [k for k, _ in mine], params.temperature, params.n))
        rows = [hits[params.temperature][k] for k, _ in mine]
        gens = [[Generation(np.array([1]), None, True) for _ in r] for r in rows]
        res = [[VerifierResult(float(x), "correct" if x else "wrong") for x in r] for r in rows]
        return gens, res, {}

    greedy = SamplingParams(temperature=0.0)
    at_t = SamplingParams(temperature=0.7, n=4, seed=3)
    out = eval_fn(producer, prompts, _ps1(), RewardConfig(10.0, 0.0), greedy, at_t)()
    assert seen == [(-1, [0, 1, 2], 0.0, 1), (-1, [0, 1, 2], 0.7, 4)]
    assert out["verified"] == pytest.approx(2 / 3) and out["reward_mean"] == pytest.approx(20 / 3)
    assert out["verified_at_t"] == pytest.approx(4 / 12)
    assert out["verified_at_t/ds_a"] == pytest.approx(4 / 8) and out["verified_at_t/ds_b"] == 0.0
    only_greedy = eval_fn(producer, prompts, _ps1(), RewardConfig(10.0, 0.0), greedy)()
    assert "verified_at_t" not in only_greedy
