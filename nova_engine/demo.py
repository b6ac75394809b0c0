"""`make demo`: a tiny Llama-architecture model learns multi-digit arithmetic asked in words,
SFT then DPO, on CPU in a few minutes.

    python -m nova_engine.demo --out demo_out          # what `make demo` runs

Steps (all under --out): a byte-level BPE tokenizer and the synthetic task
(nova_engine.data.synthetic: SFT conversations, preference pairs with plausible wrong
answers, held-out problems); a randomly initialized Llama model (recipes/tiny_cpu.yaml,
built on first use); SFT, then DPO (length-normalized, reference log-probs cached) with the
engine's trainer (megatron-core, world of one, fp32). After each stage the exported HF model
is evaluated with `transformers` greedy generation (KV cache) on the held-out problems
(exact match), and on held-out preference pairs (does the model give the right answer a
higher log-prob than the wrong one; after DPO also the implicit-reward accuracy against the
SFT model). Prints a table, writes results.json and loss_curves.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

from nova_engine.train.metrics import emit

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes",
                      "tiny_cpu.yaml")  # fmt: skip
N_SFT, N_PREF, N_EVAL, TASK_SEED = 8000, 2000, 200, 0


def _overrides(out: str, stage: str) -> list[str]:
    j = os.path.join
    common = [f"model.tokenizer_path={j(out, 'tokenizer')}", "train.tensorboard=false"]
    common.append("checkpoint.resume=none")  # a rerun trains afresh
    if stage == "sft":
        return common + [
            f"model.hf_path={j(out, 'model')}",
            f"data.train_paths=[{j(out, 'data', 'sft_train.jsonl')}]",
            f"data.eval_paths=[{j(out, 'data', 'eval.jsonl')}]",
            f"train.out_dir={j(out, 'sft')}",
        ]
    return common + [
        f"model.hf_path={j(out, 'sft', 'hf')}",
        f"data.train_paths=[{j(out, 'data', 'pref_train.jsonl')}]",
        f"train.out_dir={j(out, 'dpo')}",
    ]


# ------------------------------------------------------------------------------ evaluation


def _problems():
    from nova_engine.data.synthetic import make_splits, wrong_answer

    _, _, ev = make_splits(N_SFT, N_PREF, N_EVAL, seed=TASK_SEED)
    rng = random.Random(1234)
    return [(p, str(p.answer), str(wrong_answer(p, rng))) for p in ev]


def _load(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).float().eval()


@torch.no_grad()
def exact_match_accuracy(model, ct, problems, batch: int = 50) -> float:
    """Greedy generation (transformers, KV cache) on each held-out question."""
    from nova_engine.data.synthetic import exact_match

    tok = ct.tokenizer
    pad = tok.pad_token_id
    correct = 0
    for i in range(0, len(problems), batch):
        chunk = problems[i : i + batch]
        prompts = [ct.prompt_ids([{"role": "user", "content": p.question()}]) for p, _, _ in chunk]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in prompts])
        attn = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompts])
        gen = model.generate(
            input_ids=ids, attention_mask=attn, max_new_tokens=8, do_sample=False,
            eos_token_id=ct.eos_token_ids, pad_token_id=pad,
        )  # fmt: skip
        for (_, ans, _), row in zip(chunk, gen[:, width:]):
            text = tok.decode(row, skip_special_tokens=True)
            correct += exact_match(text, ans)
    return correct / len(problems)


@torch.no_grad()
def response_logps(model, ct, problems) -> torch.Tensor:
    """[P, 2] summed log-probs of the right and the wrong answer (response tokens) and
    [P, 2] their token counts."""
    sums, counts = [], []
    for p, right, wrong in problems:
        row, crow = [], []
        for ans in (right, wrong):
            msgs = [{"role": "user", "content": p.question()}]
            ids, mask = ct.encode_response(msgs, [{"role": "assistant", "content": ans}])
            x = torch.tensor([ids])
            logp = torch.log_softmax(model(x).logits[0, :-1].double(), -1)
            tgt = x[0, 1:]
            m = torch.as_tensor(mask[1:]).bool()
            row.append(logp[torch.arange(len(tgt)), tgt][m].sum().item())
            crow.append(int(m.sum()))
        sums.append(row)
        counts.append(crow)
    return torch.tensor(sums), torch.tensor(counts, dtype=torch.float64)


def evaluate(model_dir: str, ct, problems) -> dict:
    model = _load(model_dir)
    logps, counts = response_logps(model, ct, problems)
    return {
        "exact_match": exact_match_accuracy(model, ct, problems),
        "pref_acc": float((logps[:, 0] > logps[:, 1]).double().mean()),
        "logps": logps,
        "counts": counts,
    }


# ------------------------------------------------------------------------------ the run


def _plot(out: str) -> str:
    try:
        import matplotlib
    except ImportError:  # an extra of the project's [test] set, which `make demo` installs
        return "(matplotlib not installed: no PNG)"

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nova_engine.train.metrics import read_metrics

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, stage in zip(axes, ("sft", "dpo")):
        recs = read_metrics(os.path.join(out, stage, "metrics.jsonl"))
        tr = [(r["step"], r["loss"]) for r in recs if "loss" in r]
        ev = [(r["step"], r["eval/loss"]) for r in recs if "eval/loss" in r]
        if tr:
            ax.plot(*zip(*tr), label="train loss")
        if ev:
            ax.plot(*zip(*ev), "o-", label="held-out loss")
        ax.set_title(f"{stage.upper()} loss")
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "loss_curves.png")
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nova_engine.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", default="demo_out")
    p.add_argument("--recipe", default=RECIPE)
    p.add_argument("--sft", nargs="*", default=[], help="extra SFT overrides (key=value)")
    p.add_argument("--dpo", nargs="*", default=[], help="extra DPO overrides (key=value)")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    t0 = time.perf_counter()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))

    from nova_engine.data.synthetic import write_task
    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.data.tokenize import ChatTokenizer
    from nova_engine.logging import get_logger
    from nova_engine.recipe import load_recipe
    from nova_engine.train import dpo, sft

    log = get_logger("nova_engine.demo")
    tok_dir = os.path.join(out, "tokenizer")
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        build_tiny_tokenizer(tok_dir)
    write_task(os.path.join(out, "data"), n_sft=N_SFT, n_pref=N_PREF, n_eval=N_EVAL,
               seed=TASK_SEED)  # fmt: skip
    ct = ChatTokenizer(tok_dir)
    problems = _problems()
    times = {}

    sft_run = load_recipe(args.recipe, "sft", _overrides(out, "sft") + args.sft)
    from nova_engine.train.runner import ensure_model, setup_parallel

    ensure_model(sft_run, setup_parallel(sft_run))
    rows = {"initial": evaluate(sft_run.model.hf_path, ct, problems)}
    log.info("initial model: %s", {k: v for k, v in rows["initial"].items() if "acc" in k})

    t = time.perf_counter()
    sft.run(sft_run)
    times["sft"] = time.perf_counter() - t
    rows["after SFT"] = evaluate(os.path.join(out, "sft", "hf"), ct, problems)

    dpo_run = load_recipe(args.recipe, "dpo", _overrides(out, "dpo") + args.dpo)
    t = time.perf_counter()
    dpo.run(dpo_run)
    times["dpo"] = time.perf_counter() - t
    rows["after DPO"] = evaluate(os.path.join(out, "dpo", "hf"), ct, problems)

    # DPO's own metric on held-out pairs: implicit reward (length-normalized, as dpo_norm)
    # of the right answer above the wrong one's, reference = the SFT model
    ref, pol = rows["after SFT"], rows["after DPO"]
    n = pol["counts"]
    reward = (pol["logps"] - ref["logps"]) / n
    reward_acc = float((reward[:, 0] > reward[:, 1]).double().mean())
    png = _plot(out)
    total = time.perf_counter() - t0

    lines = [
        "",
        f"Nova Engine demo — held-out: {len(problems)} problems / pairs (measured, CPU)",
        f"{'model':<12} {'exact match':>12} {'pref acc (logp right > wrong)':>31}",
    ]
    for name, r in rows.items():
        lines.append(f"{name:<12} {100 * r['exact_match']:>11.1f}% {100 * r['pref_acc']:>30.1f}%")
    lines += [
        f"DPO implicit-reward accuracy on held-out pairs (ref = SFT model): {100 * reward_acc:.1f}%",
        f"time: SFT {times['sft']:.0f}s, DPO {times['dpo']:.0f}s, total {total:.0f}s",
        f"loss curves: {png}",
    ]
    emit("\n".join(lines))
    summary = {
        name: {k: v for k, v in r.items() if k in ("exact_match", "pref_acc")}
        for name, r in rows.items()
    }
    summary["dpo_reward_accuracy"] = reward_acc
    summary["seconds"] = dict(times, total=total)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
