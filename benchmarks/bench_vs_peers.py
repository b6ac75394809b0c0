"""Nova vs the trainers users would otherwise pick, end to end on one tiny Llama-shaped model:
SFT and DPO real tokens/s and peak memory of Nova's loop, TRL's SFTTrainer / DPOTrainer and
a plain Hugging Face training loop (the model's own forward + loss, torch AdamW), on the same
weights, data and order. Step-1 losses are checked equal (SFT: mean token NLL; DPO: log 2 at
the reference weights) before any timing counts.

    python -m benchmarks.bench_vs_peers               # CPU (fp32); TRL rows need the bench extra
    python -m benchmarks.bench_vs_peers --only dpo    # one part; the other part's rows are kept

Every step is timed interleaved: TRL's `train()` drives the rounds and, from a callback at
the end of each of its steps (its own step excluded from the timing), runs one step of the
plain loop and one of each Nova variant, each timed on its own (A B C D A B C D ...).
Without TRL the plain loop and Nova alternate. Nova runs twice: `nova` (the default eager
model) and `nova_fused` (train.fuse_elementwise=true: RMSNorm and SwiGLU through
torch.compile, `nova_engine.model.fused`; its one-time compile falls in the first step,
which no figure includes). All three see the same batch every step (the data set is one global
batch, so order cannot differ). TRL runs with activation checkpointing off (its configs turn
it on by default; neither other side recomputes). Peak memory: one more step of each once
every timing of the run is done (`_common.peak_memory`, RSS high-water mark on CPU: weights
and optimizer state excluded once allocated, activations and gradients included; its probe
makes glibc mmap every block >= 128 KiB, which would slow the steps timed after it).

DPO: sigmoid loss, beta 0.1 (TRL's defaults; Nova's own DPOConfig default is Tülu 3's
dpo_norm with beta 5, so Nova is given sigmoid / 0.1 explicitly), seeded pairs of a shared
prompt and two responses of ragged lengths (ending with the tokenizer's eos), all pairs in
one step:
- nova: ModelEngine + DPOStage + Loop.train_step, the pairs packed into one micro-batch;
  reference log-probs from `reference_pass` (forward_collect over the data set with the
  initial weights, into a RefCache; written to disk as in a real run).
- hf_loop: chosen and rejected rows padded to the longest, the model's forward, log_softmax
  + gather of the response tokens, summed per sequence; the reference sums computed once
  under torch.no_grad from the same initial weights.
- trl: DPOTrainer with precompute_ref_log_probs=True (its reference pass runs once, in the
  constructor: the like-for-like setting). The pairs go in as text that the tiny tokenizer
  encodes back to exactly the same ids (checked against TRL's tokenized data set).
The reference pass is in no step time: it has rows of its own (op dpo_ref_pass; seconds for
the whole data set and real tokens/s; nova and hf_loop timed interleaved, 5 passes each,
including Nova's cache file write; TRL's one pass in its constructor, including the data set
column it writes). A run of E epochs over the data set pays it once; its
share per step is seconds / (E x steps per epoch). Besides the loss, the three reference
passes' per-pair log-prob sums (= the step-1 policy sums) are checked equal.

Rows (benchmarks/results/vs_peers_cpu.csv; a run replaces the rows of the (op, impl, shape)
keys it measures and keeps the others): op sft_step / dpo_step / dpo_ref_pass, impl nova |
nova_fused | trl | hf_loop (TRL's peers live in benchmarks/_peers.py), shape (samples x tokens; DPO: pairs, prompt and response lengths, real
tokens per step = chosen + rejected sequences, prompt counted in both), metric
real_tokens_per_s (p50/p20/p80 over steps, the first left out), speedup_vs_hf_loop (the
plain loop's step seconds / the impl's, per round, so both come from the same moment of a
shared machine: p50/p20/p80), peak_mem_bytes, step1_loss, seconds.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks._common import peak_memory, results_path, write_rows
from benchmarks._peers import BETA, LR, _hf_model, _trl_step, trl_dpo, trl_sft

MODEL = dict(
    hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=2048, max_position_embeddings=4096,
    tie_word_embeddings=False,
)  # fmt: skip
# (tokens, samples): the same 4096 tokens per step; then 16 log-normal lengths in 64..1024
# (median ~256; the plain loop pads them to the longest, TRL's collator too)
SFT_SHAPES = ((512, 8), (128, 32), ((64, 1024), 16))
# (pairs, prompt tokens, (shortest, longest) response incl. eos): ~6.7k and ~7.7k real tokens
DPO_SHAPES = ((16, 64, (32, 256)), (64, 32, (8, 48)))
QUICK_SFT, QUICK_DPO = ((32, 4), ((8, 40), 4)), ((4, 8, (4, 12)),)


def _samples(n: int, length, vocab: int, seed: int = 0):
    """n samples of `length` tokens, or (length = (lo, hi)) of log-normal lengths (median
    ~256) clipped to [lo, hi]; every token but the first is a target."""
    from nova_engine.data.sample import Sample

    rng = np.random.default_rng(seed)
    lengths = [length] * n
    if isinstance(length, tuple):
        lengths = np.clip(rng.lognormal(np.log(256), 0.7, n), *length).astype(int).tolist()
    out = []
    for i, length in enumerate(lengths):
        mask = np.ones(length, dtype=np.uint8)
        mask[0] = 0  # the first token is never a target (HF: labels shift by one)
        out.append(Sample(rng.integers(4, vocab, length), mask, index=i))
    return out


def _tiny_model(root: str) -> str:
    from nova_engine.model.tiny import build_tiny_hf_model

    model_dir = os.path.join(root, "model")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        build_tiny_hf_model(model_dir, "llama", seed=0, **MODEL)
    return model_dir


_PS: list = []


def _parallel():
    """This process's ParallelState (a world of one), initialized once: every Nova engine of
    the run shares megatron's groups, so each stays usable until the memory pass at the end."""
    if not _PS:
        from nova_engine.parallel.state import initialize_parallel
        from nova_engine.train.runner import ensure_process_group_env

        ensure_process_group_env()
        _PS.append(initialize_parallel())
    return _PS[0]


