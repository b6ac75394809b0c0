"""Run plumbing shared by the stages: layout validation and process groups, model build,
the policy engine with its optimizer and schedule, the loop, resume, the training run with
periodic eval/save, final export.

`stages.sft.run(run)` and `stages.dpo.run(run)` call these. The checkpoint side (resume,
the guarded save, roll-back) is nova_engine.train.run_checkpoints, re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from nova_engine.config import RunConfig
from nova_engine.logging import get_logger
from nova_engine.model.hf_export import complete_hf_export, replace_dir
from nova_engine.parallel.spawn import free_port
from nova_engine.parallel.state import ParallelState, initialize_parallel
from nova_engine.train import checkpoint_io, safety
from nova_engine.train.async_checkpoint import AsyncSaver
from nova_engine.train.data_source import PackedDataSource
from nova_engine.train.engine import ModelEngine
from nova_engine.train.loop import Loop, Loss, Stage
from nova_engine.train.run_checkpoints import (  # noqa: F401  (the runner's API, one import away)
    _with_defaults,
    all_ok,
    finish_saves,
    layout_advice,
    resume,
    resume_path,
    roll_back,
    run_config_json,
    save_guarded,
)

if TYPE_CHECKING:
    from nova_engine.model.arch import ModelArch

logger = get_logger(__name__)


class RunStage(Stage, Protocol):
    """A stage the runner trains: a loop Stage that names the engine it trains."""

    @property
    def engine(self) -> str: ...


class EvalLoss(Loss, Protocol):
    """A loss the runner evaluates with, on the engine it names."""

    @property
    def engine(self) -> str: ...


@runtime_checkable
class SampleSource(Protocol):
    """A data source that lists its sequences (Samples, PairSamples or prompts): their
    lengths give the effective sequence length of the MFU estimate."""

    @property
    def samples(self) -> Sequence[Any]: ...


def ensure_process_group_env() -> None:
    """Single-process use (`nova`, the demo): torchrun's variables for a world of one. Without
    a launcher's RANK this process owns the rendezvous, so it takes a free local port of its
    own: a MASTER_PORT inherited from a parent (another run, a test process still holding its
    store) would fail with EADDRINUSE."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def setup_parallel(run: RunConfig) -> ParallelState:
    """Process group + megatron groups for `run.parallel`, after the whole layout has been
    validated against the world and the model's dimensions and the checks that need no
    model have passed (safety.preflight: paths, writable out_dir, free disk); then rank 0
    takes the run lock on out_dir (every rank raises if another run holds it)."""
    ensure_process_group_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    run.validate_layout(world)
    safety.preflight(run)
    p = run.parallel
    ps = initialize_parallel(
        tp=p.tp, pp=p.pp, vpp=p.vpp if p.vpp > 1 else None, sp=p.sp, seed=run.train.seed
    )
    acquire_run_lock(run.train.out_dir, ps)
    if os.path.abspath(run.checkpoint_dir) != os.path.abspath(run.train.out_dir):
        acquire_run_lock(run.checkpoint_dir, ps, key="checkpoint.dir")
    if ps.rank == 0:  # the resolved config, absolute paths (`nova <stage> --recipe` reruns it)
        from nova_engine.config_files import write_resolved_config

        write_resolved_config(run)
    return ps


def setup_async(run: RunConfig):
    """`rlvr.mode: async`: the world split into a training and a generation group
    (RLVRSection.split, checked before any process group), both layouts validated, the
    preflight checks, the run lock (training rank 0) and the resolved config. Returns
    (training ParallelState or None, generation ParallelState or None, the split)."""
    from nova_engine.parallel.state import initialize_split

    ensure_process_group_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    r, p = run.rlvr, run.parallel  # type: ignore[attr-defined]
    train_ranks, gen_ranks = r.split(world, p.tp, p.pp)
    run.validate_layout(len(train_ranks))
    found = run.model_dims()
    if found is not None:
        r.check_dims(*found)
    safety.preflight(run)
    vpp = p.vpp if p.vpp > 1 else None
    train, gen = initialize_split(train_ranks, gen_ranks, tp=p.tp, pp=p.pp, vpp=vpp, sp=p.sp,
                                  gen_tp=r.generation_tp, gen_pp=r.generation_pp,
                                  seed=run.train.seed)  # fmt: skip
    if train is not None:
        acquire_run_lock(run.train.out_dir, train)
        if os.path.abspath(run.checkpoint_dir) != os.path.abspath(run.train.out_dir):
            acquire_run_lock(run.checkpoint_dir, train, key="checkpoint.dir")
        if train.rank == 0:
            from nova_engine.config_files import write_resolved_config

            write_resolved_config(run)
    return train, gen, (train_ranks, gen_ranks)


_LOCKS: dict[str, safety.RunLock] = {}


