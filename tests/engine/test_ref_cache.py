"""DPO reference cache: fingerprints follow content (not paths), the cache is invalidated when
the model, the data or the tokenization changes, entries round-trip through atomic files
(in any order of puts), a partial cache resumes with the missing samples, and missing samples
are named."""

import logging
import os
import shutil

import numpy as np
import pytest
import torch

from nova_engine.data.tiny import build_tiny_tokenizer
from nova_engine.recipe import load_recipe
from nova_engine.train.ref_cache import (
    RefCache,
    RefCacheError,
    RefCacheKey,
    data_fingerprint,
    model_fingerprint,
)

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "tiny_cpu.yaml")


def _model_dir(path, seed=0, n=64):
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write('{"architectures": ["LlamaForCausalLM"], "hidden_size": 8}')
    g = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(n, 8, generator=g)}, os.path.join(path, "model.safetensors"))
    return str(path)


def test_model_fingerprint_follows_content(tmp_path):
    a = _model_dir(tmp_path / "a")
    fa = model_fingerprint(a)
    shutil.copytree(a, tmp_path / "copy")  # another path, new mtimes: same model
    assert model_fingerprint(tmp_path / "copy") == fa
    _model_dir(tmp_path / "copy", seed=1)  # retrained weights
    assert model_fingerprint(tmp_path / "copy") != fa
    with open(os.path.join(a, "config.json"), "a") as f:
        f.write(" ")
    assert model_fingerprint(a) != fa
    with pytest.raises(RefCacheError, match="no config.json"):
        model_fingerprint(tmp_path)
    os.remove(os.path.join(a, "model.safetensors"))
    with pytest.raises(RefCacheError, match="no weight files"):
        model_fingerprint(a)


def test_large_file_sampling(tmp_path):
    """Big weight files are fingerprinted from sampled blocks; `full=True` hashes all."""
    d = tmp_path / "big"
    os.makedirs(d)
    (d / "config.json").write_text("{}")
    rng = np.random.default_rng(0)
    data = bytearray(rng.integers(0, 256, 3 * 1024 * 1024, dtype=np.uint8).tobytes())
    (d / "model.safetensors").write_bytes(bytes(data))
    fast, full = model_fingerprint(d), model_fingerprint(d, full=True)
    head, block = 1024 * 1024, 64 * 1024
    inside = head + (len(data) - head - block) * 7 // 15 + 100  # in the 8th of 16 sampled blocks
    data[inside] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(data))
    assert model_fingerprint(d) != fast and model_fingerprint(d, full=True) != full
    data[inside] ^= 0xFF
    data[head + 70 * 1024] ^= 0xFF  # between sampled blocks 0 and 1: only the full hash sees it
    (d / "model.safetensors").write_bytes(bytes(data))
    assert model_fingerprint(d) == fast and model_fingerprint(d, full=True) != full


def test_data_fingerprint(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"x": 1}\n{"x": 2}\n')
    (tmp_path / "b.jsonl").write_text('{"x": 1}\n{"x": 2}\n')
    (tmp_path / "c.jsonl").write_text('{"x": 1}\n{"x": 3}\n')
    fa = data_fingerprint(tmp_path / "a.jsonl")
    assert (
        data_fingerprint(str(tmp_path / "b.jsonl")) == fa != data_fingerprint(tmp_path / "c.jsonl")
    )
    assert data_fingerprint([tmp_path / "a.jsonl", tmp_path / "c.jsonl"]) != data_fingerprint(
        [tmp_path / "c.jsonl", tmp_path / "a.jsonl"]
    )


@pytest.fixture
def run_setup(tmp_path):
    model = _model_dir(tmp_path / "model")
    tok = build_tiny_tokenizer(tmp_path / "tok")
    data = tmp_path / "pref.jsonl"
    data.write_text('{"prompt": "1+1?", "chosen": "2", "rejected": "3"}\n')
    overrides = [
        f"model.hf_path={model}",
        f"model.tokenizer_path={tok}",
        f"data.train_paths=[{data}]",
        f"loss.ref_cache_dir={tmp_path / 'cache'}",
    ]
    return tmp_path, overrides