# ----------------------------------------------------------------------------- SFT


def hf_loop_sft(model_dir, samples):
    """The plain loop: model(input_ids, labels=input_ids).loss, backward, AdamW; samples of
    unequal lengths are right-padded to the longest (attention mask, labels -100 there)."""
    model = _hf_model(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    longest = max(len(s.tokens) for s in samples)
    ids = torch.zeros(len(samples), longest, dtype=torch.long)
    attn = torch.zeros(len(samples), longest, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s.tokens)], attn[i, : len(s.tokens)] = torch.from_numpy(s.tokens), 1
    labels = ids.masked_fill(attn == 0, -100)
    mask = None if bool(attn.all()) else attn  # equal lengths: no mask, as a user would

    def step() -> float:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def nova_sft(model_dir, samples, capacity, fuse=False):
    """Nova's SFT step (SFTStage through Loop.train_step on the samples packed once); `fuse`:
    train.fuse_elementwise (compiled RMSNorm + SwiGLU; the compile lands in the first step,
    which `_stats` leaves out)."""
    from nova_engine.config import OptimConfig
    from nova_engine.train.data_source import PackedDataSource
    from nova_engine.train.engine import ModelEngine
    from nova_engine.train.loop import Loop
    from nova_engine.train.stages.sft import SFTStage

    ps = _parallel()
    optim = OptimConfig(lr=LR, schedule="constant", grad_clip=1.0)
    engine = ModelEngine.from_hf(model_dir, ps, optim=optim, total_steps=10_000,
                                 fuse_elementwise=fuse)  # fmt: skip
    data = PackedDataSource(samples, global_batch_size=len(samples), micro_batch_tokens=capacity,
                            ps=ps, shuffle=False, max_steps=10_000)  # fmt: skip
    loop, stage = Loop(engine, data), SFTStage(ps)
    batch = data.rank_microbatches(0)  # the same global batch every step, packed once

    def step() -> float:
        return float(loop.train_step(stage, batch).metrics["loss"])

    return step


# ----------------------------------------------------------------------------- DPO


