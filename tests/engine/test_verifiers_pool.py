"""The verifier pool: every call of a batch ends by a deadline counted from the batch's
submission. A verifier that hangs (a test verifier spinning forever, and a MATH answer on
which sympy does not finish: Math-Verify issue #65's nested power) scores 0 with reason
"timeout" and its worker is killed and replaced; calls queued behind hangs, or waiting for a
worker that is restarting, end by the same deadline ("timeout: not started"); a crashing
worker, a memory bomb and a raising verifier score 0 with an "error" reason; a warm spare
takes a killed worker's place at once; the pool keeps working afterwards.

Run as a script it measures the bound (docs/edges.md):

    .venv/bin/python tests/engine/test_verifiers_pool.py [batches]

The test verifiers below are registered in this process AND, through `plugins=[__file__]`, in
every worker (which loads this file)."""

from __future__ import annotations

import os
import sys
import time

import pytest

from nova_engine.rl.verifiers import VerifierPool, VerifyItem, register_verifier
from nova_engine.rl.verifiers.pool import BOUND_SLACK_S

pytestmark = pytest.mark.slow  # pools of worker processes; waits out wall-clock limits

TIMEOUT_S = 2.0
# parses fast, then sympy's comparison never finishes (minutes at least), in little memory
SYMPY_HANG = (
    "The answer is $\\boxed{\\dfrac{5^{\\left(5^{\\left(5^{\\left(5^5\\right)}\\right)} - 4"
    "\\right)} - 5}{16}}$."
)
NOT_STARTED = "timeout: not started within"


@register_verifier("pool_test")
def _pool_test(response: str, ground_truth) -> bool:
    if response == "hang":
        while True:
            pass
    if response == "crash":
        os._exit(3)
    if response == "raise":
        raise RuntimeError("boom")
    if response == "alloc":
        return len(bytearray(64 << 30)) > 0  # 64 GiB: refused under the address-space cap
    if response == "bomb":  # grows 16 MiB at a time until the address-space cap stops it
        hoard = []
        while True:
            hoard.append(bytearray(16 << 20))
    if response == "pid":
        return str(os.getpid()) == ground_truth
    return response == ground_truth


def _item(response: str, gt: str = "x") -> VerifyItem:
    return VerifyItem("pool_test", response, gt)


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(
        num_workers=2, timeout_s=TIMEOUT_S, plugins=[__file__], memory_limit_mb=512
    ) as p:
        p.wait_ready()
        yield p


def test_mixed_batch_in_order(pool):
    gt_if = '{"func_name": "validate_no_commas"}'
    items = [
        VerifyItem("gsm8k", "so she earns $1,080.", "1080"),
        VerifyItem("MATH", "Final Answer: The final answer is $\\frac{2}{4}$.", "0.5"),
        VerifyItem("ifeval", "No commas here", gt_if),
        VerifyItem("ifeval", "Commas, here", gt_if),
        VerifyItem("arithmetic", "64", "65"),
        _item("ok", "ok"),
        VerifyItem("math", "I give up.", "3"),
    ]
    res = pool.verify_batch(items, timeout_s=30)
    assert [r.kind for r in res] == [
        "correct",
        "correct",
        "correct",
        "wrong",
        "wrong",
        "correct",
        "no_answer",
    ]
    assert pool.last_counts == {"correct": 4, "wrong": 2, "no_answer": 1}


def test_hangs_end_by_the_deadline_counted_from_submission(pool):
    """Two workers, two hangs: the call queued behind them does not get a limit of its own
    after they are killed (the old behaviour: ceil(n / workers) * timeout and more); it ends
    at the same deadline, reason "not started"."""
    before = pool.stats.timeouts, pool.stats.queue_timeouts, pool.stats.restarts
    items = [
        _item("hang"),
        _item("ok", "ok"),
        VerifyItem("math", SYMPY_HANG, "5"),
        VerifyItem("gsm8k", "It is 7.", "7"),
    ]
    t0 = time.monotonic()
    res = pool.verify_batch(items, timeout_s=1.5)  # the call's limit overrides the default
    elapsed = time.monotonic() - t0
    assert [r.kind for r in res] == ["timeout", "correct", "timeout", "timeout"]
    assert res[0].score == 0.0 and res[0].reason == "timeout: no answer within 1.5 s"
    assert res[2].reason == "timeout: no answer within 1.5 s"
    assert res[3].score == 0.0 and res[3].reason.startswith(NOT_STARTED + " 1.5 s")
    assert pool.last_counts["timeout"] == 3
    assert pool.stats.timeouts - before[0] == 3 and pool.stats.queue_timeouts - before[1] == 1
    assert pool.stats.restarts - before[2] == 2
    assert 1.5 <= elapsed < 1.5 + BOUND_SLACK_S, elapsed
    # the replaced workers answer
    res = pool.verify_batch([_item("ok", "ok")] * 4, timeout_s=60)
    assert all(r.correct for r in res)


