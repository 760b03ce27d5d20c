#!/usr/bin/env bash
# Main job until the streaming daemon exists: export the real ELPV solar-cell images, train CS-Flow
# (lite0, CPU-sized flow), evaluate on held-out normal vs defective cells, show the figures.
# Sizes can be changed through the usual overrides, e.g. INSPECTD_MODEL__IMAGE_SIZE=384.
set -euo pipefail
OUT=${OUT:-runs/elpv-demo}
export INSPECTD_FLOW__HIDDEN_CHANNELS=${INSPECTD_FLOW__HIDDEN_CHANNELS:-64}
export INSPECTD_TRAIN__EPOCHS=${INSPECTD_TRAIN__EPOCHS:-30}
mkdir -p "$OUT"
inspectd export-elpv --out data/elpv
if [ ! -f "$OUT/model/manifest.json" ]; then
  inspectd train --data data/elpv --out "$OUT/model"
fi
inspectd evaluate --model "$OUT/model" --data data/elpv --json "$OUT/evaluation.json" --plot "$OUT/evaluation.png"
echo "figures: $OUT/evaluation.json, picture: $OUT/evaluation.png"
