"""Test stand-ins for the models of ``vlmr narrate`` / ``vlmr judge``, built from the synthetic
world's ground truth (``dataengine.synth.load_captions``). Test fixtures, not product code:
the tiny untrained SFT model's samples carry no signal, so correctness of the preference
plumbing is checked with answers and verdicts whose truth is known.

- :class:`ClipSignatureCaptioner`: a caption that names the exact feature rows it was given,
  so a narrative can be checked clip by clip, in order.
- :class:`TruthSampler`: per prompt, the video's true description and a false copy (every
  colour, shape and direction replaced by one the video does not have); which one comes
  first depends on the sampling seed (so a seed that changed on resume or across ranks would
  show up as different pairs).
- :class:`TruthJudge`: prefers the answer that states more true and fewer false colours,
  shapes and directions of the video.
- :class:`PositionJudge`: always prefers position A (pure position bias).

Shared, built once per test session (cached under pytest's base temp folder): prompt shards
of the ``synth_world`` fixture (6 videos, 48 samples; frames 6, clips 3, clip_frames 2,
8 samples per tar) and an untrained tiny SFT model folder.

Run as a script under torchrun (the 2-rank test)::

    torchrun --nproc_per_node 2 tests/judge_fixtures.py WORLD PROMPT_SHARDS OUT_FOLDER
    -> OUT_FOLDER/narrated, OUT_FOLDER/pairs written by narrate then judge with these stand-ins
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # as a torchrun script
    sys.path.insert(0, str(ROOT))

from dataengine import synth  # noqa: E402
from train.judge import Comparison, Response  # noqa: E402

FRAMES, CLIPS, CLIP_FRAMES, MAXCOUNT = 6, 3, 2, 8
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


# ------------------------------------------------------------------------------ shared data

def build_prompt_shards(world: Path, out: Path, cache: Path) -> Path:
    from dataengine.build import BuildConfig, build

    build(BuildConfig(annotations=[str(world / "annotations.json")], videos=str(world / "videos"), out=str(out),
                      frames=FRAMES, clips=CLIPS, clip_frames=CLIP_FRAMES, maxcount=MAXCOUNT, workers=1,
                      cache=str(cache)))
    return out


def shared_prompt_shards(tmp_path_factory, world: Path) -> Path:
    """Prompt shards of ``world``, built once per session (both test modules use them)."""
    base = tmp_path_factory.getbasetemp() / "judge_shared"
    out = base / "prompt_shards"
    if not (out / "manifest.json").exists():
        build_prompt_shards(world, out, base / "feature_cache")
    return out


def shared_sft_model(tmp_path_factory) -> Path:
    """An untrained tiny VideoLMM saved as an SFT model folder (plumbing only)."""
    from dataengine.features import ClipEncoder
    from train.model import ModelSettings, VideoLMM

    folder = tmp_path_factory.getbasetemp() / "judge_shared" / "sft_model"
    if not (folder / "vlmr_model.json").exists():
        feat_dim = ClipEncoder("tiny").vision.hidden_size
        VideoLMM.build(ModelSettings(feat_dim=feat_dim), seed=0).save(folder)
    return folder




# ------------------------------------------------------------------------------ narrate

class InjectedKill(Exception):
    """Raised by a stand-in to stop a run where a kill would."""


def signature(feat: torch.Tensor) -> str:
    """A caption naming exactly these feature rows."""
    return "clip-" + hashlib.sha256(feat.contiguous().numpy().tobytes()).hexdigest()[:12]


class ClipSignatureCaptioner:
    name = "test:clip-signature"

    def __init__(self):
        self.calls = 0
        self.captioned = 0
        self.fail_at_call: int | None = None
        """Raise on this call (1-based), as a kill in the middle of a unit would."""

    def caption(self, feats: Sequence[torch.Tensor]) -> list[str | None]:
        self.calls += 1
        if self.fail_at_call is not None and self.calls == self.fail_at_call:
            raise InjectedKill(f"injected kill at caption call {self.calls}")
        self.captioned += len(feats)
        return [signature(f) for f in feats]


# ------------------------------------------------------------------------------ ground truth

def video_facts(truth: dict[str, Any]) -> dict[str, set[str]]:
    """The colours, shapes and directions that are true of one video."""
    directions = {seg["event"]["direction"] for seg in truth["segments"] if seg["event"].get("direction")}
    return {"colour": {o["colour"] for o in truth["objects"]}, "shape": {o["shape"] for o in truth["objects"]},
            "direction": directions}


VOCABULARY = {"colour": synth.COLOURS, "shape": synth.SHAPES, "direction": synth.DIRECTIONS}


def falsify(text: str, facts: dict[str, set[str]]) -> str:
    """The text with every true colour/shape replaced by one the video lacks, every direction flipped."""
    def replace(match: re.Match) -> str:
        word = match.group(0)
        if word in facts["colour"]:
            return next(c for c in synth.COLOURS if c not in facts["colour"])
        if word in facts["shape"]:
            return next((s for s in synth.SHAPES if s not in facts["shape"]), "shape")
        if word in facts["direction"]:
            return OPPOSITE[word]
        return word
    return re.sub(r"[a-z]+", replace, text)


def truth_score(text: str, facts: dict[str, set[str]]) -> int:
    """True facts mentioned minus false facts mentioned (colours, shapes, directions)."""
    score = 0
    for word in re.findall(r"[a-z]+", text.lower()):
        for kind, vocabulary in VOCABULARY.items():
            if word in vocabulary:
                score += 1 if word in facts[kind] else -1
    return score


class TruthSampler:
    """A truthful and a false answer per prompt; their order follows the seed."""

    name = "test:truth-sampler"

    def __init__(self, captions: dict[str, dict[str, Any]]):
        self.captions = captions
        self.truthful: dict[str, str] = {}
        self.calls = 0

    def answers(self, video_id: str) -> tuple[str, str]:
        truth = self.captions[video_id]
        good = truth["caption"]
        bad = falsify(good, video_facts(truth))
        assert truth_score(good, video_facts(truth)) > truth_score(bad, video_facts(truth))
        return good, bad

    def sample(self, samples: Sequence[dict[str, Any]], prompts, seed: int) -> list[tuple[Response, Response] | None]:
        self.calls += 1
        out = []
        for i, sample in enumerate(samples):
            good, bad = self.answers(sample["json"]["video_id"])
            self.truthful[sample["key"]] = good
            first_is_good = np.random.default_rng([seed, i]).random() < 0.5
            out.append((Response(good), Response(bad)) if first_is_good else (Response(bad), Response(good)))
        return out


class TruthJudge:
    """P(A better) = sigmoid(score(A) - score(B)) against the video's ground truth."""

    name = "test:truth-judge"

    def __init__(self, captions: dict[str, dict[str, Any]]):
        self.captions = captions
        self.seen: list[Comparison] = []

    def prefer(self, comparisons: Sequence[Comparison]) -> list[float | None]:
        out = []
        for c in comparisons:
            self.seen.append(c)
            facts = video_facts(self.captions[c.sample["json"]["video_id"]])
            diff = truth_score(c.answer_a, facts) - truth_score(c.answer_b, facts)
            out.append(1.0 / (1.0 + math.exp(-diff)))
        return out


