"""Generation on the training model's own shards: KV-cache decoding at any TP x PP layout
(`decode.generate`), sampling (`sampling`), and the rollout-backend seam (`backend`).

`generate(chunks, ps, arch, requests, params, ...)` is the entry point `ModelEngine.generate`
delegates to; its signature is documented (and kept stable) in nova_engine.generate.decode.
"""

from nova_engine.generate.decode import GenerationError, generate, plan_batches
from nova_engine.generate.sampling import Generation, Request, SamplingParams

__all__ = [
    "Generation",
    "GenerationError",
    "Request",
    "SamplingParams",
    "generate",
    "plan_batches",
]
