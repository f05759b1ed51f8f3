"""Video decoding: probe, uniform frame selection, clips, exact frames cheaply, failure reasons.

Frames are decoded in this process by libav through PyAV. A video is read in two passes:

1. **Index**: every packet of the video stream is demuxed (read, not decoded) once. The
   frame count is the number of packets the container's edit list does not discard
   (``packet.is_discard``); ``nb_frames`` is never trusted, because a stream-copied mp4 cut
   counts the packets before the cut that it only decodes as references.
2. **Decode** the wanted frames by one of two plans, chosen per video by the number of
   packets each decodes (:func:`dataengine.seekplan.choose_plan`):

   * ``sequential``: decode every packet from the start until the last wanted frame has come
     out. Always exact: it is a full decode that stops early. Frames are known by their
     presentation timestamp, or, where packets lack distinct ones, frame ``n`` is the n-th
     frame the decoder outputs.
   * ``seek``: for each run of wanted frames, seek the demuxer to the keyframe before them
     and decode forward from there only; frames are matched to frame indices by their
     presentation timestamp. Chosen when it decodes at most 3/4 of the packets, e.g. 110
     frames from a long video with short GOPs. Only used where it is frame-exact: it needs
     timestamps on every packet and closed GOPs (see :func:`dataengine.seekplan.seek_blocker`);
     an open-GOP stream (x265's default), packets without pts (AVI with B-frames) or two
     frames with one pts fall back to ``sequential``. Variable frame rate is no obstacle.
     If a run does not deliver every frame it should (the seek landed elsewhere, a decode
     error), the video is decoded again sequentially and a warning logged.

   Where frames are known by pts, frames that nothing references and nobody wants are not
   decoded at all (``skip_frame=NONREF``), which cannot change any other frame.

Each frame is then shown as a player shows it: non-square pixels are stretched to the
display aspect (SAR) and rotation metadata is applied (90/180/270 degrees; mirror flips are
not), and the CLIP-style resize follows: the shortest side to ``size`` (bicubic, dimensions
rounded half up as ffmpeg's ``force_original_aspect_ratio=increase``), then a centre crop
of ``size`` x ``size``. Frames equal a full decode through the same conversion at the same
indices, bit for bit, on either plan (tested on every codec and awkward stream in
tests/test_decode_streams.py). docs/decoding.md has the rules in one page.

Frame selection rules (``uniform_indices``, ``clip_indices``):

* ``n`` uniform indices over ``total`` frames are ``floor(linspace(0, total - 1, n) + 0.5)``
  (round half up): first and last frame included, e.g. total=10, n=4 -> [0, 3, 6, 9].
* A video with fewer frames than asked repeats indices (total=3, n=5 -> [0, 1, 1, 2, 2]);
  it is never an error. ``total == 0`` is ``DecodeError("no_frames")``.
* Clips: the video is cut into ``clips`` consecutive segments, segment k covering frames
  ``[k*total//K, (k+1)*total//K)`` (at least one frame), and ``clip_frames`` uniform indices
  are taken within each segment.

The union of all indices is decoded once; frames and clips are gathered from it by indexing.

When the decoder delivers fewer frames than the index promised (a truncated file), the
sequential decode has then seen every decodable frame, so their count is known exactly: the
indices are recomputed for it and decoded again, so the result is a correct uniform sample of
the decodable part with the asked shape. ``DecodedVideo.probed_frames`` keeps the promised
count and a warning is logged.

Whose fault: the input's faults raise :class:`DecodeError` (``reason`` one of ``REASONS``,
the message names the file) and a build files them in ``failures.jsonl``. Before a video is
called ``corrupt`` or ``no_frames``, a full ``ffmpeg -i V -f null -`` (built and run with
ffmpeg-python) must fail on it too; if that decodes cleanly, the fault is ours and
:class:`InternalDecodeError` is raised, with the command, and must stop the build. An ffmpeg
command rejected for its options is :class:`InternalDecodeError` as well.

Time: ``timeout=None`` (the default) gives each pass a budget that grows with its work
(file size for the index, packets x megapixels for the decode); a number is a fixed budget
for each pass. It is checked between packets.

``decode_many`` runs many videos through a process pool, in input order, with a bounded
number of videos in flight; its workers exit when the process that started them dies, even
by ``kill -9``.

Use::

    from dataengine.decode import decode_video, decode_many
    video = decode_video("clip.mp4", frames=50, clips=3, clip_frames=20, size=224)
    video.frames.shape  # (50, 224, 224, 3) uint8
    video.clips.shape   # (3, 20, 224, 224, 3) uint8
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import subprocess
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import numpy as np

from dataengine import seekplan

log = logging.getLogger(__name__)

REASONS: tuple[str, ...] = ("missing", "empty", "no_video_stream", "corrupt", "no_frames", "timeout")
DECODER_VERSION = "pyav-index/1"
"""Changes whenever the same file and settings can give other frames (a feature-cache key part):
/1 counts frames without edit-list-discarded packets and stretches non-square pixels."""
ProbeBackend = Literal["ffprobe", "pyav"]
Plan = Literal["auto", "sequential", "seek"]


class DecodeError(Exception):
    """A video that cannot be decoded. ``reason`` is one of ``REASONS``; ``path`` the file."""

    def __init__(self, reason: str, path: str | os.PathLike = "", detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown decode failure reason {reason!r} (known: {', '.join(REASONS)})")
        self.reason = reason
        self.path = str(path)
        self.detail = detail
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{reason}" + (f": {detail}" if detail else ""))

    def __reduce__(self):  # crosses process boundaries in decode_many with all three fields
        return (DecodeError, (self.reason, self.path, self.detail))


class InternalDecodeError(RuntimeError):
    """Our failure, not the video's: never filed as a failed input; it must stop the build.

    Raised when ffmpeg rejects a command we built, or when our decode fails on a video that a
    plain full ``ffmpeg`` decode reads cleanly. ``command`` is the ffmpeg command involved.
    """

    def __init__(self, path: str | os.PathLike, detail: str, command: list[str] | None = None):
        self.path = str(path)
        self.detail = detail
        self.command = list(command or [])
        shown = f"; command: {subprocess.list2cmdline(self.command)}" if self.command else ""
        super().__init__(f"internal failure in the decoder (not the video's fault) on {self.path}: {detail}{shown}")

    def __reduce__(self):
        return (InternalDecodeError, (self.path, self.detail, self.command))


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    """Frames a full decode shows: packets not discarded by an edit list (after a short decode,
    the frames proven to exist)."""
    fps: float
    duration: float
    """Seconds."""
    width: int
    """Displayed width: after non-square pixels are stretched and rotation applied."""
    height: int
    """Displayed height."""
    stream: int = 0
    """Index of the decoded video stream in the container."""
    rotation: int = 0
    """Counter-clockwise degrees (0, 90, 180, 270) the stored picture is turned for display."""
    sar: Fraction = Fraction(1)
    """Sample (pixel) aspect ratio of the stored picture."""
    stored_width: int = 0
    stored_height: int = 0


@dataclass
class DecodedVideo:
    frames: np.ndarray
    """uint8 (T, S, S, 3) RGB, the ``frames`` uniform samples."""
    clips: np.ndarray
    """uint8 (K, F, S, S, 3) RGB; with ``clips=0`` an empty (0, F, S, S, 3) array."""
    info: VideoInfo
    indices: list[int]
    """Frame index of each row of ``frames``."""
    clip_indices: list[list[int]]
    """Frame indices of each clip."""
    probed_frames: int
    """Frame count the index promised; differs from ``info.frames`` after a short decode."""
    plan: str = "sequential"
    """The plan that delivered the frames: ``sequential`` or ``seek``."""
    decoded_packets: int = 0
    """Packets sent to the decoder (the work done)."""


# --------------------------------------------------------------------------- selection rules

def uniform_indices(total: int, n: int) -> list[int]:
    """``n`` frame indices spread uniformly over ``total`` frames, first and last included.

    ``floor(linspace(0, total-1, n) + 0.5)``; repeats when total < n. total=0 raises
    ``DecodeError("no_frames")``; n=0 gives [].
    """
    if n < 0:
        raise ValueError(f"number of frames must be >= 0, got {n}")
    if total <= 0:
        raise DecodeError("no_frames", detail=f"video has {total} frames")
    if n == 0:
        return []
    return [int(i) for i in np.floor(np.linspace(0, total - 1, n) + 0.5)]


def clip_indices(total: int, clips: int, clip_frames: int) -> list[list[int]]:
    """``clips`` consecutive equal segments, ``clip_frames`` uniform indices within each.

    Segment k covers ``[k*total//clips, max((k+1)*total//clips, start+1))``: every segment has
    at least one frame, so short videos repeat frames instead of failing.
    """
    if clips < 0 or clip_frames < 0:
        raise ValueError(f"clips and clip_frames must be >= 0, got {clips}, {clip_frames}")
    if total <= 0:
        raise DecodeError("no_frames", detail=f"video has {total} frames")
    out = []
    for k in range(clips):
        start = k * total // clips
        end = max((k + 1) * total // clips, start + 1)
        out.append([start + i for i in uniform_indices(end - start, clip_frames)])
    return out


# --------------------------------------------------------------------------- time budgets

class _Deadline:
    """A time budget checked between packets (a libav call itself is never interrupted)."""

    def __init__(self, seconds: float, path: Path, what: str):
        self.seconds, self.path, self.what = seconds, path, what
        self.end = time.monotonic() + seconds

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise DecodeError("timeout", self.path, f"{self.what} took more than {self.seconds:g} s")


INDEX_SECONDS_PER_MB = 0.5
"""Default index budget: 60 s plus this per MB of file (demuxing reads it all once)."""
DECODE_SECONDS_PER_MEGAPIXEL = 0.02
"""Default decode budget: 60 s plus this per decoded packet and megapixel of frame; measured
decode costs here are 2-5 ms per 720p frame, so this allows a machine 5-10x slower."""


def index_budget(path: Path, timeout: float | None) -> float:
    return timeout if timeout is not None else 60 + INDEX_SECONDS_PER_MB * path.stat().st_size / 1e6


def decode_budget(packets: int, info: VideoInfo, timeout: float | None) -> float:
    megapixels = max(info.stored_width * info.stored_height, 1) / 1e6
    return timeout if timeout is not None else 60 + DECODE_SECONDS_PER_MEGAPIXEL * packets * megapixels


# --------------------------------------------------------------------------- ffmpeg / ffprobe commands

# ffmpeg messages that mean it rejected the command we built, not the input it read.
_COMMAND_REJECTED = ("Unrecognized option", "Option not found", "Error splitting the argument list",
                     "Invalid stream specifier", "matches no streams", "Error initializing filter",
                     "No such filter", "Error parsing a filter", "Error parsing filterchain")


def _last_line(stderr: bytes, path: Path) -> str:
    """The last line ffmpeg printed, without the file name it repeats (our message has it)."""
    lines = [line.strip() for line in stderr.decode("utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-1].replace(f"{path}: ", "")[:300] if lines else ""


def _check_not_rejected(path: Path, command: list[str], stderr: bytes) -> None:
    text = stderr.decode("utf-8", errors="replace")
    for marker in _COMMAND_REJECTED:
        if marker in text:
            raise InternalDecodeError(path, f"ffmpeg rejected our command: {_last_line(stderr, path)}", command)


def full_decode_command(path: str | os.PathLike, stream: int | None = None):
    """``ffmpeg -i V -map 0:S -f null -`` as an ffmpeg-python node: decode everything, keep nothing.

    The arbiter of whose fault a failure is (a video it decodes cleanly is never ``corrupt``)
    and the baseline of the decode benchmark. ``stream=None`` takes the first video stream
    if there is one.
    """
    import ffmpeg  # ffmpeg-python: builds the argument list, with its quoting

    source = ffmpeg.input(os.fspath(_absolute(path)))
    selected = source[str(stream)] if stream is not None else source["v:0?"]
    return selected.output("-", format="null").global_args("-nostdin", "-hide_banner", "-v", "error")


def run_ffmpeg(node, path: Path, timeout: float) -> tuple[int, bytes, bytes, list[str]]:
    """Run an ffmpeg-python node; (exit code, stdout, stderr, command). Kills it at ``timeout``."""
    command = node.compile()
    process = node.run_async(pipe_stdout=True, pipe_stderr=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        process.kill()
        process.communicate()
        raise DecodeError("timeout", path, f"ffmpeg took more than {timeout:g} s") from exc
    _check_not_rejected(path, command, err)
    return process.returncode, out, err, command


def _blame(path: Path, stream: int | None, detail: str, timeout: float) -> None:
    """Raise the right error for a failure of ours on ``path``: the input's fault or ours."""
    code, _, err, command = run_ffmpeg(full_decode_command(path, stream), path, timeout)
    # Lines a linked runtime prints about the environment (libgomp on a bad OMP_NUM_THREADS)
    # say nothing about the video.
    complaints = [line for line in err.splitlines() if line.strip() and not line.startswith(b"libgomp:")]
    if code == 0 and not complaints:
        raise InternalDecodeError(path, f"{detail}, yet a full ffmpeg decode reads the video cleanly", command)
    raise DecodeError("corrupt", path, _last_line(err, path) or detail)


def _ffprobe(args: list[str], path: Path, timeout: float) -> bytes:
    command = ["ffprobe", "-v", "error", *args, str(path)]
    try:
        proc = subprocess.run(command, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise DecodeError("timeout", path, f"ffprobe took more than {timeout:g} s") from exc
    _check_not_rejected(path, command, proc.stderr)
    if proc.returncode != 0:
        raise DecodeError("corrupt", path, _last_line(proc.stderr, path) or f"ffprobe exit {proc.returncode}")
    return proc.stdout


# --------------------------------------------------------------------------- probing and the packet index

def _ratio(text: str | None) -> float:
    if not text or "/" not in text:
        return float(text or 0.0)
    num, den = text.split("/", 1)
    return float(num) / float(den) if float(den) else 0.0


def _absolute(path: str | os.PathLike) -> Path:
    # Absolute, so that a name starting with '-' is never read as an ffmpeg option.
    return Path(os.path.abspath(os.fspath(path)))


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DecodeError("missing", path, "no such file")
    if path.stat().st_size == 0:
        raise DecodeError("empty", path, "file has 0 bytes")


def _quarter_turns(degrees: float) -> int:
    return round(degrees / 90) % 4 * 90


def _displayed(width: int, height: int, sar: Fraction, rotation: int) -> tuple[int, int]:
    """The size a player shows: width stretched by the pixel aspect, then the rotation."""
    shown_width = max(1, int(width * sar + Fraction(1, 2))) if sar > 0 else width
    return (height, shown_width) if rotation in (90, 270) else (shown_width, height)


def _video_info(frames: int, fps: float, duration: float, width: int, height: int, stream: int,
                rotation: int, sar: Fraction) -> VideoInfo:
    sar = sar if sar > 0 else Fraction(1)
    shown_width, shown_height = _displayed(width, height, sar, rotation)
    if not duration and fps:
        duration = frames / fps
    return VideoInfo(frames=frames, fps=fps, duration=duration, width=shown_width, height=shown_height,
                     stream=stream, rotation=rotation, sar=sar, stored_width=width, stored_height=height)


def probe(path: str | os.PathLike, timeout: float | None = None, *, backend: ProbeBackend = "pyav") -> VideoInfo:
    """Frame count, rate, duration, displayed size and rotation of the first video stream.

    ``backend="pyav"`` (default) demuxes every packet through PyAV in this process, which is
    the index :func:`decode_video` uses; ``backend="ffprobe"`` runs ffprobe twice (streams,
    then one line per packet). Both count the packets an edit list does not discard (the
    frames a full decode shows) and give equal results (tested). Neither decodes the video,
    except its first frame for the rotation on the PyAV side.

    Raises DecodeError: ``missing`` (no such file), ``empty`` (0 bytes), ``corrupt`` (the
    container cannot be read), ``no_video_stream`` (audio only; cover-art pictures do not
    count), ``timeout``.
    """
    path = _absolute(path)
    _check_file(path)
    if backend == "pyav":
        return _index_video(path, timeout)[0]
    if backend != "ffprobe":
        raise ValueError(f"unknown probe backend {backend!r} (ffprobe or pyav)")
    budget = index_budget(path, timeout)
    data = json.loads(_ffprobe(["-print_format", "json", "-show_format", "-show_streams"], path, budget) or b"{}")
    streams = [s for s in data.get("streams", []) if s.get("codec_type") == "video"
               and not s.get("disposition", {}).get("attached_pic")]
    if not streams:
        kinds = sorted({s.get("codec_type", "?") for s in data.get("streams", [])}) or ["none"]
        raise DecodeError("no_video_stream", path, f"streams: {', '.join(kinds)}")
    stream = streams[0]
    index = int(stream.get("index", 0))
    flags = _ffprobe(["-select_streams", str(index), "-show_entries", "packet=flags,size", "-of", "csv=p=0"],
                     path, budget).decode().split()
    frames = sum(1 for line in flags if "D" not in line.split(",")[-1] and not line.startswith("0,"))
    rotation = 0
    for side in stream.get("side_data_list", []):
        if "rotation" in side:
            rotation = _quarter_turns(float(side["rotation"]))
    sar_text = stream.get("sample_aspect_ratio", "1:1").replace(":", "/")
    sar = Fraction(sar_text) if sar_text not in ("0/1", "N/A") and not sar_text.endswith("/0") else Fraction(1)
    fps = _ratio(stream.get("avg_frame_rate")) or _ratio(stream.get("r_frame_rate"))
    duration = float(stream.get("duration") or data.get("format", {}).get("duration") or 0.0)
    return _video_info(frames, fps, duration, int(stream.get("width") or 0), int(stream.get("height") or 0),
                       index, rotation, sar)


def _open(path: Path, stream: int | None, timeout: float):
    """An open PyAV container; a failure is the input's fault only if ffmpeg fails too."""
    import av

    try:
        return av.open(str(path), metadata_errors="ignore")
    except av.error.FFmpegError as exc:
        _blame(path, stream, f"PyAV cannot open it: {str(exc).replace(f': {path!r}', '')[:200]}", timeout)
        raise  # unreachable: _blame always raises


def _video_stream(container, path: Path):
    import av

    streams = [s for s in container.streams.video
               if not (int(s.disposition) & int(av.stream.Disposition.attached_pic))]
    if not streams:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise DecodeError("no_video_stream", path, f"streams: {', '.join(kinds)}")
    return streams[0]


FIRST_FRAME_PACKETS = 64
"""Packets the index pass feeds the decoder at most to see the first frame (its rotation)."""


def _index_video(path: Path, timeout: float | None) -> tuple[VideoInfo, seekplan.PacketIndex]:
    """Demux every packet once: the frame count, the packet index and the video's geometry."""
    import av

    _check_file(path)
    deadline = _Deadline(index_budget(path, timeout), path, "reading the packet index")
    pts: list[int | None] = []
    dts: list[int | None] = []
    key: list[bool] = []
    discard: list[bool] = []
    rotation = 0
    with _open(path, None, deadline.seconds) as container:
        stream = _video_stream(container, path)
        first_frame = False
        try:
            for packet in container.demux(stream):
                deadline.check()
                if not packet.size:  # demuxer flush at the end
                    continue
                pts.append(packet.pts)
                dts.append(packet.dts)
                key.append(bool(packet.is_keyframe))
                discard.append(bool(packet.is_discard))
                if not first_frame and len(pts) <= FIRST_FRAME_PACKETS:
                    try:
                        for frame in stream.codec_context.decode(packet):
                            rotation, first_frame = _quarter_turns(frame.rotation or 0), True
                    except av.error.FFmpegError:
                        pass  # the decode pass reports decoding faults
        except av.error.FFmpegError as exc:
            if not pts:
                _blame(path, stream.index, f"PyAV cannot read a packet: {exc}", deadline.seconds)
            log.warning("%s: stopped reading packets after %d: %s", path, len(pts), exc)
        if not first_frame and pts:  # a very short stream: its frame is still in the decoder
            try:
                for frame in stream.codec_context.decode(None):
                    rotation, first_frame = _quarter_turns(frame.rotation or 0), True
            except av.error.FFmpegError:
                pass
        index = seekplan.PacketIndex(pts, dts, key, discard)
        rate = stream.average_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = (container.duration or 0) / 1_000_000  # AV_TIME_BASE
        sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio or Fraction(1)
        info = _video_info(index.frames, fps, duration, int(stream.width or 0), int(stream.height or 0),
                           int(stream.index), rotation, Fraction(sar))
    return info, index


# --------------------------------------------------------------------------- from decoded frame to array

def clip_resize_dims(width: int, height: int, size: int) -> tuple[int, int]:
    """Shortest side to ``size``, the other rounded half up (ffmpeg's force_original_aspect_ratio=increase)."""
    return max(size, (size * width + height // 2) // height), max(size, (size * height + width // 2) // width)


_TURN_FILTERS = {90: [("transpose", "cclock")], 180: [("hflip", ""), ("vflip", "")], 270: [("transpose", "clock")]}
"""How ffmpeg's command line turns a picture by a display rotation (counter-clockwise degrees)."""


def clip_filters(info: VideoInfo, size: int) -> list[tuple[str, str]]:
    """The libavfilter chain from a decoded frame to the displayed picture resized for CLIP.

    The turn, then one bicubic scale straight to the final size (which also stretches
    non-square pixels), then rgb24: what ``ffmpeg -i V -vf scale=...:force_original_aspect_ratio=
    increase:flags=bicubic,format=rgb24`` does with its default autorotation, so frames equal
    that command's output bit for bit on square-pixel video (tested). The centre crop follows
    in numpy.
    """
    width, height = clip_resize_dims(info.width, info.height, size)
    return [*_TURN_FILTERS.get(info.rotation, []), ("scale", f"{width}:{height}:flags=bicubic"),
            ("format", "rgb24")]


def clip_converter(info: VideoInfo, size: int) -> Callable[[Any], np.ndarray]:
    """frame -> uint8 (size, size, 3) RGB as a player shows it, resized and centre-cropped like CLIP.

    Runs :func:`clip_filters` in a PyAV filter graph, rebuilt when a frame's size or pixel
    format changes mid-stream (as ffmpeg reconfigures its filters).
    """
    import av

    width, height = clip_resize_dims(info.width, info.height, size)
    left, top = (width - size) // 2, (height - size) // 2
    chain = clip_filters(info, size)
    graphs: dict[tuple, Any] = {}

    def graph_for(frame):
        shape = (frame.width, frame.height, frame.format.name)
        if shape not in graphs:
            graph = av.filter.Graph()
            nodes = [graph.add_buffer(width=frame.width, height=frame.height, format=frame.format,
                                      time_base=frame.time_base or Fraction(1, 1000))]
            nodes += [graph.add(name, args) for name, args in chain]
            nodes.append(graph.add("buffersink"))
            for a, b in zip(nodes, nodes[1:]):
                a.link_to(b)
            graph.configure()
            graphs.clear()
            graphs[shape] = graph
        return graphs[shape]

    def convert(frame) -> np.ndarray:
        graph = graph_for(frame)
        graph.push(frame)
        rgb = graph.pull().to_ndarray()
        return np.ascontiguousarray(rgb[top:top + size, left:left + size])

    return convert


# --------------------------------------------------------------------------- the two plans

@dataclass
class FrameRead:
    """What a decode pass delivered."""

    frames: dict[int, Any]
    """Frame index -> converted frame, for the wanted frames that came out."""
    plan: str
    packets: int
    """Packets sent to the decoder."""
    seen: int | None = None
    """Sequential plan only: frames the decoder output in all; equals the decodable frames
    when the decode ran to the end without delivering every wanted frame."""
    why: str = ""


def _tune(stream) -> None:
    # Frame and slice threads, as the ffmpeg command line decodes.
    stream.codec_context.thread_type = "AUTO"


def _decode_sequential(path: Path, stream_index: int, wanted: set[int], convert, deadline: _Deadline) -> FrameRead:
    """Every packet from the start until the last wanted frame has come out (or the end)."""
    import av

    got: dict[int, Any] = {}
    last = max(wanted)
    seen = fed = 0
    errors: list[str] = []
    with _open(path, stream_index, deadline.seconds) as container:
        stream = container.streams[stream_index]
        _tune(stream)
        decoder = stream.codec_context

        def take(frames) -> None:
            nonlocal seen
            for frame in frames:
                if seen in wanted:
                    got[seen] = convert(frame)
                seen += 1

        try:
            for packet in container.demux(stream):
                deadline.check()
                if not packet.size:
                    continue
                fed += 1
                try:
                    take(decoder.decode(packet))
                except av.error.FFmpegError as exc:  # like ffmpeg: report, drop the packet, go on
                    errors.append(str(exc))
                if seen > last:
                    break
        except av.error.FFmpegError as exc:
            errors.append(f"reading packets: {exc}")
        if seen <= last:
            try:
                take(decoder.decode(None))  # the frames the decoder still holds
            except av.error.FFmpegError as exc:
                errors.append(str(exc))
    if errors:
        log.warning("%s: %d decode errors, first: %s", path, len(errors), errors[0])
    return FrameRead(got, "sequential", fed, seen, "; ".join(errors[:1]))


SEEK_AFTER_PACKETS = 64
"""Between runs, packets up to this many are demuxed and dropped; a longer gap is a seek."""


class _SeekMiss(Exception):
    """The seek plan could not deliver exactly (the caller falls back to sequential)."""


def _decode_runs(path: Path, stream_index: int, index: seekplan.PacketIndex, runs: list[seekplan.Run],
                 convert, deadline: _Deadline) -> FrameRead:
    """Each run from its first packet (a keyframe, or the stream start); frames matched to indices
    by pts; unwanted frames that nothing references are skipped. Raises _SeekMiss."""
    import av

    frame_of_pts = {index.pts[index.shown[n]]: n for run in runs for n in run.targets}
    got: dict[int, Any] = {}
    fed = 0
    with _open(path, stream_index, deadline.seconds) as container:
        stream = container.streams[stream_index]
        _tune(stream)
        decoder = stream.codec_context
        packets = None   # the demux iterator
        position = 0     # packet position the iterator yields next

        def take(frames) -> None:
            for frame in frames:
                n = frame_of_pts.get(frame.pts)
                if n is not None and n not in got:
                    got[n] = convert(frame)

        def next_packet():
            for packet in packets:
                if packet.size:
                    return packet
            raise _SeekMiss("the stream ended early")

        for run_number, run in enumerate(runs):
            if packets is None and run.start == 0:
                packets = container.demux(stream)
                packet = next_packet()
            elif packets is None or run.start < position or run.start - position > SEEK_AFTER_PACKETS:
                start_dts, start_pts = index.dts[run.start], index.pts[run.start]
                target = start_dts if start_dts is not None else start_pts
                container.seek(target, stream=stream, backward=True, any_frame=False)
                packets = container.demux(stream)
                while True:  # to the run's keyframe; past it means the seek overshot
                    deadline.check()
                    packet = next_packet()
                    if (packet.pts, packet.dts) == (start_pts, start_dts):
                        break
                    if packet.dts is None or start_dts is None or packet.dts > start_dts:
                        raise _SeekMiss(f"seeking to packet {run.start} landed past it")
                position = run.start
            else:
                while position < run.start:
                    deadline.check()
                    next_packet()
                    position += 1
                packet = next_packet()
            if run_number:
                decoder.flush_buffers()
            while True:
                deadline.check()
                if (packet.pts, packet.dts) != (index.pts[position], index.dts[position]):
                    raise _SeekMiss(f"packet {position} is not the one the index read")
                fed += 1
                # A frame that no other frame references and that is not wanted need not be
                # decoded at all: the decoder skips it (x264's default B-frames: ~half the run).
                skip = "DEFAULT" if packet.pts in frame_of_pts else "NONREF"
                if decoder.skip_frame != skip:
                    decoder.skip_frame = skip
                try:
                    take(decoder.decode(packet))
                except av.error.FFmpegError as exc:
                    raise _SeekMiss(f"decoding packet {position}: {exc}") from exc
                position += 1
                if position > run.end:
                    break
                packet = next_packet()
            try:
                take(decoder.decode(None))  # drain: the run's last frames come out of reordering
            except av.error.FFmpegError as exc:
                raise _SeekMiss(f"draining the decoder: {exc}") from exc
            missing = run.targets - got.keys()
            if missing:
                raise _SeekMiss(f"frames {sorted(missing)[:5]} did not come out of their run")
    return FrameRead(got, "seek", fed)


def decode_frames(path: str | os.PathLike, wanted: Iterable[int], *, convert: Callable[[Any], Any] | None = None,
                  plan: Plan = "auto", timeout: float | None = None,
                  video: tuple[VideoInfo, seekplan.PacketIndex] | None = None) -> FrameRead:
    """The frames ``wanted`` (frame indices) of a video, each through ``convert`` (a PyAV frame ->
    anything; default: the frame itself).

    ``plan="auto"`` takes the cheaper exact plan (:func:`dataengine.seekplan.choose_plan`);
    ``"seek"`` forces seeking wherever it is exact (else sequential); ``"sequential"`` never
    seeks. A seek plan that fails to deliver falls back to sequential (warning logged).
    ``video`` is the (info, index) of an earlier :func:`_index_video`, to skip re-reading it.
    """
    path = _absolute(path)
    info, index = video if video is not None else _index_video(path, timeout)
    convert = convert or (lambda frame: frame)
    wanted = sorted(set(wanted))
    if not wanted:
        return FrameRead({}, "sequential", 0, 0)
    if wanted[0] < 0:
        raise ValueError(f"frame indices must be >= 0, got {wanted[0]}")
    choice, runs, why = "sequential", [], "asked for"
    if plan == "auto" or plan == "seek":
        blocker = seekplan.seek_blocker(index) or (
            "index has fewer frames than asked for" if wanted[-1] >= len(index.shown) else None)
        if blocker:
            why = blocker
        elif plan == "seek":
            choice, runs, why = "seek", seekplan.seek_runs(index, wanted), "asked for"
        else:
            choice, runs, why = seekplan.choose_plan(index, wanted)
    elif plan != "sequential":
        raise ValueError(f"unknown decode plan {plan!r} (auto, sequential or seek)")
    if choice == "sequential" and not seekplan.pts_blocker(index) and wanted[-1] < len(index.shown):
        # From the first packet, frames known by pts: unwanted unreferenced frames are skipped.
        runs = [seekplan.sequential_run(index, wanted)]
    if runs:
        budget = decode_budget(sum(r.packets for r in runs), info, timeout)
        try:
            read = _decode_runs(path, info.stream, index, runs, convert, _Deadline(budget, path, "decoding"))
            read.plan, read.why = choice, why
            return read
        except _SeekMiss as exc:
            log.warning("%s: the %s plan missed (%s); decoding every frame in order", path, choice, exc)
            why = f"{choice} plan missed: {exc}"
    budget = decode_budget(seekplan.sequential_cost(index, wanted), info, timeout)
    read = _decode_sequential(path, info.stream, set(wanted), convert, _Deadline(budget, path, "decoding"))
    read.why = why
    return read


# --------------------------------------------------------------------------- one video

@dataclass
class _UniqueFrames:
    """Each needed frame once, plus where every output row comes from (what a worker sends back)."""

    decoded: np.ndarray     # (U, S, S, 3), frame indices ``wanted``
    wanted: list[int]
    indices: list[int]
    clip_indices: list[list[int]]
    info: VideoInfo
    probed_frames: int
    size: int
    clip_frames: int
    plan: str
    decoded_packets: int

    def assemble(self) -> DecodedVideo:
        position = {frame: row for row, frame in enumerate(self.wanted)}
        frame_rows = np.asarray([position[i] for i in self.indices], dtype=np.int64)
        clip_rows = np.asarray([[position[i] for i in clip] for clip in self.clip_indices], dtype=np.int64)
        s = self.size
        return DecodedVideo(
            frames=self.decoded[frame_rows] if len(frame_rows) else np.empty((0, s, s, 3), np.uint8),
            clips=(self.decoded[clip_rows] if len(self.clip_indices) and self.clip_frames
                   else np.empty((len(self.clip_indices), self.clip_frames, s, s, 3), np.uint8)),
            info=self.info, indices=self.indices, clip_indices=self.clip_indices,
            probed_frames=self.probed_frames, plan=self.plan, decoded_packets=self.decoded_packets,
        )


def _decode_unique(path: str | os.PathLike, frames: int, clips: int, clip_frames: int, size: int,
                   timeout: float | None, probe_backend: ProbeBackend, plan: Plan = "auto") -> _UniqueFrames:
    if frames < 0 or clips < 0 or clip_frames < 0 or size < 1:
        raise ValueError(f"bad decode settings: frames={frames} clips={clips} clip_frames={clip_frames} size={size}")
    path = _absolute(path)
    if probe_backend == "ffprobe":  # the container read by ffprobe first, as asked
        probe(path, timeout, backend="ffprobe")
    elif probe_backend != "pyav":
        raise ValueError(f"unknown probe backend {probe_backend!r} (ffprobe or pyav)")
    info, index = _index_video(path, timeout)
    if info.frames <= 0:
        raise DecodeError("no_frames", path, "the video stream has no frames")
    convert = clip_converter(info, size)
    total, video = info.frames, (info, index)
    for attempt in (1, 2):
        indices = uniform_indices(total, frames)
        per_clip = clip_indices(total, clips, clip_frames)
        wanted = sorted(set(indices).union(*per_clip))
        if not wanted:  # nothing asked for (frames=0 and no clip frames)
            read = FrameRead({}, "sequential", 0)
            break
        read = decode_frames(path, wanted, convert=convert, plan=plan if attempt == 1 else "sequential",
                             timeout=timeout, video=video)
        if len(read.frames) == len(wanted):
            break
        if not read.seen:
            _blame(path, info.stream, f"the decoder returned no frames ({read.why or 'no error'})",
                   index_budget(path, timeout))
        if attempt == 2:
            _blame(path, info.stream, f"decoding is not repeatable: {len(read.frames)} of {len(wanted)} frames "
                                      f"on a second run over the first {total} frames", index_budget(path, timeout))
        # The sequential decode ran to the end: exactly ``seen`` frames are decodable.
        log.warning("%s: the index promised %d frames but the decoder delivered %d; resampling over those (%s)",
                    path, info.frames, read.seen, read.why or "no error message")
        total = read.seen
    decoded = (np.stack([read.frames[i] for i in wanted]) if wanted else np.empty((0, size, size, 3), np.uint8))
    if total != info.frames:
        info = dataclasses.replace(info, frames=total)
    return _UniqueFrames(decoded, wanted, indices, per_clip, info, index.frames, size, clip_frames,
                         read.plan, read.packets)


def decode_video(path: str | os.PathLike, *, frames: int = 50, clips: int = 3, clip_frames: int = 20,
                 size: int = 224, timeout: float | None = None, probe_backend: ProbeBackend = "pyav",
                 plan: Plan = "auto") -> DecodedVideo:
    """Decode ``frames`` uniform frames and ``clips`` x ``clip_frames`` clip frames of one video.

    One demux pass indexes the packets, one decode pass delivers every needed frame by the
    cheaper exact ``plan`` (see the module docstring; two decode passes when the file holds
    fewer decodable frames than packets). ``probe_backend="ffprobe"`` has ffprobe read the
    container first. ``timeout``: seconds per pass, default scaled with the work.
    Raises :class:`DecodeError` (the input's fault) or :class:`InternalDecodeError` (ours).
    """
    return _decode_unique(path, frames, clips, clip_frames, size, timeout, probe_backend, plan).assemble()


def _decode_unique_or_error(path: str, frames: int = 50, clips: int = 3, clip_frames: int = 20, size: int = 224,
                            timeout: float | None = None, probe_backend: ProbeBackend = "pyav",
                            plan: Plan = "auto") -> _UniqueFrames | DecodeError:
    # Workers send back each frame once (not the repeated rows), which for short videos is
    # a fraction of the assembled arrays' bytes; the parent assembles.
    try:
        return _decode_unique(path, frames, clips, clip_frames, size, timeout, probe_backend, plan)
    except DecodeError as exc:
        return exc


# --------------------------------------------------------------------------- many videos

def _pool_context() -> multiprocessing.context.BaseContext:
    # Never fork: the parent may hold torch threads or locks that a forked child inherits.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _process_gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie waiting for its parent counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False


def _exit_with(parent: int) -> None:
    """Pool initializer: end this worker as soon as ``parent`` (the decode_many caller) dies.

    A worker's parent is the forkserver, not the caller, and it blocks on a queue whose write
    end it holds itself, so nothing else would ever wake it after a ``kill -9`` of the caller.
    A daemon thread waits on a pidfd of the caller (Linux >= 5.3) or polls it every 0.5 s.
    """
    if _process_gone(parent):
        os._exit(1)

    def watch() -> None:
        try:
            import select

            fd = os.pidfd_open(parent)
            select.select([fd], [], [])  # readable once the process has exited
        except (AttributeError, OSError):
            while not _process_gone(parent):
                time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name=f"exit-with-{parent}", daemon=True).start()


def decode_many(paths: Iterable[str | os.PathLike], workers: int = 1, *, max_in_flight: int | None = None,
                **decode_kwargs: Any) -> Iterator[tuple[str | os.PathLike, DecodedVideo | DecodeError]]:
    """Yield ``(path, DecodedVideo or DecodeError)`` for each path, in input order.

    ``workers <= 1`` decodes inline; otherwise a process pool of ``workers`` decodes with at
    most ``max_in_flight`` (default ``2 * workers``) videos submitted and not yet yielded, so
    memory stays bounded however long ``paths`` is. Other exceptions, InternalDecodeError
    among them, propagate, with the video named in a note. Closing the generator early
    cancels what is queued. Workers exit when this process dies, even by ``kill -9``.
    """
    if workers <= 1:
        for path in paths:
            try:
                yield path, decode_video(path, **decode_kwargs)
            except DecodeError as exc:
                yield path, exc
        return
    limit = max(1, max_in_flight or 2 * workers)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context(),
                               initializer=_exit_with, initargs=(os.getpid(),))
    pending: collections.deque[tuple[str | os.PathLike, Future]] = collections.deque()
    try:
        source = iter(paths)
        exhausted = False
        while True:
            while not exhausted and len(pending) < limit:
                try:
                    path = next(source)
                except StopIteration:
                    exhausted = True
                    break
                pending.append((path, pool.submit(_decode_unique_or_error, os.fspath(path), **decode_kwargs)))
            if not pending:
                return
            path, future = pending.popleft()
            try:
                result = future.result()
            except Exception as exc:
                exc.add_note(f"while decoding {os.fspath(path)}")
                raise
            yield path, (result if isinstance(result, DecodeError) else result.assemble())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- small helpers

def contact_sheet(frames: np.ndarray, n: int = 4, height: int = 64, quality: int = 85) -> bytes:
    """A small JPEG of ``n`` uniformly chosen frames side by side, ``height`` pixels high.

    Same frames in, same bytes out (fixed encoder settings, no metadata).
    """
    from PIL import Image

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"contact_sheet needs uint8 frames (T>0, H, W, 3), got {frames.dtype} {frames.shape}")
    if n < 1 or height < 1:
        raise ValueError(f"n and height must be >= 1, got {n}, {height}")
    chosen = [frames[i] for i in uniform_indices(len(frames), min(n, len(frames)))]
    width = max(1, round(frames.shape[2] * height / frames.shape[1]))
    sheet = Image.new("RGB", (width * len(chosen), height))
    for k, frame in enumerate(chosen):
        sheet.paste(Image.fromarray(frame).resize((width, height), Image.Resampling.BILINEAR), (k * width, 0))
    buf = io.BytesIO()
    sheet.save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's content, read in chunks (the feature-cache key of a video)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
