"""A trainer's run folder: opened once, the same for SFT, the reward model and PPO.

    OUTPUT/config.json          the settings of the run (rewritten on --resume)
    OUTPUT/metrics.jsonl        one JSON line per logged step (rank 0)
    OUTPUT/tensorboard/         the same metrics as TensorBoard scalars (--tensorboard)
    OUTPUT/checkpoints/         step-NNNNNNNN/ folders and the ``latest`` pointer
    OUTPUT/model/               the trained model (written at the end)
    plus each trainer's own reports (keys/, stages.jsonl, epochs.jsonl, eval.jsonl, split/)

:meth:`Run.open` decides what happens to a folder that already holds a run: a fresh run
there is refused (its checkpoints would mix with the old run's, and pruning, which keeps
the newest, would delete the new ones), ``--overwrite`` deletes the old run's outputs
first, ``--resume`` continues it. :meth:`Run.log` prints the dense metrics line and writes
the JSON line and TensorBoard scalars; :meth:`Run.save` / :meth:`Run.resume` write and
read checkpoints through ``train.launch`` and check that a resumed run has the plan
settings of its checkpoint (:func:`check_resumable`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from dataengine import config as cfg
from dataengine import dist
from dataengine.schema import write_text_atomic

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
MODEL = "model"
# What a run writes into its folder: --overwrite deletes exactly these (nothing a user put beside them).
RUN_OUTPUTS = (CONFIG_FILE, METRICS_FILE, CHECKPOINTS, TENSORBOARD, MODEL, "keys", "stages.jsonl",
               "epochs.jsonl", "eval.jsonl", "eval.json", "split")
# The signs that a folder already holds a run.
RUN_TRACES = (METRICS_FILE, CHECKPOINTS, MODEL)


class RunFolderInUse(RuntimeError):
    """A fresh run was asked for in a folder that holds an earlier run."""


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def metrics_line(step: int, total_steps: int, parts: Sequence[str], eta_s: float) -> str:
    """``step 3/17 | part | part | eta 0:01:02`` — one dense line per step."""
    return " | ".join([f"step {step}/{total_steps}", *parts, f"eta {format_duration(eta_s)}"])


def used_by_a_run(root: Path) -> list[str]:
    """What in ``root`` shows an earlier run (empty: the folder is new or holds none)."""
    found = [name for name in RUN_TRACES if (root / name).exists()]
    if (root / CHECKPOINTS).is_dir() and not any((root / CHECKPOINTS).iterdir()):
        found.remove(CHECKPOINTS)
    return found


def check_resumable(state: dict[str, Any], config: Any, folder: Path, *, state_format: str,
                    plan_fields: Sequence[str]) -> None:
    """The checkpoint's trainer state is of this trainer and its plan settings equal the
    config's. A plan field added after the checkpoint was written had its default then."""
    if state.get("format") != state_format:
        raise ValueError(f"{folder}: not a {state_format} checkpoint (format {state.get('format')!r})")
    from train.trainer_config import field_defaults

    defaults = _plain(field_defaults(type(config)))
    now = cfg.to_dict(config)
    saved = {k: state["config"].get(k, defaults.get(k)) for k in plan_fields}
    diff = [f"{k}: checkpoint {saved[k]!r}, now {now.get(k)!r}" for k in plan_fields if saved[k] != now.get(k)]
    if diff:
        raise ValueError(f"{folder}: cannot resume with different plan settings:\n  " + "\n  ".join(diff))


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, default=str))


