"""The decoder on varied real-world streams at the paper's settings (50 frames + 3 clips x 20).

Every stream is made once per session with ffmpeg (``testsrc2``: moving content, so codecs
really predict) and checked three ways:

* the frame count equals the frames a full ``ffmpeg`` decode of the file outputs;
* the decoded frames at the defaults' indices are bit-identical, in the decoder's own pixel
  format, to that full decode at the same indices, on every plan (auto, forced seek,
  sequential). The full decode is a different program (the system ffmpeg, not PyAV's libav),
  so this checks the frame identity, not one library against itself; no tolerance is needed
  on any plan;
* ``decode_video`` at the defaults gives the asked shapes and files nothing as corrupt.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from dataengine import seekplan
from dataengine.decode import (DecodeError, clip_indices, decode_frames, decode_video, probe, uniform_indices)

FRAMES, CLIPS, CLIP_FRAMES = 50, 3, 20  # the build's defaults (the paper's settings)
SRC = "testsrc2=size=96x54:rate=25"


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-y", *args], check=True)


def _source(seconds: float, spec: str = SRC) -> list[str]:
    return ["-f", "lavfi", "-i", f"{spec}:duration={seconds}"]


X264 = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "50"]

# name -> (file name, ffmpeg arguments after -y, seek plan exact on it?)
STREAMS: dict[str, tuple[str, list[str], bool]] = {
    "1_frame": ("one.mp4", [*_source(0.04), *X264], True),
    "10_frames": ("ten.mp4", [*_source(0.4), *X264], True),
    "250_frames": ("h264.mp4", [*_source(10), *X264], True),
    "h264_mkv": ("h264.mkv", [*_source(10), *X264], True),
    # keyint 47 (not a multiple of the mini-GOP) makes x265's default open GOP show: leading pictures
    "hevc_mp4": ("hevc.mp4", [*_source(10), "-c:v", "libx265", "-x265-params",
                              "log-level=none:keyint=47:scenecut=0"], False),
    "vp9_webm": ("vp9.webm", [*_source(10), "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8",
                              "-g", "50"], True),
    "av1_mkv": ("av1.mkv", [*_source(6), "-c:v", "libaom-av1", "-cpu-used", "8", "-g", "50"], True),
    "mpeg4_avi": ("mpeg4.avi", [*_source(10), "-c:v", "mpeg4", "-bf", "2", "-g", "50", "-q:v", "5"], False),
    "mjpeg_mov": ("mjpeg.mov", [*_source(6), "-c:v", "mjpeg", "-q:v", "5"], True),
    "vfr": ("vfr.mp4", [*_source(12), "-vf", "select='not(eq(mod(n\\,5)\\,1))*not(eq(mod(n\\,7)\\,3))'",
                        "-fps_mode", "vfr", *X264], True),
    "odd_641x273": ("odd.mp4", [*_source(5, "testsrc2=size=641x273:rate=25"), "-c:v", "libx264",
                                "-pix_fmt", "yuv444p", "-g", "50"], True),
    "sar_2_1": ("sar.mp4", [*_source(10, "testsrc2=size=48x54:rate=25"), "-vf", "setsar=2/1", *X264], True),
    "10_bit": ("tenbit.mp4", [*_source(10), "-c:v", "libx264", "-pix_fmt", "yuv420p10le", "-g", "50"], True),
    "audio_first": ("audio_first.mp4", ["-f", "lavfi", "-i", "sine=frequency=440:duration=10", *_source(10),
                                        "-map", "0:a", "-map", "1:v", *X264, "-c:a", "aac"], True),
    "gop_600": ("gop600.mp4", [*_source(36), "-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "600",
                               "-keyint_min", "600", "-sc_threshold", "0"], True),
    "open_gop": ("opengop.mp4", [*_source(10), *X264, "-x264-params",
                                 "open-gop=1:keyint=47:min-keyint=47:scenecut=0"], False),
    "long_2min": ("long.mp4", [*_source(130, "testsrc2=size=64x36:rate=25"), "-c:v", "libx264",
                               "-preset", "veryfast", "-pix_fmt", "yuv420p", "-g", "50"], True),
}
DERIVED = {  # made from another stream by remuxing: (source stream, ffmpeg arguments around it, exact)
    "rotated_90": ("250_frames", "rotated.mp4", ["-c", "copy", "-metadata:s:v:0", "rotate=90"], True),
    "edit_list_cut": ("250_frames", "cut.mp4", ["-c", "copy"], True),  # -ss 1.3 before -i: a cut mid-GOP
    "rotated_1_frame": ("1_frame", "rotated_one.mp4", ["-c", "copy", "-metadata:s:v:0", "rotate=270"], True),
}


@pytest.fixture(scope="module")
def streams(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("streams")
    made: dict[str, Path] = {}
    for name, (file, args, _) in STREAMS.items():
        made[name] = folder / file
        _ffmpeg(*args, str(made[name]))
    for name, (source, file, args, _) in DERIVED.items():
        made[name] = folder / file
        seek = ["-ss", "1.3"] if name == "edit_list_cut" else []
        _ffmpeg(*seek, "-i", str(made[source]), *args, str(made[name]))
    return made


def seek_exact(name: str) -> bool:
    return (STREAMS.get(name) or DERIVED[name])[-1]


def native_bytes(frame) -> bytes:
    """A decoded frame's pixels in its own format, planes one after another (ffmpeg rawvideo layout)."""
    sample = 2 if frame.format.components[0].bits > 8 else 1
    out = []
    for plane in frame.planes:
        rows = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:plane.height, :plane.width * sample]
        out.append(rows.tobytes())
    return b"".join(out)


