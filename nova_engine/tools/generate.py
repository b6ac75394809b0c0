"""`nova generate`: sample responses from a model (HF directory or training checkpoint) for the
prompts of a JSONL file, on the engine's own KV-cache decoding at any TP x PP layout.

    nova generate --model runs/sft/hf --prompts in.jsonl --out out.jsonl --temperature 0
    nova generate --model runs/sft/checkpoints/step_00000200 --tokenizer tok/ \\
        --prompts in.jsonl --out out.jsonl --temperature 1.0 --top-p 0.9 --num-samples 4 --seed 7
    torchrun --nproc_per_node 4 -m nova_engine.cli generate --tp 2 --pp 2 --model ... ...

Input lines (JSON objects; blank lines are skipped): `messages` (a chat; the template is
applied with the generation prompt) or `prompt` (a string: one user turn). Optional per
line: `max_new_tokens` (int) and `stop` (token strings that end generation, instead of
--stop). Output lines keep every input field and add `response` (text without special
tokens; a list when --num-samples > 1), `tokens`, `logprobs` (fp32 log-probs of the model's own
distribution), `finish_reason` ("stop" | "length") and with --entropy `entropies`.

Stop tokens default to the chat template's end of turn and EOS. --temperature 0 is greedy.
The sample i of line j depends only on (--seed, j, i): not on the batch, the layout, or
which other lines are in the file. Under torchrun the lines are split over DP replicas.

Exit status 0, or 2 with one line naming the file:line (or option) for a user error: a
bad JSON line, a line without messages/prompt, an empty prompt, a prompt that fills the
model's context, an unknown stop token, a model or tokenizer directory that is not one.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from nova_engine.logging import get_logger
from nova_engine.progress import emit, format_duration

log = get_logger(__name__)


class UserError(ValueError):
    """A problem with the command's inputs (one line, exit 2)."""


@dataclass
class PromptLine:
    record: dict[str, Any]
    where: str  # path:line
    tokens: list[int]
    max_new_tokens: int | None
    stop_ids: list[int] | None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nova generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", required=True, help="HF model directory or training checkpoint")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's HF directory)")
    p.add_argument("--prompts", required=True, help="input JSONL (messages or prompt per line)")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k")
    p.add_argument("--max-new-tokens", type=int, default=256)
    # not `--n`: torchrun's parser takes `--n` for an ambiguous abbreviation of its own flags
    # (--nnodes, --nproc-per-node, ...) even after the module name, and exits
    p.add_argument("--num-samples", dest="n", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=None,
                   help="stop token (string in the vocabulary, or an id); repeatable; "
                        "default: the template's end of turn and EOS")  # fmt: skip
    p.add_argument("--entropy", action="store_true", help="also write per-token entropies")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--batch-size", type=int, default=64, help="rows (prompt x sample) per batch")
    return p


# ------------------------------------------------------------------------------- inputs


