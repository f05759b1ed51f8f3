"""ffmpeg decoding: selection rules, bit-exactness against a full decode, failure reasons, pool."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataengine.decode import (REASONS, DecodedVideo, DecodeError, clip_indices, contact_sheet, decode_many,
                               decode_video, probe, sha256_file, uniform_indices)

SIZE = 64  # small frames keep the tests fast; the rules do not depend on the size


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-y", *args], check=True)


def full_decode(path: Path, size: int, crop: bool = True) -> np.ndarray:
    """Every frame, through the CLIP-style resize + centre crop written out independently."""
    vf = (f"scale={size}:{size}:force_original_aspect_ratio=increase:flags=bicubic,format=rgb24,"
          f"crop={size}:{size}")
    out = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-vf", vf, "-fps_mode", "vfr",
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"], capture_output=True, check=False).stdout
    return np.frombuffer(out, np.uint8).reshape(-1, size, size, 3)


def native_frames(path: Path) -> np.ndarray:
    info = probe(path)
    out = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "pipe:1"], capture_output=True, check=True).stdout
    return np.frombuffer(out, np.uint8).reshape(-1, info.height, info.width, 3)


@pytest.fixture(scope="module")
def wide_videos(tmp_path_factory) -> dict[str, Path]:
    """Non-square (160x90, 25 fps, 2 s = 50 frames) test patterns in mkv (H.264) and webm (VP9)."""
    folder = tmp_path_factory.mktemp("wide")
    mkv, webm = folder / "testsrc.mkv", folder / "testsrc.webm"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x90:rate=25:duration=2", "-c:v", "libx264",
            "-pix_fmt", "yuv420p", str(mkv))
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x90:rate=25:duration=2", "-c:v", "libvpx-vp9",
            "-b:v", "300k", "-pix_fmt", "yuv420p", str(webm))
    return {"mkv": mkv, "webm": webm}


# --------------------------------------------------------------------------- selection rules

def test_uniform_indices_hand_computed():
    assert uniform_indices(10, 4) == [0, 3, 6, 9]          # linspace 0,3,6,9 exactly
    assert uniform_indices(100, 3) == [0, 50, 99]          # 49.5 rounds half up
    assert uniform_indices(7, 7) == list(range(7))
    assert uniform_indices(5, 1) == [0]
    assert uniform_indices(5, 0) == []


def test_uniform_indices_short_video_repeats():
    assert uniform_indices(3, 5) == [0, 1, 1, 2, 2]        # linspace 0,.5,1,1.5,2
    assert uniform_indices(1, 4) == [0, 0, 0, 0]
    idx = uniform_indices(30, 50)
    assert len(idx) == 50 and idx[0] == 0 and idx[-1] == 29 and set(idx) == set(range(30))
    assert idx == sorted(idx)
    with pytest.raises(DecodeError) as excinfo:
        uniform_indices(0, 5)
    assert excinfo.value.reason == "no_frames"


def test_clip_indices():
    assert clip_indices(30, 3, 4) == [[0, 3, 6, 9], [10, 13, 16, 19], [20, 23, 26, 29]]
    # 31 frames: segments [0,10) [10,20) [20,31)
    assert clip_indices(31, 3, 2) == [[0, 9], [10, 19], [20, 30]]
    # fewer frames than clips: every clip still gets a frame
    assert clip_indices(2, 3, 2) == [[0, 0], [0, 0], [1, 1]]
    assert clip_indices(10, 0, 5) == []
    for total in (1, 5, 29, 30, 61, 1000):
        clips = clip_indices(total, 3, 20)
        assert [len(c) for c in clips] == [20, 20, 20]
        flat = [i for c in clips for i in c]
        assert flat == sorted(flat) and 0 <= flat[0] and flat[-1] <= total - 1
    with pytest.raises(DecodeError) as excinfo:
        clip_indices(0, 3, 20)
    assert excinfo.value.reason == "no_frames"


# --------------------------------------------------------------------------- decoding

def test_decode_shapes_and_dtypes(synth_world):
    video = decode_video(synth_world / "videos" / "vid_00000.mp4", frames=50, clips=3, clip_frames=20, size=SIZE)
    assert isinstance(video, DecodedVideo)
    assert video.frames.shape == (50, SIZE, SIZE, 3) and video.frames.dtype == np.uint8
    assert video.clips.shape == (3, 20, SIZE, SIZE, 3) and video.clips.dtype == np.uint8
    assert video.info.frames == video.probed_frames == 30 and (video.info.width, video.info.height) == (128, 128)
    assert video.indices == uniform_indices(30, 50) and video.clip_indices == clip_indices(30, 3, 20)
    no_clips = decode_video(synth_world / "videos" / "vid_00000.mp4", frames=8, clips=0, clip_frames=20, size=SIZE)
    assert no_clips.clips.shape == (0, 20, SIZE, SIZE, 3) and no_clips.frames.shape == (8, SIZE, SIZE, 3)


def test_decode_equals_full_decode(synth_world):
    for name in ("vid_00000.mp4", "vid_00003.mp4"):
        path = synth_world / "videos" / name
        full = full_decode(path, SIZE)
        assert len(full) == 30
        video = decode_video(path, frames=50, clips=3, clip_frames=20, size=SIZE)
        assert np.array_equal(video.frames, full[video.indices])
        assert np.array_equal(video.clips, full[np.asarray(video.clip_indices)])
        few = decode_video(path, frames=7, clips=2, clip_frames=3, size=SIZE)
        assert few.indices == [0, 5, 10, 15, 19, 24, 29]
        assert np.array_equal(few.frames, full[few.indices])
        assert np.array_equal(few.clips, full[np.asarray(few.clip_indices)])


@pytest.mark.parametrize("container", ["mkv", "webm"])
def test_non_square_containers(wide_videos, container):
    path = wide_videos[container]
    info = probe(path)  # mkv/webm have no nb_frames: counted from packets
    assert (info.frames, info.width, info.height) == (50, 160, 90)
    assert abs(info.fps - 25) < 1e-6 and abs(info.duration - 2.0) < 0.05
    full = full_decode(path, SIZE)
    video = decode_video(path, frames=10, clips=2, clip_frames=4, size=SIZE)
    assert np.array_equal(video.frames, full[video.indices])
    assert np.array_equal(video.clips, full[np.asarray(video.clip_indices)])
    # The crop is CLIP's: shortest side to SIZE, then the centre. Compare with PIL doing the
    # same on the native frame: close to it, and far from a squash or a left-aligned crop.
    native = native_frames(path)[video.indices[3]]
    width = round(160 * SIZE / 90)
    resized = np.asarray(Image.fromarray(native).resize((width, SIZE), Image.Resampling.BICUBIC)).astype(int)
    left = (width - SIZE) // 2
    squashed = np.asarray(Image.fromarray(native).resize((SIZE, SIZE), Image.Resampling.BICUBIC)).astype(int)
    ours = video.frames[3].astype(int)
    # Measured: ~8 mean abs difference at the centre (chroma of yuv420p is interpolated
    # differently by one swscale pass and by PIL after a full-size conversion), 13 one
    # pixel off, 24 two pixels off, ~90 squashed, ~138 cropped at the left.
    errors = {shift: np.abs(ours - resized[:, left + shift:left + shift + SIZE]).mean() for shift in (-2, -1, 0, 1, 2)}
    assert min(errors, key=errors.get) == 0 and errors[0] < 12
    assert errors[0] * 5 < np.abs(ours - squashed).mean()
    assert errors[0] * 5 < np.abs(ours - resized[:, :SIZE]).mean()


def test_container_over_counts_frames(tmp_path):
    # An mp4 with its index first (+faststart) cut at 60%: the header still promises 30 frames
    # but only the first packets can be read. The count is the packets read (both backends);
    # if fewer frames decode than that, the rule is: resample over the frames proven to exist.
    whole = tmp_path / "whole.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=96x96:rate=10:duration=3,noise=alls=40:allf=t",
            "-c:v", "libx264", "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(whole))
    cut = tmp_path / "cut.mp4"
    data = whole.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    readable = probe(cut, backend="pyav").frames
    assert probe(cut, backend="ffprobe").frames == readable < 30
    decodable = full_decode(cut, SIZE)
    assert 2 <= len(decodable) <= readable
    video = decode_video(cut, frames=12, clips=3, clip_frames=4, size=SIZE)
    assert video.probed_frames == readable
    assert 2 <= video.info.frames <= len(decodable)
    assert video.frames.shape == (12, SIZE, SIZE, 3) and video.clips.shape == (3, 4, SIZE, SIZE, 3)
    assert video.indices == uniform_indices(video.info.frames, 12)
    assert video.clip_indices == clip_indices(video.info.frames, 3, 4)
    assert np.array_equal(video.frames, decodable[video.indices])
    assert np.array_equal(video.clips, decodable[np.asarray(video.clip_indices)])


def test_probe_backends_agree(synth_world, wide_videos):
    paths = [synth_world / "videos" / f"vid_{i:05d}.mp4" for i in range(3)] + list(wide_videos.values())
    for path in paths:
        assert probe(path, backend="ffprobe") == probe(path, backend="pyav"), path


def test_broken_inputs_raise_with_reason(broken_videos):
    assert {case.reason for case in broken_videos.values()} <= set(REASONS)
    calls = (lambda p: probe(p, backend="ffprobe"), lambda p: probe(p, backend="pyav"),
             lambda p: decode_video(p, size=SIZE), lambda p: decode_video(p, size=SIZE, probe_backend="ffprobe"))
    for name, (path, reason) in broken_videos.items():
        for call in calls:
            with pytest.raises(DecodeError) as excinfo:
                call(path)
            assert excinfo.value.reason == reason, name
            assert str(path) in str(excinfo.value) and excinfo.value.path == str(path), name


def test_timeout(synth_world):
    with pytest.raises(DecodeError) as excinfo:
        decode_video(synth_world / "videos" / "vid_00000.mp4", size=SIZE, timeout=1e-4)
    assert excinfo.value.reason == "timeout" and "vid_00000.mp4" in str(excinfo.value)


def test_decode_error_reasons_are_closed():
    error = DecodeError("corrupt", "/x/y.mp4", "moov atom not found")
    assert (error.reason, error.path, str(error)) == ("corrupt", "/x/y.mp4", "/x/y.mp4: corrupt: moov atom not found")
    with pytest.raises(ValueError):
        DecodeError("weird")


def test_decode_many_pool_equals_inline(synth_world, broken_videos):
    paths = [synth_world / "videos" / f"vid_{i:05d}.mp4" for i in range(4)]
    paths.insert(1, broken_videos["corrupt"].path)
    paths.append(broken_videos["missing"].path)
    settings = dict(frames=6, clips=2, clip_frames=3, size=SIZE)
    inline = list(decode_many(paths, workers=1, **settings))
    pooled = list(decode_many(paths, workers=2, max_in_flight=2, **settings))
    assert [p for p, _ in inline] == [p for p, _ in pooled] == paths
    # errors come back from the worker processes with reason, path and detail intact
    for (_, a), (_, b) in zip(inline, pooled):
        assert type(a) is type(b)
        if isinstance(a, DecodeError):
            assert (a.reason, str(a)) == (b.reason, str(b))
        else:
            assert np.array_equal(a.frames, b.frames) and np.array_equal(a.clips, b.clips)
            assert a.info == b.info and a.indices == b.indices
    assert [r.reason for _, r in inline if isinstance(r, DecodeError)] == ["corrupt", "missing"]


def test_decode_many_stops_early(synth_world):
    paths = [synth_world / "videos" / f"vid_{i:05d}.mp4" for i in range(6)]
    stream = decode_many(paths, workers=2, frames=2, clips=0, size=SIZE)
    first_path, first = next(stream)
    stream.close()  # cancels queued work, shuts the pool down, does not hang
    assert first_path == paths[0] and first.frames.shape == (2, SIZE, SIZE, 3)


# --------------------------------------------------------------------------- helpers

def test_contact_sheet_is_deterministic_jpeg(synth_world):
    frames = decode_video(synth_world / "videos" / "vid_00001.mp4", frames=8, clips=0, size=SIZE).frames
    sheet = contact_sheet(frames, n=4, height=48)
    assert sheet[:2] == b"\xff\xd8" and sheet[-2:] == b"\xff\xd9"
    assert sheet == contact_sheet(frames.copy(), n=4, height=48)
    image = Image.open(io.BytesIO(sheet))
    assert image.format == "JPEG" and image.size == (4 * 48, 48)
    assert contact_sheet(frames[::-1], n=4, height=48) != sheet
    assert Image.open(io.BytesIO(contact_sheet(frames[:2], n=4))).size == (2 * 64, 64)
    with pytest.raises(ValueError):
        contact_sheet(frames[:0])


def test_sha256_file(tmp_path):
    path = tmp_path / "blob.bin"
    data = np.random.default_rng(0).integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path, chunk=4096) == sha256_file(path)


# --------------------------------------------------------------------------- whose fault

def test_our_failure_is_not_the_inputs(synth_world, monkeypatch):
    # A decoder of ours that delivers nothing on a valid video: a full ffmpeg decode reads it
    # cleanly, so the error says it is ours and shows that command; it is not a DecodeError.
    from dataengine import decode

    path = synth_world / "videos" / "vid_00000.mp4"
    def lost(*args, **kwargs):
        raise decode._SeekMiss("lost")

    monkeypatch.setattr(decode, "_decode_runs", lost)
    monkeypatch.setattr(decode, "_decode_sequential",
                        lambda *a, **k: decode.FrameRead({}, "sequential", 30, 0, "lost"))
    with pytest.raises(decode.InternalDecodeError) as excinfo:
        decode_video(path, size=SIZE, plan="sequential")
    message = str(excinfo.value)
    assert "internal failure" in message and "not the video's fault" in message and str(path) in message
    assert "ffmpeg -i" in message and "-f null" in message
    assert not isinstance(excinfo.value, DecodeError)
    # decode_many does not file it with the input failures: it stops the caller
    with pytest.raises(decode.InternalDecodeError):
        list(decode_many([path], workers=1, size=SIZE, plan="sequential"))


def test_ffmpeg_rejecting_our_command_is_internal(broken_videos, monkeypatch):
    # When ffmpeg rejects the command we built (an option error), even a corrupt input must not
    # be filed as corrupt: the error is ours and shows the command.
    from dataengine import decode

    real = decode.full_decode_command
    monkeypatch.setattr(decode, "full_decode_command",
                        lambda path, stream=None: real(path, stream).global_args("-no_such_option", "1"))
    with pytest.raises(decode.InternalDecodeError) as excinfo:
        decode_video(broken_videos["corrupt"].path, size=SIZE)
    assert "rejected our command" in str(excinfo.value) and "-no_such_option" in str(excinfo.value)
    assert excinfo.value.command[0] == "ffmpeg"


def test_internal_error_crosses_processes(synth_world, monkeypatch):
    import pickle

    from dataengine.decode import InternalDecodeError

    error = InternalDecodeError("/v.mp4", "boom", ["ffmpeg", "-i", "/v.mp4"])
    again = pickle.loads(pickle.dumps(error))
    assert (again.path, again.detail, again.command, str(again)) == (error.path, error.detail, error.command,
                                                                     str(error))


def test_timeout_budget_grows_with_work(synth_world):
    from dataengine.decode import decode_budget, probe

    info = probe(synth_world / "videos" / "vid_00000.mp4")
    small, large = decode_budget(100, info, None), decode_budget(100_000, info, None)
    assert 60 < small < large and large > 10 * (small - 60)
    assert decode_budget(100_000, info, 5.0) == 5.0  # a number is a fixed budget


# --------------------------------------------------------------------------- workers die with the caller

_PARENT = """
import sys
from dataengine.decode import decode_many
paths = sys.argv[1:]
for n, (path, result) in enumerate(decode_many(paths, workers=2, max_in_flight=4, size=64, plan="sequential")):
    print("decoded", n, flush=True)
"""


def _processes_marked(marker: bytes) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_workers_die_with_a_killed_parent(synth_world, tmp_path):
    # A build-like parent decodes through the pool and is killed with -9 mid-run: its workers
    # (and the forkserver and resource tracker) must not outlive it.
    import os
    import select
    import signal
    import time
    import uuid

    marker = f"VLMR_DEATH_TEST={uuid.uuid4().hex}"
    paths = [str(synth_world / "videos" / f"vid_{i % 6:05d}.mp4") for i in range(400)]
    env = dict(os.environ, VLMR_DEATH_TEST=marker.split("=", 1)[1], OMP_NUM_THREADS="1")
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, *paths], stdout=subprocess.PIPE, env=env,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        ready, _, _ = select.select([parent.stdout], [], [], 120)
        assert ready and parent.stdout.readline().startswith(b"decoded")  # the pool is up and working
        children = [pid for pid in _processes_marked(marker.encode()) if pid != parent.pid]
        assert len(children) >= 2  # two workers at least (plus forkserver, resource tracker)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _processes_marked(marker.encode()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_marked(marker.encode()) == []
    finally:
        parent.kill()
        for pid in _processes_marked(marker.encode()):  # never leave them behind, even on failure
            os.kill(pid, signal.SIGKILL)
