"""`vlmr judge`: debiased verdicts (swap logic), correct preferences end to end against the
synthetic world's ground truth, resampling of identical/empty pairs, context modes, exact
resume after a kill, the CLI on the tiny SFT model, and 2 ranks under torchrun.

    .venv/bin/python -m pytest -q tests/test_judge.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataengine import schema, synth
from dataengine.config import parse_config
from dataengine.inspection import open_shard_set
from dataengine.verify import verify
from judge_fixtures import ClipSignatureCaptioner, InjectedKill, PositionJudge, TruthJudge, TruthSampler, \
    run_both, shared_prompt_shards, shared_sft_model
from train import judge, narrate
from train.judge import Response
from train.shardpass import read_set

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prompt_shards(synth_world, tmp_path_factory) -> Path:
    return shared_prompt_shards(tmp_path_factory, synth_world)


@pytest.fixture(scope="module")
def narrated(prompt_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("judge_narrated") / "set"
    narrate.run(narrate.NarrateConfig(model="test-fixture", input=str(prompt_shards), out=str(out),
                                      samples_per_shard=8, progress=False), captioner=ClipSignatureCaptioner())
    return out


@pytest.fixture(scope="module")
def captions(synth_world):
    return synth.load_captions(synth_world)


def config(source: Path, out: Path, **overrides) -> judge.JudgeConfig:
    settings = dict(model="test-fixture", input=str(source), out=str(out), context="clips", samples_per_shard=7,
                    batch_size=4, progress=False)
    return judge.JudgeConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def truth_pairs(narrated, captions, tmp_path_factory):
    out = tmp_path_factory.mktemp("truth_pairs") / "pairs"
    sampler, truth_judge = TruthSampler(captions), TruthJudge(captions)
    summary = judge.run(config(narrated, out), sampler=sampler, judge=truth_judge)
    return out, sampler, truth_judge, summary


def shard_list(folder: Path) -> list[tuple[str, str, str, int]]:
    manifest = schema.Manifest.load(folder)
    return [(st.name, s.url, s.sha256, s.samples) for st in manifest.stages for s in st.shards]


# ------------------------------------------------------------------------------ the verdict

def test_decide_combines_both_orders():
    v = judge.decide(0.8, 0.3)  # both asks favour response 1: (0.8 + 0.7) / 2 = 0.75
    assert v.first_is_better and v.agree and v.margin == pytest.approx(0.5) and v.p_chosen == pytest.approx(0.75)
    v = judge.decide(0.2, 0.9)  # both favour response 2
    assert not v.first_is_better and v.agree and v.margin == pytest.approx(0.7) and v.p_chosen == pytest.approx(0.85)
    v = judge.decide(0.9, 0.9)  # always "A": pure position bias
    assert not v.agree and v.margin == 0.0 and v.p_chosen == 0.5
    v = judge.decide(0.9, 0.6)  # disagree, leaning to response 1: (0.9 + 0.4) / 2 = 0.65
    assert v.first_is_better and not v.agree and v.p_chosen == pytest.approx(0.65)
    assert not judge.decide(0.5, 0.2).agree  # a coin toss in one order is no agreement
    with pytest.raises(ValueError):
        judge.decide(1.2, 0.5)


def test_judge_prompt_and_question_text():
    template = narrate.load_prompt(judge.DEFAULT_QUESTION, required=("question", "answer_a", "answer_b"),
                                   allowed=("rules", "context"))
    turns = judge.prompt_turns([{"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "x"},
                                {"from": "human", "value": "And then?"}, {"from": "gpt", "value": "y"}])
    assert [t["value"] for t in turns] == ["<video>\nWhat moves?", "x", "And then?"]
    assert judge.question_text(turns) == "USER: What moves?\nASSISTANT: x\nAnd then?"
    with_context = judge.judge_text(template, rules="RULES", context="a red circle", question="Q?", answer_a="one",
                                    answer_b="two")
    assert "RULES" in with_context and "Description of the video: a red circle" in with_context
    assert "Answer A: one" in with_context and "Answer B: two" in with_context and "$" not in with_context
    without = judge.judge_text(template, rules="RULES", context="", question="Q?", answer_a="one", answer_b="two")
    assert "Description" not in without and "Answer B: two" in without
    with pytest.raises(ValueError, match="no human turn"):
        judge.prompt_turns([{"from": "gpt", "value": "x"}])


# ------------------------------------------------------------------------------ end to end

def test_ground_truth_judge_prefers_the_true_answer_end_to_end(truth_pairs, narrated):
    out, sampler, truth_judge, summary = truth_pairs
    inputs = read_set(narrated, fields=("json", "feat"))
    pairs = read_set(out, fields=("json", "feat"))
    assert summary.outcomes == {"kept": len(inputs)}
    assert [p["key"] for p in pairs] == [s["key"] for s in inputs]
    first_positions = set()
    for src, pair in zip(inputs, pairs):
        data = pair["json"]
        assert data["chosen"] == sampler.truthful[src["key"]]  # the true description wins
        assert data["rejected"] != data["chosen"]
        j = data["judge"]
        assert j["agree"] and j["margin"] > 0 and "soft_label" not in j
        assert j["context"] == "clips" and j["model"] == TruthJudge.name and j["sampler"] == TruthSampler.name
        first_positions.add(j["chosen_is_first"])
        assert data["narrative"] == src["json"]["narrative"]
        assert data["conversations"] == [src["json"]["conversations"][0]]  # the prompt: the human turn
        assert data["reference"] == src["json"]["conversations"][1]["value"]
        assert data["stage"] == "pairs" and data["prompt_stage"] == src["stage"]
        assert data["id"] == src["json"]["id"] and data["video_id"] == src["json"]["video_id"]
        assert torch.equal(pair["feat"], src["feat"])
    assert first_positions == {True, False}  # the true answer was sampled in both positions
    # every comparison was asked in both orders, with the narrative as context
    assert len(truth_judge.seen) == 2 * len(inputs)
    assert {c.context for c in truth_judge.seen} == {s["json"]["narrative"] for s in inputs}
    manifest = schema.Manifest.load(out)
    assert [s.name for s in manifest.stages] == ["pairs"] and manifest.samples == len(inputs)
    assert manifest.derived_from == str(narrated / "manifest.json")
    assert manifest.settings["command"] == "judge" and manifest.settings["context"] == "clips"
    result = verify(open_shard_set(out))
    assert result.ok, result.problems


def test_a_position_biased_judge_is_dropped_not_learned(narrated, captions, tmp_path):
    summary = judge.run(config(narrated, tmp_path / "drop", stages=["hard"]), sampler=TruthSampler(captions),
                        judge=PositionJudge())
    hard = schema.Manifest.load(narrated).stage("hard").samples
    assert summary.outcomes == {"dropped_disagreement": hard} and summary.samples_out == 0
    lines = [json.loads(x) for x in (tmp_path / "drop" / "failures.jsonl").read_text().splitlines()]
    assert len(lines) == hard and {x["reason"] for x in lines} == {"dropped_disagreement"}
    # a dropped pair keeps what the judge said, so agreement and mass can be measured over all pairs
    assert all(x["p_a_first"] == x["p_a_swapped"] == pytest.approx(0.9) for x in lines)
    assert schema.Manifest.load(tmp_path / "drop").failures == hard

    summary = judge.run(config(narrated, tmp_path / "soft", stages=["hard"], disagreement="soft"),
                        sampler=TruthSampler(captions), judge=PositionJudge())
    assert summary.outcomes == {"kept_soft": hard}
    for pair in read_set(tmp_path / "soft", fields=("json",)):
        j = pair["json"]["judge"]
        assert not j["agree"] and j["margin"] == 0 and j["soft_label"] == 0.5  # no signal, and it says so


class ScriptedSampler:
    """Per key (by its position in the stream, mod 3): identical on the first attempt then
    distinct; always identical; always empty."""

    name = "test:scripted"

    def __init__(self, order: dict[str, int]):
        self.order = order
        self.attempts: dict[str, int] = {}

    def sample(self, samples, prompts, seed):
        out = []
        for s in samples:
            attempt = self.attempts[s["key"]] = self.attempts.get(s["key"], 0) + 1
            kind = self.order[s["key"]] % 3
            if kind == 0:
                out.append((Response("a red circle"), Response("a red  circle" if attempt == 1 else "a blue square")))
            elif kind == 1:
                out.append((Response("same"), Response(" same ")))
            else:
                out.append((Response("something"), Response("")))
        return out


class BlueJudge:
    """Prefers the answer that says 'blue'."""

    name = "test:blue"

    def prefer(self, comparisons):
        return [0.9 if "blue" in c.answer_a else 0.1 if "blue" in c.answer_b else 0.5 for c in comparisons]


def test_identical_and_empty_pairs_are_resampled_then_dropped(narrated, tmp_path):
    keys = [s["key"] for s in read_set(narrated, fields=("json",))]
    sampler = ScriptedSampler({k: i for i, k in enumerate(keys)})
    summary = judge.run(config(narrated, tmp_path / "out", max_resample=2), sampler=sampler, judge=BlueJudge())
    kinds = [i % 3 for i in range(len(keys))]
    assert summary.outcomes == {"kept": kinds.count(0), "dropped_identical": kinds.count(1),
                                "dropped_empty": kinds.count(2)}
    assert {sampler.attempts[k] for i, k in enumerate(keys) if i % 3 == 0} == {2}
    assert {sampler.attempts[k] for i, k in enumerate(keys) if i % 3} == {3}  # 1 + max_resample
    assert summary.extras["pairs re-sampled"] == kinds.count(0) + 2 * (kinds.count(1) + kinds.count(2))
    for pair in read_set(tmp_path / "out", fields=("json",)):
        assert pair["json"]["responses"]["attempts"] == 2
        assert (pair["json"]["chosen"], pair["json"]["rejected"]) == ("a blue square", "a red circle")
    reasons = [json.loads(x)["reason"] for x in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert sorted(reasons) == sorted(["dropped_identical"] * kinds.count(1) + ["dropped_empty"] * kinds.count(2))


class TooLongSampler:
    name = "test:too-long"

    def sample(self, samples, prompts, seed):
        return [None] * len(samples)


def test_prompts_that_do_not_fit_are_counted_too_long(narrated, tmp_path):
    summary = judge.run(config(narrated, tmp_path / "out", stages=["hard"]), sampler=TooLongSampler(),
                        judge=BlueJudge())
    assert summary.outcomes == {"too_long": schema.Manifest.load(narrated).stage("hard").samples}
    lines = [json.loads(x) for x in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert {x["reason"] for x in lines} == {"too_long"} and all(x["id"] and x["video_id"] for x in lines)


class RecordingJudge(TruthJudge):
    name = "test:recording"


def test_context_modes_and_a_missing_narrative(narrated, prompt_shards, captions, tmp_path):
    inputs = {s["key"]: s["json"] for s in read_set(narrated, fields=("json",))}
    for mode, field in (("none", None), ("video", "narrative_video"), ("clips", "narrative")):
        recorder = RecordingJudge(captions)
        judge.run(config(narrated, tmp_path / mode, context=mode, stages=["hard"]), sampler=TruthSampler(captions),
                  judge=recorder)
        for c in recorder.seen:
            assert c.context == (inputs[c.sample["key"]][field] if field else "")
        for pair in read_set(tmp_path / mode, fields=("json",)):
            assert pair["json"]["judge"]["context"] == mode
    with pytest.raises(ValueError, match=r"key '.*': --context clips needs the json field 'narrative': "
                                         r"run `vlmr narrate`"):
        judge.run(config(prompt_shards, tmp_path / "raw"), sampler=TruthSampler(captions), judge=TruthJudge(captions))
    summary = judge.run(config(prompt_shards, tmp_path / "raw_skip", on_error="skip", stages=["hard"]),
                        sampler=TruthSampler(captions), judge=TruthJudge(captions))
    assert summary.outcomes == {"bad_sample": schema.Manifest.load(prompt_shards).stage("hard").samples}


# ------------------------------------------------------------------------------ resume

def test_resume_after_a_kill_loses_and_duplicates_nothing(narrated, captions, truth_pairs, tmp_path):
    reference = truth_pairs[0]
    out = tmp_path / "pairs"

    def stop_after_two(unit, record):
        if unit.index == 1:
            raise InjectedKill("killed after 2 shards")

    with pytest.raises(InjectedKill):
        judge.run(config(narrated, out), sampler=TruthSampler(captions), judge=TruthJudge(captions),
                  after_unit=stop_after_two)
    assert not (out / "manifest.json").exists()
    (out / ".progress" / "unit-000001.json").unlink()  # killed between the tar's rename and its record
    (out / ".pairs-000002.tar.x1y2z3.tmp").write_bytes(b"partial")  # killed while writing
    sampler = TruthSampler(captions)
    summary = judge.run(config(narrated, out), sampler=sampler, judge=TruthJudge(captions))
    assert summary.units_resumed == 1
    # the order of each pair comes from seeds of the unit's keys: the same pairs, byte for byte
    assert shard_list(out) == shard_list(reference)
    keys = [p["key"] for p in read_set(out, fields=("json",))]
    assert len(keys) == len(set(keys)) == schema.Manifest.load(narrated).samples
    assert not list(out.glob(".*.tmp"))


# ------------------------------------------------------------------------------ the tiny model

@pytest.mark.slow
def test_cli_with_the_tiny_sft_model_as_sampler_and_judge(narrated, tmp_path_factory, tmp_path, capsys, one_thread):
    from tools.cli import main
    from train.model import VideoLMM

    model_dir = shared_sft_model(tmp_path_factory)
    out = tmp_path / "pairs"
    argv = ["judge", "--model", str(model_dir), "--in", str(narrated), "--out", str(out), "--stages", "hard",
            "--context", "clips", "--max-new-tokens", "4", "--batch-size", "16", "--samples-per-shard", "16",
            "--disagreement", "soft", "--no-progress"]
    assert main(argv) == 0
    assert "samples:" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    hard = schema.Manifest.load(narrated).stage("hard").samples
    assert sum(summary["outcomes"].values()) == hard
    assert summary["samples_out"] + schema.Manifest.load(out).failures == hard
    for pair in read_set(out, fields=("json",)):
        data, j = pair["json"], pair["json"]["judge"]
        assert 0 <= j["p_a_first"] <= 1 and 0 <= j["p_a_swapped"] <= 1
        assert all(0 <= m <= 1 for m in j["ab_mass"])
        verdict = judge.decide(j["p_a_first"], j["p_a_swapped"])
        assert (verdict.agree, verdict.first_is_better) == (j["agree"], j["chosen_is_first"])
        assert j["model"] == str(model_dir.resolve()) and data["chosen"] != data["rejected"]
        assert ("soft_label" in j) == (not j["agree"])

    model = VideoLMM.load(model_dir).eval()
    a_id, b_id = judge.choice_token_ids(model.chat)
    assert model.tokenizer.decode([a_id]).strip() == "A" and model.tokenizer.decode([b_id]).strip() == "B"
    template = narrate.load_prompt(judge.DEFAULT_QUESTION, required=("question", "answer_a", "answer_b"),
                                   allowed=("rules", "context"))
    sample = read_set(narrated, fields=("json", "feat"))[0]
    comparison = judge.Comparison(sample, "What moves?", "a red circle", "a blue square", "ctx")
    short = judge.ModelJudge(model, template=template, rules="r", max_length=20, batch_rows=2, name="m")
    assert short.prefer([comparison]) == [None]  # does not fit: too long, never truncated
    sampler = judge.ModelSampler(model, temperature=1.0, top_p=0.9, max_new_tokens=8, max_length=30, name="m")
    assert sampler.sample([sample], [judge.prompt_turns(sample["json"]["conversations"])], seed=0) == [None]
    full = judge.ModelJudge(model, template=template, rules="r", max_length=1024, batch_rows=2, name="m")
    (p,) = full.prefer([comparison])
    # the probability is the one a plain forward of the same prompt gives
    text = judge.judge_text(template, rules="r", context="ctx", question="What moves?", answer_a="a red circle",
                            answer_b="a blue square")
    ids = torch.tensor([model.chat.prompt_ids(text)])
    with torch.no_grad():
        logits = model(ids, sample["feat"][None]).logits[0, -1]
    assert p == pytest.approx(float(torch.sigmoid(logits[a_id] - logits[b_id])), abs=1e-5)


def test_shipped_config_parses():
    parsed = parse_config(judge.JudgeConfig, ["--config", str(ROOT / "train/configs/judge_tiny.yaml")])
    assert parsed.context == "clips" and parsed.input and parsed.out and parsed.model


# ------------------------------------------------------------------------------ 2 ranks

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_write_what_one_process_writes(synth_world, prompt_shards, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         str(ROOT / "tests" / "judge_fixtures.py"), str(synth_world), str(prompt_shards), str(tmp_path / "two")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one_narrate, one_judge = run_both(synth_world, prompt_shards, tmp_path / "one")
    for name in ("narrated", "pairs"):
        two, one = tmp_path / "two" / name, tmp_path / "one" / name
        keys = [s["key"] for s in read_set(two, fields=("json",))]
        assert keys == [s["key"] for s in read_set(one, fields=("json",))]
        assert shard_list(two) == shard_list(one)  # the same bytes, whatever the number of ranks
        records = [json.loads(p.read_text()) for p in sorted((two / ".progress").glob("unit-*.json"))]
        assert {r["rank"] for r in records} == {0, 1}  # both ranks did work
    summary = json.loads((tmp_path / "two" / "pairs" / "summary.json").read_text())
    assert summary["outcomes"] == {"kept": schema.Manifest.load(prompt_shards).samples} == dict(one_judge.outcomes)
    # videos repeat across ranks' samples: some are captioned by both ranks, and counted
    narrated = json.loads((tmp_path / "two" / "narrated" / "summary.json").read_text())["extras"]
    assert narrated["videos captioned"] == narrated["videos"] + narrated["videos captioned more than once"]
    assert one_narrate.extras["videos captioned more than once"] == 0
