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
which saves page faults: :class:`~dataengine.prefetch.BufferPool`): ``feat`` and
``clips`` are writable float16 tensors, ``json`` a dict, other members raw bytes.
Members not in ``fields`` are not decoded, and on seekable files not read. A background
thread reads ahead into a queue bounded in bytes (``prefetch_bytes``),
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
:class:`ShardError` are :mod:`dataengine.tario`; walking a shard, decoding its members and
counting what went wrong are :mod:`dataengine.fetch`; this module holds :class:`ShardReader`
(the plan put to work, the prefetch, filling lost slots) and its state. ``ReaderStats`` is
importable from here too.
``docs/reader.md`` lists what the reader relies on.

The trainers' length rule (a sample's tokens once video features are spliced in) is
:class:`train.length.LengthGuard`; its ``apply`` is what trainers pass as ``guard``.

Benchmark: ``python benchmarks/bench_reader.py``. Tests: ``pytest tests/test_reader.py
tests/test_reader_dist.py``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

from torch.utils.data import IterableDataset, get_worker_info

# ReaderStats is re-exported: trainers import it from here.
from dataengine.fetch import DEFAULT_REQUIRED, Fetcher, OnError, ReadContext, ReaderStats, Skip  # noqa: F401
from dataengine.plan import (EpochOrder, RankSlice, ReadRange, Remainder, Shuffle, StagePlan, read_groups,
                             read_ranges, worker_indices)
from dataengine.prefetch import BufferPool, BytesQueue, sample_nbytes, threaded
from dataengine.sources import SourceError, read_url  # noqa: F401  (re-exported: train/ imports them here)
from dataengine.sources import local_path, open_manifest
from dataengine.tario import ShardError

log = logging.getLogger(__name__)

STATE_FORMAT = "vlmr-reader/1"

# The keys of a torchdata StatefulDataLoader state that the reader reads to find its workers'
# states (private to torchdata 0.11; tests/test_reader.py checks them against the installed one).
LOADER_SNAPSHOT = "_snapshot"
LOADER_WORKER_SNAPSHOTS = "_worker_snapshots"
LOADER_DATASET_STATE = "dataset_state"
LOADER_STEPS_SINCE_SNAPSHOT = "_steps_since_snapshot"


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
        """Read every group in file order; yield its samples (a :class:`Skip` for a lost one)
        in output order. Runs in the prefetch thread, or in the consumer's."""
        fetcher = Fetcher(self._plans, ctx)
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
                    if not isinstance(sample, Skip) and self.guard is not None:
                        guarded = self.guard(sample)
                        if guarded is None:
                            ctx.stats.skipped["length guard"] += 1
                            guarded = Skip(f"{sample['shard']}#{sample['key']}")
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
                if isinstance(sample, Skip):  # fill the slot so every rank yields the same count
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


def _item_bytes(item: Any) -> int:
    """What a produced item weighs in the prefetch queue's bound."""
    return 1024 if isinstance(item, Skip) else sample_nbytes(item)


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
