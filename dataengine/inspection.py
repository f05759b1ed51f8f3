"""Looking inside a shard set without writing code: summary, shard rows, samples, verification.

These functions back ``vlmr inspect`` (tools/inspect.py only parses arguments and prints);
the HTML report is drawn by :mod:`dataengine.report`::

    vlmr inspect shards/demo                  # summary: stages, bytes, answer lengths, failures
    vlmr inspect shards/demo ls               # one row per shard, from the manifest
    vlmr inspect shards/demo show KEY         # one sample: conversation, features, narrative
    vlmr inspect shards/demo head -n 5        # the first samples in stream order
    vlmr inspect shards/demo verify           # every byte checked; exit 1 on any problem
    vlmr inspect shards/demo report --out r/  # static HTML page with pictures

A SOURCE is a shard folder, its ``manifest.json``, or a URL of either (``http(s)://``,
``file://`` or any scheme fsspec knows), opened by :mod:`dataengine.sources` exactly as the
reader opens it (``pipe:`` sources are refused: they run a command).

How: every pass streams the tars in stream order through :func:`scan_tar`, which walks the
headers with :class:`dataengine.tario.TarReader`, reads only the members asked for (the
others are skipped, by seek on local files) and holds one sample at a time, so nothing grows
with the size of the set. Python's ``tarfile`` is not used for reading because it ends the
archive silently at the first damaged header after offset 0 — samples would vanish without a
word. :func:`scan_tar` reports the damage with its byte offset and resynchronises at the next
valid header, so :func:`verify` lists every problem of a shard, not only the first; the other
commands stop at the first damage with the shard and byte. ``head`` in the CLI reads through
:class:`dataengine.reader.ShardReader` instead (what a trainer sees); everything here stays
free of torch so that ``vlmr inspect`` starts fast. Nothing is unpickled: ``.npy`` members are
read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import numpy as np

from dataengine import schema, tario
from dataengine.schema import Manifest, ShardInfo, StageInfo
from dataengine.sources import SourceError  # noqa: F401  (re-exported: `vlmr inspect` catches it)
from dataengine.sources import local_path, open_manifest, open_url, resolve_url

log = logging.getLogger(__name__)

BLOCK = 512
REQUIRED_FIELDS = ("id", "video_id", "conversations", "answer_tokens")
"""json fields every sample must have; any other field is shown, never rejected."""
PREFERENCE_FIELDS = ("chosen", "rejected", "judge")


class ShardError(RuntimeError):
    """A shard is damaged; the message names the shard URL and the byte offset."""


# ================================================================================ sources
# Locating, opening and resolving are dataengine.sources (shared with the reader).

@dataclass
class ShardSet:
    """A shard set opened for reading: where it is and its manifest."""

    source: str
    """What the user gave (folder, manifest file or URL)."""
    base: str
    """Folder (path or URL) that the manifest's relative shard URLs are under."""
    manifest: Manifest
    manifest_url: str = ""
    """Path or URL of the manifest (``base/manifest.json`` when not given)."""

    def __post_init__(self) -> None:
        if not self.manifest_url:
            self.manifest_url = resolve_url(self.base, schema.MANIFEST_NAME)

    @property
    def is_local(self) -> bool:
        return local_path(self.base) is not None

    def url(self, shard: ShardInfo) -> str:
        return resolve_url(self.base, shard.url)

    def stage_names(self) -> list[str]:
        return [s.name for s in self.manifest.stages]

    def stages(self, stage: str | None = None) -> list[StageInfo]:
        """All stages in stream order, or only ``stage`` (KeyError naming the known ones)."""
        return self.manifest.stages if stage is None else [self.manifest.stage(stage)]

    def open(self, shard: ShardInfo) -> BinaryIO:
        url = self.url(shard)
        try:
            return open_url(url, buffered=True)[0]
        except (OSError, ValueError) as exc:
            raise ShardError(f"{url}: cannot open: {exc}") from exc

    @property
    def bytes(self) -> int:
        return sum(s.bytes for st in self.manifest.stages for s in st.shards)


def open_shard_set(source: str | os.PathLike) -> ShardSet:
    """Open a shard folder, a manifest file, or a URL of either; reads only the manifest.

    :class:`SourceError` names what is wrong (``pipe:`` sources are refused: they run a command).
    """
    where, manifest = open_manifest(source)
    return ShardSet(source=where.source, base=where.base, manifest=manifest, manifest_url=where.url)


# ================================================================================ failures

