"""ShardReader and the tar parser: the plan, equal work, shuffle, resume, corrupt data, memory,
the buffer pool's ownership, torchdata's state keys, the length guard as the reader's guard,
sources, and the reader's decoding as a webdataset pipeline stage. Shards are written with the real ShardWriter (small float16
features, no videos); damaged shards are made by cutting or editing real tars.

    .venv/bin/python -m pytest -q tests/test_reader.py
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import shutil
import tarfile
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from dataengine import schema
from dataengine.pack import ShardWriter, encode_json, encode_npy
from dataengine.plan import EpochOrder, RankSlice, worker_indices
from dataengine.reader import ShardError, ShardReader, SourceError, reader_state_from_loader, stats_from_loader
from dataengine.schema import Manifest
from dataengine.tario import TarError, TarReader, TruncatedTarError
from train.length import LengthGuard

FEAT_ROWS, DIM = 5, 8


def sample(index: int, *, clips: bool = True, thumb: bool = True) -> dict:
    """Sample ``index``: its answer has ``index`` tokens, so stream order is index order."""
    out = {
        "__key__": f"k{index:05d}",
        "json": {"id": index, "answer_tokens": index,
                 "conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                                   {"from": "gpt", "value": " ".join(["word"] * (index % 7 + 1))}]},
        "feat.npy": np.full((FEAT_ROWS, DIM), index, dtype=np.float16),
    }
    if clips:
        out["clips.npy"] = np.full((2, 3, DIM), -index, dtype=np.float16)
    if thumb:
        out["thumb.jpg"] = b"\xff\xd8" + bytes([index % 256]) * 10
    return out


def write_set(folder: Path, stages: list[tuple[str, int, int]], **kw) -> Path:
    """Stages of (name, samples, samples per shard); global index = stream position."""
    folder.mkdir(parents=True, exist_ok=True)
    infos, index = [], 0
    for name, count, per_shard in stages:
        with ShardWriter(folder, name, maxcount=per_shard) as writer:
            for _ in range(count):
                writer.write(sample(index, **kw))
                index += 1
        infos.append(writer.info)
    Manifest(stages=infos, samples=index).save(folder)
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    # 37 easy samples in shards of 8 (the last holds 5), 23 hard in shards of 10 (the last 3)
    return write_set(tmp_path_factory.mktemp("set"), [("easy", 37, 8), ("hard", 23, 10)])


def ids(samples) -> list[int]:
    return [s["json"]["id"] for s in samples]


def read(source, **kw) -> list[int]:
    kw.setdefault("prefetch_bytes", 0)
    return ids(ShardReader(source, **kw))


def copy_set(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_manifest(folder: Path, url: str, **fields) -> None:
    """Change what the manifest says about one shard."""
    manifest = Manifest.load(folder)
    for stage in manifest.stages:
        for shard in stage.shards:
            if shard.url == url:
                for k, v in fields.items():
                    setattr(shard, k, v)
    manifest.save(folder)


def member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (header offset, data offset) of each member of a tar."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


# ------------------------------------------------------------------------------ tario

def test_tario_reads_what_tarfile_wrote_including_long_names_and_pax(tmp_path):
    long_name = "d" * 60 + "/" + "n" * 120 + ".feat.npy"
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        path = tmp_path / f"f{fmt}.tar"
        members = {"a.json": b"{}", "b.txt": b"x" * 1000, "dir/sub/c.bin": bytes(range(256)) * 3}
        if fmt != tarfile.USTAR_FORMAT:
            members[long_name] = b"long"
        with tarfile.open(path, "w", format=fmt) as tar:
            tar.addfile(tarfile.TarInfo("adir"), None)  # a plain member of size 0
            info = tarfile.TarInfo("somedir")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        with open(path, "rb", buffering=0) as f:
            reader = TarReader(f, str(path))
            got = {}
            while (m := reader.next()) is not None:
                got[m.name] = reader.read(m) if m.size else b""
        assert got == {"adir": b"", **members}, fmt


def test_tario_skips_unread_data_by_seek_and_can_go_back(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"m{i}.bin")
            info.size = 100_000
            tar.addfile(info, io.BytesIO(bytes([i]) * 100_000))
    with open(path, "rb", buffering=0) as f:
        reader = TarReader(f, "s")
        first = reader.next()
        second = reader.next()  # first's data skipped by seek: never read
        assert reader.bytes_read == 2 * 512
        assert reader.read(second) == bytes([1]) * 100_000
        reader.seek(first.offset)
        assert reader.next().name == "m0.bin"


def test_tario_detects_bad_checksum_and_truncation_with_offsets(tmp_path):
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(2):
            info = tarfile.TarInfo(f"m{i}.bin")
            info.size = 2000
            tar.addfile(info, io.BytesIO(b"z" * 2000))
    data = path.read_bytes()
    second_header = 512 + 2048
    bad = bytearray(data)
    bad[second_header + 3] ^= 0x01  # a byte of the second member's name
    with pytest.raises(TarError, match=rf"t.tar: byte {second_header}: header checksum mismatch"):
        reader = TarReader(io.BytesIO(bytes(bad)), "t.tar")
        while reader.next() is not None:
            pass
    for cut in (second_header + 100, second_header + 512 + 10, second_header + 512 + 2001):
        stream = io.BytesIO(data[:cut])
        with pytest.raises(TruncatedTarError, match="t.tar: byte"):
            reader = TarReader(stream, "t.tar")
            while (m := reader.next()) is not None:
                reader.read(m)
    # cut exactly at a member boundary: no end-of-archive block is truncation too
    with pytest.raises(TruncatedTarError, match="without the end-of-archive"):
        reader = TarReader(io.BytesIO(data[:second_header]), "t.tar")
        while reader.next() is not None:
            pass


# ------------------------------------------------------------------------- 1. the plan

def test_plan_ranges_are_contiguous_disjoint_and_cover_the_epoch(shards):
    world, batch, workers = 3, 4, 2
    covered = []
    for rank in range(world):
        reader = ShardReader(shards, stages=["easy", "hard"], rank=rank, world_size=world,
                             batch_size=batch, shuffle="none")
        for worker in range(workers):
            ranges = reader.plan(rank=rank, worker=worker, num_workers=workers)
            for r in ranges:
                assert 1 <= r.count <= batch  # contiguous runs within one shard
                covered.extend((r.url, r.first + k) for k in range(r.count))
    assert len(covered) == len(set(covered)) == 60 // world * world
    # every (rank, worker) yields exactly the samples its plan lists, in that order
    reader = ShardReader(shards, stages=["easy", "hard"], rank=1, world_size=world, batch_size=batch,
                         shuffle="none", prefetch_bytes=0)
    starts = _shard_starts(shards)
    planned = [(r.url, starts[r.url] + r.first + k) for r in reader.plan(rank=1) for k in range(r.count)]
    assert [(s["shard"], int(s["key"][1:])) for s in reader] == planned


def _shard_starts(folder: Path) -> dict[str, int]:
    """Shard URL -> global index of its first sample."""
    starts, index = {}, 0
    for stage in Manifest.load(folder).stages:
        for shard in stage.shards:
            starts[str(folder / shard.url)] = index
            index += shard.samples
    return starts


def test_same_seed_and_epoch_give_the_same_sequence_on_any_machine(shards):
    a = ShardReader(shards, stages=["easy", "hard"], seed=7, epoch=3, window=8)
    b = ShardReader(shards, stages=["easy", "hard"], seed=7, epoch=3, window=8)
    assert a.sequence() == b.sequence() == read(shards, stages=["easy", "hard"], seed=7, epoch=3, window=8)
    assert a.sequence() != ShardReader(shards, stages=["easy", "hard"], seed=7, epoch=4, window=8).sequence()
    assert a.sequence() != ShardReader(shards, stages=["easy", "hard"], seed=8, epoch=3, window=8).sequence()
    # Pinned values: numpy's PCG64 and integer arithmetic only, so any machine agrees; a
    # change here means saved positions from older runs no longer mean the same samples.
    order = EpochOrder([37, 23], shuffle="window", window=8, neighbourhood=2, seed=7, epoch=3)
    assert [order.sample(p) for p in range(12)] == PINNED_WINDOW
    order = EpochOrder([37, 23], shuffle="stage", window=8, neighbourhood=2, seed=7, epoch=3)
    assert [order.sample(p) for p in range(6)] == PINNED_STAGE


PINNED_WINDOW = [10, 9, 12, 13, 14, 8, 11, 15, 6, 2, 5, 7]
PINNED_STAGE = [1, 26, 15, 25, 32, 4]


# ------------------------------------------------------------------- 2. equal work

@pytest.mark.parametrize("world,batch,workers,remainder", [
    (2, 1, 1, "drop"), (3, 4, 2, "drop"), (4, 3, 3, "drop"), (7, 2, 2, "drop"),
    (3, 4, 2, "repeat"), (7, 5, 2, "repeat")])
def test_every_rank_yields_the_same_count_disjoint_even_with_few_shards(shards, world, batch, workers, remainder):
    per_rank, seen = None, []
    for rank in range(world):
        reader = ShardReader(shards, stages=["hard"], rank=rank, world_size=world, batch_size=batch,
                             remainder=remainder, shuffle="window", window=4)
        got = []
        for worker in range(workers):  # what each DataLoader worker yields, via the plan
            got += [(r.url, r.first + k) for r in reader.plan(rank=rank, worker=worker, num_workers=workers)
                    for k in range(r.count)]
        assert len(got) == len(reader)
        per_rank = len(got) if per_rank is None else per_rank
        assert len(got) == per_rank  # 3 hard shards < ranks x workers: ranges split shards
        seen += got
    if remainder == "drop":
        assert per_rank == 23 // world and len(set(seen)) == len(seen)
    else:
        assert per_rank == -(-23 // world) and len(set(seen)) == 23


def test_tiny_set_smaller_than_ranks_times_workers(tmp_path):
    folder = write_set(tmp_path / "tiny", [("easy", 3, 8)])
    from torch.utils.data import DataLoader
    counts = []
    for rank in range(2):
        reader = ShardReader(folder, stages=["easy"], rank=rank, world_size=2, shuffle="none")
        counts.append(ids(DataLoader(reader, batch_size=None, num_workers=2)))
    assert [len(c) for c in counts] == [1, 1] and set(counts[0]).isdisjoint(counts[1])
    # "repeat": 2 each, the missing position repeats the sequence from its start
    got = [read(folder, stages=["easy"], rank=r, world_size=2, shuffle="none", remainder="repeat")
           for r in range(2)]
    assert got == [[0, 2], [1, 0]]


# -------------------------------------------------------------------------- 3. shuffle

def test_window_shuffle_keeps_the_curriculum(shards):
    window, neighbourhood = 4, 3
    seq = read(shards, stages=["easy", "hard"], shuffle="window", window=window,
               neighbourhood=neighbourhood, seed=1)
    assert sorted(seq) == list(range(60)) and seq != list(range(60))
    for position, index in enumerate(seq):
        assert abs(position - index) < window * neighbourhood  # bounded displacement
        assert (index < 37) == (position < 37)  # never across a stage boundary
    # whole windows stay together: each window of the sequence is one window of the stream
    for start in range(0, 36, window):
        assert len({i // window for i in seq[start:start + window]}) == 1
    # the batch every rank sees at step s has answers of about the intended length
    world, batch = 2, 2
    readers = [ShardReader(shards, stages=["easy", "hard"], rank=r, world_size=world, batch_size=batch,
                           shuffle="window", window=window, neighbourhood=neighbourhood, seed=1,
                           prefetch_bytes=0) for r in range(world)]
    streams = [[s["json"]["answer_tokens"] for s in r] for r in readers]
    for step in range(len(streams[0]) // batch):
        for r in range(world):
            for tokens in streams[r][step * batch:(step + 1) * batch]:
                assert abs(tokens - step * world * batch) < window * neighbourhood + world * batch


def test_none_keeps_exact_order_and_stage_shuffles_within_stages(shards):
    assert read(shards, stages=["easy", "hard"], shuffle="none") == list(range(60))
    assert read(shards, stages=["hard", "easy"], shuffle="none") == list(range(37, 60)) + list(range(37))
    seq = read(shards, stages=["easy", "hard"], shuffle="stage", seed=3)
    assert sorted(seq[:37]) == list(range(37)) and sorted(seq[37:]) == list(range(37, 60))
    assert seq != list(range(60))
    assert max(abs(p - i) for p, i in enumerate(seq)) > 12  # moves far, unlike "window"


# --------------------------------------------------------------------------- 4. resume

@pytest.mark.parametrize("shuffle", ["none", "window", "stage"])
@pytest.mark.parametrize("prefetch", [0, 1 << 20])
def test_resume_yields_exactly_the_rest(shards, shuffle, prefetch):
    kw = dict(stages=["easy", "hard"], shuffle=shuffle, window=4, seed=5, epoch=2, rank=1, world_size=2,
              batch_size=3, prefetch_bytes=prefetch)
    full = read(shards, **kw)
    for stop in (0, 1, 7, 15, len(full) - 1, len(full)):
        reader = ShardReader(shards, **kw)
        it = iter(reader)
        head = [next(it)["json"]["id"] for _ in range(stop)]
        state = json.loads(json.dumps(reader.state_dict()))  # a checkpoint is plain JSON
        it.close()
        resumed = ShardReader(shards, **kw)
        resumed.load_state_dict(state)
        resumed.set_epoch(2)  # the trainer's loop calls it; the same epoch keeps the position
        assert head + read_iter(resumed) == full, stop
    resumed.set_epoch(3)  # the next epoch starts from its beginning
    assert len(read_iter(resumed)) == len(full)


def read_iter(reader) -> list[int]:
    return ids(iter(reader))


def test_resume_skips_consumed_samples_at_tar_level_without_decoding(shards, tmp_path):
    folder = copy_set(shards, tmp_path / "set")
    # Damage the npy header of sample 3 (shard 0): decoding it would raise.
    path = folder / "easy-000000.tar"
    data = bytearray(path.read_bytes())
    _, feat_data = member_offsets(path)["k00003.feat.npy"]
    data[feat_data:feat_data + 6] = b"BROKEN"
    path.write_bytes(bytes(data))
    kw = dict(stages=["easy"], shuffle="none", prefetch_bytes=0)
    with pytest.raises(ShardError, match="k00003.feat.npy"):
        read(folder, **kw)
    reader = ShardReader(folder, **kw)
    reader.load_state_dict(dict(reader.state_dict(), yielded=20))
    assert read_iter(reader) == list(range(20, 37))
    stats = reader.stats()
    assert stats["members_decoded"] == 17 * 4  # json, feat, clips, thumb of the 17 read
    # samples 16..19 of shard 2 were stepped over (headers only); shards 0 and 1 never opened
    assert stats["shards_opened"] == 3
    assert stats["bytes_read"] < sum((folder / f"easy-00000{j}.tar").stat().st_size for j in (2, 3, 4))


@pytest.mark.parametrize("save_workers,load_workers", [(0, 2), (2, 1), (1, 0), (0, 0), (2, 2), (2, 3)])
def test_stateful_dataloader_resume_with_other_num_workers(shards, save_workers, load_workers):
    from torchdata.stateful_dataloader import StatefulDataLoader

    batch = 3
    kw = dict(stages=["easy", "hard"], shuffle="window", window=5, seed=2, world_size=2, rank=0,
              batch_size=batch)

    def loader(reader, workers):
        return StatefulDataLoader(reader, batch_size=batch, num_workers=workers, collate_fn=ids)

    full = [i for b in loader(ShardReader(shards, **kw), save_workers) for i in b]
    assert full == ShardReader(shards, **kw).sequence()  # any worker count: the rank's order
    dl = loader(ShardReader(shards, **kw), save_workers)
    it = iter(dl)
    head = [i for _ in range(4) for i in next(it)]
    state = dl.state_dict()
    del it
    assert stats_from_loader(state)["samples"] == len(head)
    reader = ShardReader(shards, **kw)
    reader.load_state_dict(state)  # into the reader: any num_workers
    rest = [i for b in loader(reader, load_workers) for i in b]
    assert head + rest == full
    assert reader_state_from_loader(state)["yielded"] == len(head)
    if save_workers == load_workers:  # into the loader itself: its own resume
        dl2 = loader(ShardReader(shards, **kw), load_workers)
        dl2.load_state_dict(state)
        assert head + [i for b in dl2 for i in b] == full


@pytest.mark.parametrize("shuffle", ["none", "window"])
def test_resume_with_another_world_size_reslices_from_the_global_position(shards, shuffle):
    kw = dict(stages=["easy", "hard"], shuffle=shuffle, window=4, seed=9, batch_size=2)
    consumed, states = [], []
    for rank in range(2):  # 2 ranks consume 3 steps each
        reader = ShardReader(shards, rank=rank, world_size=2, **kw)
        it = iter(reader)
        consumed += [next(it)["json"]["id"] for _ in range(6)]
        states.append(reader.state_dict())
        it.close()
    rest = []
    counts = []
    for rank in range(3):  # resume on 3 ranks from rank 0's state (every rank holds the same)
        reader = ShardReader(shards, rank=rank, world_size=3, **kw)
        reader.load_state_dict(states[0])
        got = read_iter(reader)
        counts.append(len(got))
        rest += got
    assert len(set(counts)) == 1 and counts[0] == (60 - 12) // 3
    assert sorted(consumed + rest) == list(range(60))
    # the global sequence is the same one: consumed = its first 12 positions
    assert sorted(consumed) == sorted(ShardReader(shards, **kw).sequence()[:12])
    # a state in the middle of a step cannot be re-sliced for another world size
    reader = ShardReader(shards, rank=0, world_size=2, **kw)
    mid = dict(reader.state_dict(), yielded=5)
    other = ShardReader(shards, rank=0, world_size=3, **kw)
    with pytest.raises(ValueError, match="into a step"):
        other.load_state_dict(mid)
    with pytest.raises(ValueError, match="seed"):
        ShardReader(shards, rank=0, world_size=2, **dict(kw, seed=10)).load_state_dict(states[0])


# ------------------------------------------------------------------------ 5. corrupt data

def _truncate(folder: Path, url: str, at: int) -> None:
    path = folder / url
    path.write_bytes(path.read_bytes()[:at])


def test_truncated_shard_raises_with_url_and_offset_or_is_skipped_and_counted(shards, tmp_path):
    folder = copy_set(shards, tmp_path / "set")
    offsets = member_offsets(folder / "easy-000001.tar")
    cut = offsets["k00013.clips.npy"][1] + 10  # inside sample 13 (shard 1 holds 8..15)
    _truncate(folder, "easy-000001.tar", cut)
    with pytest.raises(ShardError, match=r"easy-000001.tar.*byte \d+"):
        read(folder, stages=["easy"], shuffle="none")
    reader = ShardReader(folder, stages=["easy"], shuffle="none", on_error="skip", prefetch_bytes=0)
    got = list(reader)
    stats = reader.stats()
    assert len(got) == 37  # the count is kept: lost slots are filled and marked
    assert ids(s for s in got if "substitute_for" not in s) == list(range(13)) + list(range(16, 37))
    assert stats["skipped_total"] == 3 and stats["substituted"] == 3
    assert stats["skipped"] == {"truncated tar": 3}
    assert any("easy-000001.tar" in e for e in stats["errors"])
    assert all(s["json"]["id"] == 12 for s in got if "substitute_for" in s)


def test_flipped_header_byte_names_the_offset(shards, tmp_path):
    folder = copy_set(shards, tmp_path / "set")
    path = folder / "easy-000000.tar"
    header, _ = member_offsets(path)["k00002.json"]
    data = bytearray(path.read_bytes())
    data[header + 1] ^= 0x20
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"easy-000000.tar, byte {header}: header checksum"):
        read(folder, stages=["easy"], shuffle="none")
    reader = ShardReader(folder, stages=["easy"], shuffle="none", on_error="skip", prefetch_bytes=0)
    # samples 2..7, and 1: where sample 1 ends is only known from the header after it
    assert len(list(reader)) == 37 and reader.stats()["skipped"] == {"bad tar": 7}


def test_bad_member_loses_one_sample_and_npy_data_damage_needs_verify(shards, tmp_path):
    folder = copy_set(shards, tmp_path / "set")
    path = folder / "easy-000000.tar"
    offsets = member_offsets(path)
    data = bytearray(path.read_bytes())
    data[offsets["k00001.feat.npy"][1] + 8] = 0xFF  # header length field: unreadable npy header
    data[offsets["k00004.feat.npy"][1] + 200] ^= 0x55  # inside the float16 data
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"key 'k00001', member 'k00001.feat.npy'"):
        read(folder, stages=["easy"], shuffle="none")
    reader = ShardReader(folder, stages=["easy"], shuffle="none", on_error="skip", prefetch_bytes=0)
    got = list(reader)
    assert len(got) == 37 and reader.stats()["skipped"] == {"bad member": 1}
    assert got[1]["substitute_for"].endswith("easy-000000.tar#1") and got[1]["json"]["id"] == 0
    # a flipped bit in array data decodes fine: only the checksum can tell
    assert got[4]["feat"].float().mean() != 4
    with pytest.raises(ShardError, match=r"easy-000000.tar: sha256 .* does not match"):
        read(folder, stages=["easy"], shuffle="none", verify=True)
    reader = ShardReader(folder, stages=["easy"], shuffle="none", verify=True, on_error="skip",
                         prefetch_bytes=0)
    assert len(list(reader)) == 37
    assert reader.stats()["skipped"] == {"sha256 mismatch": 8}
    assert reader.stats()["shards_verified"] == 4  # the other easy shards passed
    assert len(read(shards, stages=["easy"], verify=True)) == 37


def test_missing_member_and_fields(shards, tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    with ShardWriter(folder, "easy", maxcount=10) as writer:
        for i in range(6):
            s = sample(i)
            if i == 2:
                del s["feat.npy"]
            writer.write(s)
    Manifest(stages=[writer.info], samples=6).save(folder)
    with pytest.raises(ShardError, match=r"key 'k00002'.*no member for field\(s\) feat"):
        read(folder, stages=["easy"])
    assert read(folder, stages=["easy"], fields=("json", "clips"), shuffle="none") == list(range(6))
    reader = ShardReader(folder, stages=["easy"], shuffle="none", on_error="skip", prefetch_bytes=0)
    assert len(list(reader)) == 6 and reader.stats()["skipped"] == {"missing member": 1}


def test_members_of_one_key_not_contiguous_are_detected(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    members = [("k00000.json", encode_json(sample(0)["json"])), ("k00000.feat.npy", encode_npy(sample(0)["feat.npy"])),
               ("k00001.json", encode_json(sample(1)["json"])),
               ("k00000.clips.npy", encode_npy(sample(0)["clips.npy"])),  # back to key 0
               ("k00001.feat.npy", encode_npy(sample(1)["feat.npy"]))]
    path = folder / "easy-000000.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = path.read_bytes()
    # a writer that believes in 2 samples, and one that counted the split as 3
    for count in (2, 3):
        shard = schema.ShardInfo(url=path.name, samples=count, bytes=len(data),
                                 sha256=hashlib.sha256(data).hexdigest())
        Manifest(stages=[schema.StageInfo("easy", [shard])], samples=count).save(folder)
        with pytest.raises(ShardError, match=r"key 'k00000'.*not contiguous"):
            read(folder, stages=["easy"], shuffle="none")


def test_sample_count_must_match_the_manifest(shards, tmp_path):
    folder = copy_set(shards, tmp_path / "set")
    rewrite_manifest(folder, "easy-000004.tar", samples=6)  # holds 5
    with pytest.raises(ShardError, match="ends after 5 samples; the manifest lists 6"):
        read(folder, stages=["easy"], shuffle="none")
    rewrite_manifest(folder, "easy-000004.tar", samples=4)
    with pytest.raises(ShardError, match="more samples than the 4"):
        read(folder, stages=["easy"], shuffle="none")


# ------------------------------------------------------------------------- 6. memory

def test_prefetch_is_bounded_in_bytes_and_memory_does_not_grow_with_the_run(tmp_path):
    folder = write_set(tmp_path / "big", [("easy", 40, 10)], clips=False)
    # 10x the data: a manifest listing the same 4 tars ten times over
    manifest = Manifest.load(folder)
    shard_list = manifest.stage("easy").shards
    (tmp_path / "ten").mkdir()
    ten = [schema.ShardInfo(**{**vars(s), "url": str(folder / s.url)}) for s in shard_list * 10]
    Manifest(stages=[schema.StageInfo("easy", ten)], samples=400).save(tmp_path / "ten")

    def peak(source, prefetch):
        tracemalloc.start()
        reader = ShardReader(source, stages=["easy"], shuffle="window", window=8, prefetch_bytes=prefetch,
                             allow_outside=True)  # "ten" lists the tars of "big" by absolute path
        n = sum(1 for _ in reader)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return n, top, reader.peak_prefetch_bytes

    sample_bytes = FEAT_ROWS * DIM * 2 + 1024 + 12
    n1, peak1, q1 = peak(folder, 4 * sample_bytes)
    n10, peak10, q10 = peak(tmp_path / "ten", 4 * sample_bytes)
    assert (n1, n10) == (40, 400)
    assert max(q1, q10) <= 5 * sample_bytes  # the bound, plus at most one sample
    assert peak10 < peak1 * 1.5 + 200_000, (peak1, peak10)


# ------------------------------------------- 7. length guard (train/length.py) as the reader's guard

@pytest.fixture(scope="module")
def tokenizer():
    os.environ.setdefault("VLMR_CACHE", "/tmp/vlmrcache")
    from dataengine.models import load_tokenizer

    return load_tokenizer("tiny")


def test_length_guard_counts_spliced_video_tokens(shards, tokenizer):
    s = next(iter(ShardReader(shards, stages=["easy"], shuffle="none", prefetch_bytes=0)))
    guard = LengthGuard(tokenizer, max_length=10_000)
    text = "USER: <video>\nWhat happens? ASSISTANT: word"
    assert guard.tokens(s) == len(tokenizer(text)["input_ids"]) - 1 + FEAT_ROWS
    assert guard.placeholder_tokens == 1
    long = dict(s, feat=torch.zeros(300, DIM, dtype=torch.float16))
    assert guard.tokens(long) == guard.tokens(s) + 300 - FEAT_ROWS


def test_length_guard_skips_or_truncates_the_last_answer(shards, tokenizer):
    s = next(iter(ShardReader(shards, stages=["easy"], shuffle="none", prefetch_bytes=0)))
    conv = [{"from": "human", "value": "<video>\nWhat happens?"},
            {"from": "gpt", "value": "a red circle moves left " * 10}]
    s = dict(s, json=dict(s["json"], conversations=conv))
    base = LengthGuard(tokenizer, 10_000)
    full = base.tokens(s)
    limit = full - 15
    skip = LengthGuard(tokenizer, limit, policy="skip")
    assert skip.apply(s) is None and skip.counts["dropped"] == 1
    cut = LengthGuard(tokenizer, limit, policy="truncate")
    out = cut.apply(s)
    assert limit - 6 <= cut.tokens(out) <= limit
    assert out["json"]["conversations"][0] == conv[0]
    assert conv[1]["value"].startswith(out["json"]["conversations"][1]["value"].strip())
    assert s["json"]["conversations"] is conv  # the input is not modified
    # too long even with an empty answer: dropped either way
    tiny = LengthGuard(tokenizer, 5, policy="truncate")
    assert tiny.apply(s) is None
    # the same decision whichever rank sees it: it depends on the sample only
    assert LengthGuard(tokenizer, limit, policy="truncate").apply(s)["json"] == out["json"]
    # inside the reader: a dropped sample's slot is filled, the count stays
    lengths = [base.tokens(x) for x in ShardReader(shards, stages=["easy"], shuffle="none", prefetch_bytes=0)]
    limit = sorted(lengths)[len(lengths) // 2]
    too_long = sum(n > limit for n in lengths)
    assert 0 < too_long < 37
    reader = ShardReader(shards, stages=["easy"], shuffle="none", prefetch_bytes=0,
                         guard=LengthGuard(tokenizer, limit).apply)
    got = list(reader)
    assert len(got) == 37 and sum("substitute_for" in x for x in got) == too_long
    assert reader.stats()["skipped"] == {"length guard": too_long}
    assert all(base.tokens(x) <= limit for x in got)


# ----------------------------------------------------------------- decoding and sources

def test_samples_are_writable_float16_tensors_and_fields_skip_unread(shards):
    reader = ShardReader(shards, stages=["easy"], shuffle="none", prefetch_bytes=0)
    s = next(iter(reader))
    assert set(s) == {"key", "stage", "shard", "json", "feat", "clips", "thumb.jpg"}
    assert s["feat"].dtype == s["clips"].dtype == torch.float16
    assert s["feat"].shape == (FEAT_ROWS, DIM) and s["clips"].shape == (2, 3, DIM)
    s["feat"] += 1  # writable, owned by the sample
    assert s["json"]["answer_tokens"] == 0 and s["thumb.jpg"].startswith(b"\xff\xd8")
    full = ShardReader(shards, stages=["easy"], shuffle="none", prefetch_bytes=0)
    list(full)
    light = ShardReader(shards, stages=["easy"], shuffle="none", prefetch_bytes=0, fields=("json", "feat"))
    got = list(light)
    assert set(got[0]) == {"key", "stage", "shard", "json", "feat"}
    clips_bytes = 37 * len(encode_npy(np.zeros((2, 3, DIM), np.float16)))
    assert light.stats()["bytes_read"] <= full.stats()["bytes_read"] - clips_bytes  # never read
    assert light.stats()["members_decoded"] == 2 * 37


def test_file_url_manifest_path_and_fsspec_memory(shards):
    expected = read(shards, stages=["hard"], shuffle="none")
    assert read(f"file://{shards}", stages=["hard"], shuffle="none") == expected
    assert read(str(shards / "manifest.json"), stages=["hard"], shuffle="none") == expected
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in shards.iterdir():
        fs.pipe(f"/readertest/{path.name}", path.read_bytes())
    assert read("memory://readertest", stages=["hard"], shuffle="window", window=3) == \
        read(shards, stages=["hard"], shuffle="window", window=3)


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with Range support (the standard handler ignores Range)."""

    def log_message(self, *args):
        pass

    def send_head(self):
        spec = self.headers.get("Range")
        if not spec or not self.server.ranges:
            return super().send_head()
        path = self.translate_path(self.path)
        start = int(spec.split("=")[1].split("-")[0])
        f = open(path, "rb")
        size = os.fstat(f.fileno()).st_size
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Length", str(size - start))
        self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        return f


