"""What makes a HF export directory load on its own: tokenizer files, the chat template the
run trained with, generation_config.json and the special-token ids of config.json — and the
atomic replacement of an existing export (never a merge with old weight files).

    complete_hf_export(out_dir, source_dir=model_dir, tokenizer_dir=tok_dir, template="tulu")
    check_export_target(final_dir, overwrite=False, what="--out")   # ExportError or fine
    replace_dir(tmp_dir, final_dir)   # final_dir now holds tmp_dir's files, atomically

The one rule every writer of an export directory follows (`check_export_target`): it
writes a new directory, or replaces a previous export when asked to (`overwrite`), and
never replaces a directory that holds anything but a previous export (a run directory, a
checkpoint, someone's files) nor a file.

`nova_engine.model.hf_io.export_hf` writes the weights, the index and config.json from the
architecture; this module adds the rest from the model the run started from.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import uuid
from typing import Any

from nova_engine.logging import get_logger

logger = get_logger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# what a HF export directory may hold (weights, index, configs, tokenizer files)
EXPORT_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "README.md",
    *TOKENIZER_FILES,
)


class ExportError(ValueError):
    """An export destination that must not be written (the message names it and why)."""


def is_hf_export(path: str) -> bool:
    """True when `path` is a directory holding only a HF export's files (no subdirectory,
    nothing but weights, index, configs and tokenizer files)."""
    if not os.path.isdir(path) or os.path.islink(path):
        return False
    names = os.listdir(path)
    return all(
        os.path.isfile(os.path.join(path, n))
        and any(fnmatch.fnmatchcase(n, pat) for pat in EXPORT_PATTERNS)
        for n in names
    )


def check_export_target(out: str, *, overwrite: bool, what: str = "--out") -> None:
    """May an export be written to `out`? Yes when it does not exist or is an empty
    directory, or (with `overwrite`) when it holds a previous export; ExportError
    otherwise, naming `what` (the flag or key) and what is there."""
    if not os.path.lexists(out):
        return
    if os.path.islink(out) or not os.path.isdir(out):
        raise ExportError(f"{what} {out}: is a file, not a directory: refusing to replace it")
    names = sorted(os.listdir(out))
    if not names:
        return
    if not is_hf_export(out):
        shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
        raise ExportError(
            f"{what} {out}: holds files that are not a HF export ({shown}): refusing to "
            "replace it; choose a new directory"
        )
    if not overwrite:
        raise ExportError(
            f"{what} {out}: exists (a previous export): pass --overwrite to replace it"
        )


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            obj = json.load(f)
        return obj if isinstance(obj, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def complete_hf_export(
    out_dir: str,
    *,
    source_dir: str | None,
    tokenizer_dir: str | None = None,
    template: str | None = None,
) -> None:
    """Add tokenizer files, chat template, generation config and special-token ids to the
    export in `out_dir` (rank 0, after the weights are written).

    source_dir: the HF directory the run started from (its generation_config.json and
    special-token ids are kept); tokenizer_dir: where the tokenizer files are (default
    source_dir); template: the run's `data.template` override, written into the exported
    tokenizer_config.json so the next stage renders conversations the same way."""
    tok_dir = tokenizer_dir or source_dir
    if tok_dir and os.path.isdir(tok_dir):
        for name in TOKENIZER_FILES:
            src = os.path.join(tok_dir, name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(out_dir, name))
    if template is not None:
        from nova_engine.data.tokenize import resolve_chat_template

        path = os.path.join(out_dir, "tokenizer_config.json")
        cfg = _read_json(path)
        cfg["chat_template"] = resolve_chat_template(template)
        _write_json(path, cfg)
        jinja = os.path.join(out_dir, "chat_template.jinja")
        if os.path.isfile(jinja):  # it would take precedence over tokenizer_config.json
            os.remove(jinja)
    src_cfg = _read_json(os.path.join(source_dir, "config.json")) if source_dir else {}
    cfg_path = os.path.join(out_dir, "config.json")
    cfg = _read_json(cfg_path)
    tok_cfg = _read_json(os.path.join(out_dir, "tokenizer_config.json"))
    scorer = any(str(a).endswith("ForSequenceClassification") for a in cfg.get("architectures", []))
    for key in SPECIAL_IDS:
        if src_cfg.get(key) is not None and not (scorer and key == "pad_token_id"):
            cfg[key] = src_cfg[key]  # the score head's pad id was chosen for it (hf_io)
    ids = special_ids_from_tokenizer(out_dir, src_cfg)
    for key, value in ids.items():
        if value is not None and not (scorer and key == "pad_token_id"):
            cfg[key] = value
    if cfg.get("pad_token_id") is None:
        pad = _pad_id_from_tokenizer(out_dir, tok_cfg)
        if pad is not None:
            cfg["pad_token_id"] = pad
    _write_json(cfg_path, cfg)
    gen_src = os.path.join(source_dir, "generation_config.json") if source_dir else ""
    gen = _read_json(gen_src) if gen_src and os.path.isfile(gen_src) else {}
    gen.setdefault("_from_model_config", True)
    gen.update({k: cfg[k] for k in SPECIAL_IDS if cfg.get(k) is not None})
    _write_json(os.path.join(out_dir, "generation_config.json"), gen)


# tokens that end a sequence or an assistant turn (Llama 3, Llama 3.1 tools, Qwen2 / ChatML)
END_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>")


def special_ids_from_tokenizer(tok_dir: str, src_cfg: dict | None = None) -> dict[str, Any]:
    """bos / eos / pad ids from the tokenizer in `tok_dir` (empty when it has none):
    eos is the list of end-of-sequence and end-of-turn ids (the tokenizer's eos token, the
    END_TOKENS it has, and the source config's eos ids that are such tokens: a randomly
    initialized model's config carries transformers' default ids, which may name any
    token), so `transformers.generate` stops where the chat template ends a turn."""
    if not any(os.path.isfile(os.path.join(tok_dir, n)) for n in TOKENIZER_FILES[:5]):
        return {}
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - an unreadable tokenizer: keep the config's ids
        logger.warning("%s: tokenizer not readable (%s): special ids left as they are", tok_dir, e)
        return {}
    unk = getattr(tok, "unk_token_id", None)

    def end_id(i: Any) -> int | None:
        if not isinstance(i, int) or i < 0 or i == unk:
            return None
        text = tok.convert_ids_to_tokens(i)
        return i if text in END_TOKENS or i == tok.eos_token_id else None

    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for name in END_TOKENS:
        eos.add(end_id(tok.convert_tokens_to_ids(name)))
    src = (src_cfg or {}).get("eos_token_id")
    for i in src if isinstance(src, list) else [src]:
        eos.add(end_id(i))
    eos.discard(None)
    return {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": sorted(eos) if eos else None,
        "pad_token_id": tok.pad_token_id,
    }


def _pad_id_from_tokenizer(out_dir: str, tok_cfg: dict) -> int | None:
    pad = tok_cfg.get("pad_token")
    if isinstance(pad, dict):
        pad = pad.get("content")
    if not pad:
        return None
    vocab = _read_json(os.path.join(out_dir, "tokenizer.json")).get("model", {}).get("vocab")
    added = _read_json(os.path.join(out_dir, "tokenizer.json")).get("added_tokens", [])
    for t in added:
        if t.get("content") == pad:
            return int(t["id"])
    if isinstance(vocab, dict) and pad in vocab:
        return int(vocab[pad])
    return None


def replace_dir(tmp_dir: str, final_dir: str) -> None:
    """Make `final_dir` hold exactly `tmp_dir`'s files: rename the old one aside, rename the
    new one in, delete the old one (a crash leaves either the old or the new directory,
    never a mix)."""
    old = None
    if os.path.exists(final_dir):
        old = f"{final_dir}.old-{uuid.uuid4().hex[:12]}"
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def nonfinite_tensors(path: str, limit: int = 5) -> list[str]:
    """Names of (up to `limit`) tensors of the export in `path` holding NaN/Inf, streamed
    one tensor at a time; ExportError naming the file for an unreadable shard."""
    import glob

    import torch
    from safetensors import safe_open

    bad: list[str] = []
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        try:
            with safe_open(f, "pt") as s:
                for name in s.keys():
                    t = s.get_tensor(name)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        bad.append(name)
                        if len(bad) >= limit:
                            return bad
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ExportError(f"{f}: unreadable safetensors file ({e})") from None
    return bad