@dataclass
class FailureLog:
    """What ``failures.jsonl`` says was left out at build time."""

    present: bool
    count: int = 0
    reasons: Counter = field(default_factory=Counter)
    samples_left_out: int = 0
    bad_lines: list[str] = field(default_factory=list)
    """Lines that are not a JSON object, as ``line N: why``."""


def read_failures(shard_set: ShardSet) -> FailureLog:
    """Count ``failures.jsonl`` lines by reason (streamed line by line); absent is not an error."""
    url = resolve_url(shard_set.base, schema.FAILURES_NAME)
    try:
        f, _ = open_url(url, buffered=True)  # read line by line
    except (OSError, ValueError):
        return FailureLog(present=False)
    out = FailureLog(present=True)
    with f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
                if not isinstance(line, dict):
                    raise ValueError(f"expected a JSON object, got {type(line).__name__}")
            except ValueError as exc:
                out.bad_lines.append(f"line {number}: {exc}")
                continue
            out.count += 1
            out.reasons[str(line.get("reason") or "unknown")] += 1
            samples = line.get("samples")
            out.samples_left_out += samples if isinstance(samples, int) else 0
    return out


# ================================================================================ tar scanning

@dataclass
class ScannedMember:
    name: str
    offset: int
    """Byte offset of the member's (first) header in the tar."""
    size: int
    data: bytes | None
    """The member's bytes, or None when the caller did not ask for them."""


@dataclass
class TarDamage:
    kind: str
    """``truncated`` or ``bad_header``."""
    offset: int
    message: str
    """What happened and what the scan did about it."""
    reason: str = ""
    """What happened only (for callers that stop at the damage)."""


def _is_header(block: bytes) -> bool:
    """Whether a 512-byte block is a ustar header with a correct checksum (a resync point)."""
    if block[257:262] != b"ustar":
        return False
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(block[:148]) + 8 * 32 + sum(block[156:])


class _Pushback:
    """A forward-only stream with bytes put back in front (the header found by a resync)."""

    def __init__(self, f: BinaryIO, pending: bytes):
        self._f = f
        self._pending = memoryview(pending)

    def seekable(self) -> bool:
        return False

    def readinto(self, buf) -> int:
        if self._pending:
            n = min(len(buf), len(self._pending))
            memoryview(buf).cast("B")[:n] = self._pending[:n]
            self._pending = self._pending[n:]
            return n
        return self._f.readinto(buf)

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        return bytes(buf[: self.readinto(buf)])


def scan_tar(f: BinaryIO, url: str, want: Callable[[str], bool] = lambda name: True, *,
             seekable: bool = False, size: int | None = None) -> Iterator[ScannedMember | TarDamage]:
    """Members of a tar stream in order (via :class:`dataengine.tario.TarReader`), and its damage.

    ``want(name)`` says whether to read a member's bytes (otherwise ``data`` is None and the
    bytes are skipped, by seek when ``seekable``). On a damaged header, yields one
    :class:`TarDamage` and resumes at the next block that is a valid ustar header (the
    members in between are lost, and reported as lost); a stream that ends inside a member
    or without the end-of-archive block yields a ``truncated`` damage and stops. ``size``, the
    file's length when known, lets a skipped member cut by truncation be named.
    """
    reader = tario.TarReader(f, url, offset=0, seekable=seekable, size=size)
    while True:
        try:
            member = reader.next()
            if member is None:
                return
            data = reader.read(member) if want(member.name) else None
        except tario.TruncatedTarError as exc:
            yield TarDamage("truncated", exc.offset, exc.reason, exc.reason)
            return
        except tario.TarError as exc:
            bad_at, position = exc.offset, reader.position
            aligned = bad_at + (position - bad_at + BLOCK - 1) // BLOCK * BLOCK
            raw = f if seekable else reader.fileobj
            if seekable:
                f.seek(aligned)
            elif aligned > position:
                _read_exact(raw, aligned - position)
            position = aligned
            while True:  # resynchronise: the next block that is a valid ustar header
                block = _read_exact(raw, BLOCK)
                if len(block) < BLOCK:
                    yield TarDamage("bad_header", bad_at,
                                    f"{exc.reason} at byte {bad_at}; no valid header after it (end of file at "
                                    f"byte {position + len(block)}): the rest of the shard is lost", exc.reason)
                    return
                if _is_header(block):
                    break
                position += BLOCK
            yield TarDamage("bad_header", bad_at,
                            f"{exc.reason} at byte {bad_at}; resumed at the next valid header at byte {position} "
                            f"({position - bad_at} bytes in between are lost)", exc.reason)
            if seekable:
                f.seek(position)
                reader = tario.TarReader(f, url, offset=position, seekable=True, size=size)
            else:
                reader = tario.TarReader(_Pushback(raw, block), url, offset=position, seekable=False)
            continue
        yield ScannedMember(name=member.name, offset=member.offset, size=member.size, data=data)


