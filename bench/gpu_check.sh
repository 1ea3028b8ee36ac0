#!/usr/bin/env bash
# Every GPU check of ftcore in one command, in priority order, each part under its own cap, the
# whole within one device call; then bench/record_gpu.py turns the folder into the tables for
# bench/RESULTS.md and the plots.
#
#   bench/gpu_check.sh OUT                                # the GPU visit: one 8-minute device call
#   bench/gpu_check.sh OUT --parts tests,compiled --budget-s 540   # a second call, if time is left
#   bench/gpu_check.sh OUT --dry-run                      # on a CPU: tiny shapes, Triton interpreted,
#                                                         # peers absent; every part and the recorder
# Options: --budget-s S (the whole command, recording included), --parts A,B (which parts, in the
# order below), --cap PART=S (a part's cap, repeatable).
#
# Parts (cap in seconds on the GPU / in the dry run):
#   env       15 /  6   versions, measured bf16 TFLOP/s and copy GB/s
#   kernels   70 /  6   `-m gpu` tests of the kernels: the fused loss at full vocabulary, the layer kernels
#   loss      70 / 10   workload A (bench_loss.py) with every importable peer
#   step     130 / 14   workload B eager rows (bench_step.py) at the Llama-3.2-1B shape beside the HF peers
#   ladder   105 /  9   the memory ladder, each rung adding one strategy
#   big       60 /  7   a few steps of the Llama-3-8B shape with the leanest rungs
#   tests    240 / 10   the other `-m gpu` tests (memory strategies): not in the default call
#   compiled 300 /  8   the compiled rows (compile cache in OUT): not in the default call
# The default parts' caps add up to 450 s, which with 20 s to record fits the default 480 s budget
# (the dry run: 52 s and 8 s in 60 s).
# A part gets min(its cap, what the budget has left); the benches are handed that less a margin as
# their own --budget-s, so they stop themselves in time. Results are written row by row (pytest
# through --report-jsonl), and a part that still outruns its cap gets SIGTERM, which each of them
# turns into writing what it has, the row in progress marked as cut. No part stops another: the
# tests run without -x, and each part runs whatever became of the one before.
# Peers the GPU image lacks travel as wheels in .whl/ (bench/fetch_gpu_wheels.sh; carry ".whl").
# What comes back: OUT/RESULTS.md, OUT/parts.tsv, the plots, and OUT/work.tar.gz (every log and
# JSON): the device tool returns at most 8 files.
set -uo pipefail
start=$(date +%s)
cd "$(dirname "$0")/.."
out=${1:?usage: bench/gpu_check.sh OUT [--budget-s S] [--parts A,B] [--cap PART=S] [--dry-run]}
shift
order=(env kernels loss step ladder big tests compiled)
declare -A cap=([env]=15 [kernels]=70 [loss]=70 [step]=130 [ladder]=105 [big]=60 [tests]=240 [compiled]=300)
declare -A dry_cap=([env]=6 [kernels]=6 [loss]=10 [step]=14 [ladder]=9 [big]=7 [tests]=10 [compiled]=8)
parts=env,kernels,loss,step,ladder,big
budget=
dry=0
declare -A asked=()
while [ $# -gt 0 ]; do
  case "$1" in
    --budget-s) budget=$2; shift 2 ;;
    --parts) parts=$2; shift 2 ;;
    --cap) asked[${2%%=*}]=${2#*=}; shift 2 ;;
    --dry-run) dry=1; shift ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ "$dry" = 1 ]; then
  for p in "${order[@]}"; do cap[$p]=${dry_cap[$p]}; done
  budget=${budget:-60}; reserve=8; margin=3
else
  budget=${budget:-480}; reserve=20; margin=8
fi
for p in "${!asked[@]}"; do
  [ -n "${cap[$p]:-}" ] || { echo "gpu_check.sh: --cap $p: no such part (parts: ${order[*]})" >&2; exit 2; }
  cap[$p]=${asked[$p]}
