"""The trainers' length rule: does a sample fit ``max_length`` once its video is spliced in?

Each ``<video>`` placeholder of the rendered conversation becomes as many video tokens as the
sample's ``feat`` has rows, so a conversation's text length says little; :class:`LengthGuard`
counts the real length from the sample alone (every rank decides the same) and skips the
sample or cuts its last answer to fit. Trainers hand ``guard.apply`` to
:class:`dataengine.reader.ShardReader` as its ``guard``: a skipped sample's slot is filled, so
every rank still yields the same count.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Callable, Literal, Sequence

log = logging.getLogger(__name__)


def _simple_render(conversations: Sequence[dict[str, Any]]) -> str:
    roles = {"human": "USER", "user": "USER", "gpt": "ASSISTANT", "assistant": "ASSISTANT"}
    return " ".join(f"{roles.get(t.get('from'), t.get('from'))}: {t.get('value', '')}" for t in conversations)


class LengthGuard:
    """Decides, from the sample alone (so every rank decides the same), whether a sample fits
    ``max_length`` once each ``<video>`` placeholder becomes ``feat`` rows of video tokens.

    ``tokens(sample)`` = tokens of the rendered conversation - placeholders x (tokens of one
    placeholder) + placeholders x video tokens (rows of ``feat``, or ``video_tokens``).
    ``apply(sample)`` returns the sample, a copy whose last answer is cut to fit
    (``policy="truncate"``), or None (``policy="skip"``, or when even an empty answer does
    not fit); :attr:`counts` says how many of each.

    ``render`` turns a conversation into the text the trainer tokenizes (pass the trainer's
    chat template); the default joins ``USER: ... ASSISTANT: ...``. ``count`` counts a
    text's tokens as the trainer does; the default is ``len(tokenizer(text).input_ids)``.
    """

    def __init__(self, tokenizer, max_length: int, *, render: Callable[[Sequence[dict]], str] | None = None,
                 count: Callable[[str], int] | None = None, video_token: str = "<video>",
                 video_tokens: int | None = None, policy: Literal["skip", "truncate"] = "skip"):
        if max_length < 1:
            raise ValueError("max_length must be >= 1")
        if policy not in ("skip", "truncate"):
            raise ValueError(f"policy must be skip|truncate, got {policy!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.render = render or _simple_render
        self.count = count or (lambda text: len(tokenizer(text)["input_ids"]))
        self.video_token = video_token
        self.video_tokens = video_tokens
        self.policy = policy
        self.placeholder_tokens = len(tokenizer(video_token, add_special_tokens=False)["input_ids"])
        self.counts = collections.Counter()

    def _rows(self, sample: dict[str, Any]) -> int:
        feat = sample.get("feat")
        if feat is not None:
            return int(feat.shape[0])
        if self.video_tokens is None:
            raise ValueError(f"sample {sample.get('key')!r} has no feat; pass video_tokens= to the guard")
        return self.video_tokens

    def _length(self, conversations: Sequence[dict[str, Any]], rows: int) -> int:
        text = self.render(conversations)
        placeholders = text.count(self.video_token)
        return self.count(text) - placeholders * self.placeholder_tokens + placeholders * rows

    def tokens(self, sample: dict[str, Any]) -> int:
        """The sequence length the model sees for this sample."""
        return self._length(sample["json"]["conversations"], self._rows(sample))

    def apply(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        rows = self._rows(sample)
        conversations = sample["json"]["conversations"]
        length = self._length(conversations, rows)
        if length <= self.max_length:
            self.counts["fit"] += 1
            return sample
        if self.policy == "truncate":
            cut = self._truncate(conversations, rows)
            if cut is not None:
                self.counts["truncated"] += 1
                data = dict(sample["json"], conversations=cut, truncated_from_tokens=length)
                return dict(sample, json=data)
        self.counts["dropped"] += 1
        log.info("length guard: dropping %s (%d tokens > %d)", sample.get("key"), length, self.max_length)
        return None

    def _truncate(self, conversations: Sequence[dict[str, Any]], rows: int) -> list[dict[str, Any]] | None:
        """The conversation with its last answer cut to the longest prefix (in tokens) that
        fits, or None when no prefix fits."""
        last = max((k for k, t in enumerate(conversations) if t.get("from") in ("gpt", "assistant")),
                   default=None)
        if last is None:
            return None
        ids = self.tokenizer(conversations[last]["value"], add_special_tokens=False)["input_ids"]

        def with_answer(n: int) -> list[dict[str, Any]]:
            turns = [dict(t) for t in conversations[:last + 1]]
            turns[last]["value"] = self.tokenizer.decode(ids[:n], skip_special_tokens=True)
            return turns

        lo, hi = 0, len(ids)  # invariant: the answer cut to lo tokens fits, to hi+1 does not
        if self._length(with_answer(0), rows) > self.max_length:
            return None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._length(with_answer(mid), rows) <= self.max_length:
                lo = mid
            else:
                hi = mid - 1
        return with_answer(lo)