def _read_exact(f: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes, fewer only at the end of the stream."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = f.readinto(view[got:])
        if not k:
            break
        got += k
    return bytes(buf[:got])


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key ends at the first dot after the last slash."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


# ================================================================================ samples

@dataclass
class RawSample:
    """One sample's members as stored (bytes), with where it sits in the stream."""

    stage: str
    shard: str
    """URL of its shard."""
    index: int
    """Position in the stream order of the whole set (0-based)."""
    stage_index: int
    """Position within its stage."""
    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    """suffix -> bytes, for the members that were read."""
    sizes: dict[str, int] = field(default_factory=dict)
    """suffix -> size in bytes, for every member (read or skipped)."""
    offset: int = 0
    """Byte offset of the sample's first header in its shard."""

    def json(self) -> dict[str, Any]:
        return decode_json(self.members[schema.JSON], f"{self.shard}: {self.key}.json")


def decode_json(data: bytes, where: str) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def decode_npy(data: bytes, where: str) -> np.ndarray:
    """An array from ``.npy`` bytes; never unpickles (object arrays are an error)."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{where}: cannot decode .npy without pickle: {exc}") from exc


SampleFilter = Callable[[str, int, str], bool]
"""(stage, stage_index, key) -> whether to read this sample's members beyond its json."""


def iter_raw_samples(shard_set: ShardSet, *, stage: str | None = None, start: int = 0,
                     members: Iterable[str] | None = (schema.JSON,),
                     full: SampleFilter | None = None) -> Iterator[RawSample]:
    """Samples in stream order, reading only some members; damage raises :class:`ShardError`.

    ``start`` counts within ``stage`` when given, else over the whole set; whole shards
    before it are not opened. ``members``: suffixes read for every sample (None: all).
    ``full(stage, stage_index, key)``: samples for which every member is read.
    """
    wanted = None if members is None else set(members)
    position = 0  # global index of the first sample of the current shard
    for stage_info in shard_set.manifest.stages:
        if stage is not None and stage_info.name != stage:
            position += stage_info.samples
            continue
        stage_position = 0
        for shard in stage_info.shards:
            first_wanted = start - (stage_position if stage is not None else position)
            if first_wanted >= shard.samples:
                position += shard.samples
                stage_position += shard.samples
                continue
            yield from _shard_samples(shard_set, stage_info.name, shard, position, stage_position,
                                      max(first_wanted, 0), wanted, full)
            position += shard.samples
            stage_position += shard.samples


def _shard_samples(shard_set: ShardSet, stage: str, shard: ShardInfo, position: int, stage_position: int,
                   skip: int, wanted: set[str] | None, full: SampleFilter | None) -> Iterator[RawSample]:
    url = shard_set.url(shard)
    local = local_path(url) is not None
    state = {"n": -1, "key": None, "full": False}

    def want(name: str) -> bool:
        key, suffix = split_name(name)
        if key != state["key"]:
            state["key"] = key
            state["n"] += 1
            state["full"] = full is not None and full(stage, stage_position + state["n"], key)
        if state["n"] < skip:
            return False
        return state["full"] or wanted is None or suffix in wanted

    current: RawSample | None = None
    count = -1
    with shard_set.open(shard) as f:
        size = tario.file_size(f) if local else None
        for event in scan_tar(f, url, want, seekable=local, size=size):
            if isinstance(event, TarDamage):
                raise ShardError(f"{url}: byte {event.offset}: {event.reason} (`vlmr inspect "
                                 f"{shard_set.source} verify` lists every problem)")
            key, suffix = split_name(event.name)
            if current is None or key != current.key:
                count += 1
                if current is not None and count - 1 >= skip:
                    yield current
                current = RawSample(stage=stage, shard=url, index=position + count,
                                    stage_index=stage_position + count, key=key, offset=event.offset)
            current.sizes[suffix] = event.size
            if event.data is not None:
                current.members[suffix] = event.data
        if current is not None and count >= skip:
            yield current


# ================================================================================ describing

def feature_stats(array: np.ndarray) -> dict[str, Any]:
    """Shape, dtype and simple statistics (over finite values) of a feature array."""
    values = np.asarray(array, dtype=np.float32)
    finite = np.isfinite(values)
    good = values[finite]
    stats: dict[str, Any] = {
        "shape": list(array.shape), "dtype": str(array.dtype),
        "nan": int(np.isnan(values).sum()), "inf": int(np.isinf(values).sum()),
    }
    if good.size:
        stats.update(mean=float(good.mean()), std=float(good.std()), min=float(good.min()), max=float(good.max()))
    else:
        stats.update(mean=None, std=None, min=None, max=None)
    return stats


def first_turn(conversations: Any, speaker: str) -> str:
    """The first turn of ``speaker`` (``human``/``gpt``), without the ``<video>`` placeholder."""
    for turn in conversations if isinstance(conversations, list) else []:
        if isinstance(turn, dict) and turn.get("from") == speaker:
            return str(turn.get("value", "")).replace("<video>", "").strip()
    return ""


def question_and_answer(data: dict[str, Any]) -> tuple[str, str]:
    conversations = data.get("conversations")
    return first_turn(conversations, "human"), first_turn(conversations, "gpt")


def describe_sample(raw: RawSample) -> dict[str, Any]:
    """Everything ``show`` prints, JSON-ready: fields, conversation, feature statistics."""
    data = raw.json()
    out: dict[str, Any] = {
        "key": raw.key, "stage": raw.stage, "index": raw.index, "stage_index": raw.stage_index,
        "shard": raw.shard, "members": dict(raw.sizes),
        "id": data.get("id"), "video_id": data.get("video_id"), "source": data.get("source"),
        "answer_tokens": data.get("answer_tokens"), "conversations": data.get("conversations"),
    }
    if "narrative" in data:
        out["narrative"] = data["narrative"]
    preference = {k: data[k] for k in PREFERENCE_FIELDS if k in data}
    if preference:
        out["preference"] = preference
    known = set(REQUIRED_FIELDS) | {"source", "stage", "narrative", *PREFERENCE_FIELDS}
    other = {k: v for k, v in data.items() if k not in known}
    if other:
        out["other_fields"] = other
    features = {}
    for suffix, blob in raw.members.items():
        if suffix.endswith("npy"):
            features[suffix] = feature_stats(decode_npy(blob, f"{raw.shard}: {raw.key}.{suffix}"))
    out["features"] = features
    return out


def find_sample(shard_set: ShardSet, *, key: str | None = None, index: int | None = None,
                stage: str | None = None) -> RawSample | None:
    """The sample with ``key``, or the ``index``-th (within ``stage`` if given), all members read.

    By index, only the shard holding it is opened; by key, the set is scanned reading headers
    only until the key is found.
    """
    if (key is None) == (index is None):
        raise ValueError("give a key or an index, not both")
    if key is not None:
        def is_it(stage_name: str, position: int, sample_key: str) -> bool:
            return sample_key == key
        for raw in iter_raw_samples(shard_set, stage=stage, members=(), full=is_it):
            if raw.key == key:
                return raw
        return None
    assert index is not None
    for raw in iter_raw_samples(shard_set, stage=stage, start=index, members=None):
        return raw
    return None


def save_sample(raw: RawSample, folder: str | os.PathLike) -> list[Path]:
    """Write the sample's members, byte for byte, as ``folder/KEY.SUFFIX``; returns the paths."""
    folder = Path(folder)
    paths = []
    for suffix, blob in raw.members.items():
        paths.append(schema.write_bytes_atomic(folder / f"{raw.key}.{suffix}", blob))
    return paths


def head_row(raw: RawSample) -> dict[str, Any]:
    """A compact row of a sample: position, key, answer length, feature shapes, Q and A."""
    data = raw.json()
    question, answer = question_and_answer(data)
    shapes = {}
    for suffix, blob in raw.members.items():
        if suffix.endswith("npy"):
            shapes[suffix] = list(decode_npy(blob, f"{raw.shard}: {raw.key}.{suffix}").shape)
    return {"index": raw.index, "stage": raw.stage, "key": raw.key, "answer_tokens": data.get("answer_tokens"),
            "shapes": shapes, "question": question, "answer": answer,
            "extra": sorted(k for k in data if k in ("narrative", *PREFERENCE_FIELDS))}


# ================================================================================ summary

@dataclass
class StageSummary:
    name: str
    shards: int
    samples: int
    bytes: int
    min_answer_tokens: int
    max_answer_tokens: int
    answer_tokens: dict[int, int] | None = None
    """Exact answer length -> number of samples, from a pass over the json members (None: not scanned)."""


@dataclass
class Summary:
    source: str
    format: str
    settings: dict[str, Any]
    samples: int
    bytes: int
    stages: list[StageSummary]
    failures: int
    """Failures the manifest counts."""
    failure_log: FailureLog
    derived_from: str | None = None

    @property
    def split(self) -> tuple[int, int] | None:
        """(longest easy answer, shortest hard answer) in tokens, when both stages have samples."""
        by_name = {s.name: s for s in self.stages if s.samples}
        if schema.STAGE_EASY in by_name and schema.STAGE_HARD in by_name:
            return by_name[schema.STAGE_EASY].max_answer_tokens, by_name[schema.STAGE_HARD].min_answer_tokens
        return None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["failure_log"]["reasons"] = dict(self.failure_log.reasons.most_common())
        for stage in out["stages"]:
            if stage["answer_tokens"] is not None:
                stage["answer_tokens"] = {str(k): v for k, v in sorted(stage["answer_tokens"].items())}
        out["split"] = list(self.split) if self.split else None
        return out


def summarize(shard_set: ShardSet, *, scan: bool = True,
              on_sample: Callable[[RawSample], None] | None = None,
              full: SampleFilter | None = None) -> Summary:
    """The manifest's figures, failures.jsonl by reason, and (``scan``) answer lengths per stage.

    The scan reads only json members (plus every member of the samples ``full`` picks, handed
    to ``on_sample`` — the report's gallery uses this to share the one pass).
    """
    m = shard_set.manifest
    stages = []
    for st in m.stages:
        nonempty = [s for s in st.shards if s.samples]
        stages.append(StageSummary(
            name=st.name, shards=len(st.shards), samples=st.samples, bytes=sum(s.bytes for s in st.shards),
            min_answer_tokens=min((s.min_answer_tokens for s in nonempty), default=0),
            max_answer_tokens=max((s.max_answer_tokens for s in nonempty), default=0)))
    if scan:
        by_name = {s.name: s for s in stages}
        for s in stages:
            s.answer_tokens = {}
        for raw in iter_raw_samples(shard_set, full=full):
            try:
                tokens = raw.json().get("answer_tokens")
            except ValueError as exc:
                raise ShardError(str(exc)) from exc
            if isinstance(tokens, int) and not isinstance(tokens, bool):
                counts = by_name[raw.stage].answer_tokens
                counts[tokens] = counts.get(tokens, 0) + 1
            if on_sample is not None and full is not None and full(raw.stage, raw.stage_index, raw.key):
                on_sample(raw)
    return Summary(source=shard_set.source, format=m.format, settings=m.settings, samples=m.samples,
                   bytes=shard_set.bytes, stages=stages, failures=m.failures,
                   failure_log=read_failures(shard_set), derived_from=m.derived_from)


@dataclass
class Bin:
    lo: int
    hi: int
    """Inclusive bounds in answer tokens."""
    count: int


def histogram(counts: dict[int, int], bins: int = 10, lo: int | None = None, hi: int | None = None) -> list[Bin]:
    """Integer-aligned bins of equal width covering [lo, hi] (default: the data's range)."""
    if not counts:
        return []
    lo = min(counts) if lo is None else lo
    hi = max(counts) if hi is None else hi
    width = max(1, math.ceil((hi - lo + 1) / max(1, bins)))
    out = [Bin(lo=start, hi=min(start + width - 1, hi), count=0) for start in range(lo, hi + 1, width)]
    for value, n in counts.items():
        if lo <= value <= hi:
            out[(value - lo) // width].count += n
    return out


def human_bytes(n: float) -> str:
    """``1234567`` -> ``1.2 MB`` (decimal units, as the manifest's byte counts are shown)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


# ================================================================================ ls

def shard_rows(shard_set: ShardSet, stage: str | None = None) -> list[dict[str, Any]]:
    """One row per shard, from the manifest alone (no tar is opened)."""
    rows = []
    for st in shard_set.stages(stage):
        for s in st.shards:
            rows.append({"stage": st.name, "url": s.url, "samples": s.samples, "bytes": s.bytes,
                         "min_answer_tokens": s.min_answer_tokens, "max_answer_tokens": s.max_answer_tokens,
                         "first_key": s.first_key, "last_key": s.last_key, "sha256": s.sha256})
    return rows


# ================================================================================ verify

@dataclass
class Problem:
    kind: str
    """A short code: missing_shard, truncated, bad_header, sha256, bytes, sample_count, manifest,
    non_contiguous, duplicate_key, missing_member, decode, bad_member, nonfinite, order,
    stage_order, failures."""
    shard: str
    key: str | None
    message: str
    offset: int | None = None

    def __str__(self) -> str:
        where = self.shard + (f": {self.key}" if self.key else "")
        at = f" [byte {self.offset}]" if self.offset is not None else ""
        return f"{where}: {self.message}{at}"


@dataclass
class VerifyResult:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Things worth knowing that are not damage (leftover temp files, unlisted tars)."""
    shards: int = 0
    samples: int = 0
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "shards": self.shards, "samples": self.samples, "bytes": self.bytes,
                "problems": [asdict(p) for p in self.problems], "notes": self.notes}


class _HashingReader:
    """A forward-only stream that hashes and counts every byte read (and reports progress)."""

    def __init__(self, raw: BinaryIO, progress: Callable[[int], None] | None):
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0
        self._progress = progress

    def seekable(self) -> bool:
        return False  # every byte must pass through the hash

    def readinto(self, buf) -> int:
        n = self._raw.readinto(buf)
        if n:
            view = memoryview(buf).cast("B")[:n]
            self._hash.update(view)
            self.size += n
            if self._progress is not None:
                self._progress(n)
        return n or 0

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        return bytes(buf[: self.readinto(buf)])

    def drain(self) -> tuple[int, bool]:
        """Read what is left after the archive's end: (how many bytes, whether any is non-zero)."""
        left, nonzero = 0, False
        while chunk := self.read(1 << 20):
            left += len(chunk)
            nonzero = nonzero or bool(chunk.strip(b"\0"))
        return left, nonzero

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


@dataclass
class _StageState:
    last_tokens: int | None = None
    last_key: str | None = None
    min_tokens: int | None = None
    max_tokens: int | None = None
    have: Counter = field(default_factory=Counter)
    missing: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


class _Verifier:
    """One pass over every byte of a shard set, collecting every problem (see :func:`verify`)."""

    def __init__(self, shard_set: ShardSet, on_problem: Callable[[Problem], None] | None,
                 progress: Callable[[int], None] | None):
        self.set = shard_set
        self.result = VerifyResult()
        self.on_problem = on_problem
        self.progress = progress
        self.keys_seen: dict[str, str] = {}  # key -> shard where it was first seen
        settings = shard_set.manifest.settings
        self.expected = {schema.JSON, schema.FEAT}
        clips = settings.get("clips")
        if isinstance(clips, int) and clips > 0:
            self.expected.add(schema.CLIPS)
        if settings.get("command") == "build-shards":
            self.expected.add(schema.THUMB)

    def problem(self, kind: str, shard: str, key: str | None, message: str, offset: int | None = None) -> None:
        p = Problem(kind=kind, shard=shard, key=key, message=message, offset=offset)
        self.result.problems.append(p)
        if self.on_problem is not None:
            self.on_problem(p)

    # -- the set ---------------------------------------------------------------------------
    def run(self) -> VerifyResult:
        m = self.set.manifest
        origin = self.set.manifest_url
        total = sum(st.samples for st in m.stages)
        if total != m.samples:
            self.problem("manifest", origin, None, f"manifest says {m.samples} samples, its shards add up to {total}")
        urls = Counter(s.url for st in m.stages for s in st.shards)
        for url, n in urls.items():
            if n > 1:
                self.problem("manifest", origin, None, f"shard {url} is listed {n} times")
        states = {}
        for st in m.stages:
            state = states[st.name] = _StageState()
            for shard in st.shards:
                self.shard(st.name, shard, state)
            self.stage_members(st.name, state)
        self.stage_order(states)
        self.failures()
        self.leftovers()
        return self.result

    def stage_members(self, stage: str, state: _StageState) -> None:
        """A member some samples of a stage have, all of them must have (clips, thumbs)."""
        for suffix, missing in sorted(state.missing.items()):
            if suffix in self.expected or not state.have[suffix]:
                continue
            for url, key in missing:
                self.problem("missing_member", url, key, f"no {suffix} member, which {state.have[suffix]} other "
                             f"sample(s) of stage {stage!r} have")

    def stage_order(self, states: dict[str, _StageState]) -> None:
        easy, hard = states.get(schema.STAGE_EASY), states.get(schema.STAGE_HARD)
        if easy and hard and easy.max_tokens is not None and hard.min_tokens is not None \
                and easy.max_tokens > hard.min_tokens:
            self.problem("stage_order", self.set.manifest_url, None,
                         f"an easy sample has {easy.max_tokens} answer tokens, more than the shortest hard "
                         f"sample ({hard.min_tokens}): the curriculum split is not by answer length")

    def failures(self) -> None:
        log_ = read_failures(self.set)
        url = resolve_url(self.set.base, schema.FAILURES_NAME)
        for line in log_.bad_lines:
            self.problem("failures", url, None, line)
        expected = self.set.manifest.failures
        if not log_.present:
            if expected:
                self.problem("failures", url, None, f"missing, but the manifest counts {expected} failure(s)")
        elif log_.count + len(log_.bad_lines) != expected:
            self.problem("failures", url, None, f"{log_.count} line(s), but the manifest counts {expected}")

    def leftovers(self) -> None:
        path = local_path(self.set.base)
        folder = None if path is None else Path(path)
        if folder is None or not folder.is_dir():
            return
        listed = {s.url for st in self.set.manifest.stages for s in st.shards}
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                self.result.notes.append(f"{path}: temporary file of an interrupted write (safe to delete)")
            elif path.suffix == ".tar" and path.name not in listed:
                self.result.notes.append(f"{path}: a tar the manifest does not list (not part of the set)")

    # -- one shard ---------------------------------------------------------------------------
    def shard(self, stage: str, shard: ShardInfo, state: _StageState) -> None:
        url = self.set.url(shard)
        try:
            raw, _ = open_url(url, buffered=True)
        except (OSError, ValueError) as exc:
            self.problem("missing_shard", url, None, f"cannot open: {exc}")
            return
        self.result.shards += 1
        groups: list[str] = []  # keys in order of first appearance in this shard
        in_shard: set[str] = set()
        tokens_seen: list[int] = []
        current: dict[str, Any] | None = None
        last_name = ""
        truncated = False
        with raw:
            reader = _HashingReader(raw, self.progress)
            for event in scan_tar(reader, url):
                if isinstance(event, TarDamage):
                    after = f" (after member {last_name})" if last_name else " (before the first member)"
                    self.problem(event.kind, url, current["key"] if current else None, event.message + after,
                                 event.offset)
                    truncated = truncated or event.kind == "truncated"
                    continue
                last_name = event.name
                key, suffix = split_name(event.name)
                if current is None or key != current["key"]:
                    if current is not None:
                        self.sample(stage, url, current, state, tokens_seen)
                    if key in in_shard:
                        self.problem("non_contiguous", url, key, f"members of this key are not contiguous: "
                                     f"{event.name} at byte {event.offset} comes after other keys' members",
                                     event.offset)
                    elif key in self.keys_seen:
                        self.problem("duplicate_key", url, key, f"key also in {self.keys_seen[key]}", event.offset)
                    in_shard.add(key)
                    self.keys_seen.setdefault(key, url)
                    groups.append(key)
                    current = {"key": key, "members": {}, "offset": event.offset}
                if suffix in current["members"]:
                    self.problem("duplicate_member", url, key, f"member {event.name} appears twice", event.offset)
                current["members"][suffix] = event.data
            if current is not None:
                self.sample(stage, url, current, state, tokens_seen)
            left, nonzero = reader.drain()
            if nonzero and not truncated:
                self.problem("trailing_data", url, None, f"the {left} byte(s) after the end-of-archive block are "
                             "not all zero (tar readers ignore them)", reader.size - left)
            size, digest = reader.size, reader.hexdigest()
        self.result.bytes += size
        self.result.samples += len(groups)
        log.debug("verified %s: %d samples, %d bytes", url, len(groups), size)
        self.shard_bookkeeping(url, shard, size, digest, groups, tokens_seen, truncated)

    def shard_bookkeeping(self, url: str, shard: ShardInfo, size: int, digest: str, groups: list[str],
                          tokens: list[int], truncated: bool) -> None:
        if size != shard.bytes:
            self.problem("bytes", url, None, f"{size} bytes, the manifest says {shard.bytes}")
        if digest != shard.sha256:
            self.problem("sha256", url, None, f"sha256 {digest[:16]}… differs from the manifest's {shard.sha256[:16]}…")
        if len(groups) != shard.samples:
            self.problem("sample_count", url, None, f"{len(groups)} samples read, the manifest says {shard.samples}"
                         + (" (the shard is truncated)" if truncated else ""))
        if groups and groups[0] != shard.first_key:
            self.problem("manifest", url, groups[0], f"first key is {groups[0]!r}, the manifest says {shard.first_key!r}")
        if groups and groups[-1] != shard.last_key and not truncated:
            self.problem("manifest", url, groups[-1], f"last key is {groups[-1]!r}, the manifest says {shard.last_key!r}")
        if tokens and not truncated and (min(tokens), max(tokens)) != (shard.min_answer_tokens, shard.max_answer_tokens):
            self.problem("manifest", url, None, f"answer tokens range {min(tokens)}..{max(tokens)}, the manifest says "
                         f"{shard.min_answer_tokens}..{shard.max_answer_tokens}")

    # -- one sample --------------------------------------------------------------------------
    def sample(self, stage: str, url: str, sample: dict[str, Any], state: _StageState, tokens_seen: list[int]) -> None:
        key, members, at = sample["key"], sample["members"], sample["offset"]
        for suffix in sorted(self.expected - set(members)):
            self.problem("missing_member", url, key, f"no {suffix} member", at)
        for suffix in (schema.CLIPS, schema.THUMB):
            if suffix in members:
                state.have[suffix] += 1
            elif suffix not in self.expected:
                state.missing.setdefault(suffix, []).append((url, key))
        data: dict[str, Any] | None = None
        if schema.JSON in members:
            try:
                data = decode_json(members[schema.JSON], f"{key}.json")
            except ValueError as exc:
                self.problem("decode", url, key, str(exc), at)
        if data is not None:
            self.sample_json(stage, url, key, data, state, tokens_seen, at)
        arrays: dict[str, np.ndarray] = {}
        for suffix, blob in members.items():
            if suffix.endswith("npy"):
                try:
                    arrays[suffix] = decode_npy(blob, f"{key}.{suffix}")
                except ValueError as exc:
                    self.problem("decode", url, key, str(exc), at)
            elif suffix.endswith(("jpg", "jpeg", "png")):
                self.image(url, key, suffix, blob, at)
        self.features(url, key, arrays, at)

    def sample_json(self, stage: str, url: str, key: str, data: dict[str, Any], state: _StageState,
                    tokens_seen: list[int], at: int) -> None:
        missing = [f for f in REQUIRED_FIELDS if f not in data]
        if missing:
            self.problem("bad_member", url, key, f"json lacks field(s) {', '.join(missing)}", at)
        if "stage" in data and data["stage"] != stage:
            self.problem("bad_member", url, key, f"json says stage {data['stage']!r}, but it is in stage {stage!r}", at)
        conversations = data.get("conversations")
        if "conversations" in data and not (isinstance(conversations, list) and all(
                isinstance(t, dict) and "from" in t and "value" in t for t in conversations)):
            self.problem("bad_member", url, key, "conversations is not a list of {from, value} turns", at)
        tokens = data.get("answer_tokens")
        if "answer_tokens" not in data:
            return
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
            self.problem("bad_member", url, key, f"answer_tokens is {tokens!r}, not a count", at)
            return
        if state.last_tokens is not None and tokens < state.last_tokens:
            self.problem("order", url, key, f"answer_tokens {tokens} after {state.last_tokens} ({state.last_key}): "
                         f"answer lengths decrease within stage {stage!r}", at)
        state.last_tokens, state.last_key = tokens, key
        state.min_tokens = tokens if state.min_tokens is None else min(state.min_tokens, tokens)
        state.max_tokens = tokens if state.max_tokens is None else max(state.max_tokens, tokens)
        tokens_seen.append(tokens)

    def features(self, url: str, key: str, arrays: dict[str, np.ndarray], at: int) -> None:
        ndim = {schema.FEAT: 2, schema.CLIPS: 3}
        for suffix, array in arrays.items():
            if suffix in ndim and (array.ndim != ndim[suffix] or array.dtype != np.float16):
                self.problem("bad_member", url, key, f"{suffix} is {array.dtype} {tuple(array.shape)}, expected "
                             f"float16 with {ndim[suffix]} dimensions", at)
            if array.dtype.kind == "f":
                nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
                if nan or inf:
                    self.problem("nonfinite", url, key, f"{suffix} has {nan} NaN and {inf} inf value(s)", at)
        feat, clips = arrays.get(schema.FEAT), arrays.get(schema.CLIPS)
        if feat is not None and clips is not None and feat.ndim == 2 and clips.ndim == 3 \
                and feat.shape[-1] != clips.shape[-1]:
            self.problem("bad_member", url, key, f"feature widths differ: feat.npy {feat.shape}, clips.npy {clips.shape}", at)

    def image(self, url: str, key: str, suffix: str, blob: bytes, at: int) -> None:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(blob)) as image:
                image.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            self.problem("decode", url, key, f"{suffix} is not a readable image: {exc}", at)


def verify(shard_set: ShardSet, *, on_problem: Callable[[Problem], None] | None = None,
           progress: Callable[[int], None] | None = None) -> VerifyResult:
    """Check every byte of a shard set against its manifest; collects every problem found.

    Per shard: bytes and sha256, sample count, first/last key and answer-token range against
    the manifest; the tar structure (damaged headers, truncation, trailing bytes). Per sample:
    members present (json and feat always; clips when the build asked for them, thumbs for
    build-shards sets, and any member other samples of the stage have), json and .npy
    decodable without pickle, images decodable, features float16 and finite, keys contiguous
    and unique, answer lengths non-decreasing within a stage and easy never longer than hard.
    ``on_problem`` sees each problem as it is found; ``progress`` the bytes read.
    """
    return _Verifier(shard_set, on_problem, progress).run()