def _word_ids(tok) -> list[int]:
    """Ids of the tokenizer's ' word' tokens (a space, then letters): each is a whole piece
    of the split regex, so any sequence of them decodes to text that encodes to the same ids."""
    ids = sorted(i for s, i in tok.get_vocab().items() if re.fullmatch("Ġ[A-Za-z]+", s))
    return [i for i in ids if tok.encode(tok.decode([i]), add_special_tokens=False) == [i]]


def _pairs(n: int, prompt_len: int, resp_lens: tuple[int, int], words, eos_id: int, seed=0):
    """n PairSamples (seeded): a prompt of `prompt_len` word tokens shared by a chosen and a
    rejected response of independent lengths in [resp_lens] (words, then eos); the loss mask
    is 1 on the response tokens."""
    from nova_engine.data.sample import PairSample, Sample

    rng = np.random.default_rng(seed)
    words = np.asarray(words, dtype=np.int64)
    out = []
    for i in range(n):
        prompt = rng.choice(words, prompt_len)
        sides = []
        for _ in range(2):
            r = int(rng.integers(resp_lens[0], resp_lens[1] + 1))
            tokens = np.concatenate([prompt, rng.choice(words, r - 1), [eos_id]])
            mask = np.concatenate([np.zeros(prompt_len, np.uint8), np.ones(r, np.uint8)])
            sides.append(Sample(tokens, mask, index=i))
        out.append(PairSample(sides[0], sides[1], index=i))
    return out


def hf_loop_dpo(model_dir, pairs):
    """The plain DPO loop: padded [chosen; rejected] rows, forward, log_softmax + gather of
    the response tokens' log-probs (summed per sequence), sigmoid loss against reference sums
    computed once with the initial weights. Returns (step, ref_pass); ref_pass() fills the
    reference sums and returns them (chosen [P], rejected [P])."""
    model = _hf_model(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]  # rows 0..P-1 chosen
    n_pairs, longest = len(pairs), max(len(s) for s in seqs)
    ids_BT = torch.zeros(len(seqs), longest, dtype=torch.long)  # pad id 0, masked out
    attn_BT = torch.zeros(len(seqs), longest, dtype=torch.long)
    resp_BT = torch.zeros(len(seqs), longest)
    for i, s in enumerate(seqs):
        ids_BT[i, : len(s)] = torch.from_numpy(s.tokens)
        attn_BT[i, : len(s)] = 1
        resp_BT[i, : len(s)] = torch.from_numpy(s.loss_mask.astype(np.float32))
    ref: dict[str, torch.Tensor] = {}

    def seq_logps_B() -> torch.Tensor:
        logits_BTV = model(input_ids=ids_BT, attention_mask=attn_BT).logits[:, :-1]
        lp_BT = torch.log_softmax(logits_BTV.float(), -1).gather(-1, ids_BT[:, 1:, None])
        return (lp_BT.squeeze(-1) * resp_BT[:, 1:]).sum(-1)

    def ref_pass():
        model.eval()
        with torch.no_grad():
            lp_B = seq_logps_B()
        model.train()
        ref["c"], ref["r"] = lp_B[:n_pairs], lp_B[n_pairs:]
        return ref["c"].double().numpy(), ref["r"].double().numpy()

    def step() -> float:
        lp_B = seq_logps_B()
        h = (lp_B[:n_pairs] - ref["c"]) - (lp_B[n_pairs:] - ref["r"])
        loss = -F.logsigmoid(BETA * h).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, ref_pass


