"""Run a function on N local processes in one gloo group (tests, CPU demos).

`run_distributed(fn, world_size, *args)` spawns `world_size` processes, initializes
torch.distributed (gloo, loopback), calls `fn(rank, world_size, *args)` on each and
returns the per-rank return values (must be picklable; tensors are fine). An exception
on any rank is re-raised in the parent with that rank's traceback. Tests use one call
per file (several checks inside `fn`) to keep CI fast on 2 cores.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resolve(ref: tuple[str, str | None, str]) -> Callable:
    """The function named by (module, file, qualname). Test modules imported by pytest in
    importlib mode are not importable by name in a child: load those from their file."""
    modname, path, qualname = ref
    try:
        mod = importlib.import_module(modname)
    except ImportError:
        if path is None:
            raise
        spec = importlib.util.spec_from_file_location(modname, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[modname] = mod
        spec.loader.exec_module(mod)
    obj: object = mod
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


def _worker(rank: int, world_size: int, port: int, outdir: str, ref: tuple, args: tuple):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    result: dict[str, Any]
    try:
        fn = _resolve(ref)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = {"ok": True, "value": fn(rank, world_size, *args)}
    except BaseException:  # noqa: BLE001 - forwarded to the parent
        result = {"ok": False, "error": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
    with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_distributed(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """Call `fn(rank, world_size, *args)` on `world_size` gloo ranks; return their results."""
    module = sys.modules.get(fn.__module__)
    ref = (fn.__module__, getattr(module, "__file__", None), fn.__qualname__)
    with tempfile.TemporaryDirectory() as outdir:
        port = free_port()
        mp.start_processes(
            _worker,
            args=(world_size, port, outdir, ref, args),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        results = []
        errors = []
        for r in range(world_size):
            path = os.path.join(outdir, f"rank{r}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {r}: no result (process died)")
                continue
            with open(path, "rb") as f:
                res = pickle.load(f)
            if res["ok"]:
                results.append(res["value"])
            else:
                errors.append(f"rank {r}:\n{res['error']}")
        if errors:
            raise RuntimeError("distributed run failed\n" + "\n".join(errors))
        return results
