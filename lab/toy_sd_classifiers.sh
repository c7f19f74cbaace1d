#!/usr/bin/env bash
# h-classifiers (skin, glasses, hair) for a toy text-to-image model at one guidance site, made with the command-line
# tools and every training default, as the shipped toy classifiers were (docs/training.md): h recorded while
# generating from the neutral prompt (DDIM 50 steps, classifier-free guidance 7.5, seeds from 0) and read by the toy
# oracle, then one classifier per attribute.
#   bash lab/toy_sd_classifiers.sh MODEL SITE OUTPUT_ROOT [FEATURES_DIR] [NUM_IMAGES]
# The deep toy's shipped classifiers:
#   bash lab/toy_sd_classifiers.sh h_classifiers/assets/toy-sd-deep mid_block \
#       h_classifiers/assets/classifiers/toy-sd-deep .work/toy-sd-deep-h 3000
# The site sweep's classifiers on the first up block (docs/results/sweep_site.md):
#   bash lab/toy_sd_classifiers.sh h_classifiers/assets/toy-sd up_blocks.0 .work/site-classifiers/toy-sd-up0 \
#       .work/toy-sd-up0-h 2000
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1
site=$2
output_root=$3
features=${4:-.work/$(basename "$output_root")-h}
num_images=${5:-3000}
balancing-act extract --model "$model" --prompt "a photo of a face" --num-images "$num_images" --site "$site" \
    --labeller toy:skin --labeller toy:glasses --labeller toy:hair --steps 50 --guidance-scale 7.5 \
    --batch-size 64 --chunk-size 256 --output-dir "$features"
for attribute in skin glasses hair; do
    balancing-act train --features-dir "$features" --attribute "$attribute" --base-model "$model" \
        --output-dir "$output_root/$attribute" --overwrite
done
