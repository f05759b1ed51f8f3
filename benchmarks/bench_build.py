"""Build speed, phase by phase, against the baselines of each phase, in one process.

On the same synthetic videos:

* decode:  our ``decode_video`` (50 frames + 3 clips × 20 at 224 px) against a full
           ``ffmpeg -i V -f null -`` decode (best of alternating rounds);
* encode:  encoder frames/s (tiny CLIP by default; ``--encoder small`` for EfficientNet-Lite0 at
           224 px, ``--encoder PATH`` for a real CLIP);
* pack:    MB/s writing paper-size samples (feat 306×1024 + clips 3×276×1024, float16) into
           tars, against copying the same bytes file to file (both fsync each file);
* memory:  peak RSS of a whole ``build()`` of the world.

Run::

    python benchmarks/bench_build.py [--videos 24] [--encoder tiny|small|PATH] [--pack-samples 100]
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import time_full, time_ours  # noqa: E402  (same folder, not a package)

from dataengine import build, features, pack  # noqa: E402
from dataengine.config import parse_config  # noqa: E402
from dataengine.synth import render_world  # noqa: E402


@dataclass
class BenchConfig:
    """Build-phase speeds against their baselines."""

    videos: int = 24
    """Synthetic videos."""
    rounds: int = 3
    """Alternating timing rounds for decode; best kept."""
    encoder: str = "tiny"
    """Encoder for the frames/s figure: 'tiny', 'small' (EfficientNet-Lite0) or a local CLIP folder."""
    encode_frames: int = 512
    """Frames pushed through the encoder."""
    pack_samples: int = 100
    """Paper-size samples packed (2.3 MB each)."""


def bench_encode(spec: str, n: int) -> tuple[float, int]:
    encoder = features.load_encoder(spec, batch_size=64)
    s = encoder.image_size
    frames = np.random.default_rng(0).integers(0, 255, (n, s, s, 3), dtype=np.uint8)
    encoder.encode(frames[:64])  # warm-up
    start = time.perf_counter()
    encoder.encode(frames)
    return n / (time.perf_counter() - start), s


def bench_pack(folder: Path, n: int) -> tuple[float, float, int]:
    rng = np.random.default_rng(0)
    feat = rng.standard_normal((306, 1024)).astype(np.float16)
    clips = rng.standard_normal((3, 276, 1024)).astype(np.float16)

    def samples():
        for i in range(n):
            yield {"__key__": f"s{i:06d}", "json": {"id": str(i), "answer_tokens": i},
                   "feat.npy": feat, "clips.npy": clips, "thumb.jpg": b"\xff\xd8" + bytes(4000)}

    out = folder / "pack"
    start = time.perf_counter()
    (stage,) = pack.write_stages(out, [("easy", samples())], maxcount=50)
    pack_s = time.perf_counter() - start
    total = sum(s.bytes for s in stage.shards)
    copy_dir = folder / "copy"
    copy_dir.mkdir()
    start = time.perf_counter()
    for s in stage.shards:
        shutil.copyfile(out / s.url, copy_dir / s.url)
        # pack fsyncs each shard before its rename (a crash never leaves a torn shard): so does the baseline
        with open(copy_dir / s.url, "rb+") as f:
            os.fsync(f.fileno())
    copy_s = time.perf_counter() - start
    return total / pack_s / 1e6, total / copy_s / 1e6, total


def main(argv: list[str] | None = None) -> int:
    config = parse_config(BenchConfig, argv, prog="bench_build.py")
    with tempfile.TemporaryDirectory(prefix="bench_build_") as tmp:
        tmp = Path(tmp)
        world = render_world(tmp / "world", videos=config.videos, seed=0, progress=False)
        paths = [world.video_path(v) for v in world.video_ids]
        time_ours(paths[:2]), time_full(paths[:2])
        ours, full = [], []
        for _ in range(config.rounds):
            ours.append(time_ours(paths))
            full.append(time_full(paths))
        n = len(paths)
        print(f"decode  ours {n / min(ours):6.1f} videos/s  full ffmpeg decode {n / min(full):6.1f} videos/s  "
              f"ratio {min(full) / min(ours):.2f}")
        fps, size = bench_encode(config.encoder, config.encode_frames)
        print(f"encode  {fps:8.1f} frames/s  ({config.encoder} encoder, {size} px)")
        pack_mb, copy_mb, total = bench_pack(tmp, config.pack_samples)
        print(f"pack    {pack_mb:8.1f} MB/s  copy+fsync {copy_mb:8.1f} MB/s  ratio {pack_mb / copy_mb:.2f}  "
              f"({config.pack_samples} paper-size samples, {total / 1e6:.0f} MB)")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        summary = build.build(build.BuildConfig(
            annotations=[str(world.annotations)], videos=str(world.videos_dir), out=str(tmp / "shards"),
            cache=str(tmp / "cache"), workers=2))
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"build   {summary.videos_ok} videos, {sum(summary.samples.values())} samples "
              f"(frames 50, clips 3x20) in {seconds:.1f} s; peak RSS {peak:.0f} MB "
              f"(process peak before the build {before:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
