"""The verifier pool: calls bounded in wall-clock time in worker processes. A verifier that
hangs (a test verifier spinning forever, and a MATH answer on which sympy does not finish:
Math-Verify issue #65's nested power) scores 0 with reason "timeout" and its worker is killed
and replaced; a crashing worker and a raising verifier score 0 with an "error" reason; memory
is capped; the pool keeps working afterwards. One pool (2 workers) for the file.

The test verifiers below are registered in this process AND, through `plugins=[__file__]`, in
every worker (which loads this file)."""

from __future__ import annotations

import os
import time

import pytest

from nova_engine.rl.verifiers import VerifierPool, VerifyItem, register_verifier

pytestmark = pytest.mark.slow  # a pool of worker processes; waits out wall-clock limits

TIMEOUT_S = 2.0
# parses fast, then sympy's comparison never finishes (minutes at least), in little memory
SYMPY_HANG = (
    "The answer is $\\boxed{\\dfrac{5^{\\left(5^{\\left(5^{\\left(5^5\\right)}\\right)} - 4"
    "\\right)} - 5}{16}}$."
)


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
    if response == "pid":
        return str(os.getpid()) == ground_truth
    return response == ground_truth


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(num_workers=2, timeout_s=TIMEOUT_S, plugins=[__file__]) as p:
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
        VerifyItem("pool_test", "ok", "ok"),
        VerifyItem("math", "I give up.", "3"),
    ]
    res = pool.verify_batch(items)
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


def test_hangs_are_bounded_and_the_pool_recovers(pool):
    before = pool.stats.timeouts, pool.stats.restarts
    items = [
        VerifyItem("pool_test", "hang", "x"),
        VerifyItem("pool_test", "ok", "ok"),
        VerifyItem("math", SYMPY_HANG, "5"),
        VerifyItem("gsm8k", "It is 7.", "7"),
    ]
    t0 = time.monotonic()
    res = pool.verify_batch(items, timeout_s=1.5)  # the call's limit overrides the default
    elapsed = time.monotonic() - t0
    assert [r.kind for r in res] == ["timeout", "correct", "timeout", "correct"]
    assert res[0].score == 0.0 and res[0].reason == "timeout: no answer within 1.5 s"
    assert pool.last_counts["timeout"] == 2
    assert pool.stats.timeouts - before[0] == 2 and pool.stats.restarts - before[1] == 2
    # two workers, two hangs: bounded by the limit plus the replacement's start, not by sympy
    assert elapsed < 2 * 1.5 + 60, elapsed
    # the replaced workers answer
    res = pool.verify_batch([VerifyItem("pool_test", "ok", "ok")] * 4, timeout_s=30)
    assert all(r.correct for r in res)


def test_crash_raise_and_memory_cap(pool):
    deaths = pool.stats.worker_deaths
    items = [
        VerifyItem("pool_test", "crash", "x"),
        VerifyItem("pool_test", "raise", "x"),
        VerifyItem("pool_test", "alloc", "x"),
        VerifyItem("pool_test", "ok", "ok"),
    ]
    res = pool.verify_batch(items, timeout_s=30)
    assert res[0].score == 0.0 and res[0].reason == "error: worker died (exit code 3)"
    assert res[1].score == 0.0 and res[1].reason == "error: RuntimeError: boom"
    assert res[2].score == 0.0 and res[2].reason.startswith("error: MemoryError")
    assert res[3].correct
    assert pool.stats.worker_deaths == deaths + 1
    # a raising verifier does not cost the worker: the same pid answers again
    pids = pool.worker_pids
    res = pool.verify_batch([VerifyItem("pool_test", "raise", "x")] * 2)
    assert [r.kind for r in res] == ["error", "error"] and pool.worker_pids == pids
    res = pool.verify_batch([VerifyItem("pool_test", "pid", str(p)) for p in pids])
    assert any(r.correct for r in res)  # the answers come from those processes


def test_unknown_dataset_and_bad_plugin(pool):
    with pytest.raises(ValueError, match="no verifier for dataset 'chess'"):
        pool.verify_batch([VerifyItem("gsm8k", "1", "1"), VerifyItem("chess", "e4", "e4")])
    with pytest.raises(RuntimeError, match="failed to start: .*no_such_plugin"):
        with VerifierPool(num_workers=1, plugins=["no_such_plugin_module"]) as bad:
            bad.wait_ready()
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        VerifierPool(num_workers=1, timeout_s=0)
