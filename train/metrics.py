"""Evaluation metrics as small pure functions (no I/O, no models), used by ``train/eval/``.

- LLM-judge replies: :func:`parse_qa_verdict` reads ``{"pred": "yes"|"no", "score": 0-5}``
  (JSON, the Python-dict form older judges write, or plain text), :func:`parse_score` reads
  a 0–5 score; :func:`qa_summary` / :func:`score_summary` turn verdicts into accuracy and
  mean score, counting replies that could not be read instead of dropping them.
- Rankings: :func:`target_ranks` gives, per row of a similarity matrix, the rank of the
  right column (ties count against it); :func:`recall_at_k` (text-to-video retrieval,
  R@K) and :func:`topk_accuracy` (action recognition) are read off those ranks.
- The synthetic world (``dataengine.synth``), where the truth is known: :func:`mentions`
  (colours, shapes, directions and counts a text names), :func:`events` (the ``a red circle
  moves left`` phrases, in order), :func:`answer_correct` per question type,
  :func:`event_f1`, and :func:`groundedness` (named colours/shapes/directions that are
  really in the video, over all named).

Tests: ``pytest tests/test_metrics.py`` (hand-computed cases).
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from dataengine.synth import COLOURS, DIRECTIONS, EVENTS, NUMBER_WORDS, SHAPES

SCORE_MIN, SCORE_MAX = 0.0, 5.0
# A judge reply longer than this is not parsed as a literal (literal_eval of a huge nested
# text costs memory); the plain-text fallback still reads it.
_MAX_LITERAL = 4000


# ------------------------------------------------------------------------------ judge replies

@dataclass(frozen=True)
class QAVerdict:
    """An LLM judge's verdict on one answer: does it match the reference, and how well (0–5)."""

    pred: str
    """``yes`` or ``no``."""
    score: float


def _dict_in(text: str) -> dict[str, Any] | None:
    """The first ``{...}`` in ``text`` read as JSON or as a Python literal (never evaluated)."""
    for match in re.finditer(r"\{[^{}]*\}", text):
        blob = match.group(0)
        try:
            value = json.loads(blob)
        except ValueError:
            if len(blob) > _MAX_LITERAL:
                continue
            try:
                value = ast.literal_eval(blob)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
        if isinstance(value, dict):
            return {str(k).strip().lower(): v for k, v in value.items()}
    return None


def _as_score(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*5)?\s*", value)
        if not match:
            return None
        value = float(match.group(1))
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    value = float(value)
    return value if SCORE_MIN <= value <= SCORE_MAX else None


def _as_pred(value: Any) -> str | None:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        word = value.strip().strip(".!\"'").lower()
        if word in ("yes", "no"):
            return word
    return None


_SCORE_TEXT = re.compile(r"\bscore\b\W{0,3}(\d+(?:\.\d+)?)", re.IGNORECASE)
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def parse_score(text: str) -> float | None:
    """A 0–5 score from a judge reply, or None when there is none in range.

    ``{"score": 4}`` → 4.0; ``{'score': '3'}`` → 3.0; ``Score: 2.5`` → 2.5; ``{"score": 7}``
    → None (out of range); ``I think it is good`` → None.
    """
    data = _dict_in(text)
    if data is not None and "score" in data:
        return _as_score(data["score"])
    match = _SCORE_TEXT.search(text)
    return _as_score(match.group(1)) if match else None


def parse_qa_verdict(text: str) -> QAVerdict | None:
    """``pred`` (yes/no) and ``score`` (0–5) from a judge reply, or None when either is missing.

    ``{"pred": "yes", "score": 4}`` → (yes, 4.0); ``{'pred': 'no', 'score': 1}`` → (no, 1.0);
    ``Yes. Score: 5`` → (yes, 5.0); ``{"pred": "maybe", "score": 3}`` → None.
    """
    data = _dict_in(text)
    if data is not None and ("pred" in data or "score" in data):
        pred, score = _as_pred(data.get("pred")), _as_score(data.get("score"))
    else:
        match = _YES_NO.search(text)
        pred = match.group(1).lower() if match else None
        score = parse_score(text)
    if pred is None or score is None:
        return None
    return QAVerdict(pred=pred, score=score)


