"""``vlmr inspect SOURCE verify``: every byte of a shard set checked against its manifest.

One pass per shard through a hashing stream (every byte hashed, nothing skipped by seek) and
:func:`dataengine.tario.scan_tar`, which resynchronises after a damaged header, so every
problem of a shard is listed, not only the first. What is checked is :func:`verify`'s
docstring; each problem has a short ``kind`` code, the shard, the key and the byte offset.
Nothing is unpickled, and nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from dataengine import schema
from dataengine.inspection import REQUIRED_FIELDS, ShardSet, decode_json, read_failures
from dataengine.schema import ShardInfo
from dataengine.sources import local_path, open_url, resolve_url
from dataengine.tario import TarDamage, decode_npy, scan_tar, split_name, unsafe_name

log = logging.getLogger(__name__)

@dataclass
class Problem:
    kind: str
    """A short code: missing_shard, truncated, bad_header, sha256, bytes, sample_count, manifest,
    non_contiguous, duplicate_key, missing_member, decode, bad_member, nonfinite, order,
    stage_order, failures, trailing_data, unsafe_name."""
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
                why = unsafe_name(event.name)
                if why is not None:
                    self.problem("unsafe_name", url, None, f"member name {event.name!r} is {why}: a plain "
                                 "`tar x` of this shard would write outside the folder", event.offset)
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
    and unique, answer lengths non-decreasing within a stage and easy never longer than hard;
    member names that would leave the folder a plain ``tar x`` extracts into (``..``
    components, absolute paths).
    ``on_problem`` sees each problem as it is found; ``progress`` the bytes read.
    """
    return _Verifier(shard_set, on_problem, progress).run()
