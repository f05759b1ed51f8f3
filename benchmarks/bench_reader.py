"""Benchmark: ShardReader against plain webdataset and the raw sequential read of the same tars.

    .venv/bin/python benchmarks/bench_reader.py                  # 200 paper-size samples (~460 MB)
    .venv/bin/python benchmarks/bench_reader.py --samples 40 --rounds 3   # a quick look

Writes paper-size samples (feat 306x1024 and clips 3x276x1024, float16: 2.3 MB each) with
the real ShardWriter into a temporary folder (or ``--data``, kept for later runs), reads
them once to warm the page cache, then measures, on the same shards:

1. one process: samples/s and MB/s of the raw sequential read (``readinto`` a reused 8 MiB
   buffer: the I/O floor), ``webdataset.WebDataset(...).decode()``, and ShardReader
   (samples as writable float16 tensors) with and without its prefetch thread, with
   ``shuffle="window"``, and with ``fields=("json", "feat")`` (what SFT reads); and the same
   decoding as a webdataset pipeline stage (``wds.DataPipeline(..., decoded_samples())``, no
   prefetch thread);
2. ShardReader behind a torch DataLoader with 0, 1 and 2 workers;
3. resume in the middle of the epoch: time to the first sample and to the end of the
   epoch, against starting from the beginning, and against a replay that reads and drops
   the consumed half (what a loader without real state does);
4. peak RSS of a fresh process reading 1x and 10x the data (a manifest that lists the
   same tars ten times).

Timings alternate between the contestants and keep each one's best of ``--rounds``; the
CPU time (user + system of this process, which a busy shared machine disturbs less than
wall time) is printed beside each. The ratios are the figures to read: this machine's
absolute numbers move with its load.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataengine import schema  # noqa: E402
from dataengine.pack import ShardWriter  # noqa: E402
from dataengine.reader import ShardReader  # noqa: E402
from dataengine.schema import Manifest  # noqa: E402

FEAT = (306, 1024)
CLIPS = (3, 276, 1024)


def make_shards(folder: Path, samples: int, per_shard: int) -> None:
    rng = np.random.default_rng(0)
    feat = rng.standard_normal(FEAT).astype(np.float16)
    clips = rng.standard_normal(CLIPS).astype(np.float16)
    with ShardWriter(folder, "easy", maxcount=per_shard) as writer:
        for i in range(samples):
            conv = [{"from": "human", "value": "<video>\nDescribe this video in detail."},
                    {"from": "gpt", "value": "A red circle moves left. " * (1 + i % 5)}]
            writer.write({"__key__": f"s{i:06d}", "json": {"id": i, "answer_tokens": i, "conversations": conv},
                          "feat.npy": feat, "clips.npy": clips})
    Manifest(stages=[writer.info], samples=samples).save(folder)


def ten_times(folder: Path, out: Path) -> Path:
    """A manifest listing the same tars ten times: 10x the data without 10x the disk."""
    stage = Manifest.load(folder).stage("easy")
    shards = [schema.ShardInfo(**{**vars(s), "url": str(folder / s.url)}) for s in stage.shards] * 10
    out.mkdir(parents=True, exist_ok=True)
    Manifest(stages=[schema.StageInfo("easy", shards)], samples=10 * stage.samples).save(out)
    return out


# ------------------------------------------------------------------------- contestants

def raw_read(files: list[str]) -> int:
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return 0


def webdataset_read(files: list[str]) -> int:
    import webdataset as wds

    n = 0
    for sample in wds.WebDataset(files, shardshuffle=False).decode():
        assert sample["feat.npy"].dtype == np.float16
        n += 1
    return n


def wds_stage_read(files: list[str]) -> int:
    """The reader's decoding as a stage of a webdataset pipeline (dataengine.wds_stage)."""
    import webdataset as wds

    from dataengine.wds_stage import decoded_samples

    n = 0
    for sample in wds.DataPipeline(wds.SimpleShardList(files), decoded_samples()):
        assert sample["feat"].dtype.is_floating_point
        n += 1
    return n


def reader_read(folder: Path, **kw) -> int:
    n = 0
    for sample in ShardReader(folder, stages=["easy"], **kw):
        assert sample["feat"].dtype.is_floating_point
        n += 1
    return n


def busy_consumer(folder: Path, prefetch_bytes: int, seconds: float) -> int:
    """A consumer that spends ``seconds`` per sample outside the GIL (a GPU step, say)."""
    n = 0
    for _ in ShardReader(folder, stages=["easy"], shuffle="none", prefetch_bytes=prefetch_bytes):
        time.sleep(seconds)
        n += 1
    return n


