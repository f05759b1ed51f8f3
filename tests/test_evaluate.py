"""`vlmr eval ...` end to end on shards built from each benchmark's annotation form over the
synthetic world's videos: exact scores from prediction files (worked out by hand), tiny
models answering, an HTTP judge scripted through the stub server, its reply cache, errors
that name the sample, and two ranks under torchrun.

    .venv/bin/python -m pytest -q tests/test_evaluate.py
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from llm_stub_server import Reply, StubChatServer

from dataengine import build
from dataengine import config as cfg
from dataengine.dist import Ranks
from dataengine.reader import ShardReader
from train import metrics
from train.eval import answering, configs, judging, run, tasks
from train.prompt_files import load_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
FRAMES = 6


# ----------------------------------------------------------------------------- fixtures


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=1))
    return path


def world_annotations(world: Path) -> dict[str, dict[str, dict]]:
    """video_id -> qtype -> the world's own {"video_id", "q", "a", "qtype"} record."""
    out: dict[str, dict[str, dict]] = {}
    for row in json.loads((world / "annotations.json").read_text()):
        out.setdefault(row["video_id"], {})[row["qtype"]] = row
    return out


@pytest.fixture(scope="module")
def bench(synth_world, tmp_path_factory):
    """Shard sets in each benchmark's annotation form, and two saved tiny models."""
    from train.model import ModelSettings, VideoLMM

    root = tmp_path_factory.mktemp("bench")
    cache = root / "cache"
    by_video = world_annotations(synth_world)
    captions = {v: t["caption"] for v, t in json.loads((synth_world / "captions.json").read_text())["videos"].items()}
    vids = sorted(by_video)

    qa_vcg = [{"video_id": v, "q": by_video[v][t]["q"], "a": by_video[v][t]["a"]}
              for v in vids for t in ("colour", "count")]
    qa_llava = [{"id": f"l{i}", "video": f"{v}.mp4",
                 "conversations": [{"from": "human", "value": "<video>\n" + by_video[v]["shape"]["q"]},
                                   {"from": "gpt", "value": by_video[v]["shape"]["a"]}]}
                for i, v in enumerate(vids[:3])]
    generative = []
    for v in vids[:3]:
        generative.append({"video_id": v, "q": by_video[v]["describe"]["q"], "a": by_video[v]["describe"]["a"],
                           "task": "generic"})
        generative.append({"video_id": v, "q": by_video[v]["order"]["q"], "a": by_video[v]["order"]["a"],
                           "task": "temporal"})
        generative.append({"video_id": v, "q": "What colour is the first shape in the video?",
                           "q2": "Which colour does the shape that appears first have?",
                           "a": by_video[v]["colour"]["a"], "task": "consistency"})
    for v in vids[3:5]:
        generative.append({"video_id": v, "q": "How many shapes are there?", "a": by_video[v]["count"]["a"],
                           "question_pair": f"pair-{v}"})
        generative.append({"video_id": v, "q": "What is the number of shapes in the video?",
                           "a": by_video[v]["count"]["a"], "question_pair": f"pair-{v}"})
    retrieval = [{"video_id": v, "q": "Describe this video in detail.", "a": captions[v]} for v in vids]
    retrieval.append({"video_id": vids[0], "q": "Describe this video in detail.", "a": by_video[vids[0]]["order"]["a"]})
    classes = ["MoveLeft", "MoveRight", "MoveUp", "MoveDown"]
    (root / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    action = []
    for i, v in enumerate(vids):
        direction = by_video[v]["direction"]["a"]
        record = {"video_id": v, "q": "What is happening?", "a": f"move {direction}"}
        if i % 3 == 0:
            record["label"] = "Move" + direction.capitalize()
        elif i % 3 == 1:
            record["label"] = classes.index("Move" + direction.capitalize())  # a 0-based index
        action.append(record)  # i % 3 == 2: no label, the answer "move up" names the class
    files = {"qa": [write_json(root / "qa_vcg.json", qa_vcg), write_json(root / "qa_llava.json", qa_llava)],
             "generative": [write_json(root / "generative.json", generative)],
             "retrieval": [write_json(root / "retrieval.json", retrieval)],
             "action": [write_json(root / "action.json", action)],
             "synthetic": [synth_world / "annotations.json"]}
    shards = {}
    for name, annotations in files.items():
        shards[name] = root / f"shards_{name}"
        build.build(build.BuildConfig(annotations=[str(a) for a in annotations], videos=str(synth_world / "videos"),
                                      out=str(shards[name]), frames=FRAMES, clips=0, workers=1, cache=str(cache)))
    models = [VideoLMM.build(ModelSettings(feat_dim=64), seed=s).save(root / "runs" / f"m{s}" / "model")
              for s in (0, 1)]
    return {"root": root, "world": synth_world, "shards": shards, "models": models, "classes": root / "classInd.txt",
            "class_names": classes}


def samples(shards: Path) -> list[dict]:
    """(key, json) of every sample in stream order."""
    reader = ShardReader(shards, stages=["easy", "hard"], shuffle="none", fields=("json",), prefetch_bytes=0)
    return [{"key": s["key"], **s["json"]} for s in reader]


def question(sample: dict) -> str:
    return sample["conversations"][0]["value"].replace("<video>", "").strip()


def answer(sample: dict) -> str:
    return sample["conversations"][1]["value"]


def write_predictions(path: Path, rows: dict[str, str | tuple[str, str]]) -> Path:
    lines = []
    for key, value in rows.items():
        row = {"key": key, "prediction": value} if isinstance(value, str) else \
            {"key": key, "prediction": value[0], "prediction2": value[1]}
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def results(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / name / "results.jsonl").read_text().splitlines()]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def metrics_of(out: Path) -> dict[str, dict]:
    return {c["name"]: c["metrics"] for c in summary(out)["candidates"]}


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_exact_scores_side_by_side(bench, tmp_path):
    shards, world = bench["shards"]["synthetic"], bench["world"]
    rows = samples(shards)
    assert len(rows) == 48
    truth_captions = json.loads((world / "captions.json").read_text())["videos"]
    # "truth" answers with the references; "mixed" too, except every colour answer names a
    # colour that is in no shape of its video.
    truth = {r["key"]: answer(r) for r in rows}
    mixed = dict(truth)
    for r in rows:
        if r["qtype"] == "colour":
            present = {o["colour"] for o in truth_captions[r["video_id"]]["objects"]}
            mixed[r["key"]] = next(c for c in ("red", "green", "blue", "yellow") if c not in present)
    # Mentions of the references: all in the video. The mixed answers swap 6 grounded colours
    # (one per video) for 6 that are not.
    mentioned = sum(len(set().union(*(metrics.mentions(answer(r))[k] for k in ("colour", "shape", "direction"))))
                    for r in rows)
    out = tmp_path / "out"
    run.synthetic_main(["--shards", str(shards), "--world", str(world), "--output", str(out), "--predictions",
                             str(write_predictions(tmp_path / "truth.jsonl", truth)),
                             str(write_predictions(tmp_path / "mixed.jsonl", mixed)), "--no-progress"])
    got = metrics_of(out)
    assert list(got) == ["truth", "mixed"]
    assert got["truth"]["accuracy"] == 1.0 and got["truth"]["groundedness"] == 1.0
    assert all(got["truth"][f"accuracy/{q}"] == 1.0 for q in configs.SYNTHETIC_QTYPES)
    assert got["truth"]["event F1"] == 1.0 and got["truth"]["mentions"] == mentioned
    assert got["mixed"]["accuracy"] == pytest.approx(42 / 48)
    assert got["mixed"]["accuracy/colour"] == 0.0 and got["mixed"]["accuracy/shape"] == 1.0
    assert got["mixed"]["groundedness"] == pytest.approx((mentioned - 6) / mentioned)
    assert got["mixed"]["samples"] == 48 and got["mixed"]["skipped"] == 0
    # One line per sample, in stream order, saying what was asked, expected, answered, scored.
    lines = results(out, "mixed")
    assert [line["index"] for line in lines] == list(range(48))
    assert [line["key"] for line in lines] == [r["key"] for r in rows]
    first = lines[0]
    assert first["question"] == question(rows[0]) and first["answer"] == answer(rows[0])
    assert {"prediction", "qtype", "correct", "grounded", "mentioned"} <= set(first)
    table = (out / "summary.txt").read_text()
    assert re.search(r"accuracy/colour \(%\)\s+100\.0\s+0\.0", table), table
    assert json.loads((out / "config.json").read_text())["world"] == str(world)


