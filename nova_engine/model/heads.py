"""Output heads on the last pipeline stage's final hidden states (after the final RMSNorm).

Two kinds, both reading `hidden` as the last stage hands it back with `return_hidden`:
[T, 1, H], or this rank's [T/tp, 1, H] slice under sequence parallelism.

- **LM head** (`token_logprobs`, `token_cross_entropy`): the model's own vocab-parallel output
  weight ([V/tp, H] per TP rank, the tied embedding when tied) through the fused kernels
  `nova_kernels.linear_logprobs` / `linear_cross_entropy`: per-token log p(label) without
  ever materializing [T, V] logits. HF names: `lm_head.weight` (or `model.embed_tokens.weight`
  when tied) — handled by nova_engine.model.hf_io like every other model weight.

- **Scalar / K-output head** (`ScoreHead`, for reward and value models): a bias-free linear
  map of the hidden state at the LAST token of each packed sequence to K outputs.

  Parameter (stable; checkpoints and HF import/export depend on it):

      name  `score.weight`  on the last pipeline stage's chunk (`chunk.score.weight`)
      shape [K, H], the model's parameter dtype, REPLICATED over TP (not split)
      HF    `score.weight` [num_labels, H] of `*ForSequenceClassification`
            (LlamaForSequenceClassification / Qwen2ForSequenceClassification: no bias,
            read at the last non-padding token — in a packed batch, the last token of each
            sequence). `HF_NAMES` maps megatron name -> HF name.

  Init: normal(0, 0.02) from a CPU generator seeded with `init_seed` (identical on every
  TP/DP rank, as HF's `initializer_range`). Output: [S, K] fp32 for the S real sequences of
  the micro-batch (the trailing padding segment is skipped), accumulated in fp32 from bf16
  hidden / weight (`matmul_fp32`), never rounded to bf16.

  Tensor parallelism: every TP rank holds the full weight and the same full hidden rows, so
  each computes identical scores and the full gradient (no TP reduction of its grad, as for
  any replicated parameter outside sequence-parallel norms). With sequence parallelism each
  rank holds T/tp rows: it picks the last-token rows that fall in its slice into an [S, H]
  buffer (zeros elsewhere) and the buffers are summed over TP with megatron's
  `reduce_from_tensor_model_parallel_region` (all-reduce forward, identity backward), so
  every rank again sees the full [S, H] rows and the gradient reaches the rank owning each row.

Shape legend: T tokens of a packed micro-batch, S real sequences, H hidden, K outputs,
Vp = V/tp the vocab shard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch

from nova_kernels import linear_cross_entropy, linear_logprobs

if TYPE_CHECKING:
    from nova_engine.data.packing import PackedBatch
    from nova_engine.model.build import NovaGPTModel
    from nova_engine.parallel.state import ParallelState

# megatron parameter name (on the last stage's chunk) -> HF tensor name
SCORE_PARAM = "score.weight"
HF_NAMES = {SCORE_PARAM: "score.weight"}
INIT_STD = 0.02


def unwrap(model: torch.nn.Module) -> NovaGPTModel:
    """The NovaGPTModel inside DDP / Float16Module wrappers (`.module` is untyped)."""
    while isinstance(inner := getattr(model, "module", None), torch.nn.Module):
        model = inner
    return cast("NovaGPTModel", model)


def _tp_args(ps: ParallelState) -> dict[str, Any]:
    return {
        "tp_group": ps.tp_group if ps.tp > 1 else None,
        "sequence_parallel": bool(ps.sp and ps.tp > 1),
    }


# ------------------------------------------------------------------------------ LM head


def lm_head_weight(model: torch.nn.Module) -> torch.Tensor:
    """This rank's LM-head shard w_VpH [V/tp, H] (the tied embedding when tied)."""
    return unwrap(model).lm_head_weight()


