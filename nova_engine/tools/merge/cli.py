"""`nova merge`: model merging and ExPO on Hugging Face safetensors directories, streamed
tensor by tensor (peak memory: a few 4 MiB chunks, not the model).

    nova merge expo --init runs/sft_hf --aligned runs/dpo_hf --alpha 0.3 --out out/dpo_expo
    nova merge expo --init runs/rm_init --aligned runs/rm --alphas 0.1,0.3,0.5,1.0 \\
        --eval heldout_pairs.jsonl --out out/rm_expo          # keeps the best alpha
    nova merge linear --models a b c --weights 0.5 0.3 0.2 --out out/avg
    nova merge task_arithmetic --base base --models math code --weights 0.7 0.5 --out out/ta
    nova merge slerp --models a b --t 0.4 --out out/slerp
    nova merge ties --base base --models a b c --density 0.2 --out out/ties

Every input is a HF model directory (model.safetensors, or shards + index) of the same
architecture; the output gets the reference model's config, tokenizer and generation config
(expo: --aligned; linear, slerp: the first model; task_arithmetic, ties: --base) and is laid
out like it (same shards, unless --max-shard-size). User errors exit with code 2 and one line.
"""

from __future__ import annotations

import argparse

import torch

from nova_engine.progress import emit

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _alphas(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated numbers, e.g. 0.1,0.3,0.5"
        ) from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output HF directory (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--max-shard-size", default=None,
                   help="reshard the output, e.g. 5GB or 2GiB (default: like the reference)")  # fmt: skip
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="output dtype of float tensors (default: as the inputs)")  # fmt: skip
    p.add_argument("--chunk-elems", type=int, default=None,
                   help="elements per streamed chunk (default 1M = 4 MiB in float32)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nova merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="method", required=True)

    e = sub.add_parser("expo", help="theta = aligned + alpha (aligned - init)")
    e.add_argument("--init", required=True, help="the model before alignment (e.g. SFT)")
    e.add_argument("--aligned", required=True, help="the aligned model (DPO, RM, ...)")
    a = e.add_mutually_exclusive_group(required=True)
    a.add_argument("--alpha", type=float, help="one extrapolation strength")
    a.add_argument("--alphas", type=_alphas, help="sweep, e.g. 0.1,0.3,0.5,1.0 (needs --eval)")
    e.add_argument("--eval", help="held-out preference pairs JSONL to score each alpha on")
    e.add_argument("--ref", help="reference policy for implicit-reward accuracy (causal LMs)")
    e.add_argument("--keep-all", action="store_true",
                   help="keep the other candidates under <out>.candidates/")  # fmt: skip
    e.add_argument("--batch-size", type=int, default=8, help="sequences per scoring batch")
    e.add_argument("--tokenizer", help="tokenizer directory for --eval (default: --aligned)")
    e.add_argument("--template", help="chat template for --eval: a built-in name or a .jinja file")
    e.add_argument("--max-length", type=int, default=None,
                   help="truncate eval sequences (default: the model's max positions)")  # fmt: skip
    _common(e)

    lin = sub.add_parser("linear", help="weighted average of N models")
    lin.add_argument("--models", nargs="+", required=True)
    lin.add_argument("--weights", nargs="+", type=float, help="default: equal")
    lin.add_argument("--no-normalize", action="store_true",
                     help="use sum w_i m_i as given (default divides by sum w_i)")  # fmt: skip
    _common(lin)

    ta = sub.add_parser("task_arithmetic", help="base + sum w_i (m_i - base)")
    ta.add_argument("--base", required=True)
    ta.add_argument("--models", nargs="+", required=True)
    ta.add_argument("--weights", nargs="+", type=float, help="default: 1 each")
    _common(ta)

    sl = sub.add_parser("slerp", help="spherical interpolation of two models")
    sl.add_argument("--models", nargs=2, required=True, metavar=("A", "B"))
    sl.add_argument("--t", type=float, default=0.5, help="0 = A, 1 = B (default 0.5)")
    _common(sl)

    ti = sub.add_parser("ties", help="TIES: trim, elect sign, disjoint mean")
    ti.add_argument("--base", required=True)
    ti.add_argument("--models", nargs="+", required=True)
    ti.add_argument("--density", type=float, default=0.2,
                    help="fraction of each task vector kept by magnitude (default 0.2)")  # fmt: skip
    ti.add_argument("--weights", nargs="+", type=float, help="default: 1 each")
    ti.add_argument("--lambda", dest="lam", type=float, default=1.0,
                    help="scale of the merged task vector (default 1)")  # fmt: skip
    _common(ti)
    return p


def _method_and_models(args):
    from nova_engine.tools.merge.methods import ExPO, Linear, Slerp, TaskArithmetic, Ties

    if args.method == "expo":
        return ExPO(args.alpha), [args.init, args.aligned]
    if args.method == "linear":
        return Linear(args.weights, normalize=not args.no_normalize), list(args.models)
    if args.method == "task_arithmetic":
        return TaskArithmetic(args.weights), [args.base, *args.models]
    if args.method == "slerp":
        return Slerp(args.t), list(args.models)
    return Ties(args.density, args.weights, args.lam), [args.base, *args.models]


def main(argv: list[str] | None = None) -> int:
    from nova_engine.data.formats import DataError
    from nova_engine.data.tokenize import TemplateError
    from nova_engine.tools.merge.core import CHUNK_ELEMS, MergeError, merge_models
    from nova_engine.tools.merge.score import ScoreError
    from nova_engine.tools.merge.sweep import expo_sweep, format_table

    args = build_parser().parse_args(argv)
    common = dict(
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
        dtype=_DTYPES[args.dtype] if args.dtype else None,
        chunk_elems=args.chunk_elems or CHUNK_ELEMS,
    )
    try:
        if args.method == "expo" and args.alphas is not None:
            if not args.eval:
                raise MergeError("--alphas needs --eval <held-out preference pairs JSONL>")
            rows = expo_sweep(args.init, args.aligned, args.alphas, args.eval, args.out,
                              ref_dir=args.ref, keep_all=args.keep_all,
                              batch_size=args.batch_size, max_length=args.max_length,
                              tokenizer_dir=args.tokenizer, template=args.template,
                              **common)  # fmt: skip
            emit(format_table(rows))
            best = next(r for r in rows if r["selected"])
            emit(f"kept alpha={best['alpha']:g} -> {args.out}")
            return 0
        if args.method == "expo" and any(
            (args.eval, args.ref, args.keep_all, args.tokenizer, args.template)
        ):
            raise MergeError(
                "--eval, --ref, --keep-all, --tokenizer and --template go with --alphas (a sweep)"
            )
        try:
            method, models = _method_and_models(args)
        except ValueError as e:
            raise MergeError(f"{args.method}: {e}") from None
        res = merge_models(method, models, args.out, **common)
    except (MergeError, ScoreError, DataError, TemplateError) as e:
        emit(f"nova merge: error: {e}", err=True)
        return 2
    params = ", ".join(f"{k}={v}" for k, v in res.record["params"].items() if v is not None)
    emit(f"{method.name} ({params}): {res.n_tensors} tensors, {res.total_bytes / 1e9:.3f} GB "
         f"in {len(res.files)} file(s) -> {res.out} ({res.seconds:.1f} s)")  # fmt: skip
    return 0
