"""RLVR prompts as the stages read them: the Tülu 3 RLVR layout (nova_engine.data.rlvr) with
the verifier's check at read time: `dataset` names a registered verifier
(nova_engine.rl.verifiers; case-insensitive) and `ground_truth` passes that verifier's own
check, else the line is bad ("path:line: reason", kinds "unknown_dataset" /
"bad_ground_truth"; with on_bad_line="skip" counted in ReadStats).

    prompts, read_stats, tok_stats = load_rlvr_prompts(paths, tokenizer, max_prompt_length=512)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from nova_engine.data import rlvr
from nova_engine.data.formats import OnBadLine, ReadStats, _Bad
from nova_engine.data.rlvr import RLVRPrompt, RLVRRecord, RLVRTokenizeStats
from nova_engine.rl.verifiers import check_ground_truth, get_verifier, verifier_names

__all__ = ["RLVRPrompt", "RLVRRecord", "load_rlvr_prompts", "read_rlvr", "read_rlvr_jsonl"]


def verifier_check(dataset: str, ground_truth: Any) -> None:
    """data.rlvr's `check`: _Bad when no verifier is named `dataset` (the known names listed)
    or the verifier rejects `ground_truth`."""
    try:
        get_verifier(dataset)
    except ValueError:
        raise _Bad(
            f'unknown "dataset" {dataset!r}: no verifier of that name; known: '
            f"{', '.join(verifier_names())}",
            "unknown_dataset",
        ) from None
    try:
        check_ground_truth(dataset, ground_truth)
    except ValueError as e:
        raise _Bad(f'"ground_truth" for dataset {dataset!r}: {e}', "bad_ground_truth") from None


def read_rlvr_jsonl(
    path: str | os.PathLike, *, on_bad_line: OnBadLine = "error", start_index: int = 0
) -> tuple[list[RLVRRecord], ReadStats]:
    """One RLVR JSONL file, verifier-checked; DataError on the first bad line unless
    on_bad_line="skip"."""
    return rlvr.read_rlvr_jsonl(
        path, on_bad_line=on_bad_line, start_index=start_index, check=verifier_check
    )


def read_rlvr(
    paths: str | os.PathLike | Sequence[str | os.PathLike], *, on_bad_line: OnBadLine = "error"
) -> tuple[list[RLVRRecord], ReadStats]:
    """Several RLVR files, verifier-checked, indices dense across files in the given order."""
    return rlvr.read_rlvr(paths, on_bad_line=on_bad_line, check=verifier_check)


def load_rlvr_prompts(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: Any,
    *,
    max_prompt_length: int | None = None,
    on_bad_line: OnBadLine = "error",
    allow_open: bool = False,
) -> tuple[list[RLVRPrompt], ReadStats, RLVRTokenizeStats]:
    """Read + verifier-check + tokenize: (prompts, ReadStats, RLVRTokenizeStats);
    allow_open: lines without ground_truth are open-ended prompts (a reward model scores them)."""
    return rlvr.load_rlvr_prompts(
        paths, tokenizer, max_prompt_length=max_prompt_length, on_bad_line=on_bad_line,
        check=verifier_check, allow_open=allow_open,
    )  # fmt: skip