@pytest.mark.parametrize("ranges", [True, False])
def test_http_source(shards, ranges):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_RangeHandler, directory=str(shards)))
    server.ranges = ranges
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        kw = dict(stages=["easy", "hard"], shuffle="window", window=4, seed=4)
        assert read(url, **kw) == read(shards, **kw)
        reader = ShardReader(url + "/manifest.json", verify=True, **kw)
        reader.load_state_dict(dict(reader.state_dict(), yielded=30))
        assert read_iter(reader) == read(shards, **kw)[30:]
    finally:
        server.shutdown()
        server.server_close()


def test_pipe_sources_need_explicit_opt_in(shards):
    with pytest.raises(ValueError, match="allow_pipe=True"):
        ShardReader(f"pipe:cat {shards}/{{}}", stages=["easy"])
    kw = dict(stages=["easy"], shuffle="window", window=4)
    assert read(f"pipe:cat {shards}/{{}}", allow_pipe=True, **kw) == read(shards, **kw)
    # a failed manifest read is a SourceError naming the manifest URL, as in `vlmr inspect`
    with pytest.raises(SourceError, match="manifest.json: cannot read the manifest: exited with status 3"):
        ShardReader(f"pipe:sh -c 'cat {shards}/$0; exit 3' {{}}", allow_pipe=True, stages=["easy"])


