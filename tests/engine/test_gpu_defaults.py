"""GPU speed defaults and their CPU invariance (nova_engine.model.build.speed_switches,
nova_engine.parallel.pipeline.ddp_overlap, train.speed), and models loaded from HF weights
built without megatron's random init.

Fast checks: the TransformerConfig / DDP fields a CUDA run gets (cuda=True), exactly today's
fields on CPU, forced keys and their one-line errors. One spawned world of two gloo ranks:
training with overlap_grad_reduce + overlap_param_gather forced on (distributed optimizer;
megatron's no_sync / grad-sync hooks, finish_grad_sync, the forward pre-hooks' parameter
all-gather) gives the losses and weights of the plain run; a model built for a checkpoint
calls no init method and ends with the same weights and log-probs as a randomly initialized
one that loads the same checkpoint.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nova_engine.config import ConfigError, SpeedConfig
from nova_engine.parallel.spawn import run_distributed

FUSIONS = ("bias_activation_fusion", "apply_rope_fusion", "masked_softmax_fusion",
           "bias_dropout_fusion", "gradient_accumulation_fusion")  # fmt: skip


def _config(cuda, **kw):
    from nova_engine.model.arch import ModelArch
    from nova_engine.model.build import transformer_config

    arch = ModelArch(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6,
                     rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False,
                     qkv_bias=False, max_position_embeddings=64)  # fmt: skip
    ps = SimpleNamespace(tp=1, pp=1, vpp=None, sp=False, on_gloo=not cuda,
                         device=torch.device("cuda" if cuda else "cpu"))  # fmt: skip
    return transformer_config(arch, ps, cuda=cuda, **kw)


def test_cpu_config_is_unchanged():
    from nova_engine.model.build import _no_init

    for init in (True, False):
        c = _config(False, init_weights=init)
        assert [getattr(c, f) for f in FUSIONS] == [False] * 5
        assert c.use_cpu_initialization and c.perform_initialization
        inits = (c.init_method, c.output_layer_init_method, c.embedding_init_method)
        assert all((f is _no_init) != init for f in inits)


def test_cuda_defaults_without_te_or_apex():
    c = _config(True)
    assert c.bias_activation_fusion and c.bias_dropout_fusion and c.masked_softmax_fusion
    # kernels that need Transformer Engine or apex stay off when those are not importable
    assert not c.apply_rope_fusion and not c.gradient_accumulation_fusion
    assert c.use_cpu_initialization and c.perform_initialization  # random init: CPU, TP-invariant
    c = _config(True, init_weights=False)  # a checkpoint follows: shards straight on the GPU
    assert not c.use_cpu_initialization and c.init_method is c.output_layer_init_method
    c = _config(True, fuse_elementwise=True)  # megatron refuses both activation paths
    assert not c.bias_activation_fusion and c.use_te_activation_func


def test_cuda_defaults_with_te_kernels(monkeypatch):
    from megatron.core.models.common.embeddings import rope_utils

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *a, **k: None)
    c = _config(True, use_te=True)
    assert [getattr(c, f) for f in FUSIONS] == [True] * 5
    c = _config(True, use_te=True, speed=SpeedConfig(apply_rope_fusion=False))
    assert not c.apply_rope_fusion and c.gradient_accumulation_fusion


def test_forced_switches_and_their_errors():
    c = _config(False, speed=SpeedConfig(bias_dropout_fusion=True, masked_softmax_fusion=True))
    assert c.bias_dropout_fusion and c.masked_softmax_fusion and not c.bias_activation_fusion
    c = _config(True, speed=SpeedConfig(bias_swiglu_fusion=False))
    assert not c.bias_activation_fusion and c.bias_dropout_fusion
    with pytest.raises(ValueError, match=r"train.speed.apply_rope_fusion=true needs Transformer"):
        _config(True, speed=SpeedConfig(apply_rope_fusion=True))
    with pytest.raises(ValueError, match=r"train.speed.gradient_accumulation_fusion=true needs"):
        _config(True, speed=SpeedConfig(gradient_accumulation_fusion=True))
    with pytest.raises(ValueError, match=r"bias_swiglu_fusion=true needs train.fuse_elementwise"):
        _config(True, fuse_elementwise=True, speed=SpeedConfig(bias_swiglu_fusion=True))
    with pytest.raises(ConfigError, match=r"overlap_grad_reduce: expected true, false or null"):
        SpeedConfig(overlap_grad_reduce="yes")  # type: ignore[arg-type]


def test_ddp_overlap_defaults():
    from nova_engine.parallel.pipeline import ddp_overlap

    assert ddp_overlap(True, True) == (True, True)
    assert ddp_overlap(True, False) == (True, False)
    assert ddp_overlap(False, True) == (False, False)
    assert ddp_overlap(True, True, SpeedConfig(overlap_param_gather=False)) == (True, False)
    assert ddp_overlap(False, False, SpeedConfig(overlap_grad_reduce=True)) == (True, False)
    with pytest.raises(ValueError, match="overlap_param_gather=true needs parallel.distributed"):
        ddp_overlap(True, False, SpeedConfig(overlap_param_gather=True))
    with pytest.raises(ValueError, match="overlap_param_gather needs overlap_grad_reduce"):
        ddp_overlap(True, True, SpeedConfig(overlap_grad_reduce=False, overlap_param_gather=True))


def test_speed_keys_from_a_recipe_override():
    from nova_engine.recipe import load_recipe

    run = load_recipe("recipes/tiny_cpu.yaml", "sft", ["train.speed.overlap_grad_reduce=false"])
    assert run.train.speed == SpeedConfig(overlap_grad_reduce=False)
    with pytest.raises(ConfigError, match="speed"):
        load_recipe("recipes/tiny_cpu.yaml", "sft", ["train.speed.overlap_everything=true"])


# ---------------------------------------------------------------- one spawned world of two


def _batches(arch, rank, step, n=3):
    from nova_engine.data.packing import PackedBatch
    from nova_engine.data.sample import Sample

    gen = torch.Generator().manual_seed(1000 * rank + step)
    out = []
    for _ in range(n):
        lens = torch.randint(3, 12, (3,), generator=gen).tolist()
        out.append(PackedBatch.from_samples([
            Sample(torch.randint(0, arch.vocab_size, (k,), generator=gen).tolist(), [1] * k)
            for k in lens
        ]))  # fmt: skip
    return out


def _train(engine, arch, ps):
    from nova_engine.model.heads import token_logprobs

    def loss_fn(m, h, mb):
        lp = token_logprobs(m, h, mb.labels, ps)
        loss = -(lp * mb.loss_mask.float()).sum() / 150.0
        return loss, torch.tensor(1), {"loss": loss.detach()}

    losses = []
    for step in range(3):
        res = engine.forward_backward(_batches(arch, ps.dp_rank, step), loss_fn)
        engine.step()
        losses.append(sum(float(r["loss"]) for r in res))
    return losses, [{k: v.clone() for k, v in c.items()} for c in engine.model_state()]


def _worker(rank, world, model_dir):
    from nova_engine.config import OptimConfig
    from nova_engine.model.arch import load_arch
    from nova_engine.model.build import build_model
    from nova_engine.model.hf_io import load_hf_weights
    from nova_engine.parallel.state import initialize_parallel
    from nova_engine.train.engine import ModelEngine

    ps = initialize_parallel(seed=3)
    arch = load_arch(model_dir)
    out: dict = {}
    runs = {}
    for key, speed in (("plain", None),
                       ("overlap", SpeedConfig(overlap_grad_reduce=True, overlap_param_gather=True))):  # fmt: skip
        eng = ModelEngine.from_hf(model_dir, ps, optim=OptimConfig(lr=1e-3, warmup_ratio=0.0),
                                  total_steps=3, distributed_optimizer=True, speed=speed)  # fmt: skip
        out[f"{key}_hooks"] = eng.models[0].ddp_config.overlap_param_gather
        runs[key] = _train(eng, arch, ps)
    out["loss_diff"] = max(abs(a - b) for a, b in zip(runs["plain"][0], runs["overlap"][0]))
    out["losses"] = runs["plain"][0]
    out["weight_diff"] = max(
        (runs["plain"][1][0][n] - runs["overlap"][1][0][n]).abs().max().item()
        for n in runs["plain"][1][0]
    )
    out["moved"] = max(
        (runs["plain"][1][0][n] - p).abs().max().item()
        for n, p in ModelEngine.from_hf(model_dir, ps, trainable=False).model_state()[0].items()
    )

    # built for a checkpoint: no random init runs (megatron's init methods draw through
    # torch.nn.init.normal_); weights, their tensor-parallel attributes (grad norm, dist
    # checkpoints read them) and hidden states as with the init
    counts = {"normal": 0}
    real_normal = torch.nn.init.normal_

    def normal(*a, **k):
        counts["normal"] += 1
        return real_normal(*a, **k)

    torch.nn.init.normal_ = normal
    try:
        (bare,) = build_model(arch, ps, init_weights=False)
        out["init_calls_bare"] = dict(counts)
        (inited,) = build_model(arch, ps)
        out["init_calls_control"] = dict(counts)
    finally:
        torch.nn.init.normal_ = real_normal
    attrs = ("tensor_model_parallel", "partition_dim", "partition_stride", "allreduce",
             "sequence_parallel")  # fmt: skip
    out["same_attrs"] = all(
        [getattr(p, a, None) for a in attrs] == [getattr(q, a, None) for a in attrs]
        for p, q in zip(bare.parameters(), inited.parameters())
    )
    out["tp_attrs"] = sum(getattr(p, "tensor_model_parallel", False) for p in bare.parameters())
    hidden = []
    for m in (bare, inited):
        load_hf_weights([m], arch, ps, model_dir)
        m.eval()
        m.return_hidden = True
        with torch.no_grad():
            ids = torch.arange(15)[None] % arch.vocab_size
            hidden.append(m(ids, torch.arange(15)[None], attention_mask=None))
    pb, pi = dict(bare.named_parameters()), dict(inited.named_parameters())
    out["same_weights"] = set(pb) == set(pi) and all(torch.equal(pb[n], pi[n]) for n in pb)
    out["same_hidden"] = torch.equal(hidden[0], hidden[1])
    return out


@pytest.mark.slow
def test_overlap_training_and_init_free_build(tmp_path):
    from nova_engine.model.tiny import build_tiny_hf_model

    build_tiny_hf_model(str(tmp_path), "llama", num_hidden_layers=2)
    for res in run_distributed(_worker, 2, str(tmp_path)):
        assert res["overlap_hooks"] and not res["plain_hooks"], res
        assert res["moved"] > 1e-4, res  # training changed the weights
        assert res["loss_diff"] < 1e-5 and res["weight_diff"] < 1e-6, res
        assert res["init_calls_bare"] == {"normal": 0}, res
        assert res["init_calls_control"]["normal"] > 0, res
        assert res["same_attrs"] and res["tp_attrs"] > 0, res
        assert res["same_weights"] and res["same_hidden"], res
