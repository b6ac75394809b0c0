"""Fused vocab-parallel cross-entropy in 3 GEMMs: loss = -sum_n w_n log p(target_n), with the
gradients formed in the forward pass (Liger's fused linear cross entropy, made vocab-parallel).

    loss = linear_cross_entropy(hidden_NH, w_VpH, targets_N, mask_N / global_tokens, tp_group=g)

When the upstream gradient of every token's log-prob is known at forward time (SFT: the
token weights, e.g. loss_mask / global loss-token count, times the scalar upstream gradient),
dz = w (p - 1_t) can be formed as soon as a row chunk's softmax statistics are complete, so the
logits are never recomputed: per row chunk, z = h @ W.T (GEMM 1) into an fp32 [Nc, Vp]
workspace, the chunk's (max, sum-exp, target logit) combined over the TP group, dz formed in
place, grad_hidden rows = dz @ W (GEMM 2), grad_W += dz.T @ h (GEMM 3). Backward only scales
the stored grads by the scalar upstream gradient. `linear_logprobs` (4 GEMMs) is the general
path for per-token log-probs with an arbitrary upstream gradient (DPO, RL).

Legend and the TP / sequence-parallel contract are those of `nova_kernels.linear_logprobs`
(hidden [N, H] or its [N/tp, H] SP slice, weight [Vp, H] this rank's vocab shard, targets [N]
global ids). The row pass (statistics, dz) is `nova_kernels.ops.lm_head_rows`: a Triton row
kernel (backend "triton", the default on CUDA; at tp = 1 statistics and dz in one launch) or
torch ops (backend "torch", the CPU path and the reference); the GEMMs are cuBLAS on GPU, with
the LM heads' one numerics contract (bf16 operands, fp32 logits and statistics, grad_W
accumulated in fp32 across row chunks), see that module.
"""

from __future__ import annotations

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


class LinearCrossEntropyFunction(torch.autograd.Function):
    """loss = -sum_n w_n logp_n with both grads formed in the forward pass (see the module
    docstring): per row chunk, logits [Nc, Vp] (GEMM 1), TP-combined statistics, dz = w (p - 1_t),
    grad_hidden rows (GEMM 2) and grad_W accumulation (GEMM 3). Backward scales by the scalar."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, rows, cfg):
        tp_group, ignore_index, sp, backend = cfg
        tp, rank = _tp_info(tp_group)
        sp = bool(sp) and tp > 1
        h_NH = (_sp_gather(hidden, tp_group, tp) if sp else hidden).contiguous()
        w_VpH = weight.contiguous()
        (N, H), vp = h_NH.shape, w_VpH.shape[0]
        op, acc = operand_dtype(h_NH, backend), _acc_dtype(h_NH)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        tgt_N = _local_targets(targets, rank * vp, vp, ignore_index)
        wts = torch.ones(N, device=h_NH.device, dtype=acc)
        if token_weights is not None:
            wts = token_weights.to(acc)
        wts = torch.where(targets != ignore_index, wts, 0.0)
        # rows without loss (prompt tokens, padding, ignore_index) add nothing to the loss or
        # to either grad: with `rows` (the counted rows, found when the batch was packed, the
        # same on every TP rank) the GEMMs run on those rows only and the other grad_hidden
        # rows stay zero. No host sync: the row count is the index tensor's shape.
        full_n = N
        compact = rows is not None and rows.numel() < N
        if compact:
            rows = rows.to(device=h_NH.device, dtype=torch.long)
            h_NH, tgt_N, wts, N = h_NH.index_select(0, rows), tgt_N[rows], wts[rows], rows.numel()
        nc = min(max(N, 1), rows_per_chunk(h_NH.device, vp))
        grads = need_h or need_w
        grad_h = torch.empty(N, H, device=h_NH.device, dtype=hidden.dtype) if need_h else None
        # grad_W: fp32 accumulation across row chunks on every device, rounded once at the end
        grad_w = GradWeight(vp, H, weight.dtype, h_NH.device, -(-N // nc), acc) if need_w else None
        w_c = w_VpH.to(op)
        loss = torch.zeros((), device=h_NH.device, dtype=acc)
        for r0 in range(0, N, nc):
            r = slice(r0, r0 + nc)
            h_r = h_NH[r].to(op)
            wr = wts[r]
            # no TP: the Triton row kernel forms dz in the statistics' launch
            ch = LogitsChunk(h_r, w_c, tgt_N[r], backend, tp_group, tp, wr if grads else None)
            loss -= (wr * ch.logp).sum()
            if grads:
                dz = ch.dlogits(wr, op)
                if grad_h is not None:
                    grad_h[r] = gemm(dz, w_c, hidden.dtype)  # GEMM 2
                if grad_w is not None:
                    grad_w.add(dz, h_r)  # GEMM 3
        if grad_h is not None:
            if compact:
                grad_h = grad_h.new_zeros(full_n, H).index_copy_(0, rows, grad_h)
            grad_h = _reduce_grad_hidden(grad_h, tp_group, tp, sp)
        ctx.save_for_backward(grad_h, grad_w.result(weight) if grad_w is not None else None)
        return loss

    @staticmethod
    def backward(ctx, g_loss):
        gh, gw = _scale_saved_grads(ctx, g_loss)
        return gh, gw, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    *,
    rows: torch.Tensor | None = None,
    tp_group=None,
    ignore_index: int = -100,
    sequence_parallel: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Weighted cross-entropy sum, -sum_n w_n log p(targets_n), in 3 GEMMs (grads in forward).

    Same layout contract as `linear_logprobs` (hidden [N, H] or its SP slice, weight [Vp, H],
    targets [N] global ids, ignore_index rows contribute 0). token_weights [N] (default 1) are
    constants (no gradient), e.g. loss_mask / global_token_count for SFT. Returns a 0-dim fp32
    loss (replicated over the TP group). rows [n] int64 (optional): the increasing indices of
    the rows that carry weight, found on the host when the batch is packed
    (`PackedBatch.loss_rows`); every other row must weigh 0 (a masked prompt, padding,
    ignore_index). They alone go through the GEMMs: the other rows' grad_hidden is 0 and the
    LM-head work scales with the loss tokens, not all tokens. Without `rows` every row runs
    through the GEMMs. Either way nothing is read back to the host (no sync). Memory: one
    [Nc, Vp] fp32 logits chunk (dz is formed over it), the grads held from forward and, with
    several chunks, an fp32 grad_W accumulator. backend: "triton" | "torch" | None
    (NOVA_KERNELS, else triton on CUDA / torch on CPU); fp64 inputs run the torch path.
    """
    if hidden.dtype == torch.float64:
        if backend == "triton":
            raise ValueError("linear_cross_entropy: fp64 inputs run on the torch backend only")
        backend = "torch"
    backend = resolve_backend(backend)
    tp, _ = _tp_info(tp_group)
    _check(hidden, weight, targets, sequence_parallel and tp > 1, tp)
    if rows is not None and (rows.dim() != 1 or rows.dtype.is_floating_point):
        raise ValueError(
            f"linear_cross_entropy: rows must be 1-D integer row indices, got {rows.dtype} "
            f"{tuple(rows.shape)}"
        )
    if token_weights is not None and token_weights.shape != targets.shape:
        raise ValueError(
            f"linear_cross_entropy: token_weights {tuple(token_weights.shape)} != targets "
            f"{tuple(targets.shape)}"
        )
    cfg = (tp_group, ignore_index, sequence_parallel, backend)
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, token_weights, rows, cfg)
