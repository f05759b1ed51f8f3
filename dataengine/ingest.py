"""Annotation readers: every supported format becomes a stream of :class:`Record`.

Formats are detected by content, not by file name:

- **Video-ChatGPT** instruction JSON: a list of ``{"video_id", "q", "a"}`` (ids carry no
  file extension);
- **LLaVA-style** JSON: a list of ``{"id", "video", "conversations": [{"from": "human"|"gpt",
  "value"}]}``, and the same records as **JSONL**, one per line;
- **NExT-QA** CSV: ``video, question, answer, qid, type, a0..a4`` where ``answer`` is the index
  of the correct option; the record's answer is that option's text;
- **Hugging Face datasets**, the form VideoInstruct-100K, MSVD-QA and similar sets are published
  in: a folder written by ``Dataset.save_to_disk`` (read with ``datasets.load_from_disk``; a
  ``DatasetDict`` folder with one split, or give the split's folder), a ``.parquet`` file, and
  JSON/JSONL/CSV files whose columns are not one of the formats above (read with
  ``datasets.load_dataset("parquet"|"json"|"csv", data_files=..., streaming=True)``). Columns
  map onto :class:`Record` by name (:data:`HF_COLUMNS`): a video column, then either a
  ``conversations`` column (LLaVA turns) or a question and an answer column; an id column is
  used when there is one; other columns with JSON values are kept in ``Record.extra``.

A malformed record raises :class:`IngestError` naming the file and the record index, or, with
``on_error="skip"``, is counted in :class:`IngestStats` and reported.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import posixpath
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from dataengine import schema

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


# Bytes that are not UTF-8 are read as these lone surrogates (Python's "surrogateescape"), so
# one bad byte spoils only the record that holds it; that record is then refused by name.
_UNDECODABLE = re.compile("[\udc80-\udcff]")


@dataclass
class AnnotationText:
    """A file's text, its undecodable bytes kept as surrogates, and where those bytes were."""

    path: Path
    text: str
    bom: int
    """Bytes of the UTF-8 byte-order mark skipped at the start (0 or 3)."""

    @classmethod
    def read(cls, path: Path, limit: int | None = None) -> "AnnotationText":
        with open(path, "rb") as f:
            raw = f.read() if limit is None else f.read(limit)
        bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
        return cls(path, raw[bom:].decode("utf-8", "surrogateescape"), bom)

    @property
    def clean(self) -> bool:
        return _UNDECODABLE.search(self.text) is None

    def where(self, pos: int) -> str:
        """``line L, byte offset B: byte 0xNN is not UTF-8`` for the text position ``pos``."""
        line = self.text.count("\n", 0, pos) + 1
        offset = self.bom + len(self.text[:pos].encode("utf-8", "surrogateescape"))
        byte = ord(self.text[pos]) - 0xDC00
        return f"line {line}, byte offset {offset}: byte 0x{byte:02x} is not UTF-8"

    def nth_undecodable(self, n: int) -> int:
        """Text position of the n-th (0-based) undecodable byte."""
        for i, match in enumerate(_UNDECODABLE.finditer(self.text)):
            if i == n:
                return match.start()
        raise IndexError(n)


class NotUTF8(ValueError):
    """A record holding bytes that are not UTF-8 (the message says where)."""