def _fill(cache, idx, seed=0):
    rng = np.random.default_rng(seed)
    c, r = -rng.random(len(idx)) * 50, -rng.random(len(idx)) * 50
    cn, rn = rng.integers(1, 100, len(idx)), rng.integers(1, 100, len(idx))
    cache.put(idx, c, r, cn, rn)
    return c, r, cn, rn


def test_cache_invalidated_by_model_data_and_config(run_setup):
    tmp, ov = run_setup
    run = load_recipe(RECIPE, "dpo", ov)
    key = RefCacheKey.for_run(run)
    cache = RefCache.open(run.ref_cache_dir, key, expected=[0, 1, 2])
    assert not cache.complete and list(cache.missing()) == [0, 1, 2]
    vals = _fill(cache, [0, 1, 2])
    cache.save()
    again = RefCache.open(
        run.ref_cache_dir, RefCacheKey.for_run(load_recipe(RECIPE, "dpo", ov)), expected=[0, 1, 2]
    )
    assert again.complete and again.stale() == []
    for got, want in zip(again.lookup([2, 0]), vals):
        np.testing.assert_array_equal(got, np.asarray(want)[[2, 0]])

    keys = {"base": key}
    _model_dir(tmp / "model", seed=7)  # the reference model changed
    keys["model"] = RefCacheKey.for_run(run)
    _model_dir(tmp / "model", seed=0)
    with open(tmp / "pref.jsonl", "a") as f:  # the data changed
        f.write('{"prompt": "2+2?", "chosen": "4", "rejected": "5"}\n')
    keys["data"] = RefCacheKey.for_run(run)
    keys["max_length"] = RefCacheKey.for_run(
        load_recipe(RECIPE, "dpo", ov + ["data.max_length=32"])
    )
    keys["precision"] = RefCacheKey.for_run(
        load_recipe(RECIPE, "dpo", ov + ["train.precision=bf16"])
    )
    with open(os.path.join(tmp / "tok", "tokenizer_config.json"), "a") as f:
        f.write("\n")  # the tokenizer files changed
    keys["tokenizer"] = RefCacheKey.for_run(run)
    assert keys["model"].model != key.model and keys["model"].data == key.data
    assert keys["data"].data != key.data and keys["data"].model == key.model
    assert len({k.digest for k in keys.values()}) == len(keys)
    # a training-only change does not invalidate the cache
    assert (
        RefCacheKey.for_run(
            load_recipe(RECIPE, "dpo", ov + ["optim.lr=1e-3", "loss.beta=0.1"])
        ).config
        == keys["tokenizer"].config
    )
    for name in ("model", "data", "max_length", "tokenizer"):
        fresh = RefCache.open(run.ref_cache_dir, keys[name], expected=[0, 1, 2])
        assert not fresh.complete and list(fresh.missing()) == [0, 1, 2]
        assert fresh.stale() == [cache.path]  # the old cache is listed, not reused
        with pytest.raises(RefCacheError, match="sample 0 is not in the reference cache"):
            fresh.lookup([0])


def test_key_mismatch_and_damage(tmp_path, caplog):
    k1, k2 = RefCacheKey("m1", "d", "c"), RefCacheKey("m2", "d", "c")
    c1 = RefCache.open(tmp_path, k1, expected=[0])
    _fill(c1, [0])
    c1.save()
    os.replace(c1.path, RefCache(str(tmp_path), k2, None).path)  # a file under the wrong name
    # a damaged or mislabelled cache is rebuilt (warning), not fatal: open() gives an empty one
    with caplog.at_level(logging.WARNING, logger="nova_engine"):
        wrong = RefCache.open(tmp_path, k2, expected=[0])
    assert "stored for key" in caplog.text and list(wrong.missing()) == [0]
    with open(RefCache(str(tmp_path), k2, None).path, "wb") as f:
        f.write(b"PK\x03\x04 torn")
    with caplog.at_level(logging.WARNING, logger="nova_engine"):
        torn = RefCache.open(tmp_path, k2, expected=[0])
    assert "damaged reference cache" in caplog.text and not torn.complete
    with pytest.raises(RefCacheError, match="damaged reference cache"):
        RefCache(str(tmp_path), k2, None)._load(RefCache(str(tmp_path), k2, None).path)


