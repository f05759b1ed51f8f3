"""Annotation readers: every supported format becomes a stream of :class:`Record`.

Formats are detected by content, not by file name:

- **Video-ChatGPT** instruction JSON: a list of ``{"video_id", "q", "a"}`` (ids carry no
  file extension);
- **LLaVA-style** JSON: a list of ``{"id", "video", "conversations": [{"from": "human"|"gpt",
  "value"}]}``, and the same records as **JSONL**, one per line;
- **NExT-QA** CSV: ``video, question, answer, qid, type, a0..a4`` where ``answer`` is the index
  of the correct option; the record's answer is that option's text.

A malformed record raises :class:`IngestError` naming the file and the record index, or, with
``on_error="skip"``, is counted in :class:`IngestStats` and reported.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

log = logging.getLogger(__name__)

VIDEO_TOKEN = "<video>"
HUMAN, GPT = "human", "gpt"
OnError = Literal["raise", "skip"]


class IngestError(ValueError):
    """A record (or a whole file) that cannot be read; the message names file and record."""


@dataclass
class Record:
    """One training sample before decoding: a conversation about one video."""

    id: str
    video_id: str
    conversations: list[dict[str, str]]
    source: str
    extra: dict[str, Any] = field(default_factory=dict)
    """Format-specific fields kept with the sample (``qtype``, NExT-QA ``qid``/``type``, ...)."""

    def answers(self) -> list[str]:
        return [turn["value"] for turn in self.conversations if turn["from"] == GPT]


@dataclass
class IngestStats:
    records: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)
    """One entry per skipped record: ``{"annotation", "record", "reason", "message"}``."""
    formats: dict[str, str] = field(default_factory=dict)


def detect_format(path: str | os.PathLike) -> str:
    """``vcg``, ``llava``, ``llava-jsonl`` or ``nextqa``, from the file's first bytes."""
    path = Path(path)
    with open(path, "r", encoding="utf-8-sig") as f:
        head = f.read(65536)
    stripped = head.lstrip()
    if not stripped:
        raise IngestError(f"{path}: empty annotation file")
    if stripped[0] == "[":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as exc:
            raise IngestError(f"{path}: not valid JSON: {exc}") from exc
        first = next((r for r in data if isinstance(r, dict)), None)
        if first is None:
            return "vcg"  # an empty list: any format reads it as zero records
        if "conversations" in first:
            return "llava"
        if {"q", "a"} <= set(first):
            return "vcg"
        raise IngestError(f"{path}: JSON list of unknown records (keys {sorted(first)})")
    if stripped[0] == "{":
        return "llava-jsonl"
    header = next(csv.reader([stripped.splitlines()[0]]))
    if {"video", "question", "answer"} <= {h.strip() for h in header}:
        return "nextqa"
    raise IngestError(f"{path}: unknown annotation format (not JSON, JSONL or NExT-QA CSV)")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    return value.strip()


def _with_video_token(conversations: list[dict[str, str]]) -> list[dict[str, str]]:
    """Make sure the first human turn carries exactly one ``<video>`` placeholder."""
    out = [dict(turn) for turn in conversations]
    for turn in out:
        turn["value"] = turn["value"].replace("<image>", VIDEO_TOKEN)
    first = out[0]
    if VIDEO_TOKEN not in first["value"]:
        first["value"] = f"{VIDEO_TOKEN}\n{first['value']}"
    return out


def _record_vcg(raw: Any, source: str, index: int) -> Record:
    if not isinstance(raw, dict):
        raise ValueError(f"expected an object, got {type(raw).__name__}")
    video_id = _text(str(raw.get("video_id", "")) if raw.get("video_id") is not None else None, "video_id")
    q, a = _text(raw.get("q"), "q"), _text(raw.get("a"), "a")
    extra = {k: v for k, v in raw.items() if k not in ("video_id", "q", "a")}
    return Record(id=f"{source}-{index:07d}", video_id=video_id,
                  conversations=[{"from": HUMAN, "value": f"{VIDEO_TOKEN}\n{q}"}, {"from": GPT, "value": a}],
                  source=raw.get("source", source) if isinstance(raw.get("source"), str) else source,
                  extra={k: v for k, v in extra.items() if k != "source"})


def _record_llava(raw: Any, source: str, index: int) -> Record:
    if not isinstance(raw, dict):
        raise ValueError(f"expected an object, got {type(raw).__name__}")
    video = _text(raw.get("video"), "video")
    turns = raw.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        raise ValueError("conversations must be a list of at least two turns")
    conversations = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in (HUMAN, GPT):
            raise ValueError(f"turn {i}: 'from' must be 'human' or 'gpt'")
        expected = HUMAN if i % 2 == 0 else GPT
        if turn["from"] != expected:
            raise ValueError(f"turn {i}: expected a {expected} turn (turns must alternate, human first)")
        conversations.append({"from": turn["from"], "value": _text(turn.get("value"), f"turn {i} value")})
    if conversations[-1]["from"] != GPT:
        raise ValueError("the last turn must be a gpt answer")
    rid = str(raw.get("id", f"{index:07d}"))
    extra = {k: v for k, v in raw.items() if k not in ("id", "video", "conversations", "source")}
    return Record(id=f"{source}-{rid}", video_id=video, conversations=_with_video_token(conversations),
                  source=raw["source"] if isinstance(raw.get("source"), str) else source, extra=extra)


