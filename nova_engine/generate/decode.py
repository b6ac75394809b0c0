"""Batched KV-cache generation on a model's own megatron chunks, at any TP x PP (x VP) layout.

    from nova_engine.generate import Request, SamplingParams, generate
    outs = generate(chunks, ps, arch, [Request(ids) for ids in prompts],
                    SamplingParams(temperature=0.7, top_p=0.9, n=4, stop_token_ids=(eot,)))
    outs[j][i].tokens, outs[j][i].logprobs          # sample i of prompt j, on every rank

Public signature (stable; `ModelEngine.generate(*args)` calls it with its chunks, ps, arch):
    generate(chunks, ps, arch, requests, params, *, max_batch_size=64,
             max_pad_fraction=0.25, on_batch_done=None) -> list[list[Generation]]
`chunks`: this rank's model chunks (NovaGPTModel, optionally DDP-wrapped); `ps`: a
ParallelState (only its tp_group and pp_group are used); `requests`: token-id lists or
`Request`s. Every rank of the model-parallel group calls it with the same requests; DP
replicas call it with their own. Results are identical on every rank of the group.

How. megatron's attention runs as in a plain forward over each step's new positions (the
prompt at the first step, then one token), and Nova's core attention holds the KV cache
(nova_engine.generate.kv_cache: why not megatron's StaticInferenceContext cache is said
there); around that:
- ragged prompts are left-padded in the cache; the cache's mask hides the pads, and RoPE
  positions are per row (position = slot - row padding), so every token sits at its true
  position and the result equals the unpadded sequence's;
- PP: each decode step runs the chunks in pipeline order (virtual stages included), passing
  [S, B, H] activations stage to stage with send/recv on the PP group; the last stage
  computes [B, V/tp] logits of the newest position only, gathers them over TP, samples
  (nova_engine.generate.sampling) and broadcasts tokens, log-probs and entropies to the PP
  group, so every stage knows which rows finished;
- SP is switched off for the call (a one-token step cannot be split over TP ranks).
megatron's text-generation controller and inference wrapper are not used: the controller
feeds ragged prompts one token per step, samples from one global generator and asserts CUDA
tensors in its pipeline communication.

Batches and padding. Requests x samples are sorted by prompt length (a prompt's samples
side by side) and cut into batches of `max_batch_size` rows, all decoded together. The
prefill computes each distinct prompt of a batch once (its other samples get copies of its
cache rows), in groups of similar length: a group's left padding is at most
`max_pad_fraction` of its real prompt tokens (default 1/4), so the prefill computes at most
1.25x the real tokens of the distinct prompts. Decode steps run every unfinished row; a
finished row is dropped from the batch and its cache once a quarter of the batch has
finished, so fewer than 1/4 of the rows of a decode step are finished sequences. What is
not bounded: a decode step's attention also reads the padding slots of rows shorter than
the batch's longest prompt (masked; up to P - len per row), which length-sorted batches
keep small when there are many requests.

Legend: B rows in the batch, P longest prompt of the batch, S query positions of a step,
K = P + T - 1 cache length, H hidden, V vocab (Vp = V/tp on one TP rank).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist

from nova_engine.generate.kv_cache import BatchCache
from nova_engine.generate.sampling import (
    Generation,
    Request,
    SamplingParams,
    choose_tokens,
    model_logprobs,
    uniforms,
)
from nova_engine.logging import get_logger

if TYPE_CHECKING:
    from nova_engine.model.arch import ModelArch
    from nova_engine.model.build import NovaGPTModel
    from nova_engine.parallel.state import ParallelState

log = get_logger(__name__)

_PAD_ID = 0  # token fed at padded cache slots (masked out everywhere)
_UPCAST_ELEMS = 1 << 26  # LM-head elements upcast to fp32 at a time (256 MB; CPU fallback)
_MM_OUT_FP32: dict[str, bool] = {}  # device type -> torch.mm(bf16, bf16, out_dtype=fp32) works


class GenerationError(ValueError):
    """A request the model cannot serve (empty, too long, unknown token ids)."""


def _unwrap(m: torch.nn.Module) -> NovaGPTModel:
    """The NovaGPTModel inside DDP / Float16Module wrappers (`.module` is untyped)."""
    while isinstance(inner := getattr(m, "module", None), torch.nn.Module):
        m = inner
    return cast("NovaGPTModel", m)


# ------------------------------------------------------------------------------ the layout


@dataclass
class _Layout:
    """What the decode loop needs of the layout: groups, sizes, ranks, stage peers."""

    tp_group: dist.ProcessGroup | None
    pp_group: dist.ProcessGroup | None
    tp: int
    pp: int
    tp_rank: int
    pp_rank: int
    device: torch.device

    @classmethod
    def of(cls, ps: ParallelState, chunks: Sequence[torch.nn.Module]) -> _Layout:
        tp_group, pp_group = ps.tp_group, ps.pp_group
        tp = dist.get_world_size(tp_group) if tp_group is not None else 1
        pp = dist.get_world_size(pp_group) if pp_group is not None else 1
        return cls(
            tp_group, pp_group, tp, pp,
            dist.get_rank(tp_group) if tp > 1 else 0,
            dist.get_rank(pp_group) if pp > 1 else 0,
            next(chunks[0].parameters()).device,
        )  # fmt: skip

    def pp_global(self, pp_rank: int) -> int:
        assert self.pp_group is not None, "stage peers exist only with a PP group"
        return dist.get_global_rank(self.pp_group, pp_rank % self.pp)

    def tp_global(self, tp_rank: int) -> int:
        assert self.tp_group is not None, "TP peers exist only with a TP group"
        return dist.get_global_rank(self.tp_group, tp_rank)


# ------------------------------------------------------------------- the chunks, for a call


@contextlib.contextmanager
def _generation_mode(models: Sequence[NovaGPTModel]) -> Iterator[None]:
    """eval mode, final hidden states out of the last stage, SP off; all restored on exit."""
    saved: list[tuple[object, str, object]] = []

    def set_(obj: object, attr: str, value: object) -> None:
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    training = [m.training for m in models]
    try:
        for m in models:
            m.eval()
            set_(m, "return_hidden", True)
            if m.config.sequence_parallel:
                set_(m.config, "sequence_parallel", False)
            for sub in m.modules():
                for attr in ("sequence_parallel", "reduce_scatter_embeddings"):
                    if getattr(sub, attr, False) is True:
                        set_(sub, attr, False)
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)
        for m, was in zip(models, training):
            m.train(was)


# ------------------------------------------------------------------------------- batching


def plan_batches(
    lengths: Sequence[int], max_batch: int, max_pad_fraction: float
) -> list[list[int]]:
    """Groups of row indices: rows sorted by length (longest first, ties by index), cut so
    that a group has at most `max_batch` rows and left padding of at most
    `max_pad_fraction` x its real prompt tokens (the prefill groups of a batch)."""
    order = sorted(range(len(lengths)), key=lambda r: (-lengths[r], r))
    batches: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for r in order:
        if cur:
            n_real = real + lengths[r]
            pad = lengths[cur[0]] * (len(cur) + 1) - n_real
            if len(cur) >= max_batch or pad > max_pad_fraction * n_real:
                batches.append(cur)
                cur, real = [], 0
        cur.append(r)
        real += lengths[r]
    if cur:
        batches.append(cur)
    return batches


@dataclass
class _Row:
    prompt: list[int]
    key: int  # the prompt's global index j
    sample: int  # i
    limit: int  # tokens to generate at most
    stops: frozenset[int]
    out: Generation
    finished: bool = False


def _prefixes(req: Request, params: SamplingParams, where: str, limit: int, stops, vocab):
    """[n] (tokens, log-probs) already generated per sample (empty without req.prefix)."""
    if req.prefix is None:
        return [([], [])] * params.n
    if len(req.prefix) != params.n:
        raise GenerationError(f"{where}: {len(req.prefix)} prefixes for n={params.n} samples")
    lps = req.prefix_logprobs
    if lps is not None and len(lps) != params.n:
        raise GenerationError(f"{where}: {len(lps)} prefix log-prob lists for n={params.n}")
    out = []
    for i, pre in enumerate(req.prefix):
        pre = [int(t) for t in pre]
        lp = [float("nan")] * len(pre) if lps is None else [float(x) for x in lps[i]]
        if len(lp) != len(pre):
            raise GenerationError(f"{where}: sample {i}: {len(lp)} log-probs for {len(pre)} tokens")
        if len(pre) > limit:
            raise GenerationError(f"{where}: sample {i}: a prefix of {len(pre)} tokens is "
                                  f"longer than the limit of {limit} new tokens")  # fmt: skip
        if any(t in stops for t in pre[:-1]):
            raise GenerationError(f"{where}: sample {i}: a stop token inside the prefix")
        if any(not 0 <= t < vocab for t in pre):
            raise GenerationError(f"{where}: sample {i}: prefix token outside the vocabulary")
        out.append((pre, lp))
    return out


def _validate(
    requests, params: SamplingParams, arch
) -> list[tuple[list[int], int, int, frozenset, list]]:
    """(tokens, key, max_new, stops, prefixes) per request; GenerationError names the bad one."""
    vocab, context = arch.vocab_size, arch.max_position_embeddings
    out = []
    for k, req in enumerate(requests):
        if not isinstance(req, Request):
            req = Request(tokens=req)
        toks = [int(t) for t in req.tokens]
        where = f"request {k}" + (f" (prompt {req.index})" if req.index is not None else "")
        if not toks:
            raise GenerationError(f"{where}: empty prompt")
        if len(toks) >= context:
            raise GenerationError(
                f"{where}: prompt of {len(toks)} tokens leaves no room in the model's context "
                f"of {context} tokens (max_position_embeddings)"
            )
        bad = [t for t in toks if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"{where}: token id {bad[0]} outside the vocabulary [0, {vocab})")
        stops = params.stop_token_ids if req.stop_token_ids is None else req.stop_token_ids
        bad = [t for t in stops if not 0 <= int(t) < vocab]
        if bad:
            raise GenerationError(
                f"{where}: unknown stop token id {bad[0]} (vocabulary [0, {vocab}))"
            )
        max_new = params.max_new_tokens if req.max_new_tokens is None else req.max_new_tokens
        if max_new < 1:
            raise GenerationError(f"{where}: max_new_tokens={max_new}, expected >= 1")
        key = k if req.index is None else int(req.index)
        limit, stop_set = min(max_new, context - len(toks)), frozenset(int(t) for t in stops)
        pre = _prefixes(req, params, where, limit, stop_set, vocab)
        out.append((toks, key, limit, stop_set, pre))
    return out


# ------------------------------------------------------------------------------ the loop


def _mm_out_fp32_ok(h_BH: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch.mm(h, w.T, out_dtype=float32) runs for these low-precision operands on
    their device (CUDA in torch >= 2.8; not on CPU in torch 2.13); probed once per device
    type with a tiny product and checked against the upcast one."""
    kind = h_BH.device.type
    if kind not in _MM_OUT_FP32:
        ok = False
        if kind == "cuda":
            try:
                a, b = h_BH[:1, :8], w[:2, :8]
                got = torch.mm(a, b.t(), out_dtype=torch.float32)
                ok = got.dtype == torch.float32 and torch.allclose(
                    got, a.float() @ b.float().t(), rtol=1e-5, atol=1e-5
                )
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        if not ok:
            log.debug("decode logits: no fp32-output low-precision GEMM on %s; upcasting", kind)
        _MM_OUT_FP32[kind] = ok
    return _MM_OUT_FP32[kind]


