"""ShardReader: stream a shard set's stages to N ranks x W workers, in curriculum order, resumably.

    reader = ShardReader("shards/demo", stages=["easy"], rank=rank, world_size=world,
                         batch_size=16, seed=0, fields=("json", "feat"))
    loader = StatefulDataLoader(reader, batch_size=16, num_workers=2, collate_fn=...)
    for epoch in range(start_epoch, epochs):
        reader.set_epoch(epoch)
        for batch in loader: ...

How it works
------------
**The plan.** The manifest lists every shard's sample count, so the reader knows, without
opening a tar, that the requested stages hold N samples in stream order (stages in the
order asked, shards in manifest order). An epoch's *global sequence* is a permutation of
those N samples that depends only on (seed, epoch, shuffle, window, neighbourhood) — never
on ranks, workers, pid or time:

- ``shuffle="none"``: the stream order, exactly.
- ``shuffle="window"``: the stream is cut, per stage, into windows of ``window`` consecutive
  samples; samples are permuted within their window, and whole windows are permuted only
  within blocks of ``neighbourhood`` consecutive windows. A sample moves at most
  ``window * neighbourhood`` positions, so the batch at step s has answers of about the
  length the curriculum intends at step s.
- ``shuffle="stage"``: a uniform permutation of each stage (stages keep their order). This
  is the one mode whose reads are not sequential: each sample is a seek (cheap on local
  files, costly on streams).

**Ranks.** The global sequence is dealt in steps of ``world_size * batch_size`` samples: at
step s, rank r takes positions ``[s*R*b + r*b, s*R*b + (r+1)*b)``. So one global batch is a
contiguous piece of the curriculum, and the global position after every rank consumed c
samples (c a multiple of b) is ``R*c``, whatever R is: a resume with another world size
re-slices the rest of the epoch from that position. **Equal work**: every rank yields
exactly ``(N - start) // R`` samples per epoch with ``remainder="drop"`` (at most R-1
samples are left out; the last, partial step is split evenly), or ``ceil((N - start) / R)``
with ``remainder="repeat"`` (the missing positions repeat the epoch's sequence from its
start). Ranges split shards freely, so this holds even with fewer shards than readers.

**Workers.** A rank's samples are cut into chunks of ``batch_size``; DataLoader worker w of
W takes chunks w, w+W, w+2W, ... Since the DataLoader collects one batch per worker in turn,
its output is the rank's sequence exactly, for any W: set ``batch_size`` to the loader's.

**Reading.** Each worker opens the shards its samples are in, in plan order, and walks
them header by header (:mod:`dataengine.tario`): a sample it does not own is skipped at the
tar level (a seek on seekable files, read-and-discard on streams), never decoded, and
whole shards it does not need are never opened. Each header is parsed once; the member
offsets found are kept for the few shards open at a time, so coming back to a sample is
a seek to its data. With ``shuffle="window"`` a worker's jumps stay inside one window (a
contiguous byte range): on local files it reads the window's samples in output order,
which readahead and the page cache serve; on streams (http, fsspec, pipe) it reads them
in file order, strictly sequentially, and holds them (at most ``window / (R * W)``
samples) to hand them out permuted. Each member is read with one ``readinto`` into a
buffer the returned tensor owns (the memory of buffers the consumer dropped is reused,
which saves page faults: :class:`~dataengine.prefetch.BufferPool`): ``feat`` and ``clips`` are writable float16 tensors, ``json`` a dict, other
members raw bytes. Members not in ``fields`` are not decoded, and on seekable files not
read. A background thread reads ahead into a queue bounded in bytes (``prefetch_bytes``),
so memory depends on that bound and the window, never on the number of shards or the
length of the run.

**Resume.** ``state_dict()`` holds (epoch, where this slicing started, samples consumed);
``load_state_dict()`` accepts it, or a torchdata ``StatefulDataLoader`` state (the loader
stores each worker's reader state; :func:`reader_state_from_loader` combines them into the
rank's position). Loading the loader state into the loader resumes with the same workers;
loading it into the reader (``reader.load_state_dict(loader.state_dict())``, before
creating the loader) resumes with any ``num_workers``, ``world_size`` or ``batch_size``.

**Corrupt data.** ``on_error="raise"`` raises :class:`ShardError` naming the shard URL and
the member or byte offset. ``on_error="skip"`` logs the problem, counts it in
``stats()`` and fills the lost slot with the worker's previous good sample (marked
``substitute_for``), so every rank still yields the same count and training cannot hang.
A broken tar structure (bad header checksum, truncation, members of one key not contiguous,
fewer samples than the manifest lists) loses the rest of that shard, and the sample before
a damaged header too (where it ends is unknown); a bad member (unreadable npy or json, a
required member missing) loses one sample. Damage inside array data decodes without error:
``verify=True`` catches it by checking each shard's sha256 against the manifest before
streaming it (one extra read of the shard). Substitutes are duplicates: read
``stats()["substituted"]`` before trusting a run that had any.

Sources: a folder or its ``manifest.json`` as a local path, ``file://``, ``http(s)://``
(standard library, with Range requests when the server supports them) or any fsspec URL
whose backend is installed (``s3://`` needs s3fs, ``gs://`` gcsfs). ``pipe:COMMAND`` runs
COMMAND (split like a shell would, never through a shell) with ``{}`` replaced by the file
name (``manifest.json``, then each shard's URL); it needs ``allow_pipe=True``. Opening them
is :mod:`dataengine.sources` (shared with ``vlmr inspect``); a source that cannot be opened
raises its :class:`~dataengine.sources.SourceError` naming the source or the manifest URL.

Where things are: the plan arithmetic (global sequence, rank slices, worker shares) is
:mod:`dataengine.plan`; the read-ahead thread, its bytes-bounded queue and the buffer pool are
:mod:`dataengine.prefetch`; tar parsing, member names, ``.npy`` decoding and
:class:`ShardError` are :mod:`dataengine.tario`; this module walks shards and keeps the state.
``docs/reader.md`` lists what the reader relies on.

The trainers' length rule (a sample's tokens once video features are spliced in) is
:class:`train.length.LengthGuard`; its ``apply`` is what trainers pass as ``guard``.

Benchmark: ``python benchmarks/bench_reader.py``. Tests: ``pytest tests/test_reader.py
tests/test_reader_dist.py``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from dataengine import schema
from dataengine.plan import (EpochOrder, RankSlice, ReadRange, Remainder, Shuffle, StagePlan, locate,
                             read_groups, read_ranges, worker_indices)
from dataengine.prefetch import BufferPool, BytesQueue, sample_nbytes, threaded
from dataengine.schema import ShardInfo
from dataengine.sources import SourceError, read_url  # noqa: F401  (re-exported: train/ imports them here)
from dataengine.sources import local_path, open_manifest, open_url
from dataengine.tario import ShardError, TarError, TarMember, TarReader, TruncatedTarError, decode_npy, split_name

log = logging.getLogger(__name__)

STATE_FORMAT = "vlmr-reader/1"
OnError = Literal["raise", "skip"]

# The keys of a torchdata StatefulDataLoader state that the reader reads to find its workers'
# states (private to torchdata 0.11; tests/test_reader.py checks them against the installed one).
LOADER_SNAPSHOT = "_snapshot"
LOADER_WORKER_SNAPSHOTS = "_worker_snapshots"
LOADER_DATASET_STATE = "dataset_state"
LOADER_STEPS_SINCE_SNAPSHOT = "_steps_since_snapshot"

# Output names of the members the schema knows; any other member keeps its suffix.
_OUTPUT_NAME = {schema.JSON: "json", schema.FEAT: "feat", schema.CLIPS: "clips"}
DEFAULT_REQUIRED = ("json", "feat")
_HASH_CHUNK = 4 << 20
_ERRORS_KEPT = 100


# ShardError, split_name and decode_npy are dataengine.tario's (shared with `vlmr inspect`);
# the plan arithmetic is dataengine.plan, the read-ahead thread and buffer pool dataengine.prefetch.

# ------------------------------------------------------------------------------ decoding

def _output_name(suffix: str) -> str:
    return _OUTPUT_NAME.get(suffix, suffix)


def _field_of(suffix: str, fields: tuple[str, ...] | None) -> str | None:
    """The requested field a member belongs to, or None when it is not wanted."""
    if fields is None:
        return _output_name(suffix)
    for f in fields:
        if suffix == f or suffix.startswith(f + "."):
            return f
    return None


# ---------------------------------------------------------------------------- statistics

@dataclass
class ReaderStats:
    """What one reader (one process or DataLoader worker) did; nothing lost goes uncounted."""

    samples: int = 0
    """Samples yielded, substitutes included."""
    substituted: int = 0
    """Slots filled with the previous good sample because the planned one was skipped."""
    skipped: collections.Counter = field(default_factory=collections.Counter)
    """Planned samples that could not be delivered, by reason."""
    bytes_read: int = 0
    shards_opened: int = 0
    shards_verified: int = 0
    members_decoded: int = 0
    members_skipped: int = 0
    """Members stepped over without decoding (not asked for, or not this worker's)."""
    errors: list[str] = field(default_factory=list)
    """The first messages of the problems behind ``skipped``."""

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "substituted": self.substituted,
                "skipped": dict(self.skipped), "skipped_total": sum(self.skipped.values()),
                "bytes_read": self.bytes_read, "shards_opened": self.shards_opened,
                "shards_verified": self.shards_verified, "members_decoded": self.members_decoded,
                "members_skipped": self.members_skipped, "errors": list(self.errors)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ReaderStats":
        return cls(samples=data.get("samples", 0), substituted=data.get("substituted", 0),
                   skipped=collections.Counter(data.get("skipped", {})),
                   bytes_read=data.get("bytes_read", 0), shards_opened=data.get("shards_opened", 0),
                   shards_verified=data.get("shards_verified", 0),
                   members_decoded=data.get("members_decoded", 0),
                   members_skipped=data.get("members_skipped", 0), errors=list(data.get("errors", [])))

    def add(self, other: "ReaderStats") -> None:
        self.samples += other.samples
        self.substituted += other.substituted
        self.skipped.update(other.skipped)
        self.bytes_read += other.bytes_read
        self.shards_opened += other.shards_opened
        self.shards_verified += other.shards_verified
        self.members_decoded += other.members_decoded
        self.members_skipped += other.members_skipped
        self.errors.extend(other.errors[:max(0, _ERRORS_KEPT - len(self.errors))])


# ------------------------------------------------------------------------------ reading

def shard_failure(url: str, exc: TarError | OSError) -> ShardError:
    """A broken tar structure or an unreadable file as the ShardError that loses the rest of
    the shard (``whole_shard``), naming the byte offset when the parser knows it."""
    reason = ("truncated tar" if isinstance(exc, TruncatedTarError)
              else "bad tar" if isinstance(exc, TarError) else "unreadable shard")
    return ShardError(url, getattr(exc, "reason", str(exc)), offset=getattr(exc, "offset", None),
                      reason=reason, whole_shard=True)


class _Shard:
    """One open shard. Walks its samples in order, parsing each header once, and keeps an
    index of the members found (key, names, offsets), so that going back to a sample is a
    seek to its data, and skipping one is free once it has been walked."""

    def __init__(self, url: str, info: ShardInfo, stage: str, ctx: "ReadContext"):
        self.url, self.info, self.stage, self.ctx = url, info, stage, ctx
        self.starts: list[int] = [0]
        """Header offset of each sample walked so far, and of what follows the last one."""
        self.index: list[tuple[str, list[tuple[str, TarMember]]]] = []
        """Per sample walked: its key and its (suffix, member) list."""
        self.seen: set[str] = set()
        self.tar: TarReader | None = None
        self.peeked: TarMember | None = None
        self.at: int | None = None
        self.broken: ShardError | None = None
        self._counted = 0
        self.verified = False

    # -- opening and moving ----------------------------------------------------------------
    def _open(self, offset: int) -> None:
        self.close()
        if self.ctx.verify and not self.verified:
            self._verify()
        f, size = open_url(self.url, allow_pipe=self.ctx.allow_pipe)
        seekable = f.seekable()
        if offset and seekable:
            f.seek(offset)
            self.tar = TarReader(f, self.url, offset=offset, size=size)
        else:
            self.tar = TarReader(f, self.url, size=size, seekable=seekable)
            self.tar.seek(offset)  # streams read and discard up to the offset
        self._counted = self.tar.bytes_read
        self.ctx.stats.shards_opened += 1
        self.peeked = None

    def _verify(self) -> None:
        digest = hashlib.sha256()
        f, _ = open_url(self.url, allow_pipe=self.ctx.allow_pipe)
        with f:
            buf = bytearray(_HASH_CHUNK)
            view = memoryview(buf)
            while n := f.readinto(view):
                digest.update(view[:n])
                self.ctx.stats.bytes_read += n
        got = digest.hexdigest()
        if got != self.info.sha256:
            raise ShardError(self.url, f"sha256 {got} does not match the manifest's {self.info.sha256}",
                             reason="sha256 mismatch", whole_shard=True)
        self.verified = True
        self.ctx.stats.shards_verified += 1

    def _seek(self, offset: int) -> None:
        if self.tar is None or (offset < self.tar.position and not self.tar.seekable):
            self._open(offset)
        else:
            self.tar.seek(offset)
        self.peeked = None

    def close(self) -> None:
        if self.tar is not None:
            self._account()
            self.tar.fileobj.close()
            self.tar = None
        self.at = None
        self.peeked = None

    def _account(self) -> None:
        if self.tar is not None:
            self.ctx.stats.bytes_read += self.tar.bytes_read - self._counted
            self._counted = self.tar.bytes_read

    # -- samples ---------------------------------------------------------------------------
    def sample(self, i: int) -> dict[str, Any]:
        """Sample ``i`` of this shard, decoded; raises ShardError."""
        if self.broken is not None:
            raise self.broken
        try:
            if i < len(self.index):
                out = self._read_known(i)
            else:  # walk on from the furthest sample known, skipping at the tar level
                frontier = len(self.index)
                if self.at != frontier:
                    self._seek(self.starts[frontier])
                    self.at = frontier
                while self.at < i:
                    self._walk(self.at, decode=False)
                out = self._walk(i, decode=True)
        except ShardError as exc:
            if exc.whole_shard:
                self.broken = exc
                self.close()
            raise
        except (TarError, OSError) as exc:
            self.broken = shard_failure(self.url, exc)
            self.close()
            raise self.broken from exc
        finally:
            self._account()
        return out

    def _read_known(self, i: int) -> dict[str, Any]:
        """Sample ``i``, already walked: seek to each wanted member's data, no header parsing."""
        key, members = self.index[i]
        first = members[0][1]
        if self.tar is None or (first.data_offset < self.tar.position and not self.tar.seekable):
            self._open(self.starts[i])  # a stream cannot go back: start it again there
        out: dict[str, Any] = {"key": key, "stage": self.stage, "shard": self.url}
        problem = None
        for suffix, member in members:
            problem = self.ctx.member(self.tar, self.url, out, key, suffix, member, problem)
        self.at = None
        self.peeked = None
        self.ctx.check(self.url, key, [suffix for suffix, _ in members], problem)
        return out

    def _walk(self, i: int, decode: bool) -> dict[str, Any] | None:
        """Walk sample ``i``, the first not walked yet (the tar is at its first header):
        index its members, decode them if asked, and check the shard's structure."""
        assert self.tar is not None and i == len(self.index)
        tar = self.tar
        member = self.peeked if self.peeked is not None else tar.next()
        self.peeked = None
        if member is None:
            raise ShardError(self.url, f"the tar ends after {i} samples; the manifest lists "
                                       f"{self.info.samples}", offset=tar.position,
                             reason="fewer samples than the manifest", whole_shard=True)
        key, suffix = split_name(member.name)
        if key in self.seen:
            raise ShardError(self.url, "members of this key are not contiguous "
                                       f"(member {member.name!r} comes after other keys)",
                             key=key, offset=member.offset, reason="non-contiguous key", whole_shard=True)
        self.seen.add(key)
        out: dict[str, Any] = {"key": key, "stage": self.stage, "shard": self.url}
        members: list[tuple[str, TarMember]] = []
        problem: ShardError | None = None
        while True:
            members.append((suffix, member))
            if decode:
                problem = self.ctx.member(self.tar, self.url, out, key, suffix, member, problem)
            else:
                self.ctx.stats.members_skipped += 1
            member = tar.next()
            if member is None:
                break
            next_key, suffix = split_name(member.name)
            if next_key != key:
                break
        self.index.append((key, members))
        self.starts.append(member.offset if member is not None else tar.position)
        self.peeked = member
        self.at = i + 1
        if member is not None:
            next_key = split_name(member.name)[0]
            if next_key in self.seen:  # a key seen before: its members were split up
                raise ShardError(self.url, "members of this key are not contiguous "
                                           f"(member {member.name!r} comes after key {key!r})",
                                 key=next_key, offset=member.offset, reason="non-contiguous key",
                                 whole_shard=True)
            if i + 1 == self.info.samples:
                extra = ShardError(self.url, f"the tar holds more samples than the {self.info.samples} "
                                             "the manifest lists", key=next_key, member=member.name,
                                   offset=member.offset, reason="extra samples")
                if self.ctx.on_error == "raise":
                    raise extra
                self.ctx.stats.skipped[extra.reason] += 1  # every planned sample is read; the surplus is not
                self.ctx.note(extra)
        if not decode:
            return None
        self.ctx.check(self.url, key, [s for s, _ in members], problem)
        return out


@dataclass
class ReadContext:
    """Everything a read needs besides the shard: which members to decode and how, the rules a
    sample must meet, where to count, the buffer pool. Shared by the reader and the
    webdataset stage (:mod:`dataengine.wds_stage`)."""

    fields: tuple[str, ...] | None
    required: tuple[str, ...]
    verify: bool
    allow_pipe: bool
    on_error: OnError
    stats: ReaderStats
    pool: BufferPool
    _kinds: dict[str, tuple[str, str] | None] = field(default_factory=dict)
    _missing: dict[tuple[str, ...], list[str]] = field(default_factory=dict)

    def kind(self, suffix: str) -> tuple[str, str] | None:
        """(output name, decoder) of a member suffix, or None when it is not wanted."""
        try:
            return self._kinds[suffix]
        except KeyError:
            out = None
            if _field_of(suffix, self.fields) is not None:
                how = "npy" if suffix.endswith("npy") else \
                    "json" if (suffix == "json" or suffix.endswith(".json")) else "bytes"
                out = (_output_name(suffix), how)
            self._kinds[suffix] = out
            return out

    def missing(self, suffixes: list[str]) -> list[str]:
        """Required fields that none of a sample's members provides."""
        key = tuple(suffixes)
        try:
            return self._missing[key]
        except KeyError:
            out = [f for f in self.required if not any(_field_of(s, (f,)) for s in suffixes)]
            self._missing[key] = out
            return out

    def member(self, tar: TarReader, url: str, out: dict[str, Any], key: str, suffix: str,
               member: TarMember, problem: ShardError | None) -> ShardError | None:
        """Decode one member into ``out`` if wanted; returns the sample's first problem."""
        kind = self.kind(suffix) if problem is None else None
        if kind is None:
            self.stats.members_skipped += 1
            return problem
        try:
            tar.goto_data(member)
            out[kind[0]] = self._decode(tar, url, member, kind[1])
            self.stats.members_decoded += 1
            return None
        except ValueError as exc:
            if isinstance(exc, TarError):
                raise
            return ShardError(url, str(exc), key=key, member=member.name,
                              offset=member.data_offset, reason="bad member")

    def check(self, url: str, key: str, suffixes: list[str], problem: ShardError | None) -> None:
        """Raise the sample's problem: the first bad member, a member twice, a field missing."""
        if problem is None and len(set(suffixes)) != len(suffixes):
            problem = ShardError(url, f"a member appears twice in one sample ({', '.join(suffixes)})",
                                 key=key, reason="duplicate member")
        if problem is not None:
            raise problem
        missing = self.missing(suffixes)
        if missing:
            raise ShardError(url, f"sample has no member for field(s) {', '.join(missing)} "
                                  f"(members: {', '.join(sorted(suffixes))})", key=key,
                             reason="missing member")

    def _decode(self, tar: TarReader, url: str, member: TarMember, how: str) -> Any:
        if how == "npy":  # one read straight into the buffer the tensor keeps
            buf = self.pool.get(member.size)
            tar.readinto(member, buf)
            array = decode_npy(buf, f"{url}: {member.name}")
            try:
                return torch.from_numpy(array)
            except TypeError as exc:  # a dtype torch has no type for
                raise ValueError(f"{url}: {member.name}: {exc}") from None
        data = tar.read(member)
        if how == "json":
            try:
                value = json.loads(data)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{url}: {member.name}: invalid json: {exc}") from None
            if not isinstance(value, dict):
                raise ValueError(f"{url}: {member.name}: json is a {type(value).__name__}, "
                                 "expected an object")
            return value
        return data

    def note(self, exc: ShardError) -> None:
        log.warning("skipped: %s", exc)
        if len(self.stats.errors) < _ERRORS_KEPT:
            self.stats.errors.append(str(exc))


class _Fetcher:
    """Global sample index -> decoded sample. Keeps the few most recently used shards open
    (a window may span two or three shards), with the sample offsets found in them."""

    _KEEP = 4

    def __init__(self, stages: Sequence[StagePlan], ctx: ReadContext):
        self.stages = stages
        self.ctx = ctx
        self._shards: collections.OrderedDict[tuple[int, int], _Shard] = collections.OrderedDict()
        self._verified: set[tuple[int, int]] = set()

    def shard(self, s: int, j: int) -> _Shard:
        key = (s, j)
        shard = self._shards.get(key)
        if shard is None:
            stage = self.stages[s]
            shard = _Shard(stage.urls[j], stage.shards[j], stage.name, self.ctx)
            shard.verified = key in self._verified
            self._shards[key] = shard
            if len(self._shards) > self._KEEP:
                old_key, old = self._shards.popitem(last=False)
                if old.verified:  # a shard read again later is not hashed again
                    self._verified.add(old_key)
                old.close()
        else:
            self._shards.move_to_end(key)
        return shard

    def fetch(self, index: int) -> dict[str, Any] | _Skip:
        """The sample, or a :class:`_Skip` when ``on_error="skip"`` (counted and logged)."""
        s, j, i = locate(self.stages, index)
        shard = self.shard(s, j)
        try:
            return shard.sample(i)
        except ShardError as exc:
            if self.ctx.on_error == "raise":
                raise
            self.ctx.stats.skipped[exc.reason] += 1
            if not getattr(exc, "noted", False):  # a broken shard is logged once, counted per sample
                self.ctx.note(exc)
                exc.noted = True
            return _Skip(f"{shard.url}#{i}")

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        self._shards.clear()


# ------------------------------------------------------------------------------- reader

@dataclass
class _Resume:
    """Where the next iteration of the current epoch starts."""

    start: int = 0
    """Global position at which the current slicing of the epoch began."""
    offset: int = 0
    """Samples of the rank's slice consumed before this iteration (all workers together)."""
    worker_skips: dict[int, int] | None = None
    """Per worker, samples of its own share already consumed (a same-workers resume)."""
    num_workers: int = 1


class ShardReader(IterableDataset):
    """Streams the samples of ``stages`` of a shard set; see the module docstring.

    Args:
        source: a shard folder or its manifest.json (path, file://, http(s)://, fsspec URL,
            or ``pipe:COMMAND {}`` with ``allow_pipe=True``).
        stages: stage names in the order to stream them.
        rank, world_size: this process's place in distributed training.
        batch_size: the per-rank batch size the DataLoader uses (1 when it yields samples);
            it sets how a step is dealt to ranks and a rank's samples to workers.
        shuffle, window, neighbourhood, seed, epoch: the epoch's global sequence.
        remainder: ``"drop"`` (each rank gets ``N // R``) or ``"repeat"`` (``ceil(N / R)``,
            repeating the sequence from its start).
        fields: members to decode (``"json"``, ``"feat"``, ``"clips"``, ``"thumb"``, ... or
            full suffixes); others are skipped unread on seekable files. None: every member,
            requiring json and feat.
        on_error: ``"raise"``, or ``"skip"`` (log, count, fill the slot; see the docstring).
        verify: check each shard's sha256 against the manifest before streaming it.
        prefetch_bytes: bound of the read-ahead queue; 0 reads in the consuming thread.
        guard: optional per-sample function (e.g. ``train.length.LengthGuard.apply``) run while
            reading; a None result counts as a skipped sample and its slot is filled.
        allow_pipe: allow ``pipe:`` sources, which run a command.
        allow_outside: accept manifest shard URLs outside the set's folder (absolute paths,
            other hosts, ``../``): only for a manifest you trust.

    Raises :class:`SourceError` (a ``ValueError``) when the source cannot be opened: pipe
    not allowed, manifest unreadable or not a manifest; nothing there is its subclass
    :class:`~dataengine.sources.SourceNotFoundError`, also a ``FileNotFoundError``.
    """

    def __init__(self, source: str | os.PathLike, *, stages: Sequence[str], rank: int = 0,
                 world_size: int = 1, batch_size: int = 1, shuffle: Shuffle = "window",
                 window: int = 64, neighbourhood: int = 4, seed: int = 0, epoch: int = 0,
                 remainder: Remainder = "drop", fields: Sequence[str] | None = None,
                 on_error: OnError = "raise", verify: bool = False, prefetch_bytes: int = 64 << 20,
                 guard: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
                 allow_pipe: bool = False, allow_outside: bool = False):
        problems = []
        if isinstance(stages, str) or not stages:
            problems.append(f"stages must be a non-empty list of names, got {stages!r}")
        if not (world_size >= 1 and 0 <= rank < world_size):
            problems.append(f"rank {rank} outside world_size {world_size}")
        if batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {batch_size}")
        if shuffle not in ("none", "window", "stage"):
            problems.append(f"shuffle must be none|window|stage, got {shuffle!r}")
        if window < 1 or neighbourhood < 1:
            problems.append("window and neighbourhood must be >= 1")
        if seed < 0 or epoch < 0:
            problems.append("seed and epoch must be >= 0")
        if remainder not in ("drop", "repeat"):
            problems.append(f"remainder must be drop|repeat, got {remainder!r}")
        if on_error not in ("raise", "skip"):
            problems.append(f"on_error must be raise|skip, got {on_error!r}")
        if prefetch_bytes < 0:
            problems.append("prefetch_bytes must be >= 0")
        if problems:
            raise ValueError("ShardReader: " + "; ".join(problems))
        self.source = os.fspath(source)
        self.allow_pipe = allow_pipe
        where, self.manifest = open_manifest(self.source, allow_pipe=allow_pipe, allow_outside=allow_outside)
        self.manifest_url = manifest_url = where.url
        self.stages = list(stages)
        plans, start = [], 0
        for name in self.stages:
            info = self.manifest.stage(name)
            ends, total = [], 0
            for shard in info.shards:
                total += shard.samples
                ends.append(total)
            plans.append(StagePlan(name=name, start=start, shards=tuple(info.shards),
                                    urls=tuple(where.resolve(s.url) for s in info.shards), ends=tuple(ends)))
            start += total
        self._plans = tuple(plans)
        self._local = all(local_path(url) is not None for p in plans for url in p.urls)
        self.total = start
        if self.total == 0:
            raise ValueError(f"{manifest_url}: stages {self.stages} hold no samples")
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.shuffle, self.window, self.neighbourhood = shuffle, window, neighbourhood
        self.seed, self.epoch, self.remainder = seed, epoch, remainder
        self.fields = None if fields is None else tuple(fields)
        self.required = DEFAULT_REQUIRED if fields is None else self.fields
        self.on_error, self.verify = on_error, verify
        self.prefetch_bytes = prefetch_bytes
        self.guard = guard
        self._resume = _Resume()
        self._progress = {"worker": 0, "num_workers": 1, "yielded": 0}
        self._stats = ReaderStats()
        self.peak_prefetch_bytes = 0

    # -- the plan --------------------------------------------------------------------------
    def order(self, epoch: int | None = None) -> EpochOrder:
        return EpochOrder([p.samples for p in self._plans], shuffle=self.shuffle, window=self.window,
                          neighbourhood=self.neighbourhood, seed=self.seed,
                          epoch=self.epoch if epoch is None else epoch)

    def rank_slice(self, start: int = 0) -> RankSlice:
        return RankSlice(self.total, start, self.world_size, self.batch_size, self.remainder)

    def __len__(self) -> int:
        """Samples every rank yields in a full epoch."""
        return self.rank_slice().per_rank

    def sequence(self, epoch: int | None = None, *, rank: int | None = None) -> list[int]:
        """The global sample indices a rank yields in a full epoch, in order (for inspection)."""
        order, sl = self.order(epoch), self.rank_slice()
        r = self.rank if rank is None else rank
        return [order.sample(sl.position(r, i)) for i in range(sl.per_rank)]

    def plan(self, epoch: int | None = None, *, rank: int | None = None, worker: int = 0,
             num_workers: int = 1) -> list[ReadRange]:
        """The contiguous sample ranges one (rank, worker) reads in an epoch, in read order
        (file order within a window on streams, output order elsewhere)."""
        order, sl = self.order(epoch), self.rank_slice()
        r = self.rank if rank is None else rank
        groups = read_groups(order, sl, r, worker_indices(sl.per_rank, 0, self.batch_size, worker, num_workers))
        return read_ranges(self._plans, groups, file_order=self.shuffle == "window" and not self._local)

    # -- epochs and state ------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Call at the start of every epoch. Another epoch starts from its beginning; the
        epoch the reader is already at keeps a position loaded by :meth:`load_state_dict`."""
        if epoch < 0:
            raise ValueError("epoch must be >= 0")
        if epoch != self.epoch:
            self.epoch = epoch
            self._resume = _Resume()

    def _plan_identity(self) -> dict[str, Any]:
        return {"stages": list(self.stages), "samples": self.total, "shuffle": self.shuffle,
                "window": self.window, "neighbourhood": self.neighbourhood, "seed": self.seed,
                "remainder": self.remainder}

    def state_dict(self) -> dict[str, Any]:
        """This reader's position (in a DataLoader worker: that worker's) and statistics."""
        return {"format": STATE_FORMAT, "plan": self._plan_identity(), "epoch": self.epoch,
                "world_size": self.world_size, "rank": self.rank, "batch_size": self.batch_size,
                "start": self._resume.start, "offset": self._resume.offset,
                "worker": self._progress["worker"], "num_workers": self._progress["num_workers"],
                "yielded": self._progress["yielded"], "stats": self._stats.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from a reader state or a ``StatefulDataLoader`` state (see module docstring)."""
        states = _reader_states(state)
        first = states[0]
        mismatch = [f"{k}: saved {first['plan'].get(k)!r}, now {v!r}"
                    for k, v in self._plan_identity().items() if first["plan"].get(k) != v]
        if mismatch:
            raise ValueError("reader state belongs to another plan: " + "; ".join(mismatch))
        info = get_worker_info()
        if (len(states) == 1 and first["num_workers"] > 1 and info is not None
                and info.id == first["worker"] and info.num_workers == first["num_workers"]
                and first["world_size"] == self.world_size and first["batch_size"] == self.batch_size):
            # StatefulDataLoader restoring one of its own workers: continue that worker's share.
            self.epoch = first["epoch"]
            self._resume = _Resume(first["start"], first["offset"], {first["worker"]: first["yielded"]},
                                   first["num_workers"])
            self._stats = ReaderStats.from_dict(first.get("stats", {}))
            return
        position = reader_state_from_loader(state) if len(states) > 1 or "format" not in state else first
        if position["num_workers"] > 1 and len(states) == 1:
            raise ValueError("this is one DataLoader worker's reader state; pass the loader's whole "
                             "state_dict() so the workers' positions can be combined")
        consumed = position["offset"] + position["yielded"]
        self.epoch = position["epoch"]
        self._stats = ReaderStats.from_dict(position.get("stats", {}))
        if position["world_size"] == self.world_size and position["batch_size"] == self.batch_size:
            self._resume = _Resume(position["start"], consumed)
            return
        saved = RankSlice(self.total, position["start"], position["world_size"], position["batch_size"],
                          self.remainder)
        global_position = saved.global_position(consumed)
        if global_position is None:
            raise ValueError(f"cannot re-slice for world_size {self.world_size} / batch_size "
                             f"{self.batch_size}: the state is {consumed % position['batch_size']} samples "
                             "into a step; save at a batch boundary")
        self._resume = _Resume(start=global_position)

    def stats(self) -> dict[str, Any]:
        """What this reader did (in the main process; worker stats travel in the loader's
        state, see :func:`stats_from_loader`)."""
        return self._stats.to_dict()

    # -- iteration -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        resume = self._resume
        skip = 0
        if resume.worker_skips is not None:
            if resume.num_workers != num_workers:
                raise ValueError(f"state saved with {resume.num_workers} workers, loaded into {num_workers}")
            skip = resume.worker_skips.get(worker, 0)
        sl = self.rank_slice(resume.start)
        indices = worker_indices(sl.per_rank, resume.offset, self.batch_size, worker, num_workers, skip)
        self._progress = {"worker": worker, "num_workers": num_workers, "yielded": skip}
        groups = read_groups(self.order(), sl, self.rank, indices)
        return self._deliver(groups)

    def _produce(self, groups: Iterable[list[tuple[int, int]]], ctx: ReadContext) -> Iterator[Any]:
        """Read every group in file order; yield its samples (a :class:`_Skip` for a lost one)
        in output order. Runs in the prefetch thread, or in the consumer's."""
        fetcher = _Fetcher(self._plans, ctx)
        try:
            for group in groups:
                if len(group) == 1 or self._local or self.shuffle != "window":
                    # In output order. For a window on local files the jumps stay inside one
                    # window's byte range, which readahead and the page cache serve; holding
                    # the window's samples to permute them would cost memory and page faults.
                    samples: Iterable[Any] = (fetcher.fetch(index) for _, index in group)
                else:
                    # Streams: read the window's samples in file order (strictly sequential),
                    # hand them out permuted.
                    read = {}
                    for k in sorted(range(len(group)), key=lambda k: group[k][1]):
                        read[k] = fetcher.fetch(group[k][1])
                    samples = (read.pop(k) for k in range(len(group)))
                for sample in samples:
                    if not isinstance(sample, _Skip) and self.guard is not None:
                        guarded = self.guard(sample)
                        if guarded is None:
                            ctx.stats.skipped["length guard"] += 1
                            guarded = _Skip(f"{sample['shard']}#{sample['key']}")
                        sample = guarded
                    yield sample
                    # not held while the next sample is read: its buffers may be reused
                    sample = guarded = None
        finally:
            fetcher.close()

    def _deliver(self, groups: Iterable[list[tuple[int, int]]]) -> Iterator[dict[str, Any]]:
        ctx = ReadContext(fields=self.fields, required=self.required, verify=self.verify,
                           allow_pipe=self.allow_pipe, on_error=self.on_error, stats=self._stats,
                           pool=BufferPool(self.prefetch_bytes + (32 << 20)))
        produced = self._produce(groups, ctx)
        queue = None
        if self.prefetch_bytes:
            queue = BytesQueue(self.prefetch_bytes)
            items: Iterator[Any] = threaded(produced, queue, _item_bytes)
        else:
            items = produced
        last_good: dict[str, Any] | None = None
        can_skip = self.on_error == "skip" or self.guard is not None
        owed: list[str] = []
        try:
            for sample in items:
                if isinstance(sample, _Skip):  # fill the slot so every rank yields the same count
                    if last_good is None:
                        owed.append(sample.what)
                        continue
                    sample = dict(last_good, substitute_for=sample.what)
                    self._stats.substituted += 1
                else:
                    if can_skip:  # kept only where a slot may need filling: it pins its buffers
                        last_good = sample
                    for what in owed:
                        self._stats.substituted += 1
                        self._progress["yielded"] += 1
                        self._stats.samples += 1
                        yield dict(sample, substitute_for=what)
                    owed = []
                self._progress["yielded"] += 1
                self._stats.samples += 1
                yield sample
                sample = None  # not held while the next one is read (its buffers may be reused)
            if owed:
                raise ShardError(self.manifest_url, f"no readable sample to fill {len(owed)} skipped "
                                                    f"slot(s); errors: {self._stats.errors[:3]}")
        finally:
            if queue is not None:
                queue.close()
                items.close()  # joins the prefetch thread, which closes the producer
                self.peak_prefetch_bytes = max(self.peak_prefetch_bytes, queue.peak_bytes)
            else:
                produced.close()


