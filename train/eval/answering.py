"""What is evaluated (saved models, predictions files), samples as items, and the answers:
generated or read on every rank, gathered to rank 0. See :mod:`train.eval`."""

from __future__ import annotations

import gc
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from train.eval.configs import MODEL_CONFIG, EvalConfig

if TYPE_CHECKING:
    from dataengine.dist import Ranks
    from train.eval.tasks import Task

log = logging.getLogger(__name__)

# =========================================================================== what is evaluated

@dataclass(frozen=True)
class Candidate:
    """One column of the table: a saved model, or a file of predictions."""

    name: str
    kind: Literal["model", "predictions"]
    path: Path


def model_folder(spec: str) -> Path:
    """The saved-model folder of ``spec``: itself, or its ``model/`` (a training run's output)."""
    path = Path(spec)
    for folder in (path, path / "model"):
        if (folder / MODEL_CONFIG).is_file():
            return folder
    raise FileNotFoundError(f"{spec}: not a saved model (no {MODEL_CONFIG} in it or in {path / 'model'})")


def distinct_names(paths: Sequence[str]) -> list[str]:
    """Shortest path tails that tell the paths apart: runs/sft/model, runs/ppo/model →
    sft/model, ppo/model; a/x, b/y → x, y."""
    parts = [Path(p).parts or (str(p),) for p in paths]
    deepest = max((len(p) for p in parts), default=1)
    for depth in range(1, deepest + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{'/'.join(p)}#{i}" for i, p in enumerate(parts)]


def resolve_candidates(config: EvalConfig) -> list[Candidate]:
    folders = [model_folder(m) for m in config.models]
    for p in config.predictions:
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p}: predictions file not found")
    # A model is named by its run (runs/sft and runs/sft/model: sft), a predictions file by
    # its stem (preds/sft.jsonl: sft).
    specs = [str(f.parent if f.name == "model" else f) for f in folders] + \
        [str(Path(p).with_suffix("")) for p in config.predictions]
    names = list(config.names) or distinct_names(specs)
    kinds = ["model"] * len(folders) + ["predictions"] * len(config.predictions)
    paths = folders + [Path(p) for p in config.predictions]
    return [Candidate(n, k, p) for n, k, p in zip(names, kinds, paths)]  # type: ignore[arg-type]


def load_predictions(path: Path) -> dict[str, dict[str, Any]]:
    """``key`` → the line, from a JSONL of ``{"key", "prediction"[, "prediction2"]}``."""
    table: dict[str, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not JSON: {exc}") from None
            if not isinstance(row, dict) or not isinstance(row.get("key"), str) \
                    or not isinstance(row.get("prediction"), str):
                raise ValueError(f"{path}:{number}: expected {{\"key\": str, \"prediction\": str}}")
            if row["key"] in table:
                raise ValueError(f"{path}:{number}: key {row['key']!r} given twice")
            table[row["key"]] = row
    return table


# =========================================================================== samples

@dataclass
class EvalItem:
    """One sample to answer: its question(s), reference and the fields its task needs."""

    index: int
    """Position in the evaluated stream (stages in order): results are sorted by it."""
    key: str
    id: str
    video_id: str
    question: str
    answer: str
    prompts: list[str]
    """What the model is asked, in order (the first turn as written, or --prompt; then q2)."""
    fields: dict[str, Any] = field(default_factory=dict)


def first_turns(data: dict[str, Any]) -> tuple[str, str, str]:
    """(first human turn as written, its text without ``<video>``, first answer) of a sample json."""
    turns = data.get("conversations")
    if not isinstance(turns, list):
        raise ValueError("no 'conversations' list")
    human = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "human"), None)
    gpt = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"), None)
    if not isinstance(human, str) or not human.strip():
        raise ValueError("no human turn (question)")
    if not isinstance(gpt, str):
        raise ValueError("no gpt turn (reference answer)")
    question = human.replace("<video>", " ").strip()
    return human, " ".join(question.split()), gpt.strip()