def _record_nextqa(raw: dict[str, str], source: str, index: int) -> Record:
    video = _text(raw.get("video"), "video")
    question = _text(raw.get("question"), "question")
    try:
        answer_index = int(str(raw.get("answer", "")).strip())
    except ValueError:
        raise ValueError(f"answer must be an option index, got {raw.get('answer')!r}") from None
    option = raw.get(f"a{answer_index}")
    answer = _text(option, f"option a{answer_index}")
    if not question.endswith("?"):
        question += "?"
    qid = str(raw.get("qid", index)).strip()
    extra = {"qid": qid, "type": (raw.get("type") or "").strip(),
             "options": [raw.get(f"a{i}", "") for i in range(5) if raw.get(f"a{i}") is not None],
             "answer_index": answer_index}
    return Record(id=f"{source}-{video}-{qid}", video_id=video,
                  conversations=[{"from": HUMAN, "value": f"{VIDEO_TOKEN}\n{question}"},
                                 {"from": GPT, "value": answer}],
                  source=source, extra=extra)


def _raw_records(path: Path, fmt: str) -> Iterator[tuple[int, Any]]:
    if fmt in ("vcg", "llava"):
        data = json.loads(path.read_text(encoding="utf-8-sig"))
        yield from enumerate(data)
    elif fmt == "llava-jsonl":
        with open(path, encoding="utf-8-sig") as f:
            index = 0
            for line in f:
                if not line.strip():
                    continue
                try:
                    yield index, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield index, exc
                index += 1
    elif fmt == "nextqa":
        with open(path, encoding="utf-8-sig", newline="") as f:
            yield from enumerate(csv.DictReader(f))


_PARSERS = {"vcg": _record_vcg, "llava": _record_llava, "llava-jsonl": _record_llava, "nextqa": _record_nextqa}


def read_annotations(path: str | os.PathLike, *, on_error: OnError = "raise",
                     stats: IngestStats | None = None) -> Iterator[Record]:
    """Records of one annotation file, in file order. Record ids are unique within a build
    as long as file stems are (the id is prefixed with the stem)."""
    path = Path(path)
    if not path.exists():
        raise IngestError(f"{path}: annotation file not found")
    fmt = detect_format(path)
    source = path.stem
    if stats is not None:
        stats.formats[str(path)] = fmt
    for index, raw in _raw_records(path, fmt):
        try:
            if isinstance(raw, Exception):
                raise ValueError(f"not valid JSON: {raw}")
            record = _PARSERS[fmt](raw, source, index)
        except (ValueError, TypeError) as exc:
            message = f"{path}: record {index} ({fmt}): {exc}"
            if on_error == "raise":
                raise IngestError(message) from exc
            log.warning("skipping %s", message)
            if stats is not None:
                stats.skipped += 1
                stats.reasons["malformed record"] += 1
                stats.failures.append({"annotation": str(path), "record": index,
                                       "reason": "malformed_record", "message": message})
            continue
        if stats is not None:
            stats.records += 1
        yield record


def read_all(paths: list[str | os.PathLike], *, on_error: OnError = "raise",
             stats: IngestStats | None = None) -> list[Record]:
    """Records of several files; duplicate record ids are an error (they would share a key)."""
    records: list[Record] = []
    seen: dict[str, str] = {}
    for path in paths:
        for record in read_annotations(path, on_error=on_error, stats=stats):
            if record.id in seen:
                raise IngestError(f"{path}: record id {record.id!r} already read from {seen[record.id]}")
            seen[record.id] = str(path)
            records.append(record)
    return records


def index_videos(folder: str | os.PathLike) -> dict[str, Path]:
    """Map both file names and stems under ``folder`` (recursively) to paths.

    Video-ChatGPT ids carry no extension, LLaVA and NExT-QA ids sometimes do; both resolve.
    A stem shared by two files (``a.mp4`` and ``a.mkv``) resolves to the first by sorted name.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise IngestError(f"{folder}: videos folder not found")
    index: dict[str, Path] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = path.relative_to(folder).as_posix()
        index.setdefault(rel, path)
        index.setdefault(rel.rsplit(".", 1)[0] if "." in path.name else rel, path)
    return index


def resolve_video(video_id: str, index: dict[str, Path]) -> Path | None:
    return index.get(video_id) or index.get(video_id.rsplit(".", 1)[0])
