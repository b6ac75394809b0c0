"""SFT loss: token-level cross-entropy normalized by the GLOBAL number of loss tokens.

A step sees M micro-batches on each of D data-parallel ranks. The loss we want is the mean
NLL over every loss token of the step, exactly as if the whole batch sat on one rank:

    L = -(1 / G) * sum_{dp ranks} sum_{micro-batches} sum_{tokens} mask_t * logp_t,
    G = sum_{dp ranks} sum_{micro-batches} sum_t mask_t           (global loss-token count)

So before the step each rank counts its loss tokens over its micro-batches and the loop sums
the counts over the DP group (`nova_engine.train.loop.Loop.reduce_counts`, one all_reduce on
the engine's device: NCCL takes only CUDA tensors); then every micro-batch contributes
`sft_loss_fused(hidden, W, labels, mask, G)` = -sum(mask * logp) / G.
Summing these micro-batch losses (gradient accumulation, no division by M) and SUMMING
gradients over DP gives grad(L) exactly (the engine's DDP sums: ModelEngine).

The loss comes from the hidden states directly through `nova_kernels.linear_cross_entropy`
(vocab-parallel, no [N, V] logits, 3 GEMMs: the gradients are formed in the forward pass,
possible because SFT's upstream gradient is known there).
"""

from __future__ import annotations

import torch

from nova_kernels import linear_cross_entropy


def sft_loss_fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    global_num_tokens: torch.Tensor | float,
    *,
    tp_group=None,
    sequence_parallel: bool = False,
    ignore_index: int = -100,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """This micro-batch's share of the step loss, -sum(mask * logp) / G,
    with logp = log p(labels) from the hidden states and the LM head (one fused call).

    hidden [N, H] (or its sequence-parallel slice), weight [Vp, H] this rank's LM-head shard,
    labels [N] global ids (ignore_index rows count nothing), loss_mask [N] (nonzero = loss
    token), global_num_tokens G (the step's loss tokens over DP; clamped to >= 1). Returns a
    0-dim fp32 loss (fp64 for fp64 inputs); summed over micro-batches and DP ranks it is the
    mean NLL. rows [n] int64 (`PackedBatch.loss_rows`, found when the batch was packed): the
    rows with loss_mask != 0; only they go through the LM-head GEMMs, with no host sync.
    """
    if loss_mask.shape != labels.shape:
        raise ValueError(
            f"sft_loss_fused: loss_mask {tuple(loss_mask.shape)} != labels {tuple(labels.shape)}"
        )
    dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32 (fp64 stays fp64)
    g = torch.as_tensor(global_num_tokens, device=hidden.device, dtype=dtype)
    wts = (loss_mask != 0).to(dtype) / g.clamp_min(1.0)
    return linear_cross_entropy(
        hidden,
        weight,
        labels,
        wts,
        rows=rows,
        tp_group=tp_group,
        ignore_index=ignore_index,
        sequence_parallel=sequence_parallel,
    )