def full_decode(path: Path, pix_fmt: str) -> list[bytes]:
    """Every frame the system ffmpeg outputs, stored orientation, in ``pix_fmt`` (the decoder's own)."""
    out = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-noautorotate", "-i", str(path), "-map", "0:v:0",
                          "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", pix_fmt, "pipe:1"],
                         capture_output=True, check=True).stdout
    return out


def defaults_wanted(total: int) -> list[int]:
    return sorted(set(uniform_indices(total, FRAMES)).union(*clip_indices(total, CLIPS, CLIP_FRAMES)))


ALL = list(STREAMS) + list(DERIVED)


@pytest.mark.parametrize("name", ALL)
def test_frames_equal_a_full_decode(streams, name):
    path = streams[name]
    info = probe(path)
    first = decode_frames(path, [0], plan="sequential").frames[0]
    pix_fmt = first.format.name
    raw = full_decode(path, pix_fmt)
    frame_bytes = len(native_bytes(first))
    assert len(raw) % frame_bytes == 0
    total = len(raw) // frame_bytes
    assert info.frames == total, f"{name}: index says {info.frames} frames, a full decode outputs {total}"
    assert probe(path, backend="ffprobe") == info
    wanted = defaults_wanted(total)
    plans = {}
    for plan in ("auto", "seek", "sequential"):
        read = decode_frames(path, wanted, convert=native_bytes, plan=plan)
        plans[plan] = read.plan
        assert sorted(read.frames) == wanted, (name, plan)
        for n in wanted:
            assert read.frames[n] == raw[n * frame_bytes:(n + 1) * frame_bytes], (name, plan, n)
    # Seeking is used exactly where it is frame-exact, and falls back elsewhere.
    assert plans["seek"] == ("seek" if seek_exact(name) else "sequential"), (name, plans)
    assert plans["sequential"] == "sequential"


@pytest.mark.parametrize("name", ALL)
def test_defaults_shapes_and_no_false_corrupt(streams, name):
    video = decode_video(streams[name], frames=FRAMES, clips=CLIPS, clip_frames=CLIP_FRAMES, size=32)
    assert video.frames.shape == (FRAMES, 32, 32, 3) and video.clips.shape == (CLIPS, CLIP_FRAMES, 32, 32, 3)
    assert video.info.frames == video.probed_frames
    assert video.indices == uniform_indices(video.info.frames, FRAMES)


def test_lengths_and_counts(streams):
    counts = {name: probe(streams[name]).frames for name in ("1_frame", "10_frames", "250_frames", "long_2min")}
    assert counts["1_frame"] == 1 and counts["10_frames"] == 10 and counts["250_frames"] == 250
    assert counts["long_2min"] == 130 * 25
    assert probe(streams["long_2min"]).duration >= 120


def test_long_video_is_cheap(streams):
    # 110 frames of a 3,250-frame video with 2 s GOPs touch most GOPs; the seek plan decodes
    # each from its keyframe to the last wanted frame only: 1,812 packets when measured.
    video = decode_video(streams["long_2min"], size=32)
    assert video.plan == "seek" and video.decoded_packets < 0.65 * video.info.frames
    sequential = decode_video(streams["long_2min"], size=32, plan="sequential")
    assert sequential.plan == "sequential" and sequential.decoded_packets > 0.99 * 3250
    assert np.array_equal(video.frames, sequential.frames) and np.array_equal(video.clips, sequential.clips)