def resolve_model_dir(path: str) -> str:
    """An HF directory, or the hf/ export inside a training checkpoint."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    from nova_engine.train.checkpoint_parts import HF_SUBDIR

    sub = os.path.join(path, HF_SUBDIR)
    if os.path.isfile(os.path.join(sub, "config.json")):
        from nova_engine.train import checkpoint_io

        try:  # a checkpoint's reader checks what the manifest recorded (sizes, checksums)
            files = checkpoint_io.read_manifest(path)["files"]
            checkpoint_io.verify_checksums(
                path, [r for r in files if r.startswith(HF_SUBDIR + "/")]
            )
        except checkpoint_io.CheckpointIOError as e:
            raise UserError(f"--model {e}") from None
        return sub
    if os.path.isfile(os.path.join(path, "COMPLETE")):
        raise UserError(
            f"--model {path}: checkpoint without an {HF_SUBDIR}/ export "
            "(checkpoint.hf_in_checkpoints was off); point --model at an HF directory"
        )
    raise UserError(f"--model {path}: neither an HF model directory (config.json) nor a checkpoint")


def stop_token_id(tok, text: str | int, where: str) -> int:
    """A stop token given as a vocabulary string or an integer id."""
    vocab = len(tok)
    if isinstance(text, int) or (isinstance(text, str) and text.isdigit()):
        tid = int(text)
        if not 0 <= tid < vocab:
            raise UserError(f"{where}: unknown stop token id {tid} (vocabulary of {vocab})")
        return tid
    if not isinstance(text, str) or not text:
        raise UserError(f"{where}: stop token {text!r}: expected a non-empty string or an id")
    tid = tok.convert_tokens_to_ids(text)
    if not isinstance(tid, int) or tid < 0 or (tid == tok.unk_token_id and text != tok.unk_token):
        raise UserError(
            f"{where}: unknown stop token {text!r}: not a single token of the vocabulary"
        )
    return tid


def read_prompts(path: str, ct, context: int) -> list[PromptLine]:
    """Parse and tokenize every line; UserError names path:line."""
    out = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise UserError(f"--prompts {path}: {e.strerror}") from None
    with f:
        for n, line in enumerate(f, 1):
            where = f"{path}:{n}"
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            out.append(_prompt_line(rec, where, ct, context))
    if not out:
        raise UserError(f"--prompts {path}: no prompts (every line is blank)")
    return out


def _prompt_line(rec: dict, where: str, ct, context: int) -> PromptLine:
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f"{where}: empty prompt (messages must be a non-empty list)")
        for m in msgs:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):  # fmt: skip
                raise UserError(f"{where}: each message needs string 'role' and 'content'")
        if not any(m["content"].strip() for m in msgs):
            raise UserError(f"{where}: empty prompt (every message content is empty)")
    elif "prompt" in rec:
        if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
            raise UserError(f"{where}: empty prompt (prompt must be a non-empty string)")
        msgs = [{"role": "user", "content": rec["prompt"]}]
    else:
        raise UserError(f"{where}: expected a 'messages' list or a 'prompt' string")
    tokens = ct.prompt_ids(msgs)
    if len(tokens) >= context:
        raise UserError(
            f"{where}: prompt of {len(tokens)} tokens is longer than the model's context "
            f"({context} tokens, leaving room for at least one new token)"
        )
    max_new = rec.get("max_new_tokens")
    if max_new is not None and (not isinstance(max_new, int) or isinstance(max_new, bool)
                                or max_new < 1):  # fmt: skip
        raise UserError(f"{where}: max_new_tokens={max_new!r}, expected an integer >= 1")
    stop = rec.get("stop")
    stop_ids = None
    if stop is not None:
        if not isinstance(stop, list):
            raise UserError(f"{where}: stop must be a list of tokens")
        stop_ids = [stop_token_id(ct.tokenizer, s, where) for s in stop]
    return PromptLine(rec, where, tokens, max_new, stop_ids)


# --------------------------------------------------------------------------------- run


def _progress(t0: float):
    def report(done: int, total: int) -> None:
        dt = time.perf_counter() - t0
        eta = dt / done * (total - done) if done else float("nan")
        emit(f"[generate] {done}/{total} samples ({100.0 * done / total:.1f}%) | "
             f"elapsed {format_duration(dt)} | eta {format_duration(eta)}")  # fmt: skip

    return report


def _output(line: PromptLine, gens, tok, n: int, entropy: bool) -> dict[str, Any]:
    texts = [tok.decode(g.tokens, skip_special_tokens=True) for g in gens]
    rec = dict(line.record)

    def one(xs):
        return xs if n > 1 else xs[0]

    rec["response"] = one(texts)
    rec["tokens"] = one([g.tokens for g in gens])
    rec["logprobs"] = one([g.logprobs for g in gens])
    rec["finish_reason"] = one([g.finish_reason for g in gens])
    if entropy:
        rec["entropies"] = one([g.entropies for g in gens])
    return rec


def load_arch_and_tokenizer(model: str, tokenizer: str | None) -> tuple[str, Any, Any]:
    """(model directory, ModelArch, ChatTokenizer) of an HF directory or a checkpoint
    (`resolve_model_dir`), the tokenizer from `tokenizer` or the model directory; a bad
    directory, architecture or tokenizer -> UserError naming the option."""
    from nova_engine.config import ConfigError
    from nova_engine.data.tokenize import ChatTokenizer, TemplateError
    from nova_engine.model.arch import ArchitectureError, load_arch
    from nova_engine.train.safety import check_policy_dir

    model_dir = resolve_model_dir(model)
    try:
        check_policy_dir("--model", model_dir)  # sampling needs the LM head
    except ConfigError as e:
        raise UserError(str(e)) from None
    try:
        arch = load_arch(model_dir)
    except ArchitectureError as e:
        raise UserError(f"--model: {e}") from None
    tok_dir = tokenizer or model_dir
    try:
        ct = ChatTokenizer(tok_dir)
    except TemplateError as e:
        raise UserError(f"--tokenizer {tok_dir}: {e}") from None
    except (OSError, ValueError) as e:
        raise UserError(
            f"--tokenizer {tok_dir}: no tokenizer there ({e}); pass --tokenizer"
        ) from None
    return model_dir, arch, ct


def _check_writable(out: str) -> None:
    """UserError unless `out` (its .tmp first) can be written."""
    try:
        with open(out + ".tmp", "w"):
            pass
        os.remove(out + ".tmp")
    except OSError as e:
        raise UserError(f"--out {out}: not writable ({e.strerror or e})") from None


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from nova_engine.generate import Request, SamplingParams, generate
    from nova_engine.model.arch import ArchitectureError

    model_dir, arch, ct = load_arch_and_tokenizer(args.model, args.tokenizer)
    lines = read_prompts(args.prompts, ct, arch.max_position_embeddings)
    _check_writable(args.out)  # before generating everything, not after
    if args.stop is not None:
        stops = [stop_token_id(ct.tokenizer, s, "--stop") for s in args.stop]
    else:
        stops = ct.eos_token_ids
    try:
        params = SamplingParams(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            max_new_tokens=args.max_new_tokens, stop_token_ids=tuple(stops), n=args.n,
            seed=args.seed, return_entropy=args.entropy,
        )  # fmt: skip
    except ValueError as e:
        raise UserError(f"sampling options: {e}") from None

    from nova_engine.model.build import build_model
    from nova_engine.model.hf_io import CheckpointError, load_hf_weights
    from nova_engine.parallel.state import LayoutError, initialize_parallel
    from nova_engine.train.runner import ensure_process_group_env

    try:
        arch.check_layout(args.tp, args.pp)
        ensure_process_group_env()
        ps = initialize_parallel(tp=args.tp, pp=args.pp, seed=args.seed)
    except (ArchitectureError, LayoutError) as e:
        raise UserError(f"layout: {e}") from None
    chunks = build_model(arch, ps, precision=args.precision, init_weights=False)
    try:
        load_hf_weights(chunks, arch, ps, model_dir)
    except CheckpointError as e:  # a damaged or truncated shard, a missing tensor
        raise UserError(f"--model {e}") from None
    mine = list(range(ps.dp_rank, len(lines), ps.dp))
    requests = [
        Request(lines[j].tokens, index=j, max_new_tokens=lines[j].max_new_tokens,
                stop_token_ids=lines[j].stop_ids)
        for j in mine
    ]  # fmt: skip
    t0 = time.perf_counter()
    outs = generate(
        chunks, ps, arch, requests, params, max_batch_size=args.batch_size,
        on_batch_done=_progress(t0),
    )  # fmt: skip
    local = {j: [(g.tokens, g.logprobs, g.entropies, g.finish_reason) for g in o]
             for j, o in zip(mine, outs)}  # fmt: skip
    if ps.dp > 1:
        parts: list[Any] = [None] * ps.dp
        dist.all_gather_object(parts, local, group=ps.dp_group)
        for p in parts:
            local.update(p)
    if ps.rank == 0:
        from nova_engine.generate import Generation

        tmp = args.out + ".tmp"
        n_tok = 0
        with open(tmp, "w", encoding="utf-8") as f:
            for j, line in enumerate(lines):
                gens = [Generation(j, i, t, lp, e, fr) for i, (t, lp, e, fr) in enumerate(local[j])]
                n_tok += sum(len(g.tokens) for g in gens)
                f.write(json.dumps(_output(line, gens, ct.tokenizer, args.n, args.entropy)) + "\n")
        os.replace(tmp, args.out)
        dt = time.perf_counter() - t0
        emit(f"[generate] wrote {len(lines)} lines ({n_tok} tokens, {n_tok / dt:.1f} tok/s) "
             f"to {args.out}")  # fmt: skip
    dist.barrier()
    return 0


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from nova_engine.generate import GenerationError

    args = _parser().parse_args(argv)
    owned = not dist.is_initialized()  # a process group this command starts, it also ends
    try:
        return run(args)
    except (UserError, GenerationError) as e:
        emit(f"nova generate: {e}", err=True)
        return 2
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()