def nova_dpo(model_dir, pairs, capacity, cache_dir, fuse=False):
    """Nova's DPO step (DPOStage through Loop.train_step on the pairs packed once) and its
    reference pass (`reference_pass` into a fresh RefCache under `cache_dir`). Returns
    (step, ref_pass) as hf_loop_dpo; `fuse` as nova_sft."""
    from nova_engine.config import OptimConfig
    from nova_engine.losses.dpo import DPOConfig
    from nova_engine.train.data_source import PackedDataSource
    from nova_engine.train.engine import ModelEngine
    from nova_engine.train.loop import Loop
    from nova_engine.train.ref_cache import RefCache, RefCacheKey
    from nova_engine.train.stages.dpo import DPOStage, reference_pass

    ps = _parallel()
    optim = OptimConfig(lr=LR, schedule="constant", grad_clip=1.0)
    engine = ModelEngine.from_hf(model_dir, ps, optim=optim, total_steps=10_000,
                                 fuse_elementwise=fuse)  # fmt: skip

    def source(**kw):
        return PackedDataSource(pairs, global_batch_size=len(pairs), micro_batch_tokens=capacity,
                                ps=ps, shuffle=False, **kw)  # fmt: skip

    data = source(max_steps=10_000)
    loop = Loop(engine, data)
    stage = DPOStage(ps, DPOConfig(loss_type="sigmoid", beta=BETA), None)
    batch = data.rank_microbatches(0)  # the same global batch every step, packed once
    key = RefCacheKey(model="bench_vs_peers", data=f"{len(pairs)} pairs", config=str(capacity))
    indices = [p.index for p in pairs]

    def ref_pass():
        stage.ref = reference_pass(engine, source(), RefCache(cache_dir, key, indices))
        c, r, _, _ = stage.ref.lookup(indices)
        return c, r

    def step() -> float:
        return float(loop.train_step(stage, batch).metrics["loss"])

    return step, ref_pass


# ----------------------------------------------------------------------------- driver


def _stats(tokens: int, secs: list[float]) -> tuple[float, float, float]:
    t = np.asarray(secs[1:] if len(secs) > 2 else secs)  # the first step warms up
    return tokens / np.median(t), tokens / np.quantile(t, 0.8), tokens / np.quantile(t, 0.2)


def _interleaved(impls, steps, trl=None):
    """(per-step seconds, step-1 loss) of each impl, one step of each per round, in an order
    rotated by the round (as `_common.time_interleaved`); with `trl` ((steps, on_step_end) ->
    (seconds, step-1 loss)) TRL's own loop drives the rounds."""
    secs: dict[str, list[float]] = {name: [] for name in impls}
    first: dict[str, float] = {}
    names = list(impls)

    def others():
        k = len(secs[names[0]]) % len(names)
        for name in names[k:] + names[:k]:
            fn = impls[name]
            t0 = time.perf_counter()
            loss = fn()
            secs[name].append(time.perf_counter() - t0)
            first.setdefault(name, loss)

    if trl is None:
        for _ in range(steps):
            others()
    else:
        secs["trl"], first["trl"] = trl(steps, others)
    return secs, first


def _check_losses(what: str, first: dict[str, float], expected: float) -> None:
    for name, loss in first.items():
        if abs(loss - expected) > 1e-4 * abs(expected):
            raise AssertionError(f"step-1 {what} loss of {name} {loss:.6f} != {expected:.6f}")


def _step_rows(rows, op, shape, tokens, secs, first) -> None:
    for name, s in secs.items():
        p50, p20, p80 = _stats(tokens, s)
        base = dict(op=op, impl=name, shape=shape, mode="step")
        rows.append({**base, "metric": "real_tokens_per_s", "p50": p50, "p20": p20, "p80": p80})
        rows.append({**base, "metric": "step1_loss", "p50": first[name]})
        if name != "hf_loop":  # per round: the plain loop's seconds / this impl's (paired)
            r = np.asarray(secs["hf_loop"][1:]) / np.asarray(s[1:])
            q = [float(np.quantile(r, x)) for x in (0.5, 0.2, 0.8)] if len(r) else [np.nan] * 3
            rows.append({**base, "metric": "speedup_vs_hf_loop", "p50": q[0], "p20": q[1],
                         "p80": q[2]})  # fmt: skip
    tps = {name: _stats(tokens, s)[0] for name, s in secs.items()}
    paired = {n: np.median(np.asarray(secs["hf_loop"][1:]) / np.asarray(secs[n][1:]))
              for n in secs if n != "hf_loop" and len(secs[n]) > 1}  # fmt: skip
    print(f"{op} {shape}: " + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in tps.items())
          + f"; nova/hf_loop {tps['nova'] / tps['hf_loop']:.2f}x"
          + (f" (fused {tps['nova_fused'] / tps['hf_loop']:.2f}x)" if "nova_fused" in tps else "")
          + (f", nova/trl {tps['nova'] / tps['trl']:.2f}x" if "trl" in tps else "")
          + f"; step-1 loss {first['hf_loop']:.5f}; paired per-round speedup vs hf_loop: "
          + ", ".join(f"{k} {v:.2f}x" for k, v in paired.items()))  # fmt: skip


