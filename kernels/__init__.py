"""nova_kernels: the fused kernels of Nova Engine (Triton), each with a plain-PyTorch
reference, an autograd.Function where it has a backward, and a selector
(`NOVA_KERNELS=triton|torch`). Depends only on torch and triton."""

from ._backend import default_backend, interpreting, resolve_backend
from .gae import discounted_returns, gae, gae_packed
from .group_advantages import group_advantages
from .linear_cross_entropy import linear_cross_entropy
from .linear_logprobs import linear_logprobs, linear_logprobs_reference
from .linear_pair_logprobs import linear_pair_logprobs
from .policy_loss import kl_divergence, kl_penalty, policy_loss
from .seq_reduce import seq_reduce, seq_reduce_reference
from .whiten import whiten

__all__ = ["default_backend", "interpreting", "resolve_backend"]
__all__ += ["discounted_returns", "gae", "gae_packed"]
__all__ += ["linear_cross_entropy", "linear_logprobs", "linear_logprobs_reference"]
__all__ += ["linear_pair_logprobs"]
__all__ += ["seq_reduce", "seq_reduce_reference"]
__all__ += ["group_advantages", "whiten"]
__all__ += ["kl_divergence", "kl_penalty", "policy_loss"]
