"""Shared fixtures for every test file.

``synth_world`` (session scope)
    A synthetic world rendered once per test session with
    ``dataengine.synth.render_world(folder, videos=6, seed=0)`` (128x128, 10 fps, 30 frames,
    three 10-frame segments, no broken cases). Returns the folder ``Path``::

        folder/videos/vid_00000.mp4 ... vid_00005.mp4
        folder/annotations.json   (Video-ChatGPT list of {"video_id", "q", "a", "qtype"}, 8 per video)
        folder/captions.json      (ground truth; read with dataengine.synth.load_captions)

    Shared by all tests: treat it as read-only (copy it before changing anything).

``broken_videos`` (function scope)
    Undecodable inputs in a fresh ``tmp_path``: a dict ``name -> BrokenVideo(path, reason)``
    where ``reason`` is the ``DecodeError.reason`` that ``dataengine.decode`` must give:

        missing     a path that does not exist                      -> "missing"
        empty       a 0-byte .mp4                                   -> "empty"
        corrupt     4 KiB of random bytes named .mp4                -> "corrupt"
        truncated   the first half of a real mp4 (index at the end) -> "corrupt"
        audio_only  an .m4a with one AAC stream and no video        -> "no_video_stream"

    ``BrokenVideo`` is a NamedTuple, so ``for name, (path, reason) in broken_videos.items()``.

``one_thread`` (module scope)
    Torch on one intra-op thread for the rest of the module: on shared, busy cores, two spinning
    OpenMP threads per op make the tiny models tens of times slower. Files that run models take
    it for every test with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class BrokenVideo(NamedTuple):
    path: Path
    reason: str


@pytest.fixture(scope="session")
def synth_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dataengine.synth import render_world

    folder = tmp_path_factory.mktemp("synth_world")
    render_world(folder, videos=6, seed=0, progress=False)
    return folder


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-y", *args], check=True)


@pytest.fixture
def broken_videos(tmp_path: Path) -> dict[str, BrokenVideo]:
    rng = np.random.default_rng(0)
    cases: dict[str, BrokenVideo] = {}

    cases["missing"] = BrokenVideo(tmp_path / "does_not_exist.mp4", "missing")

    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    cases["empty"] = BrokenVideo(empty, "empty")

    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    cases["corrupt"] = BrokenVideo(corrupt, "corrupt")

    # Without +faststart the mp4 index (moov) is written last, so half a file has none.
    whole = tmp_path / "whole.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=96x96:rate=10:duration=2", "-c:v", "libx264",
            "-pix_fmt", "yuv420p", str(whole))
    truncated = tmp_path / "truncated.mp4"
    data = whole.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    whole.unlink()
    cases["truncated"] = BrokenVideo(truncated, "corrupt")

    audio = tmp_path / "audio_only.m4a"
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1:sample_rate=16000", "-c:a", "aac", str(audio))
    cases["audio_only"] = BrokenVideo(audio, "no_video_stream")
    return cases
