"""Preference shards for reward-model tests, from the synthetic world's ground truth.

A test-only stand-in for ``vlmr judge`` (issue 6): the "judge" is the world's ground truth
(``captions.json``), so every preference is correct. Features are real: they come from a
``build-shards`` run over the world's videos (``frames=6, clips=0``). Pairs come in kinds:

``video``  the same question and two well-formed answers that differ in one fact (the colour
           of a shape, the number of shapes). Pairs are *balanced*: every (answer A, answer B)
           text appears once with A chosen (on a video where A is true) and once with B chosen
           (on another video), so the text alone says nothing and a model that only reads text
           scores 0.5 on them in training — any better must come through the video features.
``text``   a correct, well-formed answer against a degenerate one (a word repeated, or a
           refusal): learnable from the text alone, as a weak judge's preferences often are.

Pairs are shuffled with a fixed seed before writing, so each shard mixes kinds and videos;
the last shards serve as held-out pairs.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import numpy as np

COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
JUDGE_MODEL = "ground-truth test judge"


def build_features(world: Path, out: Path) -> Path:
    """Shards with real (tiny CLIP) features of the world's videos; returns ``out``."""
    from dataengine.build import BuildConfig, build

    build(BuildConfig(annotations=[str(world / "annotations.json")], videos=str(world / "videos"),
                      out=str(out), frames=6, clips=0, workers=1))
    return out


def video_features(shards: Path) -> dict[str, np.ndarray]:
    """video_id -> its pooled ``feat`` (float16 (T+P, D)), read from a build's shards."""
    from dataengine.reader import ShardReader
    from dataengine.schema import Manifest

    stages = [s.name for s in Manifest.load(shards).stages if s.samples]
    feats: dict[str, np.ndarray] = {}
    for sample in ShardReader(shards, stages=stages, shuffle="none", fields=("json", "feat"), prefetch_bytes=0):
        feats.setdefault(sample["json"]["video_id"], sample["feat"].numpy().astype(np.float16))
    return feats


def _unique_shapes(truth: dict[str, Any]) -> dict[str, str]:
    """shape -> colour for shapes that occur once in a video (so the question is unambiguous)."""
    shapes = [o["shape"] for o in truth["objects"]]
    return {o["shape"]: o["colour"] for o in truth["objects"] if shapes.count(o["shape"]) == 1}


def video_pairs(captions: dict[str, dict[str, Any]],
                questions: tuple[str, ...] = ("colour", "count")) -> list[dict[str, Any]]:
    """Balanced pairs that need the video: the colour of a shape, the number of shapes."""
    pairs = []
    good = {v: t for v, t in sorted(captions.items()) if not t.get("broken")}
    for shape in sorted({o["shape"] for t in good.values() for o in t["objects"]} if "colour" in questions else ()):
        having = [(v, _unique_shapes(t)[shape]) for v, t in good.items() if shape in _unique_shapes(t)]
        for (v, c_v), (w, c_w) in itertools.permutations(having, 2):
            if c_v != c_w:
                pairs.append({"video_id": v, "kind": "video", "question": f"What colour is the {shape}?",
                              "chosen": f"The {shape} is {c_v}.", "rejected": f"The {shape} is {c_w}."})
    for (v, t), (w, u) in itertools.permutations(good.items(), 2):
        if "count" in questions and t["count"] != u["count"]:
            pairs.append({"video_id": v, "kind": "video", "question": "How many shapes appear in the video?",
                          "chosen": f"There are {COUNT_WORDS[t['count']]} shapes.",
                          "rejected": f"There are {COUNT_WORDS[u['count']]} shapes."})
    return pairs


