"""`vlmr build-shards` end to end on the synthetic world: order, failures, resume, readability."""

import csv
import errno
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from dataengine import build, features, pack, schema

FRAMES, CLIPS, CLIP_FRAMES = 6, 3, 2


def run_build(world, out, cache, **overrides):
    settings = dict(annotations=[str(world / "annotations.json")], videos=str(world / "videos"), out=str(out),
                    frames=FRAMES, clips=CLIPS, clip_frames=CLIP_FRAMES, maxcount=8, workers=1, cache=str(cache))
    return build.build(build.BuildConfig(**{**settings, **overrides}))


def stream(out):
    """(stage, key, json) of every sample in stream order, from the tars themselves."""
    manifest = schema.Manifest.load(out)
    rows = []
    for stage in manifest.stages:
        for shard in stage.shards:
            with tarfile.open(out / shard.url) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(".json"):
                        rows.append((stage.name, member.name[:-5], json.loads(tar.extractfile(member).read())))
    return manifest, rows


@pytest.fixture(scope="module")
def built(synth_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "shards"
    cache = tmp_path_factory.mktemp("cache")
    summary = run_build(synth_world, out, cache)
    return out, cache, summary


def test_curriculum_order_and_sample_contents(built, synth_world):
    out, _, summary = built
    manifest, rows = stream(out)
    annotations = json.loads((synth_world / "annotations.json").read_text())
    assert manifest.samples == len(rows) == len(annotations) == sum(summary.samples.values())
    assert [s.name for s in manifest.stages] == ["easy", "hard"]
    tokens = [r[2]["answer_tokens"] for r in rows]
    assert tokens == sorted(tokens)
    easy = [t for stage, _, j in rows if stage == "easy" for t in [j["answer_tokens"]]]
    hard = [j["answer_tokens"] for stage, _, j in rows if stage == "hard"]
    assert max(easy) <= min(hard)
    assert len(easy) == round(0.65 * len(rows))
    first = rows[0][2]
    assert set(first) >= {"id", "video_id", "source", "conversations", "answer_tokens", "stage"}
    assert first["conversations"][0]["value"].startswith("<video>")
    enc = features.ClipEncoder("tiny")
    p, d = enc.vision.num_patches, enc.vision.hidden_size
    shard = manifest.stages[0].shards[0]
    with tarfile.open(out / shard.url) as tar:
        key = shard.first_key
        feat = np.load(io.BytesIO(tar.extractfile(f"{key}.feat.npy").read()), allow_pickle=False)
        clips = np.load(io.BytesIO(tar.extractfile(f"{key}.clips.npy").read()), allow_pickle=False)
        thumb = tar.extractfile(f"{key}.thumb.jpg").read()
    assert feat.shape == (FRAMES + p, d) and feat.dtype == np.float16 and np.isfinite(feat).all()
    assert clips.shape == (CLIPS, CLIP_FRAMES + p, d) and clips.dtype == np.float16
    assert thumb[:2] == b"\xff\xd8"
    # manifest bookkeeping agrees with the tars
    for stage in manifest.stages:
        keys = [k for st, k, _ in rows if st == stage.name]
        assert all(s.samples <= 8 for s in stage.shards) and sum(s.samples for s in stage.shards) == len(keys)
        assert stage.shards[0].first_key == keys[0] and stage.shards[-1].last_key == keys[-1]
    assert manifest.settings["frames"] == FRAMES and manifest.settings["encoder"] == "tiny"
    assert (out / "failures.jsonl").read_text() == ""


def test_rerun_encodes_nothing_and_is_byte_identical(built, synth_world):
    out, cache, first = built
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    manifest_before = (out / "manifest.json").read_bytes()
    again = run_build(synth_world, out, cache)
    assert first.videos_encoded == first.videos_ok > 0
    assert again.videos_encoded == 0 and again.videos_ok == first.videos_ok
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before
    assert (out / "manifest.json").read_bytes() == manifest_before


def test_crash_mid_encode_then_resume(synth_world, tmp_path, monkeypatch, built):
    out, cache = tmp_path / "shards", tmp_path / "cache"
    real_put = features.FeatureCache.put
    calls = {"n": 0}

    def crashing_put(self, key, value):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        real_put(self, key, value)

    monkeypatch.setattr(features.FeatureCache, "put", crashing_put)
    with pytest.raises(KeyboardInterrupt):
        run_build(synth_world, out, cache)
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(features.FeatureCache, "put", real_put)
    # debris a SIGKILL could leave: a temp shard and a tar from an older, larger build
    out.mkdir(exist_ok=True)
    (out / ".easy-000000.tar.abc.tmp").write_bytes(b"partial")
    (out / "hard-000099.tar").write_bytes(b"stale")
    resumed = run_build(synth_world, out, cache)
    assert resumed.videos_encoded == resumed.videos_ok - 2  # two were cached before the crash
    clean = built[0]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        sorted(p.name for p in clean.iterdir() if not p.name.startswith("."))
    for p in clean.glob("*.tar"):
        assert (out / p.name).read_bytes() == p.read_bytes()


def test_broken_videos_are_recorded_and_skipped(synth_world, broken_videos, tmp_path, built):
    videos = tmp_path / "videos"
    videos.mkdir()
    for p in (synth_world / "videos").iterdir():
        (videos / p.name).symlink_to(p)
    annotations = json.loads((synth_world / "annotations.json").read_text())
    bad = {}
    for name, (path, reason) in broken_videos.items():
        vid = f"broken_{name}"
        if path.exists():
            (videos / (vid + path.suffix)).symlink_to(path)
        bad[vid] = reason
        annotations += [{"video_id": vid, "q": "What happens?", "a": "Nothing."}] * 2
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps(annotations))
    summary = run_build(synth_world, tmp_path / "shards", built[1], annotations=[str(ann)], videos=str(videos))
    failures = [json.loads(line) for line in (tmp_path / "shards" / "failures.jsonl").read_text().splitlines()]
    assert {f["video_id"] for f in failures} == set(bad)
    assert {f["video_id"]: f["reason"] for f in failures} == bad
    assert all(f["samples"] == 2 and f["message"] for f in failures)
    manifest = schema.Manifest.load(tmp_path / "shards")
    assert manifest.samples == len(annotations) - 2 * len(bad)
    assert manifest.failures == len(bad) and summary.samples_dropped == 2 * len(bad)


