"""The evaluation metrics of train/metrics.py against cases worked out by hand."""

import numpy as np
import pytest

from train import metrics
from train.metrics import QAVerdict


# ----------------------------------------------------------------------------- judge replies

@pytest.mark.parametrize("reply, expected", [
    ('{"pred": "yes", "score": 4}', QAVerdict("yes", 4.0)),
    ("{'pred': 'no', 'score': 1}", QAVerdict("no", 1.0)),  # the Python-dict form older judges write
    ('Sure! ```json\n{"pred": "Yes", "score": "5"}\n```', QAVerdict("yes", 5.0)),
    ('{"Pred": "no", "Score": 0}', QAVerdict("no", 0.0)),
    ('{"pred": true, "score": 2.5}', QAVerdict("yes", 2.5)),
    ("Yes, it matches. Score: 3", QAVerdict("yes", 3.0)),
    ("No. score = 0", QAVerdict("no", 0.0)),
])
def test_parse_qa_verdict_reads_the_forms_judges_write(reply, expected):
    assert metrics.parse_qa_verdict(reply) == expected


@pytest.mark.parametrize("reply", [
    '{"pred": "maybe", "score": 3}',   # pred not yes/no
    '{"pred": "yes", "score": 7}',     # score out of 0-5
    '{"pred": "yes", "score": -1}',
    '{"pred": "yes"}',                 # no score
    '{"pred": "yes", "score": true}',  # a boolean is not a score
    "I cannot tell.",
    "",
])
def test_parse_qa_verdict_rejects_incomplete_replies(reply):
    assert metrics.parse_qa_verdict(reply) is None


@pytest.mark.parametrize("reply, expected", [
    ('{"score": 4}', 4.0), ("{'score': '3'}", 3.0), ('{"score": "4/5"}', 4.0), ("Score: 2.5", 2.5),
    ('the answer is fine {"score": 5} overall', 5.0), ('{"score": 6}', None), ('{"score": "high"}', None),
    ("no score here", None), ('{"reason": "x"} Score: 1', 1.0),
])
def test_parse_score(reply, expected):
    assert metrics.parse_score(reply) == expected


def test_qa_summary_counts_unparsed_and_leaves_them_out_of_the_means():
    verdicts = [QAVerdict("yes", 4), QAVerdict("no", 2), None, QAVerdict("yes", 5)]
    # accuracy: 2 yes of 3 read; mean score (4 + 2 + 5) / 3 = 11/3
    assert metrics.qa_summary(verdicts) == {"accuracy": pytest.approx(2 / 3), "mean_score": pytest.approx(11 / 3),
                                            "judged": 3, "unparsed": 1}
    assert metrics.qa_summary([None]) == {"accuracy": None, "mean_score": None, "judged": 0, "unparsed": 1}


def test_score_summary():
    assert metrics.score_summary([3.0, None, 4.0, 2.0]) == {"mean_score": 3.0, "judged": 3, "unparsed": 1}
    assert metrics.score_summary([]) == {"mean_score": None, "judged": 0, "unparsed": 0}


# ----------------------------------------------------------------------------- rankings

def test_target_ranks_counts_ties_against_the_target():
    sim = np.array([[0.2, 0.9, 0.5],    # target 2: only 0.9 is higher -> rank 1
                    [0.5, 0.5, 0.1],    # target 0: tied with column 1 -> rank 1
                    [0.3, 0.1, 0.2],    # target 0: best -> rank 0
                    [0.7, 0.7, 0.7]])   # all tied: target 1 -> rank 2
    assert metrics.target_ranks(sim, [2, 0, 0, 1]).tolist() == [1, 1, 0, 2]


def test_recall_at_k_hand_computed():
    # 4 captions (rows) x 3 videos; ranks of the right video: 0, 2, 1, 0.
    sim = np.array([[0.9, 0.1, 0.2],
                    [0.8, 0.7, 0.6],
                    [0.1, 0.3, 0.2],
                    [0.0, 0.1, 0.5]])
    targets = [0, 2, 2, 2]
    assert metrics.target_ranks(sim, targets).tolist() == [0, 2, 1, 0]
    assert metrics.recall_at_k(sim, targets, ks=(1, 2, 5)) == {1: 0.5, 2: 0.75, 5: 1.0}


def test_identical_descriptions_retrieve_nothing():
    sim = np.full((3, 3), 0.4)  # a model that says the same thing about every video
    assert metrics.recall_at_k(sim, [0, 1, 2], ks=(1,)) == {1: 0.0}


def test_topk_accuracy_hand_computed():
    # 3 samples x 6 classes.
    sim = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6],    # label 5: top-1
                    [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],    # label 4: rank 4 -> in top-5, not top-1
                    [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])   # label 5: rank 5 -> neither
    assert metrics.topk_accuracy(sim, [5, 4, 5], ks=(1, 5)) == {1: pytest.approx(1 / 3), 5: pytest.approx(2 / 3)}