def token_logprobs(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    ps: ParallelState,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token log p(labels) [T] fp32 from the last stage's hidden [T(/tp), 1, H];
    labels [T] (ignore_index -100 gives 0). Differentiable. `temperature` T: the log-probs of
    log_softmax(logits / T) (RL at the sampling temperature; the scaling is inside the kernel)."""
    h_NH = hidden.reshape(-1, hidden.shape[-1])
    return linear_logprobs(
        h_NH, lm_head_weight(model), labels, temperature=temperature, **_tp_args(ps)
    )


def matmul_fp32(x: torch.Tensor, w_KH: torch.Tensor) -> torch.Tensor:
    """x [.., H] @ w_KH.T -> [.., K] fp32 for a SMALL output count K (score / value heads):
    bf16/fp16 operands are upcast (the [K, H] weight costs nothing; x is read once) so the
    product is accumulated AND returned in fp32: a value near 10 is not rounded to bf16's
    0.06 grid. Differentiable (grads reach x and w_KH in their dtypes)."""
    if x.dtype == torch.float32 and w_KH.dtype == torch.float32:
        return x @ w_KH.t()
    dt = torch.promote_types(torch.promote_types(x.dtype, w_KH.dtype), torch.float32)
    return (x.to(dt) @ w_KH.to(dt).t()).float()


def token_cross_entropy(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor,
    ps: ParallelState,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """-sum_t w_t log p(labels_t), a 0-dim fp32 loss through the fused 3-GEMM kernel (the
    gradients are formed in the forward pass; w_t are constants, e.g. mask / G for SFT).
    rows: the rows of nonzero weight found at packing (`PackedBatch.loss_rows`): only they
    go through the GEMMs, with no host sync."""
    h_NH = hidden.reshape(-1, hidden.shape[-1])
    w_VpH = lm_head_weight(model)
    return linear_cross_entropy(h_NH, w_VpH, labels, token_weights, rows=rows, **_tp_args(ps))


# ------------------------------------------------------------------------------ score head


def last_token_index(cu_seqlens: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """[S] index of the last token of each of the first S packed sequences."""
    return cu_seqlens[1 : num_sequences + 1].to(torch.int64) - 1


class ScoreHead(torch.nn.Module):
    """K outputs read at the last token of each packed sequence (see the module docstring).

    Attach with `attach_score_head(chunk, ...)` on the last pipeline stage before DDP
    wrapping, so the parameter is `score.weight` of that chunk and DDP/optimizer see it.
    """

    def __init__(
        self,
        hidden_size: int,
        num_outputs: int = 1,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        init_seed: int = 0,
    ):
        super().__init__()
        if num_outputs < 1:
            raise ValueError(f"ScoreHead: num_outputs={num_outputs}, expected >= 1")
        gen = torch.Generator().manual_seed(int(init_seed))
        w_KH = torch.randn(num_outputs, hidden_size, generator=gen) * INIT_STD
        self.weight = torch.nn.Parameter(w_KH.to(device=device, dtype=dtype))
        # replicated over TP: megatron's optimizer / grad-norm code reads this attribute
        self.weight.tensor_model_parallel = False  # type: ignore[attr-defined]
        self.num_outputs = num_outputs

    def forward(
        self, hidden: torch.Tensor, cu_seqlens: torch.Tensor, num_sequences: int, ps: ParallelState
    ) -> torch.Tensor:
        """hidden [T(/tp), 1, H] -> scores [S, K] fp32 (S = num_sequences)."""
        h_TH = hidden.reshape(-1, hidden.shape[-1])
        idx_S = last_token_index(cu_seqlens.to(h_TH.device), num_sequences)
        if ps.sp and ps.tp > 1:
            from megatron.core.tensor_parallel.mappings import (
                reduce_from_tensor_model_parallel_region,
            )

            rows = h_TH.shape[0]
            local_S = idx_S - ps.tp_rank * rows
            mine_S = (local_S >= 0) & (local_S < rows)
            picked_SH = h_TH[local_S.clamp(0, rows - 1)] * mine_S[:, None].to(h_TH.dtype)
            h_SH = reduce_from_tensor_model_parallel_region(picked_SH, group=ps.tp_group)
        else:
            h_SH = h_TH[idx_S]
        return matmul_fp32(h_SH, self.weight)


def attach_score_head(
    chunk: torch.nn.Module, num_outputs: int = 1, *, init_seed: int = 0
) -> ScoreHead:
    """Give a last-stage chunk a `score` head ([K, H], the chunk's parameter dtype/device)."""
    model = unwrap(chunk)
    if not getattr(model, "post_process", True):
        raise ValueError("attach_score_head: only the last pipeline stage carries the head")
    ref = next(model.parameters())
    head = ScoreHead(
        model.config.hidden_size,
        num_outputs,
        dtype=ref.dtype,
        device=ref.device,
        init_seed=init_seed,
    )
    model.score = head
    return head


def score_head(model: torch.nn.Module) -> ScoreHead:
    """The chunk's score head (AttributeError naming the fix when it has none)."""
    head = getattr(unwrap(model), "score", None)
    if head is None:
        raise AttributeError("this model chunk has no score head (build the engine with head=...)")
    return head


def sequence_scores(
    model: torch.nn.Module, hidden: torch.Tensor, mb: PackedBatch, ps: ParallelState
) -> torch.Tensor:
    """[S, K] fp32 scores of a packed micro-batch's S real sequences (differentiable)."""
    return score_head(model)(hidden, mb.cu_seqlens, mb.num_samples, ps)


def load_score_weight(head: ScoreHead, model_dir: str) -> bool:
    """Copy `score.weight` [K, H] from a HF directory into `head` when the directory has one
    (a *ForSequenceClassification checkpoint); returns whether it did. A shape mismatch
    raises naming the tensor."""
    from nova_engine.model.hf_io import CheckpointError, HFCheckpoint

    ckpt = HFCheckpoint(model_dir)
    name = HF_NAMES[SCORE_PARAM]
    if name not in ckpt.names():
        return False
    value = ckpt.read(name)
    if tuple(value.shape) != tuple(head.weight.shape):
        raise CheckpointError(
            f"{model_dir}: {name} has shape {list(value.shape)}, the score head expects "
            f"{list(head.weight.shape)} [num_outputs, hidden_size]"
        )
    with torch.no_grad():
        head.weight.copy_(value.to(head.weight.dtype))
    return True
