#!/usr/bin/env bash
# One call on a lent GPU machine (device tool `run`): set up, check the kernels on the GPU,
# run every benchmark at full size, copy the result CSVs to $OUT.
#
# Here, first:   bash ../shared/gpu/wheels.sh     (megatron-core, liger-kernel, ... into .whl/)
# Then, in two calls (one call may run 10 minutes; each bench is capped at 150 s):
#   run(command="bash benchmarks/gpu_session.sh train_smoke tests linear_logprobs
#       linear_cross_entropy", carry=[".whl"], timeout_s=600)
#   run(command="bash benchmarks/gpu_session.sh seq_reduce gae group_advantages whiten
#       policy_loss train_throughput packed_attention linear_pair_logprobs", carry=[".whl"],
#       timeout_s=600)
# and commit what comes back under benchmarks/results/ (rows carry the device name).
# No arguments: everything (too long for one call).
#
# train_smoke: the trainer end to end on one GPU (NCCL, world 1, bf16 with fp32 master
# weights): 6 + 10 SFT steps and 10 DPO steps (with the reference pass) of the tiny model,
# each step's loss compared with the CPU fp32 golden values (tests/engine/golden/*.json)
# within 3% + 2e-3 (~1 min). It proves the NCCL collectives (every tensor on the device), the
# kernels inside the loss and the optimizer on CUDA in one call; "golden check: passed".
#
# The GPU image has torch 2.11 + triton 3.6 (not this machine's 2.13 / 3.9); nothing here
# has run on a GPU yet, so the first session reads the output for failures first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 setup.py -q build_ext --inplace 2>&1 | tail -3  # nova_engine._C (the packer)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

ALL="train_smoke tests linear_logprobs linear_cross_entropy seq_reduce gae group_advantages whiten
     policy_loss train_throughput packed_attention linear_pair_logprobs"
for b in ${@:-$ALL}; do
    if [ "$b" = train_smoke ]; then
        timeout 300 python3 tests/engine/golden/run_golden.py --check --precision bf16 \
            --rtol 3e-2 --atol 2e-3 2>&1 | grep -v -i warn | tail -40 | tee "$OUT/train_smoke.txt"
    elif [ "$b" = tests ]; then
        # kernels compiled for the GPU (no interpreter), against the references
        timeout 240 python3 -m pytest -q -x -p no:cacheprovider --import-mode=importlib \
            tests/kernels 2>&1 | tail -15
    else
        timeout 150 python3 -m benchmarks.bench_$b 2>&1 | tail -12
    fi
done
cp benchmarks/results/*_cuda.csv "$OUT"/ 2>/dev/null
ls -la "$OUT"
