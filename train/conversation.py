"""Chat templates, tokenization with assistant-only labels, prompts.

A sample's ``conversations`` is a list of turns ``{"from": "human"|"gpt", "value": str}``;
the first human turn holds the ``<video>`` placeholder. A model renders it with one of two
templates (``ModelSettings.template``, saved with the model, so every stage that loads the
model uses the template it was trained with):

``vicuna_v1`` (the default; LLaVA-1.5/Vicuna, LLaVA's ``conv_vicuna_v1``: separators ``" "``
and the tokenizer's EOS)::

    {SYSTEM} USER: <video>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

``tokenizer``: the checkpoint's own chat template (``tokenizer.apply_chat_template``; Llama-3,
Qwen2, Mistral, SmolLM2 carry one), with roles ``user``/``assistant`` and no system turn
(the template adds its default one, if any).

``ChatTemplate.tokenize`` tokenizes the whole rendered string once (so token boundaries are
the ones the model sees at inference) and marks as targets exactly the tokens that fall
inside each assistant span: the answer and the token that ends the assistant's turn
(`` {answer}</s>`` in vicuna v1, ``{answer}<|im_end|>`` in ChatML); every other token gets
``IGNORE_INDEX``. That end-of-turn token is where generation stops
(``ChatTemplate.end_of_turn_id``). The ``<video>`` placeholder stays one token id; the
model replaces it by the projected video features (``train.model.VideoLMM.splice``), so
the length the model sees is ``len(input_ids) - videos + videos * feat_rows``
(:func:`spliced_length`). No token id is hard-coded: BOS, EOS and ``<video>`` come from the
tokenizer.
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


def spliced_length(num_tokens: int, num_videos: int, feat_rows: int) -> int:
    """Sequence length once each of ``num_videos`` placeholders becomes ``feat_rows`` rows."""
    return num_tokens - num_videos + num_videos * feat_rows


def _as_prompt(question: str, history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``history`` + the question as a human turn, ``<video>`` put in front unless one is there."""
    turns = list(history)
    has_video = any(VIDEO_TOKEN in t.get("value", "") for t in turns) or VIDEO_TOKEN in question
    if not has_video:
        question = f"{VIDEO_TOKEN}\n{question}"
    turns.append({"from": "human", "value": question})
    return turns


class ChatTemplate:
    """How one tokenizer's conversations become token ids, and which ids are targets.

    Subclasses say how a conversation renders (``render_spans``), whether the tokenizer's
    BOS is put in front of the text (``add_bos``; a chat template writes its own) and which
    token ends an assistant turn (``end_of_turn_id``).
    """

    name = ""
    add_bos = True

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("chat templates need a fast tokenizer (offsets mapping); load it with "
                            "dataengine.models.load_tokenizer")
        self.tokenizer = tokenizer

    def render_spans(self, conversations: Sequence[dict[str, Any]]) -> Rendered:
        raise NotImplementedError

    @property
    def end_of_turn_id(self) -> int:
        raise NotImplementedError

    def render(self, conversations: Sequence[dict[str, Any]]) -> str:
        """The text of a conversation (one ending on a human turn renders as a prompt)."""
        return self.render_spans(conversations).text

    def encode(self, text: str, offsets: bool = False):
        """``(ids, character offsets or None)`` of a rendered text, BOS first when ``add_bos``."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)
        ids = list(enc["input_ids"])
        bos = self.tokenizer.bos_token_id if self.add_bos else None
        if bos is not None:
            ids = [bos] + ids
        if not offsets:
            return ids, None
        return ids, [(-1, -1)] * (bos is not None) + [tuple(o) for o in enc["offset_mapping"]]

    def count_tokens(self, text: str) -> int:
        """Tokens of a rendered text as :meth:`tokenize` counts them (what the length guard uses)."""
        return len(self.encode(text)[0])

    def tokenize(self, conversations: Sequence[dict[str, Any]], *, max_length: int | None = None,
                 feat_rows: int = 0) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of a conversation; labels are ``IGNORE_INDEX`` outside answers.

        With ``max_length``, the tail is cut so that the spliced length (each ``<video>``
        token counted as ``feat_rows`` rows) fits; a cut that would remove a ``<video>``
        token is an error, since a sample without its video is not the sample any more.
        """
        rendered = self.render_spans(conversations)
        ids, offsets = self.encode(rendered.text, offsets=True)
        labels = [IGNORE_INDEX] * len(ids)
        for i, (start, end) in enumerate(offsets):
            if start >= 0 and end > start and any(s <= start < e for s, e in rendered.target_spans):
                labels[i] = ids[i]
        if max_length is not None:
            vid = video_token_id(self.tokenizer)
            videos = ids.count(vid)
            if spliced_length(len(ids), videos, feat_rows) > max_length:
                keep = max_length - videos * (feat_rows - 1)
                if keep <= 0 or ids[keep:].count(vid):
                    raise ValueError(f"max_length {max_length} cannot hold the video ({videos} x "
                                     f"{feat_rows} rows) of this conversation")
                ids, labels = ids[:keep], labels[:keep]
        return ids, labels

    def prompt_ids(self, question: str, *, history: Sequence[dict[str, Any]] = ()) -> list[int]:
        """Token ids of a generation prompt (ending where the assistant's answer starts).

        ``question`` gets the ``<video>`` placeholder in front unless it (or ``history``)
        already has one; ``history`` is earlier turns of the same conversation.
        """
        return self.encode(self.render(_as_prompt(question, history)))[0]


