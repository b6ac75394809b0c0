"""Golden per-step losses of the tiny model: SFT, DPO and RM, one process (world 1).

    .venv/bin/python tests/engine/golden/run_golden.py --write --stages rm   # regenerate one
    python3 tests/engine/golden/run_golden.py --check --precision bf16 --rtol 3e-2 --atol 2e-3

--write stores sft.json / dpo.json / rm.json next to this file (--stages: which; default
all): the settings of the runs and, per step, (loss, grad_norm). The spawned multi-rank
tests (test_train_sft.py, test_train_dpo.py) build the same model and data, assert that
their settings equal the stored ones, and compare every layout's losses with these, so a
change that shifts every layout alike is caught; rm.json (Scaled BT on pairs and regression
on attribute scores, the HelpSteer2 chain's two losses, with the settings of
test_train_rm.py) is checked by test_golden_rm.py in this folder. Regenerate only for an
intended change of the numerics, and say why in the commit.

--check runs the same steps on this machine's device (CUDA + NCCL when present: the
one-GPU end-to-end smoke run of benchmarks/gpu_session.sh) and compares with the stored
losses within --rtol + --atol (bf16 weights and activations with fp32 master weights track
fp32 within ~2%; on CPU bf16 measured <= 2.2e-4 relative for SFT, <= 9.5e-3 for DPO's small
late losses). Exit 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "..")))

# the settings of tests/engine/test_train_sft.py / test_train_dpo.py
SFT = dict(
    data_seed=5,
    n_sft=80,
    max_length=64,
    model_seed=0,
    num_hidden_layers=4,
    global_batch_size=8,
    micro_batch_tokens=64,
    batch_seed=3,
    lr=2e-3,
    weight_decay=0.01,
    grad_clip=1.0,
    schedule="cosine",
    warmup_steps=1,
    runs=[6, 10],
)
DPO = dict(
    data_seed=2,
    n_pref=16,
    max_length=64,
    model_seed=1,
    num_hidden_layers=2,
    global_batch_size=16,
    micro_batch_tokens=128,
    batch_seed=1,
    lr=3e-3,
    grad_clip=1.0,
    schedule="constant",
    loss_type="dpo_norm",
    beta=2.0,
    runs=[10],
)
RM = dict(
    data_seed=3,
    n_pref=80,
    n_regression=80,
    max_length=64,
    model_seed=1,
    num_hidden_layers=2,
    global_batch_size=8,
    micro_batch_tokens=128,
    batch_seed=1,
    lr=3e-3,
    schedule="constant",
    score_init_seed=5,
    losses=["scaled_bt", "regression"],
    runs=[10],
)
STAGES = ("sft", "dpo", "rm")
MODEL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def build(root: str, cfg: dict, kind: str):
    """(model_dir, samples) for SFT ("chat") or DPO ("pairs") under `root`."""
    from nova_engine.data.synthetic import write_task
    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.data.tokenize import load_samples
    from nova_engine.model.tiny import build_tiny_hf_model

    tok = build_tiny_tokenizer(os.path.join(root, "tok"))
    if kind == "chat":
        paths = write_task(
            os.path.join(root, "data"),
            n_sft=cfg["n_sft"],
            n_pref=4,
            n_eval=4,
            seed=cfg["data_seed"],
        )
    else:
        paths = write_task(
            os.path.join(root, "data"),
            n_sft=4,
            n_pref=cfg["n_pref"],
            n_eval=4,
            seed=cfg["data_seed"],
        )
    model_dir = os.path.join(root, "model")
    build_tiny_hf_model(
        model_dir,
        "llama",
        seed=cfg["model_seed"],
        num_hidden_layers=cfg["num_hidden_layers"],
        **MODEL,
    )
    key = "sft" if kind == "chat" else "pref"
    samples, _, _ = load_samples(paths[key], tok, kind, max_length=cfg["max_length"])
    return model_dir, samples


def _optim(cfg: dict):
    from nova_engine.config import OptimConfig

    kw = dict(lr=cfg["lr"], grad_clip=cfg["grad_clip"], schedule=cfg["schedule"])
    if "weight_decay" in cfg:
        kw.update(weight_decay=cfg["weight_decay"], warmup_steps=cfg["warmup_steps"])
    return OptimConfig(**kw)


def run_sft(model_dir, samples, steps: int, ps, precision: str = "fp32"):
    from nova_engine.train.data_source import PackedDataSource
    from nova_engine.train.engine import ModelEngine
    from nova_engine.train.loop import Loop
    from nova_engine.train.stages.sft import SFTStage

    c = SFT
    engine = ModelEngine.from_hf(
        model_dir, ps, optim=_optim(c), total_steps=steps, precision=precision
    )
    data = PackedDataSource(
        samples,
        global_batch_size=c["global_batch_size"],
        micro_batch_tokens=c["micro_batch_tokens"],
        ps=ps,
        seed=c["batch_seed"],
        max_steps=steps,
    )
    hist = Loop(engine, data).fit(SFTStage(ps))
    return [[h["loss"], h["grad_norm"]] for h in hist]


def run_dpo(model_dir, pairs, steps: int, ps, cache_dir: str, precision: str = "fp32"):
    from nova_engine.losses.dpo import DPOConfig
    from nova_engine.train.data_source import PackedDataSource
    from nova_engine.train.engine import ModelEngine
    from nova_engine.train.loop import Loop
    from nova_engine.train.ref_cache import RefCache, RefCacheKey
    from nova_engine.train.stages.dpo import DPOStage, reference_pass

    c = DPO
    engine = ModelEngine.from_hf(
        model_dir, ps, optim=_optim(c), total_steps=steps, precision=precision
    )

    def source(**kw):
        return PackedDataSource(
            pairs,
            global_batch_size=c["global_batch_size"],
            micro_batch_tokens=c["micro_batch_tokens"],
            ps=ps,
            **kw,
        )

    key = RefCacheKey(model="m", data="d", config=precision)
    cache = RefCache.open(cache_dir, key, expected=[p.index for p in pairs])
    cache = reference_pass(engine, source(shuffle=False), cache)
    stage = DPOStage(ps, DPOConfig(loss_type=c["loss_type"], beta=c["beta"]), cache)
    hist = Loop(engine, source(seed=c["batch_seed"], max_steps=steps)).fit(stage)
    return [[h["loss"], h["grad_norm"]] for h in hist]


def build_rm(root: str) -> tuple[str, dict]:
    """(model_dir, data) of the RM runs: the pairs and the attribute records, tokenized."""
    from nova_engine.data.reward import read_attribute_jsonl, read_reward_pairs, tokenize_attributes
    from nova_engine.data.synthetic_reward import write_reward_task
    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.data.tokenize import load_tokenizer, tokenize_pairs
    from nova_engine.model.hf_io import choose_pad_token_id
    from nova_engine.model.tiny import build_tiny_hf_model

    c = RM
    tok = build_tiny_tokenizer(os.path.join(root, "tok"))
    paths = write_reward_task(
        os.path.join(root, "data"),
        n_regression=c["n_regression"],
        n_pref=c["n_pref"],
        n_eval=4,
        seed=c["data_seed"],
    )
    model_dir = os.path.join(root, "model")
    build_tiny_hf_model(
        model_dir,
        "llama",
        seed=c["model_seed"],
        num_hidden_layers=c["num_hidden_layers"],
        **MODEL,
    )
    pairs, _ = tokenize_pairs(read_reward_pairs(paths["pref"])[0], tok, max_length=c["max_length"])
    attrs, _ = tokenize_attributes(
        read_attribute_jsonl(paths["regression"])[0], tok, max_length=c["max_length"]
    )
    pad = choose_pad_token_id(load_tokenizer(tok))
    return model_dir, {"pairs": (pairs, None), "attributes": (attrs.samples, attrs.targets),
                       "pad": pad}  # fmt: skip


def run_rm(model_dir, data, loss_type: str, steps: int, ps, precision: str = "fp32"):
    from nova_engine.config import OptimConfig
    from nova_engine.model.arch import load_arch
    from nova_engine.train.data_source import PackedDataSource
    from nova_engine.train.loop import Loop
    from nova_engine.train.stages import rm

    c = RM
    loss = rm.RMLossSection(loss_type=loss_type)
    samples, targets = data["pairs"] if loss.pairwise else data["attributes"]
    engine = rm.RewardEngine(
        load_arch(model_dir), ps, labels=loss.labels, pad_token_id=data["pad"], name="reward",
        weights_dir=model_dir, optim=OptimConfig(lr=c["lr"], schedule=c["schedule"]),
        total_steps=steps, score_init_seed=c["score_init_seed"], precision=precision,
    )  # fmt: skip
    src = PackedDataSource(
        samples,
        global_batch_size=c["global_batch_size"],
        micro_batch_tokens=c["micro_batch_tokens"],
        ps=ps,
        seed=c["batch_seed"],
        max_steps=steps,
    )
    hist = Loop({"reward": engine}, src).fit(rm.RMStage(ps, loss, targets))
    return [[h["loss"], h["grad_norm"]] for h in hist]


def golden_runs(precision: str = "fp32", stages=STAGES) -> dict[str, dict]:
    from nova_engine.parallel.state import destroy_parallel, initialize_parallel
    from nova_engine.train.runner import ensure_process_group_env

    ensure_process_group_env()
    out: dict[str, dict] = {s: {"config": {"sft": SFT, "dpo": DPO, "rm": RM}[s]} for s in stages}
    with tempfile.TemporaryDirectory() as root:
        if "sft" in stages:
            model_dir, samples = build(os.path.join(root, "sft"), SFT, "chat")
            for steps in SFT["runs"]:
                ps = initialize_parallel(seed=7)
                out["sft"][f"steps{steps}"] = run_sft(model_dir, samples, steps, ps, precision)
                destroy_parallel()
        if "dpo" in stages:
            model_dir, pairs = build(os.path.join(root, "dpo"), DPO, "pairs")
            for steps in DPO["runs"]:
                ps = initialize_parallel(seed=3)
                cache = os.path.join(root, f"cache{steps}")
                out["dpo"][f"steps{steps}"] = run_dpo(model_dir, pairs, steps, ps, cache, precision)
                destroy_parallel()
        if "rm" in stages:
            model_dir, data = build_rm(os.path.join(root, "rm"))
            for loss_type in RM["losses"]:
                for steps in RM["runs"]:
                    ps = initialize_parallel(seed=3)
                    out["rm"][f"{loss_type}_steps{steps}"] = run_rm(
                        model_dir, data, loss_type, steps, ps, precision
                    )
                    destroy_parallel()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="regenerate the stages' JSON files")
    ap.add_argument("--check", action="store_true", help="compare a fresh run with them")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--rtol", type=float, default=2e-5)
    ap.add_argument("--atol", type=float, default=0.0, help="absolute slack (small DPO losses)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated: sft,dpo,rm")
    args = ap.parse_args(argv)
    if args.write == args.check:
        ap.error("pass exactly one of --write / --check")
    stages = tuple(s for s in args.stages.split(",") if s)
    if not stages or set(stages) - set(STAGES):
        ap.error(f"--stages {args.stages!r}: expected a comma-separated subset of sft,dpo,rm")
    runs = golden_runs(args.precision, stages)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    if args.write:
        for stage, rec in runs.items():
            with open(os.path.join(HERE, f"{stage}.json"), "w") as f:
                json.dump(rec, f, indent=1)
            print(f"wrote {stage}.json")
        return 0
    bad = 0
    for stage, rec in runs.items():
        with open(os.path.join(HERE, f"{stage}.json")) as f:
            gold = json.load(f)
        for run, rows in rec.items():
            if run == "config":
                continue
            for i, ((loss, _), (ref, _)) in enumerate(zip(rows, gold[run])):
                ok = abs(loss - ref) <= args.rtol * abs(ref) + args.atol
                bad += not ok
                print(
                    f"{stage} {run} step {i + 1}: loss {loss:.6f} golden {ref:.6f} "
                    f"rel {abs(loss - ref) / abs(ref):.2e} {'ok' if ok else 'MISMATCH'}"
                )
    tol = f"rtol {args.rtol}, atol {args.atol}"
    print("golden check:", "FAILED" if bad else "passed", f"({args.precision}, {tol})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