class PositionJudge:
    """Always prefers the answer in position A."""

    name = "test:always-a"

    def prefer(self, comparisons: Sequence[Comparison]) -> list[float | None]:
        return [0.9 for _ in comparisons]


# ------------------------------------------------------------------------------ 2 ranks

def run_both(world: Path, prompt_shards: Path, out: Path, ranks=None):
    """narrate, then judge (context clips), with the stand-ins; returns both summaries."""
    from train import judge, narrate

    narrated, pairs = out / "narrated", out / "pairs"
    narrate_summary = narrate.run(
        narrate.NarrateConfig(model="test-fixture", input=str(prompt_shards), out=str(narrated),
                              samples_per_shard=5, batch_size=3, progress=False),
        captioner=ClipSignatureCaptioner(), ranks=ranks)
    captions = synth.load_captions(world)
    judge_summary = judge.run(
        judge.JudgeConfig(model="test-fixture", input=str(narrated), out=str(pairs), context="clips",
                          samples_per_shard=7, batch_size=4, progress=False),
        sampler=TruthSampler(captions), judge=TruthJudge(captions), ranks=ranks)
    return narrate_summary, judge_summary


if __name__ == "__main__":
    from dataengine.dist import Ranks
    from train import shardpass

    world_arg, shards_arg, out_arg = (Path(a) for a in sys.argv[1:4])
    rank_info = Ranks.from_env()
    with shardpass.process_group(rank_info):
        run_both(world_arg, shards_arg, out_arg, ranks=rank_info)