def test_other_formats_clips_off_and_token_split(synth_world, tmp_path, built):
    captions = json.loads((synth_world / "annotations.json").read_text())
    vids = sorted({a["video_id"] for a in captions})[:2]
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([{"id": f"l{i}", "video": f"{v}.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat is shown?"}, {"from": "gpt", "value": "Shapes. " * (i + 1)}]}
        for i, v in enumerate(vids)]))
    nextqa = tmp_path / "nextqa.csv"
    with open(nextqa, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "question", "answer", "qid", "type", "a0", "a1", "a2", "a3", "a4"])
        w.writerow([vids[0], "what moves first", "1", "3", "TN", "nothing", "a shape", "a car", "a dog", "rain"])
    out = tmp_path / "shards"
    run_build(synth_world, out, built[1], annotations=[str(llava), str(nextqa)], clips=0, split_at=2)
    manifest, rows = stream(out)
    assert manifest.samples == 3
    assert all(j["answer_tokens"] <= 2 for st, _, j in rows if st == "easy")
    assert all(j["answer_tokens"] > 2 for st, _, j in rows if st == "hard")
    for stage in manifest.stages:
        for shard in stage.shards:
            with tarfile.open(out / shard.url) as tar:
                assert not [n for n in tar.getnames() if n.endswith("clips.npy")]
    assert set(manifest.settings["annotation_formats"].values()) == {"llava", "nextqa"}


