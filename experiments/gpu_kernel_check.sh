#!/usr/bin/env bash
# What is left of issue 4 that only a Hopper GPU can show, as one prepared device run:
#   1. the kernel suite compiled, the full product included (Mosaic GPU kernel too);
#   2. the engine with the compiled Pallas kernels against the XLA path;
#   3. kernel_bench at the issue's target point (bf16, batch 64, context 2048, 8 KV heads,
#      head 128) with every implementation, ours_mosaic included, and a batch-8 point.
# Usage on the device machine (nothing to install: its image has jax, flax, pytest, ...):
#   bash experiments/gpu_kernel_check.sh        # logs and JSON go to $OUT (default /tmp/out)
# Budget: about 9 minutes on an H100; each part has its own timeout so the rest still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import jax; print(jax.__version__, jax.devices())" >> "$OUT/gpu.txt" 2>&1

timeout 300 python3 -m pytest tests/kernels -q -x -m "full or not full" -p no:cacheprovider \
    > "$OUT/kernels_full.log" 2>&1
echo "kernels: exit $?" >> "$OUT/gpu.txt"

timeout 90 python3 -m pytest tests/test_pallas_engine.py -q -p no:cacheprovider \
    > "$OUT/pallas_engine.log" 2>&1
echo "pallas engine: exit $?" >> "$OUT/gpu.txt"

timeout 150 python3 experiments/kernel_bench.py --iters=10 --reps=5 --batch_sizes=8,64 \
    --context_lens=2048 --block_sizes=16 --out="$OUT/kernel_bench.json" \
    > "$OUT/kernel_bench.log" 2>&1
echo "kernel_bench: exit $?" >> "$OUT/gpu.txt"
cat "$OUT/gpu.txt"
