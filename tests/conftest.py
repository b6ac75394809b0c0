"""Test session setup. The Triton interpreter must be switched on before triton is imported,
so this runs first: on a machine without CUDA every Triton kernel runs on the CPU."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


# Tests in files other sessions were still editing when the `slow` marker came in, that spawn
# process groups or run whole stages: marked here until their files mark them (then drop the
# entry). Everything else marks itself with @pytest.mark.slow / pytestmark.
_SLOW_ELSEWHERE = (
    "tests/engine/test_train_rm.py",
    "tests/engine/test_generate.py",
    "tests/engine/test_decode_attention.py::test_decoding_against_a_kv_cache_gives_the_full_forward",
    "tests/kernels/test_linear_pair_logprobs.py::test_tp2_equals_4gemm_tp1",
)


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        test = item.nodeid.split("[")[0]
        if any(test == s or test.startswith(s + "::") for s in _SLOW_ELSEWHERE):
            item.add_marker(pytest.mark.slow)


_PG_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _pg_env_fixture():
    import pytest

    @pytest.fixture(autouse=True)
    def _restore_process_group_env():
        """An in-process entry-point run sets torchrun's variables for a world of one
        (nova_engine.train.runner.ensure_process_group_env); restore them after each test so
        a later subprocess or spawned group never rendezvous on this process's port."""
        saved = {k: os.environ.get(k) for k in _PG_ENV}
        yield
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    return _restore_process_group_env


_restore_process_group_env = _pg_env_fixture()