def test_annotations_from_a_hugging_face_dataset(synth_world, tmp_path, built):
    datasets = pytest.importorskip("datasets")
    rows = json.loads((synth_world / "annotations.json").read_text())[:5]
    table = datasets.Dataset.from_dict({"video_id": [r["video_id"] for r in rows],
                                        "question": [r["q"] for r in rows], "answer": [r["a"] for r in rows]})
    table.to_parquet(str(tmp_path / "qa.parquet"))
    out = tmp_path / "shards"
    run_build(synth_world, out, built[1], annotations=[str(tmp_path / "qa.parquet")])
    manifest, stored = stream(out)
    assert manifest.samples == 5 and manifest.settings["annotation_formats"] == {str(tmp_path / "qa.parquet"): "hf-parquet"}
    assert sorted(j["conversations"][1]["value"] for _, _, j in stored) == sorted(r["a"] for r in rows)


def video2dataset_shards(world, folder):
    """The synthetic videos as video2dataset writes them: NNNNN.tar of KEY.mp4, KEY.txt, KEY.json."""
    import webdataset

    from dataengine.synth import load_captions

    captions = load_captions(world)
    folder.mkdir()
    videos = sorted((world / "videos").iterdir())
    for shard, part in enumerate([videos[:4], videos[4:]]):
        with webdataset.TarWriter(str(folder / f"{shard:05d}.tar")) as tar:
            for i, path in enumerate(part):
                key = f"{shard:05d}{i:04d}"
                caption = " ".join(seg["caption"] for seg in captions[path.stem]["segments"])
                tar.write({"__key__": key, "mp4": path.read_bytes(), "txt": caption,
                           "json": {"key": key, "caption": caption, "status": "success", "url": str(path)}})
    (folder / "00000_stats.json").write_text("{}")  # video2dataset writes these beside the tars
    return {f"{s:05d}{i:04d}": " ".join(seg["caption"] for seg in captions[p.stem]["segments"])
            for s, part in enumerate([videos[:4], videos[4:]]) for i, p in enumerate(part)}


def test_videos_from_video2dataset_shards(synth_world, tmp_path, built):
    expected = video2dataset_shards(synth_world, tmp_path / "v2d")
    out = tmp_path / "shards"
    summary = build.build(build.BuildConfig(videos=str(tmp_path / "v2d"), out=str(out), frames=FRAMES, clips=CLIPS,
                                            clip_frames=CLIP_FRAMES, workers=1, cache=str(built[1])))
    assert summary.videos_encoded == 0  # the same bytes as the folder's videos: all from the cache
    manifest, rows = stream(out)
    assert manifest.samples == len(expected) == 6
    assert {j["video_id"]: j["conversations"][1]["value"] for _, _, j in rows} == \
        {f"{key}.mp4": caption for key, caption in expected.items()}
    assert not (out / build.STAGED_VIDEOS).exists()  # unpacked videos go when the build is done
    # with annotations that name the shards' keys
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"video_id": key, "q": "What is shown?", "a": "Shapes."} for key in expected]))
    run_build(synth_world, tmp_path / "shards2", built[1], annotations=[str(ann)], videos=str(tmp_path / "v2d" / "00000.tar"))
    assert schema.Manifest.load(tmp_path / "shards2").samples == 4  # one shard given: its four videos
    # shards without captions and no annotations: nothing to make samples from, said in one line
    bare = tmp_path / "bare.tar"
    with tarfile.open(tmp_path / "v2d" / "00000.tar") as src, tarfile.open(bare, "w") as dst:
        for member in src.getmembers():
            if member.name.endswith(".mp4"):
                dst.addfile(member, src.extractfile(member))
    with pytest.raises(build.ingest.IngestError, match="no --annotations given, and its shards hold no captions"):
        build.build(build.BuildConfig(videos=str(bare), out=str(tmp_path / "shards3"), workers=1, cache=str(built[1])))


def test_video_shard_members_never_unpack_outside(synth_world, tmp_path):
    video = sorted((synth_world / "videos").iterdir())[0].read_bytes()
    for i, name in enumerate(["../escaped", "sub/../../escaped", "/tmp/escaped-abs"]):
        shards = tmp_path / f"v2d{i}"
        shards.mkdir()
        with tarfile.open(shards / "00000.tar", "w") as tar:
            for member, data in [(f"{name}.mp4", video), (f"{name}.txt", b"a caption")]:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        out = tmp_path / f"shards{i}"
        with pytest.raises(build.ingest.IngestError, match="would be unpacked outside"):
            build.build(build.BuildConfig(videos=str(shards), out=str(out), workers=1, cache=str(tmp_path / "cache")))
    assert not list(tmp_path.rglob("escaped*")) and not Path("/tmp/escaped-abs.mp4").exists()


