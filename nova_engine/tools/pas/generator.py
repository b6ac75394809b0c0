"""The one seam between `nova pas` and its models: a `Generator` maps a list of prompts (a
string = one user turn, or a chat message list) to a list of completions (str), or None for a
prompt the model cannot take (longer than its context). The pipeline sees nothing else, so
tests drive it with scripted fakes.

`NovaGenerator` runs a local HF model directory through Nova's own KV-cache generation
(`nova_engine.generate.generate`, on the model's megatron chunks), as `nova generate` does:
the chat template with the generation prompt, stop at the template's end of turn / EOS, the
text decoded without special tokens. Each call uses a new sampling seed (seed + call
number), so asking again (a retry, a regeneration) samples anew even for the same prompt.
`SequenceClassifier` labels prompts with a `*ForSequenceClassification` directory (its
id2label names) through `transformers` (Nova's engine has no inference path for score heads
outside training yet).

`ModelSet` loads each model directory once per process (teacher and judge may be one model)
on a world of one (TP = PP = 1).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from nova_engine.logging import get_logger
from nova_engine.tools.pas.records import PASError

if TYPE_CHECKING:
    from nova_engine.parallel.state import ParallelState

log = get_logger(__name__)

Prompt = str | list[dict[str, str]]


class Generator(Protocol):
    """Prompts in, one completion per prompt out (None: the prompt does not fit)."""

    def __call__(self, prompts: Sequence[Prompt]) -> list[str | None]: ...


@dataclass(frozen=True)
class GenConfig:
    """Sampling settings of one model role (teacher, judge, PAS model)."""

    temperature: float = 0.7
    """0 = greedy."""
    top_p: float = 0.9
    """Nucleus sampling mass."""
    top_k: int = 0
    """0 = no top-k."""
    max_new_tokens: int = 256
    """Tokens generated per completion at most."""
    seed: int = 0
    """Seed of the first call (call i uses seed + i)."""
    batch_size: int = 32
    """Rows per decode batch."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise PASError(f"temperature {self.temperature}: expected >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise PASError(f"top-p {self.top_p}: expected 0 < top-p <= 1")
        if self.top_k < 0:
            raise PASError(f"top-k {self.top_k}: expected >= 0")
        if self.max_new_tokens < 1:
            raise PASError(f"max-new-tokens {self.max_new_tokens}: expected >= 1")
        if self.batch_size < 1:
            raise PASError(f"batch-size {self.batch_size}: expected >= 1")
        if self.seed < 0:
            raise PASError(f"seed {self.seed}: expected >= 0")


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


@dataclass
class LoadedModel:
    """One model's chunks on this process, with its tokenizer."""

    model_dir: str
    chunks: list
    arch: Any  # nova_engine.model.arch.ModelArch
    ps: Any  # nova_engine.parallel.state.ParallelState
    ct: Any  # nova_engine.data.tokenize.ChatTokenizer

    @property
    def context(self) -> int:
        return int(self.arch.max_position_embeddings)


class NovaGenerator:
    """A `Generator` on a loaded model (see the module docstring)."""

    def __init__(self, model: LoadedModel, config: GenConfig):
        self.model, self.config = model, config
        self.calls = 0
        self.tokens_generated = 0

    def __call__(self, prompts: Sequence[Prompt]) -> list[str | None]:
        from nova_engine.generate import Request, SamplingParams, generate

        m, c = self.model, self.config
        params = SamplingParams(
            temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
            max_new_tokens=c.max_new_tokens, stop_token_ids=tuple(m.ct.eos_token_ids),
            seed=c.seed + self.calls,
        )  # fmt: skip
        self.calls += 1
        out: list[str | None] = [None] * len(prompts)
        requests, where = [], []
        for j, p in enumerate(prompts):
            ids = m.ct.prompt_ids(as_messages(p))
            if len(ids) >= m.context:
                log.info("prompt %d of %d tokens does not fit %s's context of %d", j, len(ids),
                         m.model_dir, m.context)  # fmt: skip
                continue
            requests.append(Request(ids, index=j))
            where.append(j)
        if not requests:
            return out

        def progress(done: int, total: int) -> None:
            log.info("%s: %d/%d completions", os.path.basename(m.model_dir), done, total)

        gens = generate(m.chunks, m.ps, m.arch, requests, params, max_batch_size=c.batch_size,
                        on_batch_done=progress)  # fmt: skip
        tok = m.ct.tokenizer
        for j, g in zip(where, gens):
            self.tokens_generated += len(g[0].tokens)
            out[j] = tok.decode(g[0].tokens, skip_special_tokens=True)
        return out


