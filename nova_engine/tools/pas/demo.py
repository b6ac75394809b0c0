"""`make demo-pas`: the PAS pipeline end to end on tiny models, on CPU (about 7 minutes of CPU
time, most of it the tutor's SFT).

    python -m nova_engine.tools.pas.demo --out demo_out/pas

1. a tiny tokenizer (nova_engine.data.tiny) and a prompt pool of 40 short prompts written
   here, with exact and near duplicates among them;
2. a tiny "tutor" model (nova_engine.model.tiny, random init) taught the three formats the
   pipeline asks for by a short SFT run (recipes/pas_tiny_cpu.yaml + overrides) on data made
   from the shipped seeds and the pool: category answers for the pool's prompts (labels
   written here: the tutor has seen these very questions; a demo, not an evaluation), seed
   complements from few-shot prompts, JSON verdicts (accept the seed's complement, reject
   another category's). It is the teacher AND the judge. A randomly initialized model would produce no parseable verdict at all, so
   nothing would be written;
3. `nova pas build-data` with the tutor as teacher and judge;
4. the PAS model: SFT of the tutor on what build-data wrote (recipes/pas_tiny_cpu.yaml);
5. `nova pas augment` on one file mixing lines of the SFT, preference and RLVR layouts; the
   output, split by layout, read back with each layout's loader.
Each step runs as its own process (as a user would run it); counts and a few examples are
printed. What the tiny models write is shown as it is: ~270k parameters trained on 100
examples, so expect fragments of the seeds' wording, not good complements.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

from nova_engine.progress import emit

RECIPE = "recipes/pas_tiny_cpu.yaml"
TUTOR = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024)  # fmt: skip

# (category, prompt): the pool, with exact (case/punctuation) and near duplicates
POOL = [
    ("qa", "Why do cats purr?"),
    ("qa", "What is the capital of Australia?"),
    ("qa", "How do vaccines train the immune system?"),
    ("qa", "why do cats purr"),  # exact duplicate after normalization
    ("coding", "Write a Python function that reverses a linked list."),
    ("coding", "How do I read a CSV file with pandas and skip the first row?"),
    ("coding", "Explain the difference between a list and a tuple in Python."),
    ("coding", "Please write a Python function that reverses a linked list."),  # near
    ("math", "What is 15 percent of 240?"),
    ("math", "Solve for x: 3x + 7 = 22."),
    ("math", "How many seconds are there in a week?"),
    ("math", "Solve for x: 3x + 7 = 22"),  # exact
    ("writing", "Write a haiku about the sea."),
    ("writing", "Write a short story opening about a lighthouse keeper."),
    ("writing", "Draft a thank you note to a colleague who helped me move."),
    ("writing", "Write a short story opening about a lighthouse keeper, please."),  # near
    (
        "reasoning",
        "If it takes 5 machines 5 minutes to make 5 widgets, how long do 100 machines take for 100 widgets?",
    ),
    ("reasoning", "Tom is taller than Ann and Ann is taller than Bob. Who is the shortest?"),
    ("summarization", "Summarize the plot of Romeo and Juliet in three sentences."),
    ("summarization", "Give me the main points of this article about remote work."),
    ("translation", "Translate 'good morning, how are you?' into Spanish."),
    ("translation", "How do you say 'where is the library' in German?"),
    ("roleplay", "Pretend you are a tour guide in ancient Rome."),
    ("roleplay", "Act as a customer support agent for an internet provider."),
    ("brainstorming", "Give me ideas for a science fair project."),
    ("brainstorming", "Suggest themes for a company team building day."),
    ("advice", "How can I stop procrastinating?"),
    ("advice", "What should I look for when buying a used car?"),
    ("advice", "How can I stop procrastinating??"),  # exact
    ("qa", "What causes the seasons on Earth?"),
    ("coding", "What does the yield keyword do in Python?"),
    ("math", "What is the area of a circle with radius 4?"),
    ("writing", "Write a limerick about a forgetful cat."),
    (
        "reasoning",
        "A bat and a ball cost 1.10 in total. The bat costs 1.00 more than the ball. What does the ball cost?",
    ),
    ("summarization", "Summarize the causes of the French Revolution briefly."),
    ("translation", "Translate 'thank you for your help' into Italian."),
    ("roleplay", "You are a medieval blacksmith. Greet a customer."),
    ("brainstorming", "List ideas for using leftover rice."),
    ("advice", "How do I prepare for a job interview?"),
    ("qa", "So what causes the seasons on Earth?"),  # near
]


def _run(cmd: list[str], what: str, ok: tuple[int, ...] = (0,)) -> float:
    emit(f"\n$ {' '.join(cmd)}")
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run(cmd, env=env)
    if r.returncode not in ok:
        raise SystemExit(f"demo-pas: {what} failed (exit {r.returncode})")
    return time.perf_counter() - t0


def _write(path: str, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def tutor_records(seeds, categories, shots: int) -> list[dict]:
    """The tutor's SFT data: the three reply formats of the pipeline, from the seeds and the
    demo pool's own category labels."""
    from nova_engine.tools.pas import prompts as P

    def chat(user: str, assistant: str) -> dict:
        return {"messages": [{"role": "user", "content": user},
                             {"role": "assistant", "content": assistant}]}  # fmt: skip

    out = [chat(P.category_prompt(p, categories), c) for c, p in dict.fromkeys(POOL)]
    for i, s in enumerate(seeds):
        others = [t for t in seeds if t is not s]
        out.append(chat(P.complement_prompt(s.prompt, P.pick_seeds(others, s.category, s.prompt, shots)),
                        s.complement))  # fmt: skip
        out.append(chat(P.judge_prompt(s.prompt, s.complement),
                        json.dumps({"verdict": "accept", "reason": "keeps the intent and guides the answer"})))  # fmt: skip
        wrong = next(t for t in seeds[i + 1 :] + seeds[:i] if t.category != s.category)
        out.append(chat(P.judge_prompt(s.prompt, wrong.complement),
                        json.dumps({"verdict": "reject", "reason": "drifts from the prompt's intent"})))  # fmt: skip
    return out