def test_readable_by_webdataset_tar_and_datasets(built):
    out = built[0]
    manifest = schema.Manifest.load(out)
    urls = [str(out / s.url) for st in manifest.stages for s in st.shards]
    import webdataset as wds

    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(samples) == manifest.samples
    assert samples[0]["feat.npy"].dtype == np.float16 and isinstance(samples[0]["json"], dict)
    listing = subprocess.run(["tar", "tf", urls[0]], capture_output=True, text=True, check=True).stdout.split()
    assert listing[0].endswith(".json") and len(listing) == 4 * manifest.stages[0].shards[0].samples
    from datasets import load_dataset

    ds = load_dataset("webdataset", data_files={"train": urls}, split="train", streaming=True)
    rows = list(ds)
    assert len(rows) == manifest.samples and "json" in rows[0]


def test_config_errors_are_collected():
    with pytest.raises(Exception) as info:
        build.BuildConfig(annotations=[], videos="", frames=0, easy_fraction=0.5, split_at=3)
    text = str(info.value)
    assert "--annotations" in text and "--videos" in text and "--frames" in text and "not both" in text


@pytest.mark.slow
def test_two_ranks_build_the_same_shards(synth_world, tmp_path, built):
    out = tmp_path / "shards"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dataengine.build", "--annotations", str(synth_world / "annotations.json"),
           "--videos", str(synth_world / "videos"), "--out", str(out), "--frames", str(FRAMES),
           "--clips", str(CLIPS), "--clip-frames", str(CLIP_FRAMES), "--maxcount", "8", "--workers", "1",
           "--cache", str(tmp_path / "cache")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "built" in result.stdout
    # Same samples in the same order; features agree up to thread-count float noise.
    clean_manifest, clean_rows = stream(built[0])
    manifest, rows = stream(out)
    assert [(st, k) for st, k, _ in rows] == [(st, k) for st, k, _ in clean_rows]
    assert [j for _, _, j in rows] == [j for _, _, j in clean_rows]
    shard = manifest.stages[0].shards[0]
    with tarfile.open(out / shard.url) as a, tarfile.open(built[0] / shard.url) as b:
        name = f"{shard.first_key}.feat.npy"
        fa = np.load(io.BytesIO(a.extractfile(name).read()), allow_pickle=False).astype(np.float32)
        fb = np.load(io.BytesIO(b.extractfile(name).read()), allow_pickle=False).astype(np.float32)
    np.testing.assert_allclose(fa, fb, atol=1e-2)
    assert not list(out.glob(".outcomes-*"))
    # both ranks encoded a share: the cache holds every video exactly once
    assert len(list((tmp_path / "cache").glob("*/*/feat.npy"))) == len(list((synth_world / "videos").iterdir()))


# ----------------------------------------------------------------------------- issue 16: nothing lost, nothing let in

def cli_args(world, out, cache, *extra):
    return ["--annotations", str(world / "annotations.json"), "--videos", str(world / "videos"), "--out", str(out),
            "--frames", str(FRAMES), "--clips", str(CLIPS), "--clip-frames", str(CLIP_FRAMES), "--workers", "1",
            "--cache", str(cache), *extra]


# Build A: waits before packing until the test lets it go, so that build B runs while A holds the folder.
PAUSED_BUILD = """
import pathlib, sys, time
from dataengine import build
gate = pathlib.Path(sys.argv[1])
real = build.pack_samples
def paused(*args, **kwargs):
    (gate.parent / "packing").touch()
    while not gate.exists():
        time.sleep(0.05)
    return real(*args, **kwargs)
build.pack_samples = paused
sys.exit(build.main(sys.argv[2:]))
"""


