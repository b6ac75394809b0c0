"""What both checkpoint formats share (`checkpoint` for format torch, `dist_checkpoint` for
format dist): the layout record of a manifest, the name of an engine's hf/ export, the RNG
state of a rank, and the one way a checkpoint file is read (`torch.load(weights_only=True)`:
tensors and plain values, never code)."""

from __future__ import annotations

import os
from typing import Any

import torch

from nova_engine.train.checkpoint_io import CheckpointIOError

HF_SUBDIR = "hf"


def layout_record(ps) -> dict[str, Any]:
    return {"tp": ps.tp, "pp": ps.pp, "vpp": ps.vpp, "dp": ps.dp, "world_size": ps.world_size}


def hf_dir(loop, name: str) -> str:
    return HF_SUBDIR if name == next(iter(loop.trainable)) else f"{HF_SUBDIR}_{name}"


def rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def unpickling_reason(e: BaseException) -> str:
    """The line of a weights_only refusal that says what was refused (e.g. "Unsupported
    global: GLOBAL posix.system"), not torch's advice to load it with weights_only=False."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    for x in lines:
        if x.startswith(("Unsupported", "Trying to", "Can only", "Expected")):
            return x[:200]
    return (lines[0] if lines else type(e).__name__)[:200]


def load_file(path: str, rel: str) -> Any:
    """torch.load of one checkpoint file, never executing code: `weights_only=True` admits
    tensors and plain values (dict, list, int, float, str, ...) only, whatever the file's
    CRC says; a file that needs more -> CheckpointIOError naming it, as for an unreadable one."""
    import pickle

    full = os.path.join(path, rel)
    try:
        return torch.load(full, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointIOError(
            f"{full}: refused: it holds objects other than tensors and plain values, and "
            f"loading them could run code ({unpickling_reason(e)})"
        ) from None
    except FileNotFoundError:
        raise CheckpointIOError(f"{full}: missing (a checkpoint of another layout?)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointIOError(f"{full}: unreadable ({str(e).splitlines()[0]})") from None
