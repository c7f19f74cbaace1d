#!/usr/bin/env bash
# The toy SDXL's pooled h-classifiers (skin, glasses, hair), made with the command-line tools and their defaults on
# the square bucket only (32x32 px, h [64, 2, 2]): h recorded while generating "a photo of a face" and read by the
# toy oracle, stored pooled to 2x2, then one classifier per attribute (pooled, so it reads the wide and tall buckets'
# h [64, 2, 3] and [64, 3, 2] as well; stored in float16, train's default for pooled heads). Two processes share the
# extraction (accelerate, CPU). lab/toy_sdxl_rows.py guides every bucket with them.
#   bash lab/toy_sdxl_classifiers.sh [FEATURES_DIR] [NUM_PROCESSES]
set -euo pipefail
cd "$(dirname "$0")/.."
features=${1:-.work/toy-sdxl-h}
processes=${2:-2}
model=lab/assets/toy-sdxl
# accelerate's --cpu flag starts one process without MPI: several CPU processes take the torchrun route over gloo
# (docs/multi_gpu.md).
CUDA_VISIBLE_DEVICES="" GLOO_SOCKET_IFNAME=lo accelerate launch --multi_gpu --num_processes "$processes" \
    --num_machines 1 --mixed_precision no --dynamo_backend no -m h_classifiers.cli extract \
    --model "$model" --prompt "a photo of a face" --height 32 --width 32 --pool-size 2 \
    --num-images 3000 --steps 50 --guidance-scale 7.5 --batch-size 64 --seed 300000 \
    --labeller toy:skin --labeller toy:glasses --labeller toy:hair --output-dir "$features"
for attribute in skin glasses hair; do
    balancing-act train --features-dir "$features" --attribute "$attribute" --base-model "$model" \
        --output-dir "lab/assets/toy-sdxl-classifiers/$attribute" --overwrite
done
