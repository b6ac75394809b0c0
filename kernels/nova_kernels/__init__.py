"""nova_kernels: the fused kernels of Nova Engine (Triton), each with an autograd.Function
where it has a backward and a selector (`NOVA_KERNELS=triton|torch`). `nova_kernels.<op>` is
the op, `nova_kernels.ops.<op>` its module, `nova_kernels.reference` the plain-PyTorch
references of all of them. Depends only on torch and triton."""

from . import ops
from ._backend import default_backend, interpreting, resolve_backend
from .ops.gae import gae_packed
from .ops.group_advantages import group_advantages
from .ops.kl import kl_divergence, kl_penalty
from .ops.linear_cross_entropy import linear_cross_entropy
from .ops.linear_logprobs import linear_logprobs
from .ops.linear_pair_logprobs import linear_pair_logprobs
from .ops.policy_loss import AGG_MODES, KL_TYPES, policy_loss
from .ops.seq_reduce import seq_reduce
from .ops.whiten import whiten
from .reference import linear_logprobs_reference, seq_reduce_reference

__all__ = ["default_backend", "interpreting", "ops", "resolve_backend"]
__all__ += ["gae_packed"]
__all__ += ["linear_cross_entropy", "linear_logprobs", "linear_logprobs_reference"]
__all__ += ["linear_pair_logprobs"]
__all__ += ["seq_reduce", "seq_reduce_reference"]
__all__ += ["group_advantages", "whiten"]
__all__ += ["AGG_MODES", "KL_TYPES", "kl_divergence", "kl_penalty", "policy_loss"]
