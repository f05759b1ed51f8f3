"""Two ranks under torchrun (CPU, gloo): equal work, disjoint samples, stop and resume, no hang.

    .venv/bin/python -m pytest -q tests/test_reader_dist.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from test_reader import write_set

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_stream_disjoint_equal_shares_and_resume(tmp_path):
    # 29 easy samples in shards of 8 (the last holds 5), 18 hard in shards of 7: uneven
    # shards, a total that two ranks cannot split evenly, fewer hard shards than readers.
    folder = write_set(tmp_path / "set", [("easy", 29, 8), ("hard", 18, 7)])
    out = tmp_path / "out.json"
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(ROOT / "tests" / "reader_dist_worker.py"),
         str(folder), str(out)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert len(ranks) == 2
    per_rank = (29 + 18) // 2
    for r in ranks:
        assert r["head"] + r["rest"] == r["expected"]  # stop, save, resume: the same sequence
        assert len(r["expected"]) == per_rank
        assert r["steps"] == -(-per_rank // 3)  # the same number of batches on both ranks
        assert r["total"] == 2 * per_rank  # the all_reduce over both ranks went through
    a, b = (set(r["expected"]) for r in ranks)
    assert a.isdisjoint(b) and len(a | b) == 2 * per_rank
