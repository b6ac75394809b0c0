"""Kernel selector: which implementation an op dispatches to.

`NOVA_KERNELS=triton|torch` forces a backend. Default: triton when CUDA is available,
torch (the chunked / vectorized PyTorch paths) otherwise. Tests run the Triton kernels on
CPU with `TRITON_INTERPRET=1` (set before triton is imported) and pass `backend="triton"`.
"""

from __future__ import annotations

import os

import torch

_VALID = ("triton", "torch")


def interpreting() -> bool:
    """True when Triton runs through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_backend() -> str:
    choice = os.environ.get("NOVA_KERNELS", "").strip().lower()
    if choice:
        if choice not in _VALID:
            raise ValueError(f"NOVA_KERNELS={choice!r}: expected one of {_VALID}")
        return choice
    return "triton" if torch.cuda.is_available() else "torch"


def resolve_backend(backend: str | None) -> str:
    """`backend` as given by a caller (None = the default)."""
    if backend is None:
        return default_backend()
    if backend not in _VALID:
        raise ValueError(f"backend={backend!r}: expected one of {_VALID}")
    return backend
