"""Fetching samples out of shards: a global sample index in, a decoded sample out.

What :class:`~dataengine.reader.ShardReader` does for each sample it plans to read
(:class:`Fetcher`): find the shard holding it (:func:`dataengine.plan.locate`), keep the few
shards in use open, walk a shard header by header (:mod:`dataengine.tario`), index the
members found so that coming back to a sample is a seek to its data, decode the wanted members
(``json`` a dict, ``.npy`` a float16 tensor over a pooled buffer, others bytes), check the
sample (no member twice, required fields present, keys contiguous, the manifest's count), and
turn every problem into a :class:`~dataengine.tario.ShardError` — raised, or, with
``on_error="skip"``, counted in :class:`ReaderStats` and handed on as a :class:`Skip`.
:class:`ReadContext` (what to decode, how to count) is shared with the webdataset stage.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch

from dataengine import schema
from dataengine.plan import StagePlan, locate
from dataengine.prefetch import BufferPool
from dataengine.schema import ShardInfo
from dataengine.sources import open_url
from dataengine.tario import ShardError, TarError, TarMember, TarReader, TruncatedTarError, decode_npy, split_name

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]

# Output names of the members the schema knows; any other member keeps its suffix.
_OUTPUT_NAME = {schema.JSON: "json", schema.FEAT: "feat", schema.CLIPS: "clips"}
DEFAULT_REQUIRED = ("json", "feat")
_HASH_CHUNK = 4 << 20
_ERRORS_KEPT = 100

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


class Fetcher:
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

    def fetch(self, index: int) -> dict[str, Any] | Skip:
        """The sample, or a :class:`Skip` when ``on_error="skip"`` (counted and logged)."""
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
            return Skip(f"{shard.url}#{i}")

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        self._shards.clear()


@dataclass(frozen=True)
class Skip:
    """A planned sample that could not be delivered (already counted and logged)."""

    what: str
    """``URL#index`` of the lost sample, or ``URL#key``."""