def test_rankings_check_shapes():
    with pytest.raises(ValueError, match="targets"):
        metrics.target_ranks(np.zeros((2, 3)), [0, 3])
    with pytest.raises(ValueError, match="does not match"):
        metrics.target_ranks(np.zeros((2, 3)), [0])


# ----------------------------------------------------------------------------- synthetic world

def test_mentions_folds_plurals_and_digits():
    found = metrics.mentions("Two red circles move LEFT, then 3 squares go up.")
    assert found == {"colour": {"red"}, "shape": {"circle", "square"}, "direction": {"left", "up"},
                     "count": {"two", "three"}}


def test_events_in_order_ignoring_articles_and_sizes():
    text = ("First a red circle moves left, then the large red circle grows while the blue square "
            "stays still, and at the end a green triangle disappears.")
    assert metrics.events(text) == [("red", "circle", "moves", "left"), ("red", "circle", "grows", ""),
                                    ("green", "triangle", "disappears", "")]


@pytest.mark.parametrize("qtype, prediction, reference, correct", [
    ("colour", "red", "red", True),
    ("colour", "The shape is red.", "red", True),
    ("colour", "red or blue", "red", False),        # hedging names a wrong colour too
    ("colour", "a circle", "red", False),           # no colour at all
    ("shape", "Circles.", "circle", True),
    ("direction", "It moves up.", "up", True),
    ("direction", "left", "right", False),
    ("count", "3", "three", True),
    ("count", "two", "three", False),
    ("object", "The blue square moves.", "the blue square", True),
    ("object", "the blue circle", "the blue square", False),
    ("event", "The blue square shrinks.", "the blue square shrinks", True),
    ("event", "the blue square grows", "the blue square shrinks", False),
    ("order", "First a red circle moves left, then a blue square moves up, and at the end the blue square shrinks.",
     "First a red circle moves left, then a blue square moves up, and at the end the blue square shrinks.", True),
    ("order", "First a blue square moves up, then a red circle moves left, and at the end the blue square shrinks.",
     "First a red circle moves left, then a blue square moves up, and at the end the blue square shrinks.", False),
    ("mystery", "Hello, World!", "hello world", True),   # unknown type: normalised text
    ("colour", "red", "no colour in this reference", False),  # nothing to compare never counts as right
])
def test_answer_correct(qtype, prediction, reference, correct):
    assert metrics.answer_correct(qtype, prediction, reference) is correct


def test_event_f1_partial_credit():
    reference = "First a red circle moves left, then a blue square moves up, and at the end the blue square shrinks."
    # Two of three right and one wrong: precision 2/3, recall 2/3 -> F1 2/3.
    prediction = "A red circle moves left. A blue square moves up. The blue square grows."
    assert metrics.event_f1(prediction, reference) == pytest.approx(2 / 3)
    # One right, nothing wrong: precision 1, recall 1/3 -> F1 = 2 * 1/3 / (4/3) = 0.5.
    assert metrics.event_f1("a red circle moves left", reference) == pytest.approx(0.5)
    assert metrics.event_f1("nothing happens", reference) == 0.0
    assert metrics.event_f1("a red circle moves left", "no events here") is None


TRUTH = {
    "video_id": "vid_x",
    "objects": [{"object": 0, "shape": "square", "colour": "red", "first_segment": 0},
                {"object": 1, "shape": "triangle", "colour": "white", "first_segment": 1}],
    "segments": [{"event": {"kind": "moves", "object": 0, "new": True, "direction": "up"}},
                 {"event": {"kind": "moves", "object": 1, "new": True, "direction": "left"}},
                 {"event": {"kind": "grows", "object": 0, "new": False}}],
}


def test_video_vocabulary_and_groundedness():
    vocabulary = metrics.video_vocabulary(TRUTH)
    assert vocabulary == {"colour": {"red", "white"}, "shape": {"square", "triangle"}, "direction": {"up", "left"}}
    # red (yes), circle (no), up (yes): 2 of 3.
    assert metrics.groundedness("a red circle moves up", vocabulary) == (2, 3)
    # Distinct mentions: "red" twice counts once; counts and unknown words are not rated.
    assert metrics.groundedness("The red square and the red triangle; three shapes.", vocabulary) == (3, 3)
    assert metrics.groundedness("nothing to see", vocabulary) == (0, 0)
    with pytest.raises(ValueError, match="vid_b"):
        metrics.video_vocabulary({"video_id": "vid_b", "broken": "empty"})


def test_ratio():
    assert metrics.ratio(1, 4) == 0.25
    assert metrics.ratio(0, 0) is None