def text_pairs(captions: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """A correct answer against a degenerate one (learnable from the text alone)."""
    pairs = []
    for v, t in sorted(captions.items()):
        if t.get("broken"):
            continue
        for k, (shape, colour) in enumerate(sorted(_unique_shapes(t).items())):
            degenerate = [f"{shape} {shape} {shape} {shape} {shape}", "I do not know.",
                          f"{colour} {colour} {colour}"][(k + len(v)) % 3]
            pairs.append({"video_id": v, "kind": "text", "question": f"What colour is the {shape}?",
                          "chosen": f"The {shape} is {colour}.", "rejected": degenerate})
        for k, segment in enumerate(t["segments"]):
            event = segment["event"]
            if event["kind"] == "moves":
                thing = next(o for o in t["objects"] if o["object"] == event["object"])
                degenerate = ["It moves moves moves.", "I do not know.", "left right left right up down"][k % 3]
                pairs.append({"video_id": v, "kind": "text",
                              "question": f"Which direction does the {thing['colour']} {thing['shape']} move?",
                              "chosen": f"It moves {event['direction']}.", "rejected": degenerate})
        pairs.append({"video_id": v, "kind": "text", "question": "Describe this video in detail.",
                      "chosen": t["caption"], "rejected": "Yes. Yes. Yes."})
    return pairs


def narrative_of(truth: dict[str, Any]) -> str:
    """The ground-truth per-segment captions joined in order (what `vlmr narrate` would write)."""
    return " ".join(f"{s['caption'][0].upper()}{s['caption'][1:]}." for s in truth["segments"])


def write_preference_shards(folder: Path, pairs: list[dict[str, Any]], feats: dict[str, np.ndarray],
                            captions: dict[str, dict[str, Any]], *, maxcount: int = 8, seed: int = 0,
                            derived_from: str = "") -> Path:
    """Preference shards in the `vlmr judge` format (stage ``pairs``), shuffled by ``seed``.

    Each sample's json: id, video_id, conversations (the prompt), chosen, rejected,
    narrative, judge {p_a_first, p_a_swapped, margin, agree, context, model}, and ``kind``
    (this fixture's label of where the signal is).
    """
    from dataengine.pack import ShardWriter
    from dataengine.schema import STAGE_PAIRS, Manifest

    order = list(pairs)
    random.Random(seed).shuffle(order)
    with ShardWriter(folder, STAGE_PAIRS, maxcount=maxcount) as writer:
        for i, pair in enumerate(order):
            sample_id = f"pair_{i:05d}"
            data = {
                "id": sample_id, "video_id": pair["video_id"], "kind": pair["kind"],
                "conversations": [{"from": "human", "value": f"<video>\n{pair['question']}"}],
                "chosen": pair["chosen"], "rejected": pair["rejected"],
                "narrative": narrative_of(captions[pair["video_id"]]),
                # The ground truth is certain, in both orders.
                "judge": {"p_a_first": 1.0, "p_a_swapped": 0.0, "margin": 1.0, "agree": True,
                          "context": "clips", "model": JUDGE_MODEL},
            }
            writer.write({"__key__": sample_id, "json": data, "feat.npy": feats[pair["video_id"]]})
    Manifest(settings={"command": "judge", "judge": JUDGE_MODEL, "seed": seed}, samples=len(order),
             stages=[writer.info], derived_from=derived_from or None).save(folder)
    return folder


def make_preference_set(world: Path, tmp: Path, *, kinds: tuple[str, ...] = ("video", "text"),
                        questions: tuple[str, ...] = ("colour", "count"), maxcount: int = 8,
                        seed: int = 0) -> Path:
    """Build features for ``world`` and write its preference shards to ``tmp/pairs``."""
    from dataengine.synth import load_captions

    shards = build_features(world, tmp / "shards")
    captions = load_captions(world)
    pairs = ((video_pairs(captions, questions) if "video" in kinds else [])
             + (text_pairs(captions) if "text" in kinds else []))
    return write_preference_shards(tmp / "pairs", pairs, video_features(shards), captions, maxcount=maxcount,
                                   seed=seed, derived_from=str(shards / "manifest.json"))
