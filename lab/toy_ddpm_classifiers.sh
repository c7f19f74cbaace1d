#!/usr/bin/env bash
# The toy DDPM's shipped h-classifiers (skin, glasses, hair), made with the command-line tools and every default:
# h recorded while generating with the paper's sampler (DDIM 50 steps, eta 1; docs/lab/toy_ddpm_report.md) and read by
# the toy oracle, then one classifier per attribute. Two processes share the extraction (accelerate, CPU).
#   bash lab/toy_ddpm_classifiers.sh [FEATURES_DIR] [NUM_PROCESSES]
set -euo pipefail
cd "$(dirname "$0")/.."
features=${1:-.work/toy-ddpm-h}
processes=${2:-2}
# accelerate's --cpu flag starts one process without MPI: several CPU processes take the torchrun route over gloo
# (docs/multi_gpu.md).
CUDA_VISIBLE_DEVICES="" GLOO_SOCKET_IFNAME=lo accelerate launch --multi_gpu --num_processes "$processes" \
    --num_machines 1 --mixed_precision no --dynamo_backend no -m h_classifiers.cli extract \
    --model h_classifiers/assets/toy-ddpm --eta 1 --steps 50 --num-images 3000 --batch-size 100 --seed 300000 \
    --labeller toy:skin --labeller toy:glasses --labeller toy:hair --output-dir "$features"
for attribute in skin glasses hair; do
    balancing-act train --features-dir "$features" --attribute "$attribute" \
        --output-dir "h_classifiers/assets/classifiers/toy-ddpm/$attribute" --overwrite
done
