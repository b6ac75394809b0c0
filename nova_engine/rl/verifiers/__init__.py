"""Verifiers for RLVR: reward checks by data-source name, run bounded in a process pool.

    from nova_engine.rl.verifiers import VerifierPool, VerifyItem, RewardConfig, shape_rewards

    with VerifierPool(num_workers=4, timeout_s=10) as pool:
        results = pool.verify_batch([VerifyItem("gsm8k", text, "18"), ...])
    rewards = shape_rewards(results, finished, RewardConfig(verified_reward=10.0))

Built-in names (Tülu 3 RLVR `dataset` values, case-insensitive): gsm8k, math (MATH), ifeval,
and arithmetic (the synthetic demo task). Modules: base (registry, VerifierResult), answers
(gsm8k, math, arithmetic), ifeval (the 25 constraint checks), pool (worker processes with a
wall-clock limit per call), reward (Tülu 3 reward shaping). Nothing here imports torch.
"""

from nova_engine.rl.verifiers import answers as _answers  # noqa: F401 - registers verifiers
from nova_engine.rl.verifiers import ifeval as _ifeval  # noqa: F401 - registers verifiers
from nova_engine.rl.verifiers.base import (
    REASON_KINDS,
    VerifierResult,
    VerifyItem,
    check_ground_truth,
    count_reasons,
    get_verifier,
    register_verifier,
    unregister_verifier,
    verifier_names,
    verify_one,
)
from nova_engine.rl.verifiers.pool import PoolStats, VerifierPool
from nova_engine.rl.verifiers.reward import RewardConfig, shape_rewards

__all__ = [
    "REASON_KINDS",
    "PoolStats",
    "RewardConfig",
    "VerifierPool",
    "VerifierResult",
    "VerifyItem",
    "check_ground_truth",
    "count_reasons",
    "get_verifier",
    "register_verifier",
    "shape_rewards",
    "unregister_verifier",
    "verifier_names",
    "verify_one",
]