def test_edit_list_cut_counts_shown_frames(streams):
    import av

    path = streams["edit_list_cut"]
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = [p for p in container.demux(stream) if p.size]
        container_count = stream.frames
    assert any(p.is_discard for p in packets)  # the cut starts mid-GOP: references are kept, not shown
    assert container_count == len(packets) > probe(path).frames == sum(not p.is_discard for p in packets)


def test_rotation_upright_as_players_show(streams):
    path, plain = streams["rotated_90"], streams["250_frames"]
    info = probe(path)
    assert (info.rotation, info.width, info.height, info.stored_width, info.stored_height) == (90, 54, 96, 96, 54)
    ours = decode_video(path, frames=5, clips=0, size=32).frames.astype(int)
    # The system ffmpeg's own autorotation, then the same CLIP resize and crop.
    vf = "scale=32:32:force_original_aspect_ratio=increase:flags=bicubic,format=rgb24,crop=32:32"
    cli = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-vf", vf, "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "pipe:1"], capture_output=True, check=True).stdout
    cli = np.frombuffer(cli, np.uint8).reshape(-1, 32, 32, 3).astype(int)[uniform_indices(250, 5)]
    unrotated = decode_video(plain, frames=5, clips=0, size=32).frames.astype(int)
    # The same filters as ffmpeg's autorotation + scale: equal bit for bit; turned the wrong
    # way or not at all, the frames differ by ~150 and ~115 on average.
    assert np.array_equal(ours, cli)
    assert np.abs(np.rot90(ours, 2, axes=(1, 2)) - cli).mean() > 50
    assert unrotated.shape == ours.shape and np.abs(unrotated - cli).mean() > 50


def test_rotation_of_a_one_frame_video(streams):
    # Its only frame stays in the decoder until it is flushed; the rotation must still be read.
    info = probe(streams["rotated_1_frame"])
    assert (info.frames, info.rotation, info.width, info.height) == (1, 270, 54, 96)
    assert probe(streams["rotated_1_frame"], backend="ffprobe") == info
    ours = decode_video(streams["rotated_1_frame"], frames=1, clips=0, size=32).frames
    vf = "scale=32:32:force_original_aspect_ratio=increase:flags=bicubic,format=rgb24,crop=32:32"
    cli = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(streams["rotated_1_frame"]), "-vf", vf,
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"], capture_output=True, check=True).stdout
    assert np.array_equal(ours, np.frombuffer(cli, np.uint8).reshape(1, 32, 32, 3))  # turned the other way


def test_non_square_pixels_are_stretched(streams):
    path = streams["sar_2_1"]
    info = probe(path)
    assert (info.stored_width, info.stored_height, info.width, info.height) == (48, 54, 96, 54)
    assert info.sar == 2
    ours = decode_video(path, frames=5, clips=0, size=32).frames.astype(int)
    vf = ("scale=iw*sar:ih:flags=bicubic,setsar=1,"
          "scale=32:32:force_original_aspect_ratio=increase:flags=bicubic,format=rgb24,crop=32:32")
    cli = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-vf", vf, "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "pipe:1"], capture_output=True, check=True).stdout
    cli = np.frombuffer(cli, np.uint8).reshape(-1, 32, 32, 3).astype(int)[uniform_indices(250, 5)]
    stored = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-vf", vf.split(",", 2)[2],
                             "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"], capture_output=True, check=True).stdout
    stored = np.frombuffer(stored, np.uint8).reshape(-1, 32, 32, 3).astype(int)[uniform_indices(250, 5)]
    error = np.abs(ours - cli).mean()
    assert error < 6 and np.abs(stored - cli).mean() > 3 * error  # taken as stored, the crop differs


