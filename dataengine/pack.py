"""Packing: order samples by answer length, split into stages, write tars and the manifest.

Tars are written by ``webdataset.TarWriter`` and are byte-reproducible: members are written
in a fixed order (json first) with fixed metadata (mtime 0, uid/gid 0, no user or group
names, mode 0444, ustar headers), so the same inputs give the same bytes.
Each shard is written under a temporary name and renamed when complete; the manifest is
written last, so a folder with a manifest is always complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import webdataset

from dataengine import schema
from dataengine.schema import ShardInfo, StageInfo

log = logging.getLogger(__name__)



def npy_parts(array: np.ndarray) -> list[bytes | memoryview]:
    """An ``.npy`` file as [header, the array's own bytes]: the same bytes ``np.save`` writes,
    without copying the data (features are most of a shard's bytes)."""
    array = np.ascontiguousarray(array)
    if array.dtype.hasobject:
        raise TypeError("object arrays would need pickle; shards never hold them")
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(array))
    return [head.getvalue(), memoryview(array.reshape(-1).view(np.uint8))]


def encode_npy(array: np.ndarray) -> bytes:
    return b"".join(npy_parts(array))


def encode_json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")


def member_parts(suffix: str, value: Any) -> list[bytes | memoryview]:
    """The bytes of one member, by suffix, as pieces to write one after the other.
    ``bytes`` pass through (thumbs, pre-encoded members)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return [value]
    if suffix.endswith("json"):
        return [encode_json(value)]
    if suffix.endswith("npy"):
        return npy_parts(np.asarray(value))
    if isinstance(value, str):
        return [value.encode("utf-8")]
    raise TypeError(f"cannot encode member {suffix!r} of type {type(value).__name__}")


def encode_member(suffix: str, value: Any) -> bytes:
    """Bytes of one member, by suffix (see :func:`member_parts`)."""
    return b"".join(member_parts(suffix, value))


def _tar_size(nbytes: int) -> int:
    """Bytes a member of ``nbytes`` takes in a tar: its header block and its padded data."""
    return tarfile.BLOCKSIZE + -(-nbytes // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _member_order(sample: dict[str, Any]) -> list[str]:
    known = [s for s in schema.MEMBER_ORDER if s in sample]
    extra = sorted(s for s in sample if not s.startswith("__") and s not in schema.MEMBER_ORDER)
    return known + extra


class _ShardTar(webdataset.TarWriter):
    """webdataset's TarWriter with the shard format's fixed metadata (no user or group names,
    mode 0444, mtime 0), writing each member to the file in one piece.

    TarWriter opens tarfile's stream mode, which hands the file 10 KiB records and copies every
    member through 16 KiB reads: that halved pack's speed on paper-size samples. The plain
    write mode ("w") writes the same bytes (headers, padding, end blocks, record padding).
    """

    @staticmethod
    def tarmode(fileobj, compress=None) -> str:
        return "w"

    def __init__(self, fileobj):
        super().__init__(fileobj, user="", group="", mode=0o444, mtime=0, encoder=False)
        # TarWriter leaves tarfile's defaults (pax headers, the locale's encoding): pin what
        # the format promises on every machine, and copy a member's data in one piece.
        self.tarstream.format = tarfile.USTAR_FORMAT
        self.tarstream.encoding = "utf-8"
        self.tarstream.copybufsize = 1 << 62


class ShardWriter:
    """Writes the samples of one stage into ``STAGE-NNNNNN.tar`` files of bounded size.

    ``write(sample)`` takes a dict with ``__key__`` and members by suffix (``json`` dict,
    ``feat.npy`` array, ``thumb.jpg`` bytes, ...). ``close()`` returns the stage's
    :class:`StageInfo` for the manifest. The members of a key are written contiguously.
    """

    def __init__(self, folder: str | os.PathLike, stage: str, *, maxcount: int = 1000,
                 maxsize: int = 1 << 30, start_index: int = 0,
                 name: Callable[[str, int], str] = schema.shard_name):
        if maxcount < 1 or maxsize < 1:
            raise ValueError("maxcount and maxsize must be positive")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self.maxcount = maxcount
        self.maxsize = maxsize
        self.index = start_index
        self.name = name
        self.info = StageInfo(name=stage)
        self._file = None
        self._tar: _ShardTar | None = None
        self._tar_bytes = 0
        """Bytes of the members written to the current shard."""
        self._tmp: str | None = None
        self._current: ShardInfo | None = None

    # -- one shard -------------------------------------------------------------------------
    def _open(self) -> None:
        final = self.name(self.stage, self.index)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{final}.", suffix=".tmp", dir=self.folder)
        self._file = _HashingFile(os.fdopen(fd, "wb"))
        self._tar = _ShardTar(self._file)
        self._tar_bytes = 0
        self._current = ShardInfo(url=final, samples=0, bytes=0, sha256="",
                                  min_answer_tokens=1 << 62, max_answer_tokens=0)

    def _finish(self) -> None:
        if self._file is None:
            return
        assert self._tar is not None and self._current is not None and self._tmp is not None
        self._tar.close()  # the end of the archive; our file stays open
        self._file.flush_and_sync()
        self._current.bytes = self._file.size
        self._current.sha256 = self._file.hexdigest()
        if self._current.samples == 0:
            self._current.min_answer_tokens = 0
        self._file.close()
        os.chmod(self._tmp, 0o644)  # mkstemp makes 0600; shards are served to and read by others
        os.replace(self._tmp, self.folder / self._current.url)
        self.info.shards.append(self._current)
        self._file = self._tar = self._tmp = self._current = None
        self.index += 1

    def write(self, sample: dict[str, Any]) -> None:
        key = sample["__key__"]
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must contain no '.' or '/'")
        members = []
        for suffix in _member_order(sample):
            parts = member_parts(suffix, sample[suffix])
            members.append((suffix, parts[0] if len(parts) == 1 else b"".join(parts)))
        size = sum(_tar_size(memoryview(data).nbytes) for _, data in members)
        if self._current is not None and (
            self._current.samples >= self.maxcount
            or (self._current.samples > 0 and self._tar_bytes + size > self.maxsize)
        ):
            self._finish()
        if self._file is None:
            self._open()
        assert self._tar is not None and self._current is not None
        for suffix, data in members:
            # One member per call: TarWriter writes a sample's members in sorted order, and
            # json goes first (a reader that wants only the json stops early).
            self._tar.write({"__key__": key, suffix: data})
        self._tar_bytes += size
        cur = self._current
        tokens = int(sample.get("json", {}).get("answer_tokens", 0)) if isinstance(sample.get("json"), dict) else 0
        cur.samples += 1
        cur.min_answer_tokens = min(cur.min_answer_tokens, tokens)
        cur.max_answer_tokens = max(cur.max_answer_tokens, tokens)
        if not cur.first_key:
            cur.first_key = key
        cur.last_key = key

    def close(self) -> StageInfo:
        self._finish()
        return self.info

    def abort(self) -> None:
        """Drop the shard in progress (its temp file), keeping finished ones."""
        if self._file is not None:
            try:
                with contextlib.suppress(OSError, ValueError):  # the write that failed may fail again
                    self._tar.close()
                self._file.close()
            finally:
                Path(self._tmp).unlink(missing_ok=True)
            self._file = self._tar = self._tmp = self._current = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _HashingFile:
    """A write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, f):
        self._f = f
        self._h = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self._h.update(data)
        self.size += memoryview(data).nbytes
        return self._f.write(data)

    def tell(self) -> int:
        return self.size

    def flush_and_sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def close(self) -> None:
        self._f.close()