def loader_read(folder: Path, workers: int) -> int:
    reader = ShardReader(folder, stages=["easy"], shuffle="none")
    return sum(1 for _ in DataLoader(reader, batch_size=None, num_workers=workers))


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def race(contestants: dict, rounds: int) -> dict[str, tuple[float, float]]:
    best = {name: (float("inf"), float("inf")) for name in contestants}
    for _ in range(rounds):
        for name, fn in contestants.items():
            wall, cpu = timed(fn)
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def report(title: str, best: dict, samples: int, nbytes: int, base: str, second: str | None = None) -> list[dict]:
    print(f"\n{title}")
    header = f"  {'':34s} {'samples/s':>10s} {'MB/s':>8s} {'x ' + base:>10s}"
    if second:
        header += f" {'x ' + second:>14s}"
    print(header + f" {'cpu x ' + base:>14s}")
    rows = []
    for name, (wall, cpu) in best.items():
        row = {"name": name, "samples_per_s": samples / wall, "mb_per_s": nbytes / wall / 1e6,
               "vs_" + base: best[base][0] / wall, "cpu_vs_" + base: best[base][1] / cpu}
        line = f"  {name:34s} {row['samples_per_s']:10.0f} {row['mb_per_s']:8.0f} {row['vs_' + base]:10.2f}"
        if second:
            row["vs_" + second] = best[second][0] / wall
            line += f" {row['vs_' + second]:14.2f}"
        print(line + f" {row['cpu_vs_' + base]:14.2f}")
        rows.append(row)
    return rows


def resume_costs(folder: Path, samples: int, rounds: int) -> dict:
    half = samples // 2

    def first_and_rest(reader: ShardReader) -> tuple[float, float]:
        t0 = time.perf_counter()
        it = iter(reader)
        next(it)
        first = time.perf_counter() - t0
        for _ in it:
            pass
        return first, time.perf_counter() - t0

    def from_start():
        return first_and_rest(ShardReader(folder, stages=["easy"], shuffle="none"))

    def resumed():
        reader = ShardReader(folder, stages=["easy"], shuffle="none")
        reader.load_state_dict(dict(reader.state_dict(), yielded=half))
        return first_and_rest(reader)

    def replay():  # read and drop the consumed half, as a loader without real state does
        t0 = time.perf_counter()
        it = iter(ShardReader(folder, stages=["easy"], shuffle="none"))
        for _ in range(half):
            next(it)
        next(it)
        first = time.perf_counter() - t0
        for _ in it:
            pass
        return first, time.perf_counter() - t0

    best = {name: (float("inf"), float("inf")) for name in ("from start", "resume at half", "replay to half")}
    for _ in range(rounds):
        for name, fn in (("from start", from_start), ("resume at half", resumed), ("replay to half", replay)):
            first, total = fn()
            best[name] = (min(best[name][0], first), min(best[name][1], total))
    print(f"\n3. resume in the middle of the epoch ({half} of {samples} samples consumed)")
    print(f"  {'':20s} {'first sample ms':>16s} {'to epoch end s':>16s}")
    for name, (first, total) in best.items():
        print(f"  {name:20s} {first * 1e3:16.1f} {total:16.3f}")
    return {name: {"first_sample_s": f, "to_end_s": t} for name, (f, t) in best.items()}


_RSS_CHILD = """
import os, sys
sys.path.insert(0, sys.argv[2])
from dataengine.reader import ShardReader
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
reader = ShardReader(sys.argv[1], stages=["easy"], allow_outside=True)  # x10 lists the tars by path
base = peak = rss()
for n, sample in enumerate(reader):
    if n % 4 == 0:
        peak = max(peak, rss())
print(base, peak)
"""


def streaming_rss(folder: Path) -> tuple[float, float]:
    """(RSS after imports, peak RSS while streaming the set once) of a fresh process, in MB."""
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(folder), str(Path(__file__).resolve().parent.parent)],
                         capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]) / 1e6, int(out[1]) / 1e6


class BareTensors(IterableDataset):
    """Fresh tensors as big as a sample: what the DataLoader's own worker transfer costs."""

    def __init__(self, samples: int):
        self.samples = samples

    def __iter__(self):
        for _ in range(self.samples):
            yield {"feat": torch.ones(FEAT, dtype=torch.float16), "clips": torch.ones(CLIPS, dtype=torch.float16)}