def _show_examples(path: str, n: int, field: str | None = None) -> None:
    with open(path, encoding="utf-8") as f:
        lines = [json.loads(x) for x in f if x.strip()]
    for rec in lines[:n]:
        if field is None:
            emit(f"  [{rec.get('category')}] {rec['messages'][0]['content']!r}\n"
                 f"      -> {rec['messages'][1]['content']!r}")  # fmt: skip
        else:
            emit(f"  {json.dumps(rec, ensure_ascii=False)[:400]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nova_engine.tools.pas.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", default="demo_out/pas")
    p.add_argument("--tutor-epochs", type=int, default=8)
    p.add_argument("--pas-epochs", type=int, default=8)
    args = p.parse_args(argv)
    out = args.out
    os.makedirs(out, exist_ok=True)
    t_start = time.perf_counter()

    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.model.tiny import build_tiny_hf_model
    from nova_engine.tools.pas import prompts as P
    from nova_engine.tools.pas.records import parse_categories, read_seeds

    seeds = read_seeds()
    categories = parse_categories(None, seeds)
    tok_dir = os.path.join(out, "tokenizer")
    corpus = [s.prompt for s in seeds] + [s.complement for s in seeds] + [x for _, x in POOL]
    corpus += [P.COMPLEMENT_TASK, P.JUDGE_TASK, P.JUDGE_FORMAT, P.JUDGE_RETRY, " ".join(categories)]
    build_tiny_tokenizer(tok_dir, vocab_size=1024, extra_corpus=corpus)
    from nova_engine.data.tokenize import load_tokenizer

    vocab = len(load_tokenizer(tok_dir))
    pool = os.path.join(out, "pool.jsonl")
    _write(pool, [{"id": f"p{i:02d}", "prompt": x} for i, (_, x) in enumerate(POOL)])
    tutor_data = os.path.join(out, "tutor_sft.jsonl")
    tutor = tutor_records(seeds, categories, shots=1)
    _write(tutor_data, tutor)
    init = os.path.join(out, "tutor_init")
    build_tiny_hf_model(init, "llama", 0, vocab_size=vocab, **TUTOR)
    emit(f"[demo-pas] in {out}: tokenizer ({vocab} tokens), pool of {len(POOL)} prompts, tutor "
         f"data of {len(tutor)} examples, random tutor (llama, hidden {TUTOR['hidden_size']}, "
         f"{TUTOR['num_hidden_layers']} layers)")  # fmt: skip

    py = sys.executable
    tutor_dir = os.path.join(out, "tutor")
    times = {}
    times["tutor sft"] = _run([py, "-m", "nova_engine.train", "sft", "--recipe", RECIPE,
        f"model.hf_path={init}", f"model.tokenizer_path={tok_dir}",
        f"data.train_paths=[{tutor_data}]", "data.max_length=1024", "train.micro_batch_tokens=4096",
        f"train.epochs={args.tutor_epochs}", "train.global_batch_size=4", "optim.lr=3e-3",
        f"train.out_dir={tutor_dir}", "train.log_every=50"], "the tutor's SFT")  # fmt: skip
    tutor_hf = os.path.join(tutor_dir, "hf")
    sft = os.path.join(out, "pas_sft.jsonl")
    # exit 2: nothing passed the judge (the report says why; handled below)
    times["build-data"] = _run([py, "-m", "nova_engine.cli", "pas", "build-data",
        "--prompts", pool, "--teacher", tutor_hf, "--judge", tutor_hf, "--tokenizer", tok_dir,
        "--out", sft, "--max-new-tokens", "64", "--judge-max-new-tokens", "48",
        "--shots", "1"], "nova pas build-data", ok=(0, 2))  # fmt: skip
    with open(sft + ".report.json") as f:
        report = json.load(f)
    if report["counts"]["written"] == 0:
        emit("[demo-pas] build-data wrote no pairs (the tiny judge accepted none): no PAS model "
             "to train; the counts above say where the prompts went")  # fmt: skip
        return 0
    emit("\n[demo-pas] a few pairs build-data wrote (tiny models, shown as they are):")
    _show_examples(sft, 3)
    pas_dir = os.path.join(out, "pas_model")
    times["pas sft"] = _run([py, "-m", "nova_engine.train", "sft", "--recipe", RECIPE,
        f"model.hf_path={tutor_hf}", f"model.tokenizer_path={tok_dir}",
        f"data.train_paths=[{sft}]", f"train.epochs={args.pas_epochs}",
        f"train.out_dir={pas_dir}"], "the PAS model's SFT")  # fmt: skip

    # one augment run over a file mixing the SFT, preference and RLVR layouts (augment reads
    # the prompt wherever it sits); the output is split back by layout and read by its loader
    layouts = _augment_inputs()
    src, dst = os.path.join(out, "augment_in.jsonl"), os.path.join(out, "augment_out.jsonl")
    _write(src, [rec for recs in layouts.values() for rec in recs])
    times["augment"] = _run([py, "-m", "nova_engine.cli", "pas", "augment",
        "--pas-model", os.path.join(pas_dir, "hf"), "--tokenizer", tok_dir,
        "--in", src, "--out", dst, "--max-new-tokens", "48"], "nova pas augment")  # fmt: skip
    with open(dst, encoding="utf-8") as f:
        lines = [json.loads(x) for x in f if x.strip()]
    emit("\n[demo-pas] augmented lines, read back with the stage loaders:")
    start = 0
    for name, recs in layouts.items():
        part = os.path.join(out, f"augmented_{name}.jsonl")
        _write(part, lines[start : start + len(recs)])
        start += len(recs)
        emit(f"  {name:<5} {_read_back(name, part)} records in {part}")
    _show_examples(os.path.join(out, "augmented_rlvr.jsonl"), 2, field="all")
    emit("\n[demo-pas] step times: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
         + f"; total {time.perf_counter() - t_start:.0f}s (CPU)")  # fmt: skip
    return 0


