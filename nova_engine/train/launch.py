"""`nova run`: torchrun with Nova's exit codes and without its failure report.

    nova run --nproc-per-node 8 sft --recipe recipes/llama3_8b.yaml model.hf_path=/models/8b
    nova run --nnodes 8 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 \\
        sft --recipe recipes/llama3_70b.yaml

The flags before the stage name are torchrun's (any of them); the rest is what
`python -m nova_engine.train` takes. Plain `torchrun ... -m nova_engine.train ...` works the
same, with one difference: torchrun exits 1 and prints its own failure report (30+ lines
and a traceback) whenever a worker exits non-zero, so a user error there shows its one
line (from rank 0) followed by that report. `nova run` launches the same workers through
torchrun's own `run` and exits with the workers' code: 2 for a user error (the one
line is all that is printed), 128 + signal after SIGINT/SIGTERM (the workers saved a
checkpoint at the step boundary), 1 otherwise (with one line naming the failed rank).
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from nova_engine.progress import emit


def split_argv(argv: list[str], stages) -> tuple[list[str], list[str]]:
    """(torchrun flags, stage argv): split at the first argument that names a stage."""
    for i, a in enumerate(argv):
        if a in stages:
            return argv[:i], argv[i:]
    raise SystemExit(
        f"nova run: expected a stage ({', '.join(stages)}) after the torchrun flags, e.g. "
        "`nova run --nproc-per-node 8 sft --recipe recipes/llama3_8b.yaml`"
    )


def exit_code(failures: dict) -> tuple[int, str | None]:
    """(exit code, a line to print or None) for the workers' failures (rank -> failure)."""
    codes = {rank: f.exitcode for rank, f in failures.items()}
    if any(c == 2 for c in codes.values()):
        return 2, None  # a user error: rank 0 printed its one line
    for c in codes.values():
        if c is not None and c > 128:
            return c, None  # stopped by a signal after saving (the worker said so)
        if c is not None and c < 0:
            return 128 - c, f"a worker was killed by {signal.Signals(-c).name}"
    rank, code = min(codes.items())
    return 1, f"rank {rank} failed with exit code {code} (its traceback is above)"


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from nova_engine.train.stages import STAGES

    argv = sys.argv[1:] if argv is None else argv
    stage_at = next((i for i, a in enumerate(argv) if a in STAGES), len(argv))
    if "-h" in argv[:stage_at] or "--help" in argv[:stage_at]:
        emit(__doc__.strip() + "\n\ntorchrun's flags: `torchrun --help`; a stage's config "
             "keys: `nova <stage> --help`")  # fmt: skip
        return 0
    flags, stage_argv = split_argv(argv, tuple(STAGES))
    if "-h" in stage_argv or "--help" in stage_argv:  # the stage's help, without launching
        from nova_engine.train.__main__ import main as train_main

        return train_main(stage_argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets, minus its banner
    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    args = parse_args([*flags, "--module", "nova_engine.train", *stage_argv])
    try:
        run(args)  # torchrun's own launch (rendezvous, --standalone, ...)
    except ChildFailedError as e:
        code, line = exit_code(e.failures)
        if line:
            emit(f"nova run: {line}", err=True)
        return code
    except SignalException as e:
        return 128 + int(e.sigval)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main())
