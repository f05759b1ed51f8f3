"""One :class:`Task` per ``vlmr eval`` command: what it asks of each sample and how it scores
the answers (with ``train.metrics``). See :mod:`train.eval`."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from train import metrics
from train.eval.answering import EvalItem, base_item
from train.eval.configs import (CRITERIA, EVENT_QTYPES, GENERATIVE_TASKS, QA_PROMPT, SYNTHETIC_QTYPES, ActionConfig,
                                EvalConfig, GenerativeConfig, Kind, QAConfig, RetrievalConfig, SyntheticConfig)
from train.eval.judging import ClipText, LLMJudge, text_similarity, user_message
from train.prompt_files import PROMPTS, load_prompt

if TYPE_CHECKING:
    from dataengine.dist import Ranks

# =========================================================================== tasks

Row = tuple[str, Any, Kind]


class Task:
    """What one command asks of each sample (:meth:`parse`) and how it scores the answers
    (:meth:`score`, called on every rank; rank 0 gets the merged records, others None)."""

    name = ""

    def __init__(self, config: EvalConfig, ranks: "Ranks", device: Any):
        self.config, self.ranks, self.device = config, ranks, device

    def parse(self, index: int, sample: dict[str, Any]) -> EvalItem:
        return base_item(index, sample)

    def score(self, records: list[dict[str, Any]] | None) -> list[Row] | None:
        raise NotImplementedError


class SyntheticTask(Task):
    name = "synthetic"

    def __init__(self, config: SyntheticConfig, ranks: "Ranks", device: Any):
        from dataengine.synth import load_captions

        super().__init__(config, ranks, device)
        self.truth = load_captions(config.world)
        self.vocabulary: dict[str, dict[str, set[str]]] = {}

    def parse(self, index: int, sample: dict[str, Any]) -> EvalItem:
        item = base_item(index, sample)
        qtype = sample["json"].get("qtype")
        if not isinstance(qtype, str) or not qtype:
            raise ValueError("no 'qtype' (not a synthetic-world sample?)")
        truth = self.truth.get(item.video_id)
        if truth is None or "broken" in truth:
            raise ValueError(f"video {item.video_id!r} has no ground truth in {self.config.world}")
        item.fields["qtype"] = qtype
        return item

    def score(self, records):
        if records is None:
            return None
        by_type: dict[str, list[bool]] = defaultdict(list)
        f1s: list[float] = []
        grounded = mentioned = 0
        for r in records:
            vid = r["video_id"]
            if vid not in self.vocabulary:
                self.vocabulary[vid] = metrics.video_vocabulary(self.truth[vid])
            r["correct"] = metrics.answer_correct(r["qtype"], r["prediction"], r["answer"])
            by_type[r["qtype"]].append(r["correct"])
            if r["qtype"] in EVENT_QTYPES:
                r["event_f1"] = metrics.event_f1(r["prediction"], r["answer"])
                if r["event_f1"] is not None:
                    f1s.append(r["event_f1"])
            r["grounded"], r["mentioned"] = metrics.groundedness(r["prediction"], self.vocabulary[vid])
            grounded += r["grounded"]
            mentioned += r["mentioned"]
        everything = [c for values in by_type.values() for c in values]
        rows: list[Row] = [("accuracy", metrics.ratio(sum(everything), len(everything)), "pct")]
        order = [q for q in SYNTHETIC_QTYPES if q in by_type] + sorted(set(by_type) - set(SYNTHETIC_QTYPES))
        for qtype in order:
            rows.append((f"accuracy/{qtype}", metrics.ratio(sum(by_type[qtype]), len(by_type[qtype])), "pct"))
        rows += [("event F1", metrics.ratio(sum(f1s), len(f1s)), "pct"),
                 ("groundedness", metrics.ratio(grounded, mentioned), "pct"),
                 ("mentions", mentioned, "count")]
        return rows


class QATask(Task):
    name = "qa"

    def __init__(self, config: QAConfig, ranks: "Ranks", device: Any):
        super().__init__(config, ranks, device)
        self.template = load_prompt(config.prompt or QA_PROMPT, required=("question", "answer", "prediction"))
        self.judge = LLMJudge(config, ranks)

    def score(self, records):
        requests = None if records is None else [
            {"messages": user_message(self.template.substitute(question=r["question"], answer=r["answer"],
                                                               prediction=r["prediction"])),
             "label": f"qa:{r['key']}"} for r in records]
        replies, counts = self.judge.ask(requests)
        if records is None:
            return None
        verdicts = []
        for r, reply in zip(records, replies):
            if "error" in reply:
                r["judge_error"] = reply["error"]
                continue
            r["judge"] = reply["text"]
            verdict = metrics.parse_qa_verdict(reply["text"])
            r["pred"], r["score"] = (verdict.pred, verdict.score) if verdict else (None, None)
            verdicts.append(verdict)
        summary = metrics.qa_summary(verdicts)
        return [("accuracy", summary["accuracy"], "pct"), ("score", summary["mean_score"], "score"),
                ("judged", summary["judged"], "count"), ("unparsed replies", summary["unparsed"], "count"),
                ("judge failed", counts["failed"], "count"), ("judge requests sent", counts["sent"], "count"),
                ("judge replies cached", counts["cached"], "count")]


class GenerativeTask(Task):
    name = "generative"

    def __init__(self, config: GenerativeConfig, ranks: "Ranks", device: Any):
        super().__init__(config, ranks, device)
        folder = Path(config.prompt_dir) if config.prompt_dir else PROMPTS
        single = ("question", "answer", "prediction")
        self.templates = {c: load_prompt(folder / f"eval_generative_{c}.txt", required=single)
                          for c in CRITERIA[:4]}
        self.templates["consistency"] = load_prompt(
            folder / "eval_generative_consistency.txt",
            required=("question1", "question2", "answer", "prediction1", "prediction2"))
        self.judge = LLMJudge(config, ranks)

    def parse(self, index: int, sample: dict[str, Any]) -> EvalItem:
        item = base_item(index, sample)
        data = sample["json"]
        pair = data.get("question_pair")
        task = data.get("task", "consistency" if pair is not None else "generic")
        if task not in GENERATIVE_TASKS:
            raise ValueError(f"task {task!r} is not one of {', '.join(GENERATIVE_TASKS)}")
        item.fields["task"] = task
        if task == "consistency":
            q2 = data.get("q2")
            if isinstance(q2, str) and q2.strip():
                item.fields["question2"] = " ".join(q2.split())
                item.prompts.append(item.fields["question2"])
            elif pair is not None:
                item.fields["question_pair"] = str(pair)
            else:
                raise ValueError("a consistency sample needs 'q2' (the reworded question) or a 'question_pair' id")
        return item

    def pair_up(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Join records sharing a ``question_pair`` id: the first gets the second's question
        and prediction; the second is marked ``paired_with``. A group that is not a pair of
        one video is an error (or, with --on-error skip, left unscored and counted)."""
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in records:
            if "question_pair" in r:
                groups[r["question_pair"]].append(r)
        for pair, group in groups.items():
            problem = (f"{len(group)} sample(s)" if len(group) != 2 else
                       "two videos" if group[0]["video_id"] != group[1]["video_id"] else None)
            if problem:
                keys = ", ".join(r["key"] for r in group)
                message = f"question_pair {pair!r} has {problem} (keys {keys}); needs two of one video"
                if self.config.on_error == "raise":
                    raise ValueError(message)
                for r in group:
                    r["unpaired"] = message
                continue
            first, second = group
            first.update(question2=second["question"], prediction2=second["prediction"], paired_key=second["key"])
            second["paired_with"] = first["key"]
        return records

    def requests_for(self, r: dict[str, Any]) -> list[tuple[str, str]]:
        """(criterion, prompt text) the judge is asked for one record."""
        if r["task"] == "consistency":
            if "prediction2" not in r or "paired_with" in r or "unpaired" in r:
                return []
            return [("consistency", self.templates["consistency"].substitute(
                question1=r["question"], question2=r["question2"], answer=r["answer"],
                prediction1=r["prediction"], prediction2=r["prediction2"]))]
        return [(c, self.templates[c].substitute(question=r["question"], answer=r["answer"],
                                                 prediction=r["prediction"]))
                for c in GENERATIVE_TASKS[r["task"]]]

    def score(self, records):
        asks: list[tuple[int, str]] = []
        requests = None
        if records is not None:
            self.pair_up(records)
            requests = []
            for i, r in enumerate(records):
                for criterion, text in self.requests_for(r):
                    asks.append((i, criterion))
                    requests.append({"messages": user_message(text), "label": f"{criterion}:{r['key']}"})
        replies, counts = self.judge.ask(requests)
        if records is None:
            return None
        scores: dict[str, list[float | None]] = {c: [] for c in CRITERIA}
        for (i, criterion), reply in zip(asks, replies):
            r = records[i]
            if "error" in reply:
                r.setdefault("judge_error", {})[criterion] = reply["error"]
                continue
            r.setdefault("judge", {})[criterion] = reply["text"]
            value = metrics.parse_score(reply["text"])
            r.setdefault("scores", {})[criterion] = value
            scores[criterion].append(value)
        rows: list[Row] = []
        means = []
        for criterion in CRITERIA:
            summary = metrics.score_summary(scores[criterion])
            rows.append((criterion, summary["mean_score"], "score"))
            if summary["mean_score"] is not None:
                means.append(summary["mean_score"])
        rows.append(("mean of criteria", sum(means) / len(means) if len(means) == len(CRITERIA) else None, "score"))
        judged = sum(metrics.score_summary(v)["judged"] for v in scores.values())
        unparsed = sum(metrics.score_summary(v)["unparsed"] for v in scores.values())
        rows += [("judged", judged, "count"), ("unparsed replies", unparsed, "count"),
                 ("unpaired", sum("unpaired" in r for r in records), "count"),
                 ("judge failed", counts["failed"], "count"), ("judge requests sent", counts["sent"], "count"),
                 ("judge replies cached", counts["cached"], "count")]
        return rows