@dataclass(frozen=True)
class _Skip:
    """A planned sample that could not be delivered (already counted and logged)."""

    what: str
    """``URL#index`` of the lost sample, or ``URL#key``."""


def _item_bytes(item: Any) -> int:
    """What a produced item weighs in the prefetch queue's bound."""
    return 1024 if isinstance(item, _Skip) else sample_nbytes(item)


# --------------------------------------------------------------------- loader state

def _reader_states(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The reader states inside a reader or StatefulDataLoader state, one per worker."""
    if state.get("format") == STATE_FORMAT:
        return [state]
    if LOADER_SNAPSHOT in state:  # multi-process StatefulDataLoader: worker_0, worker_1, ...
        workers = state[LOADER_SNAPSHOT][LOADER_WORKER_SNAPSHOTS]
        out = [workers[k].get(LOADER_DATASET_STATE) for k in sorted(workers, key=lambda k: int(k.split("_")[-1]))]
    else:
        out = [state.get(LOADER_DATASET_STATE)]
    if not out or any(not isinstance(s, dict) or s.get("format") != STATE_FORMAT for s in out):
        raise ValueError("not a ShardReader state nor a StatefulDataLoader state over a ShardReader")
    return out


def reader_state_from_loader(state: dict[str, Any]) -> dict[str, Any]:
    """A rank-level reader state (``num_workers`` 1) from a ``StatefulDataLoader`` state.

    The loader hands batches out from its workers in turn, so the rank consumed exactly the
    first ``offset + sum(yielded)`` samples of its slice; batches yielded after the loader's
    last snapshot (``snapshot_every_n_steps`` > 1) are added as whole batches.
    """
    states = _reader_states(state)
    first = states[0]
    for key in ("epoch", "start", "offset", "world_size", "batch_size", "num_workers"):
        if any(s[key] != first[key] for s in states):
            raise ValueError(f"worker states disagree on {key}")
    num_workers = first["num_workers"]
    if len(states) != num_workers:
        raise ValueError(f"{len(states)} worker states for num_workers {num_workers}")
    b = first["batch_size"]
    yielded = [s["yielded"] for s in states]
    consumed_chunks = sum(-(-y // b) for y in yielded)
    for w, y in enumerate(yielded):  # round-robin: worker w holds chunks w, w+W, ... below the total
        expected_chunks = max(0, -(-(consumed_chunks - w) // num_workers))
        if -(-y // b) != expected_chunks:
            raise ValueError("worker positions are not a prefix of the rank's sequence "
                             "(was the loader created with in_order=False?)")
    total = sum(yielded) + state.get(LOADER_STEPS_SINCE_SNAPSHOT, 0) * b
    stats = ReaderStats()
    for s in states:
        stats.add(ReaderStats.from_dict(s.get("stats", {})))
    return dict(first, worker=0, num_workers=1, yielded=total, stats=stats.to_dict())


def stats_from_loader(state: dict[str, Any]) -> dict[str, Any]:
    """All workers' reader statistics from a ``StatefulDataLoader`` state, summed."""
    stats = ReaderStats()
    for s in _reader_states(state):
        stats.add(ReaderStats.from_dict(s.get("stats", {})))
    return stats.to_dict()


def __getattr__(name: str) -> Any:
    # LengthGuard moved to train/length.py (it is the trainers' rule; the engine never imports
    # train). Until train/sft.py, train/rm.py and tests/test_conversation.py import it from
    # there, the old name still resolves; delete this function then.
    if name == "LengthGuard":
        from train.length import LengthGuard

        return LengthGuard
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