def acquire_run_lock(out_dir: str, ps: ParallelState, key: str = "train.out_dir") -> None:
    """Rank 0 holds `<out_dir>/.nova.lock` until the process ends (or release_run_lock);
    RunLockError on every rank when another run holds it. A run locks every directory it
    writes: train.out_dir and checkpoint.dir (`key` names the setting in the message)."""
    path = os.path.abspath(out_dir)
    err: Exception | None = None
    if ps.rank == ps.first_rank and path not in _LOCKS:
        lock = safety.RunLock(path, key)
        try:
            lock.acquire()
            _LOCKS[path] = lock
        except safety.RunLockError as e:
            err = e
    if not all_ok(ps, err is None):
        raise err or safety.RunLockError(f"{out_dir}: in use by another run (see rank 0)")


def release_run_lock(out_dir: str) -> None:
    lock = _LOCKS.pop(os.path.abspath(out_dir), None)
    if lock is not None:
        lock.release()


def ensure_model(run: RunConfig, ps: ParallelState) -> None:
    """Build the recipe's tiny random model at model.hf_path when it is absent (rank 0)."""
    cfg = run.model
    if cfg.build is not None and ps.rank == ps.first_rank:
        if not os.path.isfile(os.path.join(cfg.hf_path, "config.json")):
            from nova_engine.data.tokenize import load_tokenizer
            from nova_engine.model.tiny import build_tiny_hf_model

            vocab = len(load_tokenizer(cfg.tokenizer_dir))
            b = cfg.build
            build_tiny_hf_model(
                cfg.hf_path, b.family, b.init_seed, vocab_size=vocab, **b.hf_config_kwargs()
            )
            logger.info("built a random %s model at %s", b.family, cfg.hf_path)
    ps.barrier()


def engine_for_run(run: RunConfig, ps: ParallelState, total_steps: int) -> ModelEngine:
    """The policy engine of a stage's run config: its model, optimizer, precision, layout."""
    t = run.train
    return ModelEngine.from_hf(
        run.model.hf_path, ps, name="policy", optim=run.optim, total_steps=total_steps,
        precision=t.precision, recompute=t.recompute, fuse_elementwise=t.fuse_elementwise,
        distributed_optimizer=run.parallel.distributed_optimizer, speed=t.speed,
        lora=run.model.lora,
    )  # fmt: skip


def data_source(
    run: RunConfig, ps: ParallelState, data: Sequence[Any], *, train: bool
) -> PackedDataSource:
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


def loop_for_run(run: RunConfig, ps: ParallelState, data: PackedDataSource) -> Loop:
    """A loop with the run's policy engine over `data`."""
    return Loop({"policy": engine_for_run(run, ps, data.total_steps)}, data)


def eval_over(
    loop: Loop, stage: EvalLoss, source: PackedDataSource
) -> Callable[[], dict[str, float]]:
    """An eval_fn for Loop.fit: the stage's metrics over every step of `source`."""
    return lambda: loop.evaluate(
        stage, [source.rank_microbatches(s) for s in range(source.total_steps)], stage.engine
    )


def export_final(run: RunConfig, engine: ModelEngine, out_dir: str) -> None:
    """The final HF export, atomic: written to a temp dir, completed with tokenizer files,
    template and generation config, then swapped in for any previous export."""
    import shutil

    ps = engine.ps
    if not all_ok(ps, bool(engine.local_params_finite())):
        raise safety.TrainingDiverged(
            f"non-finite weights after the last step: {out_dir} NOT written (the checkpoints "
            "on disk hold the last finite weights; lower optim.lr)"
        )
    tmp = f"{out_dir}.tmp-export"
    if ps.rank == ps.first_rank:
        shutil.rmtree(tmp, ignore_errors=True)
    ps.barrier()
    try:
        engine.export_hf(tmp)
        ps.barrier()
        if ps.rank == ps.first_rank:
            m = run.model
            complete_hf_export(
                tmp, source_dir=m.hf_path, tokenizer_dir=m.tokenizer_dir, template=run.data.template
            )
            replace_dir(tmp, out_dir)
    except Exception as e:  # a full disk: one line; the checkpoints and old export stay
        err = safety.disk_error(out_dir, e)
        if err is None:
            raise
        if ps.rank == ps.first_rank:
            shutil.rmtree(tmp, ignore_errors=True)
        raise checkpoint_io.CheckpointIOError(f"{err} (final export)") from None
    ps.barrier()


