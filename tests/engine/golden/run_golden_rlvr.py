"""Golden per-step values of the rlvr stage on fixed rollouts, one process (world 1).

    .venv/bin/python tests/engine/golden/run_golden_rlvr.py --write    # regenerate (CPU, fp32)
    .venv/bin/python tests/engine/golden/run_golden_rlvr.py --check

The runs, their settings and the fixed rollouts are those of tests/engine/test_train_rlvr.py
(`single_rank_run`: PPO with a critic and GRPO, 3 steps each); --write stores, per algorithm
and step, the values named in its KEYS (policy and value loss, reward, KL, entropy, clip
fraction, pg loss) in rlvr.json. The spawned test compares every layout with them.
Regenerate only for an intended change of the numerics, and say why in the commit.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="regenerate rlvr.json")
    ap.add_argument("--check", action="store_true", help="compare a fresh run with it")
    ap.add_argument("--rtol", type=float, default=1e-4)
    args = ap.parse_args(argv)
    if args.write == args.check:
        ap.error("pass exactly one of --write / --check")
    from nova_engine.train.runner import ensure_process_group_env

    ensure_process_group_env()
    t = _test_module()
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
                if abs(a - b) > args.rtol * abs(b) + 1e-6:
                    bad += 1
                    print(f"{algo} step {i + 1} {k}: {a:.6g} golden {b:.6g} MISMATCH")
    print("golden check:", "FAILED" if bad else "passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