def test_synthetic_tiny_models_answer_side_by_side(bench, tmp_path):
    """Saved models (one given as its run folder) answer the first 12 samples."""
    m0, m1 = bench["models"]
    out = tmp_path / "out"
    run.synthetic_main(["--shards", str(bench["shards"]["synthetic"]), "--world", str(bench["world"]),
                             "--models", str(m0.parent), str(m1), "--limit", "12", "--max-new-tokens", "6",
                             "--batch-size", "5", "--output", str(out), "--no-progress"])
    got = summary(out)
    names = [c["name"] for c in got["candidates"]]
    assert names == ["m0", "m1"]  # runs/m0 (a run folder) and runs/m1/model: named by their runs
    for c in got["candidates"]:
        assert c["metrics"]["samples"] == 12 and c["metrics"]["skipped"] == 0
        assert 0 <= c["metrics"]["accuracy"] <= 1
        lines = results(out, c["name"])
        assert [line["index"] for line in lines] == list(range(12))
        assert all(isinstance(line["prediction"], str) and line["ended"] in (True, False) for line in lines)
    assert got["table"].splitlines()[1].split() == ["metric", "m0", "m1"]
    assert (out / "m1" / "results.jsonl").exists()


def test_synthetic_needs_ground_truth_for_every_video(bench, tmp_path):
    world = tmp_path / "world"
    world.mkdir()
    data = json.loads((bench["world"] / "captions.json").read_text())
    del data["videos"]["vid_00002"]
    (world / "captions.json").write_text(json.dumps(data))
    preds = write_predictions(tmp_path / "p.jsonl", {r["key"]: "red" for r in samples(bench["shards"]["synthetic"])})
    argv = ["--shards", str(bench["shards"]["synthetic"]), "--world", str(world), "--predictions", str(preds),
            "--no-progress"]
    with pytest.raises(ValueError, match=r"key annotations-\d+: video 'vid_00002' has no ground truth"):
        run.synthetic_main(argv + ["--output", str(tmp_path / "a")])
    run.synthetic_main(argv + ["--output", str(tmp_path / "b"), "--on-error", "skip"])
    got = metrics_of(tmp_path / "b")["p"]
    assert got["samples"] == 40 and got["skipped"] == 8  # nothing silently lost
    skipped = [line for line in results(tmp_path / "b", "p") if line.get("skipped")]
    assert len(skipped) == 8 and {s["reason"] for s in skipped} == {"malformed"}