def _memory(rows, op, shape, steps: dict) -> None:
    """Peak memory of one more step of each impl (`steps`: name -> step function)."""
    mem = {name: peak_memory(fn) for name, fn in steps.items()}
    for name, m in mem.items():
        rows.append(dict(op=op, impl=name, shape=shape, mode="step", metric="peak_mem_bytes",
                         p50=float(m)))  # fmt: skip
    print(f"{op} {shape}: peak MiB " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in mem.items()))


def bench_sft(root, tok_dir, length, n, steps, rows, use_trl, use_fused=True):
    """Times one SFT setting; returns its memory pass, to run once every timing is done."""
    model_dir = _tiny_model(root)
    samples = _samples(n, length, MODEL["vocab_size"])
    tokens = sum(len(s.tokens) for s in samples)  # real tokens (the plain loop pads)
    hf = hf_loop_sft(model_dir, samples)
    nova = nova_sft(model_dir, samples, capacity=tokens)
    ours = {"hf_loop": hf, "nova": nova}
    if use_fused:
        ours["nova_fused"] = nova_sft(model_dir, samples, capacity=tokens, fuse=True)

    def trl(steps, on_step_end):
        times, loss, _ = trl_sft(model_dir, tok_dir, samples, os.path.join(root, "trl"), steps,
                                 on_step_end)  # fmt: skip
        return times, loss

    secs, first = _interleaved(ours, steps, trl if use_trl else None)
    _check_losses("SFT", first, first["hf_loop"])
    size = f"{n}x{length}" if isinstance(length, int) else f"{n}x{length[0]}-{length[1]}"
    shape = f"{size} tokens ({tokens} real),{MODEL['hidden_size']}h{MODEL['num_hidden_layers']}L"
    if isinstance(length, int):  # the rows of earlier runs keep their key
        shape = f"{size} tokens,{MODEL['hidden_size']}h{MODEL['num_hidden_layers']}L"
    _step_rows(rows, "sft_step", shape, tokens, secs, first)
    return lambda: _memory(rows, "sft_step", shape, ours)


def bench_dpo(root, tok_dir, pairs_shape, steps, rows, use_trl, use_fused=True, ref_reps=5):
    """Times one DPO setting, (pairs, prompt tokens, (shortest, longest) response), and the
    reference passes; returns the memory pass as bench_sft."""
    from transformers import AutoTokenizer

    n, prompt_len, resp = pairs_shape
    model_dir = _tiny_model(root)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    pairs = _pairs(n, prompt_len, resp, _word_ids(tok), tok.eos_token_id)
    tokens = sum(len(p) for p in pairs)  # chosen + rejected sequences, no padding
    lo, hi = resp
    shape = (f"{n} pairs p{prompt_len} r{lo}-{hi} ({tokens} tokens),"
             f"{MODEL['hidden_size']}h{MODEL['num_hidden_layers']}L")  # fmt: skip
    hf, hf_ref = hf_loop_dpo(model_dir, pairs)
    nova, nova_ref = nova_dpo(model_dir, pairs, tokens, os.path.join(root, "ref_cache"))
    ours, refs = {"hf_loop": hf, "nova": nova}, {"hf_loop": hf_ref, "nova": nova_ref}
    if use_fused:
        ours["nova_fused"], refs["nova_fused"] = nova_dpo(
            model_dir, pairs, tokens, os.path.join(root, "ref_fused"), fuse=True
        )
    ref_secs: dict[str, list[float]] = {name: [] for name in refs}
    sums: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for _ in range(ref_reps):  # forward only: the weights stay the initial ones
        for name, fn in refs.items():
            t0 = time.perf_counter()
            sums[name] = fn()
            ref_secs[name].append(time.perf_counter() - t0)
    trainer = []

    def trl(steps, on_step_end):
        times, loss, secs, ref, t = trl_dpo(model_dir, tok_dir, pairs,
                                            os.path.join(root, "trl_dpo"), steps, on_step_end)  # fmt: skip
        ref_secs["trl"], sums["trl"] = [secs], ref
        trainer.append(t)
        return times, loss

    secs, first = _interleaved(ours, steps, trl if use_trl else None)
    _check_losses("DPO", first, math.log(2.0))  # policy = reference: -log sigmoid(0)
    c0, r0 = sums["hf_loop"]
    for name, (c, r) in sums.items():  # the reference sums = the step-1 policy sums
        err = max(np.abs(c - c0).max() / np.abs(c0).max(), np.abs(r - r0).max() / np.abs(r0).max())
        if err > 1e-5:
            raise AssertionError(f"reference log-prob sums of {name} != hf_loop's: {err:.2e}")
    _step_rows(rows, "dpo_step", shape, tokens, secs, first)
    for name, s in ref_secs.items():
        q = [float(np.quantile(s, x)) for x in (0.5, 0.2, 0.8)]
        base = dict(op="dpo_ref_pass", impl=name, shape=shape, mode="fwd")
        rows.append({**base, "metric": "seconds", "p50": q[0], "p20": q[1], "p80": q[2]})
        rows.append({**base, "metric": "real_tokens_per_s", "p50": tokens / q[0],
                     "p20": tokens / q[2], "p80": tokens / q[1]})  # fmt: skip
    print(f"dpo_ref_pass {shape}: "
          + ", ".join(f"{k} {np.median(v):.3f} s" for k, v in ref_secs.items()))  # fmt: skip
    steps_now = dict(ours)
    if trainer:
        steps_now["trl"] = _trl_step(trainer[0])
    return lambda: _memory(rows, "dpo_step", shape, steps_now)


