"""Decode speed: our decode at the paper's settings against a plain full ffmpeg decode of the same file.

For a 10 s, a 2 min and a 10 min 720p H.264 video (``testsrc2``, 25 fps, a keyframe every
2 s as streaming encodes have; rendered once and cached under ``--cache``), times in
alternating rounds (best round kept, so both sides see the same machine load):

* ours: ``decode_video(V, frames=50, clips=3, clip_frames=20, size=224)`` (PyAV packet index,
  then the cheaper exact plan: sequential or keyframe seeks), one video at a time;
* full: ``ffmpeg -i V -map 0:0 -f null -`` (built with ffmpeg-python), a full decode that
  writes nothing: the baseline.

and prints ours / full per video in wall time (goals: <= 1.0 on short videos, <= 0.3 on the
10-minute one) and in CPU seconds (all threads; steadier than wall time on a shared machine),
with the plan chosen and the packets it decoded. Then videos/s through
``decode_many(workers=W)`` over copies of the 10 s video, against full decodes one after
another.

Run::

    python benchmarks/bench_decode.py                    # all three lengths (first run renders ~2 min)
    python benchmarks/bench_decode.py --lengths 10,120   # skip the 10-minute one
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dataengine.config import parse_config
from dataengine.decode import decode_many, decode_video, full_decode_command


@dataclass
class BenchConfig:
    """Decode speed against a full ffmpeg decode."""

    lengths: str = "10,120,600"
    """Video lengths in seconds, comma-separated."""
    width: int = 1280
    height: int = 720
    gop: int = 50
    """Frames between keyframes of the rendered videos."""
    rounds: int = 3
    """Alternating timing rounds; the best of each side is reported."""
    workers: int = 2
    """Processes for the decode_many figure."""
    pool_videos: int = 8
    """Copies of the 10 s video decoded through the pool."""
    cache: str = os.path.join(tempfile.gettempdir(), "vlmr_bench_decode")
    """Folder the rendered videos are kept in between runs."""


def render(path: Path, seconds: int, config: BenchConfig) -> Path:
    if path.exists():
        return path
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size={config.width}x{config.height}:rate=25:duration={seconds}",
                    "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-g", str(config.gop),
                    str(tmp)], check=True)
    tmp.rename(path)
    return path


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def time_ours(paths: list[Path], cpu: list[float] | None = None) -> float:
    """Wall seconds; appends the CPU seconds (all threads of this process) to ``cpu``."""
    start, start_cpu = time.perf_counter(), cpu_seconds(resource.RUSAGE_SELF)
    for path in paths:
        decode_video(path, frames=50, clips=3, clip_frames=20, size=224)
    if cpu is not None:
        cpu.append(cpu_seconds(resource.RUSAGE_SELF) - start_cpu)
    return time.perf_counter() - start


def time_full(paths: list[Path], cpu: list[float] | None = None) -> float:
    """Wall seconds; appends the CPU seconds of the ffmpeg processes to ``cpu``."""
    start, start_cpu = time.perf_counter(), cpu_seconds(resource.RUSAGE_CHILDREN)
    for path in paths:
        full_decode_command(path, 0).run(quiet=True)
    if cpu is not None:
        cpu.append(cpu_seconds(resource.RUSAGE_CHILDREN) - start_cpu)
    return time.perf_counter() - start


def time_pool(paths: list[Path], workers: int) -> float:
    start = time.perf_counter()
    for _, result in decode_many(paths, workers=workers, frames=50, clips=3, clip_frames=20, size=224):
        if isinstance(result, Exception):
            raise result
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    config = parse_config(BenchConfig, argv, prog="bench_decode.py")
    cache = Path(config.cache)
    cache.mkdir(parents=True, exist_ok=True)
    lengths = [int(x) for x in config.lengths.split(",") if x]
    videos = {s: render(cache / f"testsrc2_{config.width}x{config.height}_g{config.gop}_{s}s.mp4", s, config)
              for s in lengths}
    print(f"{config.width}x{config.height} h264 25 fps, keyframe every {config.gop} frames; "
          f"decode frames=50 clips=3x20 size=224; best of {config.rounds} rounds; load avg {os.getloadavg()[0]:.1f}")
    for seconds, path in videos.items():
        ours, full, ours_cpu, full_cpu = [], [], [], []
        for _ in range(config.rounds):
            ours.append(time_ours([path], ours_cpu))
            full.append(time_full([path], full_cpu))
        video = decode_video(path, frames=50, clips=3, clip_frames=20, size=224)
        print(f"{seconds:5d} s video: ours {min(ours):7.2f} s  full decode {min(full):7.2f} s  "
              f"ratio ours/full = {min(ours) / min(full):.2f}  (CPU seconds {min(ours_cpu):.2f} / "
              f"{min(full_cpu):.2f} = {min(ours_cpu) / min(full_cpu):.2f})   plan {video.plan}, "
              f"{video.decoded_packets} of {video.info.frames} packets decoded")
    short = videos.get(min(lengths))
    if short is not None and config.pool_videos:
        with tempfile.TemporaryDirectory(prefix="bench_decode_pool_") as tmp:
            copies = []
            for i in range(config.pool_videos):  # distinct names, same bytes
                copy = Path(tmp) / f"copy_{i}.mp4"
                copy.symlink_to(short)
                copies.append(copy)
            pool, full = [], []
            for _ in range(config.rounds):
                pool.append(time_pool(copies, config.workers))
                full.append(time_full(copies))
            n = len(copies)
            print(f"decode_many(workers={config.workers}) over {n} x {min(lengths)} s: {n / min(pool):.2f} videos/s   "
                  f"full decodes one after another: {n / min(full):.2f} videos/s   "
                  f"ratio = {min(full) / min(pool):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