def _undecodable_count(value: Any) -> int:
    """Undecodable bytes in the strings (keys included) of a parsed JSON value."""
    if isinstance(value, str):
        return len(_UNDECODABLE.findall(value))
    if isinstance(value, dict):
        return sum(_undecodable_count(k) + _undecodable_count(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(_undecodable_count(v) for v in value)
    return 0


# Column names of Hugging Face annotation sets, by the Record field they fill (first match wins).
HF_COLUMNS = {
    "video": ("video_id", "video", "video_name", "video_path", "vid"),
    "question": ("q", "question", "instruction", "prompt"),
    "answer": ("a", "answer", "response", "output"),
    "id": ("id", "question_id", "qid"),
}
_HF_SAVED = ("dataset_dict.json", "state.json", "dataset_info.json")


def _hf_column(columns: Iterable[str], field: str) -> str | None:
    columns = set(columns)
    return next((c for c in HF_COLUMNS[field] if c in columns), None)


def _hf_mappable(columns: Iterable[str]) -> bool:
    columns = list(columns)
    return _hf_column(columns, "video") is not None and (
        "conversations" in columns
        or (_hf_column(columns, "question") is not None and _hf_column(columns, "answer") is not None))


def _unknown_columns(path: Path, columns: Iterable[str]) -> IngestError:
    return IngestError(f"{path}: records of unknown columns {sorted(columns)}; expected a video column "
                       f"({'/'.join(HF_COLUMNS['video'])}) and either 'conversations' or a question "
                       f"({'/'.join(HF_COLUMNS['question'])}) and an answer ({'/'.join(HF_COLUMNS['answer'])})")


def detect_format(path: str | os.PathLike) -> str:
    """``vcg``, ``llava``, ``llava-jsonl``, ``nextqa`` or ``hf-disk``/``hf-parquet``/``hf-json``/
    ``hf-csv`` (read through 🤗 datasets), from the folder's files or the file's first bytes."""
    path = Path(path)
    if path.is_dir():
        if any((path / name).exists() for name in _HF_SAVED):
            return "hf-disk"
        raise IngestError(f"{path}: a folder, but not one written by datasets' save_to_disk "
                          f"(none of {', '.join(_HF_SAVED)})")
    with open(path, "rb") as f:
        if f.read(4) == b"PAR1":
            return "hf-parquet"
    head = AnnotationText.read(path, limit=65536).text
    stripped = head.lstrip()
    if not stripped:
        raise IngestError(f"{path}: empty annotation file")
    if stripped[0] == "[":
        data = _json_list(AnnotationText.read(path))
        first = next((r for r in data if isinstance(r, dict)), None)
        if first is None:
            return "vcg"  # an empty list: any format reads it as zero records
        if "conversations" in first:
            return "llava"
        if {"q", "a"} <= set(first):
            return "vcg"
        if _hf_mappable(first):
            return "hf-json"
        raise _unknown_columns(path, first)
    if stripped[0] == "{":
        try:
            first = json.loads(stripped.splitlines()[0])
        except json.JSONDecodeError:
            return "llava-jsonl"  # its records are named one by one
        if isinstance(first, dict) and "conversations" not in first and _hf_mappable(first):
            return "hf-json"
        return "llava-jsonl"
    header = [h.strip() for h in next(csv.reader([stripped.splitlines()[0]]))]
    if {"video", "question", "answer", "a0"} <= set(header):
        return "nextqa"
    if _hf_mappable(header):
        return "hf-csv"
    raise IngestError(f"{path}: unknown annotation format (not JSON, JSONL, CSV with known columns, "
                      "parquet or a saved Hugging Face dataset)")


def _json_list(text: AnnotationText) -> list[Any]:
    try:
        data = json.loads(text.text)
    except json.JSONDecodeError as exc:
        raise IngestError(f"{text.path}: not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise IngestError(f"{text.path}: expected a JSON list of records, got {type(data).__name__}")
    return data


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
    """(record index, raw record) in file order; a record that cannot be read comes as a
    ``ValueError`` in its place (saying where), so ``on_error`` decides about it alone."""
    if fmt.startswith("hf-"):
        yield from _hf_raw_records(path, fmt)
        return
    text = AnnotationText.read(path)
    clean = text.clean
    if fmt in ("vcg", "llava"):
        seen = 0  # undecodable bytes in the records before this one
        for index, raw in enumerate(_json_list(text)):
            bad = 0 if clean else _undecodable_count(raw)
            if bad:
                yield index, NotUTF8(text.where(text.nth_undecodable(seen)))
                seen += bad
            else:
                yield index, raw
    elif fmt == "llava-jsonl":
        index, pos = 0, 0
        for number, line in enumerate(io.StringIO(text.text), start=1):
            start, pos = pos, pos + len(line)
            if not line.strip():
                continue
            bad = None if clean else _UNDECODABLE.search(line)
            if bad is not None:
                yield index, NotUTF8(text.where(start + bad.start()))
            else:
                try:
                    yield index, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield index, ValueError(f"line {number}: not valid JSON: {exc}")
            index += 1
    elif fmt == "nextqa":
        rows = csv.DictReader(io.StringIO(text.text, newline=""))
        rows.fieldnames  # reads the header line
        line = rows.line_num
        for index, row in enumerate(rows):
            first_line, line = line + 1, rows.line_num  # a quoted field may span lines
            if not clean and _undecodable_count(row):
                pos = next(m.start() for m in _UNDECODABLE.finditer(text.text)
                           if text.text.count("\n", 0, m.start()) + 1 >= first_line)
                yield index, NotUTF8(text.where(pos))
            else:
                yield index, row


def _hf_dataset(path: Path, fmt: str) -> Any:
    """A Hugging Face dataset folder or file, opened (rows are read as they are iterated)."""
    import datasets

    if fmt == "hf-disk":
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if len(data) != 1:
                raise IngestError(f"{path}: a DatasetDict with splits {sorted(data)}; give one split's "
                                  f"folder (e.g. {path / sorted(data)[0]})")
            (data,) = data.values()
        return data
    kind = {"hf-parquet": "parquet", "hf-json": "json", "hf-csv": "csv"}[fmt]
    return datasets.load_dataset(kind, data_files=str(path), split="train", streaming=True)


def _hf_rows(path: Path, fmt: str) -> Iterator[dict[str, Any]]:
    """The rows of a Hugging Face dataset, in order; a file datasets cannot read is an
    :class:`IngestError` naming it (opening and streaming alike)."""
    from datasets.exceptions import DatasetGenerationError

    try:
        rows = iter(_hf_dataset(path, fmt))
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            yield row
    except IngestError:
        raise
    except (OSError, ValueError, DatasetGenerationError) as exc:  # pyarrow's errors are ValueErrors
        raise IngestError(f"{path}: cannot read it as a {fmt} dataset: {exc}") from exc


def _is_json_value(value: Any) -> bool:
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, list):
        return all(_is_json_value(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json_value(v) for k, v in value.items())
    return False


def _as_text(value: Any) -> Any:
    """A number read from a CSV or parquet column (a count answer "3") as the text it was."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _hf_raw_records(path: Path, fmt: str) -> Iterator[tuple[int, Any]]:
    """Rows as LLaVA-style raw records (columns mapped by :data:`HF_COLUMNS`)."""
    names: dict[str, str | None] | None = None
    for index, row in enumerate(_hf_rows(path, fmt)):
        if names is None:
            if not _hf_mappable(row):
                raise _unknown_columns(path, row)
            names = {field: _hf_column(row, field) for field in HF_COLUMNS}
        used = {c for c in names.values() if c is not None} | {"conversations"}
        raw: dict[str, Any] = {"video": None if row[names["video"]] is None else str(row[names["video"]])}
        if names["id"] is not None and row[names["id"]] is not None:
            raw["id"] = str(row[names["id"]])
        if "conversations" in row:
            raw["conversations"] = row["conversations"]
        else:
            raw["conversations"] = [{"from": HUMAN, "value": _as_text(row[names["question"]])},
                                    {"from": GPT, "value": _as_text(row[names["answer"]])}]
        raw.update({k: v for k, v in row.items() if k not in used and _is_json_value(v)})
        yield index, raw


_PARSERS = {"vcg": _record_vcg, "llava": _record_llava, "llava-jsonl": _record_llava, "nextqa": _record_nextqa,
            "hf-disk": _record_llava, "hf-parquet": _record_llava, "hf-json": _record_llava,
            "hf-csv": _record_llava}


def read_annotations(path: str | os.PathLike, *, on_error: OnError = "raise",
                     stats: IngestStats | None = None) -> Iterator[Record]:
    """Records of one annotation file, in file order. Record ids are unique within a build
    as long as file stems are (the id is prefixed with the stem)."""
    path = Path(path)
    if not path.exists():
        raise IngestError(f"{path}: annotation file not found")
    fmt = detect_format(path)
    source = path.name if path.is_dir() else path.stem
    if stats is not None:
        stats.formats[str(path)] = fmt
    for index, raw in _raw_records(path, fmt):
        try:
            if isinstance(raw, Exception):
                raise raw
            record = _PARSERS[fmt](raw, source, index)
        except (ValueError, TypeError) as exc:
            message = f"{path}: record {index} ({fmt}): {exc}"
            if on_error == "raise":
                raise IngestError(message) from exc
            log.warning("skipping %s", message)
            reason = "not_utf8" if isinstance(exc, NotUTF8) else "malformed_record"
            if stats is not None:
                stats.skipped += 1
                stats.reasons[reason.replace("_", " ")] += 1
                stats.failures.append({"annotation": str(path), "record": index,
                                       "reason": reason, "message": message})
            continue
        if stats is not None:
            stats.records += 1
        yield record


def read_all(paths: list[str | os.PathLike], *, on_error: OnError = "raise",
             stats: IngestStats | None = None) -> list[Record]:
    """Records of several files. Two records with one id, or with ids that become one sample
    key (:func:`dataengine.schema.sample_key`), are an error naming both."""
    records: list[Record] = []
    seen: dict[str, str] = {}
    keys: dict[str, Record] = {}
    for path in paths:
        for record in read_annotations(path, on_error=on_error, stats=stats):
            if record.id in seen:
                raise IngestError(f"{path}: record id {record.id!r} already read from {seen[record.id]}")
            seen[record.id] = str(path)
            other = keys.setdefault(schema.sample_key(record.id), record)
            if other is not record:
                raise IngestError(f"{path}: record ids {other.id!r} and {record.id!r} would share the sample key "
                                  f"{schema.sample_key(record.id)!r}; rename one of them")
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


# ------------------------------------------------------------------------ videos in webdataset shards

VIDEO_SUFFIXES = ("mp4", "webm", "mkv", "avi", "mov", "m4v")
CAPTION_PROMPT = "Describe what happens in the video in detail."
"""The question of the records made from shard captions (a detailed-description instruction)."""
CAPTIONS_NAME = "captions.jsonl"


def video_shards(videos: str | os.PathLike) -> list[Path]:
    """The tars of a ``--videos`` given as webdataset shards (a ``.tar`` file, or a folder whose
    files are ``.tar``s, as video2dataset writes); ``[]`` for a folder of video files."""
    path = Path(videos)
    if path.is_file() and path.suffix == ".tar":
        return [path]
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
        tars = sorted(p for p in files if p.suffix == ".tar")
        if tars and all(p.suffix in (".tar", ".parquet", ".json") for p in files):  # video2dataset's stats files
            return tars
    return []


def _caption(sample: dict[str, Any]) -> str | None:
    """KEY.txt, else the ``caption`` of KEY.json (video2dataset writes both when it has one)."""
    if isinstance(sample.get("txt"), bytes) and sample["txt"].strip():
        return sample["txt"].decode("utf-8", "replace").strip()
    if isinstance(sample.get("json"), bytes):
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            return None
        if isinstance(meta, dict) and isinstance(meta.get("caption"), str) and meta["caption"].strip():
            return meta["caption"].strip()
    return None


def stage_video_shards(shards: list[Path], folder: str | os.PathLike) -> tuple[Path, Path]:
    """Unpack the videos of webdataset shards (``KEY.mp4`` + ``KEY.json``/``KEY.txt``, the layout
    video2dataset writes) into ``folder/videos/KEY.EXT`` for the decoder, and write their
    captions to ``folder/captions.jsonl`` (LLaVA JSONL: "describe the video" -> the caption).
    Returns (videos folder, captions file). Read through ``webdataset``; a video already
    unpacked with the same size is kept, so a resumed build unpacks nothing twice. Two shards
    holding one key are an error naming both.
    """
    import webdataset

    videos = Path(folder) / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    seen: dict[str, str] = {}
    lines = []
    for url in shards:
        for sample in webdataset.WebDataset(str(url), shardshuffle=False, empty_check=False,
                                             nodesplitter=None, workersplitter=None):
            key = sample["__key__"]
            suffix = next((s for s in VIDEO_SUFFIXES if isinstance(sample.get(s), bytes)), None)
            if suffix is None:
                continue  # a metadata-only sample (a failed download's json)
            if os.path.isabs(key) or posixpath.normpath(key).split("/")[0] == "..":
                raise IngestError(f"{url}: member {key}.{suffix} would be unpacked outside {videos}; refused")
            if key in seen:
                raise IngestError(f"{url}: video key {key!r} is also in {seen[key]}")
            seen[key] = str(url)
            target = videos / f"{key}.{suffix}"
            data = sample[suffix]
            if not (target.is_file() and target.stat().st_size == len(data)):
                schema.write_bytes_atomic(target, data)
            caption = _caption(sample)
            if caption is not None:
                lines.append(json.dumps({"id": key, "video": f"{key}.{suffix}", "shard": url.name, "conversations": [
                    {"from": HUMAN, "value": f"{VIDEO_TOKEN}\n{CAPTION_PROMPT}"}, {"from": GPT, "value": caption}]}))
    captions = schema.write_text_atomic(Path(folder) / CAPTIONS_NAME, "".join(line + "\n" for line in lines))
    return videos, captions
