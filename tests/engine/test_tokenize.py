"""Tokenization: assistant-only loss masks checked token by token against the template's own
rendering (Llama 3 and ChatML templates), pairs sharing prompt tokens, the max-length policy,
and the clear error for templates that are not prefix-stable."""

import numpy as np
import pytest

from nova_engine.data.formats import ChatRecord, PairRecord
from nova_engine.data.tiny import build_tiny_tokenizer
from nova_engine.data.tokenize import ChatTokenizer, TemplateError, tokenize_pairs, tokenize_sft

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CONV = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is forty-seven plus eighteen?"},
    {"role": "assistant", "content": "65"},
    {"role": "user", "content": "And minus three?"},
    {"role": "assistant", "content": "The answer is 62."},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


@pytest.fixture
def chatml_tok(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def _spans(mask):
    """Maximal runs of 1s as (start, stop)."""
    m = np.concatenate([[0], np.asarray(mask, dtype=np.int8), [0]])
    d = np.diff(m)
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def test_llama3_mask_token_by_token(hf_tok):
    ct = ChatTokenizer(hf_tok)
    tokens, mask = ct.encode_chat(CONV)
    # the tokens are exactly the template's rendering, encoded
    text = hf_tok.apply_chat_template(CONV, tokenize=False)
    assert tokens == hf_tok.encode(text, add_special_tokens=False)
    assert hf_tok.decode(tokens) == text
    # the targets are the two assistant contents, each with its closing <|eot_id|>
    spans = _spans(mask)
    assert [hf_tok.decode(tokens[a:b]) for a, b in spans] == [
        "65<|eot_id|>",
        "The answer is 62.<|eot_id|>",
    ]
    # ... and each span starts right after the assistant header, token by token
    header = hf_tok.encode(
        "<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False
    )
    for a, _ in spans:
        assert tokens[a - len(header) : a] == header
    # everything else (bos, headers, system, user turns) is masked out
    unmasked = "".join(hf_tok.decode([t]) for t, m in zip(tokens, mask) if not m)
    assert "What is forty-seven" in unmasked and "65" not in unmasked and "62" not in unmasked
    assert mask[0] == 0 and mask.dtype == np.uint8


def test_chatml_mask_token_by_token(chatml_tok):
    ct = ChatTokenizer(chatml_tok)
    tokens, mask = ct.encode_chat(CONV[1:])
    text = chatml_tok.apply_chat_template(CONV[1:], tokenize=False)
    assert chatml_tok.decode(tokens) == text
    assert [chatml_tok.decode(tokens[a:b]) for a, b in _spans(mask)] == [
        "65<|im_end|>\n",
        "The answer is 62.<|im_end|>\n",
    ]


def test_not_prefix_stable_templates_raise(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    # text prefix broken: the template writes the turn count first
    tok.chat_template = (
        "{{ messages|length }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(
        TemplateError, match=r"x\.jsonl:3: chat template of .* is not prefix-stable"
    ):
        ChatTokenizer(tok).encode_chat(CONV[1:3], source="x.jsonl:3")
    # text prefix holds, token prefix does not: "\n" then "\n65" merges into "\n\n" + "65"
    tok.chat_template = (
        "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
        " + m['content'] + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n' }}"
        "{% endif %}"
    )
    with pytest.raises(TemplateError, match=r"first difference at token \d+"):
        ChatTokenizer(tok).encode_chat(CONV[1:3])
    tok.chat_template = None
    with pytest.raises(TemplateError, match="has no chat_template"):
        ChatTokenizer(tok)


def test_sft_samples_and_max_length_policy(tok_dir):
    recs = [ChatRecord(CONV, 0, "a:1"), ChatRecord(CONV[1:3], 1, "a:2")]
    full, stats = tokenize_sft(recs, tok_dir)  # tokenizer from a directory path
    assert [s.index for s in full] == [0, 1]
    n0, n1 = len(full[0]), len(full[1])
    assert (stats.n_in, stats.n_out, stats.truncated, stats.n_dropped) == (2, 2, 0, 0)
    first_target = int(np.flatnonzero(full[0].loss_mask)[0])

    # truncate between the two assistant turns of sample 0: its first turn keeps the loss
    cut = int(_spans(full[0].loss_mask)[0][1]) + 2
    assert cut < n0 and n1 <= cut
    out, stats = tokenize_sft(recs, tok_dir, max_length=cut)
    assert [len(s) for s in out] == [cut, n1]
    np.testing.assert_array_equal(out[0].tokens, full[0].tokens[:cut])
    np.testing.assert_array_equal(out[0].loss_mask, full[0].loss_mask[:cut])
    assert (stats.truncated, stats.n_dropped, stats.n_out) == (1, 0, 2)

    # truncate before any target of sample 0: dropped, counted as "no loss"
    out, stats = tokenize_sft(recs[:1], tok_dir, max_length=first_target)
    assert out == [] and (stats.dropped_no_loss, stats.truncated) == (1, 0)

    # "drop" policy: anything longer than max_length goes
    out, stats = tokenize_sft(recs, tok_dir, max_length=n1, truncation="drop")
    assert [s.index for s in out] == [1] and stats.dropped_too_long == 1
    with pytest.raises(ValueError, match="truncation='cut'"):
        tokenize_sft(recs, tok_dir, truncation="cut")


def test_pairs_share_prompt_and_mask_response(hf_tok):
    prompt = CONV[:2]
    rec = PairRecord(
        prompt,
        [{"role": "assistant", "content": "65"}],
        [{"role": "assistant", "content": "fifty-five, I think"}],
        index=4,
        source="p:1",
        margin=3.0,
    )
    (pair,), stats = tokenize_pairs([rec], hf_tok)
    assert pair.index == 4 and pair.chosen.index == 4 and pair.margin == 3.0
    p_ids = hf_tok.encode(
        hf_tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )
    for side, answer in ((pair.chosen, "65"), (pair.rejected, "fifty-five, I think")):
        assert list(side.tokens[: len(p_ids)]) == p_ids
        assert not side.loss_mask[: len(p_ids)].any()
        assert side.loss_mask[len(p_ids) :].all()
        assert hf_tok.decode(side.tokens[len(p_ids) :]) == answer + "<|eot_id|>"

    # truncation per side; a side with no response token left drops the pair
    n_short = len(pair.chosen)
    (cut,), stats = tokenize_pairs([rec], hf_tok, max_length=n_short)
    assert len(cut.chosen) == n_short and len(cut.rejected) == n_short
    assert stats.truncated == 1
    out, stats = tokenize_pairs([rec], hf_tok, max_length=len(p_ids))
    assert out == [] and stats.dropped_no_loss == 1
    out, stats = tokenize_pairs([rec], hf_tok, max_length=n_short, truncation="drop")
    assert out == [] and stats.dropped_too_long == 1


def test_prompt_ids_and_stop_tokens(hf_tok):
    ct = ChatTokenizer(hf_tok)
    ids = ct.prompt_ids(CONV[1:2])
    assert hf_tok.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert hf_tok.convert_tokens_to_ids("<|eot_id|>") in ct.eos_token_ids


def test_load_samples_end_to_end(tmp_path, tok_dir):
    from nova_engine.data import synthetic
    from nova_engine.data.tokenize import load_samples

    paths = synthetic.write_task(tmp_path, n_sft=30, n_pref=20, n_eval=5, seed=1)
    with open(paths["sft"], "a") as f:
        f.write("{oops\n")
    sft, rs, ts = load_samples(paths["sft"], tok_dir, "chat", on_bad_line="skip", max_length=64)
    assert len(sft) == 30 and rs.n_skipped == 1 and ts.n_out == 30
    assert [s.index for s in sft] == list(range(30))
    pairs, _, _ = load_samples([paths["pref"]], tok_dir, "pairs", max_length=64)
    assert len(pairs) == 20 and all(p.chosen.loss_mask.sum() >= 2 for p in pairs)


def test_template_option_for_a_base_tokenizer(tok_dir, tmp_path):
    """A tokenizer without a chat template gets one by name ("tulu") or from a Jinja file; the
    assistant-only mask then covers exactly the assistant content and its closing EOS."""
    from transformers import AutoTokenizer

    from nova_engine.data.tokenize import CHAT_TEMPLATES, load_tokenizer

    base = AutoTokenizer.from_pretrained(tok_dir)
    base.chat_template = None
    eos = base.eos_token
    ct = ChatTokenizer(base, template="tulu")
    tokens, mask = ct.encode_chat(CONV[1:3])
    text = base.decode(np.asarray(tokens)[mask.astype(bool)])
    assert text == "65" + eos
    want = "<|user|>\nWhat is forty-seven plus eighteen?\n<|assistant|>\n65" + eos
    assert ct.render(CONV[1:3]) == want
    jinja = tmp_path / "chatml.jinja"
    jinja.write_text(CHAT_TEMPLATES["chatml"])
    tok = load_tokenizer(tok_dir, template=str(jinja))
    assert tok.chat_template == CHAT_TEMPLATES["chatml"]
    samples, _ = tokenize_sft([ChatRecord(CONV, 0, "a:1")], tok_dir, template="tulu")
    assert len(samples) == 1 and samples[0].loss_mask.sum() > 0
    with pytest.raises(TemplateError, match="expected one of"):
        ChatTokenizer(base, template="no-such-template")
    (tmp_path / "bad.jinja").write_text("hello")
    with pytest.raises(TemplateError, match="never reads"):
        ChatTokenizer(base, template=str(tmp_path / "bad.jinja"))


def test_huge_line_is_cut_before_tokenizing(hf_tok):
    """A ~400 kB message with max_length=64: the same samples as tokenizing it whole and then
    truncating (SFT and pairs), without tokenizing the whole text; "drop" drops it unread."""
    import random

    rng = random.Random(0)
    words = ["seven", "plus", "eighteen", "is", "sixty-five", "minus", "3", "and", "\n"]
    huge = " ".join(rng.choice(words) for _ in range(60_000))  # ~400 kB
    conv = [CONV[1], {"role": "assistant", "content": huge}]
    ct = ChatTokenizer(hf_tok, max_length=64)
    seen = []
    encode = ct.encode_text
    ct.encode_text = lambda text: seen.append(len(text)) or encode(text)
    got = ct.sft_sample(ChatRecord(conv, 0, "a:1"))
    assert max(seen) < 200 * ct._chars_per_token < len(huge) / 50  # never the whole text
    whole, mask = ChatTokenizer(hf_tok).encode_chat(conv)
    assert got is not None and list(got.tokens) == whole[:64]
    assert np.array_equal(got.loss_mask, mask[:64]) and ct.stats.truncated == 1
    pair = ChatTokenizer(hf_tok, max_length=64).pair_sample(
        PairRecord([CONV[1]], [conv[1]], [CONV[2]], 0, "b:1")
    )
    full, fmask = ChatTokenizer(hf_tok).encode_response([CONV[1]], [conv[1]])
    assert pair is not None and list(pair.chosen.tokens) == full[:64]
    assert np.array_equal(pair.chosen.loss_mask, fmask[:64])
    drop = ChatTokenizer(hf_tok, max_length=64, truncation="drop")
    assert drop.sft_sample(ChatRecord(conv, 0, "a:1")) is None
    assert drop.stats.dropped_too_long == 1
