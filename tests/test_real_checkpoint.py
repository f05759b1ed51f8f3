"""The whole method through the `vlmr` commands on a checkpoint shaped like a real one.

Every other end-to-end test runs on the tiny defaults, whose tokenizer leaves room for
``<video>`` in the LM's vocabulary and whose special tokens are ``<s>``/``</s>``/``<pad>``.
Here the LM is a Llama-architecture folder (``tests/checkpoints.py``) whose vocabulary equals
its tokenizer's size, with its own BOS/EOS/PAD and a chat template, and tied embeddings, trained with that template
(``--template tokenizer``, saved with the model, so every later step prompts with it):
build-shards, train sft, narrate, judge, train rm, train ppo and eval synthetic each run a
few steps and must write their outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from checkpoints import vlmr, write_llama


def manifest_samples(folder: Path) -> int:
    manifest = json.loads((folder / "manifest.json").read_text())
    return sum(shard["samples"] for stage in manifest["stages"] for shard in stage["shards"])


@pytest.mark.slow
def test_the_method_runs_end_to_end_on_a_real_shaped_checkpoint(synth_world, tmp_path):
    lm = write_llama(tmp_path / "lm", "llama3", tied=True)
    run = tmp_path / "run"
    vlmr("build-shards", "--annotations", synth_world / "annotations.json", "--videos", synth_world / "videos",
         "--out", run / "shards", "--frames", "4", "--clips", "2", "--clip-frames", "2", "--tokenizer", lm,
         "--workers", "1")
    vlmr("train", "sft", "--shards", run / "shards", "--output", run / "sft", "--model", lm, "--max-steps", "2",
         "--micro-batch", "4", "--lr", "1e-3", "--lora-r", "4", "--lora-alpha", "4", "--precision", "fp32",
         "--template", "tokenizer")
    saved = json.loads((run / "sft" / "model" / "vlmr_model.json").read_text())
    assert saved["settings"]["template"] == "tokenizer"
    vlmr("narrate", "--model", run / "sft" / "model", "--in", run / "shards", "--out", run / "narrated",
         "--max-new-tokens", "4")
    assert manifest_samples(run / "narrated") == manifest_samples(run / "shards")
    vlmr("judge", "--model", run / "sft" / "model", "--in", run / "narrated", "--out", run / "pairs",
         "--max-new-tokens", "4", "--disagreement", "soft", "--context", "clips")
    assert manifest_samples(run / "pairs") > 0
    vlmr("train", "rm", "--shards", run / "pairs", "--stages", "pairs", "--model", run / "sft" / "model",
         "--output", run / "rm", "--max-steps", "2", "--micro-batch", "4", "--eval-fraction", "0.25",
         "--precision", "fp32")
    assert (run / "rm" / "model").is_dir()
    vlmr("train", "ppo", "--shards", run / "shards", "--sft", run / "sft" / "model", "--reward-model",
         run / "rm" / "model", "--output", run / "ppo", "--max-steps", "1", "--rollout-batch", "4",
         "--step-batch", "2", "--micro-batch", "2", "--generation-batch", "4", "--max-new-tokens", "4",
         "--lora-r", "4", "--lora-alpha", "4", "--precision", "fp32")
    assert json.loads((run / "ppo" / "model" / "vlmr_model.json").read_text())["settings"]["template"] == "tokenizer"
    vlmr("eval", "synthetic", "--shards", run / "shards", "--world", synth_world, "--models", run / "sft",
         run / "ppo", "--output", run / "eval", "--max-new-tokens", "4")
    summary = json.loads((run / "eval" / "summary.json").read_text())
    samples = {c["name"]: c["metrics"]["samples"] for c in summary["candidates"]}
    assert samples == {"sft": manifest_samples(run / "shards"), "ppo": manifest_samples(run / "shards")}