def qa_summary(verdicts: Sequence[QAVerdict | None]) -> dict[str, Any]:
    """Accuracy (share of ``yes``) and mean score over the readable verdicts.

    ``unparsed`` counts the None entries (replies without a readable verdict); they are
    left out of both means, and reported. [(yes, 4), (no, 2), None] → accuracy 0.5,
    mean_score 3.0, judged 2, unparsed 1.
    """
    read = [v for v in verdicts if v is not None]
    n = len(read)
    return {
        "accuracy": sum(v.pred == "yes" for v in read) / n if n else None,
        "mean_score": sum(v.score for v in read) / n if n else None,
        "judged": n,
        "unparsed": len(verdicts) - n,
    }


def score_summary(scores: Sequence[float | None]) -> dict[str, Any]:
    """Mean of the readable 0–5 scores; None entries are counted as ``unparsed``."""
    read = [s for s in scores if s is not None]
    return {"mean_score": sum(read) / len(read) if read else None, "judged": len(read),
            "unparsed": len(scores) - len(read)}


# ------------------------------------------------------------------------------ rankings

def target_ranks(similarity: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """0-based rank of column ``targets[i]`` in row ``i`` of ``similarity`` (Q, C), best first.

    Ties count against the target: every other column scoring at least as high ranks
    above it, so a model that gives every video the same description retrieves nothing
    (R@1 = 0) rather than everything. Row [0.2, 0.9, 0.5] with target 2 → rank 1; row
    [0.5, 0.5, 0.1] with target 0 → rank 1.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if sim.ndim != 2 or sim.shape[0] != targets.shape[0]:
        raise ValueError(f"similarity {sim.shape} does not match {targets.shape[0]} targets")
    if targets.size and (targets.min() < 0 or targets.max() >= sim.shape[1]):
        raise ValueError(f"targets must lie in [0, {sim.shape[1]})")
    rows = np.arange(sim.shape[0])
    own = sim[rows, targets][:, None]
    at_least = (sim >= own).sum(axis=1)
    return at_least - 1  # minus the target itself


def recall_at_k(similarity: np.ndarray, targets: Sequence[int], ks: Iterable[int] = (1, 5, 10)) -> dict[int, float]:
    """Text-to-video retrieval: share of queries (rows) whose video (column ``targets[i]``)
    is among the ``k`` most similar. {k: R@k} in [0, 1]."""
    ranks = target_ranks(similarity, targets)
    return {k: float((ranks < k).mean()) if ranks.size else float("nan") for k in ks}


def topk_accuracy(similarity: np.ndarray, labels: Sequence[int], ks: Iterable[int] = (1, 5)) -> dict[int, float]:
    """Classification: share of samples (rows) whose class (column ``labels[i]``) is among
    the ``k`` best scored. Same tie rule as :func:`target_ranks`."""
    return recall_at_k(similarity, labels, ks)


# ------------------------------------------------------------------------------ synthetic world

_WORD = re.compile(r"[a-z]+|\d+")
_SHAPE_FORMS = {form: shape for shape in SHAPES for form in (shape, shape + "s")}
_DIGITS = {str(i): word for i, word in enumerate(NUMBER_WORDS)}
_EVENT = re.compile(
    r"\b(?:a|an|the)\s+(?:(?:large|small|big)\s+)?(?P<colour>" + "|".join(COLOURS) + r")\s+"
    r"(?P<shape>" + "|".join(SHAPES) + r")\s+"
    r"(?:(?P<moves>moves)\s+(?P<direction>" + "|".join(DIRECTIONS) + r")|(?P<kind>"
    + "|".join(e for e in EVENTS if e != "moves") + r"))\b")

GROUNDED_KINDS = ("colour", "shape", "direction")


def mentions(text: str) -> dict[str, set[str]]:
    """Vocabulary words a text names, by kind: ``colour``, ``shape`` (plurals folded),
    ``direction`` and ``count`` (number words; digits 0–3 folded into words).

    ``"Two red circles move left."`` → colour {red}, shape {circle}, direction {left},
    count {two}.
    """
    found: dict[str, set[str]] = {"colour": set(), "shape": set(), "direction": set(), "count": set()}
    for word in _WORD.findall(text.lower()):
        if word in COLOURS:
            found["colour"].add(word)
        elif word in _SHAPE_FORMS:
            found["shape"].add(_SHAPE_FORMS[word])
        elif word in DIRECTIONS:
            found["direction"].add(word)
        elif word in NUMBER_WORDS:
            found["count"].add(word)
        elif word in _DIGITS:
            found["count"].add(_DIGITS[word])
    return found


def events(text: str) -> list[tuple[str, str, str, str]]:
    """The event phrases of a text, in order, as ``(colour, shape, kind, direction)``.

    Articles and size words are ignored; ``direction`` is ``""`` unless the shape moves.
    ``"First a red circle moves left, then the red circle grows."`` →
    [(red, circle, moves, left), (red, circle, grows, "")]. ``"the blue square stays
    still"`` names no event.
    """
    out = []
    for m in _EVENT.finditer(text.lower()):
        if m.group("moves"):
            out.append((m.group("colour"), m.group("shape"), "moves", m.group("direction")))
        else:
            out.append((m.group("colour"), m.group("shape"), m.group("kind"), ""))
    return out


def _normalise(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def answer_key(qtype: str, text: str) -> Any:
    """What an answer of question type ``qtype`` is judged on (see :func:`answer_correct`)."""
    found = mentions(text)
    if qtype in ("colour", "shape", "direction", "count"):
        return frozenset(found[qtype])
    if qtype == "object":
        return frozenset(found["colour"]), frozenset(found["shape"])
    if qtype in ("event", "order", "describe"):
        return tuple(events(text))
    return _normalise(text)


def answer_correct(qtype: str, prediction: str, reference: str) -> bool:
    """Exact scoring of one synthetic-world answer against its reference.

    - ``colour``, ``shape``, ``direction``, ``count``: the words of that kind the answer
      names are exactly the reference's ("It is red." vs "red": right; "red or blue": wrong).
    - ``object``: the named colours and shapes are the reference's ("the blue square").
    - ``event``, ``order``, ``describe``: the sequence of event phrases (colour, shape,
      kind, direction) equals the reference's, in order.
    - any other type: the same words after lower-casing and dropping punctuation.

    A reference that yields nothing to compare (no word of its kind) never counts as right.
    """
    want = answer_key(qtype, reference)
    if not (any(want) if qtype == "object" else want):
        return False
    return answer_key(qtype, prediction) == want


def event_f1(prediction: str, reference: str) -> float | None:
    """F1 of the event phrases named (as a multiset, order ignored), or None when the
    reference names none. Partial credit where :func:`answer_correct` is all or nothing:
    2 of 3 reference events and one wrong one → precision 2/3, recall 2/3, F1 2/3."""
    ref = Counter(events(reference))
    if not ref:
        return None
    pred = Counter(events(prediction))
    hit = sum((ref & pred).values())
    if hit == 0:
        return 0.0
    precision, recall = hit / sum(pred.values()), hit / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def video_vocabulary(truth: Mapping[str, Any]) -> dict[str, set[str]]:
    """Colours, shapes and directions really in a video, from its ``captions.json`` entry:
    the colour and shape of every object, the direction of every move."""
    objects = truth.get("objects")
    segments = truth.get("segments")
    if not isinstance(objects, list) or not isinstance(segments, list):
        raise ValueError(f"video {truth.get('video_id', '?')}: ground truth without objects/segments")
    return {
        "colour": {o["colour"] for o in objects},
        "shape": {o["shape"] for o in objects},
        "direction": {s["event"]["direction"] for s in segments if s["event"].get("direction")},
    }


def groundedness(text: str, vocabulary: Mapping[str, set[str]]) -> tuple[int, int]:
    """(grounded, mentioned): distinct colours, shapes and directions the text names, and
    how many of them are in the video's ``vocabulary``. "a red circle moves up" in a video
    of a red square moving up → mentioned 3 (red, circle, up), grounded 2."""
    found = mentions(text)
    mentioned = grounded = 0
    for kind in GROUNDED_KINDS:
        mentioned += len(found[kind])
        grounded += len(found[kind] & set(vocabulary.get(kind, ())))
    return grounded, mentioned


def ratio(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator``, or None for an empty denominator (nothing to rate)."""
    return numerator / denominator if denominator else None