def test_two_builds_into_one_folder_the_second_is_refused(synth_world, tmp_path, built):
    from dataengine import inspection, lock
    from dataengine.verify import verify

    out, gate = tmp_path / "shards", tmp_path / "go"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-c", PAUSED_BUILD, str(gate),
                              *cli_args(synth_world, out, built[1], "--maxcount", "8")],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "packing").exists():
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first build never reached pack"
            time.sleep(0.1)
        # the second build, other settings (the case: its tars would replace the first's)
        second = subprocess.run([sys.executable, "-m", "dataengine.build",
                                 *cli_args(synth_world, out, built[1], "--maxcount", "3")],
                                env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 1
        error = second.stderr.strip().splitlines()[-1]
        assert error.startswith(f"vlmr build-shards: error: {out} is being written by 'build-shards' "
                                f"(pid {first.pid} on host "), error
        assert str(out / lock.LOCK_NAME) in error
    finally:
        gate.touch()
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    result = verify(inspection.open_shard_set(out))
    assert result.ok, result.problems
    assert result.samples == schema.Manifest.load(out).samples == built[2].samples["easy"] + built[2].samples["hard"]
    assert schema.Manifest.load(out).settings["maxcount"] == 8
    assert not (out / lock.LOCK_NAME).exists()


def test_a_lock_left_by_a_killed_build_is_taken_over(synth_world, tmp_path, built, caplog):
    from dataengine import lock

    out = tmp_path / "shards"
    killed = subprocess.Popen([sys.executable, "-c", PAUSED_BUILD, str(tmp_path / "never"),
                               *cli_args(synth_world, out, built[1], "--maxcount", "8")],
                              env=dict(os.environ, OMP_NUM_THREADS="1"), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (tmp_path / "packing").exists():
        assert killed.poll() is None and time.monotonic() < deadline, "the build never reached pack"
        time.sleep(0.1)
    killed.kill()  # SIGKILL while it holds the folder: nothing is cleaned up
    killed.wait()
    assert json.loads((out / lock.LOCK_NAME).read_text())["pid"] == killed.pid
    with caplog.at_level(logging.WARNING, logger="dataengine.lock"):
        run_build(synth_world, out, built[1])
    assert f"pid {killed.pid}" in caplog.text and "no longer running" in caplog.text
    assert not (out / lock.LOCK_NAME).exists()
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == {p.name: p.read_bytes() for p in built[0].glob("*.tar")}


def test_ids_that_clean_to_one_key_stay_apart_in_the_tars(synth_world, tmp_path, built):
    video = sorted(p.name for p in (synth_world / "videos").iterdir())[0]
    ids = ["x.1", "x_1", "y/1", "y 1"]
    ann = tmp_path / "ids.json"
    ann.write_text(json.dumps([{"id": rid, "video": video, "conversations": [
        {"from": "human", "value": "<video>\nWhat is shown?"}, {"from": "gpt", "value": f"Answer {rid}."}]}
        for rid in ids]))
    out = tmp_path / "shards"
    run_build(synth_world, out, built[1], annotations=[str(ann)])
    _, rows = stream(out)
    keys = [key for _, key, _ in rows]
    assert len(keys) == len(set(keys)) == 4, keys
    assert sorted(j["id"] for _, _, j in rows) == sorted(f"ids-{rid}" for rid in ids)
    for _, key, data in rows:
        assert key == schema.sample_key(data["id"])


def test_a_byte_that_is_not_utf8_is_skipped_and_counted(synth_world, tmp_path, built, capsys):
    data = (synth_world / "annotations.json").read_bytes()
    ann = tmp_path / "annotations.json"
    ann.write_bytes(data.replace(b'"a": "', b'"a": "\xff', 1))
    out = tmp_path / "shards"
    args = cli_args(synth_world, out, built[1])
    args[1] = str(ann)
    assert build.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"vlmr build-shards: error: {ann}: record 0 (vcg): line ") and "byte 0xff is not UTF-8" in err
    assert build.main(args + ["--on-error", "skip"]) == 0
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["record"], f["reason"]) for f in failures] == [(0, "not_utf8")]
    assert schema.Manifest.load(out).samples == len(json.loads(data)) - 1
    assert "1 malformed records skipped" in capsys.readouterr().out


