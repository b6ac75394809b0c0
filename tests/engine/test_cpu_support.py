"""Each CPU-support patch is needed: with it removed, the megatron call it covers fails;
with it applied, the call works and gives the right numbers; the tensor-method patches act
only inside the megatron calls they cover (a stray `.cuda()` still fails). One 2-rank gloo
group."""

from __future__ import annotations

import pytest
import torch

from nova_engine.parallel import cpu_support
from nova_engine.parallel.spawn import run_distributed

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only patches")


def _outcome(fn):
    try:
        return ("ok", fn())
    except Exception as e:  # noqa: BLE001 - the test inspects which error
        return ("error", f"{type(e).__name__}: {e}")


def _checks(tmp_dir):
    """name -> callable exercising the megatron path that the patch covers."""
    from megatron.core import tensor_parallel
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.optimizer import clip_grads

    from nova_engine.model.arch import load_arch
    from nova_engine.model.build import build_model
    from nova_engine.parallel.pipeline import forward_backward
    from nova_engine.parallel.state import ParallelState

    def current_device():
        emb = RotaryEmbedding(kv_channels=16, rotary_percent=1.0)
        return emb(8).shape  # [8, 1, 1, 16]

    def rng():
        tensor_parallel.model_parallel_cuda_manual_seed(7)
        before = torch.get_rng_state()
        with tensor_parallel.get_cuda_rng_tracker().fork():
            a = torch.rand(4)
        untouched = torch.equal(torch.get_rng_state(), before)
        tensor_parallel.model_parallel_cuda_manual_seed(7)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            b = torch.rand(4)
        return torch.equal(a, b), untouched

    def cuda_literals():
        p = torch.nn.Parameter(torch.zeros(6))
        p.grad = torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0, 0.0])
        zeros = clip_grads.count_zeros_fp32([p], torch.distributed.group.WORLD)
        return float(zeros)

    def float_tensor_type():
        p = torch.nn.Parameter(torch.zeros(3))
        p.grad = torch.tensor([3.0, 0.0, 4.0])
        clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=5.0)
        return p.grad.tolist()

    def multi_tensor_l2norm():
        # the optimizer's grad norm (L2 over all grads, summed over the group's 2 ranks)
        grads = [torch.tensor([3.0, 0.0]), torch.tensor([4.0])]
        return float(clip_grads.get_grad_norm_fp32(grads, 2, torch.distributed.group.WORLD))

    def tensor_cuda_and_schedules(ps: ParallelState):
        # tied embeddings at PP2: megatron syncs the last stage's copy with `.cuda()`;
        # the no-pipelining / 1F1B schedules allocate `device="cuda"` token counters
        arch = load_arch(tmp_dir)
        chunks = build_model(arch, ps)
        ids = torch.arange(8).unsqueeze(0)
        pos = torch.arange(8).unsqueeze(0)

        def step(model, _):
            out = model(ids, pos, attention_mask=None)
            return out, lambda o: (o.float().sum() * 0, torch.tensor(1), {"ok": 1})

        return forward_backward(chunks, ps, [0], step, seq_length=8, forward_only=True)

    return (
        current_device,
        rng,
        cuda_literals,
        float_tensor_type,
        multi_tensor_l2norm,
        tensor_cuda_and_schedules,
    )