def mfu_inputs(
    arch: ModelArch, ps: ParallelState, batcher: SampleSource
) -> tuple[float, float] | tuple[None, None]:
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
    run: RunConfig,
    loop: Loop,
    stage: RunStage,
    eval_fn: Callable[[], dict[str, float]] | None = None,
) -> list[dict[str, float]]:
    """Resume if asked, train to the end with periodic eval/save, save, export the policy to
    <out_dir>/hf. Returns the per-step metrics of this process's run. SIGINT/SIGTERM: a
    checkpoint at the next step boundary (train.save_on_signal), then safety.Interrupted."""
    policy = loop.engine(stage.engine)
    ps, root = policy.ps, run.checkpoint_dir
    if ps.rank == ps.first_rank:
        checkpoint_io.cleanup_stale(root)
    t = run.train
    loop.guard = safety.NonFiniteGuard(t.max_bad_steps, t.divergence_factor, t.zero_grad_steps)
    loop.guard.describe = sample_describer(run)
    resume(run, loop)
    saved_at: list[int] = []
    saver = AsyncSaver(format=run.checkpoint.format) if run.checkpoint.async_save else None

    def save(step: int) -> None:
        path = save_guarded(run, loop, saver)
        if path is not None:
            saved_at.append(step)
            if run.eval.on_checkpoints and run.checkpoint.hf_in_checkpoints:
                finish_saves(run, saver)  # the hook reads the complete checkpoint
                run_eval_hook(run, os.path.join(path, "hf"), step)

    loop.stop = safety.StopRequest().install()
    try:
        out = _fit(run, loop, stage, policy, eval_fn, save)
    except safety.TrainingDiverged as e:
        finish_saves(run, saver)  # a write in flight lands before the roll-back looks
        raise roll_back(run, loop, e) from None
    finally:
        loop.stop.uninstall()
    if loop.stop.requested:
        path = None
        if t.save_on_signal:
            if saved_at[-1:] != [loop.step]:
                save(loop.step)
        finish_saves(run, saver)  # complete before the process exits
        if t.save_on_signal:
            path = checkpoint_io.latest_complete(root) if saved_at else None
        raise safety.Interrupted(loop.stop.signum or 2, loop.step, path)
    if not t.save_every or loop.step % t.save_every:
        save(loop.step)
    finish_saves(run, saver)  # the run's last checkpoint is complete before the export
    if run.checkpoint.export_hf:
        export_final(run, policy, os.path.join(t.out_dir, "hf"))
        run_eval_hook(run, os.path.join(t.out_dir, "hf"), loop.step)
    return out


def sample_describer(run: RunConfig) -> Callable[[Sequence[int]], str]:
    """sample ids -> "N sample(s): file:line, ..." for a skipped step's message. The data
    files are read again on the first call only (never on the training path); chat (SFT)
    and pair (DPO) data are named by file:line, other layouts by record index."""
    from nova_engine.data.formats import read_records

    sources: dict[int, str] = {}

    def describe(ids: Sequence[int]) -> str:
        uniq = sorted({int(i) for i in ids})
        if not sources and run.stage in ("sft", "dpo"):
            kind: Literal["sft", "pref"] = "sft" if run.data_format == "chat" else "pref"
            recs, _ = read_records(run.data.train_paths, kind, on_bad_line=run.data.on_bad_line,
                                   margin_key=run.data.margin_key)  # fmt: skip
            sources.update((r.index, r.source) for r in recs)
        names = [sources.get(i, f"record {i}") for i in uniq]
        more = f" and {len(names) - 8} more" if len(names) > 8 else ""
        return f"{len(names)} sample(s): {', '.join(names[:8])}{more}"

    return describe


def run_eval_hook(run: RunConfig, export_dir: str, step: int) -> None:
    """`eval.command` on an export (rank 0; metrics.run_eval_command), when set."""
    from nova_engine.train.metrics import run_eval_command

    e = run.eval
    if e.command:
        run_eval_command(e.command, export_dir, step, run.train.out_dir, e.timeout_s)


def _fit(
    run: RunConfig,
    loop: Loop,
    stage: RunStage,
    policy: ModelEngine,
    eval_fn: Callable[[], dict[str, float]] | None,
    save: Callable[[int], None],
) -> list[dict[str, float]]:
    from nova_engine.train.metrics import MetricsLogger

    t = run.train
    data = loop.data
    if data is None:
        raise ValueError("train_stage needs a loop with a data source (Loop(engines, data=...))")
    fpt, peak = (
        mfu_inputs(policy.arch, policy.ps, data) if isinstance(data, SampleSource) else (None, None)
    )
    with MetricsLogger(
        t.out_dir,
        total_steps=data.total_steps,
        stage=stage.name,
        tensorboard=t.tensorboard,
        report_to=t.report_to,
        config=run.to_dict() if t.report_to else None,
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
        stopped = loop.stop is not None and loop.stop.requested
        evaluated = t.eval_every and loop.step % t.eval_every == 0  # fit evaluated already
        if eval_fn is not None and not stopped and not evaluated:
            m.log(loop.step, eval_fn(), prefix="eval/")
    return out