class _Decoder:
    """One rank's side of the decode loop over its chunks (one batch at a time)."""

    def __init__(
        self,
        chunks: Sequence[torch.nn.Module],
        layout: _Layout,
        params: SamplingParams,
        max_pad_fraction: float,
    ):
        self.models = [_unwrap(c) for c in chunks]
        self.layout, self.params = layout, params
        self.max_pad_fraction = max_pad_fraction
        self.dtype = self.models[0].config.params_dtype
        self.hidden = self.models[0].config.hidden_size
        self.w_VpH: torch.Tensor | None = None  # the last stage's LM-head shard
        if self.models[-1].post_process:
            self.w_VpH = self.models[-1].lm_head_weight().detach()

    # -- one step through the pipeline --------------------------------------------------

    def _forward(self, ids_BS: torch.Tensor) -> torch.Tensor | None:
        """Run the chunks in pipeline order; the last stage returns [B, H] hidden of the
        newest position (the model's dtype), other ranks None."""
        lay, dev = self.layout, self.layout.device
        b, s = ids_BS.shape
        out = None
        for m in self.models:
            if not m.pre_process:
                buf = torch.empty(s, b, self.hidden, dtype=self.dtype, device=dev)
                dist.recv(buf, src=lay.pp_global(lay.pp_rank - 1), group=lay.pp_group)
                m.set_input_tensor(buf)
            out = m(ids_BS, None, attention_mask=None)
            if not m.post_process:
                dist.send(out.contiguous(), dst=lay.pp_global(lay.pp_rank + 1), group=lay.pp_group)
        if not self.models[-1].post_process:
            return None
        assert out is not None  # there is at least one chunk
        return out[-1]

    def _logits(self, h_BH: torch.Tensor) -> torch.Tensor:
        """[B, Vp] fp32 logits of this rank's vocab shard, accumulated and returned in fp32
        (never rounded to bf16). A bf16/fp16 head on CUDA: one GEMM in the head's dtype with an
        fp32 output (torch.mm(out_dtype=float32): cuBLAS accumulates in fp32), no fp32 copy of
        the [Vp, H] shard per step; where that kernel is missing (CPU) the head is upcast one
        slice of rows at a time (_UPCAST_ELEMS)."""
        w = self.w_VpH
        assert w is not None, "logits only on the last stage"
        if w.dtype == torch.float32:
            return h_BH.float() @ w.t()
        if h_BH.dtype == w.dtype and _mm_out_fp32_ok(h_BH, w):
            return torch.mm(h_BH, w.t(), out_dtype=torch.float32)
        h = h_BH.float()
        rows = max(1, _UPCAST_ELEMS // w.shape[1])
        return torch.cat([h @ w[i : i + rows].float().t() for i in range(0, w.shape[0], rows)], 1)

    def _pick(self, h_BH, rows: list[_Row], steps: list[int]) -> torch.Tensor:
        """Last stage: logits, choice, log-probs -> [3, B] float64 (token, logp, entropy),
        identical on every TP rank (TP rank 0's choice is broadcast)."""
        lay = self.layout
        logits_BVp = self._logits(h_BH)
        if lay.tp > 1:
            parts = [torch.empty_like(logits_BVp) for _ in range(lay.tp)]
            dist.all_gather(parts, logits_BVp.contiguous(), group=lay.tp_group)
            logits_BV = torch.cat(parts, dim=-1)
        else:
            logits_BV = logits_BVp
        u_B = None
        if not self.params.greedy:
            key = torch.tensor([r.key for r in rows], dtype=torch.int64)
            smp = torch.tensor([r.sample for r in rows], dtype=torch.int64)
            u_B = uniforms(self.params.seed, key, smp, torch.tensor(steps, dtype=torch.int64))
        tok_B = choose_tokens(logits_BV, self.params, u_B)
        # log-probs of the tempered, untruncated distribution (what RL trains on at T)
        lp_B, ent_B = model_logprobs(
            logits_BV, tok_B, self.params.return_entropy, self.params.temperature
        )
        info = torch.stack(
            [tok_B.double(), lp_B.double(), ent_B.double() if ent_B is not None else lp_B.double()]
        )
        if lay.tp > 1:
            dist.broadcast(info, src=lay.tp_global(0), group=lay.tp_group)
        return info

    def _finish(self, h_BH: torch.Tensor | None, rows: list[_Row]) -> torch.Tensor:
        """Choice on the last stage; every rank returns the [3, B] float64 step info."""
        lay = self.layout
        if h_BH is not None:
            info = self._pick(h_BH, rows, [len(r.out.tokens) for r in rows])
        else:
            info = torch.empty(3, len(rows), dtype=torch.float64, device=lay.device)
        if lay.pp > 1:
            dist.broadcast(info, src=lay.pp_global(lay.pp - 1), group=lay.pp_group)
        return info.cpu()

    def _prefill(self, rows: list[_Row], cache: BatchCache, state, p: int) -> torch.Tensor:
        """Every distinct prompt once, in length groups (left padding <= max_pad_fraction of
        a group's real tokens), each group into its rows' slots p - P_group .. p - 1; the
        other samples of a prompt get copies of its cache rows. Returns the step info of
        the first generated token."""
        dev = self.layout.device
        lens = [len(r.prompt) for r in rows]
        first: dict[tuple[int, ...], int] = {}
        src = [first.setdefault(tuple(r.prompt), b) for b, r in enumerate(rows)]
        uniq = sorted(first.values())
        hidden: dict[int, torch.Tensor] = {}
        for group in plan_batches([lens[b] for b in uniq], len(uniq), self.max_pad_fraction):
            g_rows = [uniq[i] for i in group]
            pg = lens[g_rows[0]]  # the longest: plan_batches sorts by length
            ids = torch.full((len(g_rows), pg), _PAD_ID, dtype=torch.int64)
            for i, b in enumerate(g_rows):
                ids[i, pg - lens[b] :] = torch.tensor(rows[b].prompt)
            state.begin_prefill(torch.tensor(g_rows, device=dev), p - pg, pg)
            h = self._forward(ids.to(dev))
            if h is not None:
                hidden.update(zip(g_rows, h))
        state.end_prefill(p)
        dst = [b for b in range(len(rows)) if src[b] != b]
        if dst:
            cache.copy_rows(
                torch.tensor([src[b] for b in dst], device=dev), torch.tensor(dst, device=dev), p
            )
        h_BH = torch.stack([hidden[src[b]] for b in range(len(rows))]) if hidden else None
        return self._finish(h_BH, rows)

    # -- one batch -----------------------------------------------------------------------

    def run(self, rows: list[_Row]) -> None:
        """Generate every row of one batch to its end."""
        dev = self.layout.device
        p = max(len(r.prompt) for r in rows)
        pads = torch.tensor([p - len(r.prompt) for r in rows])
        # the last token is never fed back; a partial rollout's prompt holds its prefix
        slots = p + max(r.limit - len(r.out.tokens) for r in rows) - 1
        cache = BatchCache(self.models, pads, slots)
        active = list(rows)
        with cache.installed() as state:
            info = self._prefill(rows, cache, state, p)
            while True:
                toks = info[0].long().tolist()
                for b, r in enumerate(active):
                    if not r.finished:
                        self._record(r, toks[b], info[1, b], info[2, b])
                n_done = sum(r.finished for r in active)
                if n_done == len(active):
                    break
                if 4 * n_done >= len(active):  # drop finished rows from the batch and cache
                    keep = [b for b, r in enumerate(active) if not r.finished]
                    cache.keep_rows(torch.tensor(keep, device=dev))
                    active = [active[b] for b in keep]
                    toks = [toks[b] for b in keep]
                state.begin_step(1)
                h = self._forward(torch.tensor(toks, dtype=torch.int64, device=dev)[:, None])
                state.end_step()
                info = self._finish(h, active)

    @staticmethod
    def _record(r: _Row, tok: int, logp, ent) -> None:
        r.out.tokens.append(tok)
        r.out.logprobs.append(float(logp))
        if r.out.entropies is not None:
            r.out.entropies.append(float(ent))
        if tok in r.stops:
            r.out.finish_reason, r.finished = "stop", True
        elif len(r.out.tokens) >= r.limit:
            r.out.finish_reason, r.finished = "length", True


def generate(
    chunks: Sequence[torch.nn.Module],
    ps: ParallelState,
    arch: ModelArch,
    requests: Sequence[Request | Sequence[int]],
    params: SamplingParams,
    *,
    max_batch_size: int = 64,
    max_pad_fraction: float = 0.25,
    on_batch_done: Callable[[int, int], None] | None = None,
) -> list[list[Generation]]:
    """Generate `params.n` samples for each request on this rank's `chunks` of the model
    (layout `ps`, architecture `arch`); see the module docstring. Returns, per request (in
    the given order), its samples. `max_batch_size`: rows decoded together (KV cache
    memory grows with it); `max_pad_fraction`: the prefill padding bound;
    `on_batch_done(rows_done, rows_total)` is called after each batch (progress)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size={max_batch_size}: expected >= 1")
    if max_pad_fraction < 0:
        raise ValueError(f"max_pad_fraction={max_pad_fraction}: expected >= 0")
    specs = _validate(requests, params, arch)
    rows: list[_Row] = []
    results: list[list[Generation]] = []
    for toks, key, limit, stops, prefixes in specs:
        outs = []
        for i, (pre, pre_lp) in enumerate(prefixes):
            ent = [float("nan")] * len(pre) if params.return_entropy else None
            g = Generation(prompt=key, sample=i, tokens=list(pre), logprobs=list(pre_lp),
                           entropies=ent)  # fmt: skip
            outs.append(g)
            if pre and pre[-1] in stops:  # a finished sample comes back as it was
                g.finish_reason = "stop"
            elif len(pre) == limit:
                g.finish_reason = "length"
            else:
                rows.append(_Row(toks + pre, key, i, limit, stops, g))  # continues after it
        results.append(outs)
    if not rows:
        return results
    models = [_unwrap(c) for c in chunks]
    layout = _Layout.of(ps, models)
    # batches: consecutive rows in length order (a prompt's samples side by side)
    order = sorted(range(len(rows)), key=lambda r: (-len(rows[r].prompt), r))
    batches = [order[i : i + max_batch_size] for i in range(0, len(order), max_batch_size)]
    done = 0
    with torch.no_grad(), _generation_mode(models):
        decoder = _Decoder(models, layout, params, max_pad_fraction)
        for batch in batches:
            decoder.run([rows[r] for r in batch])
            done += len(batch)
            if on_batch_done is not None:
                on_batch_done(done, len(rows))
    return results