OPS = ("sft_step", "dpo_step", "dpo_ref_pass")


def update_csv(path: str, rows: list[dict]) -> None:
    """Write `rows` to the CSV at `path`: they replace the rows of the (op, impl, shape) keys
    they measure; every other row is kept (e.g. the SFT rows when only DPO ran). Rows are
    grouped by op, then shape, then impl, in order of first appearance."""
    new = {(r["op"], r["impl"], r["shape"]) for r in rows}
    kept = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            kept = [r for r in csv.DictReader(f) if (r["op"], r["impl"], r["shape"]) not in new]
    both = kept + rows
    seen: dict = {}
    for r in both:
        seen.setdefault(r["shape"], len(seen))
        seen.setdefault((r["shape"], r["impl"]), len(seen))

    def key(r):
        op = OPS.index(r["op"]) if r["op"] in OPS else len(OPS)
        return op, seen[r["shape"]], seen[(r["shape"], r["impl"])]

    write_rows(path, sorted(both, key=key))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--no-fused", action="store_true", help="skip the nova_fused variant")
    ap.add_argument("--only", choices=("sft", "dpo"), help="one part (default: SFT, then DPO)")
    ap.add_argument("--quick", action="store_true", help="one tiny shape per part (smoke run)")
    ap.add_argument("--out", help="CSV to update (default: benchmarks/results/vs_peers_<dev>.csv)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps {args.steps}: expected >= 1")
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads {args.threads}: expected >= 1")
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        import trl  # noqa: F401

        use_trl = not args.no_trl
    except ImportError:
        print("trl not installed (pip install -e '.[bench]'): plain loop vs Nova only")
        use_trl = False
    from nova_engine.data.tiny import build_tiny_tokenizer

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as root:
        tok_dir = build_tiny_tokenizer(os.path.join(root, "tok"))
        memory = []  # measured after every timing (see bench_sft)
        if args.only in (None, "sft"):
            for length, n in QUICK_SFT if args.quick else SFT_SHAPES:
                memory.append(bench_sft(root, tok_dir, length, n, args.steps, rows, use_trl,
                                        not args.no_fused))  # fmt: skip
        if args.only in (None, "dpo"):
            for shape in QUICK_DPO if args.quick else DPO_SHAPES:
                memory.append(bench_dpo(root, tok_dir, shape, args.steps, rows, use_trl,
                                        not args.no_fused))  # fmt: skip
        for measure in memory:
            measure()
    path = args.out or results_path("vs_peers")
    update_csv(path, rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