class RetrievalTask(Task):
    name = "retrieval"

    def __init__(self, config: RetrievalConfig, ranks: "Ranks", device: Any):
        super().__init__(config, ranks, device)
        self.clip = ClipText(config.clip, device)

    def parse(self, index: int, sample: dict[str, Any]) -> EvalItem:
        item = base_item(index, sample, self.config.prompt or None)
        if not item.answer:
            raise ValueError("empty caption (the reference answer)")
        return item

    def score(self, records):
        if records is None:
            return None
        videos: dict[str, int] = {}
        descriptions: list[str] = []
        for r in records:
            if r["video_id"] not in videos:
                videos[r["video_id"]] = len(descriptions)
                descriptions.append(r["prediction"])
        if not records:
            return [(f"R@{k}", None, "pct") for k in self.config.ks] + [("queries", 0, "count"), ("videos", 0, "count")]
        similarity = text_similarity(self.clip.embed, [r["answer"] for r in records], descriptions)
        targets = [videos[r["video_id"]] for r in records]
        ranks = metrics.target_ranks(similarity, targets)
        names = list(videos)
        for r, rank, row in zip(records, ranks, similarity):
            r["rank"] = int(rank)
            r["top"] = [names[j] for j in row.argsort(kind="stable")[::-1][:5]]
        recall = metrics.recall_at_k(similarity, targets, self.config.ks)
        return [(f"R@{k}", recall[k], "pct") for k in self.config.ks] + [
            ("median rank", float(sorted(ranks)[len(ranks) // 2]) + 1, "score"),
            ("queries", len(records), "count"), ("videos", len(videos), "count")]


def load_classes(path: str | Path) -> list[str]:
    """Class names from a file: one per line, or ``INDEX NAME`` lines (UCF101 classInd.txt).
    Blank lines and '#' comments are ignored; a name given twice is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: class list not found")
    names: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"\d+\s+(.+)", line)
        name = (match.group(1) if match else line).strip()
        if name in names:
            raise ValueError(f"{path}:{number}: class {name!r} listed twice")
        names.append(name)
    if not names:
        raise ValueError(f"{path}: no classes")
    return names


def class_words(name: str) -> str:
    """A class name in words: ApplyEyeMakeup → apply eye makeup, brush_hair → brush hair."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)
    return " ".join(spaced.replace("_", " ").replace("-", " ").lower().split())


class ActionTask(Task):
    name = "action"

    def __init__(self, config: ActionConfig, ranks: "Ranks", device: Any):
        super().__init__(config, ranks, device)
        self.classes = load_classes(config.classes)
        self.lookup: dict[str, int] = {}
        for i, name in enumerate(self.classes):
            self.lookup.setdefault(name, i)
            self.lookup.setdefault(class_words(name), i)
        self.clip = ClipText(config.clip, device)

    def label_index(self, label: Any) -> int:
        if isinstance(label, int) and not isinstance(label, bool):
            if 0 <= label < len(self.classes):
                return label
            raise ValueError(f"label {label} outside the {len(self.classes)} classes of {self.config.classes}")
        if isinstance(label, str):
            for form in (label.strip(), class_words(label)):
                if form in self.lookup:
                    return self.lookup[form]
        raise ValueError(f"label {label!r} is not a class of {self.config.classes}")

    def parse(self, index: int, sample: dict[str, Any]) -> EvalItem:
        item = base_item(index, sample, self.config.prompt or None)
        label = sample["json"].get("label", item.answer)
        item.fields["label_index"] = self.label_index(label)
        item.fields["label"] = self.classes[item.fields["label_index"]]
        return item

    def score(self, records):
        if records is None:
            return None
        if not records:
            return [(f"top-{k}", None, "pct") for k in self.config.ks] + [("samples", 0, "count")]
        prompts = [self.config.class_template.replace("{class}", class_words(c)) for c in self.classes]
        similarity = text_similarity(self.clip.embed, [r["prediction"] for r in records], prompts)
        labels = [r["label_index"] for r in records]
        ranks = metrics.target_ranks(similarity, labels)
        for r, rank, row in zip(records, ranks, similarity):
            r["rank"] = int(rank)
            r["top"] = [self.classes[j] for j in row.argsort(kind="stable")[::-1][:5]]
        accuracy = metrics.topk_accuracy(similarity, labels, self.config.ks)
        return [(f"top-{k}", accuracy[k], "pct") for k in self.config.ks] + [("classes", len(self.classes), "count")]
