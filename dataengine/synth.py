"""The synthetic video world: short videos of coloured shapes, QA annotations and ground truth.

Each video is three equal segments (thirds), each with one event drawn from a small
vocabulary: ``a red circle moves left``, then ``a blue square moves up``, then ``the blue
square shrinks``. Frames are drawn with numpy and piped as rawvideo rgb24 into one ffmpeg
process per video (H.264 in mp4, yuv420p). Everything follows from the seed: video ``i``
uses ``numpy.random.default_rng([seed, i])``, so the same seed gives the same annotations,
the same ground truth and the same decoded pixels, and the first videos of a larger world
equal a smaller world's.

Run::

    vlmr synth --out runs/synth --videos 24 --seed 0 [--broken 4]
    python -m dataengine.synth --out runs/synth --videos 24

Output::

    OUT/videos/vid_00000.mp4 ...   the videos (bad_00000.mp4 ... with --broken)
    OUT/annotations.json           Video-ChatGPT instruction format: a list of
                                   {"video_id", "q", "a", "qtype"}; video_id has no extension
    OUT/captions.json              ground truth per video and segment, for tests and exact
                                   evaluation only: it is never fed to a model as a prompt

captions.json is ``{"format", "note", "settings", "videos": {video_id: truth}}`` (read it with
:func:`load_captions`, which returns the ``videos`` mapping). A good video's truth holds
``file``, ``fps``, ``frames``, ``width``, ``height``, ``duration_s``, ``background``, ``count``,
``objects`` (``object``, ``shape``, ``colour``, ``first_segment``), ``final`` (shapes visible
at the last frame with their ``size`` relative to the start), ``order`` and ``caption`` (the
answers of the order and describe questions) and ``segments``: per segment ``segment``,
``start_s``, ``end_s``, ``start_frame``, ``end_frame`` (exclusive), ``caption``, ``event``
(``kind`` in EVENTS, ``object``, ``new``, ``direction`` for moves) and ``objects`` (every shape
on screen: ``shape``, ``colour``, ``event`` (``stays`` unless it acts), ``direction``, and
``xy``/``radius`` at the segment's first frame as fractions of the frame side). A broken
case's truth is ``{"video_id", "file", "broken": kind, "expected_error": reason}``.

Question types (``qtype``) and the length of their answers: ``colour``, ``shape``,
``direction``, ``count`` (one word), ``object`` and ``event`` (short phrase), ``order`` (one
sentence), ``describe`` (four to six sentences). The length spread is what the easy/hard
curriculum sorts on.

``--broken K`` adds K videos that cannot be decoded, cycling through an empty file, corrupt
bytes, an audio-only mp4 and an annotation whose video does not exist, each with
annotations, so that a build exercises its failure path. captions.json lists them with the
decode failure reason expected (``expected_error``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from dataengine.config import check, parse_config, raise_problems
from dataengine.schema import write_bytes_atomic, write_text_atomic

log = logging.getLogger(__name__)

FORMAT = "vlmr-synth/1"
ANNOTATIONS_NAME = "annotations.json"
CAPTIONS_NAME = "captions.json"
VIDEOS_DIR = "videos"

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white", "orange", "purple", "cyan")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (240, 220, 40),
    "white": (245, 245, 245), "orange": (250, 140, 20), "purple": (160, 60, 210), "cyan": (40, 220, 220),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "gray": (90, 90, 90)}
# Unit step in image coordinates (x right, y down) for each direction.
DIRECTION_STEP: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
EVENTS: tuple[str, ...] = ("moves", "appears", "grows", "shrinks", "disappears")
NUMBER_WORDS = ("zero", "one", "two", "three")
SEGMENT_NAMES = ("In the beginning", "In the middle", "At the end of the video")

# Broken cases written by --broken, in cycle order, with the decode failure each must give
# (the reasons of dataengine.decode.DecodeError).
BROKEN_KINDS: tuple[str, ...] = ("empty", "corrupt", "audio_only", "missing")
BROKEN_EXPECTED_ERROR: dict[str, str] = {
    "empty": "empty", "corrupt": "corrupt", "audio_only": "no_video_stream", "missing": "missing",
}

# Geometry as fractions of the frame side, so any --size draws the same world.
RADIUS = 0.11
MARGIN = 0.15      # shape centres stay this far from the border
TRAVEL = 0.32      # distance a shape moves during one segment
GROW, SHRINK = 1.6, 0.5


@dataclass
class SynthConfig:
    """Render the synthetic video world: videos of moving shapes, QA annotations, ground truth."""

    out: Path = Path("runs/synth")
    """Output folder (videos/, annotations.json, captions.json)."""
    videos: int = 24
    """Number of good videos to render."""
    seed: int = 0
    """Seed of the world; video i uses numpy.random.default_rng([seed, i])."""
    broken: int = 0
    """Extra broken videos (cycle: empty, corrupt, audio-only, missing) with annotations."""
    size: int = 128
    """Frame width and height in pixels."""
    fps: int = 10
    """Frames per second."""
    segment_frames: int = 10
    """Frames per segment; a video is three segments."""
    codec: Literal["auto", "libx264", "mpeg4"] = "auto"
    """Video encoder; auto picks libx264 when the installed ffmpeg has it, else mpeg4."""
    jobs: int = 2
    """ffmpeg encoder processes running at once (each uses one thread)."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        check(problems, self.videos >= 0, f"videos must be >= 0, got {self.videos}")
        check(problems, self.broken >= 0, f"broken must be >= 0, got {self.broken}")
        check(problems, self.size >= 32 and self.size % 2 == 0,
              f"size must be an even number >= 32 (yuv420p), got {self.size}")
        check(problems, self.fps >= 1, f"fps must be >= 1, got {self.fps}")
        check(problems, self.segment_frames >= 2, f"segment_frames must be >= 2, got {self.segment_frames}")
        check(problems, self.jobs >= 1, f"jobs must be >= 1, got {self.jobs}")
        raise_problems(problems, "synth config")