def _augment_inputs() -> dict[str, list[dict]]:
    """A few lines of each layout the stages read (SFT chat, preference pairs, RLVR)."""
    return {
        "sft": [
            {"id": "s1", "messages": [{"role": "user", "content": "Why is the ocean salty?"},
                                      {"role": "assistant", "content": "Rivers carry salts."}]},
            {"id": "s2", "messages": [{"role": "user", "content": "Write a haiku about snow."},
                                      {"role": "assistant", "content": "White hush on the hills."}]},
        ],
        "pref": [
            {"prompt": "Suggest a name for a bakery.", "chosen": "Rise and Shine",
             "rejected": "Shop"},
            {"chosen": [{"role": "user", "content": "What is 7 times 8?"},
                        {"role": "assistant", "content": "56"}],
             "rejected": [{"role": "user", "content": "What is 7 times 8?"},
                          {"role": "assistant", "content": "54"}]},
        ],
        "rlvr": [
            {"messages": [{"role": "user", "content": "What is 12 + 30? Answer with the number."}],
             "ground_truth": "42", "dataset": "arithmetic"},
            {"messages": [{"role": "user", "content": "What is 9 - 4? Answer with the number."}],
             "ground_truth": "5", "dataset": "arithmetic"},
        ],
    }  # fmt: skip


def _read_back(name: str, path: str) -> int:
    from nova_engine.data.formats import read_pref_jsonl, read_sft_jsonl
    from nova_engine.rl.prompts import read_rlvr_jsonl

    readers: dict[str, Callable[[str], tuple[list, object]]] = {
        "sft": read_sft_jsonl, "pref": read_pref_jsonl, "rlvr": read_rlvr_jsonl,
    }  # fmt: skip
    records, _ = readers[name](path)
    return len(records)


if __name__ == "__main__":
    sys.exit(main())