def test_bad_sources_raise_source_errors_as_inspect_does(shards, tmp_path):
    # nothing there stays a FileNotFoundError (train/narrate.py and judge.py catch that)
    with pytest.raises(FileNotFoundError, match="missing: no such file or folder"):
        ShardReader(tmp_path / "missing", stages=["easy"])
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(shards / "easy-000000.tar", unfinished)
    with pytest.raises(SourceError, match="no manifest.json in this folder .*unfinished build"):
        ShardReader(unfinished, stages=["easy"])
    (unfinished / "manifest.json").write_text("{not json")
    with pytest.raises(SourceError, match="manifest.json: not valid JSON"):
        ShardReader(unfinished, stages=["easy"])


def test_decode_npy_without_pickle():
    from dataengine.tario import decode_npy

    def npy(array) -> np.ndarray:
        return np.frombuffer(bytearray(encode_npy(array)), dtype=np.uint8)

    for array in (np.arange(6, dtype=">f4").reshape(2, 3), np.asfortranarray(np.arange(6).reshape(2, 3)),
                  np.zeros((0, 4), np.float16)):
        decoded = decode_npy(npy(array), "x")
        assert decoded.shape == array.shape and (decoded == array).all() and decoded.dtype.isnative
        assert (decode_npy(encode_npy(array), "x") == array).all()  # from bytes too (read-only view)
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header += b" " * (118 - len(header)) + b"\n"
    data = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\x80\x04N."
    with pytest.raises(ValueError, match="object arrays need pickle"):
        decode_npy(np.frombuffer(bytearray(data), dtype=np.uint8), "x")
    with pytest.raises(ValueError, match="not an .npy"):
        decode_npy(np.frombuffer(bytearray(b"\x93NUM"), dtype=np.uint8), "x")