def test_seek_blockers():
    closed = seekplan.PacketIndex(pts=[0, 3, 1, 2, 4, 7, 5, 6], dts=list(range(8)),
                                  key=[True, False, False, False, True, False, False, False], discard=[False] * 8)
    assert seekplan.seek_blocker(closed) is None and closed.shown == [0, 2, 3, 1, 4, 6, 7, 5]
    # frame 6 (pts 6, packet 7) needs the keyframe at packet 4; frame 1 the one at packet 0
    assert seekplan.seek_runs(closed, [6]) == [seekplan.Run(4, 7, frozenset({6}))]
    assert [(r.start, r.end) for r in seekplan.seek_runs(closed, [1, 6])] == [(0, 2), (4, 7)]
    assert [(r.start, r.end) for r in seekplan.seek_runs(closed, [2, 4])] == [(0, 4)]  # touching runs merge
    opened = seekplan.PacketIndex(pts=[0, 3, 1, 2, 6, 4, 5, 7], dts=list(range(8)),
                                  key=[True, False, False, False, True, False, False, False], discard=[False] * 8)
    assert "open GOP" in seekplan.seek_blocker(opened)
    no_pts = seekplan.PacketIndex(pts=[0, None], dts=[0, 1], key=[True, False], discard=[False, False])
    assert "timestamp" in seekplan.seek_blocker(no_pts)
    twice = seekplan.PacketIndex(pts=[0, 0], dts=[0, 1], key=[True, False], discard=[False, False])
    assert "share" in seekplan.seek_blocker(twice)
    cut = seekplan.PacketIndex(pts=[0, 1, 2], dts=[0, 1, 2], key=[True, False, False], discard=[True, False, False])
    assert cut.frames == 2 and cut.shown == [1, 2]


def test_plan_choice_follows_cost():
    gop, n_gops = 50, 60
    pts = list(range(gop * n_gops))
    index = seekplan.PacketIndex(pts=pts, dts=pts, key=[i % gop == 0 for i in pts], discard=[False] * len(pts))
    plan, runs, _ = seekplan.choose_plan(index, uniform_indices(len(pts), 10))
    assert plan == "seek" and sum(r.packets for r in runs) < 0.2 * len(pts)
    dense, _, why = seekplan.choose_plan(index, list(range(0, len(pts), 7)))
    assert dense == "sequential" and "would decode" in why


def test_seek_that_misses_falls_back(streams, monkeypatch, caplog):
    # A seek that lands past its keyframe must not give wrong frames: the plan falls back.
    import av

    path = streams["long_2min"]
    wanted = [10, 1610, 3210]  # far apart: each run is reached by a seek
    real_seek = av.container.InputContainer.seek

    def overshoot(self, offset, *args, **kwargs):
        return real_seek(self, offset + 10_000_000, *args, **kwargs)

    expected = decode_frames(path, wanted, convert=native_bytes, plan="sequential").frames
    monkeypatch.setattr(av.container.InputContainer, "seek", overshoot)
    read = decode_frames(path, wanted, convert=native_bytes, plan="seek")
    assert read.plan == "sequential" and "missed" in read.why
    assert read.frames == expected


def test_broken_stream_still_fails_with_reason(streams, tmp_path):
    # half of an mkv (no index needed to read it): what is there decodes, nothing is invented
    data = streams["h264_mkv"].read_bytes()
    half = tmp_path / "half.mkv"
    half.write_bytes(data[: len(data) // 2])
    video = decode_video(half, size=32)
    assert 0 < video.info.frames < 250 and video.frames.shape == (50, 32, 32, 3)
    garbage = tmp_path / "garbage.webm"
    garbage.write_bytes(data[:64] + bytes(4096))
    with pytest.raises(DecodeError) as excinfo:
        decode_video(garbage, size=32)
    assert excinfo.value.reason in ("corrupt", "no_frames")


@pytest.mark.parametrize("name", ["open_gop", "hevc_mp4"])
def test_open_gop_cannot_be_seeked_exactly(streams, name):
    # Leading pictures of an open GOP (decoded after their keyframe, shown before it) reference
    # the previous GOP: decoded from their keyframe they do not come out at all (H.264, HEVC).
    # So the plan never seeks there, and a forced seek decodes sequentially instead.
    from dataengine import decode

    path = decode._absolute(streams[name])
    info, index = decode._index_video(path, None)
    keys = [i for i, key in enumerate(index.key) if key] + [len(index)]
    leading = [i for a, b in zip(keys, keys[1:]) for i in range(a + 1, b) if index.pts[i] < index.pts[a]]
    assert leading and "open GOP" in seekplan.seek_blocker(index)
    frame = index.shown.index(leading[0])
    runs = seekplan.seek_runs(index, [frame])  # what a seek would decode, asked for regardless
    with pytest.raises(decode._SeekMiss, match="did not come out"):
        decode._decode_runs(path, info.stream, index, runs, native_bytes, decode._Deadline(60, path, "test"))
    read = decode_frames(path, [frame], convert=native_bytes, plan="seek")
    assert read.plan == "sequential" and "open GOP" in read.why
