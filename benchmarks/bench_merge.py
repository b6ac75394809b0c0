"""Peak memory of `nova merge` on a model of more than 1 GB: streamed, so bounded by a few
chunks and a method's whole-tensor pass, not by the model.

    python -m benchmarks.bench_merge            # expo, linear, task_arithmetic, slerp, ties
    python -m benchmarks.bench_merge --quick    # expo only (what `make bench` runs on CPU)

Two random bfloat16 Llama-shaped models (init, and aligned = init + noise; 10 layers,
H 2048, F 5632, 8 KV heads, V 32000, untied head: 1.16 GB each, in 4 shards) are written
into a temporary directory, streamed to disk as they are generated. Each method then merges
them in a fresh subprocess. After its imports (the interpreter + torch + nova_engine) the
child resets its resident-set high-water mark (`/proc/self/clear_refs`, "5") and reads its
RSS (the baseline); after the merge it reads the high-water mark VmHWM (the peak).
`resource.getrusage(RUSAGE_SELF).ru_maxrss` is recorded too (ru_maxrss_bytes) but cannot be
the measure: Linux carries it across fork + exec, so the child's value starts at the
parent's RSS (~0.7 GB here: torch plus the model generator) and the merge never shows in it.
The bench asserts, for every method,

    peak - baseline < 3 x the largest tensor (the 131 MB bfloat16 embedding)

and writes rows (op "merge", impl = method): peak_rss_above_baseline_bytes, bound_bytes,
peak_over_largest_tensor, baseline_rss_bytes, ru_maxrss_bytes, model_bytes, and seconds
(one run, wall clock, contended: this is not a timing benchmark). Expected: a few
1M-element chunk buffers (4 MiB each in float32) for every method, TIES included (its trim
thresholds come from a streamed radix select), plus what the allocator keeps: tens of MB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks._common import env_info, results_path, write_rows
from nova_engine.tools.merge.safetensors_io import INDEX_NAME, ShardWriter

ROOT = Path(__file__).resolve().parent.parent
LAYERS, H, F, KV, V = 10, 2048, 5632, 512, 32000
SHARD_BYTES = 350_000_000

METHODS = {  # method -> (constructor source, model roles)
    "expo": ("ExPO(0.3)", ["init", "aligned"]),
    "linear": ("Linear([0.5, 0.5])", ["init", "aligned"]),
    "task_arithmetic": ("TaskArithmetic([0.7])", ["init", "aligned"]),
    "slerp": ("Slerp(0.4)", ["init", "aligned"]),
    "ties": ("Ties(0.2)", ["init", "aligned"]),
}


def llama_shapes() -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("model.embed_tokens.weight", (V, H))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (H,)),
            (p + "self_attn.q_proj.weight", (H, H)),
            (p + "self_attn.k_proj.weight", (KV, H)),
            (p + "self_attn.v_proj.weight", (KV, H)),
            (p + "self_attn.o_proj.weight", (H, H)),
            (p + "post_attention_layernorm.weight", (H,)),
            (p + "mlp.gate_proj.weight", (F, H)),
            (p + "mlp.up_proj.weight", (F, H)),
            (p + "mlp.down_proj.weight", (H, F)),
        ]
    return shapes + [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]


def write_models(root: str) -> tuple[int, int]:
    """Write init/ and aligned/ (sharded, with index and config); -> (model bytes, largest
    tensor bytes). Generated and written chunk by chunk (this process stays small too)."""
    shapes = llama_shapes()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    k = len(shards)
    files = [f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V,
              "hidden_size": H, "intermediate_size": F, "num_hidden_layers": LAYERS,
              "num_attention_heads": 32, "num_key_value_heads": KV // 64,
              "torch_dtype": "bfloat16"}  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for model in ("init", "aligned"):
        os.makedirs(os.path.join(root, model))
    for fname, group in zip(files, shards):
        entries = [(n, "BF16", s) for n, s in group]
        writers = [ShardWriter(os.path.join(root, m, fname), entries, {"format": "pt"})
                   for m in ("init", "aligned")]  # fmt: skip
        for _, shape in group:
            n = math.prod(shape)
            for s in range(0, n, 1 << 24):
                init = torch.randn(min(n, s + (1 << 24)) - s, generator=gen).mul_(0.02)
                writers[0].write(init.bfloat16())
                init.add_(torch.randn(init.shape, generator=gen), alpha=1e-3)
                writers[1].write(init.bfloat16())
        for w in writers:
            w.close()
    total = sum(math.prod(s) * 2 for _, s in shapes)
    weight_map = {n: f for f, g in zip(files, shards) for n, _ in g}
    for model in ("init", "aligned"):
        with open(os.path.join(root, model, INDEX_NAME), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
        with open(os.path.join(root, model, "config.json"), "w") as fh:
            json.dump(config, fh)
    return total, max(math.prod(s) * 2 for _, s in shapes)


CHILD = """
import gc, json, resource, time
import torch
from nova_engine.tools.merge import merge_models, ExPO, Linear, TaskArithmetic, Slerp, Ties

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith(key + ":"))

