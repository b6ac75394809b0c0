"""linear_cross_entropy (the SFT loss, 3 GEMMs with the grads formed in the forward pass):
forward+backward time and peak memory of -sum_n w_n log p(target_n) against the naive path
(logits -> log_softmax -> gather: nova_kernels.reference), the naive path under torch.compile,
linear_logprobs followed by the weighted sum (4 GEMMs), and Liger-Kernel's
LigerFusedLinearCrossEntropyLoss when it imports.

    python -m benchmarks.bench_linear_cross_entropy            # GPU: the linear_logprobs shapes
    python -m benchmarks.bench_linear_cross_entropy --quick    # CPU: small shapes, fp32

Rows go to benchmarks/results/linear_cross_entropy_<cuda|cpu>.csv with the columns, the
`x_gemm3` ratio (time / 3 GEMMs of N x H x V, the bar's floor) and `mem_vs_naive` of
bench_linear_logprobs, whose driver this uses.
"""

from __future__ import annotations

import torch

from benchmarks.bench_linear_logprobs import _liger, main
from nova_kernels import linear_cross_entropy, linear_logprobs
from nova_kernels.reference import linear_cross_entropy_reference


def naive_ce(h, w, t, wts):
    """The shared reference: [N, V] logits (fp32 softmax) -> log_softmax -> gather."""
    return linear_cross_entropy_reference(h, w, t, wts)


def ce_impls(device, dtype, h, w, t, compile_naive):
    """name -> (None, fwd+bwd fn): a scalar loss, so only forward+backward is timed."""
    wts = torch.rand(h.shape[0], device=device)  # e.g. loss_mask / global token count

    def loss_only(fn):
        def fwd_bwd():
            h.grad = w.grad = None
            fn().backward()

        return None, fwd_bwd

    out = {"naive_ce": loss_only(lambda: naive_ce(h, w, t, wts))}
    if device.type == "cuda" and compile_naive:
        compiled = torch.compile(naive_ce)
        out["naive_ce_compile"] = loss_only(lambda: compiled(h, w, t, wts))
    for backend in ("triton", "torch") if device.type == "cuda" else ("torch",):
        out[f"nova_logprobs_{backend}"] = loss_only(
            lambda b=backend: -(linear_logprobs(h, w, t, backend=b) * wts).sum()
        )
    out["nova_fused_ce"] = loss_only(lambda: linear_cross_entropy(h, w, t, wts))
    liger = _liger()
    if liger is not None:
        flce = liger[0](reduction="sum")
        # Liger's loss has no per-token weights: it times the unweighted sum (same FLOPs)
        out["liger_flce"] = loss_only(lambda: flce(w, h, t))
    return out


if __name__ == "__main__":
    main(op="linear_cross_entropy", impls_fn=ce_impls)