@dataclass
class WorldInfo:
    """Where a rendered world lies and what is in it."""

    root: Path
    videos_dir: Path
    annotations: Path
    captions: Path
    video_ids: list[str] = field(default_factory=list)
    """Good videos, in order."""
    broken_ids: list[str] = field(default_factory=list)
    """Broken cases (their files may be absent: the 'missing' kind)."""
    qa_pairs: int = 0
    seconds: float = 0.0

    def video_path(self, video_id: str) -> Path:
        return self.videos_dir / f"{video_id}.mp4"


# --------------------------------------------------------------------------- world plan

@dataclass
class _Thing:
    """One shape in a video: identity, and its state at the start of the current segment."""

    shape: str
    colour: str
    x: float
    y: float
    radius: float
    visible: bool = True
    first_segment: int = 0

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class _Event:
    kind: str          # one of EVENTS
    thing: int         # index of the shape acting
    new: bool          # the shape enters the video in this segment
    direction: str | None = None


def _fits(value: float, step: int, size: int) -> bool:
    end = value + step * TRAVEL * size
    return MARGIN * size <= end <= (1 - MARGIN) * size


def _feasible_directions(thing: _Thing, size: int) -> list[str]:
    return [d for d, (dx, dy) in DIRECTION_STEP.items()
            if _fits(thing.x, dx, size) and _fits(thing.y, dy, size)]


