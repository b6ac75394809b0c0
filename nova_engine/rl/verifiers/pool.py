"""Verifier calls in worker processes, each bounded in wall-clock time.

    with VerifierPool(num_workers=4, timeout_s=10.0) as pool:
        results = pool.verify_batch(items)          # list[VerifierResult], in item order
        pool.last_counts                            # Counter: correct, wrong, timeout, error, ...

Why processes: sympy (math-verify) can hang or spin inside C code on pathological answers
(Math-Verify issues #50/#55/#65, verl PR #5839), where neither threads nor signals help. Each
call is sent to an idle worker; when it has not answered `timeout_s` after the send, the worker
is killed (SIGKILL) and replaced, and the item scores 0 with reason "timeout". A worker that
dies (segfault, os._exit, killed for memory) gives "error: worker died (exit code ...)"; an
exception inside the verifier gives "error: <Type>: <message>" and the worker lives on. A
batch therefore finishes within about ceil(n / num_workers) * timeout_s at worst.

Workers are fresh interpreters (`python -m nova_engine.rl.verifiers._worker`), not forks: a
replacement never copies a large training process (CUDA, NCCL threads) and the parent's
__main__ is never re-imported. Each loads the built-in verifiers and the `plugins` (module
names or .py paths whose `register_verifier` calls add verifiers; tests use this), warms the
built-ins up (lazy imports and first-call set-up do not count against the first real call) and
reports ready; a replacement starts in the background while the other workers go on. An
address-space limit (`memory_limit_mb`, RLIMIT_AS) keeps a runaway sympy computation from
taking the machine's memory: it surfaces as "error: MemoryError".
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

from nova_engine.logging import get_logger
from nova_engine.rl.verifiers.base import (
    ERROR,
    TIMEOUT,
    VerifierResult,
    VerifyItem,
    count_reasons,
    get_verifier,
)

logger = get_logger(__name__)


@dataclass
class PoolStats:
    """Cumulative counts over the pool's life."""

    calls: int = 0
    timeouts: int = 0
    worker_deaths: int = 0
    restarts: int = 0
    reasons: Counter = field(default_factory=Counter)


