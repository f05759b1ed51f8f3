"""Decode speed: our selective decode against a plain full ffmpeg decode, in one process.

Renders a synthetic world into a temp folder, then times, over the same videos and in
alternating rounds (best round kept, so both sides see the same machine load):

* ours:  ``decode_video(V, frames=50, clips=3, clip_frames=20, size=224)``, one video at a time
         (in-process PyAV probe + one ffmpeg run that selects, scales, crops and pipes rgb24);
* ours with ``probe_backend="ffprobe"`` (a second process launch per video);
* pool:  the same through ``decode_many(workers=W)``;
* full:  ``ffmpeg -i V -f null -``, a full decode that writes nothing (the baseline).

Run::

    python benchmarks/bench_decode.py                          # 24 videos of 3 s (30 frames)
    python benchmarks/bench_decode.py --segment-frames 100     # 30 s videos (300 frames)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dataengine.config import parse_config
from dataengine.decode import decode_many, decode_video
from dataengine.synth import render_world


@dataclass
class BenchConfig:
    """Decode speed against a full ffmpeg decode."""

    videos: int = 24
    """Synthetic videos to decode."""
    segment_frames: int = 10
    """Frames per segment (a video is three segments at 10 fps)."""
    size: int = 128
    """Side of the rendered videos in pixels."""
    rounds: int = 3
    """Alternating timing rounds; the best of each side is reported."""
    workers: int = 2
    """Processes for the decode_many figure."""


def time_ours(paths: list[Path], probe_backend: str = "pyav") -> float:
    start = time.perf_counter()
    for path in paths:
        decode_video(path, frames=50, clips=3, clip_frames=20, size=224, probe_backend=probe_backend)
    return time.perf_counter() - start


def time_pool(paths: list[Path], workers: int) -> float:
    start = time.perf_counter()
    for _, result in decode_many(paths, workers=workers, frames=50, clips=3, clip_frames=20, size=224):
        if isinstance(result, Exception):
            raise result
    return time.perf_counter() - start


def time_full(paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "null", "-"], check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    config = parse_config(BenchConfig, argv, prog="bench_decode.py")
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
        world = render_world(Path(tmp), videos=config.videos, seed=0, size=config.size,
                             segment_frames=config.segment_frames, progress=False)
        paths = [world.video_path(v) for v in world.video_ids]
        frames = 3 * config.segment_frames
        time_ours(paths[:2]), time_full(paths[:2])  # warm the page cache and the binaries
        ours, ours_ffprobe, full, pool = [], [], [], []
        for _ in range(config.rounds):
            ours.append(time_ours(paths))
            full.append(time_full(paths))
            ours_ffprobe.append(time_ours(paths, "ffprobe"))
            pool.append(time_pool(paths, config.workers))
        n = len(paths)
        ours_rate, full_rate, pool_rate = n / min(ours), n / min(full), n / min(pool)
        ffprobe_rate = n / min(ours_ffprobe)
        print(f"videos: {n} x {frames} frames {config.size}x{config.size} h264; "
              f"decode frames=50 clips=3x20 size=224; best of {config.rounds} rounds")
        print(f"full decode (ffmpeg -f null): {full_rate:7.1f} videos/s")
        print(f"ours decode_video (inline):   {ours_rate:7.1f} videos/s   "
              f"ratio ours/full = {ours_rate / full_rate:.2f}")
        print(f"ours, ffprobe probe (inline): {ffprobe_rate:7.1f} videos/s   "
              f"ratio ours/full = {ffprobe_rate / full_rate:.2f}")
        print(f"ours decode_many(workers={config.workers}):  {pool_rate:7.1f} videos/s   "
              f"ratio pool/full = {pool_rate / full_rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