def test_plan_arithmetic():
    sl = RankSlice(total=10, start=0, world_size=3, batch_size=2, remainder="drop")
    assert sl.per_rank == 3
    assert [[sl.position(r, i) for i in range(3)] for r in range(3)] == [[0, 1, 6], [2, 3, 7], [4, 5, 8]]
    assert sl.global_position(2) == 6 and sl.global_position(1) is None and sl.global_position(3) == 10
    rep = RankSlice(total=10, start=0, world_size=3, batch_size=2, remainder="repeat")
    assert rep.per_rank == 4 and sorted(rep.position(r, i) for r in range(3) for i in range(4)) == \
        sorted(list(range(10)) + [0, 1])
    assert list(worker_indices(7, 0, 2, 0, 2)) == [0, 1, 4, 5]
    assert list(worker_indices(7, 0, 2, 1, 2)) == [2, 3, 6]
    assert list(worker_indices(7, 2, 2, 1, 2, skip=1)) == [5]


def test_buffer_pool_reuses_a_block_only_once_nothing_can_see_it():
    import gc

    from dataengine.prefetch import BufferPool

    pool = BufferPool(max_bytes=3000)
    a, b, c = pool.get(1000), pool.get(1000), pool.get(1000)
    assert len({x.ctypes.data for x in (a, b, c)}) == 3 and pool.leased == 3
    a_at, b_at, c_at = a.ctypes.data, b.ctypes.data, c.ctypes.data
    tensor = torch.from_numpy(b[10:].view(np.float16)[2:])  # a view of a view of b keeps b leased
    view_of_c = c[100:200]
    del a, b, c
    gc.collect()
    assert pool.leased == 2  # a came back; b (the tensor) and c (the view) did not
    got = pool.get(1000)
    assert got.ctypes.data == a_at and pool.reused == 1
    del view_of_c
    gc.collect()
    again = pool.get(1000)
    assert again.ctypes.data == c_at  # the last freed first
    over = pool.get(1000)  # the pool holds 3000 bytes, all leased: a plain allocation
    assert over.ctypes.data not in (a_at, b_at, c_at) and pool.leased == 3
    got[:] = 7
    assert tensor.data_ptr() == b_at + 14 and not (tensor.numpy().view(np.uint8) == 7).all()
    del tensor
    gc.collect()
    assert pool.get(1000).ctypes.data == b_at  # the tensor and both views gone: b is free


