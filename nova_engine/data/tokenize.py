"""Tokenization with the model's HF tokenizer and chat template; loss on assistant turns only.

How the assistant-only loss mask is found (robust to any template that is prefix-stable):
for every assistant turn k the conversation is rendered twice with `apply_chat_template`,
  pre_k  = render(messages[:k], add_generation_prompt=True)   # ends with the assistant header
  upto_k = render(messages[:k+1])                               # ends after turn k
and the tokens in [len(ids(pre_k)), len(ids(upto_k))) are the turn's targets: its content and
whatever the template closes the turn with (Llama 3: <|eot_id|>; Qwen2: <|im_end|> and "\\n"),
so the model learns to stop. ids(pre_k) must be a token prefix of ids(upto_k), and ids(upto_k)
of the whole conversation's ids; otherwise the template (or the tokenizer's merges across the
boundary) is not prefix-stable and `TemplateError` says where. Text is rendered with
`tokenize=False` and encoded with `add_special_tokens=False` (the template writes BOS itself).

Mask convention (nova_engine.data.sample): loss_mask[i] = 1 means token i is a target,
predicted from tokens[:i]; loss_mask[0] is always 0.

Preference pairs: the prompt is rendered with the generation prompt, both full conversations
must start with exactly those tokens, and the loss covers the response tokens only.

Max-length policy (`max_length`, per sequence; for pairs, chosen and rejected each):
- "truncate": keep the first max_length tokens; a sample left without any loss token is
  dropped (counted as dropped_no_loss);
- "drop": a sample longer than max_length is dropped (counted as dropped_too_long).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from nova_engine.data.formats import ChatRecord, PairRecord
from nova_engine.data.sample import PairSample, Sample
from nova_engine.logging import get_logger

logger = get_logger(__name__)

Truncation = Literal["truncate", "drop"]


class TemplateError(ValueError):
    """The chat template cannot give assistant-only masks (not prefix-stable, or missing)."""


@dataclass
class TokenizeStats:
    n_in: int = 0
    n_out: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_loss: int = 0

    @property
    def n_dropped(self) -> int:
        return self.dropped_too_long + self.dropped_no_loss

    def summary(self) -> str:
        return (
            f"{self.n_out}/{self.n_in} kept, {self.truncated} truncated, "
            f"{self.dropped_too_long} dropped (too long), {self.dropped_no_loss} dropped "
            "(no loss tokens left)"
        )


# Chat templates a base model may lack, by name (`template=<name>`); a path to a Jinja file
# works too. "tulu": the Tülu 3 SFT/DPO/RLVR format (<|user|>, <|assistant|> headers, EOS
# closing each assistant turn); "chatml": <|im_start|>role ... <|im_end|> as Qwen2 uses it.
CHAT_TEMPLATES: dict[str, str] = {
    "tulu": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
        "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{% if not loop.last %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
        "{% else %}{{ '<|assistant|>\n' + message['content'] + eos_token }}{% endif %}"
        "{% endif %}"
        "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
        "{% endfor %}"
    ),
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}


def resolve_chat_template(spec: str) -> str:
    """A template by name (CHAT_TEMPLATES) or from a Jinja file; TemplateError otherwise."""
    if spec in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[spec]
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            text = f.read()
        if "messages" not in text:
            raise TemplateError(f"{spec}: not a chat template (it never reads `messages`)")
        import jinja2

        try:
            jinja2.Environment().parse(text)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"{spec}:{e.lineno}: Jinja syntax error: {e.message}") from None
        return text
    raise TemplateError(
        f"template={spec!r}: expected one of {sorted(CHAT_TEMPLATES)} or a path to a Jinja file"
    )


def load_tokenizer(path: str | os.PathLike, template: str | None = None) -> Any:
    """`AutoTokenizer.from_pretrained(path)` from a local directory (no network); `template`
    (a CHAT_TEMPLATES name or a Jinja file) replaces the tokenizer's chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
    if template is not None:
        tok.chat_template = resolve_chat_template(template)
    return tok


