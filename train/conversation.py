"""The vicuna v1 conversation template, tokenization with assistant-only labels, prompts.

A sample's ``conversations`` is a list of turns ``{"from": "human"|"gpt", "value": str}``;
the first human turn holds the ``<video>`` placeholder. Rendered as vicuna v1 (LLaVA's
``conv_vicuna_v1``: separators ``" "`` and ``"</s>"``)::

    {SYSTEM} USER: <video>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

``tokenize`` tokenizes the whole rendered string once (so token boundaries are the ones the
model sees at inference) and marks as targets exactly the tokens that fall inside each
assistant span `` {answer}</s>``; every other token gets ``IGNORE_INDEX``. The
``<video>`` placeholder stays one token id; the model replaces it by the projected video
features (``train.model.VideoLMM.splice``), so the length the model sees is
``len(input_ids) - videos + videos * feat_rows`` (:func:`spliced_length`). No token id is
hard-coded: BOS, EOS and ``<video>`` come from the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
USER, ASSISTANT = "USER", "ASSISTANT"
SEP, SEP2 = " ", "</s>"
VIDEO_TOKEN = "<video>"
IGNORE_INDEX = -100
ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT}


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation and the character spans ``[start, end)`` that are targets."""

    text: str
    target_spans: tuple[tuple[int, int], ...]


def _turns(conversations: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    if not conversations:
        raise ValueError("empty conversation")
    turns = []
    for i, turn in enumerate(conversations):
        try:
            role, value = ROLES[turn["from"]], turn["value"]
        except KeyError as exc:
            raise ValueError(f"turn {i}: expected from=human|gpt and a value, got {turn!r}") from exc
        if not isinstance(value, str):
            raise ValueError(f"turn {i}: value must be a string, got {type(value).__name__}")
        expected = USER if i % 2 == 0 else ASSISTANT
        if role != expected:
            raise ValueError(f"turn {i}: expected a {expected} turn, got {turn['from']!r} "
                             "(turns must alternate human, gpt, human, ...)")
        turns.append((role, value))
    return turns


def render_spans(conversations: Sequence[dict[str, Any]], eos: str = SEP2) -> Rendered:
    """The vicuna v1 text of a conversation and its assistant (target) character spans.

    A conversation ending on a human turn renders as a prompt: it ends with ``ASSISTANT:``.
    """
    text = SYSTEM + SEP
    spans = []
    turns = _turns(conversations)
    for role, value in turns:
        if role == USER:
            text += f"{USER}: {value}{SEP}"
        else:
            # The target starts at the space after "ASSISTANT:" so that a tokenizer that
            # glues the space to the first answer word still marks that word as a target.
            text += f"{ASSISTANT}:"
            start = len(text)
            text += f" {value}{eos}"
            spans.append((start, len(text)))
    if turns[-1][0] == USER:
        text += f"{ASSISTANT}:"
    return Rendered(text=text, target_spans=tuple(spans))


def render(conversations: Sequence[dict[str, Any]], eos: str = SEP2) -> str:
    """The vicuna v1 text of a conversation (what the length guard tokenizes)."""
    return render_spans(conversations, eos=eos).text


def video_token_id(tokenizer) -> int:
    token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {VIDEO_TOKEN} token (load it with dataengine.models.load_tokenizer)")
    return int(token_id)


def _encode(text: str, tokenizer, offsets: bool):
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)
    ids = list(enc["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None:
        ids = [bos] + ids
    if not offsets:
        return ids, None
    spans = [(-1, -1)] * (bos is not None) + [tuple(o) for o in enc["offset_mapping"]]
    return ids, spans


def count_tokens(text: str, tokenizer) -> int:
    """Tokens of a rendered text as :func:`tokenize` counts them (BOS included)."""
    return len(_encode(text, tokenizer, offsets=False)[0])


def spliced_length(num_tokens: int, num_videos: int, feat_rows: int) -> int:
    """Sequence length once each of ``num_videos`` placeholders becomes ``feat_rows`` rows."""
    return num_tokens - num_videos + num_videos * feat_rows


def tokenize(conversations: Sequence[dict[str, Any]], tokenizer, *, max_length: int | None = None,
             feat_rows: int = 0) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a conversation; labels are ``IGNORE_INDEX`` outside answers.

    With ``max_length``, the tail is cut so that the spliced length (each ``<video>`` token
    counted as ``feat_rows`` rows) fits; a cut that would remove a ``<video>`` token is an
    error, since a sample without its video is not the sample any more.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("tokenize needs a fast tokenizer (offsets mapping); load it with "
                        "dataengine.models.load_tokenizer")
    rendered = render_spans(conversations, eos=tokenizer.eos_token or SEP2)
    ids, offsets = _encode(rendered.text, tokenizer, offsets=True)
    labels = [IGNORE_INDEX] * len(ids)
    spans = rendered.target_spans
    for i, (start, end) in enumerate(offsets):
        if start < 0 or end <= start:
            continue
        if any(s <= start < e for s, e in spans):
            labels[i] = ids[i]
    if max_length is not None:
        vid = video_token_id(tokenizer)
        videos = ids.count(vid)
        if spliced_length(len(ids), videos, feat_rows) > max_length:
            keep = max_length - videos * (feat_rows - 1)
            if keep <= 0 or ids[keep:].count(vid):
                raise ValueError(f"max_length {max_length} cannot hold the video ({videos} x "
                                 f"{feat_rows} rows) of this conversation")
            ids, labels = ids[:keep], labels[:keep]
    return ids, labels


def prompt_ids(question: str, tokenizer, *, history: Sequence[dict[str, Any]] = ()) -> list[int]:
    """Token ids of a generation prompt ending in ``ASSISTANT:``.

    ``question`` gets the ``<video>`` placeholder in front unless it (or ``history``) already
    has one; ``history`` is earlier turns of the same conversation.
    """
    turns = list(history)
    has_video = any(VIDEO_TOKEN in t.get("value", "") for t in turns) or VIDEO_TOKEN in question
    if not has_video:
        question = f"{VIDEO_TOKEN}\n{question}"
    turns.append({"from": "human", "value": question})
    return _encode(render(turns, eos=tokenizer.eos_token or SEP2), tokenizer, offsets=False)[0]