def test_save_is_atomic(tmp_path, monkeypatch):
    key = RefCacheKey("m", "d", "c")
    cache = RefCache.open(tmp_path, key, expected=[0, 1])
    want = _fill(cache, [0, 1])
    cache.save()
    _fill(cache, [0, 1], seed=5)

    def crash(*a, **k):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.save()
    monkeypatch.undo()
    assert os.listdir(tmp_path) == [os.path.basename(cache.path)]  # no temp left behind
    back = RefCache.open(tmp_path, key, expected=[0, 1])
    np.testing.assert_array_equal(back.lookup([0, 1])[0], want[0])  # the old, whole file


def test_round_trip_and_partial_resume(tmp_path):
    key = RefCacheKey("m", "d", "c")
    expected = [0, 1, 2, 3, 5]  # sample 4 was dropped by the length policy
    cache = RefCache.open(tmp_path, key, expected=expected)
    vals = {}
    for seed, idx in enumerate([[5, 0, 2], [3, 1]]):  # entries arrive in any order
        c, r, cn, rn = _fill(cache, idx, seed=seed)
        vals.update({i: (c[j], r[j], cn[j], rn[j]) for j, i in enumerate(idx)})
    assert cache.complete
    cache.save()
    assert os.listdir(tmp_path) == [os.path.basename(cache.path)]
    back = RefCache.open(tmp_path, key, expected)
    assert back.complete
    c, r, cn, rn = back.lookup(expected)
    for j, i in enumerate(expected):
        assert (c[j], r[j], cn[j], rn[j]) == vals[i]
    with pytest.raises(RefCacheError, match="sample 4 is not in the reference cache"):
        back.lookup([3, 4])
    back.check_token_counts([0, 1], cn[:2], rn[:2])
    with pytest.raises(RefCacheError, match=r"sample 1: cached response lengths"):
        back.check_token_counts([0, 1], cn[:2], [rn[0], rn[1] + 1])
    # a partially computed cache resumes with only the missing indices
    partial = RefCache.open(tmp_path / "p", key, expected=expected)
    _fill(partial, [0, 1])
    partial.save()
    resumed = RefCache.open(tmp_path / "p", key, expected=expected)
    assert not resumed.complete and list(resumed.missing()) == [2, 3, 5]


class _Boom:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {_Boom.marker}",))


@pytest.mark.parametrize("field", ["meta", "chosen_logp"])
def test_crafted_pickle_in_the_cache_refused_and_nothing_runs(tmp_path, caplog, field):
    """A cache file whose array is a pickle (an object array naming os.system) is refused in
    one line, never unpickled; open() rebuilds instead of running it."""
    key = RefCacheKey("m", "d", "c")
    good = RefCache.open(tmp_path, key, expected=[0])
    _fill(good, [0])
    good.save()
    with np.load(good.path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    _Boom.marker = str(tmp_path / "ran")
    arrays[field] = np.array([_Boom()], dtype=object)
    with open(good.path, "wb") as f:
        np.savez(f, **arrays)  # a pickled object array inside the .npz
    with pytest.raises(RefCacheError, match="damaged reference cache") as e:
        RefCache(str(tmp_path), key, None)._load(good.path)
    assert "\n" not in str(e.value) and "allow_pickle" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="nova_engine"):
        again = RefCache.open(tmp_path, key, expected=[0])
    assert list(again.missing()) == [0] and "damaged reference cache" in caplog.text
    assert not os.path.exists(_Boom.marker)  # nothing ran
