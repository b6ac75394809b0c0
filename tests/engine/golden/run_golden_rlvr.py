"""Golden per-step values of the rlvr stage on fixed rollouts, one process (world 1).

    .venv/bin/python tests/engine/golden/run_golden_rlvr.py --write    # regenerate (CPU, fp32)
    .venv/bin/python tests/engine/golden/run_golden_rlvr.py --check
    python3 tests/engine/golden/run_golden_rlvr.py --check --precision bf16 --rtol 3e-2 \
        --atol 5e-3                                                       # GPU smoke (NCCL)

The runs, their settings and the fixed rollouts are those of tests/engine/test_train_rlvr.py
(`single_rank_run`: PPO with a critic and GRPO, 3 steps each); --write stores, per algorithm
and step, the values named in its KEYS (policy and value loss, reward, KL, entropy, clip
fraction, pg loss) in rlvr.json. The spawned test compares every layout with them.
Regenerate only for an intended change of the numerics, and say why in the commit.

--check --precision bf16 runs the same steps with bf16 weights and activations (fp32 master
weights) on this machine's device (CUDA + NCCL when present: benchmarks/gpu_session.sh) and
compares the --keys named within --rtol + --atol. bf16 leaves out clip_frac by default (the
fraction of tokens past the clip threshold moves in steps of 1/tokens: on CPU bf16 it moved
by 9e-3 where the rest stayed within 3e-4 relative or 7e-4 absolute (kl, policy_loss)).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "..")))


def _test_module():
    path = os.path.join(HERE, "..", "test_train_rlvr.py")
    spec = importlib.util.spec_from_file_location("test_train_rlvr", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BF16_KEYS = "policy_loss,value_loss,reward_mean,kl,entropy,pg_loss"


def _with_precision(t, precision: str) -> None:
    """The test module's run_config, with train.precision set (it records fp32)."""
    import dataclasses

    base = t.run_config

    def run_config(*a, **kw):
        run = base(*a, **kw)
        return dataclasses.replace(run, train=dataclasses.replace(run.train, precision=precision))

    t.run_config = run_config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="regenerate rlvr.json")
    ap.add_argument("--check", action="store_true", help="compare a fresh run with it")
    ap.add_argument("--rtol", type=float, default=1e-4)
    ap.add_argument("--atol", type=float, default=1e-6)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--keys", default=None, help="comma-separated values to compare "
                    "(default: all; bf16: all but clip_frac)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.write == args.check:
        ap.error("pass exactly one of --write / --check")
    if args.write and args.precision != "fp32":
        ap.error("--write records fp32 (CPU) values only")
    from nova_engine.train.runner import ensure_process_group_env

    ensure_process_group_env()
    t = _test_module()
    default = BF16_KEYS if args.precision == "bf16" else ",".join(t.KEYS)
    keys = [k for k in (args.keys or default).split(",") if k]
    if not keys or set(keys) - set(t.KEYS):
        ap.error(f"--keys {args.keys!r}: expected a comma-separated subset of {','.join(t.KEYS)}")
    if args.precision != "fp32":
        _with_precision(t, args.precision)
    with tempfile.TemporaryDirectory() as root:
        runs = t.single_rank_run(t.build_assets(root))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    path = os.path.join(HERE, "rlvr.json")
    if args.write:
        with open(path, "w") as f:
            json.dump({"config": t.golden_config(), **runs}, f, indent=1)
        print(f"wrote {path}")
        return 0
    with open(path) as f:
        gold = json.load(f)
    bad = 0
    for algo, rows in runs.items():
        for i, (row, ref) in enumerate(zip(rows, gold[algo])):
            for k, a, b in zip(t.KEYS, row, ref):
                if k not in keys:
                    continue
                ok = abs(a - b) <= args.rtol * abs(b) + args.atol
                bad += not ok
                print(f"{algo} step {i + 1} {k}: {a:.6g} golden {b:.6g} "
                      f"{'ok' if ok else 'MISMATCH'}")  # fmt: skip
    tol = f"{args.precision}, rtol {args.rtol}, atol {args.atol}"
    print("golden check:", "FAILED" if bad else "passed", f"({tol})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
