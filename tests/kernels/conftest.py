"""Every kernel test runs with poisoned outputs: what an op allocates for a kernel to write
(nova_kernels._common.empty) starts as NaN / an extreme integer, so an element a kernel
forgot to write shows in the comparison.

`device` is where a test builds its kernel inputs: "cuda" when a GPU is present (the
interpreter is then off and Triton kernels take only CUDA tensors), else "cpu" (the
interpreter runs them). References are computed on CPU in float64 as before; move results
back with `.cpu()` before comparing."""

import pytest
import torch

from nova_kernels._common import poisoned


@pytest.fixture(autouse=True)
def _poisoned_outputs():
    with poisoned():
        yield


@pytest.fixture
def device() -> str:
    """The device kernel inputs live on: "cuda" when available, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"
