"""The demo's reward-model and RLVR stages (`make demo`, nova_engine.demo): each writes its
synthetic data under the demo's out directory and runs the stage's recipe section."""

from __future__ import annotations

import os
import time
import typing
from collections.abc import Sequence
from typing import Any


def demo_rm(
    out: str,
    recipe: str,
    *,
    model_dir: str,
    tokenizer_dir: str,
    n_regression: int = 1000,
    n_pref: int = 1000,
    n_eval: int = 200,
    seed: int = 0,
    far: float = 0.0,
    task: dict[str, Any] | None = None,
    overrides: Sequence[str] = (),
    bt_overrides: Sequence[str] = ("train.epochs=3",),
) -> dict[str, Any]:
    """`make demo`'s reward model: writes the synthetic reward task under out/data
    (nova_engine.data.synthetic_reward with `seed`, `far` and `task`'s max_value / ops /
    in_words), trains regression then Scaled BT from `model_dir` (the SFT export) with the
    recipe's `rm:` section (world of one) — the HelpSteer2-Preference chain of
    nova_engine.train.stages.rm.regression_then_bt, with `bt_overrides` on top for the Scaled
    BT run only (it starts from the regression model and needs fewer epochs) — and scores
    both HF exports with `transformers` on the held-out pairs (right answer vs a wrong one).
    Returns {"regression": {"accuracy", "seconds", "hf"}, "scaled_bt": {...}}; the
    regression model ranks pairs by its helpfulness output."""
    from nova_engine.data.synthetic_reward import write_reward_task
    from nova_engine.eval.reward_hf import evaluate_hf_reward_model
    from nova_engine.recipe import load_recipe
    from nova_engine.train.stages import rm

    paths = write_reward_task(os.path.join(out, "data"), n_regression=n_regression,
                              n_pref=n_pref, n_eval=n_eval, seed=seed, far=far,
                              **(task or {}))  # fmt: skip
    base = [f"model.hf_path={model_dir}", f"model.tokenizer_path={tokenizer_dir}",
            "train.tensorboard=false", "checkpoint.resume=none",
            f"data.eval_paths=[{paths['eval']}]"]  # fmt: skip
    runs = {
        "regression": ["loss.loss_type=regression", f"data.train_paths=[{paths['regression']}]"],
        "scaled_bt": ["loss.loss_type=scaled_bt", f"data.train_paths=[{paths['pref']}]",
                      f"model.init_from={os.path.join(out, 'rm_regression', 'hf')}",
                      *bt_overrides],
    }  # fmt: skip
    res: dict[str, Any] = {}
    for name, extra in runs.items():
        run_dir = os.path.join(out, f"rm_{name}")
        cfg = load_recipe(recipe, "rm", [*base, *extra, f"train.out_dir={run_dir}", *overrides])
        t0 = time.perf_counter()
        rm.run(typing.cast(rm.RMRunConfig, cfg))
        seconds = time.perf_counter() - t0
        hf = os.path.join(run_dir, "hf")
        scores = evaluate_hf_reward_model(hf, [paths["eval"]], tokenizer_dir)
        res[name] = {"accuracy": scores.accuracy, "seconds": seconds, "hf": hf}
    return res


def demo_rlvr(
    out: str,
    *,
    recipe: str | None = None,
    overrides: typing.Sequence[str] = (),
    n_prompts: int = 2000,
    skip: int = 10000,
    n_eval: int = 200,
    task_seed: int = 0,
    task: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """RLVR for `make demo`: GRPO from <out>/dpo/hf on the arithmetic task (recipe section
    `rlvr:` of recipes/tiny_cpu.yaml). Writes <out>/data/rlvr_train.jsonl (`n_prompts`
    problems after the task's first `skip` = N_SFT + N_PREF, disjoint from its eval split of
    `n_eval` with seed `task_seed` and `task`'s max_value / ops), trains into <out>/rlvr and returns {"history": per-step
    metrics, "hf": <out>/rlvr/hf (the exported policy), "seconds": wall time}."""
    from nova_engine.data.rlvr import write_arithmetic_rlvr
    from nova_engine.recipe import load_recipe
    from nova_engine.train.stages import rlvr

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    recipe = recipe or os.path.join(root, "recipes", "tiny_cpu.yaml")
    data = write_arithmetic_rlvr(os.path.join(out, "data", "rlvr_train.jsonl"), n_prompts,
                                 seed=task_seed, skip=skip, n_eval=n_eval, **(task or {}))  # fmt: skip
    j = os.path.join
    cfg = load_recipe(recipe, "rlvr", [
        f"model.hf_path={j(out, 'dpo', 'hf')}", f"model.tokenizer_path={j(out, 'tokenizer')}",
        f"data.train_paths=[{data}]", f"train.out_dir={j(out, 'rlvr')}",
        "train.tensorboard=false", "checkpoint.resume=none", *overrides,
    ])  # fmt: skip
    t0 = time.perf_counter()
    hist = rlvr.run(typing.cast(rlvr.RLVRRunConfig, cfg))
    return {"history": hist, "hf": j(out, "rlvr", "hf"), "seconds": time.perf_counter() - t0}