def base_item(index: int, sample: dict[str, Any], prompt_override: str | None = None) -> EvalItem:
    data = sample.get("json")
    if not isinstance(data, dict):
        raise ValueError("sample has no json member")
    raw, question, answer = first_turns(data)
    video_id = data.get("video_id")
    if not isinstance(video_id, str) or not video_id:
        raise ValueError("no 'video_id'")
    prompt = raw if not prompt_override else prompt_override
    return EvalItem(index=index, key=str(sample.get("key", "")), id=str(data.get("id", "")), video_id=video_id,
                    question=question if not prompt_override else prompt_override, answer=answer,
                    prompts=[prompt])


# =========================================================================== answering

class ModelAnswerer:
    """Generates the answers of one model, ``batch_size`` prompts at a time; each distinct
    (video, prompt) once (retrieval asks one prompt of every caption's video)."""

    def __init__(self, folder: Path, config: EvalConfig, device: Any):
        from train.model import VideoLMM

        self.model = VideoLMM.load(folder, dtype=config.dtype or None).to(device)
        self.model.eval()
        self.tokenizer = self.model.tokenizer
        self.batch_size = config.batch_size
        self.max_new_tokens = config.max_new_tokens
        lm_config = getattr(self.model.lm, "config", None)
        self.context = int(getattr(lm_config, "max_position_embeddings", 0) or 0)
        self.done: dict[tuple[str, str], tuple[str, bool]] = {}
        self.pending: list[tuple[tuple[str, str], list[int], Any]] = []
        self.queued: set[tuple[str, str]] = set()

    def add(self, item: EvalItem, feat) -> str | None:
        """Queue the item's prompts; returns a reason when the item cannot be answered."""
        from train import conversation

        for prompt in item.prompts:
            memo = (item.video_id, prompt)
            if memo in self.done or memo in self.queued:
                continue
            ids = self.model.chat.prompt_ids(prompt)
            length = conversation.spliced_length(len(ids), 1, int(feat.shape[0])) + self.max_new_tokens
            if self.context and length > self.context:
                return f"too_long ({length} > context {self.context})"
            self.pending.append((memo, ids, feat))
            self.queued.add(memo)
        if len(self.pending) >= self.batch_size:
            self.flush()
        return None

    def flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:self.batch_size], self.pending[self.batch_size:]
            out = self.model.generate([f for _, _, f in batch], [ids for _, ids, _ in batch],
                                      max_new_tokens=self.max_new_tokens)
            for (memo, _, _), text, ended in zip(batch, out.texts, out.ended):
                self.done[memo] = (text, ended)
                self.queued.discard(memo)

    def answers(self, item: EvalItem) -> list[tuple[str, bool]]:
        return [self.done[(item.video_id, p)] for p in item.prompts]

    def close(self) -> None:
        import torch

        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class PredictionAnswerer:
    """Answers read from a predictions file (by sample key, or record id)."""

    def __init__(self, path: Path):
        self.path = path
        self.table = load_predictions(path)

    def _row(self, item: EvalItem) -> dict[str, Any] | None:
        return self.table.get(item.key) or self.table.get(item.id)

    def add(self, item: EvalItem, feat) -> str | None:
        row = self._row(item)
        if row is None:
            return f"no_prediction (key {item.key!r} not in {self.path})"
        if len(item.prompts) > 1 and not isinstance(row.get("prediction2"), str):
            return f"no_prediction2 (key {item.key!r} asks two questions)"
        return None

    def flush(self) -> None:
        pass

    def answers(self, item: EvalItem) -> list[tuple[str, bool]]:
        row = self._row(item)
        assert row is not None
        texts = [row["prediction"], row.get("prediction2", "")][:len(item.prompts)]
        return [(t, True) for t in texts]

    def close(self) -> None:
        pass


def _reason_name(reason: str) -> str:
    return reason.split(" ", 1)[0]