def test_torchdata_state_keys_the_reader_reads_are_the_pinned_torchdata_ones(shards):
    """The reader finds its workers' states inside a StatefulDataLoader state by keys that are
    private to torchdata; if an upgrade renames them, this fails and names the key."""
    import importlib.metadata
    import re

    from torchdata.stateful_dataloader import StatefulDataLoader, incremental_state, stateful_dataloader

    from dataengine import reader as r

    pinned = re.search(r'"torchdata==([^"]+)"', (Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert pinned and importlib.metadata.version("torchdata") == pinned.group(1), \
        "torchdata is not the pinned version: check the LOADER_* keys in dataengine/reader.py against it"
    it = stateful_dataloader._StatefulMultiProcessingDataLoaderIter
    assert (it._SNAPSHOT, it._WORKER_SNAPSHOTS, it._STEPS_SINCE_SNAPSHOT) == \
        (r.LOADER_SNAPSHOT, r.LOADER_WORKER_SNAPSHOTS, r.LOADER_STEPS_SINCE_SNAPSHOT)
    assert incremental_state._DATASET_STATE == r.LOADER_DATASET_STATE
    for workers in (0, 2):  # and real states have that shape
        loader = StatefulDataLoader(ShardReader(shards, stages=["easy"], batch_size=2), batch_size=2,
                                    num_workers=workers, collate_fn=ids)
        it_ = iter(loader)
        next(it_)
        state = loader.state_dict()
        del it_
        if workers:
            snapshots = state[r.LOADER_SNAPSHOT][r.LOADER_WORKER_SNAPSHOTS]
            assert sorted(snapshots) == ["worker_0", "worker_1"]  # the reader sorts by the number after "_"
            inner = [snapshots[k][r.LOADER_DATASET_STATE] for k in sorted(snapshots)]
            assert r.LOADER_STEPS_SINCE_SNAPSHOT in state
        else:
            inner = [state[r.LOADER_DATASET_STATE]]
        assert all(s["format"] == r.STATE_FORMAT for s in inner)
        assert r.reader_state_from_loader(state)["yielded"] == 2


# ------------------------------------------------------------------ webdataset pipeline stage

def test_decoded_samples_is_a_webdataset_pipeline_stage(shards):
    import webdataset as wds

    from dataengine.wds_stage import decoded_samples

    manifest = Manifest.load(shards)
    urls = [str(shards / s.url) for st in manifest.stages for s in st.shards]
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), decoded_samples(fields=("json", "feat")),
                                wds.map(lambda s: (s["__key__"], s["json"]["id"], s["feat"])),
                                wds.batched(7, collation_fn=list))
    batches = list(pipeline)
    got = [item for batch in batches for item in batch]
    assert [len(b) for b in batches][:-1] == [7] * (len(batches) - 1)
    assert [i for _, i, _ in got] == list(range(60))  # every sample, in file order
    assert got[5][0] == "k00005" and got[5][2].dtype == torch.float16 and got[5][2].shape == (FEAT_ROWS, DIM)
    assert all((feat == i).all() for _, i, feat in got)
    # the same samples as the reader hands out, and as webdataset's own decoder sees them
    reader = ShardReader(shards, stages=["easy", "hard"], shuffle="none", fields=("json", "feat"))
    assert [s["key"] for s in reader] == [k for k, _, _ in got]
    theirs = wds.DataPipeline(wds.SimpleShardList(urls[:1]), wds.tarfile_to_samples(), wds.decode())
    assert [s["__key__"] for s in theirs] == [k for k, _, _ in got[:8]]
    # every member by default
    everything = next(iter(wds.DataPipeline(wds.SimpleShardList(urls[:1]), decoded_samples())))
    assert set(everything) == {"__key__", "__url__", "json", "feat", "clips", "thumb.jpg"}
    assert everything["__url__"] == urls[0] and everything["clips"].shape == (2, 3, DIM)


