"""A tiny Llama-3-style tokenizer, built locally (no downloads), for tests and `make demo`.

`build_tiny_tokenizer(out_dir)` trains a byte-level BPE (the Llama-3 design in miniature:
a regex split, byte-level pieces, single digits) on a small corpus that covers the synthetic
arithmetic task of `nova_engine.data.synthetic`, and saves it with `save_pretrained` as a HF
directory that `transformers.AutoTokenizer.from_pretrained(out_dir)` loads, chat template
included. Every byte is in the alphabet, so any text round-trips exactly through
encode/decode; words the corpus covers become single tokens.

Special tokens (ids 0..5, in this order): <|begin_of_text|> (bos), <|end_of_text|>,
<|start_header_id|>, <|end_header_id|>, <|eot_id|> (eos: it ends every chat turn),
<|pad|> (pad).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from nova_engine.logging import get_logger

logger = get_logger(__name__)

BOS = "<|begin_of_text|>"
EOT_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [BOS, EOT_TEXT, START_HEADER, END_HEADER, EOT, PAD]

# The Llama-3 split regex, with single digits (Llama 3 groups up to three): numbers become
# digit sequences, which makes exact-answer arithmetic easy to read off the tokens.
SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The Llama-3 instruct chat template (without the tool-calling parts).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

_BASE_CORPUS = [
    "system",
    "user",
    "assistant",
    "You are a helpful assistant.",
    "Answer with the number only.",
    "The answer is",
    "Hello! How can I help you today?",
    "What is the capital of France? Paris.",
    "0123456789 + - * / = ( ) . , ? ! : ;",
    # the chat template's own text, so its pieces (e.g. the blank line) become tokens
    f"{BOS}{START_HEADER}user{END_HEADER}\n\nHi!{EOT}{START_HEADER}assistant{END_HEADER}\n\n",
]


def tiny_corpus(extra: Iterable[str] = ()) -> list[str]:
    """The training text for the tiny BPE: chat roles, the synthetic task's vocabulary and
    sentence templates, plus `extra` lines."""
    from nova_engine.data import synthetic

    lines = list(_BASE_CORPUS)
    lines += synthetic.corpus_lines()
    lines += list(extra)
    return lines


def build_tiny_tokenizer(
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 512,
    extra_corpus: Iterable[str] = (),
    model_max_length: int = 4096,
) -> str:
    """Train the tiny byte-level BPE and save it as a HF tokenizer directory.

    Args:
        out_dir: directory to write (created; existing tokenizer files are overwritten).
        vocab_size: total vocabulary including the 256 byte symbols and the 6 specials
            (must be >= 262 + a few merges; 512 covers the synthetic task's words).
        extra_corpus: additional training lines.
        model_max_length: stored in tokenizer_config.json.
    Returns:
        `out_dir` as a string, loadable with `AutoTokenizer.from_pretrained`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(SPECIAL_TOKENS) + 256 + 8:
        raise ValueError(f"vocab_size={vocab_size}: expected >= {len(SPECIAL_TOKENS) + 264}")
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(extra_corpus), trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    # transformers 5 writes its own class name, which 4.x cannot resolve; the fast-tokenizer
    # class name loads in both.
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out_dir, "nova_tiny_tokenizer.json"), "w") as f:
        json.dump({"vocab_size": len(tok.get_vocab()), "special_tokens": SPECIAL_TOKENS}, f)
    logger.info("tiny tokenizer: %d tokens -> %s", len(tok.get_vocab()), out_dir)
    return str(out_dir)