def _place(rng: np.random.Generator, others: list[_Thing], size: int, direction: str | None) -> tuple[float, float]:
    """A start position that keeps a move inside the frame and stays clear of other shapes."""
    lo, hi = MARGIN * size, (1 - MARGIN) * size
    travel = TRAVEL * size
    dx, dy = DIRECTION_STEP[direction] if direction else (0, 0)

    def axis_range(step: int) -> tuple[float, float]:
        return (lo + travel, hi) if step < 0 else ((lo, hi - travel) if step > 0 else (lo, hi))

    best, best_gap = (size / 2, size / 2), -1.0
    for _ in range(20):
        x = float(rng.uniform(*axis_range(dx)))
        y = float(rng.uniform(*axis_range(dy)))
        gap = min((np.hypot(x - o.x, y - o.y) for o in others if o.visible), default=float(size))
        if gap >= 3 * RADIUS * size:
            return x, y
        if gap > best_gap:
            best, best_gap = (x, y), gap
    return best


def _plan(rng: np.random.Generator, size: int) -> tuple[str, list[_Thing], list[_Event]]:
    """Background, the cast of shapes (distinct colours and shapes) and one event per segment.

    Returns the shapes with their state at the start of the video; events refer to them by index.
    """
    background = str(rng.choice(list(BACKGROUND_RGB)))
    colours = [str(c) for c in rng.permutation(COLOURS)[:3]]
    shapes = [str(s) for s in rng.permutation(SHAPES)]
    radius = RADIUS * size
    cast: list[_Thing] = []
    state: list[_Thing] = []   # live state while planning, to place later shapes
    events: list[_Event] = []

    def enter(segment: int, direction: str | None) -> int:
        k = len(cast)
        x, y = _place(rng, state, size, direction)
        cast.append(_Thing(shapes[k], colours[k], x, y, radius, True, segment))
        state.append(_Thing(shapes[k], colours[k], x, y, radius, True, segment))
        return k

    def move(k: int, direction: str) -> None:
        dx, dy = DIRECTION_STEP[direction]
        state[k].x += dx * TRAVEL * size
        state[k].y += dy * TRAVEL * size

    # Segment 0: the first shape enters and moves.
    d0 = str(rng.choice(DIRECTIONS))
    events.append(_Event("moves", enter(0, d0), True, d0))
    move(0, d0)

    # Segment 1: a second shape enters and moves, or the first one moves on another way.
    if rng.random() < 0.65:
        d1 = str(rng.choice(DIRECTIONS))
        k = enter(1, d1)
        events.append(_Event("moves", k, True, d1))
        move(k, d1)
    else:
        options = [d for d in _feasible_directions(state[0], size) if d != d0] or _feasible_directions(state[0], size)
        d1 = str(rng.choice(options))
        events.append(_Event("moves", 0, False, d1))
        move(0, d1)

    # Segment 2: a new shape appears (still or moving), or a visible one moves, grows,
    # shrinks or disappears.
    kind = str(rng.choice(["appears", "enters_moving", "moves", "grows", "shrinks", "disappears"]))
    if kind in ("appears", "enters_moving"):
        direction = str(rng.choice(DIRECTIONS)) if kind == "enters_moving" else None
        k = enter(2, direction)
        events.append(_Event("moves" if direction else "appears", k, True, direction))
    else:
        k = int(rng.integers(len(cast)))
        if kind == "moves":
            direction = str(rng.choice(_feasible_directions(state[k], size)))
            events.append(_Event("moves", k, False, direction))
        else:
            events.append(_Event(kind, k, False))
    return background, cast, events


# --------------------------------------------------------------------------- drawing