def collect_answers(task: "Task", candidate: Candidate, config: EvalConfig, ranks: "Ranks",
                    device: Any) -> dict[str, Any] | None:
    """Stream this rank's samples, answer them, gather everything to rank 0.

    Returns on rank 0 ``{"records": [...], "skipped": [...], "reader": {...}}`` (records and
    skips sorted by stream index, each index once); None on the other ranks.
    """
    from tqdm import tqdm

    from dataengine import dist
    from dataengine.reader import ShardReader

    started = time.perf_counter()
    reader = ShardReader(config.shards, stages=config.stages, rank=ranks.rank, world_size=ranks.world_size,
                         batch_size=1, shuffle="none", remainder="repeat", fields=("json", "feat"),
                         on_error=config.on_error)
    sequence = reader.sequence()
    wanted = len(sequence) if not config.limit else \
        1 + max((i for i, index in enumerate(sequence) if index < config.limit), default=-1)
    answerer: ModelAnswerer | PredictionAnswerer
    if candidate.kind == "model":
        answerer = ModelAnswerer(candidate.path, config, device)
    else:
        answerer = PredictionAnswerer(candidate.path)
    items: list[EvalItem] = []
    skipped: list[dict[str, Any]] = []
    samples = iter(reader)
    bar = tqdm(total=wanted, desc=f"{task.name} {candidate.name}", unit="sample",
               disable=not (ranks.is_main and config.progress))
    try:
        for position in range(wanted):
            sample = next(samples)
            bar.update(1)
            index = sequence[position]
            if config.limit and index >= config.limit:
                continue
            where = f"{sample.get('shard', config.shards)} key {sample.get('key', '?')}"
            if sample.get("substitute_for"):  # the reader's stand-in for a sample it could not read
                skipped.append({"index": index, "key": "", "reason": "unreadable",
                                "detail": str(sample["substitute_for"])})
                continue
            try:
                item = task.parse(index, sample)
            except ValueError as exc:
                if config.on_error == "raise":
                    raise ValueError(f"{where}: {exc}") from None
                log.warning("skipping %s: %s", where, exc)
                skipped.append({"index": index, "key": sample.get("key", ""), "reason": "malformed",
                                "detail": str(exc)})
                continue
            reason = answerer.add(item, sample["feat"])
            if reason is not None:
                if candidate.kind == "predictions" and config.on_error == "raise":
                    raise ValueError(f"{where}: {reason}")
                log.warning("not answered: %s: %s", where, reason)
                skipped.append({"index": index, "key": item.key, "reason": _reason_name(reason), "detail": reason})
                continue
            items.append(item)
        answerer.flush()
        records = []
        for item in items:
            answers = answerer.answers(item)
            record = {"index": item.index, "key": item.key, "id": item.id, "video_id": item.video_id,
                      "question": item.question, "answer": item.answer,
                      "prediction": answers[0][0], "ended": answers[0][1], **item.fields}
            if len(answers) > 1:
                record["prediction2"], record["ended2"] = answers[1]
            records.append(record)
    finally:
        samples.close()
        bar.close()
        answerer.close()
    stats = reader.stats()
    # JSON between ranks (never pickled); the ranks' group is train.shardpass's.
    parts = dist.all_gather_json({"records": records, "skipped": skipped,
                                   "reader": {"skipped": stats["skipped"], "errors": stats["errors"][:5]},
                                   "seconds": time.perf_counter() - started})
    return merge_ranks(parts) if ranks.is_main else None


def merge_ranks(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from every rank's: each stream index once (``remainder="repeat"`` gives the
    last few samples to two ranks), sorted by index; reader counts summed."""
    merged: dict[int, dict[str, Any]] = {}
    lost: dict[int, dict[str, Any]] = {}
    reader_skipped: Counter = Counter()
    errors: list[str] = []
    for part in parts:
        for record in part["records"]:
            merged.setdefault(record["index"], record)
        for skip in part["skipped"]:
            lost.setdefault(skip["index"], skip)
        reader_skipped.update(part["reader"]["skipped"])
        errors += part["reader"]["errors"]
    return {"records": [merged[i] for i in sorted(merged)],
            "skipped": [lost[i] for i in sorted(lost) if i not in merged],
            "reader": {"skipped": dict(reader_skipped), "errors": errors[:10]},
            "seconds": max(p["seconds"] for p in parts)}