# ----------------------------------------------------------------------------- qa (HTTP judge)

def qa_judge(body: dict) -> Reply:
    """yes/5 when the prediction equals the reference, no/1 otherwise (in the Python-dict form
    some judges write), and no verdict at all for '???'."""
    prompt = body["messages"][-1]["content"]
    reference = re.search(r"^Correct answer: (.*)$", prompt, re.M).group(1)
    predicted = re.search(r"^Predicted answer: (.*)$", prompt, re.M).group(1)
    if predicted == "???":
        return Reply.ok("I am not sure what to say.")
    return Reply.ok('{"pred": "yes", "score": 5}' if predicted == reference else "{'pred': 'no', 'score': 1}")


def test_qa_judged_over_http_and_a_rerun_costs_nothing(bench, tmp_path):
    rows = samples(bench["shards"]["qa"])
    assert len(rows) == 12 + 3  # Video-ChatGPT and LLaVA records in one shard set
    predictions = {}
    for i, r in enumerate(rows):
        predictions[r["key"]] = answer(r) if i < 9 else ("???" if i == 9 else "something else")
    preds = write_predictions(tmp_path / "p.jsonl", predictions)
    with StubChatServer(responder=qa_judge) as server:
        argv = ["--shards", str(bench["shards"]["qa"]), "--predictions", str(preds), "--judge", server.url,
                "--judge-model", "stub-judge", "--judge-cache", str(tmp_path / "cache"), "--seed", "7",
                "--no-progress", "--timeout", "5"]
        run.qa_main(argv + ["--output", str(tmp_path / "first")])
        assert server.request_count == 15
        body = server.requests[0]["body"]
        assert body["temperature"] == 0.0 and body["seed"] == 7 and body["model"] == "stub-judge"
        run.qa_main(argv + ["--output", str(tmp_path / "second")])
        assert server.request_count == 15  # every verdict came from the cache
    first, second = metrics_of(tmp_path / "first")["p"], metrics_of(tmp_path / "second")["p"]
    # 9 right (yes, 5), 5 wrong (no, 1), 1 reply without a verdict.
    assert first["accuracy"] == pytest.approx(9 / 14)
    assert first["score"] == pytest.approx((9 * 5 + 5 * 1) / 14)
    assert first["judged"] == 14 and first["unparsed replies"] == 1 and first["judge failed"] == 0
    assert first["judge requests sent"] == 15 and first["judge replies cached"] == 0
    assert second["judge requests sent"] == 0 and second["judge replies cached"] == 15
    assert {k: v for k, v in first.items() if not k.startswith("judge ")} == \
        {k: v for k, v in second.items() if not k.startswith("judge ")}
    lines = results(tmp_path / "first", "p")
    assert lines[0]["pred"] == "yes" and lines[0]["score"] == 5.0 and "judge" in lines[0]
    assert lines[9]["pred"] is None and lines[9]["judge"] == "I am not sure what to say."