def bare_loader_read(samples: int, workers: int) -> int:
    return sum(1 for _ in DataLoader(BareTensors(samples), batch_size=None, num_workers=workers))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200, help="paper-size samples to write (2.3 MB each)")
    parser.add_argument("--per-shard", type=int, default=50, help="samples per shard")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; each contestant keeps its best")
    parser.add_argument("--data", type=Path, default=None, help="shard folder to write once and reuse")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # nothing here computes; idle intra-op threads only add noise

    tmp = None
    if args.data is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench_reader."))
        folder = tmp / "set"
    else:
        folder = args.data
    try:
        if not (folder / schema.MANIFEST_NAME).exists():
            print(f"writing {args.samples} paper-size samples to {folder} ...")
            make_shards(folder, args.samples, args.per_shard)
        samples = Manifest.load(folder).stage("easy").samples
        files = sorted(glob.glob(str(folder / "easy-*.tar")))
        nbytes = sum(os.path.getsize(f) for f in files)
        print(f"{samples} samples, {len(files)} shards, {nbytes / 1e6:.0f} MB; {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}; best of {args.rounds} rounds")
        raw_read(files)  # warm the page cache
        results: dict = {"samples": samples, "bytes": nbytes, "load_average": os.getloadavg()[0]}

        best = race({
            "raw": lambda: raw_read(files),
            "webdataset .decode()": lambda: webdataset_read(files),
            "ShardReader none, prefetch": lambda: reader_read(folder, shuffle="none"),
            "ShardReader none, no prefetch": lambda: reader_read(folder, shuffle="none", prefetch_bytes=0),
            "ShardReader window, prefetch": lambda: reader_read(folder, shuffle="window"),
            "ShardReader json+feat, prefetch": lambda: reader_read(folder, shuffle="none", fields=("json", "feat")),
            "wds.DataPipeline + decoded_samples": lambda: wds_stage_read(files),
        }, args.rounds)
        results["one_process"] = report("1. one process (MB/s counts whole tars read)", best, samples,
                                        nbytes, "raw", "webdataset .decode()")

        work = 0.002
        best = race({"no prefetch": lambda: busy_consumer(folder, 0, work),
                     "prefetch 64 MiB": lambda: busy_consumer(folder, 64 << 20, work)}, max(2, args.rounds // 2))
        print(f"\n1b. a consumer busy {work * 1e3:.0f} ms per sample outside the GIL "
              f"(sleeping alone: {samples * work:.2f} s)")
        for name, (wall, _) in best.items():
            print(f"  {name:34s} {wall:8.3f} s")
        results["busy_consumer_s"] = {name: wall for name, (wall, _) in best.items()}

        contestants = {"raw": lambda: raw_read(files)}
        contestants.update({f"DataLoader num_workers={w}": (lambda w=w: loader_read(folder, w)) for w in (0, 1, 2)})
        # the ceiling workers can reach: fresh tensors of the same size, no reading at all
        contestants.update({f"bare tensors, num_workers={w}": (lambda w=w: bare_loader_read(samples, w))
                            for w in (1, 2)})
        best = race(contestants, max(2, args.rounds // 2))
        results["workers"] = report("2. through a torch DataLoader (shuffle none, batch_size=None; one thread)",
                                    best, samples, nbytes, "raw")

        results["resume"] = resume_costs(folder, samples, args.rounds)

        ten = ten_times(folder, folder.parent / (folder.name + "-x10"))
        (base1, peak1), (base10, peak10) = streaming_rss(folder), streaming_rss(ten)
        print("\n4. RSS of a fresh process streaming the set once (defaults: shuffle window, 64 MiB prefetch)")
        print(f"  {'':20s} {'after imports':>14s} {'peak':>8s} {'streaming adds':>15s}")
        print(f"  1x  ({nbytes / 1e6:6.0f} MB)    {base1:11.0f} MB {peak1:5.0f} MB {peak1 - base1:12.0f} MB")
        print(f"  10x ({10 * nbytes / 1e6:6.0f} MB)    {base10:11.0f} MB {peak10:5.0f} MB {peak10 - base10:12.0f} MB")
        results["rss_mb"] = {"1x": {"imports": base1, "peak": peak1}, "10x": {"imports": base10, "peak": peak10}}
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        elif args.data is not None:
            shutil.rmtree(folder.parent / (folder.name + "-x10"), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
