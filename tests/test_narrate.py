"""`vlmr narrate`: one caption per clip in clip order, each video once, exact resume after a kill,
the CLI on the tiny SFT model, and clear errors.

    .venv/bin/python -m pytest -q tests/test_narrate.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dataengine import pack, schema
from dataengine.config import parse_config
from dataengine.inspection import open_shard_set
from dataengine.verify import verify
from dataengine.reader import ShardReader
from judge_fixtures import CLIPS, ClipSignatureCaptioner, InjectedKill, shared_prompt_shards, shared_sft_model, \
    signature
from train import narrate, shardpass
from train.shardpass import read_set

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prompt_shards(synth_world, tmp_path_factory) -> Path:
    return shared_prompt_shards(tmp_path_factory, synth_world)


def config(prompt_shards: Path, out: Path, **overrides) -> narrate.NarrateConfig:
    settings = dict(model="test-fixture", input=str(prompt_shards), out=str(out), samples_per_shard=5,
                    batch_size=3, progress=False)
    return narrate.NarrateConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def narrated(prompt_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("narrated") / "set"
    captioner = ClipSignatureCaptioner()
    summary = narrate.run(config(prompt_shards, out), captioner=captioner)
    return out, captioner, summary


def shard_list(folder: Path) -> list[tuple[str, str, str, int]]:
    manifest = schema.Manifest.load(folder)
    return [(st.name, s.url, s.sha256, s.samples) for st in manifest.stages for s in st.shards]


def as_numpy(value) -> np.ndarray:
    return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


# ------------------------------------------------------------------------------ narratives

def test_one_caption_per_clip_in_clip_order_and_each_video_once(narrated, prompt_shards):
    out, captioner, summary = narrated
    inputs = read_set(prompt_shards, fields=None)
    outputs = read_set(out, fields=None)
    assert [(s["stage"], s["key"]) for s in outputs] == [(s["stage"], s["key"]) for s in inputs]
    for src, got in zip(inputs, outputs):
        clips = src["clips"]
        assert clips.shape[0] == CLIPS
        expected_clips = [signature(clips[k]) for k in range(CLIPS)]  # clip order, one caption each
        data = got["json"]
        assert data["narrative_clips"] == expected_clips
        assert data["narrative"] == " ".join(expected_clips)
        assert data["narrative_video"] == signature(src["feat"])
        assert {k: v for k, v in data.items() if not k.startswith("narrative")} == src["json"]
        assert np.array_equal(as_numpy(got["feat"]), as_numpy(src["feat"])) and got["feat"].dtype == torch.float16
        assert np.array_equal(as_numpy(got["clips"]), as_numpy(clips))
        assert got["thumb.jpg"] == src["thumb.jpg"]
    videos = {s["json"]["video_id"] for s in inputs}
    # each video captioned once: its clips and its whole feat, in one rank
    assert captioner.captioned == len(videos) * (CLIPS + 1)
    assert summary.extras == {"videos": len(videos), "videos captioned": len(videos),
                              "videos captioned more than once": 0, "cache hits": len(inputs) - len(videos)}
    assert summary.outcomes == {"kept": len(inputs)} and summary.complete

    manifest = schema.Manifest.load(out)
    source = schema.Manifest.load(prompt_shards)
    assert manifest.derived_from == str(prompt_shards / "manifest.json")
    assert [s.name for s in manifest.stages] == [s.name for s in source.stages]
    assert [s.samples for s in manifest.stages] == [s.samples for s in source.stages]
    assert manifest.settings["command"] == "narrate"
    assert manifest.settings["prompt_text"] == "Describe this video in detail."
    assert manifest.settings["captioner"] == ClipSignatureCaptioner.name
    assert manifest.failures == 0 and (out / "failures.jsonl").read_text() == ""
    result = verify(open_shard_set(out))
    assert result.ok, result.problems
    assert not result.notes


def test_units_follow_the_readers_plan(prompt_shards):
    reader = ShardReader(prompt_shards, stages=["easy", "hard"], shuffle="none")
    manifest = reader.manifest
    units = shardpass.plan_units(reader, 5)
    expected = []
    for stage in manifest.stages:
        for shard in stage.shards:
            expected += [(stage.name, shard.url, first, min(5, shard.samples - first))
                         for first in range(0, shard.samples, 5)]
    assert [(u.stage, Path(u.url).name, u.first, u.count) for u in units] == expected
    assert [u.start for u in units] == list(np.cumsum([0] + [u.count for u in units])[:-1])
    easy = [u for u in units if u.stage == "easy"]
    assert [u.out_name for u in easy] == [f"easy-{i:06d}.tar" for i in range(len(easy))]
    pairs = shardpass.plan_units(reader, 5, out_stage="pairs")
    assert [u.out_name for u in pairs] == [f"pairs-{i:06d}.tar" for i in range(len(units))]
    # every sample in exactly one unit
    assert sum(u.count for u in units) == reader.total


# ------------------------------------------------------------------------------ resume

def test_resume_after_a_kill_loses_and_duplicates_nothing(prompt_shards, narrated, tmp_path):
    reference, _, _ = narrated
    out = tmp_path / "set"

    def stop_after_three(unit, record):
        if unit.index == 2:
            raise InjectedKill("killed after 3 shards")

    with pytest.raises(InjectedKill):
        narrate.run(config(prompt_shards, out), captioner=ClipSignatureCaptioner(), after_unit=stop_after_three)
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in (out / ".progress").glob("unit-*.json")) == \
        [f"unit-{i:06d}.json" for i in range(3)]

    # killed again, in the middle of the next unit: its temp tar is removed, nothing recorded
    captioner = ClipSignatureCaptioner()
    captioner.fail_at_call = 1
    with pytest.raises(InjectedKill):
        narrate.run(config(prompt_shards, out), captioner=captioner)
    assert len(list((out / ".progress").glob("unit-*.json"))) == 3

    # a SIGKILL can also leave a temp file, and a tar renamed into place whose record was never written
    (out / ".easy-000004.tar.abc123.tmp").write_bytes(b"partial")
    (out / ".progress" / "unit-000002.json").unlink()

    captioner = ClipSignatureCaptioner()
    summary = narrate.run(config(prompt_shards, out), captioner=captioner)
    assert summary.units_resumed == 2 and summary.units_done == summary.units - 2
    assert shard_list(out) == shard_list(reference)  # byte-identical shards, same order
    keys = [s["key"] for s in read_set(out, fields=("json",))]
    assert len(keys) == len(set(keys)) == schema.Manifest.load(prompt_shards).samples
    assert not list(out.glob(".*.tmp"))

    # a finished run: rerunning it writes nothing new
    again = narrate.run(config(prompt_shards, out), captioner=ClipSignatureCaptioner())
    assert again.units_done == 0 and again.units_resumed == summary.units
    assert shard_list(out) == shard_list(reference)


# ------------------------------------------------------------------------------ the tiny model

@pytest.mark.slow
def test_cli_with_the_tiny_sft_model(prompt_shards, tmp_path_factory, tmp_path, capsys, one_thread):
    from tools.cli import main
    from train.model import VideoLMM

    model_dir = shared_sft_model(tmp_path_factory)
    out = tmp_path / "narrated"
    argv = ["narrate", "--model", str(model_dir), "--in", str(prompt_shards), "--out", str(out), "--stages", "hard",
            "--max-new-tokens", "4", "--batch-size", "1", "--samples-per-shard", "16", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "kept" in printed and "videos captioned" in printed
    samples = read_set(out, fields=None)
    assert len(samples) == schema.Manifest.load(prompt_shards).stage("hard").samples
    assert [s.name for s in schema.Manifest.load(out).stages] == ["hard"]
    model = VideoLMM.load(model_dir).eval()
    first = samples[0]
    # batch 1: each video's clips go to the model as one batch, as in this direct call
    direct = model.generate(first["clips"], ["Describe this video in detail."] * CLIPS, max_new_tokens=4)
    assert first["json"]["narrative_clips"] == [narrate.clean_text(t) for t in direct.texts]
    for s in samples:
        assert len(s["json"]["narrative_clips"]) == CLIPS
        assert all(isinstance(c, str) for c in s["json"]["narrative_clips"])
        assert isinstance(s["json"]["narrative_video"], str)
    settings = schema.Manifest.load(out).settings
    assert settings["identity"]["model_fingerprint"] == narrate.model_fingerprint(model_dir)
    # the same command again: a finished run, kept
    assert main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["units_done"] == 0


# ------------------------------------------------------------------------------ errors

def write_without_clips(prompt_shards: Path, out: Path, count: int = 3) -> Path:
    samples = list(ShardReader(prompt_shards, stages=["hard"], shuffle="none", fields=("json", "feat")))[:count]
    with pack.ShardWriter(out, "hard") as writer:
        for s in samples:
            writer.write({"__key__": s["key"], "json": s["json"], "feat.npy": s["feat"].numpy()})
    schema.Manifest(samples=count, stages=[writer.info]).save(out)
    return out


def test_bad_inputs_and_foreign_outputs_are_clear_errors(prompt_shards, narrated, tmp_path):
    no_clips = write_without_clips(prompt_shards, tmp_path / "no_clips")
    with pytest.raises(ValueError, match=r"hard-000000.tar: key '.*': no clips member"):
        narrate.run(config(no_clips, tmp_path / "a"), captioner=ClipSignatureCaptioner())
    summary = narrate.run(config(no_clips, tmp_path / "b", on_error="skip"), captioner=ClipSignatureCaptioner())
    assert summary.outcomes == {"no_clips": 3} and summary.samples_out == 0
    lines = [json.loads(x) for x in (tmp_path / "b" / "failures.jsonl").read_text().splitlines()]
    assert [x["reason"] for x in lines] == ["no_clips"] * 3 and all(x["key"] and x["video_id"] for x in lines)
    assert schema.Manifest.load(tmp_path / "b").failures == 3

    with pytest.raises(shardpass.PassError, match="is the input set"):
        narrate.run(config(prompt_shards, prompt_shards), captioner=ClipSignatureCaptioner())

    reference, _, _ = narrated
    finished = tmp_path / "finished"
    narrate.run(config(prompt_shards, finished, stages=["hard"]), captioner=ClipSignatureCaptioner())
    with pytest.raises(shardpass.PassError, match="max_new_tokens"):
        narrate.run(config(prompt_shards, finished, stages=["hard"], max_new_tokens=7),
                    captioner=ClipSignatureCaptioner())
    summary = narrate.run(config(prompt_shards, finished, stages=["hard"], max_new_tokens=7, overwrite=True),
                          captioner=ClipSignatureCaptioner())
    assert summary.units_resumed == 0 and summary.samples_out == schema.Manifest.load(finished).samples
    with pytest.raises(shardpass.PassError, match="no narrate run recorded"):
        narrate.run(config(prompt_shards, no_clips.parent / "no_clips"), captioner=ClipSignatureCaptioner())


class ClipsOnlyCaptioner(ClipSignatureCaptioner):
    """Cannot take the whole video's rows (more rows than a clip): as a model whose max_length they exceed."""

    def caption(self, feats):
        rows = min(int(f.shape[0]) for f in feats)
        return [signature(f) if f.shape[0] == rows else None for f in feats]


