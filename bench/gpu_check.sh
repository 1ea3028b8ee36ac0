#!/usr/bin/env bash
# Every GPU check of ftcore in one command, in priority order, each part under its own timeout,
# stopping cleanly when the budget is spent (and saying what was skipped); then
# bench/record_gpu.py turns the folder into the tables for bench/RESULTS.md and the plots.
#
#   bench/gpu_check.sh OUT [--budget-s 480]     # on the GPU machine (one device call)
#   bench/gpu_check.sh OUT --dry-run            # on a CPU: tiny shapes, Triton interpreted, peers
#                                               # absent; every part and the recorder, in ~2 minutes
#
# Parts: 1 environment (versions, measured bf16 TFLOP/s and copy GB/s); 2 the `-m gpu` tests;
# 3 workload A of bench_loss.py with every importable peer; 4 workload B eager rows of
# bench_step.py at the Llama-3.2-1B shape beside the HF peers; 5 the memory ladder, then a few
# steps of the Llama-3-8B shape with the leanest rung; 6 the compiled rows (compile cache in OUT).
# Peers the GPU image lacks travel as wheels in .whl/ (bench/fetch_gpu_wheels.sh; carry ".whl").
# What comes back: OUT/RESULTS.md, OUT/parts.tsv, the plots, and OUT/work.tar.gz (every log and
# JSON): the device tool returns at most 8 files.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/gpu_check.sh OUT [--budget-s SECONDS] [--dry-run]}
shift
budget=480
dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --budget-s) budget=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
work="$out/work"
mkdir -p "$work"
: > "$out/parts.tsv"
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="$work/cache/inductor" TRITON_CACHE_DIR="$work/cache/triton"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # the peers the image lacks
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # ftcore (and ftcore.kernels) from this checkout

step_rows=hf,hf-liger,hf-liger-gc,baseline,bf16-mixed,bf16,ac-full,loss-triton,best,best-ac,best-kernels
ladder_rows=baseline,ladder-loss,ladder-ac,ladder-bf16,ladder-oib,ladder-offload,ladder-cpu
compiled_rows=loss-compile,compile,best-compile,hf-compile,hf-compile-bf16
if [ "$dry" = 1 ]; then
  export TRITON_INTERPRET=1
  shape=(--preset tiny --device cpu --micro-batch 2 --seq-len 64 --steps 2 --warmup 1)
  big=(--preset tiny --device cpu --micro-batch 2 --seq-len 64 --steps 2 --warmup 1)
  loss=(--smoke)
  tests=(-m gpu -q -p no:cacheprovider)
  compiled_budget=1   # the first compiled row runs; the others are skipped by budget, and say so
else
  export FTCORE_TEST_CUDA=1
  shape=(--preset llama-3.2-1b --device cuda --steps 10 --warmup 3)
  big=(--preset llama-3-8b --run --device cuda --steps 3 --warmup 1)
  loss=()
  tests=(-m gpu -q -p no:cacheprovider -x)
  compiled_budget=600
fi

start=$(date +%s)
# part NAME CAP_S CMD...: runs CMD under `timeout` with at most CAP_S, and never past the budget
part() {
  local name=$1 cap=$2
  shift 2
  local left=$(( budget - ($(date +%s) - start) ))
  if [ "$left" -lt 15 ]; then
    printf '%s\tskipped\t0\tbudget (%s s) spent\n' "$name" "$budget" | tee -a "$out/parts.tsv"
    return
  fi
  local limit=$(( cap < left ? cap : left ))
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$work/$name.log" 2>&1
  local rc=$?
  local why="exit $rc"
  [ $rc = 0 ] && why=ok
  [ $rc = 124 ] && why="timeout after ${limit} s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$why" | tee -a "$out/parts.tsv"
}

part env 60 python3 bench/gpu_env.py --out "$work/env.json"
part tests 150 python3 -m pytest "${tests[@]}" --junitxml="$work/tests.xml"
part loss 150 python3 bench/bench_loss.py "${loss[@]}" --out "$work/loss.json"
part step 240 python3 bench/bench_step.py "${shape[@]}" --rows "$step_rows" --budget-s 200 --out "$work/step"
part ladder 200 python3 bench/bench_step.py "${shape[@]}" --rows "$ladder_rows" --budget-s 160 --out "$work/ladder"
part big 120 python3 bench/bench_step.py "${big[@]}" --rows ladder-oib,ladder-cpu --budget-s 60 --out "$work/big"
part compiled 300 python3 bench/bench_step.py "${shape[@]}" --rows "$compiled_rows" --budget-s "$compiled_budget" --out "$work/compiled"

printf 'total\t-\t%s\t%s s of a %s s budget\n' "$(( $(date +%s) - start ))" "$(( $(date +%s) - start ))" "$budget" | tee -a "$out/parts.tsv"
python3 bench/record_gpu.py "$out" || echo "record_gpu.py failed: the raw results are in $out/work.tar.gz" >&2
rm -rf "$work/cache"
tar -czf "$out/work.tar.gz" -C "$out" work && rm -rf "$work"
