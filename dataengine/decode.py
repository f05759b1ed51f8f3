"""Video decoding with ffmpeg: probe, uniform frame selection, clip segmentation, failure reasons.

One video is decoded by ONE ffmpeg process that keeps only the frames it needs::

    ffmpeg -i VIDEO -map 0:S -vf "select='eq(n,0)+eq(n,12)+...',scale=224:224:
           force_original_aspect_ratio=increase:flags=bicubic,format=rgb24,crop=224:224"
           -fps_mode vfr -f rawvideo -pix_fmt rgb24 pipe:1

``select`` passes frame ``n`` (0-based decode order, after the container's edit list) when it
is one of the wanted indices; ``fps_mode vfr`` stops ffmpeg from duplicating or dropping
frames to fill a constant rate. Scaling follows CLIPImageProcessor: the shortest side goes
to ``size`` (bicubic), then a centre crop of ``size`` x ``size``. Pixels equal a full decode
of the same frames through the same filter chain, bit for bit (tested).

Frame selection rules (``uniform_indices``, ``clip_indices``):

* ``n`` uniform indices over ``total`` frames are ``floor(linspace(0, total - 1, n) + 0.5)``
  (round half up): first and last frame included, e.g. total=10, n=4 -> [0, 3, 6, 9].
* A video with fewer frames than asked repeats indices (total=3, n=5 -> [0, 1, 1, 2, 2]);
  it is never an error. ``total == 0`` is ``DecodeError("no_frames")``.
* Clips: the video is cut into ``clips`` consecutive segments, segment k covering frames
  ``[k*total//K, (k+1)*total//K)`` (at least one frame), and ``clip_frames`` uniform indices
  are taken within each segment.

The union of all indices is decoded once; frames and clips are gathered from it by indexing.

Frame counts come from the container (``nb_frames``) or, when it has none (mkv, webm), from
counting packets, never from a full decode. :func:`probe` reads them with ffprobe JSON
(``-count_packets``) or, the default inside ``decode_video``, with PyAV's libavformat in this
process: the same fields (tested equal), one ffmpeg process launch fewer per video, which is
about half the cost of decoding a short clip here.

When ffmpeg returns fewer frames than the count promised (a truncated file, a wrong header),
the frames that did come back prove the video has at least ``last_returned_index + 1``
decodable frames: the indices are recomputed for that count and the video is decoded a
second time, so the result is a correct uniform sample of the decodable part with the asked
shape. ``DecodedVideo.probed_frames`` keeps the promised count and a warning is logged. A
count that is too LOW cannot be detected without a full decode; frames past it are never
selected. Non-square pixels (SAR != 1) are not corrected: frames are taken as stored.

Failures raise :class:`DecodeError` whose ``reason`` is one of ``REASONS`` and whose message
names the file. ``decode_many`` runs many videos through a process pool, in input order, with
a bounded number of videos in flight.

Use::

    from dataengine.decode import decode_video, decode_many
    video = decode_video("clip.mp4", frames=50, clips=3, clip_frames=20, size=224)
    video.frames.shape  # (50, 224, 224, 3) uint8
    video.clips.shape   # (3, 20, 224, 224, 3) uint8
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import multiprocessing
import os
import subprocess
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import numpy as np

log = logging.getLogger(__name__)

REASONS: tuple[str, ...] = ("missing", "empty", "no_video_stream", "corrupt", "no_frames", "timeout")
ProbeBackend = Literal["ffprobe", "pyav"]


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


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    """Frame count (container metadata or packet count; after a short decode, the frames proven to exist)."""
    fps: float
    duration: float
    """Seconds."""
    width: int
    height: int
    stream: int = 0
    """Index of the decoded video stream in the container."""


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
    """Frame count the container promised; differs from ``info.frames`` after a short decode."""


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


# --------------------------------------------------------------------------- probing

def _ratio(text: str | None) -> float:
    if not text or "/" not in text:
        return float(text or 0.0)
    num, den = text.split("/", 1)
    return float(num) / float(den) if float(den) else 0.0


def _ffprobe(args: list[str], path: Path, timeout: float) -> dict[str, Any]:
    cmd = ["ffprobe", "-v", "error", "-print_format", "json", *args, str(path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise DecodeError("timeout", path, f"ffprobe took more than {timeout:g} s") from exc
    if proc.returncode != 0:
        raise DecodeError("corrupt", path, _last_line(proc.stderr, path) or f"ffprobe exit {proc.returncode}")
    try:
        return json.loads(proc.stdout or b"{}")
    except json.JSONDecodeError as exc:
        raise DecodeError("corrupt", path, f"unreadable ffprobe output: {exc}") from exc


def _last_line(stderr: bytes, path: Path) -> str:
    """The last line ffmpeg printed, without the file name it repeats (our message has it)."""
    lines = [line.strip() for line in stderr.decode("utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-1].replace(f"{path}: ", "")[:300] if lines else ""


def _absolute(path: str | os.PathLike) -> Path:
    # Absolute, so that a name starting with '-' is never read as an ffmpeg option.
    return Path(os.path.abspath(os.fspath(path)))


def probe(path: str | os.PathLike, timeout: float = 60, *, backend: ProbeBackend = "ffprobe") -> VideoInfo:
    """Frame count, rate, duration and size of the first video stream.

    ``backend="ffprobe"`` runs ``ffprobe -print_format json``; ``backend="pyav"`` reads the
    same container fields (``nb_frames``, ``avg_frame_rate``, durations) through PyAV's
    libavformat in this process, which saves launching a second ffmpeg binary per video
    (~0.1 s here, about half the cost of a short video's decode). Both count packets
    (demux only) when the container has no frame count. ``timeout`` applies to ffprobe only.

    Raises DecodeError: ``missing`` (no such file), ``empty`` (0 bytes), ``corrupt`` (the
    container cannot be read), ``no_video_stream`` (audio only; cover-art pictures do not
    count), ``timeout``.
    """
    path = _absolute(path)
    if not path.is_file():
        raise DecodeError("missing", path, "no such file")
    if path.stat().st_size == 0:
        raise DecodeError("empty", path, "file has 0 bytes")
    if backend == "pyav":
        return _probe_pyav(path)
    if backend != "ffprobe":
        raise ValueError(f"unknown probe backend {backend!r} (ffprobe or pyav)")
    data = _ffprobe(["-show_format", "-show_streams"], path, timeout)
    streams = [s for s in data.get("streams", []) if s.get("codec_type") == "video"
               and not s.get("disposition", {}).get("attached_pic")]
    if not streams:
        kinds = sorted({s.get("codec_type", "?") for s in data.get("streams", [])}) or ["none"]
        raise DecodeError("no_video_stream", path, f"streams: {', '.join(kinds)}")
    stream = streams[0]
    index = int(stream.get("index", 0))
    frames = int(stream.get("nb_frames") or 0)
    if frames <= 0:
        # mkv/webm carry no frame count: count packets (demux only, no decoding).
        counted = _ffprobe(["-select_streams", str(index), "-count_packets",
                            "-show_entries", "stream=nb_read_packets"], path, timeout)
        frames = int((counted.get("streams") or [{}])[0].get("nb_read_packets") or 0)
    fps = _ratio(stream.get("avg_frame_rate")) or _ratio(stream.get("r_frame_rate"))
    duration = float(stream.get("duration") or data.get("format", {}).get("duration") or 0.0)
    if not duration and fps:
        duration = frames / fps
    return VideoInfo(frames=frames, fps=fps, duration=duration, width=int(stream.get("width") or 0),
                     height=int(stream.get("height") or 0), stream=index)


def _probe_pyav(path: Path) -> VideoInfo:
    import av  # imported here: only this backend needs it

    try:
        with av.open(str(path)) as container:
            streams = [s for s in container.streams.video
                       if not (int(s.disposition) & int(av.stream.Disposition.attached_pic))]
            if not streams:
                kinds = sorted({s.type for s in container.streams}) or ["none"]
                raise DecodeError("no_video_stream", path, f"streams: {', '.join(kinds)}")
            stream = streams[0]
            frames = int(stream.frames or 0)
            if frames <= 0:
                # Same count as ffprobe -count_packets; size-0 packets are demuxer flushes.
                frames = sum(1 for packet in container.demux(stream) if packet.size)
            rate = stream.average_rate or stream.base_rate
            fps = float(rate) if rate else 0.0
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            else:
                duration = (container.duration or 0) / 1_000_000  # AV_TIME_BASE
            if not duration and fps:
                duration = frames / fps
            return VideoInfo(frames=frames, fps=fps, duration=duration, width=int(stream.width or 0),
                             height=int(stream.height or 0), stream=int(stream.index))
    except av.error.FFmpegError as exc:
        detail = str(exc).replace(f": '{path}'", "")
        raise DecodeError("corrupt", path, detail[:300]) from exc


# --------------------------------------------------------------------------- decoding

def filter_chain(size: int, select: Iterable[int] | None = None) -> str:
    """The ffmpeg -vf string: optional frame select, then CLIP-style resize + centre crop.

    ``select=None`` keeps every frame (used to check a selective decode against a full one).
    """
    resize = (f"scale={size}:{size}:force_original_aspect_ratio=increase:flags=bicubic,"
              f"format=rgb24,crop={size}:{size}")
    if select is None:
        return resize
    # Single quotes protect the commas inside eq(n,i) from the filtergraph parser; the
    # argument list goes to ffmpeg without a shell, so no other quoting is involved.
    expr = "+".join(f"eq(n,{int(i)})" for i in select)
    return f"select='{expr}',{resize}"


def _run_select(path: Path, stream: int, wanted: list[int], size: int, timeout: float) -> tuple[np.ndarray, int, str]:
    """Decode the frames ``wanted`` (sorted, unique). Returns (frames, exit code, stderr tail)."""
    cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-i", str(path), "-map", f"0:{stream}",
           "-vf", filter_chain(size, wanted), "-fps_mode", "vfr", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise DecodeError("timeout", path, f"ffmpeg took more than {timeout:g} s") from exc
    frame_bytes = size * size * 3
    got, rest = divmod(len(proc.stdout), frame_bytes)
    if rest:
        raise DecodeError("corrupt", path, f"ffmpeg wrote {len(proc.stdout)} bytes, not a whole number of frames")
    if got > len(wanted):
        raise DecodeError("corrupt", path, f"ffmpeg returned {got} frames for {len(wanted)} selected")
    frames = np.frombuffer(proc.stdout, np.uint8).reshape(got, size, size, 3)
    return frames, proc.returncode, _last_line(proc.stderr, path)


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
            probed_frames=self.probed_frames,
        )


def _decode_unique(path: str | os.PathLike, frames: int, clips: int, clip_frames: int, size: int,
                   timeout: float, probe_backend: ProbeBackend) -> _UniqueFrames:
    if frames < 0 or clips < 0 or clip_frames < 0 or size < 1:
        raise ValueError(f"bad decode settings: frames={frames} clips={clips} clip_frames={clip_frames} size={size}")
    path = _absolute(path)
    info = probe(path, timeout=timeout, backend=probe_backend)
    if info.frames <= 0:
        raise DecodeError("no_frames", path, "the video stream has no frames")
    total = info.frames
    for attempt in (1, 2):
        indices = uniform_indices(total, frames)
        per_clip = clip_indices(total, clips, clip_frames)
        wanted = sorted(set(indices).union(*per_clip))
        if not wanted:  # nothing asked for (frames=0 and no clip frames)
            decoded = np.empty((0, size, size, 3), np.uint8)
            break
        decoded, code, stderr = _run_select(path, info.stream, wanted, size, timeout)
        got = len(decoded)
        if got == len(wanted):
            if code != 0:
                log.debug("%s: ffmpeg exit %d after all frames: %s", path, code, stderr)
            break
        if got == 0:
            if code != 0:
                raise DecodeError("corrupt", path, stderr or f"ffmpeg exit {code}")
            raise DecodeError("no_frames", path, "ffmpeg returned no frames")
        if attempt == 2:
            raise DecodeError("corrupt", path, f"decoding is not repeatable: {got} of {len(wanted)} frames "
                                               f"on a second run over the first {total} frames")
        # Frames 0..wanted[got-1] were all decoded (select counts every decoded frame).
        proven = wanted[got - 1] + 1
        log.warning("%s: container promised %d frames but ffmpeg stopped before frame %d; "
                    "resampling over the first %d frames (%s)", path, info.frames, wanted[got], proven,
                    stderr or "no error message")
        total = proven
    probed_frames = info.frames
    if total != probed_frames:
        info = VideoInfo(total, info.fps, info.duration, info.width, info.height, info.stream)
    return _UniqueFrames(decoded, wanted, indices, per_clip, info, probed_frames, size, clip_frames)


def decode_video(path: str | os.PathLike, *, frames: int = 50, clips: int = 3, clip_frames: int = 20,
                 size: int = 224, timeout: float = 120, probe_backend: ProbeBackend = "pyav") -> DecodedVideo:
    """Decode ``frames`` uniform frames and ``clips`` x ``clip_frames`` clip frames of one video.

    All needed frames come from one ffmpeg run (two when the container over-counts its
    frames; see the module docstring). The frame count comes from :func:`probe` with
    ``probe_backend`` (in-process PyAV by default: same fields as ffprobe, one process
    launch fewer). Raises :class:`DecodeError`.
    """
    return _decode_unique(path, frames, clips, clip_frames, size, timeout, probe_backend).assemble()


def _decode_unique_or_error(path: str, frames: int = 50, clips: int = 3, clip_frames: int = 20, size: int = 224,
                            timeout: float = 120, probe_backend: ProbeBackend = "pyav") -> _UniqueFrames | DecodeError:
    # Workers send back each frame once (not the repeated rows), which for short videos is
    # a fraction of the assembled arrays' bytes; the parent assembles.
    try:
        return _decode_unique(path, frames, clips, clip_frames, size, timeout, probe_backend)
    except DecodeError as exc:
        return exc


def _pool_context() -> multiprocessing.context.BaseContext:
    # Never fork: the parent may hold torch threads or locks that a forked child inherits.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def decode_many(paths: Iterable[str | os.PathLike], workers: int = 1, *, max_in_flight: int | None = None,
                **decode_kwargs: Any) -> Iterator[tuple[str | os.PathLike, DecodedVideo | DecodeError]]:
    """Yield ``(path, DecodedVideo or DecodeError)`` for each path, in input order.

    ``workers <= 1`` decodes inline; otherwise a process pool of ``workers`` decodes with at
    most ``max_in_flight`` (default ``2 * workers``) videos submitted and not yet yielded, so
    memory stays bounded however long ``paths`` is. Other exceptions propagate, with the
    video named in a note. Closing the generator early cancels what is queued.
    """
    if workers <= 1:
        for path in paths:
            try:
                yield path, decode_video(path, **decode_kwargs)
            except DecodeError as exc:
                yield path, exc
        return
    limit = max(1, max_in_flight or 2 * workers)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context())
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