def test_videos_that_do_not_fit_are_counted_too_long(prompt_shards, tmp_path):
    summary = narrate.run(config(prompt_shards, tmp_path / "a", stages=["hard"]), captioner=ClipsOnlyCaptioner())
    hard = schema.Manifest.load(prompt_shards).stage("hard").samples
    assert summary.outcomes == {"too_long": hard} and summary.samples_out == 0
    summary = narrate.run(config(prompt_shards, tmp_path / "b", stages=["hard"], whole_video=False),
                          captioner=ClipsOnlyCaptioner())
    assert summary.outcomes == {"kept": hard}
    assert all("narrative_video" not in s["json"] for s in read_set(tmp_path / "b", fields=("json",)))


def test_unreadable_samples_are_counted_with_on_error_skip(prompt_shards, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(prompt_shards, damaged)
    manifest = schema.Manifest.load(damaged)
    victim = manifest.stage("easy").shards[1]
    data = (damaged / victim.url).read_bytes()
    (damaged / victim.url).write_bytes(data[: len(data) // 2])  # a truncated tar: its second half is lost
    with pytest.raises(Exception, match=victim.url):
        narrate.run(config(damaged, tmp_path / "raise"), captioner=ClipSignatureCaptioner())
    summary = narrate.run(config(damaged, tmp_path / "skip", on_error="skip"), captioner=ClipSignatureCaptioner())
    lost = summary.outcomes["unreadable"]
    assert 0 < lost < victim.samples and summary.outcomes["kept"] + lost == manifest.samples
    keys = [s["key"] for s in read_set(tmp_path / "skip", fields=("json",))]
    assert len(keys) == len(set(keys)) == manifest.samples - lost  # stand-ins are never written
    lines = [json.loads(x) for x in (tmp_path / "skip" / "failures.jsonl").read_text().splitlines()]
    assert len(lines) == lost and all(x["reason"] == "unreadable" and victim.url in x["key"] for x in lines)


def test_prompt_files_and_shipped_config(tmp_path):
    assert narrate.load_prompt(narrate.DEFAULT_PROMPT).substitute() == "Describe this video in detail."
    bad = tmp_path / "bad.txt"
    bad.write_text("# documentation\nDescribe $thing.\n")
    with pytest.raises(ValueError, match=r"unknown placeholder\(s\) \$thing"):
        narrate.load_prompt(bad)
    with pytest.raises(ValueError, match=r"missing placeholder\(s\) \$question"):
        narrate.load_prompt(bad, required=("question",), allowed=("thing",))
    parsed = parse_config(narrate.NarrateConfig, ["--config", str(ROOT / "train/configs/narrate_tiny.yaml")])
    assert parsed.input and parsed.out and parsed.model
    assert shardpass.in_alias(["--in", "x", "--in=y"]) == ["--input", "x", "--input=y"]
