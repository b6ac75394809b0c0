"""The rollout-backend seam: what an RL stage needs from whatever generates its rollouts.

    backend: RolloutBackend = EngineRolloutBackend(chunks, ps, arch)
    outs = backend.generate(requests, SamplingParams(temperature=1.0, n=8, seed=step))
    backend.update_weights(named_hf_tensors)        # after the policy changed elsewhere

Two methods: `generate` (requests -> per-request samples with tokens and fp32 log-probs) and
`update_weights` (new weights by Hugging Face tensor name, e.g. streamed from a trainer that
runs at another layout). The built-in `EngineRolloutBackend` generates on the model's own
megatron chunks (nova_engine.generate.decode): when those are the policy's training chunks,
every optimizer step is visible at once and no weight transfer is needed. An external
server (vLLM on a GPU cluster) implements the same two methods; the RL stage sees only this
protocol.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import torch

from nova_engine.generate.decode import generate
from nova_engine.generate.sampling import Generation, Request, SamplingParams


@runtime_checkable
class RolloutBackend(Protocol):
    """Generates rollouts; receives updated weights by HF name."""

    def generate(
        self, requests: Sequence[Request | Sequence[int]], params: SamplingParams
    ) -> list[list[Generation]]:
        """Per request (in order), `params.n` samples; see nova_engine.generate.decode."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace weights by HF name (full, unsharded tensors in HF layout)."""
        ...


class _Probe:
    """A stand-in checkpoint that records which HF tensors a parameter is built from."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        self.names.append(name)
        return torch.zeros(1, 1)


class _Named:
    """Full HF tensors by name, read like nova_engine.model.hf_io.HFCheckpoint."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        t = self.tensors[name]
        if cols is not None:
            return t[rows or slice(None), cols]
        return t if rows is None else t[rows]


class EngineRolloutBackend:
    """Generation on this rank's chunks of the model (layout `ps`, architecture `arch`).

    Collective like `generate`: every rank of the model-parallel group calls each method
    with the same arguments. `update_weights` copies the given tensors into the chunks'
    parameters (each rank takes its TP/PP slices, as the HF import does); a parameter built
    from several HF tensors (q/k/v, gate/up) needs all of them in one call. Only the model
    parameters change: an optimizer's fp32 master copies, if any, are not touched.
    """

    def __init__(self, chunks, ps, arch, *, max_batch_size: int = 64):
        self.chunks, self.ps, self.arch = chunks, ps, arch
        self.max_batch_size = max_batch_size

    def generate(
        self, requests: Sequence[Request | Sequence[int]], params: SamplingParams
    ) -> list[list[Generation]]:
        return generate(
            self.chunks, self.ps, self.arch, requests, params, max_batch_size=self.max_batch_size
        )

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        from nova_engine.model.hf_io import (
            CheckpointError,
            _hf_value,
            _split_name,
            hf_expected_names,
        )

        given = dict(named_tensors)
        known = set(hf_expected_names(self.arch)) | {"lm_head.weight"}
        unknown = sorted(set(given) - known)
        if unknown:
            raise CheckpointError(
                f"update_weights: {unknown[0]!r} is not a tensor of this "
                f"{self.arch.architecture} ({self.arch.num_layers} layers)"
            )
        reader = _Named(given)
        tp, r = self.ps.tp, self.ps.tp_rank
        for chunk in self.chunks:
            model = chunk
            while hasattr(model, "module"):
                model = model.module
            for mname, param in model.named_parameters():
                if mname.startswith("score."):
                    continue  # a score head has its own name map (nova_engine.model.heads)
                name, layer = _split_name(mname, model)
                probe = _Probe()
                _hf_value(probe, self.arch, name, layer, tp, r)
                needed = list(dict.fromkeys(probe.names))
                present = [n for n in needed if n in given]
                if not present:
                    continue
                if len(present) != len(needed):
                    missing = [n for n in needed if n not in given]
                    raise CheckpointError(
                        f"update_weights: {present[0]!r} given without {missing[0]!r} "
                        f"(both make up {mname!r})"
                    )
                value = _hf_value(reader, self.arch, name, layer, tp, r)
                if tuple(value.shape) != tuple(param.shape):
                    raise CheckpointError(
                        f"update_weights: {needed[0]!r} gives {mname!r} the shape "
                        f"{list(value.shape)}, expected {list(param.shape)}"
                    )
                param.copy_(value.to(device=param.device, dtype=param.dtype))
