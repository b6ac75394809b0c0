"""Fused vocab-parallel preference head in 3 GEMMs: per-sequence log-prob sums of a packed
batch and a loss over groups of sequences (DPO / RM pairs), with both gradients formed in the
forward pass.

    loss, logps_S, counts_S = linear_pair_logprobs(
        hidden_NH, w_VpH, targets_N, cu_seqlens, loss_mask_N, group_loss,
        num_sequences=S, group_size=2, tp_group=g, sequence_parallel=sp)

Legend: N packed tokens (rows), H hidden, Vp this rank's vocab shard (as `linear_logprobs`),
S scored sequences (sequence s = rows cu[s] ... cu[s+1]-1; rows from cu[S] on, e.g. the packing
pad, are not scored and get no gradient), G = group_size consecutive sequences form a group (a
DPO pair: chosen 2i, rejected 2i+1), Nc the rows of one chunk of whole groups.

Why 3 GEMMs. `linear_logprobs` + `seq_reduce` + a loss needs 4 N*H*Vp GEMMs: the forward must
finish each row's logsumexp before any p_j is known, and the upstream gradient of a token's
log-prob (d loss / d logp_seq) only exists after the loss, so backward recomputes the logits.
But a group's loss term is complete as soon as its G sequences are scored (DPO's reference
log-probs are constants), so chunking the rows by whole groups lets each chunk finish its
loss gradient while its logits are still in the workspace:

    z = h_r @ W.T                     GEMM 1, [Nc, Vp] fp32 workspace
    (max, sum-exp, target logit)      combined exactly over the TP group (`_tp_combine`)
    logp_t = z_t - lse_t;  lp_s = sum_{t in s} mask_t logp_t   (the chunk's sequences)
    g_s = d group_loss / d lp_s       autograd on [Nc-sized] scalars, per chunk
    dz = g_s(t) mask_t (1_t - p)      in place on the workspace
    grad_h[r] = dz @ W                GEMM 2
    grad_W  += dz.T @ h_r             GEMM 3

`group_loss(logps, counts, first)` gets the fp32 log-prob sums and loss-token counts of whole
groups (sequences first ... first+len-1, len a multiple of G) and returns their loss as a
0-dim tensor; the total loss is the sum over chunks, so it must be a SUM over groups (DPO's
`reduce_pairs` is: sum of per-pair losses / global pair count). Backward only scales the
stored gradients by the scalar upstream gradient. Chunks hold up to `rows_per_chunk` rows (the
`linear_logprobs` workspace budget; 4x on GPU); one group longer than that still runs whole
while its logits fit `_GROUP_WORKSPACE_ELEMS`, and beyond that it is scored in row sub-chunks
and its logits recomputed once for dz (4 GEMMs for that group only).

TP / SP contract as `linear_cross_entropy`: hidden [N, H] (SP: this rank's [N/tp, H] slice,
all-gathered rank-major here, grad_hidden reduce-scattered), weight [Vp, H] this rank's
shard, targets / cu_seqlens / loss_mask replicated over the TP group; every rank runs the same
chunk schedule (it depends only on N, Vp and cu_seqlens). The loss and the returned sums are
replicated over the TP group. The row pass (statistics, then dz once g_s is known) is
`nova_kernels.ops.lm_head_rows`: Triton row kernels (backend "triton", the default on CUDA) or
torch ops (backend "torch", the CPU path and the reference), GEMMs on cuBLAS, with the LM
heads' one numerics contract (bf16 operands, fp32 logits and statistics, grad_W accumulated in
fp32 across chunks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .._backend import resolve_backend
from .._common import _acc_dtype
from .._vocab_parallel import (
    _check,
    _local_targets,
    _reduce_grad_hidden,
    _scale_saved_grads,
    _sp_gather,
    _tp_info,
)
from .lm_head_rows import GradWeight, LogitsChunk, gemm, operand_dtype, rows_per_chunk

GroupLoss = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]

# A group (pair) longer than the chunk budget (`lm_head_rows.rows_per_chunk`: 4 Mi elements on
# CPU) still runs in one chunk, i.e. 3 GEMMs, while its logits fit this many elements (fp32).
_GROUP_WORKSPACE_ELEMS = 1 << 25


def _group_chunks(cu: list[int], num_seq: int, gsize: int, rows_max: int):
    """[(s0, s1)] runs of whole groups, each spanning <= rows_max rows (or one group)."""
    out, s0 = [], 0
    while s0 < num_seq:
        s1 = min(s0 + gsize, num_seq)
        while s1 < num_seq and cu[min(s1 + gsize, num_seq)] - cu[s0] <= rows_max:
            s1 = min(s1 + gsize, num_seq)
        out.append((s0, s1))
        s0 = s1
    return out


def _sub_chunks(cu, chunks, rows_max: int, rows_group: int):
    """Per group chunk its row ranges: whole, or rows_max sub-chunks for an oversize group."""
    out = []
    for s0, s1 in chunks:
        r0, r1 = cu[s0], cu[s1]
        step = r1 - r0 if r1 - r0 <= rows_group else rows_max
        out.append([(a, min(a + step, r1)) for a in range(r0, r1, max(step, 1))])
    return out


class LinearPairLogprobsFunction(torch.autograd.Function):
    """(hidden, weight) -> (loss, per-sequence log-prob sums [S], counts [S]); see the module
    docstring. Only the loss is differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, cu_seqlens, loss_mask, seq_index, group_loss, cfg):
        num_seq, gsize, tp_group, ignore_index, sp, cu_host, backend = cfg
        tp, rank = _tp_info(tp_group)
        sp = bool(sp) and tp > 1
        h_NH = (_sp_gather(hidden, tp_group, tp) if sp else hidden).contiguous()
        w_VpH = weight.contiguous()
        (N, H), vp = h_NH.shape, w_VpH.shape[0]
        dev, op, acc = h_NH.device, operand_dtype(h_NH, backend), _acc_dtype(h_NH)
        train = group_loss is not None
        need_h = train and ctx.needs_input_grad[0]
        need_w = train and ctx.needs_input_grad[1]
        # the chunk schedule is host arithmetic on the boundaries the packer gave (no read-back)
        cu = [int(x) for x in cu_host[: num_seq + 1]]
        tgt_N = _local_targets(targets, rank * vp, vp, ignore_index)
        # token weight: counted (loss mask) and a real target; seg: the sequence of each row
        counted = (loss_mask != 0) & (targets != ignore_index)
        wts_N = counted.to(acc)
        if seq_index is not None:  # the packer's [N] sequence of each row: no host-to-device copy
            seg_N = seq_index[cu[0] : cu[-1]].to(device=dev, dtype=torch.long)
        else:
            lens = torch.tensor([b - a for a, b in zip(cu[:-1], cu[1:])], dtype=torch.long)
            seg_N = torch.repeat_interleave(torch.arange(num_seq), lens).to(dev)
        counts = torch.zeros(num_seq, device=dev, dtype=acc)
        counts.index_add_(0, seg_N, (loss_mask[cu[0] : cu[-1]] != 0).to(acc))
        sums = torch.zeros(num_seq, device=dev, dtype=acc)
        grad_h = torch.zeros(N, H, device=dev, dtype=hidden.dtype) if need_h else None
        w_c = w_VpH.to(op)
        loss = torch.zeros((), device=dev, dtype=acc)
        rows_max = rows_per_chunk(dev, vp)
        rows_group = max(rows_max, _GROUP_WORKSPACE_ELEMS // max(vp, 1))
        groups = _group_chunks(cu, num_seq, gsize, rows_max)
        # one group longer than the chunk budget: whole up to the group workspace, else scored
        # in sub-chunks and recomputed (4 GEMMs for that group)
        subs_all = _sub_chunks(cu, groups, rows_max, rows_group)
        n_chunks = sum(len(x) for x in subs_all)
        # grad_W: fp32 accumulation across chunks on every device, rounded once at the end
        grad_w = GradWeight(vp, H, weight.dtype, dev, n_chunks, acc) if need_w else None
        for (s0, s1), subs in zip(groups, subs_all):
            chunks: list[LogitsChunk | None] = []
            for a, b in subs:
                ch = LogitsChunk(h_NH[a:b].to(op), w_c, tgt_N[a:b], backend, tp_group, tp)
                sums.index_add_(0, seg_N[a - cu[0] : b - cu[0]], ch.logp * wts_N[a:b])
                chunks.append(ch if len(subs) == 1 else None)  # oversize: recomputed below
            if not train:
                continue
            with torch.enable_grad():
                lp = sums[s0:s1].detach().requires_grad_()
                term = group_loss(lp, counts[s0:s1], s0)
                (g_seq,) = torch.autograd.grad(term, lp, allow_unused=True)
            loss += term.detach().to(acc)
            if not (need_h or need_w) or g_seq is None:
                continue
            for (a, b), kept in zip(subs, chunks):
                h_r = h_NH[a:b].to(op)
                # oversize group: the same statistics, recomputed
                ch = kept or LogitsChunk(h_r, w_c, tgt_N[a:b], backend, tp_group, tp)
                g_t = g_seq.to(acc)[seg_N[a - cu[0] : b - cu[0]] - s0] * wts_N[a:b]
                dz = ch.dlogits(-g_t, op)  # dz = g_t (1_t - p)
                if grad_h is not None:
                    grad_h[a:b] = gemm(dz, w_c, hidden.dtype)  # GEMM 2
                if grad_w is not None:
                    grad_w.add(dz, h_r)  # GEMM 3
        if grad_h is not None:
            grad_h = _reduce_grad_hidden(grad_h, tp_group, tp, sp)
        ctx.save_for_backward(grad_h, grad_w.result(weight) if grad_w is not None else None)
        ctx.mark_non_differentiable(sums, counts)
        return loss, sums, counts

    @staticmethod
    def backward(ctx, g_loss, _g_sums, _g_counts):
        gh, gw = _scale_saved_grads(ctx, g_loss)
        return gh, gw, None, None, None, None, None, None


def linear_pair_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    cu_seqlens: torch.Tensor,
    loss_mask: torch.Tensor,
    group_loss: GroupLoss | None,
    *,
    num_sequences: int | None = None,
    group_size: int = 2,
    cu_seqlens_host: Sequence[int] | None = None,
    seq_index: torch.Tensor | None = None,
    tp_group=None,
    ignore_index: int = -100,
    sequence_parallel: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, logps [S], counts [S]) of a packed batch in 3 GEMMs (see the module docstring).

    hidden [N, H] (SP: [N/tp, H]), weight [Vp, H], targets [N] global ids (ignore_index: not
    counted), cu_seqlens [>= S+1], loss_mask [N] (nonzero = counted). num_sequences S (default
    len(cu_seqlens) - 1) must be a multiple of group_size. group_loss(logps, counts, first) ->
    0-dim loss of whole groups (a sum over groups); None scores only (loss 0, no gradients).
    Returns the summed loss (fp32, differentiable in hidden and weight) and the per-sequence
    log-prob sums over counted tokens and loss-token counts (fp32, detached).

    No host sync when the packer's host-side facts are passed: cu_seqlens_host (the same
    boundaries as a host sequence, `PackedBatch.cu_seqlens_host`; the chunk schedule is built
    from it) and seq_index ([N] int64 sequence of each row, -1 past the scored ones,
    `PackedBatch.seq_index`). Without them cu_seqlens is read back once per call.
    """
    if hidden.dtype == torch.float64:
        if backend == "triton":
            raise ValueError("linear_pair_logprobs: fp64 inputs run on the torch backend only")
        backend = "torch"
    backend = resolve_backend(backend)
    tp, _ = _tp_info(tp_group)
    _check(hidden, weight, targets, sequence_parallel and tp > 1, tp)
    cu_host = cu_seqlens.tolist() if cu_seqlens_host is None else list(cu_seqlens_host)
    if len(cu_host) != len(cu_seqlens):
        raise ValueError(
            f"linear_pair_logprobs: cu_seqlens_host has {len(cu_host)} entries, cu_seqlens "
            f"{len(cu_seqlens)}"
        )
    if seq_index is not None and seq_index.shape != targets.shape:
        raise ValueError(
            f"linear_pair_logprobs: seq_index {tuple(seq_index.shape)} != targets "
            f"{tuple(targets.shape)}"
        )
    num_seq = len(cu_seqlens) - 1 if num_sequences is None else int(num_sequences)
    if num_seq < 0 or num_seq > len(cu_seqlens) - 1 or num_seq % group_size:
        raise ValueError(
            f"linear_pair_logprobs: num_sequences={num_seq} must be a multiple of "
            f"group_size={group_size} and <= len(cu_seqlens) - 1 = {len(cu_seqlens) - 1}"
        )
    if loss_mask.shape != targets.shape:
        raise ValueError(
            f"linear_pair_logprobs: loss_mask {tuple(loss_mask.shape)} != targets "
            f"{tuple(targets.shape)}"
        )
    cfg = (num_seq, group_size, tp_group, ignore_index, sequence_parallel, cu_host, backend)
    return LinearPairLogprobsFunction.apply(
        hidden, weight, targets, cu_seqlens, loss_mask, seq_index, group_loss, cfg
    )


def linear_pair_logprobs_reference(
    hidden, weight, targets, cu_seqlens, loss_mask, group_loss, *, num_sequences=None, **kw
):
    """The 4-GEMM path the fused head replaces: `linear_logprobs` -> `seq_reduce` (sum, with
    counts) -> group_loss over all sequences at once. Same returns (logps/counts detached)."""
    from .linear_logprobs import linear_logprobs
    from .seq_reduce import seq_reduce

    num_seq = len(cu_seqlens) - 1 if num_sequences is None else int(num_sequences)
    logp = linear_logprobs(hidden, weight, targets, **kw)
    sums, counts = seq_reduce(
        logp, cu_seqlens[: num_seq + 1], loss_mask, reduction="sum", return_counts=True
    )
    counts = counts.to(sums.dtype)
    loss = group_loss(sums, counts, 0) if group_loss is not None else sums.sum() * 0
    return loss, sums.detach(), counts