def test_qa_judge_failures_are_counted_or_stop_the_run(bench, tmp_path):
    preds = write_predictions(tmp_path / "p.jsonl", {r["key"]: "x" for r in samples(bench["shards"]["qa"])})
    with StubChatServer(responder=lambda body: Reply.error(503)) as server:
        argv = ["--shards", str(bench["shards"]["qa"]), "--predictions", str(preds), "--judge", server.url,
                "--judge-model", "m", "--judge-cache", str(tmp_path / "cache"), "--max-retries", "0",
                "--backoff", "0.001", "--no-progress", "--limit", "3"]
        with pytest.raises(RuntimeError, match="3 judge request"):
            run.qa_main(argv + ["--output", str(tmp_path / "a")])
        run.qa_main(argv + ["--output", str(tmp_path / "b"), "--on-error", "skip"])
    got = metrics_of(tmp_path / "b")["p"]
    assert got["judge failed"] == 3 and got["judged"] == 0 and got["accuracy"] is None
    assert all("judge_error" in line for line in results(tmp_path / "b", "p"))


def test_qa_with_a_model_and_the_local_tiny_judge(bench, tmp_path):
    out = tmp_path / "out"
    run.qa_main(["--shards", str(bench["shards"]["qa"]), "--models", str(bench["models"][0]),
                      "--judge", "tiny", "--judge-cache", str(tmp_path / "cache"), "--judge-max-tokens", "12",
                      "--limit", "3", "--max-new-tokens", "6", "--output", str(out), "--no-progress"])
    got = metrics_of(out)["m0"]
    # A random tiny judge rarely writes a verdict; whatever it wrote is accounted for.
    assert got["judged"] + got["unparsed replies"] == 3 and got["judge failed"] == 0
    assert got["judge requests sent"] == 3


# ----------------------------------------------------------------------------- generative

CRITERION_SCORES = {"correctness": 4, "detail": 3, "context": 5, "temporal": 2, "consistency": 1}


def criterion_judge(body: dict) -> Reply:
    prompt = body["messages"][-1]["content"]
    criterion = re.search(r"on one criterion: (\w+)", prompt).group(1).lower()
    name = {"correctness": "correctness", "detail": "detail", "contextual": "context", "temporal": "temporal",
            "consistency": "consistency"}[criterion]
    return Reply.ok(json.dumps({"score": CRITERION_SCORES[name]}))


def test_generative_five_criteria(bench, tmp_path):
    rows = samples(bench["shards"]["generative"])
    assert len(rows) == 9 + 4
    predictions = {r["key"]: (answer(r), "a reworded answer") if "q2" in r else f"answer to {question(r)}"
                   for r in rows}
    preds = write_predictions(tmp_path / "p.jsonl", predictions)
    with StubChatServer(responder=criterion_judge) as server:
        run.generative_main(["--shards", str(bench["shards"]["generative"]), "--predictions", str(preds),
                                  "--judge", server.url, "--judge-model", "m", "--judge-cache", str(tmp_path / "c"),
                                  "--output", str(tmp_path / "out"), "--no-progress"])
        # 3 generic x 3 criteria + 3 temporal + 3 consistency (q2) + 2 consistency pairs
        assert server.request_count == 9 + 3 + 3 + 2
        consistency = [r["body"]["messages"][0]["content"] for r in server.requests
                       if "criterion: consistency" in r["body"]["messages"][0]["content"]]
    assert sum("Answer to question 2: a reworded answer" in c for c in consistency) == 3
    assert sum("Question 2: What is the number of shapes in the video?" in c for c in consistency) == 2
    got = metrics_of(tmp_path / "out")["p"]
    for criterion, score in CRITERION_SCORES.items():
        assert got[criterion] == score
    assert got["mean of criteria"] == pytest.approx(sum(CRITERION_SCORES.values()) / 5)
    assert got["judged"] == 17 and got["unparsed replies"] == 0 and got["unpaired"] == 0
    lines = {line["key"]: line for line in results(tmp_path / "out", "p")}
    paired = [line for line in lines.values() if "paired_key" in line]
    assert len(paired) == 2
    for line in paired:
        partner = lines[line["paired_key"]]
        assert partner["paired_with"] == line["key"] and line["question2"] == partner["question"]
        assert line["scores"] == {"consistency": 1.0} and "scores" not in partner


