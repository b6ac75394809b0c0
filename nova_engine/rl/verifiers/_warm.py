"""Warm-up, run on import: one call per built-in verifier, so that lazy imports and first-call
set-up (math-verify's LaTeX parser, langdetect's language profiles) are done. A pool worker
imports it BEFORE it reports ready, so no call's deadline pays for sympy's import (see
pool.py: the pool also keeps warm spares for restarts)."""

from nova_engine.rl.verifiers import answers as _answers  # noqa: F401 - registers verifiers
from nova_engine.rl.verifiers import ifeval as _ifeval  # noqa: F401 - registers verifiers
from nova_engine.rl.verifiers.base import VerifyItem, verify_one

WARMUP_ITEMS = (
    VerifyItem("gsm8k", "The answer is 1,234.", "1234"),
    VerifyItem("math", "So $x = \\boxed{\\frac{1}{2}}$.", "0.5"),
    VerifyItem(
        "ifeval",
        "Hello there, this is an English sentence.",
        '{"func_name": "validate_response_language", "language": "en"}',
    ),
    VerifyItem("arithmetic", "65", "65"),
)

WARMUP_RESULTS = tuple(verify_one(item) for item in WARMUP_ITEMS)
