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

How: every pass streams the tars in stream order through :func:`dataengine.tario.scan_tar`,
which walks the headers with :class:`dataengine.tario.TarReader`, reads only the members
asked for (the others are skipped, by seek on local files) and holds one sample at a time, so
nothing grows with the size of the set. Python's ``tarfile`` is not used for reading because
it ends the archive silently at the first damaged header after offset 0 — samples would
vanish without a word. ``scan_tar`` reports the damage with its byte offset and
resynchronises at the next valid header, so verification (:mod:`dataengine.verify`) lists
every problem of a shard, not only the first; the commands here stop at the first damage
with the shard and byte. ``head`` in the CLI reads through
:class:`dataengine.reader.ShardReader` instead (what a trainer sees); everything here stays
free of torch so that ``vlmr inspect`` starts fast. Nothing is unpickled: ``.npy`` members are
read with ``allow_pickle=False``.
"""

from __future__ import annotations

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
from dataengine.tario import ShardError, TarDamage, decode_npy, scan_tar, split_name

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("id", "video_id", "conversations", "answer_tokens")
"""json fields every sample must have; any other field is shown, never rejected."""
PREFERENCE_FIELDS = ("chosen", "rejected", "judge")


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
            raise ShardError(url, f"cannot open: {exc}", reason="unreadable shard", whole_shard=True) from exc

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
                raise ShardError(url, f"{event.reason} (`vlmr inspect {shard_set.source} verify` lists "
                                      "every problem)", offset=event.offset, reason=event.kind, whole_shard=True)
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
                raise ShardError(raw.shard, str(exc).removeprefix(f"{raw.shard}: "), key=raw.key,
                                 reason="bad member") from exc
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
