#!/usr/bin/env bash
# The Pallas kernels compiled on a Hopper GPU, as one prepared device run (run on an H200
# on 2026-11-26; results in docs/RESULTS.md):
#   1. the Mosaic GPU decode kernel's tests, compiled;
#   2. kernel_bench at the issue's target point (bf16, batch 64, context 2048, 8 KV heads,
#      head 128) and at batch 8, every implementation checked against float32 dense attention
#      and timed, ours_mosaic included, with a sweep of the Mosaic kernel's configurations;
#   3. the engine on the compiled kernels (Triton, and the Mosaic decode kernel in bfloat16)
#      against the XLA path;
#   4. the Mosaic kernel's full decode product, compiled;
#   5. the ragged kernel's (16, 1)-head cases with head sizes 128 and 256 (the full product
#      runs longer than one device call: pick its cases with -k);
#   6. 8-bit KV pages (issue 17): kernel_bench --kv_cache_dtypes at batch 64, context 2048,
#      bf16 q, over bfloat16, fp8_e4m3 (calibrated scales) and int8 pages, block sizes 16 and
#      64 (the Mosaic kernel takes int8 pages only from 64; at 16 the row says dispatch runs
#      the Triton kernel): per kernel, tokens/s, KV GB/s as stored, and tokens/s over bf16's.
#      The target: the 8-bit decode kernel near twice bf16's tokens/s. kernel_bench_kv8.json.
# Usage on the device machine (nothing to install: its image has jax, flax, pytest, ...):
#   bash experiments/gpu_kernel_check.sh        # logs and JSON go to $OUT (default /tmp/out)
#   PARTS=bench_kv8 bash experiments/gpu_kernel_check.sh     # only the parts named (in order)
# KV8_FLAGS: kernel_bench flags appended to part 6's (later ones win), e.g. the CPU dry run:
#   OUT=/tmp/kv8_dry PARTS=bench_kv8 KV8_FLAGS="--batch_sizes=2 --context_lens=64 \
#       --num_q_heads=8 --num_kv_heads=2 --head_size=64 --iters=2 --reps=2 --copy_mib=16" \
#       bash experiments/gpu_kernel_check.sh
# Budget: parts 1-5 at most about 8 minutes; kv8_tests (the 8-bit kernels' tests, compiled)
# at most 2.5 and bench_kv8 at most 5: run those two in a call of their own
# (PARTS="kv8_tests bench_kv8"); each part has its own timeout so the rest still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
PARTS="${PARTS:-mgpu_tests bench engine mgpu_full ragged_q16kv1 kv8_tests bench_kv8}"
KV8_FLAGS="${KV8_FLAGS:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv > "$SUMMARY" 2>&1
python3 -c "import jax; print(jax.__version__, jax.devices())" >> "$SUMMARY" 2>&1

part() {  # part NAME SECONDS COMMAND...: runs it under a timeout, logs to $OUT/NAME.log
  local name=$1 seconds=$2 start rc
  shift 2
  [[ " $PARTS " == *" $name "* ]] || return 0
  start=$(date +%s)
  timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc in $(( $(date +%s) - start )) s: $(tail -n 1 "$OUT/$name.log")" >> "$SUMMARY"
}

part mgpu_tests 80 python3 -m pytest tests/kernels/test_paged_attention_mgpu.py -q \
    -p no:cacheprovider
part bench 170 python3 experiments/kernel_bench.py --iters=10 --reps=5 --batch_sizes=8,64 \
    --context_lens=2048 --block_sizes=16 --tune_mosaic --out="$OUT/kernel_bench.json"
part engine 80 python3 -m pytest tests/test_pallas_engine.py -q -p no:cacheprovider
part mgpu_full 80 python3 -m pytest tests/kernels/test_paged_attention_mgpu.py -q -m full \
    -k decode_full -p no:cacheprovider
part ragged_q16kv1 70 python3 -m pytest tests/kernels/test_ragged_paged_attention.py -q \
    -m full -k "q16kv1 and (128 or 256)" -p no:cacheprovider
# The 8-bit page kernels' tests, compiled on the GPU (Triton decode and ragged, Mosaic): the
# cases the CPU runs in interpret mode
part kv8_tests 150 python3 -m pytest tests/kernels/test_pallas_kv_dtypes.py -q \
    -p no:cacheprovider
# shellcheck disable=SC2086  # KV8_FLAGS: words on purpose
part bench_kv8 300 python3 experiments/kernel_bench.py --iters=10 --reps=5 --batch_sizes=64 \
    --context_lens=2048 --block_sizes=16,64 --kv_cache_dtypes=bfloat16,fp8_e4m3,int8 \
    $KV8_FLAGS --out="$OUT/kernel_bench_kv8.json"
[[ " $PARTS " == *" bench "* ]] && grep -E "^(device|measured|B=)|WRONG|failed|tune_mosaic" \
    "$OUT/bench.log" >> "$SUMMARY"
[[ " $PARTS " == *" bench_kv8 "* ]] && grep -E "^(device|measured|KV page|B=)|WRONG|failed" \
    "$OUT/bench_kv8.log" >> "$SUMMARY"
cat "$SUMMARY"
