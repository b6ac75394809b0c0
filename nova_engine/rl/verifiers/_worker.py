"""A verifier worker process: `python -m nova_engine.rl.verifiers._worker FD` (started by
VerifierPool, never by hand). FD is its end of a socket pair, used as a
multiprocessing Connection:

    parent -> ("config", plugins, memory_limit_mb)     then   (task_id, VerifyItem) ...
    worker -> ("ready", pid) | ("failed", message)     then   (task_id, VerifierResult) ...

A None message or a closed socket ends the worker. Started as a fresh interpreter (not forked)
so it never copies a large training process and never re-imports the parent's __main__.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import signal
import sys
from multiprocessing.connection import Connection


def _load_plugin(ref: str) -> None:
    if ref.endswith(".py"):
        name = "_nova_verifier_plugin_" + os.path.splitext(os.path.basename(ref))[0]
        spec = importlib.util.spec_from_file_location(name, ref)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load verifier plugin file {ref}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    else:
        importlib.import_module(ref)


def _limit_memory(memory_limit_mb: int | None) -> None:
    if not memory_limit_mb:
        return
    import resource

    limit = int(memory_limit_mb) << 20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def serve(conn: Connection) -> None:
    try:
        tag, plugins, memory_limit_mb = conn.recv()
        assert tag == "config", tag
        _limit_memory(memory_limit_mb)
        from nova_engine.rl.verifiers.base import verify_one

        for ref in plugins:  # first: a bad plugin fails fast
            _load_plugin(ref)
        from nova_engine.rl.verifiers import _warm  # noqa: F401 - built-ins registered, warm

        conn.send(("ready", os.getpid()))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, item = msg
        conn.send((task_id, verify_one(item)))


NICE = 5
"""A worker yields the CPU to its parent: a hung call spinning until its deadline, or a
replacement importing sympy, must not delay the parent that enforces the deadlines (on a
loaded 2-core CPU, at nice 0 the parent woke up to 1.4 s late)."""

if __name__ == "__main__":  # pragma: no cover - run in the worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        os.nice(NICE)
    except OSError:  # not permitted: run at the parent's priority
        pass
    serve(Connection(int(sys.argv[1])))