def test_decoded_samples_errors_follow_the_webdataset_handler(tmp_path):
    import webdataset as wds

    from dataengine.wds_stage import decoded_samples

    folder = write_set(tmp_path / "set", [("easy", 12, 4)])
    tars = sorted(folder.glob("easy-*.tar"))
    # shard 0: sample k00001's feat is not an npy; shard 1: cut in the middle
    with tarfile.open(tars[0]) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tars[0], "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            data = b"not an npy" if m.name == "k00001.feat.npy" else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    data = tars[1].read_bytes()
    tars[1].write_bytes(data[:len(data) // 2])
    urls = [str(t) for t in tars]

    def keys(handler):
        return [s["__key__"] for s in wds.DataPipeline(wds.SimpleShardList(urls), decoded_samples(handler=handler))]

    with pytest.raises(ShardError, match=r"key 'k00001', member 'k00001.feat.npy'.*not an .npy"):
        keys(None)
    seen = []
    kept = keys(lambda exc: seen.append(exc) or True)
    assert "k00001" not in kept and {"k00000", "k00002", "k00003", "k00008", "k00011"} <= set(kept)
    assert len(seen) == 2 and seen[1].whole_shard and "easy-000001.tar" in str(seen[1])
    assert keys(lambda exc: False) == ["k00000"]  # the handler says stop
