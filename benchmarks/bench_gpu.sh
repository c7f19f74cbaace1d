#!/usr/bin/env bash
# One-shot GPU benchmark of guided vs vanilla generation at SD1.5 shapes (and the toy model):
# fp16, batch 4 with classifier-free guidance (8 UNet rows), 512 px (h is 1280x8x8), 20 DDIM steps,
# 1 warm-up round + 5 alternating timed rounds, peak memory from torch.cuda.max_memory_allocated,
# host-device synchronisations per call counted with torch.cuda.set_sync_debug_mode.
#
#   benchmarks/bench_gpu.sh [OUTPUT_DIR] [extra bench flags...]     (default OUTPUT_DIR: docs/bench/gpu)
#   PYTHON=/path/to/python benchmarks/bench_gpu.sh                (a Python with CUDA torch + this repo's deps)
#
# It needs no download (random SD1.5-shaped weights) and takes about a minute on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
OUTPUT_DIR="${1:-docs/bench/gpu}"
shift || true

"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "bench_gpu.sh: CUDA is not available to " + sys.executable)'
mkdir -p "$OUTPUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUTPUT_DIR/nvidia-smi.csv" 2>&1 || true
"$PYTHON" benchmarks/bench.py --device cuda --dtype float16 --parts generation --scales toy,sd15 \
    --output-dir "$OUTPUT_DIR" "$@"
