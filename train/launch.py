"""DeepSpeed plumbing shared by the trainers: process group, engine, LR schedule, metrics, checkpoints.

The recipes (``train/sft.py``, ``rm.py``, ``ppo.py``) read top to bottom and call these:

- :func:`setup_distributed` works under ``deepspeed``, ``torchrun`` and a plain ``python``
  (it fills RANK/WORLD_SIZE/... for a single process, with a free port). On a machine
  without CUDA it selects DeepSpeed's CPU accelerator and the gloo backend; it must run
  before anything imports ``deepspeed``.
- :func:`deepspeed_config` builds the DeepSpeed config (ZeRO stage, bf16/fp32, gradient
  accumulation, clipping) from typed settings; :func:`initialize` creates the engine with
  a torch AdamW and a warmup + cosine schedule (:class:`WarmupCosine`) that DeepSpeed steps
  at each accumulation boundary.
- the run folder, its metrics line and TensorBoard scalars are ``train/runs.py``'s; the
  ranks and every collective are ``dataengine/dist.py``'s.
- :func:`save_checkpoint` / :func:`load_checkpoint` hold everything a run needs to go on
  exactly: the model as a loadable folder (adapter + projector, ``model/``), DeepSpeed's
  engine state (trainable weights, optimizer partitions, LR scheduler; ``deepspeed/``), the
  trainer's state as JSON (step, stage, config, ...) and each rank's own state (its reader
  position) with its RNG states (``ranks/``).
  A checkpoint is written to a temporary folder and renamed, then the ``latest`` pointer
  is replaced atomically, so a crash mid-save leaves the previous checkpoint intact.
  Pruning keeps the newest checkpoints up to the one just written, never that one.
  DeepSpeed's own files are torch zip archives; they are read back with
  ``torch.load(weights_only=True)`` and a short allowlist of DeepSpeed types
  (:func:`safe_checkpoint_engine`), so loading a checkpoint never unpickles code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from dataengine import dist
from dataengine.schema import write_text_atomic

log = logging.getLogger(__name__)

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
MODEL_DIR = "model"
ENGINE_DIR = "deepspeed"
RANKS_DIR = "ranks"


# ------------------------------------------------------------------------------ processes

def free_port() -> int:
    """A TCP port free on this machine now (for a single-process run's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup_distributed() -> dist.Ranks:
    """Join (or, for one plain process, create) the process group DeepSpeed uses.

    DeepSpeed needs a group even for one process; the group gets :data:`dist.TIMEOUT`.
    """
    if not torch.cuda.is_available():
        # Must be set before deepspeed is first imported: it picks its accelerator then.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if int(os.environ["WORLD_SIZE"]) == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        # A world of one rendezvous with nobody: its store takes a port free now. An inherited
        # MASTER_PORT (a parent that ran a trainer in-process still listens there) fails with
        # EADDRINUSE. torchrun's workers are left alone: they join the agent's store.
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.default_backend(), verbose=False, timeout=dist.TIMEOUT)
    return dist.Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank,
                      dist.pick_device("auto", local_rank))


# ------------------------------------------------------------------------------ engine

def deepspeed_config(*, micro_batch: int, grad_accum: int, zero_stage: int, precision: str,
                     grad_clip: float) -> dict[str, Any]:
    """DeepSpeed's config dict from the trainer's typed settings."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0..3, got {zero_stage}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": {"stage": zero_stage, "overlap_comm": zero_stage >= 2},
        # The optimizer is a torch AdamW we build (DeepSpeed's fused ones need compiled ops).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }


@dataclass
class WarmupCosine:
    """LR factor: linear warmup to 1 over ``warmup`` steps, then cosine to ``min_ratio``.

    ``factor(s)`` is applied to the optimizer step about to be taken, s = 0, 1, ...;
    e.g. warmup=2, total=6, min_ratio=0: 0.5, 1.0, then cos over 4 steps: 1.0, 0.854, 0.5, 0.146.
    A plain callable object so that LambdaLR's state_dict keeps its numbers.
    """

    warmup: int
    total: int
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        decay_steps = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / decay_steps)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters: no weight decay on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay}]
    no_decay = [p for p in params if p.dim() < 2]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def initialize(model: torch.nn.Module, config: dict[str, Any], *, lr: float, weight_decay: float,
               warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0,
               betas: tuple[float, float] = (0.9, 0.999)):
    """A DeepSpeed engine over the trainable parameters, AdamW, warmup + cosine LR.

    Returns ``(engine, scheduler)``; DeepSpeed steps the scheduler at each accumulation
    boundary. Parameters without gradient (the frozen base LM) are left out.
    """
    import deepspeed

    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(warmup_steps, total_steps, min_lr_ratio))
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   lr_scheduler=scheduler, config=config)
    engine.checkpoint_engine = safe_checkpoint_engine()
    return engine, scheduler


def gathered(params: Iterable[torch.nn.Parameter]):
    """Full parameters under ZeRO-3 (a no-op context otherwise); every rank must enter it."""
    import deepspeed

    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


# ------------------------------------------------------------------------------ checkpoints

def _safe_globals() -> list[Any]:
    """The non-tensor types DeepSpeed puts in its checkpoint files (loaded by allowlist)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, WarmupCosine]