class SequenceClassifier:
    """Labels texts with a HF *ForSequenceClassification directory (argmax over id2label)."""

    def __init__(self, model_dir: str, tokenizer_dir: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification

        from nova_engine.data.tokenize import load_tokenizer

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, local_files_only=True
        ).float().eval().to(self.device)  # fmt: skip
        self.tok = load_tokenizer(tokenizer_dir or model_dir)
        cfg = self.model.config
        self.labels = [str(cfg.id2label[i]) for i in range(cfg.num_labels)]
        self.max_len = int(getattr(cfg, "max_position_embeddings", 512))
        self._torch = torch

    def __call__(self, texts: Sequence[str]) -> list[str]:
        out = []
        with self._torch.no_grad():
            for t in texts:
                ids = self.tok(t, add_special_tokens=True)["input_ids"][: self.max_len]
                x = self._torch.tensor([ids], device=self.device)
                logits = self.model(input_ids=x).logits[0]
                out.append(self.labels[int(logits.argmax())])
        return out


def is_sequence_classifier(model_dir: str) -> bool:
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            archs = json.load(f).get("architectures") or []
    except (OSError, json.JSONDecodeError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in archs)


class ModelSet:
    """Loads model directories once each on a world of one; `generator(dir, config)` gives
    a NovaGenerator sharing the loaded chunks. `close()` ends the process group it started."""

    def __init__(self, precision: str = "fp32", tokenizer: str | None = None):
        self.precision, self.tokenizer = precision, tokenizer
        self.models: dict[str, LoadedModel] = {}
        self.ps: ParallelState | None = None
        self._owned = False

    def _parallel(self) -> ParallelState:
        if self.ps is None:
            import torch.distributed as dist

            from nova_engine.parallel.state import initialize_parallel
            from nova_engine.train.runner import ensure_process_group_env

            ensure_process_group_env()
            self._owned = not dist.is_initialized()
            if int(os.environ.get("WORLD_SIZE", "1")) != 1:
                raise PASError("nova pas runs in one process (WORLD_SIZE=1); do not use torchrun")
            self.ps = initialize_parallel(tp=1, pp=1)
        return self.ps

    def load(self, model_dir: str, option: str) -> LoadedModel:
        from nova_engine.tools.generate import UserError, load_arch_and_tokenizer, resolve_model_dir

        try:
            path = os.path.realpath(resolve_model_dir(model_dir))
        except UserError as e:
            raise PASError(f"{option}: {str(e).removeprefix('--model ')}") from None
        if path in self.models:
            return self.models[path]
        try:
            _, arch, ct = load_arch_and_tokenizer(path, self.tokenizer)
        except UserError as e:
            raise PASError(f"{option} {model_dir}: {e}") from None
        from nova_engine.model.build import build_model
        from nova_engine.model.hf_io import load_hf_weights

        ps = self._parallel()
        chunks = build_model(arch, ps, precision=self.precision, init_weights=False)
        load_hf_weights(chunks, arch, ps, path)
        self.models[path] = LoadedModel(path, chunks, arch, ps, ct)
        log.info("loaded %s for %s", path, option)
        return self.models[path]

    def generator(self, model_dir: str, config: GenConfig, option: str) -> NovaGenerator:
        return NovaGenerator(self.load(model_dir, option), config)

    def close(self) -> None:
        import torch.distributed as dist

        self.models.clear()
        if self._owned and dist.is_initialized():
            dist.destroy_process_group()
