"""The run folder every trainer shares (train/runs.py) and the shared settings (train/trainer_config.py).

Issue 16.2: a new run in an old run folder deleted its own checkpoints (pruning kept the
newest by name, so the old run's step-21 and step-24 survived and each new step-3, step-6
went as soon as it was written) and appended to the old metrics.jsonl. Now a fresh run
into a used folder is refused, ``--overwrite`` clears the old run first, ``--resume``
continues it, and pruning never deletes the checkpoint just written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dataengine.config import ConfigError
from dataengine.dist import Ranks
from train import launch, ppo, rm, sft
from train.runs import Run, RunFolderInUse, check_resumable
from train.trainer_config import budget, field_defaults

RECIPES = {"sft": sft, "rm": rm, "ppo": ppo}
CONFIGS = {"sft": sft.SFTConfig, "rm": rm.RMConfig, "ppo": ppo.PPOConfig}


def old_run(folder: Path, steps=(21, 24)) -> Path:
    """A folder as an earlier, longer run left it: checkpoints, latest, metrics, model."""
    for step in steps:
        ckpt = folder / "checkpoints" / launch.checkpoint_name(step)
        ckpt.mkdir(parents=True)
        (ckpt / launch.TRAINER_STATE).write_text("{}")
    (folder / "checkpoints" / "latest").write_text(launch.checkpoint_name(steps[-1]) + "\n")
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    (folder / "model").mkdir()
    (folder / "notes.txt").write_text("the user's own file")
    return folder


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_fresh_run_in_a_used_folder_is_refused(name, tmp_path):
    folder = old_run(tmp_path / "run")
    config = CONFIGS[name](output=str(folder))
    with pytest.raises(RunFolderInUse, match="--resume to continue it, --overwrite"):
        Run.open(config, Ranks(), state_format="x", plan_fields=())
    assert (folder / "metrics.jsonl").read_text().count("\n") == 1  # nothing appended


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_trainer_entry_point_refuses_in_one_line(name, tmp_path):
    folder = old_run(tmp_path / "run")
    with pytest.raises(SystemExit) as exc:
        RECIPES[name].main(["--output", str(folder), "--shards", str(tmp_path / "none")])
    assert "holds an earlier run" in str(exc.value) and "--overwrite" in str(exc.value)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_overwrite_clears_the_old_run_and_resume_keeps_it(name, tmp_path):
    folder = old_run(tmp_path / "run")
    Run.open(CONFIGS[name](output=str(folder), resume=True), Ranks(), state_format="x", plan_fields=())
    assert (folder / "checkpoints" / "step-00000024").exists() and (folder / "metrics.jsonl").exists()
    run = Run.open(CONFIGS[name](output=str(folder), overwrite=True), Ranks(), state_format="x", plan_fields=())
    assert not (folder / "checkpoints").exists() and not (folder / "metrics.jsonl").exists()
    assert not (folder / "model").exists() and (folder / "notes.txt").exists()  # only the run's outputs
    assert json.loads((folder / "config.json").read_text())["overwrite"] is True
    run.log({"step": 1, "loss": 1.0}, "step 1/1 | loss 1.0")
    assert [json.loads(x)["loss"] for x in (folder / "metrics.jsonl").read_text().splitlines()] == [1.0]
    with pytest.raises(ConfigError, match="not both"):
        CONFIGS[name](output=str(folder), overwrite=True, resume=True)


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    """The old rule (keep the newest by name) deleted step-3 as soon as it was written when an
    old run's step-21 and step-24 were there; `latest` then named a missing folder."""
    root = old_run(tmp_path / "run") / "checkpoints"
    for step in (3, 6):
        (root / launch.checkpoint_name(step)).mkdir()
    pruned = {p.name for p in launch.checkpoints_to_prune(root, 6, keep=2)}
    assert pruned == {"step-00000021", "step-00000024"}
    assert {p.name for p in launch.checkpoints_to_prune(root, 6, keep=1)} == pruned | {"step-00000003"}
    assert {p.name for p in launch.checkpoints_to_prune(root, 24, keep=0)} == set()


def test_check_resumable_gives_fields_added_later_their_default(tmp_path):
    config = sft.SFTConfig()
    saved = {k: v for k, v in json.loads(json.dumps(field_defaults(sft.SFTConfig))).items() if k != "curriculum"}
    state = {"format": sft.STATE_FORMAT, "config": saved}
    check_resumable(state, config, tmp_path, state_format=sft.STATE_FORMAT, plan_fields=sft.PLAN_FIELDS)
    with pytest.raises(ValueError, match="curriculum: checkpoint 'sequential', now 'mixed'"):
        check_resumable(state, sft.SFTConfig(curriculum="mixed"), tmp_path, state_format=sft.STATE_FORMAT,
                        plan_fields=sft.PLAN_FIELDS)
    with pytest.raises(ValueError, match="not a vlmr-ppo-state/1 checkpoint"):
        check_resumable(state, ppo.PPOConfig(), tmp_path, state_format=ppo.STATE_FORMAT, plan_fields=ppo.PLAN_FIELDS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shared_settings_are_checked_once_for_every_trainer(name):
    with pytest.raises(ConfigError) as exc:
        CONFIGS[name](micro_batch=0, lr=-1, zero_stage=7, max_steps=-1, stop_after_steps=-2, window=0)
    for flag in ("--micro-batch", "--lr", "--zero-stage", "--max-steps", "--stop-after-steps", "--window"):
        assert flag in str(exc.value), flag


def test_budget_cuts_the_plan():
    assert budget([5, 3, 4], 7) == [5, 2, 0]
    assert budget([5, 3], 0) == [5, 3] and budget([5, 3], 100) == [5, 3]


def test_tensorboard_writes_the_metrics_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    run = Run.open(sft.SFTConfig(output=str(tmp_path / "run"), tensorboard=True), Ranks(), state_format="x",
                   plan_fields=())
    run.log({"step": 1, "loss": 2.0, "stage": "easy"}, "line")
    run.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.0)]
    assert "train/stage" not in events.Tags()["scalars"]  # only numbers are scalars