def safe_checkpoint_engine():
    """DeepSpeed's torch checkpoint engine, reading with ``weights_only=True``.

    DeepSpeed's default reads its files with full unpickling; this one loads only tensors,
    plain containers and the allowlisted DeepSpeed types of :func:`_safe_globals`. Built on
    call, since importing DeepSpeed must wait for :func:`setup_distributed`.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def __init__(self):
            super().__init__(config_params=None)
            self.zipfile_serialization = True

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeCheckpointEngine()


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as JSON-able lists."""
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The folder the ``latest`` pointer names, or None when there is no checkpoint."""
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    folder = Path(root) / pointer.read_text().strip()
    if not (folder / TRAINER_STATE).exists():
        raise FileNotFoundError(f"{pointer} names {folder}, which holds no {TRAINER_STATE}")
    return folder


def save_checkpoint(root: str | os.PathLike, step: int, *, engine, model, trainer_state: dict[str, Any],
                    ranks: dist.Ranks, rank_state: dict[str, Any] | None = None, keep: int = 0) -> Path:
    """Write checkpoint ``root/step-NNNNNNNN`` on every rank (a collective call).

    ``trainer_state`` is JSON-able and the same on every rank (step, stage, config...); rank
    0's copy is written. ``rank_state`` is each rank's own (its reader position), written
    per rank with its RNG states. ``keep`` > 0 deletes all but the newest ``keep``
    checkpoints afterwards.
    """
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp"
    if ranks.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag=ENGINE_DIR, client_state={}, save_latest=False,
                           exclude_frozen_parameters=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with gathered(trainable):
        state = model.trainable_state() if ranks.is_main else None
    if ranks.is_main:
        model.save(tmp / MODEL_DIR, state=state)
        write_text_atomic(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=1) + "\n")
    (tmp / RANKS_DIR).mkdir(exist_ok=True)
    write_text_atomic(tmp / RANKS_DIR / f"rank-{ranks.rank:05d}.json",
                      json.dumps({"rng": rng_state(), "state": rank_state or {}}))
    dist.barrier()
    if ranks.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_text_atomic(root / LATEST, final.name + "\n")
        for old in checkpoints_to_prune(root, step, keep):
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    dist.barrier()
    return final


def checkpoints_to_prune(root: Path, step: int, keep: int) -> list[Path]:
    """Checkpoint folders to delete after writing ``step``: beyond the newest ``keep`` of those
    up to ``step`` (0 keeps all), and any of a later step (left by an earlier, longer run:
    ``latest`` no longer names them). The one just written is never among them."""
    def step_of(folder: Path) -> int:
        return int(folder.name.split("-", 1)[1])

    done = sorted((p for p in root.glob("step-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()),
                  key=step_of)
    later = [p for p in done if step_of(p) > step]
    upto = [p for p in done if step_of(p) <= step]
    return later + (upto[:-keep] if keep > 0 else [])


def load_checkpoint(folder: str | os.PathLike, *, engine, ranks: dist.Ranks) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore engine (weights, optimizer, scheduler) and this rank's RNG.

    Returns ``(trainer_state, rank_state)`` as given to :func:`save_checkpoint`.

    The world size must be the one the checkpoint was written with (ZeRO partitions the
    optimizer by rank).
    """
    folder = Path(folder)
    trainer_state = json.loads((folder / TRAINER_STATE).read_text())
    saved_world = trainer_state.get("world_size", ranks.world_size)
    if saved_world != ranks.world_size:
        raise ValueError(f"{folder} was written by {saved_world} ranks; this run has {ranks.world_size} "
                         "(ZeRO optimizer partitions are per rank: resume with the same world size)")
    path, _ = engine.load_checkpoint(str(folder), tag=ENGINE_DIR, load_module_strict=False,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"{folder / ENGINE_DIR}: no DeepSpeed checkpoint files")
    rank_file = folder / RANKS_DIR / f"rank-{ranks.rank:05d}.json"
    rank_data = json.loads(rank_file.read_text())
    set_rng_state(rank_data["rng"])
    return trainer_state, rank_data["state"]


# ------------------------------------------------------------------------------ entry points

def strip_local_rank(argv: list[str]) -> list[str]:
    """The ``deepspeed`` launcher appends ``--local_rank=N``; LOCAL_RANK carries it too."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank"):
            if i + 1 < len(argv):
                os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(arg)
    return out


def save_final_model(model, folder: Path, ranks: dist.Ranks, **save_kwargs: Any) -> Path:
    """A trained model (anything with ``trainable_state()`` and ``save(folder, state=...)``) as a
    loadable folder: parameters gathered under ZeRO-3, written by rank 0 to a temp name, renamed."""
    folder = Path(folder)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with gathered(trainable):
        state = model.trainable_state() if ranks.is_main else None
    if ranks.is_main:
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save(tmp, state=state, **save_kwargs)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        log.info("saved model %s", folder)
    dist.barrier()
    return folder


def run_recipe(config_cls: type, train: Callable[[Any, dist.Ranks], dict[str, Any]], argv: list[str] | None,
               prog: str) -> tuple[Any, dist.Ranks, dict[str, Any]]:
    """The entry point every trainer shares: strip the deepspeed launcher's ``--local_rank``,
    parse the typed config, join the process group, train; only rank 0 logs at INFO."""
    from dataengine import config as cfg

    argv = strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    config = cfg.parse_config(config_cls, argv, prog=prog)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ranks = setup_distributed()
    if not ranks.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    from train.runs import RunFolderInUse

    try:
        return config, ranks, train(config, ranks)
    except RunFolderInUse as exc:  # a user's choice to make, not a crash: one line, exit status 1
        raise SystemExit(f"{prog}: {exc}") from None
