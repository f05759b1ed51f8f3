"""The vicuna v1 template, assistant-only labels, prompts and the length guard's count."""

from __future__ import annotations

import functools

import pytest
import torch

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
    from dataengine.reader import LengthGuard

    guard = LengthGuard(tok, 10_000, render=functools.partial(conversation.render, eos=tok.eos_token),
                        count=lambda text: conversation.count_tokens(text, tok))
    sample = {"key": "k", "json": {"conversations": TWO_TURNS}, "feat": torch.zeros(24, 64, dtype=torch.float16)}
    ids, _ = conversation.tokenize(TWO_TURNS, tok)
    assert guard.tokens(sample) == conversation.spliced_length(len(ids), 1, 24)