def test_generative_pairs_must_be_pairs_of_one_video(tmp_path):
    config = configs.GenerativeConfig(shards="s", predictions=["p"], judge="http://127.0.0.1:9/v1", judge_model="m")
    task = tasks.GenerativeTask(config, Ranks(), "cpu")
    records = [{"key": "a", "video_id": "v1", "question": "q", "prediction": "x", "question_pair": "p1"},
               {"key": "b", "video_id": "v2", "question": "q", "prediction": "x", "question_pair": "p1"},
               {"key": "c", "video_id": "v3", "question": "q", "prediction": "x", "question_pair": "p2"}]
    with pytest.raises(ValueError, match="question_pair 'p1' has two videos"):
        task.pair_up([dict(r) for r in records])
    task.config.on_error = "skip"
    paired = task.pair_up([dict(r) for r in records])
    assert all("unpaired" in r for r in paired)
    assert "1 sample(s)" in paired[2]["unpaired"]


# ----------------------------------------------------------------------------- retrieval

def test_retrieval_recall_hand_computed(bench, tmp_path):
    rows = samples(bench["shards"]["retrieval"])
    assert len(rows) == 7  # six videos, one of them with a second caption
    by_video: dict[str, str] = {}
    for r in rows:  # the first caption of each video in stream order describes the video
        by_video.setdefault(r["video_id"], answer(r))
    exact = write_predictions(tmp_path / "exact.jsonl", {r["key"]: by_video[r["video_id"]] for r in rows})
    same = write_predictions(tmp_path / "same.jsonl", {r["key"]: "A shape moves." for r in rows})
    out = tmp_path / "out"
    run.retrieval_main(["--shards", str(bench["shards"]["retrieval"]), "--predictions", str(exact), str(same),
                             "--output", str(out), "--no-progress"])
    got = metrics_of(out)
    # A description equal to the caption is the caption's nearest text: 6 queries at rank 0;
    # the second caption of one video may rank anywhere among the 6 videos.
    firsts = [line for line in results(out, "exact") if line["answer"] == by_video[line["video_id"]]]
    assert len(firsts) == 6 and all(line["rank"] == 0 for line in firsts)
    assert got["exact"]["R@1"] >= 6 / 7 and got["exact"]["R@10"] == 1.0
    assert got["exact"]["queries"] == 7 and got["exact"]["videos"] == 6
    # Every video described alike: all six tie, and a tie counts against the right video (rank 5).
    assert (got["same"]["R@1"], got["same"]["R@5"], got["same"]["R@10"]) == (0.0, 0.0, 1.0)


def test_retrieval_ties_survive_batch_dependent_rounding(bench, tmp_path, monkeypatch):
    """Equal texts embedded in different places of a batch may differ in the last bits (other
    CPUs, thread counts): equal descriptions must still tie exactly."""
    real_embed = judging.ClipText.embed

    def jittery_embed(self, texts, batch=64):
        rows = real_embed(self, texts, batch)
        return rows + 1e-6 * np.arange(len(rows), dtype=rows.dtype)[:, None]  # position-dependent rounding

    monkeypatch.setattr(judging.ClipText, "embed", jittery_embed)
    rows = samples(bench["shards"]["retrieval"])
    same = write_predictions(tmp_path / "same.jsonl", {r["key"]: "A shape moves." for r in rows})
    out = tmp_path / "out"
    run.retrieval_main(["--shards", str(bench["shards"]["retrieval"]), "--predictions", str(same),
                             "--output", str(out), "--no-progress"])
    got = metrics_of(out)["same"]
    assert (got["R@1"], got["R@5"], got["R@10"]) == (0.0, 0.0, 1.0)


