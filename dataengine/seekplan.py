"""Which packets to decode to get given frames: the packet index, seek runs and their cost.

Pure arithmetic over one demux of the video stream (no decoding, no PyAV import), used by
:mod:`dataengine.decode`. Terms:

* **packet position**: 0-based place of a packet in the stream's decode order.
* **frame index** ``n``: the n-th frame a full decode outputs, in presentation order. A packet
  that the container's edit list discards (``packet.is_discard``) is decoded but shown by no
  one, so it has no frame index; every other non-empty packet is one frame. Frame ``n`` is
  therefore the packet with the n-th smallest ``pts`` among the shown packets.
* **run**: a span of packet positions ``[start, end]`` that starts at a keyframe and is
  decoded from there, with nothing before it; ``end`` is the last wanted frame's packet.

A seek plan decodes only its runs; the sequential plan decodes every packet up to the last
wanted frame. :func:`seek_blocker` says when a seek plan cannot be frame-exact; then the
caller must decode sequentially. See docs/decoding.md.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PacketIndex:
    """The video stream's packets in decode order (size-0 flush packets left out)."""

    pts: list[int | None]
    dts: list[int | None]
    key: list[bool]
    discard: list[bool]
    shown: list[int] = field(init=False)
    """Packet position of each frame index (presentation order); empty when pts are missing."""

    def __post_init__(self):
        if not len(self.pts) == len(self.dts) == len(self.key) == len(self.discard):
            raise ValueError("PacketIndex columns differ in length")
        visible = [i for i, d in enumerate(self.discard) if not d]
        if all(self.pts[i] is not None for i in visible):
            visible.sort(key=lambda i: (self.pts[i], i))
        else:
            visible = []
        object.__setattr__(self, "shown", visible)

    @property
    def frames(self) -> int:
        """Frames a full decode shows: the packets the edit list does not discard."""
        return sum(1 for d in self.discard if not d)

    def __len__(self) -> int:
        return len(self.pts)


def pts_blocker(index: PacketIndex) -> str | None:
    """Why frames cannot be told apart by presentation timestamp, or None when they can.

    With pts on every packet and no two shown frames sharing one, a decoder that starts at
    the first packet may skip frames nothing references (they are not wanted) and still know
    which frame each output is. Otherwise frames are counted as they come out.
    """
    if not len(index):
        return "no packets"
    if any(p is None for p in index.pts):
        return "packets without a presentation timestamp"
    shown_pts = [index.pts[i] for i in index.shown]
    if len(set(shown_pts)) != len(shown_pts):
        return "two frames share a presentation timestamp"
    return None


def seek_blocker(index: PacketIndex) -> str | None:
    """Why a seek plan would not be frame-exact on this stream, or None when it is.

    Seeking identifies frames by ``pts`` and starts decoding at keyframes, so it needs:
    a pts on every packet, no two shown frames with the same pts, a keyframe first, and
    closed GOPs: nothing decoded after a keyframe is shown before it. An open GOP (x265's
    default, x264 ``open-gop``) has "leading" pictures that reference the previous GOP;
    decoding them from the keyframe alone gives different pixels. Variable frame rate is
    no obstacle: frames are matched by pts, never by time arithmetic.
    """
    blocker = pts_blocker(index)
    if blocker:
        return blocker
    if not index.key[0]:
        return "the stream does not start with a keyframe"
    keyframe_pts = None
    for pts, key in zip(index.pts, index.key):
        if key:
            keyframe_pts = pts
        elif pts < keyframe_pts:
            return "open GOP (pictures shown before the keyframe they follow)"
    return None


@dataclass(frozen=True)
class Run:
    start: int
    """Packet position of the keyframe decoding starts at."""
    end: int
    """Packet position of the last wanted frame in this run."""
    targets: frozenset[int]
    """Frame indices this run delivers."""

    @property
    def packets(self) -> int:
        return self.end - self.start + 1


def seek_runs(index: PacketIndex, wanted: list[int]) -> list[Run]:
    """The runs that decode the frames ``wanted`` (frame indices), merged where they overlap.

    Each wanted frame needs its packet and everything from the last keyframe at or before it
    (in decode order). Runs that overlap or touch are merged into one, decoded without a
    restart. Needs ``seek_blocker(index) is None``.
    """
    keys = [i for i, k in enumerate(index.key) if k]
    spans = []
    for n in sorted(set(wanted)):
        position = index.shown[n]
        start = keys[bisect.bisect_right(keys, position) - 1]
        spans.append((start, position, n))
    spans.sort()
    runs: list[Run] = []
    for start, end, n in spans:
        if runs and start <= runs[-1].end + 1:
            last = runs[-1]
            runs[-1] = Run(last.start, max(last.end, end), last.targets | {n})
        else:
            runs.append(Run(start, end, frozenset({n})))
    return runs


def sequential_run(index: PacketIndex, wanted: list[int]) -> Run:
    """The whole stream from its first packet to the last wanted frame's, as one run.

    Needs ``pts_blocker(index) is None`` (not closed GOPs: nothing is skipped over).
    """
    return Run(0, max(index.shown[n] for n in set(wanted)), frozenset(wanted))


def sequential_cost(index: PacketIndex, wanted: list[int]) -> int:
    """Packets a sequential decode feeds before the last wanted frame has come out."""
    if not wanted:
        return 0
    if index.shown:
        return max(index.shown[n] for n in set(wanted)) + 1
    return len(index)  # without pts the packet of a frame is unknown: assume the whole stream


SEEK_ADVANTAGE = 0.75
"""A seek plan is chosen only when it decodes at most this fraction of the sequential plan's
packets: each run restarts the decoder and its thread pipeline, and may seek the demuxer."""


def choose_plan(index: PacketIndex, wanted: list[int]) -> tuple[str, list[Run], str]:
    """``("seek", runs, why)`` or ``("sequential", [], why)``: the cheaper exact plan."""
    blocker = seek_blocker(index)
    if blocker:
        return "sequential", [], blocker
    runs = seek_runs(index, wanted)
    seek, sequential = sum(r.packets for r in runs), sequential_cost(index, wanted)
    if seek <= SEEK_ADVANTAGE * sequential:
        return "seek", runs, f"{seek} of {sequential} packets"
    return "sequential", [], f"seeking would decode {seek} of {sequential} packets"
