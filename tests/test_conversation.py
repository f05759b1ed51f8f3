"""Chat templates (vicuna v1, the tokenizer's own), assistant-only labels, prompts, the guard's count."""

from __future__ import annotations

import functools

import pytest
import torch
from checkpoints import write_tokenizer

from dataengine.models import load_tokenizer
from train import conversation
from train.conversation import IGNORE_INDEX

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the user's questions.")
TWO_TURNS = [
    {"from": "human", "value": "<video>\nWhat colour is the shape?"},
    {"from": "gpt", "value": "A red circle."},
    {"from": "human", "value": "Which direction does it move?"},
    {"from": "gpt", "value": "It moves left."},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def test_render_is_vicuna_v1():
    assert conversation.render(TWO_TURNS) == (
        SYSTEM + " USER: <video>\nWhat colour is the shape? ASSISTANT: A red circle.</s>"
        "USER: Which direction does it move? ASSISTANT: It moves left.</s>")
    # A conversation ending on a question is a generation prompt.
    assert conversation.render(TWO_TURNS[:1]) == SYSTEM + " USER: <video>\nWhat colour is the shape? ASSISTANT:"


def test_labels_cover_exactly_the_answers(tok):
    ids, labels = conversation.tokenize(TWO_TURNS, tok)
    assert len(ids) == len(labels)
    assert ids[0] == tok.bos_token_id
    assert ids.count(conversation.video_token_id(tok)) == 1
    targets = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    assert tok.decode(targets) == " A red circle.</s> It moves left.</s>"
    # Two separate target runs, each ending with EOS: the question in between is not a target.
    runs = "".join("T" if lab != IGNORE_INDEX else "." for lab in labels).split(".")
    assert len([r for r in runs if r]) == 2
    assert sum(1 for i, lab in zip(ids, labels) if lab == tok.eos_token_id) == 2


def test_prompt_is_the_prefix_the_model_was_trained_on(tok):
    ids, labels = conversation.tokenize(TWO_TURNS[:2], tok)
    prompt = conversation.prompt_ids("What colour is the shape?", tok)
    assert ids[:len(prompt)] == prompt
    assert all(lab == IGNORE_INDEX for lab in labels[:len(prompt)])
    assert tok.decode(prompt).endswith("ASSISTANT:")
    # The placeholder is added only once.
    assert conversation.prompt_ids("<video>\nWhat colour is the shape?", tok) == prompt


def test_truncation_keeps_the_video_and_fits(tok):
    ids, _ = conversation.tokenize(TWO_TURNS, tok)
    full = conversation.spliced_length(len(ids), 1, 24)
    cut_ids, cut_labels = conversation.tokenize(TWO_TURNS, tok, max_length=full - 5, feat_rows=24)
    assert cut_ids == ids[:len(ids) - 5] and len(cut_labels) == len(cut_ids)
    assert conversation.spliced_length(len(cut_ids), 1, 24) == full - 5
    with pytest.raises(ValueError, match="cannot hold the video"):
        conversation.tokenize(TWO_TURNS, tok, max_length=30, feat_rows=24)


@pytest.mark.parametrize("bad", [
    [],
    [{"from": "gpt", "value": "no question"}],
    [{"from": "human", "value": "q"}, {"from": "human", "value": "q again"}],
    [{"from": "human", "value": 3}],
    [{"speaker": "human", "value": "q"}],
])
def test_malformed_conversations_are_refused(bad, tok):
    with pytest.raises(ValueError):
        conversation.tokenize(bad, tok)


def test_length_guard_counts_what_the_trainer_feeds(tok):
    """The reader's guard, given this template and count, agrees with tokenize + splice."""
    from train.length import LengthGuard

    guard = LengthGuard(tok, 10_000, render=functools.partial(conversation.render, eos=tok.eos_token),
                        count=lambda text: conversation.count_tokens(text, tok))
    sample = {"key": "k", "json": {"conversations": TWO_TURNS}, "feat": torch.zeros(24, 64, dtype=torch.float16)}
    ids, _ = conversation.tokenize(TWO_TURNS, tok)
    assert guard.tokens(sample) == conversation.spliced_length(len(ids), 1, 24)


# ------------------------------------------------------------------ exact labels, hand-tokenized

@pytest.fixture(scope="module", params=["chatml", "llama3"])
def templated_tok(request, tmp_path_factory):
    """A real-shaped tokenizer with its own chat template (and <video> added, as models load it)."""
    return request.param, load_tokenizer(write_tokenizer(tmp_path_factory.mktemp(request.param), request.param))


def _by_hand(tokenizer, pieces, bos=None):
    """Expected (ids, labels) from (text, is_target) pieces, each tokenized on its own."""
    ids, labels = ([bos], [IGNORE_INDEX]) if bos is not None else ([], [])
    for text, target in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if target else [IGNORE_INDEX] * len(piece)
    return ids, labels


def test_vicuna_labels_equal_a_hand_tokenization(tok):
    expected = _by_hand(tok, [
        (SYSTEM + " USER: <video>\nWhat colour is the shape? ASSISTANT:", False), (" A red circle.", True),
        ("</s>", True), ("USER: Which direction does it move? ASSISTANT:", False), (" It moves left.", True),
        ("</s>", True)], bos=tok.bos_token_id)
    assert conversation.tokenize(TWO_TURNS, tok, template="vicuna_v1") == expected


def test_tokenizer_template_labels_equal_a_hand_tokenization(templated_tok):
    """Targets: exactly each answer's tokens and the template's end-of-turn token."""
    kind, tok = templated_tok
    if kind == "chatml":
        pieces = [("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<video>\n"
                   "What colour is the shape?<|im_end|>\n<|im_start|>assistant\n", False),
                  ("A red circle.", True), ("<|im_end|>", True),
                  ("\n<|im_start|>user\nWhich direction does it move?<|im_end|>\n<|im_start|>assistant\n", False),
                  ("It moves left.", True), ("<|im_end|>", True), ("\n", False)]
        end = "<|im_end|>"
    else:
        pieces = [("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<video>\nWhat colour is the "
                   "shape?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", False),
                  ("A red circle.", True), ("<|eot_id|>", True),
                  ("<|start_header_id|>user<|end_header_id|>\n\nWhich direction does it move?<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
                  ("It moves left.", True), ("<|eot_id|>", True)]
        end = "<|eot_id|>"
    chat = conversation.chat_template("tokenizer", tok)
    assert chat.end_of_turn == (end, tok.convert_tokens_to_ids(end))
    ids, labels = chat.tokenize(TWO_TURNS)
    assert (ids, labels) == _by_hand(tok, pieces)
    assert ids.count(tok.bos_token_id) == (kind == "llama3")  # the template writes BOS; none added twice
    assert ids.count(conversation.video_token_id(tok)) == 1
    # The generation prompt is the prefix the model was trained on, up to its first answer.
    prompt = chat.prompt_ids("What colour is the shape?")
    assert ids[:len(prompt)] == prompt and labels[len(prompt)] == ids[len(prompt)]
    assert all(lab == IGNORE_INDEX for lab in labels[:len(prompt)])
    assert chat.count_tokens(chat.render(TWO_TURNS)) == len(ids)


def test_vicuna_on_a_real_shaped_tokenizer_ends_turns_with_its_eos(templated_tok):
    _, tok = templated_tok
    chat = conversation.chat_template("vicuna_v1", tok)
    ids, labels = chat.tokenize(TWO_TURNS)
    assert chat.end_of_turn_id == tok.eos_token_id and ids[0] == tok.bos_token_id
    targets = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert targets.count(tok.eos_token_id) == 2 and targets[-1] == tok.eos_token_id


def test_tokenizer_template_needs_one(tok):
    with pytest.raises(ValueError, match="no chat_template"):
        conversation.chat_template("tokenizer", tok)
    with pytest.raises(ValueError, match="not one of"):
        conversation.chat_template("chatml", tok)
