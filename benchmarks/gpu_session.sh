#!/usr/bin/env bash
# One device call on a lent one-GPU machine (H100 / H200, no network): set up, run the kernel
# tests compiled for the GPU, the bf16 golden-loss smoke of every stage on NCCL, short LM-head /
# attention benches and the SFT MFU of a ~1B Llama; print ONE table (step, status, seconds,
# key figure). Every step has its own `timeout` budget; the budgets sum to 470 s (< 8 min),
# pip install and build_ext included (--dry checks the sum). A failing step does not stop the
# others.
#
# Here, first (a machine with PyPI):  bash ../shared/gpu/wheels.sh   (wheels into .whl/)
# Check the plumbing here (no GPU, < 60 s):   bash benchmarks/gpu_session.sh --dry
# Then ONE call of the device tool:
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=560)
# What comes back under $OUT (7 files): table.txt, session.log (every step's output, appended
# as each step ends), and the benches' CSVs (*_cuda.csv, copied as each step ends). Commit
# the CSVs under benchmarks/results/ (their rows name the device).
#
# Steps (budget s):  pip 15 | build_ext 45 (in the background, during the kernel tests) |
#   kernel_tests 100 | golden_sft_dpo 70 | golden_rm 40 | golden_rlvr 40 | train_mfu 60 |
#   lce 25 | logprobs 25 | pair_logprobs 25 | attention 25.
# The GPU image has torch 2.11 + triton 3.6 (this machine: 2.13 / 3.9) and no megatron-core
# (it comes from .whl/). Override one step's arguments with ARGS_<step>="..." (e.g.
# ARGS_lce="--reps 10": the full goal shape N=32768 H=4096 V=128256, if the budget allows).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
OUT=${OUT:-/tmp/out}
PY=${PY:-python3}
LOGS=$(mktemp -d /tmp/gpu_session.XXXX)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
# a GPU session updates the committed rows (benchmarks/_common.results_dir): the CSVs it copies
# to $OUT are the ones under benchmarks/results/
export NOVA_BENCH_UPDATE_RESULTS=1
ROWS=()
FAILED=0
BUDGETS=0 # the steps' timeouts, summed (<= 480 s)
BUILD_BUDGET=45
T_START=$SECONDS
DEVICE="none (dry run)"

say() { echo "$*" | tee -a "$OUT/session.log"; }

# The key figure of a step, read from its log.
key_figure() {
    local name=$1 log=$2
    case $name in
        pip) echo "$(ls .whl/*.whl 2>/dev/null | wc -l) wheels" ;;
        build_ext) grep -o "nova_engine._C ok" "$log" | tail -1 ;;
        kernel_tests) grep -E "passed|failed|error" "$log" | tail -1 | tr -d '=' | cut -c1-70 ;;
        golden_*)
            awk '/ rel / {for (i = 1; i < NF; i++) if ($i == "rel" && $(i+1) + 0 > m) m = $(i+1) + 0}
                 / (MISMATCH)$/ {bad++}
                 /golden check:/ {res = $3}
                 END {printf "%s, max rel %.2g, %d mismatches", res ? res : "no verdict", m, bad}' "$log"
            ;;
        train_mfu) grep "^SFT steps:" "$log" | tail -1 | cut -c12-110 ;;
        lce) csv_key linear_cross_entropy x_gemm3 speedup_vs_liger_flce ;;
        logprobs) csv_key linear_logprobs x_gemm3 ;;
        pair_logprobs) csv_key linear_pair_logprobs x_gemm3 x_naive ;;
        attention)  # nova's tokens/s of the last shapes: "T16384 L512 1,234,567"
            sed -n 's/^T=\([0-9]*\),L=\([^,]*\),.*; nova \(.*\) tok\/s$/T\1 L\2 \3/p' "$log" |
                tail -3 | paste -sd' ' | cut -c1-90
            ;;
    esac
}

# From a bench's fresh CSV, the last shape's METRICs per impl ("x_gemm3: triton 1.12, ...").
csv_key() {
    local csv=benchmarks/results/$1_cuda.csv
    shift
    [ "$csv" -nt "$LOGS/$STEP.start" ] || return 0 # none, or not this step's
    "$PY" - "$csv" "$@" << 'EOF' 2>&1 | cut -c1-100
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
last = rows[-1]["shape"] if rows else ""
out = []
for metric in sys.argv[2:]:
    vals = [f"{r['impl']} {float(r['p50']):.2f}" for r in rows
            if r["metric"] == metric and r["shape"] == last]
    if vals:
        out.append(f"{metric}: " + ", ".join(vals))
print("; ".join(out))
EOF
}