class VicunaV1(ChatTemplate):
    """LLaVA-1.5's vicuna v1 template, the turn ended by the tokenizer's EOS."""

    name = "vicuna_v1"

    def render_spans(self, conversations: Sequence[dict[str, Any]]) -> Rendered:
        return render_spans(conversations, eos=self.tokenizer.eos_token or SEP2)

    @property
    def end_of_turn_id(self) -> int:
        return int(self.tokenizer.eos_token_id)


class TokenizerTemplate(ChatTemplate):
    """The tokenizer's own chat template (``apply_chat_template``).

    An assistant span is the text that rendering the conversation up to that answer adds
    to the rendering up to its generation prompt, cut after the template's end-of-turn
    token (the special token the template writes right after an answer; found by rendering
    a probe conversation, never hard-coded). A template that renders earlier turns
    differently once later ones follow has no such spans and is refused.
    """

    name = "tokenizer"
    add_bos = False

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"template 'tokenizer': the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} "
                             "has no chat_template (use template: vicuna_v1)")
        self._end: tuple[str, int] | None = None

    def _apply(self, turns: Sequence[dict[str, Any]], generation_prompt: bool) -> str:
        messages = [{"role": "user" if ROLES[t["from"]] == USER else "assistant", "content": t["value"]}
                    for t in turns]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    @property
    def end_of_turn(self) -> tuple[str, int]:
        """(text, id) of the token the template writes after an assistant's answer."""
        if self._end is None:
            probe = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yes"}]
            prompt, full = self._apply(probe[:1], True), self._apply(probe, False)
            after = full[len(prompt):]
            if not full.startswith(prompt) or "Yes" not in after:
                raise ValueError("template 'tokenizer': the chat template does not render an answer after its "
                                 "generation prompt; cannot find assistant spans (use template: vicuna_v1)")
            rest = after[after.index("Yes") + 3:]
            ids = self.tokenizer(rest, add_special_tokens=False)["input_ids"]
            added = self.tokenizer.added_tokens_decoder
            if not ids or ids[0] not in added or not added[ids[0]].special:
                raise ValueError(f"template 'tokenizer': the chat template ends an answer with {rest!r}, which does "
                                 "not start with a special token; cannot tell where the answer ends")
            self._end = (added[ids[0]].content, int(ids[0]))
        return self._end

    @property
    def end_of_turn_id(self) -> int:
        return self.end_of_turn[1]

    def render_spans(self, conversations: Sequence[dict[str, Any]]) -> Rendered:
        turns = _turns(conversations)
        convs = list(conversations)
        text = self._apply(convs, generation_prompt=turns[-1][0] == USER)
        end_text = self.end_of_turn[0]
        spans = []
        for i, (role, _) in enumerate(turns):
            if role != ASSISTANT:
                continue
            before, upto = self._apply(convs[:i], True), self._apply(convs[:i + 1], False)
            if not upto.startswith(before) or not text.startswith(upto):
                raise ValueError("template 'tokenizer': the chat template renders earlier turns differently once "
                                 f"later turns follow (turn {i}); assistant spans are not defined "
                                 "(use template: vicuna_v1)")
            end = upto.rfind(end_text)
            if end < len(before):
                raise ValueError(f"template 'tokenizer': turn {i} does not end with {end_text!r}")
            spans.append((len(before), end + len(end_text)))
        return Rendered(text=text, target_spans=tuple(spans))


TEMPLATES = {VicunaV1.name: VicunaV1, TokenizerTemplate.name: TokenizerTemplate}
DEFAULT_TEMPLATE = VicunaV1.name


def chat_template(name: str, tokenizer) -> ChatTemplate:
    """The named template (``vicuna_v1`` or ``tokenizer``) for ``tokenizer``."""
    if name not in TEMPLATES:
        raise ValueError(f"template {name!r} is not one of {sorted(TEMPLATES)}")
    return TEMPLATES[name](tokenizer)


# The module-level forms below take the template by name (vicuna v1 unless told).

def count_tokens(text: str, tokenizer, *, template: str = DEFAULT_TEMPLATE) -> int:
    """Tokens of a rendered text as :func:`tokenize` counts them (BOS included where added)."""
    return chat_template(template, tokenizer).count_tokens(text)


def tokenize(conversations: Sequence[dict[str, Any]], tokenizer, *, max_length: int | None = None,
             feat_rows: int = 0, template: str = DEFAULT_TEMPLATE) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a conversation: :meth:`ChatTemplate.tokenize`."""
    return chat_template(template, tokenizer).tokenize(conversations, max_length=max_length, feat_rows=feat_rows)


def prompt_ids(question: str, tokenizer, *, history: Sequence[dict[str, Any]] = (),
               template: str = DEFAULT_TEMPLATE) -> list[int]:
    """Token ids of a generation prompt: :meth:`ChatTemplate.prompt_ids`."""
    return chat_template(template, tokenizer).prompt_ids(question, history=history)
