#!/usr/bin/env bash
# `make demo`: the main job on the embedded default — synthetic videos, tiny offline models.
# Each stage reads what the previous one wrote; re-running skips nothing but re-encodes nothing.
set -euo pipefail
RUN=${1:-runs/demo}
VLMR=${VLMR:-.venv/bin/vlmr}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$RUN"

echo "== 1. synthetic world: videos with three events each, annotations of very different lengths"
$VLMR synth --out "$RUN/world" --videos 24 --seed 0 --broken 2

echo "== 2. build curriculum-sorted shards (broken videos are recorded in failures.jsonl, not fatal)"
$VLMR build-shards --annotations "$RUN/world/annotations.json" --videos "$RUN/world/videos" \
  --out "$RUN/shards" --frames 8 --clips 3 --clip-frames 4 --maxcount 64 --workers 2

echo "== 3. what is in the shards"
$VLMR inspect "$RUN/shards"

echo "demo done: $RUN"