def test_text_similarity_gives_equal_texts_equal_scores():
    def embed(texts):  # a different vector for every position, as if rounding depended on it
        rows = np.eye(4)[:len(texts)] + 0.1 * np.arange(len(texts))[:, None]
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    sim = judging.text_similarity(embed, ["q", "r", "q"], ["x", "y", "x"])
    assert sim.shape == (3, 3)
    assert np.array_equal(sim[:, 0], sim[:, 2]) and np.array_equal(sim[0], sim[2])
    assert not np.array_equal(sim[:, 0], sim[:, 1])


def test_retrieval_with_a_model_generates_each_video_once(bench, tmp_path):
    out = tmp_path / "out"
    run.retrieval_main(["--shards", str(bench["shards"]["retrieval"]), "--models", str(bench["models"][1]),
                             "--max-new-tokens", "6", "--output", str(out), "--no-progress"])
    lines = results(out, "m1")
    assert len(lines) == 7 and all(line["question"] == configs.DESCRIBE for line in lines)
    by_video: dict[str, set[str]] = {}
    for line in lines:
        by_video.setdefault(line["video_id"], set()).add(line["prediction"])
    assert all(len(p) == 1 for p in by_video.values())
    got = metrics_of(out)["m1"]
    assert all(0.0 <= got[f"R@{k}"] <= 1.0 for k in (1, 5, 10)) and got["R@10"] == 1.0


# ----------------------------------------------------------------------------- action

def test_action_topk_hand_computed(bench, tmp_path):
    rows = samples(bench["shards"]["action"])
    words = {c: tasks.class_words(c) for c in bench["class_names"]}
    assert words["MoveLeft"] == "move left"
    right = write_predictions(tmp_path / "right.jsonl",
                              {r["key"]: f"a video of a person {answer(r)}." for r in rows})
    same = write_predictions(tmp_path / "same.jsonl", {r["key"]: "a video of a person move left." for r in rows})
    out = tmp_path / "out"
    run.action_main(["--shards", str(bench["shards"]["action"]), "--classes", str(bench["classes"]),
                          "--predictions", str(right), str(same), "--output", str(out), "--no-progress"])
    got = metrics_of(out)
    # A description equal to its class prompt is that prompt's nearest text: all top-1.
    assert got["right"]["top-1"] == 1.0 and got["right"]["top-5"] == 1.0 and got["right"]["classes"] == 4
    # Every video described as moving left: right exactly for the videos of that class; with
    # 4 classes every label is within the top 5.
    left = sum(answer(r) == "move left" for r in rows)
    assert 0 < left < len(rows)
    assert got["same"]["top-1"] == pytest.approx(left / len(rows)) and got["same"]["top-5"] == 1.0
    lines = results(out, "right")
    assert [line["label"] for line in lines] == ["Move" + answer(r).split()[1].capitalize() for r in rows]
    assert all(line["top"][0] == line["label"] for line in lines)


def test_action_with_a_model_and_a_bad_label(bench, tmp_path):
    out = tmp_path / "out"
    run.action_main(["--shards", str(bench["shards"]["action"]), "--classes", str(bench["classes"]),
                          "--models", str(bench["models"][0]), "--max-new-tokens", "6", "--output", str(out),
                          "--no-progress", "--limit", "3"])
    got = metrics_of(out)["m0"]
    assert got["samples"] == 3 and 0 <= got["top-1"] <= got["top-5"] <= 1
    fewer = tmp_path / "fewer.txt"
    fewer.write_text("MoveLeft\nMoveRight\n")
    argv = ["--shards", str(bench["shards"]["action"]), "--classes", str(fewer), "--models", str(bench["models"][0]),
            "--max-new-tokens", "4", "--no-progress"]
    with pytest.raises(ValueError, match=r"key action-\d+: label .* (is not a class|outside the 2 classes)"):
        run.action_main(argv + ["--output", str(tmp_path / "a")])
    run.action_main(argv + ["--output", str(tmp_path / "b"), "--on-error", "skip"])
    got = metrics_of(tmp_path / "b")["m0"]
    kept = sum(answer(r).split()[1] in ("left", "right") for r in samples(bench["shards"]["action"]))
    assert got["samples"] == kept and got["samples"] + got["skipped"] == 6


# ----------------------------------------------------------------------------- pieces