def test_bound_holds_with_hangs_crashes_and_memory_bombs(pool):
    """The per-step wall time of a batch mixing every way a call can go wrong stays under
    the documented bound (timeout_s + BOUND_SLACK_S), and each call has its reason."""
    pool.wait_ready()
    deaths = pool.stats.worker_deaths
    items = [
        _item("crash"),
        _item("alloc"),
        _item("bomb"),
        _item("ok", "ok"),
        _item("hang"),
        VerifyItem("math", SYMPY_HANG, "5"),
        _item("ok", "ok"),
        _item("raise"),
    ]
    t0 = time.monotonic()
    res = pool.verify_batch(items, timeout_s=3.0)
    elapsed = time.monotonic() - t0
    assert elapsed < 3.0 + BOUND_SLACK_S, elapsed
    assert res[0].reason == "error: worker died (exit code 3)"
    assert res[1].reason.startswith("error: MemoryError")
    assert res[2].reason.startswith("error: MemoryError")
    assert res[3].correct
    assert [r.reason for r in res[4:6]] == ["timeout: no answer within 3 s"] * 2
    assert all(r.reason.startswith(NOT_STARTED) and r.score == 0.0 for r in res[6:])
    assert pool.last_counts == {"error": 3, "correct": 1, "timeout": 4}
    assert pool.stats.worker_deaths == deaths + 1


def test_raising_verifier_keeps_its_worker(pool):
    pool.wait_ready()
    pids = pool.worker_pids
    res = pool.verify_batch([_item("raise")] * 2, timeout_s=30)
    assert [r.reason for r in res] == ["error: RuntimeError: boom"] * 2
    assert pool.worker_pids == pids
    res = pool.verify_batch([_item("pid", str(p)) for p in pids], timeout_s=30)
    assert any(r.correct for r in res)  # the answers come from those processes


def test_restarts_are_off_the_clock_with_a_spare_and_bounded_without():
    """After a hang is killed, the next batch is served at once by the warm spare (a fresh
    interpreter needs seconds to import sympy: more than the 0.8 s the batch has). Without
    a spare, the calls wait for the restarting worker and still end by their deadline."""
    with VerifierPool(1, plugins=[__file__], spare_workers=1) as p:
        assert p.num_workers == 1 and len(p.worker_pids) == 2
        assert p.verify_batch([_item("hang")], timeout_s=1.0)[0].kind == "timeout"
        t0 = time.monotonic()
        res = p.verify_batch([_item("ok", "ok")] * 3, timeout_s=0.8)
        assert [r.kind for r in res] == ["correct"] * 3, res
        assert time.monotonic() - t0 < 0.8
    with VerifierPool(1, plugins=[__file__], spare_workers=0) as p:
        assert p.verify_batch([_item("hang")], timeout_s=1.0)[0].kind == "timeout"
        t0 = time.monotonic()
        res = p.verify_batch([_item("ok", "ok")] * 2, timeout_s=0.3)
        elapsed = time.monotonic() - t0
        assert all(r.reason.startswith(NOT_STARTED + " 0.3 s") for r in res), res
        assert p.stats.queue_timeouts == 2 and p.last_counts == {"timeout": 2}
        assert 0.3 <= elapsed < 0.3 + BOUND_SLACK_S, elapsed
        res = p.verify_batch([_item("ok", "ok")], timeout_s=60)  # the restarted worker
        assert res[0].correct


def test_unknown_dataset_and_bad_arguments(pool):
    with pytest.raises(ValueError, match="no verifier for dataset 'chess'"):
        pool.verify_batch([VerifyItem("gsm8k", "1", "1"), VerifyItem("chess", "e4", "e4")])
    with pytest.raises(RuntimeError, match="failed to start: .*no_such_plugin"):
        with VerifierPool(num_workers=1, plugins=["no_such_plugin_module"]) as bad:
            bad.wait_ready()
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        VerifierPool(num_workers=1, timeout_s=0)
    with pytest.raises(ValueError, match="spare_workers must be >= 0"):
        VerifierPool(num_workers=1, spare_workers=-1)


def measure(batches: int = 10, timeout_s: float = 3.0) -> None:
    """Per-step wall time of `batches` batches of 16 calls mixing hangs, sympy hangs,
    crashes, memory bombs and good calls (2 workers, 1 spare), one right after the other (so
    restarts overlap the next batch); prints the worst overrun past timeout_s."""
    bad = ["hang", "crash", "bomb", "alloc", "raise"]
    over = []
    with VerifierPool(2, timeout_s, plugins=[__file__], memory_limit_mb=512) as p:
        p.wait_ready()
        for b in range(batches):
            items = [_item(bad[(b + i) % len(bad)]) if i % 3 == 0 else _item("ok", "ok")
                     for i in range(15)] + [VerifyItem("math", SYMPY_HANG, "5")]  # fmt: skip
            t0 = time.monotonic()
            p.verify_batch(items)
            dt = time.monotonic() - t0
            over.append(dt - timeout_s)
            print(f"batch {b}: {dt:.2f} s  {dict(p.last_counts)}")
        print(f"timeout_s {timeout_s:g}: worst step {timeout_s + max(over):.2f} s "
              f"(overrun {max(over):.3f} s, bound slack {BOUND_SLACK_S:g} s); "
              f"restarts {p.stats.restarts}, queue timeouts {p.stats.queue_timeouts}; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")  # fmt: skip


if __name__ == "__main__":
    measure(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