def _worker(rank, world, tmp_dir):
    from nova_engine.parallel.state import initialize_parallel

    ps = initialize_parallel(tp=1, pp=2)
    (
        current_device,
        rng,
        cuda_literals,
        float_tensor_type,
        multi_tensor_l2norm,
        tensor_cuda_and_sched,
    ) = _checks(tmp_dir)
    out = {}
    for name, fn in [
        ("current_device", current_device),
        ("rng", rng),
        ("cuda_literals", cuda_literals),
        ("float_tensor_type", float_tensor_type),
        ("multi_tensor_l2norm", multi_tensor_l2norm),
    ]:
        with cpu_support.without_patch(name):
            out[(name, "without")] = _outcome(fn)
        out[(name, "with")] = _outcome(fn)
    for name in ("tensor_cuda", "cuda_literals"):
        with cpu_support.without_patch(name):
            out[(name + "+pp", "without")] = _outcome(lambda: tensor_cuda_and_sched(ps))
    out[("pp", "with")] = _outcome(lambda: tensor_cuda_and_sched(ps))
    out["applied"] = cpu_support.applied()
    # outside the wrapped megatron calls the tensor methods are torch's own
    out["stray_cuda"] = _outcome(lambda: torch.zeros(2).cuda())
    out["plain_type"] = (torch.zeros(2).type(), torch.zeros(2).bfloat16().type())
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from nova_engine.model.tiny import build_tiny_hf_model

    d = str(tmp_path_factory.mktemp("tied"))
    build_tiny_hf_model(d, "qwen2", num_hidden_layers=2)
    return run_distributed(_worker, 2, d)


@pytest.mark.slow  # the spawned 2-rank group
def test_all_patches_applied(results):
    assert sorted(results[0]["applied"]) == sorted(cpu_support.PATCHES)


@pytest.mark.parametrize(
    "name",
    [
        "current_device",
        "rng",
        "cuda_literals",
        "float_tensor_type",
        "multi_tensor_l2norm",
        "tensor_cuda+pp",
    ],
)
@pytest.mark.slow  # the spawned 2-rank group
def test_fails_without_patch(results, name):
    status, msg = results[0][(name, "without")]
    assert status == "error", f"{name}: still works without its patch: {msg}"


@pytest.mark.slow  # the spawned 2-rank group
def test_current_device_with_patch(results):
    assert results[0][("current_device", "with")] == ("ok", torch.Size([8, 1, 1, 16]))


@pytest.mark.slow  # the spawned 2-rank group
def test_rng_tracker_with_patch(results):
    status, (reproducible, default_untouched) = results[0][("rng", "with")]
    assert status == "ok" and reproducible and default_untouched


@pytest.mark.slow  # the spawned 2-rank group
def test_cuda_literals_with_patch(results):
    # 4 zeros per rank, summed over the 2 ranks of the group
    assert results[0][("cuda_literals", "with")] == ("ok", 8.0)


@pytest.mark.slow  # the spawned 2-rank group
def test_float_tensor_type_with_patch(results):
    status, grad = results[0][("float_tensor_type", "with")]
    assert status == "ok"
    assert grad == pytest.approx([3.0 / 5.0, 0.0, 4.0 / 5.0], rel=1e-5)


@pytest.mark.slow  # the spawned 2-rank group
def test_multi_tensor_l2norm_with_patch(results):
    # sqrt(2 ranks * (3^2 + 4^2)), formula by hand
    status, norm = results[0][("multi_tensor_l2norm", "with")]
    assert status == "ok"
    assert norm == pytest.approx(50.0**0.5, rel=1e-6)


@pytest.mark.slow  # the spawned 2-rank group
def test_schedules_and_tied_pp_with_patch(results):
    assert results[0][("cuda_literals+pp", "without")][0] == "error"
    status, _ = results[0][("pp", "with")]
    assert status == "ok"
    # the last stage returned its loss-func metrics through the 1F1B schedule
    assert results[1][("pp", "with")][1] == [{"ok": 1}]


@pytest.mark.slow  # the spawned 2-rank group
def test_tensor_patches_are_scoped(results):
    status, msg = results[0]["stray_cuda"]
    assert status == "error", f"a stray .cuda() outside megatron's calls was hidden: {msg}"
    assert results[0]["plain_type"] == ("torch.FloatTensor", "torch.BFloat16Tensor")


def test_no_op_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_support.apply_cpu_support() == []


def test_unknown_patch_name():
    with pytest.raises(ValueError, match="unknown CPU patch"):
        cpu_support.apply_cpu_support(exclude=("nope",))
