#!/usr/bin/env bash
# A skin and a glasses classifier made the way docs/training.md tells a user to, with every default, on an extraction
# of their own (other seeds and a third of the images of the shipped classifiers' extraction). The reproduction
# table's "README-recipe" rows guide with them: rows the default strength was not tuned on.
#   bash lab/readme_recipe.sh [OUTPUT_DIR] [FEATURES_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.work/readme-classifiers}
features=${2:-.work/readme-h}
balancing-act extract --prompt "a photo of a face" --num-images 1000 --seed 200000 \
    --labeller toy:skin --labeller toy:glasses --output-dir "$features"
for attribute in skin glasses; do
    balancing-act train --features-dir "$features" --attribute "$attribute" --output-dir "$out/$attribute" --overwrite
done
