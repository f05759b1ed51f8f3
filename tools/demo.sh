#!/usr/bin/env bash
# `make demo`: the whole method on the embedded default — synthetic videos, tiny offline models:
# synth → shards → inspect → curriculum SFT → narrate → judge → reward model → PPO → evaluation.
# Each stage reads what the previous one wrote, from files; any stage can be rerun on its own.
set -euo pipefail
RUN=${1:-runs/demo}
VLMR=${VLMR:-.venv/bin/vlmr}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Tiny models on a few CPU cores: one thread per process is several times faster than two
# threads fighting over the cores (measured; see README).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$RUN"

echo "== 1. synthetic world: videos with three events each, annotations of very different lengths"
$VLMR synth --out "$RUN/world" --videos 24 --seed 0 --broken 2

echo "== 2. curriculum-sorted shards (the broken videos land in failures.jsonl; the build goes on)"
$VLMR build-shards --annotations "$RUN/world/annotations.json" --videos "$RUN/world/videos" \
  --out "$RUN/shards" --frames 8 --clips 3 --clip-frames 4 --maxcount 64 --workers 2

echo "== 3. what is in the shards"
$VLMR inspect "$RUN/shards"

echo "== 4. curriculum SFT: easy, then hard"
$VLMR train sft --config train/configs/sft_tiny.yaml --shards "$RUN/shards" --output "$RUN/sft"

echo "== 5. narratives: the SFT model captions each clip"
$VLMR narrate --config train/configs/narrate_tiny.yaml --model "$RUN/sft/model" \
  --in "$RUN/shards" --out "$RUN/narrated" --overwrite

echo "== 6. AI feedback: two answers per prompt, judged in both orders with the narrative as context"
$VLMR judge --config train/configs/judge_tiny.yaml --model "$RUN/sft/model" \
  --in "$RUN/narrated" --out "$RUN/pairs" --overwrite
$VLMR inspect "$RUN/pairs"

echo "== 7. reward model from the preferences"
$VLMR train rm --config train/configs/rm_tiny.yaml --shards "$RUN/pairs" --model "$RUN/sft/model" \
  --output "$RUN/rm"

echo "== 8. PPO against the reward model (QLoRA policy)"
$VLMR train ppo --config train/configs/ppo_tiny.yaml --shards "$RUN/shards" --sft "$RUN/sft/model" \
  --reward-model "$RUN/rm/model" --output "$RUN/ppo"

echo "== 9. SFT vs PPO on held-out synthetic videos (exact scoring, no judge)"
$VLMR synth --out "$RUN/world-eval" --videos 8 --seed 1
$VLMR build-shards --annotations "$RUN/world-eval/annotations.json" --videos "$RUN/world-eval/videos" \
  --out "$RUN/shards-eval" --frames 8 --clips 0 --workers 2
$VLMR eval synthetic --shards "$RUN/shards-eval" --world "$RUN/world-eval" \
  --models "$RUN/sft" "$RUN/ppo" --output "$RUN/eval"

echo "demo done: $RUN"