def _first_diff(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ChatTokenizer:
    """Turns ChatRecord / PairRecord into Sample / PairSample with a HF tokenizer.

    Args:
        tokenizer: a HF tokenizer object with a chat template, or a local directory path.
        max_length: maximum tokens per sequence (None = unbounded).
        truncation: "truncate" or "drop" (see the module docstring).
        template: replaces the tokenizer's chat template (a CHAT_TEMPLATES name or a Jinja
            file), e.g. "tulu" for a base model without one.
    Counts accumulate in `self.stats` (a TokenizeStats).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_length: int | None = None,
        truncation: Truncation = "truncate",
        template: str | None = None,
    ):
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer, template)
        elif template is not None:
            tokenizer.chat_template = resolve_chat_template(template)
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat_template: "
                f"set one with template=<{'|'.join(sorted(CHAT_TEMPLATES))}|file.jinja>"
            )
        if truncation not in ("truncate", "drop"):
            raise ValueError(f'truncation={truncation!r}: expected "truncate" or "drop"')
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length={max_length}: expected >= 2 or None")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation = truncation
        self.stats = TokenizeStats()

    # -- rendering ------------------------------------------------------------------

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def ids(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        return self.encode_text(self.render(messages, add_generation_prompt))

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Tokens to generate a reply from: the conversation + the assistant header."""
        return self.ids(messages, add_generation_prompt=True)

    @property
    def eos_token_ids(self) -> list[int]:
        """Token ids that end an assistant turn (stop tokens for generation)."""
        tok = self.tokenizer
        ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        for name in ("<|eot_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>"):
            tid = tok.convert_tokens_to_ids(name)
            if isinstance(tid, int) and tid != tok.unk_token_id and tid >= 0:
                ids.add(tid)
        return sorted(ids)

    def _check_prefix(self, prefix: list[int], full: list[int], what: str, source: str) -> None:
        if full[: len(prefix)] != prefix:
            j = _first_diff(prefix, full)
            tok = self.tokenizer
            got = tok.convert_ids_to_tokens(full[j : j + 3])
            want = tok.convert_ids_to_tokens(prefix[j : j + 3])
            raise TemplateError(
                f"{source}: chat template of {getattr(tok, 'name_or_path', '?')!r} is not "
                f"prefix-stable: the tokens of {what} are not a prefix of the longer rendering "
                f"(first difference at token {j}: {want} vs {got}); assistant-only loss masks "
                "need a template whose rendering of a conversation prefix is a token prefix"
            )

    # -- unbounded encodings --------------------------------------------------------

    def encode_chat(
        self, messages: list[dict], source: str = "<chat>"
    ) -> tuple[list[int], np.ndarray]:
        """(tokens, loss_mask) of a whole conversation, loss on every assistant turn."""
        full = self.ids(messages)
        mask = np.zeros(len(full), dtype=np.uint8)
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            pre = self.ids(messages[:k], add_generation_prompt=True)
            upto = full if k == len(messages) - 1 else self.ids(messages[: k + 1])
            self._check_prefix(pre, upto, f"messages[:{k}] + generation prompt", source)
            self._check_prefix(upto, full, f"messages[:{k + 1}]", source)
            if len(upto) <= len(pre):
                raise TemplateError(f"{source}: assistant turn {k} renders to no tokens")
            mask[len(pre) : len(upto)] = 1
        mask[0] = 0
        return full, mask

    def encode_response(
        self, prompt: list[dict], response: list[dict], source: str = "<pair>"
    ) -> tuple[list[int], np.ndarray]:
        """(tokens, loss_mask) of prompt + response, loss on the response tokens only."""
        pre = self.ids(prompt, add_generation_prompt=True)
        full = self.ids(prompt + response)
        self._check_prefix(pre, full, "the prompt + generation prompt", source)
        if len(full) <= len(pre):
            raise TemplateError(f"{source}: the response renders to no tokens")
        mask = np.zeros(len(full), dtype=np.uint8)
        mask[len(pre) :] = 1
        return full, mask

    # -- max-length policy ----------------------------------------------------------

    @property
    def _chars_per_token(self) -> int:
        """An upper bound on the characters one token decodes to (its longest vocab entry)."""
        if not hasattr(self, "_max_token_chars"):
            vocab = self.tokenizer.get_vocab()
            self._max_token_chars = max((len(t) for t in vocab), default=1) or 1
        return self._max_token_chars

    def _clip(self, messages: list[dict]) -> tuple[list[dict], bool]:
        """Messages cut to what the first max_length tokens can reach, and whether anything
        was cut. The first max_length tokens decode to at most max_length * L characters (L
        the longest token), so content beyond (max_length + 64) * L characters cannot reach
        them; cutting there spares tokenizing a huge line whole (a 30 MB line took minutes)
        and leaves the kept tokens as they were (64 tokens of slack for the tokenizer's
        pre-tokenization at the cut)."""
        if self.max_length is None:
            return messages, False
        budget = (self.max_length + 64) * self._chars_per_token
        out: list[dict] = []
        for m in messages:
            if budget <= 0:
                return out, True
            content = m["content"]
            if len(content) > budget:
                out.append({**m, "content": content[:budget]})
                return out, True
            out.append(m)
            budget -= len(content)
        return out, False

    def _fit(self, tokens: list[int], mask: np.ndarray) -> tuple[list[int], np.ndarray] | None:
        """Apply the max-length policy; None = dropped (and counted)."""
        if self.max_length is None or len(tokens) <= self.max_length:
            return tokens, mask
        if self.truncation == "drop":
            self.stats.dropped_too_long += 1
            return None
        tokens, mask = tokens[: self.max_length], mask[: self.max_length]
        if not mask.any():
            self.stats.dropped_no_loss += 1
            return None
        self.stats.truncated += 1
        return tokens, mask

    # -- records -> samples ---------------------------------------------------------

    def sft_sample(self, rec: ChatRecord) -> Sample | None:
        """A Sample (index = rec.index), or None if the length policy dropped it."""
        self.stats.n_in += 1
        messages, cut = self._clip(rec.messages)
        if cut and self.truncation == "drop":
            self.stats.dropped_too_long += 1  # longer than max_length without tokenizing
            return None
        fitted = self._fit(*self.encode_chat(messages, rec.source))
        if fitted is None:
            return None
        self.stats.n_out += 1
        return Sample(np.asarray(fitted[0], dtype=np.int64), fitted[1], index=rec.index)

    def pair_sample(self, rec: PairRecord) -> PairSample | None:
        """A PairSample (shared prompt tokens, loss on each response), or None if dropped.
        Under "truncate" each side is cut to max_length; the pair is dropped when either
        side is left without loss tokens."""
        self.stats.n_in += 1
        sides, cut = [], False
        for resp in (rec.chosen, rec.rejected):
            conv, clipped = self._clip(rec.prompt + resp)
            if clipped:
                if self.truncation == "drop":
                    self.stats.dropped_too_long += 1
                    return None
                if len(conv) <= len(rec.prompt):  # the prompt alone fills max_length
                    self.stats.dropped_no_loss += 1
                    return None
            prompt, resp = conv[: len(rec.prompt)], conv[len(rec.prompt) :]
            tokens, mask = self.encode_response(prompt, resp, rec.source)
            if self.max_length is not None and len(tokens) > self.max_length:
                if self.truncation == "drop":
                    self.stats.dropped_too_long += 1
                    return None
                tokens, mask, cut = tokens[: self.max_length], mask[: self.max_length], True
                if not mask.any():
                    self.stats.dropped_no_loss += 1
                    return None
            sides.append((tokens, mask))
        self.stats.truncated += int(cut)
        self.stats.n_out += 1
        (ct, cm), (rt, rm) = sides
        return PairSample(
            Sample(np.asarray(ct, dtype=np.int64), cm, index=rec.index),
            Sample(np.asarray(rt, dtype=np.int64), rm, index=rec.index),
            index=rec.index,
            margin=rec.margin,
        )


def tokenize_sft(
    records: Sequence[ChatRecord],
    tokenizer: Any,
    *,
    max_length: int | None = None,
    truncation: Truncation = "truncate",
    template: str | None = None,
) -> tuple[list[Sample], TokenizeStats]:
    """Tokenize SFT records; logs the length-policy counts when anything was cut or dropped."""
    ct = ChatTokenizer(tokenizer, max_length=max_length, truncation=truncation, template=template)
    out = [s for s in (ct.sft_sample(r) for r in records) if s is not None]
    _log_stats("sft", ct.stats)
    return out, ct.stats


def tokenize_pairs(
    records: Sequence[PairRecord],
    tokenizer: Any,
    *,
    max_length: int | None = None,
    truncation: Truncation = "truncate",
    template: str | None = None,
) -> tuple[list[PairSample], TokenizeStats]:
    """Tokenize preference records into PairSamples."""
    ct = ChatTokenizer(tokenizer, max_length=max_length, truncation=truncation, template=template)
    out = [s for s in (ct.pair_sample(r) for r in records) if s is not None]
    _log_stats("pairs", ct.stats)
    return out, ct.stats


def _log_stats(what: str, stats: TokenizeStats) -> None:
    if stats.truncated or stats.n_dropped:
        logger.info("tokenize %s: %s", what, stats.summary())


def load_samples(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: Any,
    kind: Literal["chat", "pairs"],
    *,
    max_length: int | None = None,
    truncation: Truncation = "truncate",
    on_bad_line: Literal["error", "skip"] = "error",
    margin_key: str = "margin",
    template: str | None = None,
) -> tuple[list, Any, TokenizeStats]:
    """Read + validate + tokenize in one call: (samples, ReadStats, TokenizeStats).
    kind "chat" gives Samples, "pairs" PairSamples; indices are dense over the valid
    records of all files (samples dropped by the length policy leave gaps). No sample left
    (empty files, every line skipped or dropped) -> EmptyDataError saying why."""
    from nova_engine.data.formats import EmptyDataError, read_records

    if kind not in ("chat", "pairs"):
        raise ValueError(f'kind={kind!r}: expected "chat" or "pairs"')
    records, read_stats = read_records(
        paths, "sft" if kind == "chat" else "pref", on_bad_line=on_bad_line, margin_key=margin_key
    )
    fn = tokenize_sft if kind == "chat" else tokenize_pairs
    samples, tok_stats = fn(
        records, tokenizer, max_length=max_length, truncation=truncation, template=template
    )
    if not samples:
        raise EmptyDataError(paths, read_stats, tok_stats.summary() if records else None)
    return samples, read_stats, tok_stats
