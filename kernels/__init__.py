"""nova_kernels: the fused kernels of Nova Engine (Triton), each with an autograd.Function
where it has a backward and a selector (`NOVA_KERNELS=triton|torch`). `nova_kernels.<op>` is
the op, `nova_kernels.ops.<op>` its module, `nova_kernels.reference` the plain-PyTorch
references of all of them. Depends only on torch and triton."""

import sys as _sys

from . import ops
from ._backend import default_backend, interpreting, resolve_backend
from .ops import linear_logprobs as _linear_logprobs_module
from .ops import seq_reduce as _seq_reduce_module

# Transitional: linear_pair_logprobs (and its test) still import the linear_logprobs and
# seq_reduce modules by their old paths; remove once it and group_advantages live in ops/.
_sys.modules[__name__ + ".linear_logprobs"] = _linear_logprobs_module
_sys.modules[__name__ + ".seq_reduce"] = _seq_reduce_module

from .group_advantages import broadcast_advantages, group_advantages  # noqa: E402
from .linear_pair_logprobs import linear_pair_logprobs  # noqa: E402
from .ops.gae import discounted_returns, gae, gae_packed  # noqa: E402
from .ops.kl import kl_divergence, kl_penalty  # noqa: E402
from .ops.linear_cross_entropy import linear_cross_entropy  # noqa: E402
from .ops.linear_logprobs import linear_logprobs  # noqa: E402
from .ops.policy_loss import AGG_MODES, KL_TYPES, policy_loss  # noqa: E402
from .ops.seq_reduce import seq_reduce  # noqa: E402
from .ops.whiten import whiten  # noqa: E402
from .reference import linear_logprobs_reference, seq_reduce_reference  # noqa: E402

__all__ = ["default_backend", "interpreting", "ops", "resolve_backend"]
__all__ += ["discounted_returns", "gae", "gae_packed"]
__all__ += ["linear_cross_entropy", "linear_logprobs", "linear_logprobs_reference"]
__all__ += ["linear_pair_logprobs"]
__all__ += ["seq_reduce", "seq_reduce_reference"]
__all__ += ["broadcast_advantages", "group_advantages", "whiten"]
__all__ += ["AGG_MODES", "KL_TYPES", "kl_divergence", "kl_penalty", "policy_loss"]
