"""The shard format: sample members, json fields and the manifest.

A shard set is a folder::

    NAME/
      manifest.json           written last, atomically (temp name + rename)
      failures.jsonl          one line per video or record that was left out, with its reason
      easy-000000.tar ...     WebDataset tars, in stream order within each stage
      hard-000000.tar ...

Each sample in a tar is a group of members sharing one key, written contiguously::

    KEY.json        {"id", "video_id", "source", "conversations", "answer_tokens", "stage", ...}
    KEY.feat.npy    float16 (T+P, D) pooled video features
    KEY.clips.npy   float16 (K, F+P, D) pooled per-clip features (omitted when clips=0)
    KEY.thumb.jpg   a small contact sheet for people inspecting shards

KEY is the record id when the id holds only ASCII letters, digits, ``-`` and ``_``; otherwise
every other character becomes ``_`` and ``~`` plus the first 8 hex digits of the id's sha256
are appended (``x.1`` -> ``x_1~4598734b``, ``x_1`` stays ``x_1``), so two ids never share a key
(:func:`sample_key`; a build refuses ids that would, naming both). The id itself is in KEY.json.

Later stages add json fields (``narrative``, ``chosen``, ``rejected``, ``judge``); readers
keep fields they do not know. Nothing in a shard is ever pickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "vlmr-shards/1"
MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.jsonl"

# Member suffixes ("extensions" in WebDataset terms) of one sample, in the order written.
JSON = "json"
FEAT = "feat.npy"
CLIPS = "clips.npy"
THUMB = "thumb.jpg"
MEMBER_ORDER = (JSON, FEAT, CLIPS, THUMB)

STAGE_EASY = "easy"
STAGE_HARD = "hard"
STAGE_PAIRS = "pairs"


def shard_name(stage: str, index: int) -> str:
    """File name of the index-th shard of a stage: ``easy-000003.tar``."""
    return f"{stage}-{index:06d}.tar"


def sample_key(record_id: str) -> str:
    """A tar-safe key for a record id, different for different ids.

    WebDataset splits a member name at the first dot after the last slash into key and
    suffix, so a key holds only letters, digits, ``-`` and ``_``. An id made only of those
    is its own key; any other character becomes ``_`` and the key gets ``~`` plus the first
    8 hex digits of the id's sha256 (``x.1`` -> ``x_1~8a5edab2``), so ``x.1``, ``x_1`` and
    ``x 1`` stay three keys (``~`` never appears in an id that is its own key).
    """
    safe = "".join(c if (c.isascii() and (c.isalnum() or c in "-_")) else "_" for c in record_id)
    if safe == record_id and safe:
        return safe
    return f"{safe}~{hashlib.sha256(record_id.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


@dataclass
class ShardInfo:
    """One tar of a stage, as listed in the manifest."""

    url: str
    """Path relative to the manifest's folder (or an absolute URL)."""
    samples: int
    bytes: int
    sha256: str
    min_answer_tokens: int = 0
    max_answer_tokens: int = 0
    first_key: str = ""
    last_key: str = ""


@dataclass
class StageInfo:
    name: str
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


@dataclass
class Manifest:
    """The index of a shard set; the reader plans from it without opening any tar."""

    format: str = FORMAT
    settings: dict[str, Any] = field(default_factory=dict)
    """How the set was made (the command's config), so any shard says where it came from."""
    samples: int = 0
    failures: int = 0
    stages: list[StageInfo] = field(default_factory=list)
    derived_from: str | None = None
    """For shard-to-shard passes (narrate, judge): the source manifest."""

    def stage(self, name: str) -> StageInfo:
        for stage in self.stages:
            if stage.name == name:
                return stage
        known = ", ".join(s.name for s in self.stages) or "none"
        raise KeyError(f"stage {name!r} not in manifest (stages: {known})")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["derived_from"] is None:
            del out["derived_from"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "manifest") -> "Manifest":
        if data.get("format") != FORMAT:
            raise ValueError(f"{origin}: unknown format {data.get('format')!r}, expected {FORMAT!r}")
        try:
            stages = [
                StageInfo(name=s["name"], shards=[ShardInfo(**sh) for sh in s["shards"]])
                for s in data["stages"]
            ]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{origin}: malformed stages: {exc}") from exc
        return cls(
            format=data["format"],
            settings=data.get("settings", {}),
            samples=int(data.get("samples", sum(s.samples for s in stages))),
            failures=int(data.get("failures", 0)),
            stages=stages,
            derived_from=data.get("derived_from"),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        """Load a local manifest.json (remote sources go through the reader's opener)."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f), origin=str(path))

    def save(self, folder: str | os.PathLike) -> Path:
        return write_text_atomic(
            Path(folder) / MANIFEST_NAME, json.dumps(self.to_dict(), indent=1) + "\n"
        )


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temporary name in the same folder, fsync, then rename.

    A crash never leaves a truncated file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; shards and reports are meant to be read by others
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))