@dataclass
class Run:
    """One trainer's run folder on this rank. Create with :meth:`open` (a collective call)."""

    root: Path
    config: Any
    ranks: dist.Ranks
    state_format: str
    plan_fields: Sequence[str]
    writer: Any = None
    started: float = field(default_factory=time.perf_counter)
    lap_started: float = field(default_factory=time.perf_counter)

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def model_dir(self) -> Path:
        return self.root / MODEL

    @classmethod
    def open(cls, config: Any, ranks: dist.Ranks, *, state_format: str, plan_fields: Sequence[str]) -> "Run":
        """Check the folder (every rank, before anyone writes), clear it for ``--overwrite``,
        write ``config.json``; refuses a fresh run in a used folder."""
        root = Path(config.output)
        found = used_by_a_run(root) if root.exists() else []
        if found and not (config.resume or config.overwrite):
            raise RunFolderInUse(
                f"{root} holds an earlier run ({', '.join(found)}): pass --resume to continue it, "
                f"--overwrite to delete it and start afresh, or choose another --output")
        dist.barrier()
        if ranks.is_main:
            if config.overwrite and found:
                log.warning("--overwrite: deleting the earlier run's %s in %s",
                            ", ".join(n for n in RUN_OUTPUTS if (root / n).exists()), root)
                for name in RUN_OUTPUTS:
                    path = root / name
                    if path.is_dir():
                        shutil.rmtree(path)
                    elif path.exists():
                        path.unlink()
            root.mkdir(parents=True, exist_ok=True)
            write_text_atomic(root / CONFIG_FILE, json.dumps(cfg.to_dict(config), indent=1) + "\n")
        dist.barrier()
        run = cls(root, config, ranks, state_format, plan_fields)
        if config.tensorboard and ranks.is_main:
            run.writer = _tensorboard_writer(root / TENSORBOARD)
        return run

    # -- metrics ---------------------------------------------------------------------
    def log(self, metrics: dict[str, Any], line: str) -> None:
        """Rank 0: the dense line to the log, the metrics to metrics.jsonl and TensorBoard."""
        if not self.ranks.is_main:
            return
        log.info("%s", line)
        with open(self.root / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
                    self.writer.add_scalar(f"train/{name}", value, metrics["step"])
            self.writer.flush()

    def record_keys(self, step: int, tag: Any, keys: Sequence[str]) -> None:
        """Every rank: the sample keys a step trained on (``--log-keys``), for checking which
        data each rank saw and that a resumed run sees the same."""
        path = self.root / "keys" / f"rank-{self.ranks.rank:05d}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{step}\t{tag}\t" + " ".join(keys) + "\n")

    def lap(self) -> float:
        """Seconds since the previous lap (or the start): the time a metrics window took."""
        now = time.perf_counter()
        elapsed, self.lap_started = now - self.lap_started, now
        return elapsed

    def eta(self, done_here: int, step: int, total_steps: int) -> float:
        """Seconds left, from this process's pace over the ``done_here`` steps it ran."""
        return (time.perf_counter() - self.started) / max(1, done_here) * (total_steps - step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # -- checkpoints -------------------------------------------------------------------
    def save(self, step: int, *, engine, model, trainer_state: dict[str, Any],
             rank_state: dict[str, Any] | None = None) -> Path:
        """A checkpoint of ``step`` (collective). ``trainer_state`` gets the format, step,
        world size and config added; old checkpoints beyond ``keep_checkpoints`` are pruned."""
        from train import launch

        state = {"format": self.state_format, "step": step, "world_size": self.ranks.world_size,
                 **trainer_state, "config": cfg.to_dict(self.config)}
        return launch.save_checkpoint(self.checkpoints, step, engine=engine, model=model, trainer_state=state,
                                      rank_state=rank_state, ranks=self.ranks, keep=self.config.keep_checkpoints)

    def resume(self, engine, before_load: Callable[[Path], None] | None = None
               ) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """With ``--resume``: load the latest checkpoint into ``engine`` and this rank's RNG,
        check its plan settings, and return ``(trainer_state, rank_state)``; else None.
        ``before_load(folder)`` may refuse a checkpoint before the engine reads it."""
        from train import launch

        if not self.config.resume:
            return None
        folder = launch.latest_checkpoint(self.checkpoints)
        if folder is None:
            log.warning("--resume: no checkpoint under %s; starting from the beginning", self.checkpoints)
            return None
        if before_load is not None:
            before_load(folder)
        state = json.loads((folder / launch.TRAINER_STATE).read_text())
        check_resumable(state, self.config, folder, state_format=self.state_format, plan_fields=self.plan_fields)
        state, rank_state = launch.load_checkpoint(folder, engine=engine, ranks=self.ranks)
        log.info("resumed %s at step %d", folder, state["step"])
        return state, rank_state


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise RuntimeError("--tensorboard needs the 'tensorboard' package (pip install tensorboard)") from exc
    return SummaryWriter(str(folder))
