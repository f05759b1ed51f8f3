"""The reader's plan: which sample each rank and DataLoader worker reads, in which order.

Pure arithmetic over the manifest's sample counts (no file is opened, nothing here depends on
ranks' pids, time or the machine): :class:`ShardReader <dataengine.reader.ShardReader>`
builds on it, and ``tests/test_reader.py`` checks it by hand.

- :class:`StagePlan` — one stage's shards and their cumulative sample counts;
  :func:`locate` maps a global sample index to (stage, shard, sample within the shard).
- :class:`EpochOrder` — the epoch's *global sequence*: the sample at each position, from
  (seed, epoch, shuffle, window, neighbourhood) alone (see the reader's docstring for the
  three shuffle modes).
- :class:`RankSlice` — how positions ``[start, total)`` are dealt to ranks in steps of
  ``world_size * batch_size``, each rank getting the same count.
- :func:`worker_indices` — a rank's samples dealt to DataLoader workers in chunks of
  ``batch_size``, round-robin, so the loader's output is the rank's order for any W.
- :func:`read_groups` — those samples grouped as they are read (by window, or one by one).
"""

from __future__ import annotations

import bisect
import collections
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, Sequence

import numpy as np

from dataengine.schema import ShardInfo

Shuffle = Literal["none", "window", "stage"]
Remainder = Literal["drop", "repeat"]


@dataclass(frozen=True)
class StagePlan:
    name: str
    start: int
    """Global index of the stage's first sample."""
    shards: tuple[ShardInfo, ...]
    urls: tuple[str, ...]
    ends: tuple[int, ...]
    """Cumulative sample counts: shard j holds stage samples [ends[j-1], ends[j])."""

    @property
    def samples(self) -> int:
        return self.ends[-1] if self.ends else 0


def locate(stages: Sequence[StagePlan], index: int) -> tuple[int, int, int]:
    """(stage, shard, sample within the shard) of a global sample index."""
    s = bisect.bisect_right([p.start for p in stages], index) - 1 if len(stages) > 1 else 0
    stage = stages[s]
    p = index - stage.start
    j = bisect.bisect_right(stage.ends, p)
    return s, j, p - (stage.ends[j - 1] if j else 0)