def test_prompts_parse_and_commands_have_help(capsys):
    load_prompt(configs.QA_PROMPT, required=("question", "answer", "prediction"))
    config = configs.GenerativeConfig(shards="s", predictions=["p"], judge="tiny")
    tasks.GenerativeTask(config, Ranks(), "cpu")  # loads all five prompts
    for main in run.MAINS.values():
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0
    assert "--judge-model" in capsys.readouterr().out


def test_shipped_config_parses():
    config = cfg.parse_config(configs.SyntheticConfig,
                                       ["--config", str(ROOT / "train" / "configs" / "eval_synthetic_tiny.yaml")])
    assert config.models == ["runs/demo/sft", "runs/demo/ppo"] and config.world == "runs/demo/world-eval"
    assert config.stages == []  # every non-empty stage of the shards


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(SystemExit):
        run.qa_main(["--shards", "s", "--predictions", "p", "--judge", "http://x:1/v1"])  # no --judge-model
    with pytest.raises(cfg.ConfigError, match="--classes"):
        configs.ActionConfig(shards="s", models=["m"])
    with pytest.raises(FileNotFoundError, match="not a saved model"):
        answering.resolve_candidates(configs.SyntheticConfig(shards="s", world="w", models=[str(tmp_path)]))
    prompt = tmp_path / "p.txt"
    prompt.write_text("# doc\nQ: $question A: $answer\n")
    with pytest.raises(ValueError, match=r"p.txt: missing placeholder\(s\) \$prediction"):
        load_prompt(prompt, required=("question", "answer", "prediction"))


def test_small_helpers():
    assert answering.distinct_names(["runs/sft/model", "runs/ppo/model"]) == ["sft/model", "ppo/model"]
    assert answering.distinct_names(["a/x", "b/y"]) == ["x", "y"]
    assert tasks.class_words("ApplyEyeMakeup") == "apply eye makeup"
    assert tasks.class_words("brush_hair") == "brush hair"
    assert tasks.class_words("YoYo") == "yo yo"
    table = run.format_table("t", [{"name": "a", "rows": [["acc", 0.5, "pct"], ["score", 3.25, "score"]]},
                                        {"name": "bb", "rows": [["acc", None, "pct"], ["n", 4, "count"]]}])
    assert table.splitlines()[1:] == ["metric      a  bb", "-------  ----  --", "acc (%)  50.0   -",
                                      "score    3.25   -", "n           -   4"]


def test_load_classes_forms(tmp_path):
    plain, ucf, twice = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    plain.write_text("# comment\nbrush_hair\n\ncartwheel\n")
    ucf.write_text("1 ApplyEyeMakeup\n2 ApplyLipstick\n")
    twice.write_text("a\nb\na\n")
    assert tasks.load_classes(plain) == ["brush_hair", "cartwheel"]
    assert tasks.load_classes(ucf) == ["ApplyEyeMakeup", "ApplyLipstick"]
    with pytest.raises(ValueError, match="c.txt:3: class 'a' listed twice"):
        tasks.load_classes(twice)


# ----------------------------------------------------------------------------- two ranks

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_under_torchrun_match_one_rank(bench, tmp_path):
    shards, world, model = bench["shards"]["synthetic"], bench["world"], bench["models"][0]
    rows = samples(shards)
    preds = write_predictions(tmp_path / "p.jsonl", {r["key"]: answer(r) for r in rows[::2]})  # half answered
    common = ["--shards", str(shards), "--world", str(world), "--models", str(model), "--predictions", str(preds),
              "--limit", "11", "--max-new-tokens", "4", "--batch-size", "1", "--on-error", "skip", "--no-progress"]
    run.synthetic_main(common + ["--output", str(tmp_path / "one")])
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), VLMR_LOG="WARNING")
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                           "--master_port", str(free_port()), "-m", "train.eval.run", "synthetic",
                           *common, "--output", str(tmp_path / "two")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("m0", "p"):
        one, two = results(tmp_path / "one", name), results(tmp_path / "two", name)
        assert [line["index"] for line in two] == list(range(11))  # each sample once, none lost
        assert one == two
    got = metrics_of(tmp_path / "two")
    assert got["p"]["samples"] == 6 and got["p"]["skipped"] == 5 and got["p"]["accuracy"] == 1.0
    assert "vlmr eval synthetic" in proc.stdout  # rank 0 printed the table