def test_an_internal_decoder_failure_stops_the_build_and_is_not_filed(synth_world, tmp_path, monkeypatch, capsys):
    """The decoder's own failure is never blamed on the video: no failures.jsonl line, no manifest."""
    from dataengine import decode

    def internal(paths, **kwargs):
        for path in paths:
            raise decode.InternalDecodeError(path, "ffmpeg rejected our command", ["ffmpeg", "-bad"])
        yield from ()

    monkeypatch.setattr(decode, "decode_many", internal)
    out = tmp_path / "shards"
    with pytest.raises(decode.InternalDecodeError):
        run_build(synth_world, out, tmp_path / "cache")
    assert not (out / schema.FAILURES_NAME).exists() and not (out / schema.MANIFEST_NAME).exists()
    assert build.main(cli_args(synth_world, out, tmp_path / "cache")) == 3  # the command: one line, its own status
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vlmr build-shards: error: internal failure in the decoder (not the video's fault)")
    assert "command: ffmpeg -bad" in err


def test_the_decoder_version_is_part_of_the_feature_cache_key():
    from dataengine import decode

    settings = build.decode_settings(build.BuildConfig(annotations=["a"], videos="v"), "enc", 64)
    assert settings["decoder"] == decode.DECODER_VERSION


def _no_long_work(monkeypatch):
    """Decoding, encoding or packing would mean the outputs were not checked first."""
    from dataengine import decode

    def refuse(*args, **kwargs):
        raise AssertionError("long work started before the outputs were checked")

    monkeypatch.setattr(decode, "decode_many", refuse)
    monkeypatch.setattr(build, "pack_samples", refuse)
    monkeypatch.setattr(build.ingest, "read_all", refuse)


@pytest.mark.parametrize("case", ["out_parent_is_a_file", "out_is_a_file", "cache_parent_is_a_file"])
def test_unusable_outputs_are_one_line_before_any_work(synth_world, tmp_path, monkeypatch, capsys, case):
    _no_long_work(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out, cache = tmp_path / "shards", tmp_path / "cache"
    if case == "out_parent_is_a_file":
        out = blocker / "shards"
    elif case == "out_is_a_file":
        out = blocker
    else:
        cache = blocker / "cache"
    assert build.main(cli_args(synth_world, out, cache)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vlmr build-shards: error: "), err
    assert str(blocker) in err and "Traceback" not in err


def test_an_unwritable_out_is_one_line_before_any_work(synth_world, tmp_path, monkeypatch, capsys):
    _no_long_work(monkeypatch)
    out = tmp_path / "shards"
    out.mkdir()
    if os.geteuid() != 0:
        out.chmod(0o555)
    else:  # root writes anywhere: make the folder refuse files as a read-only one would
        import types

        def refuse(*args, dir=None, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))

        monkeypatch.setattr(build, "tempfile", types.SimpleNamespace(mkstemp=refuse))
    try:
        assert build.main(cli_args(synth_world, out, tmp_path / "cache")) == 1
    finally:
        out.chmod(0o755)
    err = capsys.readouterr().err
    assert err == f"vlmr build-shards: error: {out}: --out: cannot write here (Permission denied)\n"


@pytest.mark.parametrize("where", ["pack", "cache"])
def test_a_full_disk_is_one_line_naming_the_path(synth_world, tmp_path, monkeypatch, capsys, built, where):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a failed write raises it: no file name

    if where == "pack":
        monkeypatch.setattr(pack._HashingFile, "write", full)
        cache = built[1]
    else:
        monkeypatch.setattr(features.FeatureCache, "put", full)
        cache = tmp_path / "cache"
    out = tmp_path / "shards"
    assert build.main(cli_args(synth_world, out, cache)) == 1
    err = capsys.readouterr().err  # progress bars above, then one line
    named = out if where == "pack" else cache
    assert err.endswith(f"\nvlmr build-shards: error: {named}: No space left on device\n"), err[-500:]
    assert "Traceback" not in err
