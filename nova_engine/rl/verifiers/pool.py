"""Verifier calls in worker processes, each ending by a wall-clock deadline.

    with VerifierPool(num_workers=4, timeout_s=10.0) as pool:
        results = pool.verify_batch(items)          # list[VerifierResult], in item order
        pool.last_counts                            # Counter: correct, wrong, timeout, error, ...

Why processes: sympy (math-verify) can hang or spin inside C code on pathological answers
(Math-Verify issues #50/#55/#65, verl PR #5839), where neither threads nor signals help.

The time bound. Every call of a batch has one deadline: `timeout_s` after the batch was
SUBMITTED (not after the call was sent to a worker), so the time a call spends in the queue,
behind a hang or waiting for a worker that is restarting, counts against it. At the deadline
every call still running scores 0 with reason "timeout: no answer within T s" (its worker is
killed with SIGKILL and replaced) and every call not yet started scores 0 with "timeout: not
started within T s (...)"; both count as `timeout` in `last_counts` (`stats.timeouts`,
`stats.queue_timeouts`). `verify_batch` therefore returns within `timeout_s + BOUND_SLACK_S`
whatever the calls do (hang, crash, allocate without end): measured on a 2-core CPU shared
with other jobs, see docs/edges.md and `python tests/engine/test_verifiers_pool.py`. The
pool's first start (interpreters importing sympy) is not part of any call's budget: the first
batch waits for it (`startup_timeout_s`); every later start is.

A worker that dies (segfault, os._exit, killed for memory) gives "error: worker died (exit
code ...)"; an exception inside the verifier gives "error: <Type>: <message>" and the worker
lives on. An address-space limit (`memory_limit_mb`, RLIMIT_AS) keeps a runaway sympy
computation from taking the machine's memory: it surfaces as "error: MemoryError".

Restarts off the clock: workers are fresh interpreters (`python -m
nova_engine.rl.verifiers._worker`, never forks of a large training process, never
re-importing the parent's __main__) that import and warm up the verifiers (_warm: sympy,
math-verify's parser, langdetect's profiles) BEFORE they report ready, and the pool keeps
`spare_workers` such processes warm beyond the `num_workers` that verify at once. A killed or
dead worker's place is taken at once by a warm spare while its replacement warms up in the
background, so a restart costs a later call nothing as long as a spare is warm (at most
`num_workers` calls run at a time either way).
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

BOUND_SLACK_S = 1.0
"""verify_batch returns within timeout_s + BOUND_SLACK_S (killing the calls still running and
starting their replacements; measured on a loaded 2-core CPU: docs/edges.md)."""


@dataclass
class PoolStats:
    """Cumulative counts over the pool's life."""

    calls: int = 0
    timeouts: int = 0
    """Calls past their deadline, running or still queued."""
    queue_timeouts: int = 0
    """Of `timeouts`: calls never started (every worker busy or restarting)."""
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

    def kill(self, wait: bool = True) -> int | None:
        """SIGKILL (unless it exited) and its exit code; `wait=False` does not wait for the
        kernel to take it down (a spinning process on a loaded CPU: 0.1-0.2 s), the pool
        reaps it later."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.conn.close()
        if not wait:
            return None
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
            return None

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
    """A pool of verifier worker processes; every call of a batch ends by `timeout_s` after
    the batch's submission (see the module docstring). One batch at a time (not
    thread-safe); under torchrun each rank that verifies holds its own pool. Dataset names
    are checked in THIS process before any work: a plugin's verifiers must be registered
    here too (import the plugin here as well).

    Args:
        num_workers: calls verified at once (>= 1).
        timeout_s: default deadline of a batch's calls, counted from its submission.
        plugins: module names or .py paths each worker imports after the built-in verifiers.
        memory_limit_mb: RLIMIT_AS of each worker (None: unlimited).
        startup_timeout_s: a worker not ready after this long raises RuntimeError (a broken
            environment must fail loudly, not score every response 0).
        spare_workers: warm processes kept beyond num_workers, taking a killed or dead
            worker's place at once (>= 0; each costs one idle interpreter, ~120 MB).
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 10.0,
        *,
        plugins: Sequence[str] = (),
        memory_limit_mb: int | None = 4096,
        startup_timeout_s: float = 120.0,
        spare_workers: int = 1,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if spare_workers < 0:
            raise ValueError(f"spare_workers must be >= 0, got {spare_workers}")
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
        self._num_workers = num_workers
        self._closed = False
        self._started = False  # the first start is waited out, off every call's clock
        self._batch_timeout = self.timeout_s
        self._reaping: list[subprocess.Popen] = []  # killed at a deadline, not yet reaped
        self._workers = [self._spawn() for _ in range(num_workers + spare_workers)]

    # -- lifecycle ----------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        return _Worker(self.plugins, self.memory_limit_mb, self.startup_timeout_s)

    def _replace(self, w: _Worker, wait: bool = True) -> int | None:
        """Kills `w` and starts its replacement in the background (a warm spare, when there
        is one, takes the next call meanwhile); `wait=False`: reaped later, no exit code."""
        code = w.kill(wait)
        if not wait:
            self._reaping.append(w.proc)
        self.stats.restarts += 1
        self._workers[self._workers.index(w)] = self._spawn()
        return code

    def _reap(self) -> None:
        self._reaping = [p for p in self._reaping if p.poll() is None]

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
        for proc in self._reaping:
            proc.wait()

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
        """Calls verified at once."""
        return self._num_workers

    @property
    def worker_pids(self) -> list[int]:
        """Every worker process, spares included."""
        return [w.proc.pid for w in self._workers]

    @property
    def warm_idle(self) -> int:
        """Processes ready and idle right now (messages already received)."""
        return sum(w.ready and w.task is None for w in self._workers)

    def wait_ready(self) -> None:
        """Blocks until every worker (spares too) has started; verify_batch does this once,
        before its first batch, and never again."""
        self._check_open()
        while not all(w.ready for w in self._workers):
            self._poll([w for w in self._workers if not w.ready], None, None)
            self._expire(None, None)
        self._started = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("VerifierPool is closed")

    # -- the batch loop -------------------------------------------------------------------

    def verify_batch(
        self, items: Sequence[VerifyItem], timeout_s: float | None = None
    ) -> list[VerifierResult]:
        """Verifies `items` (datasets mixed freely) on the workers; results in item order, with
        `self.last_counts` the kinds of their reasons. Every call ends by `timeout_s` (default
        the pool's) after this call began. Never raises for a bad response, a hang or a
        crash; raises ValueError for an unknown dataset (before any work) and RuntimeError
        when a worker cannot start."""
        self._check_open()
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        if not timeout > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout}")
        for it in items:
            get_verifier(it.dataset)
        self._reap()
        if not self._started:
            self.wait_ready()
        deadline = time.monotonic() + timeout  # submission: queueing and restarts count
        self._batch_timeout = timeout
        results: list[VerifierResult | None] = [None] * len(items)
        pending = deque(range(len(items)))
        while pending or any(w.task is not None for w in self._workers):
            if pending and time.monotonic() >= deadline:  # never send past the deadline
                self._queue_timeout(pending, results, timeout)
            busy = sum(w.task is not None for w in self._workers)
            for w in list(self._workers):
                if busy >= self._num_workers or not pending:
                    break
                if w.ready and w.task is None:
                    busy += self._send(w, pending, items)
            waiting = [w for w in self._workers if w.task is not None or not w.ready]
            self._poll(waiting, results, deadline)
            self._expire(results, deadline)
        out = [r for r in results if r is not None]
        assert len(out) == len(items)
        self.stats.calls += len(items)
        self.last_counts = count_reasons(out)
        self.stats.reasons.update(self.last_counts)
        return out

    def _send(self, w: _Worker, pending: deque, items) -> int:
        """Sends the next item to `w`: 1 when sent, 0 when `w` was found dead (replaced,
        the item stays first in the queue)."""
        i = pending.popleft()
        try:
            w.conn.send((i, items[i]))
        except (OSError, ValueError):  # it died while idle: replace it, retry the item
            self.stats.worker_deaths += 1
            self._replace(w)
            pending.appendleft(i)
            return 0
        w.task = i
        return 1

    def _queue_timeout(self, pending: deque, results, timeout: float) -> None:
        n = len(pending)
        while pending:
            results[pending.popleft()] = VerifierResult.failed(
                TIMEOUT, f"not started within {timeout:g} s (every worker busy or restarting)"
            )
        self.stats.timeouts += n
        self.stats.queue_timeouts += n
        logger.warning(
            "%d verifier call(s) never started within %g s (every worker busy or restarting): "
            "reward 0; more workers or a longer timeout would verify them", n, timeout
        )  # fmt: skip

    def _poll(self, waiting: list[_Worker], results, deadline: float | None) -> None:
        """Waits for the first message (or the nearest deadline) and handles what arrived."""
        if not waiting:
            return
        times = [w.startup_deadline for w in waiting if not w.ready]
        if deadline is not None:
            times.append(deadline)
        by_conn = {w.conn: w for w in waiting}
        for conn in wait(list(by_conn), timeout=max(0.0, min(times) - time.monotonic())):
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

    def _expire(self, results, deadline: float | None) -> None:
        now = time.monotonic()
        for w in list(self._workers):
            if w.task is not None and deadline is not None and now >= deadline:
                results[w.task] = VerifierResult.failed(
                    TIMEOUT, f"no answer within {self._batch_timeout:g} s"
                )
                self.stats.timeouts += 1
                self._replace(w, wait=False)
            elif not w.ready and now >= w.startup_deadline:
                self.close()
                raise RuntimeError(f"verifier worker not ready after {self.startup_timeout_s:g} s")
