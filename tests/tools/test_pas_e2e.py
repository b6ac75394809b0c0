"""nova pas end to end through the real generation path, on a tiny random model in one
spawned process (a world of one): the Nova-backed generator equals `nova generate` at
temperature 0, build-data runs with the model as teacher and judge (whatever a random model
writes: its counts must add up and its output must load), augment writes lines the RLVR
loader reads with the original prompt kept."""

from __future__ import annotations

import json
import os

import pytest

from nova_engine.parallel.spawn import run_distributed

POOL = [
    "Why is the sky blue?",
    "why is the sky blue",  # exact duplicate
    "Write a Python function that adds two numbers.",
    "What is 12 + 30?",
    "Translate 'hello' into French.",
    "Give me ideas for a party.",
]


def _run(rank: int, world: int, d: str) -> dict:
    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.data.tokenize import load_tokenizer
    from nova_engine.model.tiny import build_tiny_hf_model
    from nova_engine.tools import generate as gen_tool
    from nova_engine.tools.pas.cli import main as pas_main
    from nova_engine.tools.pas.generator import GenConfig, ModelSet

    tok = build_tiny_tokenizer(os.path.join(d, "tok"), vocab_size=320)
    model = os.path.join(d, "model")
    build_tiny_hf_model(model, "llama", 3, vocab_size=len(load_tokenizer(tok)), hidden_size=32,
                        intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, max_position_embeddings=768)  # fmt: skip
    out: dict = {}
    # 1. the generator against `nova generate` (greedy: the same text for the same prompt)
    prompts = ["Why is the sky blue?", "What is 12 + 30?"]
    with open(os.path.join(d, "gen_in.jsonl"), "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")
    rc = gen_tool.main(["--model", model, "--tokenizer", tok, "--prompts", f.name, "--out",
                        os.path.join(d, "gen_out.jsonl"), "--temperature", "0",
                        "--max-new-tokens", "6"])  # fmt: skip
    assert rc == 0
    with open(os.path.join(d, "gen_out.jsonl")) as f:
        out["tool"] = [json.loads(x)["response"] for x in f]
    ms = ModelSet(tokenizer=tok)
    g = ms.generator(model, GenConfig(temperature=0.0, max_new_tokens=6), "--teacher")
    out["ours"] = g(prompts)
    out["ours_again"] = g(prompts)
    out["too_long"] = g(["word " * 2000])
    ms.close()
    # 2. build-data: teacher = judge = the random model
    pool = os.path.join(d, "pool.jsonl")
    with open(pool, "w") as f:
        for i, p in enumerate(POOL):
            f.write(json.dumps({"id": i, "prompt": p}) + "\n")
    sft = os.path.join(d, "pas_sft.jsonl")
    out["build_rc"] = pas_main(["build-data", "--prompts", pool, "--teacher", model, "--judge",
                                model, "--tokenizer", tok, "--out", sft, "--max-new-tokens", "8",
                                "--judge-max-new-tokens", "8", "--max-regen", "1",
                                "--judge-retries", "1", "--shots", "1"])  # fmt: skip
    # 3. augment RLVR lines with the same model as the PAS model
    rl = os.path.join(d, "rlvr.jsonl")
    with open(rl, "w") as f:
        for p, a in (("What is 12 + 30?", "42"), ("What is 9 - 4?", "5")):
            f.write(json.dumps({"messages": [{"role": "user", "content": p}], "ground_truth": a,
                                "dataset": "arithmetic"}) + "\n")  # fmt: skip
    out["augment_rc"] = pas_main(["augment", "--pas-model", model, "--tokenizer", tok, "--in", rl,
                                  "--out", os.path.join(d, "rlvr.aug.jsonl"),
                                  "--max-new-tokens", "6"])  # fmt: skip
    return out


@pytest.mark.slow  # spawned process group
def test_pas_end_to_end_tiny_model(tmp_path):
    from nova_engine.data.formats import read_sft_jsonl
    from nova_engine.data.rlvr import read_rlvr_jsonl
    from nova_engine.tools.pas.augment import FIELD, SEPARATOR

    (res,) = run_distributed(_run, 1, str(tmp_path))
    assert res["ours"] == res["tool"] == res["ours_again"]
    assert all(isinstance(t, str) for t in res["ours"]) and res["too_long"] == [None]
    assert res["augment_rc"] == 0

    with open(tmp_path / "pas_sft.jsonl.report.json") as f:
        report = json.load(f)
    c = report["counts"]
    # a random model may get nothing past its own judgement: then exit 2, no output, and
    # the report says why with the rejected examples (#32)
    assert res["build_rc"] == (0 if c["written"] else 2)
    if not c["written"]:
        assert not (tmp_path / "pas_sft.jsonl").exists() and report["out"] is None
        ex = report["rejected_examples"]
        assert ex and all(e["reason"] and e["prompt"] in POOL for e in ex), ex
    assert c["read"] == len(POOL) and c["duplicates_exact"] == 1 and c["unique"] == 5
    assert sum(report["categories"].values()) == 5 and report["dedup"]["method"] == "exact"
    assert c["unique"] == (c["written"] + c["dropped_malformed"] + c["dropped_rejected"]
                           + c["dropped_too_long"])  # fmt: skip
    assert c["generated"] == 5 + c["regenerated"] and c["regenerated"] <= 5
    assert c["malformed"] >= 2 * c["dropped_malformed"]  # asked twice (1 retry) before dropping
    assert c["judged"] == c["accepted"] + c["rejected"]
    if c["written"]:
        chats, _ = read_sft_jsonl(tmp_path / "pas_sft.jsonl")
        assert len(chats) == c["written"]

    recs, _ = read_rlvr_jsonl(tmp_path / "rlvr.aug.jsonl")
    with open(tmp_path / "rlvr.aug.jsonl") as f:
        lines = [json.loads(x) for x in f]
    for rec, line, p in zip(recs, lines, ("What is 12 + 30?", "What is 9 - 4?")):
        comp = line[FIELD]
        assert isinstance(comp, str)
        want = p + SEPARATOR + comp if comp else p
        assert rec.messages[-1]["content"] == want and rec.dataset == "arithmetic"