class EpochOrder:
    """Which sample sits at each position of one epoch's global sequence.

    Depends only on the stage sizes and (shuffle, window, neighbourhood, seed, epoch); the
    permutations come from numpy's PCG64 seeded by ``[seed, epoch, stage, kind, index]``
    (integer arithmetic, the same on every machine).
    """

    _BLOCK, _WINDOW, _STAGE = 1, 2, 3

    def __init__(self, stage_sizes: Sequence[int], *, shuffle: Shuffle, window: int,
                 neighbourhood: int, seed: int, epoch: int):
        self.sizes = list(stage_sizes)
        self.starts = [0]
        for n in self.sizes:
            self.starts.append(self.starts[-1] + n)
        self.total = self.starts[-1]
        self.shuffle, self.window, self.neighbourhood = shuffle, window, neighbourhood
        self.seed, self.epoch = seed, epoch
        self._perms: collections.OrderedDict = collections.OrderedDict()

    def _perm(self, kind: int, stage: int, index: int, n: int) -> np.ndarray:
        key = (kind, stage, index)
        perm = self._perms.get(key)
        if perm is None:
            rng = np.random.default_rng([self.seed, self.epoch, stage, kind, index])
            perm = rng.permutation(n)
            self._perms[key] = perm
            if len(self._perms) > 8:
                self._perms.popitem(last=False)
        return perm

    def locate(self, position: int) -> tuple[int, int]:
        """(stage index, position within the stage)."""
        stage = bisect.bisect_right(self.starts, position) - 1
        return stage, position - self.starts[stage]

    def group(self, position: int) -> tuple[int, int]:
        """Positions with the same group are read together (one window of the sequence)."""
        stage, p = self.locate(position)
        return stage, (p // self.window if self.shuffle == "window" else 0)

    def sample(self, position: int) -> int:
        """The global sample index (stream order) at ``position``."""
        if self.shuffle == "none":
            return position
        stage, p = self.locate(position)
        n = self.sizes[stage]
        if self.shuffle == "stage":
            return self.starts[stage] + int(self._perm(self._STAGE, stage, 0, n)[p])
        w, h = self.window, self.neighbourhood
        full = n // w
        slot = p // w
        if slot < full:  # whole windows are permuted within blocks of h; a short last one stays last
            block = slot // h
            size = min(h, full - block * h)
            win = block * h + int(self._perm(self._BLOCK, stage, block, size)[slot % h])
            wsize = w
        else:
            win, wsize = slot, n - full * w
        return self.starts[stage] + win * w + int(self._perm(self._WINDOW, stage, win, wsize)[p - slot * w])


@dataclass(frozen=True)
class RankSlice:
    """How the positions ``[start, total)`` of an epoch are dealt to ``world_size`` ranks.

    Steps of ``world_size * batch_size`` positions; rank r takes the r-th ``batch_size`` of
    each step; the last, partial step is split evenly. Every rank gets :attr:`per_rank`.
    """

    total: int
    start: int
    world_size: int
    batch_size: int
    remainder: Remainder

    @property
    def per_rank(self) -> int:
        left = max(0, self.total - self.start)
        if self.remainder == "repeat":
            return -(-left // self.world_size)
        return left // self.world_size

    @property
    def full_steps(self) -> int:
        return self.per_rank // self.batch_size

    def position(self, rank: int, i: int) -> int:
        """Global sequence position of rank ``rank``'s ``i``-th sample."""
        b, steps = self.batch_size, self.full_steps
        q = i // b
        if q < steps:
            g = self.start + q * self.world_size * b + rank * b + i % b
        else:
            tail = self.per_rank - steps * b
            g = self.start + steps * self.world_size * b + rank * tail + (i - steps * b)
        return g % self.total if g >= self.total else g

    def global_position(self, consumed: int) -> int | None:
        """Where the epoch stands once every rank consumed ``consumed`` samples, or None when
        that set is not a prefix of the sequence (a position inside a step)."""
        if consumed >= self.per_rank:
            return self.total
        if consumed % self.batch_size == 0:
            return self.start + consumed * self.world_size
        return None


def worker_indices(per_rank: int, offset: int, batch_size: int, worker: int, num_workers: int,
                   skip: int = 0) -> Iterator[int]:
    """A worker's share of a rank's samples ``[offset, per_rank)``: chunks of ``batch_size``
    dealt round-robin, so a DataLoader's batch-by-worker output is the rank's order."""
    n_chunks = -(-max(0, per_rank - offset) // batch_size)
    for chunk in range(worker, n_chunks, num_workers):
        lo = offset + chunk * batch_size
        hi = min(lo + batch_size, per_rank)
        if skip >= hi - lo:
            skip -= hi - lo
            continue
        yield from range(lo + skip, hi)
        skip = 0


def read_groups(order: EpochOrder, sl: RankSlice, rank: int,
                indices: Iterable[int]) -> Iterator[list[tuple[int, int]]]:
    """(rank-local index, global sample) in output order, grouped by window (window shuffle)
    or one by one (the other modes read in output order)."""
    window = order.shuffle == "window"
    group: list[tuple[int, int]] = []
    current = None
    for i in indices:
        position = sl.position(rank, i)
        g = order.group(position) if window else None
        if group and (g != current or not window):
            yield group
            group = []
        current = g
        group.append((i, order.sample(position)))
    if group:
        yield group


@dataclass(frozen=True)
class ReadRange:
    """A run of consecutive samples of one shard, read in one sequential pass."""

    stage: str
    url: str
    first: int
    """Index of the first sample within the shard."""
    count: int


def read_ranges(stages: Sequence[StagePlan], groups: Iterable[list[tuple[int, int]]],
                file_order: bool) -> list[ReadRange]:
    """The contiguous shard ranges that ``groups`` read, in read order (each group in file
    order when ``file_order``, as streams read a window)."""
    ranges: list[ReadRange] = []
    for group in groups:
        indices = [index for _, index in group]
        if file_order:
            indices.sort()
        for index in indices:
            s, j, i = locate(stages, index)
            plan = stages[s]
            last = ranges[-1] if ranges else None
            if last and last.url == plan.urls[j] and last.first + last.count == i:
                ranges[-1] = ReadRange(last.stage, last.url, last.first, last.count + 1)
            else:
                ranges.append(ReadRange(plan.name, plan.urls[j], i, 1))
    return ranges
