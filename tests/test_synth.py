"""The synthetic world: determinism, annotation format, answer lengths, ground truth, broken cases."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from dataengine import decode, synth
from dataengine.decode import decode_video, sha256_file
from dataengine.synth import (COLOURS, DIRECTIONS, SHAPES, load_captions, main, render_world)


def _annotations(folder: Path) -> list[dict]:
    return json.loads((folder / "annotations.json").read_text())


def _words(text: str) -> int:
    return len(text.split())


def _sentences(text: str) -> int:
    return len([s for s in re.split(r"[.!?]", text) if s.strip()])


def test_same_seed_same_world(tmp_path, synth_world):
    # A smaller world with the same seed is a prefix of the session world (per-video seeds),
    # and two fresh renders are identical down to the decoded pixels.
    a = render_world(tmp_path / "a", videos=3, seed=0, progress=False)
    b = render_world(tmp_path / "b", videos=3, seed=0, progress=False, jobs=1)
    assert a.annotations.read_bytes() == b.annotations.read_bytes()
    assert a.captions.read_bytes() == b.captions.read_bytes()
    for vid in a.video_ids:
        assert sha256_file(a.video_path(vid)) == sha256_file(b.video_path(vid))
        pa = decode_video(a.video_path(vid), frames=6, clips=0, size=64).frames
        pb = decode_video(b.video_path(vid), frames=6, clips=0, size=64).frames
        assert np.array_equal(pa, pb)
    big = _annotations(synth_world)
    small = _annotations(a.root)
    assert small == [x for x in big if x["video_id"] in set(a.video_ids)]
    assert load_captions(a.root) == {k: v for k, v in load_captions(synth_world).items() if k in a.video_ids}


def test_different_seed_different_world(tmp_path, synth_world):
    other = render_world(tmp_path / "s1", videos=3, seed=1, progress=False)
    mine = [x for x in _annotations(synth_world) if x["video_id"] in set(other.video_ids)]
    assert _annotations(other.root) != mine
    assert load_captions(other.root) != {k: v for k, v in load_captions(synth_world).items()
                                         if k in other.video_ids}


def test_annotation_format_and_lengths(synth_world):
    annotations = _annotations(synth_world)
    videos = sorted({a["video_id"] for a in annotations})
    assert videos == [f"vid_{i:05d}" for i in range(6)]
    for a in annotations:
        assert set(a) == {"video_id", "q", "a", "qtype"}
        assert not a["video_id"].endswith(".mp4")  # Video-ChatGPT ids carry no extension
        assert (synth_world / "videos" / f"{a['video_id']}.mp4").stat().st_size > 0
    lengths = [_words(a["a"]) for a in annotations]
    assert min(lengths) == 1 and max(lengths) >= 30
    by_type: dict[str, list[dict]] = {}
    for a in annotations:
        by_type.setdefault(a["qtype"], []).append(a)
    assert set(by_type) == {"colour", "shape", "direction", "count", "object", "event", "order", "describe"}
    for qtype in ("colour", "shape", "direction", "count"):
        assert all(_words(a["a"]) == 1 for a in by_type[qtype]), qtype
    assert all(2 <= _words(a["a"]) <= 5 for a in by_type["object"] + by_type["event"])
    assert all(_sentences(a["a"]) == 1 and _words(a["a"]) >= 10 for a in by_type["order"])
    assert all(3 <= _sentences(a["a"]) <= 6 for a in by_type["describe"])


def test_answers_agree_with_ground_truth(synth_world):
    truth = load_captions(synth_world)
    for a in _annotations(synth_world):
        t = truth[a["video_id"]]
        first = t["objects"][t["segments"][0]["event"]["object"]]
        if a["qtype"] == "colour":
            assert a["a"] == first["colour"] and a["a"] in COLOURS
        elif a["qtype"] == "shape":
            assert a["a"] == first["shape"] and a["a"] in SHAPES
        elif a["qtype"] == "direction":
            assert a["a"] == t["segments"][0]["event"]["direction"] and a["a"] in DIRECTIONS
        elif a["qtype"] == "count":
            assert a["a"] == ("one", "two", "three")[t["count"] - 1] and t["count"] == len(t["objects"])
        elif a["qtype"] == "event":
            assert a["a"] == t["segments"][2]["caption"]
        elif a["qtype"] == "order":
            assert a["a"] == t["order"]
            # segment captions appear in time order
            positions = [a["a"].index(s["caption"]) for s in t["segments"]]
            assert positions == sorted(positions)
        elif a["qtype"] == "describe":
            assert a["a"] == t["caption"]


def test_ground_truth_layout(synth_world):
    truth = load_captions(synth_world)
    assert len(truth) == 6
    for vid, t in truth.items():
        assert t["file"] == f"videos/{vid}.mp4" and t["frames"] == 30 and t["duration_s"] == 3.0
        info = decode.probe(synth_world / t["file"])
        assert (info.frames, info.width, info.height) == (t["frames"], t["width"], t["height"])
        assert abs(info.fps - t["fps"]) < 1e-6
        segments = t["segments"]
        assert [s["segment"] for s in segments] == [0, 1, 2]
        assert segments[0]["start_s"] == 0.0 and segments[-1]["end_s"] == t["duration_s"]
        assert all(x["end_s"] == y["start_s"] for x, y in zip(segments, segments[1:]))
        shapes = [o["shape"] for o in t["objects"]]
        colours = [o["colour"] for o in t["objects"]]
        assert len(set(shapes)) == len(shapes) and len(set(colours)) == len(colours)
        for s in segments:
            assert s["caption"].split()[0] in ("a", "the") and s["objects"]
            acting = [o for o in s["objects"] if o["event"] != "stays"]
            assert len(acting) == 1 and acting[0]["object"] == s["event"]["object"]


def test_pixels_follow_ground_truth(synth_world):
    # At each segment's first frame every listed shape shows its colour at its centre (when no
    # other shape is drawn over it) and the corner shows the background. yuv420p is lossy:
    # a tolerance of 40 per channel still tells all eight colours apart.
    truth = load_captions(synth_world)
    checked = 0
    for vid, t in truth.items():
        video = decode_video(synth_world / t["file"], frames=30, clips=0, size=t["width"])
        assert video.indices == list(range(30))
        for s in t["segments"]:
            frame = video.frames[s["start_frame"]].astype(int)
            assert np.abs(frame[2, 2] - synth.BACKGROUND_RGB[t["background"]]).max() <= 40
            for o in s["objects"]:
                x, y = (round(v * t["width"] - 0.5) for v in o["xy"])
                covered = any(np.hypot((p["xy"][0] - o["xy"][0]), (p["xy"][1] - o["xy"][1])) < 2 * p["radius"]
                              for p in s["objects"] if p["object"] > o["object"])
                if covered:
                    continue
                if o["shape"] == "triangle":  # the centre of the bounding box is inside; go lower
                    y += round(0.4 * o["radius"] * t["width"])
                assert np.abs(frame[y, x] - synth.COLOUR_RGB[o["colour"]]).max() <= 40, (vid, s["segment"], o)
                checked += 1
    assert checked >= 12


def test_broken_cases(tmp_path):
    world = render_world(tmp_path, videos=1, seed=0, broken=5, progress=False)
    truth = load_captions(tmp_path)
    assert world.broken_ids == [f"bad_{i:05d}" for i in range(5)]
    kinds = [truth[b]["broken"] for b in world.broken_ids]
    assert kinds == ["empty", "corrupt", "audio_only", "missing", "empty"]
    annotated = {a["video_id"] for a in _annotations(tmp_path)}
    assert set(world.broken_ids) <= annotated
    for b in world.broken_ids:
        path = world.video_path(b)
        with pytest.raises(decode.DecodeError) as excinfo:
            decode.probe(path)
        assert excinfo.value.reason == truth[b]["expected_error"]
        assert str(path) in str(excinfo.value)
    assert not world.video_path("bad_00003").exists()
    assert world.video_path("bad_00000").stat().st_size == 0
    decode.probe(world.video_path("vid_00000"))  # the good one still decodes


def test_cli(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "w"), "--videos", "2", "--seed", "7", "--broken", "1"]) == 0
    annotations = _annotations(tmp_path / "w")
    assert {a["video_id"] for a in annotations} == {"vid_00000", "vid_00001", "bad_00000"}
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--videos", "-1"])
    assert "videos must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as excinfo:
        main(["--help"])
    assert excinfo.value.code == 0
    assert "--broken" in capsys.readouterr().out


def test_mpeg4_codec_same_world(tmp_path, synth_world):
    world = render_world(tmp_path, videos=1, seed=0, codec="mpeg4", progress=False)
    info = decode.probe(world.video_path("vid_00000"))
    assert (info.frames, info.width, info.height) == (30, 128, 128)
    assert load_captions(tmp_path)["vid_00000"] == load_captions(synth_world)["vid_00000"]
    settings = json.loads(world.captions.read_text())["settings"]
    assert settings["codec"] == "mpeg4"
