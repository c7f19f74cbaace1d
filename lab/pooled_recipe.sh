#!/usr/bin/env bash
# Pooled h-classifiers for the toy SD, to compare with the shipped flat ones (docs/training.md#pooled-heads-one-
# classifier-for-every-resolution): the shipped classifiers' extraction, exactly (same command, same seeds), then the
# same training with `--pool-size 2` (the toy SD's h is [64, 4, 4]; its heads read h averaged to 2 x 2). The
# reproduction table's "-pooled" rows guide with them.
#   bash lab/pooled_recipe.sh [OUTPUT_DIR] [FEATURES_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.work/pooled-classifiers}
features=${2:-.work/toy-h}
python scripts/extract_h.py --prompt "a photo of a face" --num-images 3000 \
    --labeller toy:skin --labeller toy:glasses --labeller toy:hair \
    --steps 50 --guidance-scale 7.5 --batch-size 64 --chunk-size 256 --threads 1 --output-dir "$features"
for attribute in skin glasses hair; do
    python scripts/train_classifier.py --features-dir "$features" --attribute "$attribute" \
        --base-model h_classifiers/assets/toy-sd --threads 1 --pool-size 2 \
        --output-dir "$out/$attribute" --overwrite
done