gc.collect()
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset this process's high-water mark (VmHWM) to its current RSS
base = status("VmRSS")
t0 = time.perf_counter()
merge_models({ctor}, {dirs!r}, {out!r})
seconds = time.perf_counter() - t0
print(json.dumps({{"baseline": base, "peak": status("VmHWM"), "seconds": seconds,
                  "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def measure(method: str, root: str) -> dict:
    ctor, roles = METHODS[method]
    out = os.path.join(root, f"out_{method}")
    code = CHILD.format(ctor=ctor, dirs=[os.path.join(root, r) for r in roles], out=out)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "NOVA_LOG_LEVEL": "WARNING"})  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"{method}: merge failed:\n{res.stderr[-3000:]}")
    subprocess.run(["rm", "-rf", out], check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="expo only")
    ap.add_argument("--reps", type=int, default=1, help="(ignored: one run per method)")
    ap.add_argument("--methods", default=None, help="comma-separated subset")
    args = ap.parse_args(argv)
    methods = args.methods.split(",") if args.methods else (
        ["expo"] if args.quick else list(METHODS))  # fmt: skip
    device = env_info()["device"] + f", {os.cpu_count()} cores, contended"
    rows, failures = [], []
    with tempfile.TemporaryDirectory(prefix="bench_merge_") as root:
        model_bytes, largest = write_models(root)
        bound = 3 * largest
        shape = f"{model_bytes / 1e9:.2f} GB bf16 x2 (L{LAYERS} H{H} F{F} V{V}), largest {largest / 1e6:.0f} MB"
        for method in methods:
            m = measure(method, root)
            extra = m["peak"] - m["baseline"]
            base = dict(op="merge", impl=method, shape=shape, mode="stream", device=device)
            for metric, value in (
                ("peak_rss_above_baseline_bytes", extra),
                ("bound_bytes", bound),
                ("peak_over_largest_tensor", extra / largest),
                ("baseline_rss_bytes", m["baseline"]),
                ("ru_maxrss_bytes", m["ru_maxrss"]),
                ("model_bytes", model_bytes),
                ("seconds", m["seconds"]),
            ):
                rows.append({**base, "metric": metric, "p50": value})
            ok = extra < bound
            print(f"{method:16s} peak above baseline {extra / 1e6:7.1f} MB "
                  f"({extra / largest:.2f}x largest tensor; bound {bound / 1e6:.0f} MB) "
                  f"{'ok' if ok else 'OVER'}  {m['seconds']:.1f} s")  # fmt: skip
            if not ok:
                failures.append(method)
    path = results_path("merge")
    write_rows(path, rows)
    print(f"wrote {path}")
    assert not failures, f"peak memory over 3x the largest tensor: {failures}"
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