done
for p in ${parts//,/ }; do
  [ -n "${cap[$p]:-}" ] || { echo "gpu_check.sh: --parts $p: no such part (parts: ${order[*]})" >&2; exit 2; }
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

# workload B's rows, the ones the targets compare first
step_rows=hf,best,hf-liger-gc,best-ac,baseline,hf-liger,bf16-mixed,bf16,ac-full,loss-triton,best-kernels
ladder_rows=baseline,ladder-loss,ladder-ac,ladder-bf16,ladder-oib,ladder-offload,ladder-cpu
compiled_rows=loss-compile,compile,best-compile,hf-compile,hf-compile-bf16
kernel_tests=(tests/test_loss_kernel.py tests/test_layer_kernels.py)
pytest=(python3 -m pytest -m gpu -q -p no:cacheprovider)
if [ "$dry" = 1 ]; then
  export TRITON_INTERPRET=1
  shape=(--preset tiny --device cpu --micro-batch 2 --seq-len 64 --steps 2 --warmup 1)
  big=(--preset tiny --device cpu --micro-batch 2 --seq-len 64 --steps 2 --warmup 1)
  loss=(--smoke)
else
  export FTCORE_TEST_CUDA=1
  shape=(--preset llama-3.2-1b --device cuda --steps 8 --warmup 2)
  big=(--preset llama-3-8b --run --device cuda --steps 3 --warmup 1)
  loss=()
fi

# part NAME CMD...: CMD under `timeout` with min(the part's cap, what the budget has left), where an
# argument @BUDGET@ becomes that limit less the margin the part needs to write its rows and exit
part() {
  local name=$1 a
  shift
  if [[ ",$parts," != *",$name,"* ]]; then
    printf '%s\tskipped\t0\tnot in --parts %s\n' "$name" "$parts" | tee -a "$out/parts.tsv"
    return
  fi
  local left=$(( budget - reserve - ($(date +%s) - start) ))
  if [ "$left" -lt $(( 3 * margin )) ]; then
    printf '%s\tskipped\t0\tbudget (%s s) spent\n' "$name" "$budget" | tee -a "$out/parts.tsv"
    return
  fi
  local limit=$(( ${cap[$name]} < left ? ${cap[$name]} : left ))
  local args=()
  for a in "$@"; do args+=("${a//@BUDGET@/$(( limit - margin ))}"); done
  local t0=$(date +%s)
  timeout -k 10 "$limit" "${args[@]}" > "$work/$name.log" 2>&1
  local rc=$?
  local why="exit $rc"
  [ $rc = 0 ] && why=ok
  [ $rc = 124 ] && why="cut at its cap of ${limit} s (it wrote what it had)"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$why" | tee -a "$out/parts.tsv"
}

part env python3 bench/gpu_env.py --out "$work/env.json"
part kernels "${pytest[@]}" --report-jsonl "$work/kernels.jsonl" "${kernel_tests[@]}"
part loss python3 bench/bench_loss.py "${loss[@]}" --budget-s @BUDGET@ --out "$work/loss.json"
part step python3 bench/bench_step.py "${shape[@]}" --rows "$step_rows" --budget-s @BUDGET@ --no-plots --out "$work/step"
part ladder python3 bench/bench_step.py "${shape[@]}" --rows "$ladder_rows" --budget-s @BUDGET@ --no-plots --out "$work/ladder"
part big python3 bench/bench_step.py "${big[@]}" --rows ladder-oib,ladder-cpu --budget-s @BUDGET@ --no-plots --out "$work/big"
part tests "${pytest[@]}" --report-jsonl "$work/tests.jsonl" "${kernel_tests[@]/#/--ignore=}" tests
part compiled python3 bench/bench_step.py "${shape[@]}" --rows "$compiled_rows" --budget-s @BUDGET@ --no-plots --out "$work/compiled"

printf 'total\t-\t%s\t%s s of a %s s budget\n' "$(( $(date +%s) - start ))" "$(( $(date +%s) - start ))" "$budget" | tee -a "$out/parts.tsv"
python3 bench/record_gpu.py "$out" || echo "record_gpu.py failed: the raw results are in $out/work.tar.gz" >&2
rm -rf "$work/cache"
tar -czf "$out/work.tar.gz" -C "$out" work && rm -rf "$work"
