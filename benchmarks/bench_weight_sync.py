"""Weight sync trainer -> generator (nova_engine.model.weight_sync, issue #27) against the
bytes-over-bandwidth floor: a plain broadcast of one buffer of the same byte count over the
same group, timed interleaved with the sync (A B A B, `time_interleaved`) in the same run.

    python -m benchmarks.bench_weight_sync                  # tiny and ~0.64 GB models
    python -m benchmarks.bench_weight_sync --models tiny    # seconds
    python -m benchmarks.bench_weight_sync --layout tp2 --append   # + TP2 -> TP1 rows

Spawned gloo ranks (CPU): the trainer at TP1 on rank 0 and the generator at TP1 on rank 1
(`--layout tp1`), or the trainer at TP2 on ranks 0-1 and the generator on rank 2
(`--layout tp2`: the sync then also gathers the TP shards). Random Llama weights (fp32,
untied head), nothing downloaded. The times are the generation rank's (the sync is done
when its last parameter is loaded); a barrier starts every timed call on all ranks.

Rows per model and bucket size: seconds (p50/p20/p80) of the sync and of the floor, GB/s of
each (stream bytes / time), wire_wait_seconds (of the sync, the generator blocked waiting
for a bucket: weight_sync_wait_s; the rest is its copying into the parameters), and
efficiency = floor p50 / sync p50 (1 = at the link's bandwidth; the issue's goal is >= 0.5,
i.e. within 2x).

Rows: benchmarks/results/weight_sync_<cuda|cpu>.csv.
"""

from __future__ import annotations

import argparse
import os

import torch

from benchmarks._common import results_path, time_interleaved, write_rows
from nova_engine.parallel.spawn import run_distributed

MODELS = {
    "tiny": dict(num_hidden_layers=4),  # tiny_hf_config's defaults: hidden 96, vocab 1000
    "big": dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=256,
    ),
}  # fmt: skip
BUCKETS_MIB = {"tiny": (256,), "big": (256, 32)}
REPS = {"tiny": 20, "big": 5}
LAYOUTS = {"tp1": (2, 1), "tp2": (3, 2)}  # world size, trainer TP (the generator: TP1, 1 rank)


def _arch(name: str):
    from nova_engine.model.arch import arch_from_hf_config
    from nova_engine.model.tiny import tiny_hf_config

    cfg = tiny_hf_config("llama", tie_word_embeddings=False, **MODELS[name]).to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    return arch_from_hf_config(cfg)


def _bench(rank: int, world: int, names: list[str], reps_scale: float) -> list[dict]:
    import torch.distributed as dist

    from nova_engine.model.weight_sync import WeightSync
    from nova_engine.parallel.state import initialize_parallel, new_parallel_state
    from nova_engine.train.engine import ModelEngine

    initialize_parallel(tp=1, seed=0)
    train_tp = world - 1
    tps = new_parallel_state(tp=train_tp, ranks=range(0, world - 1))
    gps = new_parallel_state(tp=1, ranks=range(world - 1, world))
    out = []
    for name in names:
        arch = _arch(name)
        torch.manual_seed(0)
        trainer = ModelEngine(arch, tps, trainable=False) if tps else None
        gen = ModelEngine(arch, gps, trainable=False) if gps else None
        for mib in BUCKETS_MIB[name]:
            ws = WeightSync(trainer, gen, bucket_mb=mib)
            stage = ws.stages[0]
            buf = torch.empty(ws.total_bytes, dtype=torch.uint8)  # the floor's one buffer
            part = rank == stage.src or gps is not None

            def floor(buf=buf, stage=stage, part=part) -> None:
                dist.barrier()
                if part:
                    dist.broadcast(buf, src=stage.src, group=stage.group)

            waits: list[float] = []

            def sync(ws=ws, waits=waits) -> None:
                dist.barrier()
                waits.append(ws.sync()["weight_sync_wait_s"])

            reps = max(3, int(REPS[name] * reps_scale))
            times = time_interleaved({"sync": sync, "floor": floor}, warmup=1, reps=reps)
            if gps is not None:
                w = torch.tensor(waits[1:], dtype=torch.float64)  # the timed ones
                wait = tuple(float(torch.quantile(w, q)) for q in (0.5, 0.2, 0.8))
                out.append(dict(name=name, mib=mib, nbytes=ws.total_bytes,
                                params=arch.num_params, buckets=ws.last["weight_sync_buckets"],
                                times=times, wait=wait))  # fmt: skip
            del buf
        del trainer, gen
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    ap.add_argument("--layout", choices=tuple(LAYOUTS), default="tp1")
    ap.add_argument("--reps-scale", type=float, default=1.0, help="scale the repetitions")
    ap.add_argument("--out", default=None, help="CSV path (default: results_path)")
    ap.add_argument("--append", action="store_true", help="add to the CSV's rows")
    args = ap.parse_args(argv)
    world, train_tp = LAYOUTS[args.layout]
    results = run_distributed(_bench, world, args.models, args.reps_scale)
    got = [r for rank_rows in results for r in rank_rows]
    load = os.getloadavg()[0]
    device = (
        f"cpu ({_cpu()}), 2 cores shared with other agents, load average {load:.0f} at the end"
        if not torch.cuda.is_available()
        else torch.cuda.get_device_name()
    )
    rows = []
    for r in got:
        shape = (
            f"{r['name']}: {r['params'] / 1e6:.1f}M params fp32, {r['nbytes'] / 1e9:.3f} GB; "
            f"TP{train_tp} on {world - 1} rank(s) -> TP1 on 1 rank; bucket {r['mib']} MiB "
            f"({r['buckets']:.0f} buckets)"
        )
        t = r["times"]
        for impl in ("sync", "floor"):
            base = dict(op="weight_sync", impl=impl if impl == "sync" else "broadcast_floor",
                        shape=shape, mode="sync", device=device)  # fmt: skip
            p50, p20, p80 = t[impl]
            rows.append({**base, "metric": "seconds", "p50": p50, "p20": p20, "p80": p80})
            gbs = [r["nbytes"] / x / 1e9 for x in (p50, p80, p20)]
            rows.append({**base, "metric": "GB/s", "p50": gbs[0], "p20": gbs[1], "p80": gbs[2]})
        p50, p20, p80 = r["wait"]  # of the sync: the generator blocked on the wire
        rows.append(dict(op="weight_sync", impl="sync", shape=shape, mode="sync", device=device,
                         metric="wire_wait_seconds", p50=p50, p20=p20, p80=p80))  # fmt: skip
        eff = t["floor"][0] / t["sync"][0]
        rows.append(dict(op="weight_sync", impl="sync", shape=shape, mode="sync", device=device,
                         metric="efficiency", p50=eff))  # fmt: skip
        print(
            f"{r['name']:5s} {r['nbytes'] / 1e9:.3f} GB bucket {r['mib']:4d} MiB: sync "
            f"{t['sync'][0]:.3f} s (p20 {t['sync'][1]:.3f}, p80 {t['sync'][2]:.3f}), floor "
            f"{t['floor'][0]:.3f} s -> sync / floor = {1 / eff:.2f} (generator waiting on the "
            f"wire {r['wait'][0]:.3f} s of the sync)"
        )
    out = args.out or results_path("weight_sync")
    write_rows(out, rows, append=args.append)
    print(f"rows: {out}")


def _cpu() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