# The source file of a step's command (for --dry): a script path or `-m module`.
source_of() {
    local prev=""
    for a in "$@"; do
        if [ "$prev" = "-m" ]; then
            [ "$a" = pytest ] && return 0
            echo "${a//.//}.py"
            return 0
        fi
        case $a in *.py) echo "$a"; return 0 ;; esac
        prev=$a
    done
}

# --dry: the command's files exist, compile, and define each --flag it passes.
dry_check() {
    local src files f a
    src=$(source_of "$@")
    if [ -n "$src" ]; then
        [ -f "$src" ] || { echo "missing $src"; return 1; }
        "$PY" -c "import ast, sys; ast.parse(open(sys.argv[1]).read())" "$src" ||
            { echo "$src: not Python"; return 1; }
        # the flags may live in the module it delegates main() to (from benchmarks.x import)
        files="$src $(sed -n 's/^from \(benchmarks\.[a-z_]*\) import.*/\1/p' "$src" | tr . / |
            sed 's/$/.py/')"
        for a in "$@"; do
            case $a in
                --*)
                    f=$(grep -l -- "\"${a%%=*}\"" $files 2>/dev/null | head -1)
                    [ -n "$f" ] || { echo "$src: no flag ${a%%=*}"; return 1; }
                    ;;
            esac
        done
    else  # pytest: its paths exist
        for a in "$@"; do
            case $a in tests/*) [ -e "$a" ] || { echo "missing $a"; return 1; } ;; esac
        done
    fi
    echo "ok: $*"
}

# run_step NAME BUDGET_S [CSV_OP] -- command ...: run it under its budget, log, copy, record.
run_step() {
    local name=$1 budget=$2 op="" log t0 rc status secs
    shift 2
    [ "$1" != "--" ] && { op=$1; shift; }
    shift
    log=$LOGS/$name.log
    t0=$SECONDS
    BUDGETS=$((BUDGETS + budget))
    if [ $DRY = 1 ]; then
        if dry_check "$@" > "$log" 2>&1; then status=dry-ok; else status=dry-FAIL; FAILED=$((FAILED + 1)); fi
        ROWS+=("$name|$status|$budget|$(tail -1 "$log" | cut -c1-90)")
        return 0
    fi
    STEP=$name
    touch "$LOGS/$name.start"  # a CSV newer than this is the step's own (not a committed one)
    timeout -k 5 "$budget" "$@" > "$log" 2>&1
    rc=$?
    secs=$((SECONDS - t0))
    case $rc in
        0) status=ok ;;
        124 | 137) status=TIMEOUT ;;
        *) status="FAIL($rc)" ;;
    esac
    [ $rc = 0 ] || FAILED=$((FAILED + 1))
    {
        echo "===== $name: $status in $secs s (budget $budget s): $*"
        grep -v -i -E "warn|^\s*$" "$log" | tail -80
    } >> "$OUT/session.log"
    local csv=benchmarks/results/${op}_cuda.csv
    if [ -n "$op" ] && [ "$csv" -nt "$LOGS/$name.start" ]; then cp "$csv" "$OUT/"; fi
    ROWS+=("$name|$status|$secs|$(key_figure "$name" "$log")")
}

table() {
    {
        echo "device: $DEVICE"
        printf "%-15s %-9s %5s  %s\n" step status secs "key figure"
        for r in "${ROWS[@]}"; do
            IFS='|' read -r n s t k <<< "$r"
            printf "%-15s %-9s %5s  %s\n" "$n" "$s" "$t" "$k"
        done
        echo "total $((SECONDS - T_START)) s (budgets $BUDGETS s), $FAILED step(s) not ok$(
            [ $DRY = 1 ] && echo ' (dry run)')"
    } | tee "$OUT/table.txt"
}

# ------------------------------------------------------------------------------- set-up
if [ $DRY = 1 ]; then
    command -v timeout > /dev/null || { echo "no timeout(1)"; exit 1; }
    ls .whl/megatron_core-*.whl > /dev/null 2>&1 ||
        echo "note: no .whl/megatron_core-*.whl here: run bash ../shared/gpu/wheels.sh before the call"
    for f in setup.py csrc/attention.cpp tests/engine/golden/sft.json tests/engine/golden/dpo.json \
        tests/engine/golden/rm.json tests/engine/golden/rlvr.json; do
        [ -f "$f" ] || { echo "missing $f"; FAILED=$((FAILED + 1)); }
    done
    ROWS+=("pip|dry-ok|15|.whl/*.whl into /tmp/site")
    BUDGETS=$((BUDGETS + 15))
else
    DEVICE=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 |
        head -1)
    echo "device: $DEVICE" > "$OUT/session.log"
    run_step pip 15 -- "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl
    # the C++ extension (packer, CPU attention) compiles on the CPUs while the kernel tests run
    (
        t0=$SECONDS
        timeout -k 5 $BUILD_BUDGET "$PY" -c "
from pybind11.setup_helpers import ParallelCompile; ParallelCompile(default=16).install()
import runpy, sys; sys.argv = ['setup.py', '-q', 'build_ext', '--inplace']
runpy.run_path('setup.py', run_name='__main__')" > "$LOGS/build_ext.log" 2>&1 &&
            "$PY" -c "import nova_engine._C; print('nova_engine._C ok')" >> "$LOGS/build_ext.log" 2>&1
        echo "$? $((SECONDS - t0))" > "$LOGS/build_ext.rc"
    ) &
    BUILD=$!
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
        >> "$OUT/session.log" 2>&1
fi
BUDGETS=$((BUDGETS + BUILD_BUDGET))
[ $DRY = 1 ] && ROWS+=("build_ext|dry-ok|$BUILD_BUDGET|setup.py build_ext --inplace (16 jobs)")

# ------------------------------------------------------ a. kernel tests, compiled for the GPU
# (8 xdist workers when the image has pytest-xdist: the time goes to Triton compiles; the AOT
# compile check is left to CI: it needs no GPU and its full matrix alone outlasts the budget)
XDIST=""
[ $DRY = 0 ] && "$PY" -c "import xdist" 2> /dev/null && XDIST="-n 8"
# shellcheck disable=SC2086
run_step kernel_tests 100 -- "$PY" -m pytest -q -p no:cacheprovider --import-mode=importlib \
    $XDIST ${ARGS_kernel_tests:-} --ignore=tests/kernels/test_aot_compile.py tests/kernels
if [ $DRY = 0 ]; then
    wait $BUILD
    read -r rc secs < "$LOGS/build_ext.rc"
    { echo "===== build_ext: rc $rc in $secs s"; tail -20 "$LOGS/build_ext.log"; } >> "$OUT/session.log"
    [ "$rc" = 0 ] && st=ok || { st="FAIL($rc)"; FAILED=$((FAILED + 1)); }
    ROWS+=("build_ext|$st|$secs|$(key_figure build_ext "$LOGS/build_ext.log")")
fi

# ------------------------------------------- b. bf16 golden losses on NCCL (world 1), per stage
G=tests/engine/golden
# shellcheck disable=SC2086
run_step golden_sft_dpo 70 -- "$PY" $G/run_golden.py --check --stages sft,dpo --precision bf16 \
    --rtol 3e-2 --atol 2e-3 ${ARGS_golden_sft_dpo:-}
# shellcheck disable=SC2086
run_step golden_rm 40 -- "$PY" $G/run_golden.py --check --stages rm --precision bf16 \
    --rtol 3e-2 --atol 2e-3 ${ARGS_golden_rm:-}
# shellcheck disable=SC2086
run_step golden_rlvr 40 -- "$PY" $G/run_golden_rlvr.py --check --precision bf16 \
    --rtol 3e-2 --atol 5e-3 ${ARGS_golden_rlvr:-}

# --------------------------------------- c. SFT MFU of a ~1B Llama, LM heads, varlen attention
# shellcheck disable=SC2086
run_step train_mfu 60 train_throughput -- "$PY" -m benchmarks.bench_train_throughput \
    ${ARGS_train_mfu:---model 1b --steps 4 --no-padded}
# shellcheck disable=SC2086
run_step lce 25 linear_cross_entropy -- "$PY" -m benchmarks.bench_linear_cross_entropy \
    ${ARGS_lce:---quick --reps 5}
# shellcheck disable=SC2086
run_step logprobs 25 linear_logprobs -- "$PY" -m benchmarks.bench_linear_logprobs \
    ${ARGS_logprobs:---quick --reps 5 --no-compile}
# shellcheck disable=SC2086
run_step pair_logprobs 25 linear_pair_logprobs -- "$PY" -m benchmarks.bench_linear_pair_logprobs \
    ${ARGS_pair_logprobs:---quick --reps 5}
# shellcheck disable=SC2086
run_step attention 25 packed_attention -- "$PY" -m benchmarks.bench_packed_attention \
    ${ARGS_attention:---reps 5}

if [ $BUDGETS -gt 480 ]; then
    echo "the budgets sum to $BUDGETS s: more than 8 minutes"
    FAILED=$((FAILED + 1))
fi
table
rm -rf "$LOGS"
[ $FAILED = 0 ]