# ------------------------------------------------------------------------------ ordering

@dataclass(frozen=True)
class Split:
    """How the sorted stream is cut into stages: by fraction of samples or by token count."""

    easy_fraction: float | None = 0.65
    split_at: int | None = None

    def cut(self, answer_tokens: list[int]) -> int:
        """Index of the first hard sample in a sorted list of answer lengths."""
        n = len(answer_tokens)
        if self.split_at is not None:
            return sum(1 for t in answer_tokens if t <= self.split_at)
        assert self.easy_fraction is not None
        return int(round(n * self.easy_fraction))


def order_samples(items: list[Any], answer_tokens: Callable[[Any], int], key: Callable[[Any], str]) -> list[Any]:
    """Stream order: by answer length, ties broken by key, so the order never depends on input order."""
    return sorted(items, key=lambda item: (answer_tokens(item), key(item)))


def write_stages(folder: str | os.PathLike, stages: Iterable[tuple[str, Iterable[dict[str, Any]]]], *,
                 maxcount: int = 1000, maxsize: int = 1 << 30) -> list[StageInfo]:
    """Write each (stage name, samples) in turn; returns the manifest's stage list."""
    out: list[StageInfo] = []
    for name, samples in stages:
        with ShardWriter(folder, name, maxcount=maxcount, maxsize=maxsize) as writer:
            for sample in samples:
                writer.write(sample)
        out.append(writer.info)
    return out


def remove_stale_shards(folder: str | os.PathLike, keep: Iterable[str]) -> None:
    """Delete shard tars and temp files of an earlier run that the new manifest does not list."""
    keep = set(keep)
    for path in Path(folder).iterdir():
        stale_tmp = path.name.startswith(".") and path.name.endswith(".tmp")
        if stale_tmp or (path.suffix == ".tar" and path.name not in keep):
            path.unlink(missing_ok=True)


def iter_chunks(it: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in it:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