class _Worker:
    """One worker process and its connection; `task` is the item index it is verifying."""

    def __init__(self, plugins: tuple[str, ...], memory_limit_mb: int | None, startup_s: float):
        parent, child = socket.socketpair()
        env = dict(os.environ)
        path = [p for p in sys.path if p]
        env["PYTHONPATH"] = os.pathsep.join(path + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nova_engine.rl.verifiers._worker", str(child.fileno())],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env=env,
        )
        child.close()
        self.conn = Connection(parent.detach())
        self.conn.send(("config", plugins, memory_limit_mb))
        self.ready = False
        self.startup_deadline = time.monotonic() + startup_s
        self.task: int | None = None
        self.limit = 0.0
        self.deadline = 0.0

    def kill(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
            code = None
        self.conn.close()
        return code

    def ask_to_stop(self) -> None:
        """An idle ready worker exits on None; any other one is killed (it is busy or still
        importing, and would not read the message soon)."""
        if self.ready and self.task is None:
            try:
                self.conn.send(None)
                return
            except (OSError, ValueError):
                pass
        self.kill()


class VerifierPool:
    """A pool of verifier worker processes with a wall-clock limit per call. One batch at a
    time (not thread-safe); under torchrun each rank that verifies holds its own pool.
    Dataset names are checked in THIS process before any work: a plugin's verifiers must be
    registered here too (import the plugin here as well).

    Args:
        num_workers: worker processes (>= 1).
        timeout_s: default wall-clock limit of one verifier call, from its send to its answer.
        plugins: module names or .py paths each worker imports after the built-in verifiers.
        memory_limit_mb: RLIMIT_AS of each worker (None: unlimited).
        startup_timeout_s: a worker not ready after this long raises RuntimeError (a broken
            environment must fail loudly, not score every response 0).
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 10.0,
        *,
        plugins: Sequence[str] = (),
        memory_limit_mb: int | None = 4096,
        startup_timeout_s: float = 120.0,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if memory_limit_mb is not None and memory_limit_mb < 256:
            raise ValueError(f"memory_limit_mb must be >= 256 or None, got {memory_limit_mb}")
        self.timeout_s = float(timeout_s)
        self.plugins = tuple(os.fspath(p) for p in plugins)
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout_s = float(startup_timeout_s)
        self.stats = PoolStats()
        self.last_counts: Counter = Counter()
        self._closed = False
        self._workers = [self._spawn() for _ in range(num_workers)]

    # -- lifecycle ----------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        return _Worker(self.plugins, self.memory_limit_mb, self.startup_timeout_s)

    def _replace(self, w: _Worker) -> int | None:
        code = w.kill()
        self.stats.restarts += 1
        self._workers[self._workers.index(w)] = self._spawn()
        return code

    def close(self) -> None:
        """Stops every worker (idempotent)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for w in self._workers:
            w.ask_to_stop()
        deadline = time.monotonic() + 2.0
        for w in self._workers:
            try:
                w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            w.kill()

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the OS reaps the workers
            pass

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    @property
    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def wait_ready(self) -> None:
        """Blocks until every worker has started (optional: verify_batch waits as needed)."""
        self._check_open()
        while not all(w.ready for w in self._workers):
            self._poll([w for w in self._workers if not w.ready], None)
            self._expire(None)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("VerifierPool is closed")

    # -- the batch loop -------------------------------------------------------------------

    def verify_batch(
        self, items: Sequence[VerifyItem], timeout_s: float | None = None
    ) -> list[VerifierResult]:
        """Verifies `items` (datasets mixed freely) on the workers; results in item order, with
        `self.last_counts` the kinds of their reasons. Never raises for a bad response, a hang
        or a crash; raises ValueError for an unknown dataset (before any work) and
        RuntimeError when a worker cannot start."""
        self._check_open()
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        if not timeout > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout}")
        for it in items:
            get_verifier(it.dataset)
        results: list[VerifierResult | None] = [None] * len(items)
        pending = deque(range(len(items)))
        while pending or any(w.task is not None for w in self._workers):
            for w in list(self._workers):
                if w.ready and w.task is None and pending:
                    self._send(w, pending, items, timeout)
            self._poll([w for w in self._workers if w.task is not None or not w.ready], results)
            self._expire(results)
        out = [r for r in results if r is not None]
        assert len(out) == len(items)
        self.stats.calls += len(items)
        self.last_counts = count_reasons(out)
        self.stats.reasons.update(self.last_counts)
        return out

    def _send(self, w: _Worker, pending: deque, items, timeout: float) -> None:
        i = pending.popleft()
        try:
            w.conn.send((i, items[i]))
        except (OSError, ValueError):  # it died while idle: replace it, retry the item
            self.stats.worker_deaths += 1
            self._replace(w)
            pending.appendleft(i)
            return
        w.task, w.limit, w.deadline = i, timeout, time.monotonic() + timeout

    def _poll(self, waiting: list[_Worker], results) -> None:
        """Waits for the first message (or the nearest deadline) and handles what arrived."""
        if not waiting:
            return
        first = min(w.deadline if w.ready else w.startup_deadline for w in waiting)
        by_conn = {w.conn: w for w in waiting}
        for conn in wait(list(by_conn), timeout=max(0.0, first - time.monotonic())):
            w = by_conn[conn]  # type: ignore[index]
            try:
                msg = w.conn.recv()
            except (EOFError, OSError):
                self._died(w, results)
                continue
            if msg[0] == "ready":
                w.ready = True
            elif msg[0] == "failed":
                self.close()
                raise RuntimeError(f"verifier worker failed to start: {msg[1]}")
            elif results is not None and w.task == msg[0]:
                results[w.task] = msg[1]
                w.task = None

    def _died(self, w: _Worker, results) -> None:
        self.stats.worker_deaths += 1
        if not w.ready:
            code = w.kill()
            self.close()
            raise RuntimeError(f"verifier worker died while starting (exit code {code})")
        task = w.task
        code = self._replace(w)
        logger.warning("verifier worker %d died (exit code %s); replaced", w.proc.pid, code)
        if task is not None and results is not None:
            results[task] = VerifierResult.failed(ERROR, f"worker died (exit code {code})")

    def _expire(self, results) -> None:
        now = time.monotonic()
        for w in list(self._workers):
            if w.task is not None and now >= w.deadline and results is not None:
                results[w.task] = VerifierResult.failed(TIMEOUT, f"no answer within {w.limit:g} s")
                self.stats.timeouts += 1
                self._replace(w)
            elif not w.ready and now >= w.startup_deadline:
                self.close()
                raise RuntimeError(f"verifier worker not ready after {self.startup_timeout_s:g} s")