def _mask(shape: str, cx: float, cy: float, r: float, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        half = 0.85 * r  # about the circle's area
        return (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)
    if shape == "triangle":  # apex up, base 2r wide
        top = cy - r
        return (yy >= top) & (yy <= cy + r) & (np.abs(xx - cx) <= (yy - top) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def _render_frames(background: str, cast: list[_Thing], events: list[_Event], size: int,
                   segment_frames: int) -> tuple[np.ndarray, list[list[dict[str, Any]]], list[_Thing]]:
    """All frames (T, size, size, 3) uint8, per-segment object states, and the final state."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    state = [_Thing(t.shape, t.colour, t.x, t.y, t.radius, False, t.first_segment) for t in cast]
    frames = np.empty((len(events) * segment_frames, size, size, 3), np.uint8)
    frames[:] = BACKGROUND_RGB[background]
    segment_objects: list[list[dict[str, Any]]] = []
    for s, event in enumerate(events):
        if event.new:
            state[event.thing].visible = True
        objects = []
        for k, thing in enumerate(state):
            if not thing.visible:
                continue
            # Position and radius at the segment's first frame, as fractions of the frame side.
            entry: dict[str, Any] = {"object": k, "shape": thing.shape, "colour": thing.colour,
                                     "xy": [round(thing.x / size, 4), round(thing.y / size, 4)],
                                     "radius": round(thing.radius / size, 4)}
            if k == event.thing:
                entry["event"] = "appears" if event.kind == "appears" else event.kind
                if event.direction:
                    entry["direction"] = event.direction
            else:
                entry["event"] = "stays"
            objects.append(entry)
        segment_objects.append(objects)
        start = [(t.x, t.y, t.radius) for t in state]
        for j in range(segment_frames):
            progress = j / (segment_frames - 1)  # the move ends exactly on the segment's last frame
            frame = frames[s * segment_frames + j]
            for k, thing in enumerate(state):
                x, y, r = start[k]
                if not thing.visible:
                    continue
                if k == event.thing:
                    if event.kind == "moves":
                        dx, dy = DIRECTION_STEP[event.direction]  # type: ignore[index]
                        x += dx * TRAVEL * size * progress
                        y += dy * TRAVEL * size * progress
                    elif event.kind in ("grows", "shrinks"):
                        r *= 1 + ((GROW if event.kind == "grows" else SHRINK) - 1) * progress
                    elif event.kind == "disappears" and j >= segment_frames // 2:
                        continue
                frame[_mask(thing.shape, x, y, r, xx, yy)] = COLOUR_RGB[thing.colour]
        # State at the end of the segment is the start of the next.
        thing = state[event.thing]
        if event.kind == "moves":
            dx, dy = DIRECTION_STEP[event.direction]  # type: ignore[index]
            thing.x += dx * TRAVEL * size
            thing.y += dy * TRAVEL * size
        elif event.kind == "grows":
            thing.radius *= GROW
        elif event.kind == "shrinks":
            thing.radius *= SHRINK
        elif event.kind == "disappears":
            thing.visible = False
    return frames, segment_objects, state


# --------------------------------------------------------------------------- language

def _event_phrase(event: _Event, cast: list[_Thing]) -> str:
    """``a red circle moves left`` / ``the blue square shrinks`` (lower case, no full stop)."""
    thing = cast[event.thing]
    article = "a" if event.new else "the"
    if event.kind == "moves":
        return f"{article} {thing.name} moves {event.direction}"
    return f"{article} {thing.name} {event.kind}"


def _final_state_sentence(final: list[_Thing], cast: list[_Thing]) -> str:
    visible = [t for t in final if t.visible]
    if not visible:
        return "At the last frame, no shape is left on the screen."
    names = []
    for t, original in zip(final, cast):
        if not t.visible:
            continue
        size_word = ("large " if t.radius > original.radius * 1.01
                     else "small " if t.radius < original.radius * 0.99 else "")
        names.append(f"a {size_word}{t.name}")
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    verb = "is" if len(names) == 1 else "are"
    shapes = "shape" if len(names) == 1 else "shapes"
    return f"At the last frame, {NUMBER_WORDS[len(names)]} {shapes} {verb} visible: {listed}."


def _describe(background: str, cast: list[_Thing], events: list[_Event], final: list[_Thing],
              rng: np.random.Generator) -> str:
    count = len(cast)
    sentences = [f"The video shows {NUMBER_WORDS[count]} shape{'s' if count > 1 else ''} on a "
                 f"{background} background."]
    for s, event in enumerate(events):
        phrase = _event_phrase(event, cast)
        still = [f"the {cast[k].name}" for k in range(len(cast))
                 if k != event.thing and cast[k].first_segment < s and _on_screen_at(k, s, events)]
        sentence = f"{SEGMENT_NAMES[s]}, {phrase}"
        if still and event.kind in ("moves", "grows", "shrinks"):
            verb = "stays" if len(still) == 1 else "stay"
            sentence += f" while {' and '.join(still)} {verb} still"
        sentences.append(sentence + ".")
    if rng.random() < 0.7:
        sentences.append(_final_state_sentence(final, cast))
    return " ".join(sentences)


def _on_screen_at(k: int, segment: int, events: list[_Event]) -> bool:
    """Whether shape k is still on screen when ``segment`` starts (no earlier 'disappears')."""
    return not any(e.kind == "disappears" and e.thing == k for e in events[:segment])


def _order_sentence(cast: list[_Thing], events: list[_Event]) -> str:
    a, b, c = (_event_phrase(e, cast) for e in events)
    return f"First {a}, then {b}, and at the end {c}."


def _qa(video_id: str, background: str, cast: list[_Thing], events: list[_Event],
        final: list[_Thing], rng: np.random.Generator) -> tuple[list[dict[str, str]], str]:
    """The QA pairs of one video (fixed order, phrasing drawn from rng) and its description."""
    first = cast[events[0].thing]
    middle = cast[events[1].thing]
    description = _describe(background, cast, events, final, rng)

    def pick(*options: str) -> str:
        return str(options[int(rng.integers(len(options)))])

    pairs = [
        ("colour", pick("What colour is the first shape in the video?",
                        "What colour is the shape that moves in the beginning?"), first.colour),
        ("shape", pick("What shape moves in the beginning of the video?",
                       "Which shape appears first?"), first.shape),
        ("direction", pick(f"Which direction does the {first.name} move in the beginning?",
                           f"In the beginning, which direction does the {first.name} move?"),
         str(events[0].direction)),
        ("count", pick("How many shapes are there in the video?",
                       "How many shapes appear in the video?"), NUMBER_WORDS[len(cast)]),
        ("object", pick("Which shape moves in the middle of the video?",
                        "What moves in the middle of the video?"), f"the {middle.name}"),
        ("event", pick("What happens at the end of the video?", "What happens at the end?"),
         _event_phrase(events[2], cast)),
        ("order", pick("What happens first, then, and at the end?",
                       "Describe the order of events in the video."), _order_sentence(cast, events)),
        ("describe", pick("Describe this video in detail.", "What happens in the video? Describe it in detail."),
         description),
    ]
    return [{"video_id": video_id, "q": q, "a": a, "qtype": qtype} for qtype, q, a in pairs], description


# --------------------------------------------------------------------------- encoding

def pick_codec(requested: str = "auto") -> str:
    """libx264 when the installed ffmpeg has it (Debian's does), else the built-in mpeg4."""
    if requested != "auto":
        return requested
    out = subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True, check=True)
    return "libx264" if " libx264 " in out.stdout else "mpeg4"


def write_mp4(frames: np.ndarray, path: Path, fps: int, codec: str) -> None:
    """Pipe rgb24 frames (T, H, W, 3) into ffmpeg; write ``path`` via a temp name + rename.

    One encoder thread and bitexact flags make the bytes a function of the frames alone on
    a given ffmpeg build.
    """
    t, h, w, _ = frames.shape
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    quality = ["-preset", "veryfast", "-crf", "18"] if codec == "libx264" else ["-q:v", "2"]
    cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-y",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "pipe:0",
           "-c:v", codec, *quality, "-threads", "1", "-pix_fmt", "yuv420p",
           "-fflags", "+bitexact", "-flags:v", "+bitexact", "-map_metadata", "-1",
           "-f", "mp4", str(tmp)]
    try:
        proc = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ffmpeg failed writing {path}: {proc.stderr.decode(errors='replace')[-2000:]}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_broken_video(path: Path, kind: str, rng: np.random.Generator) -> None:
    """Write one broken case: ``empty``, ``corrupt`` (random bytes), ``audio_only`` (an mp4
    with one AAC stream) or ``missing`` (nothing is written; an existing file is removed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "empty":
        write_bytes_atomic(path, b"")
    elif kind == "corrupt":
        write_bytes_atomic(path, rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "audio_only":
        tmp = path.with_name(f".{path.name}.tmp")
        cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-y",
               "-f", "lavfi", "-i", "sine=frequency=440:duration=1:sample_rate=16000",
               "-c:a", "aac", "-fflags", "+bitexact", "-map_metadata", "-1", "-f", "mp4", str(tmp)]
        try:
            proc = subprocess.run(cmd, capture_output=True)
            if proc.returncode != 0:
                raise RuntimeError(f"ffmpeg failed writing {path}: {proc.stderr.decode(errors='replace')[-2000:]}")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    elif kind == "missing":
        path.unlink(missing_ok=True)
    else:
        raise ValueError(f"unknown broken kind {kind!r} (known: {', '.join(BROKEN_KINDS)})")


# --------------------------------------------------------------------------- the world

def _render_one(index: int, seed: int, size: int, fps: int, segment_frames: int, codec: str,
                videos_dir: Path) -> tuple[list[dict[str, str]], dict[str, Any]]:
    video_id = f"vid_{index:05d}"
    rng = np.random.default_rng([seed, index])
    background, cast, events = _plan(rng, size)
    frames, segment_objects, final = _render_frames(background, cast, events, size, segment_frames)
    qa, description = _qa(video_id, background, cast, events, final, rng)
    write_mp4(frames, videos_dir / f"{video_id}.mp4", fps, codec)
    segments = []
    for s, event in enumerate(events):
        segments.append({
            "segment": s,
            "start_s": round(s * segment_frames / fps, 6),
            "end_s": round((s + 1) * segment_frames / fps, 6),
            "start_frame": s * segment_frames,
            "end_frame": (s + 1) * segment_frames,
            "caption": _event_phrase(event, cast),
            "event": {"kind": event.kind, "object": event.thing, "new": event.new,
                      **({"direction": event.direction} if event.direction else {})},
            "objects": segment_objects[s],
        })
    truth = {
        "video_id": video_id,
        "file": f"{VIDEOS_DIR}/{video_id}.mp4",
        "fps": fps,
        "frames": len(frames),
        "width": size,
        "height": size,
        "duration_s": round(len(frames) / fps, 6),
        "background": background,
        "count": len(cast),
        "objects": [{"object": k, "shape": t.shape, "colour": t.colour, "first_segment": t.first_segment}
                    for k, t in enumerate(cast)],
        "final": [{"object": k, "shape": t.shape, "colour": t.colour,
                   "size": round(t.radius / cast[k].radius, 6)} for k, t in enumerate(final) if t.visible],
        "order": _order_sentence(cast, events),
        "caption": description,
        "segments": segments,
    }
    return qa, truth


def _broken_cases(seed: int, count: int, videos_dir: Path) -> tuple[list[dict[str, str]], dict[str, Any]]:
    annotations: list[dict[str, str]] = []
    truth: dict[str, Any] = {}
    for b in range(count):
        kind = BROKEN_KINDS[b % len(BROKEN_KINDS)]
        video_id = f"bad_{b:05d}"
        # A separate stream (third key element) so broken cases never shift the good videos.
        write_broken_video(videos_dir / f"{video_id}.mp4", kind, np.random.default_rng([seed, b, 1]))
        annotations.append({"video_id": video_id, "q": "Describe this video in detail.",
                            "a": "A red circle moves left on a black background.", "qtype": "describe"})
        truth[video_id] = {"video_id": video_id, "file": f"{VIDEOS_DIR}/{video_id}.mp4", "broken": kind,
                           "expected_error": BROKEN_EXPECTED_ERROR[kind]}
    return annotations, truth


def render_world(out: Path, videos: int, seed: int, broken: int = 0, *, size: int = 128, fps: int = 10,
                 segment_frames: int = 10, codec: str = "auto", jobs: int = 2,
                 progress: bool = True) -> WorldInfo:
    """Render ``videos`` good videos (and ``broken`` broken cases) with their annotations.

    Returns a :class:`WorldInfo`. JSON files are written last, atomically; a video file that
    is present under its final name is complete.
    """
    config = SynthConfig(out=Path(out), videos=videos, seed=seed, broken=broken, size=size, fps=fps,
                         segment_frames=segment_frames, codec=codec, jobs=jobs)  # validates
    started = time.perf_counter()
    out = Path(out)
    videos_dir = out / VIDEOS_DIR
    videos_dir.mkdir(parents=True, exist_ok=True)
    codec = pick_codec(config.codec)
    annotations: list[dict[str, str]] = []
    truth: dict[str, Any] = {}
    # Threads suffice: the encoding runs in the ffmpeg child processes. Results come back in
    # index order, so the files do not depend on jobs.
    with ThreadPoolExecutor(max_workers=jobs) as pool, \
            tqdm(total=videos, desc="synth", unit="video", disable=not progress) as bar:
        results = pool.map(lambda i: _render_one(i, seed, size, fps, segment_frames, codec, videos_dir),
                           range(videos))
        for qa, video_truth in results:
            annotations.extend(qa)
            truth[video_truth["video_id"]] = video_truth
            bar.update(1)
    broken_qa, broken_truth = _broken_cases(seed, broken, videos_dir)
    annotations.extend(broken_qa)
    truth.update(broken_truth)
    captions = {
        "format": FORMAT,
        "note": "Ground truth for tests and exact evaluation. Never fed to a model as a prompt.",
        "settings": {"videos": videos, "seed": seed, "broken": broken, "size": size, "fps": fps,
                     "segment_frames": segment_frames, "codec": codec},
        "videos": truth,
    }
    write_text_atomic(out / CAPTIONS_NAME, json.dumps(captions, indent=1) + "\n")
    write_text_atomic(out / ANNOTATIONS_NAME, json.dumps(annotations, indent=1) + "\n")
    return WorldInfo(root=out, videos_dir=videos_dir, annotations=out / ANNOTATIONS_NAME,
                     captions=out / CAPTIONS_NAME, video_ids=[f"vid_{i:05d}" for i in range(videos)],
                     broken_ids=list(broken_truth), qa_pairs=len(annotations),
                     seconds=time.perf_counter() - started)


def load_captions(folder: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The ground truth of a rendered world: video_id -> facts (segments, objects, ...)."""
    path = Path(folder)
    if path.is_dir():
        path = path / CAPTIONS_NAME
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a synthetic-world captions file (format {FORMAT!r} expected)")
    return data["videos"]


def main(argv: list[str] | None = None, prog: str = "vlmr synth") -> int:
    config = parse_config(SynthConfig, argv, prog=prog)
    if shutil.which("ffmpeg") is None:
        log.error("ffmpeg is not installed (make setup installs it)")
        return 1
    info = render_world(config.out, config.videos, config.seed, config.broken, size=config.size,
                        fps=config.fps, segment_frames=config.segment_frames, codec=config.codec,
                        jobs=config.jobs)
    log.info("synth: %d videos + %d broken, %d QA pairs -> %s (%.1f s)", len(info.video_ids),
             len(info.broken_ids), info.qa_pairs, info.root, info.seconds)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("VLMR_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    sys.exit(main(sys.argv[1:], prog="python -m dataengine.synth"))
