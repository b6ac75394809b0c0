"""Test session setup. The Triton interpreter must be switched on before triton is imported,
so this runs first: on a machine without CUDA every Triton kernel runs on the CPU."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


_PG_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# the session's own values (normally unset), taken before any test ran: restored after every
# test, so a variable set by a module-scoped fixture's in-process run does not outlive it
_PRISTINE_PG_ENV = {k: os.environ.get(k) for k in _PG_ENV}


def _pg_env_fixture():
    import pytest

    @pytest.fixture(autouse=True)
    def _restore_process_group_env():
        """An in-process entry-point run sets torchrun's variables for a world of one
        (nova_engine.train.runner.ensure_process_group_env); restore them after each test so
        a later subprocess or spawned group never rendezvous on this process's port."""
        yield
        for k, v in _PRISTINE_PG_ENV.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    return _restore_process_group_env


_restore_process_group_env = _pg_env_fixture()
