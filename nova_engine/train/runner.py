"""Run plumbing shared by the stages: layout validation and process groups, model build,
the policy engine with its optimizer and schedule, the loop, resume, the training run with
periodic eval/save, final export.

`stages.sft.run(run)` and `stages.dpo.run(run)` call these.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from nova_engine.logging import get_logger
from nova_engine.parallel.spawn import free_port
from nova_engine.parallel.state import ParallelState, initialize_parallel
from nova_engine.train import checkpoint_io
from nova_engine.train.checkpoint import load_checkpoint, save_checkpoint
from nova_engine.train.data_source import PackedDataSource
from nova_engine.train.engine import ModelEngine
from nova_engine.train.loop import Loop

logger = get_logger(__name__)


def ensure_process_group_env() -> None:
    """Single-process use (`nova`, the demo): torchrun's variables for a world of one."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def setup_parallel(run) -> ParallelState:
    """Process group + megatron groups for `run.parallel`, after the whole layout has been
    validated against the world and the model's dimensions (before any group exists)."""
    ensure_process_group_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    run.validate_layout(world)
    p = run.parallel
    return initialize_parallel(
        tp=p.tp, pp=p.pp, vpp=p.vpp if p.vpp > 1 else None, sp=p.sp, seed=run.train.seed
    )


def ensure_model(run, ps: ParallelState) -> None:
    """Build the recipe's tiny random model at model.hf_path when it is absent (rank 0)."""
    cfg = run.model
    if cfg.build is not None and ps.rank == 0:
        if not os.path.isfile(os.path.join(cfg.hf_path, "config.json")):
            from nova_engine.data.tokenize import load_tokenizer
            from nova_engine.model.tiny import build_tiny_hf_model

            vocab = len(load_tokenizer(cfg.tokenizer_dir))
            b = cfg.build
            build_tiny_hf_model(
                cfg.hf_path, b.family, b.init_seed, vocab_size=vocab, **b.hf_config_kwargs()
            )
            logger.info("built a random %s model at %s", b.family, cfg.hf_path)
    if ps.world_size > 1:
        dist.barrier()


def engine_for_run(run, ps: ParallelState, total_steps: int) -> ModelEngine:
    """The policy engine of a stage's run config: its model, optimizer, precision, layout."""
    t = run.train
    return ModelEngine.from_hf(
        run.model.hf_path, ps, name="policy", optim=run.optim, total_steps=total_steps,
        precision=t.precision, recompute=t.recompute,
        distributed_optimizer=run.parallel.distributed_optimizer,
    )  # fmt: skip


def data_source(run, ps: ParallelState, data, *, train: bool) -> PackedDataSource:
    """The run's packed data source over `data`: seeded, shuffled epochs for training; one
    ordered pass for evaluation and reference passes."""
    t = run.train
    kw: dict[str, Any] = dict(shuffle=False)
    if train:
        kw = dict(
            seed=run.data.seed, shuffle=run.data.shuffle, epochs=t.epochs, max_steps=t.max_steps
        )
    return PackedDataSource(
        data, global_batch_size=t.global_batch_size, micro_batch_tokens=t.micro_batch_tokens,
        ps=ps, **kw,
    )  # fmt: skip


def loop_for_run(run, ps: ParallelState, data: PackedDataSource) -> Loop:
    """A loop with the run's policy engine over `data`."""
    return Loop({"policy": engine_for_run(run, ps, data.total_steps)}, data)


def make_trainer(
    arch,
    ps: ParallelState,
    *,
    weights_dir: str | None = None,
    optim: Any = None,
    total_steps: int = 1,
    precision: str = "fp32",
    recompute: str = "none",
    distributed_optimizer: bool = False,
) -> Loop:
    """A one-engine loop without a data source (benchmarks: `loop.train_step(stage, mbs)`);
    weights from the HF directory `weights_dir`, or megatron's random init when None."""
    engine = ModelEngine(
        arch, ps, weights_dir=weights_dir, optim=optim, total_steps=total_steps,
        precision=precision, recompute=recompute, distributed_optimizer=distributed_optimizer,
    )  # fmt: skip
    return Loop(engine)


def eval_over(loop: Loop, stage, source: PackedDataSource) -> Callable[[], dict[str, float]]:
    """An eval_fn for Loop.fit: the stage's metrics over every step of `source`."""
    return lambda: loop.evaluate(
        stage, [source.rank_microbatches(s) for s in range(source.total_steps)], stage.engine
    )


def resume_path(run) -> str | None:
    """The checkpoint to resume from per `checkpoint.resume` ("auto", "none" or a path)."""
    r = run.checkpoint.resume
    if r == "none":
        return None
    if r == "auto":
        return checkpoint_io.latest_complete(run.checkpoint_dir)
    return r


def mfu_inputs(arch, ps: ParallelState, batcher: PackedDataSource):
    """(flops per token, summed peak FLOP/s of the world) on known GPUs, else (None, None)."""
    import torch

    from nova_engine.data.sample import PairSample
    from nova_engine.train.metrics import effective_seq_len, flops_per_token, peak_flops_for

    if not torch.cuda.is_available():
        return None, None
    peak = peak_flops_for(torch.cuda.get_device_name())
    if peak is None:
        return None, None
    seqs = batcher.samples[:10000]
    if seqs and isinstance(seqs[0], PairSample):
        seqs = [h for p in seqs for h in (p.chosen, p.rejected)]
    n_params = arch.num_params - arch.vocab_size * arch.hidden_size  # no embedding lookup
    if arch.tie_word_embeddings:
        n_params += arch.vocab_size * arch.hidden_size  # the LM head matmul still counts
    seq = effective_seq_len([len(s) for s in seqs])
    return flops_per_token(n_params, arch.num_layers, arch.hidden_size, seq), peak * ps.world_size


def train_stage(
    run, loop: Loop, stage, eval_fn: Callable[[], dict[str, float]] | None = None
) -> list[dict[str, float]]:
    """Resume if asked, train to the end with periodic eval/save, save, export the policy to
    <out_dir>/hf. Returns the per-step metrics of this process's run."""
    from nova_engine.train.metrics import MetricsLogger

    policy = loop.engine(stage.engine)
    ps, root = policy.ps, run.checkpoint_dir
    if ps.rank == 0:
        checkpoint_io.cleanup_stale(root)
    path = resume_path(run)
    if path is not None:
        load_checkpoint(path, loop)

    def save(step: int) -> None:
        save_checkpoint(
            root, loop, config_hash=run.hash(), hf=run.checkpoint.hf_in_checkpoints,
            keep_last=run.checkpoint.keep_last,
        )  # fmt: skip

    t = run.train
    fpt, peak = mfu_inputs(policy.arch, ps, loop.data)
    with MetricsLogger(
        t.out_dir,
        total_steps=loop.data.total_steps,
        stage=stage.name,
        tensorboard=t.tensorboard,
        start_step=loop.step,
    ) as m:
        out = loop.fit(
            stage,
            metrics_logger=m,
            log_every=t.log_every,
            eval_every=t.eval_every,
            eval_fn=eval_fn,
            save_every=t.save_every,
            save_fn=save,
            flops_per_token=fpt,
            peak_flops=peak,
        )
        if eval_fn is not None and not (t.eval_every and loop.step % t.eval_every == 0):
            m.log(loop.step, eval_fn(), prefix="eval/")  # (fit evaluated this step already)
    if not t.save_every or loop.step % t.save_every:
        save(loop.step)
    if run.checkpoint.export_hf:
        policy.export_hf(os.path.join(t.out_dir, "hf"))
    return out
