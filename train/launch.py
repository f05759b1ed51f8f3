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
- :class:`MetricsLog` prints one dense line per logged step on rank 0
  (``step | stage | loss | lr | tok/s | samples/s | data-wait | eta``) and, optionally,
  writes TensorBoard scalars.
- :func:`save_checkpoint` / :func:`load_checkpoint` hold everything a run needs to go on
  exactly: the model as a loadable folder (adapter + projector, ``model/``), DeepSpeed's
  engine state (trainable weights, optimizer partitions, LR scheduler; ``deepspeed/``), the
  trainer's state as JSON (step, stage, config, ...) and each rank's own state (its reader
  position) with its RNG states (``ranks/``).
  A checkpoint is written to a temporary folder and renamed, then the ``latest`` pointer
  is replaced atomically, so a crash mid-save leaves the previous checkpoint intact.
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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from dataengine.schema import write_text_atomic

log = logging.getLogger(__name__)

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
MODEL_DIR = "model"
ENGINE_DIR = "deepspeed"
RANKS_DIR = "ranks"


# ------------------------------------------------------------------------------ processes

@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on this machine now (for a single-process run's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup_distributed() -> DistInfo:
    """Join (or, for one plain process, create) the process group DeepSpeed uses."""
    if not torch.cuda.is_available():
        # Must be set before deepspeed is first imported: it picks its accelerator then.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks (float64 so that token counts stay exact)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        backend = torch.distributed.get_backend()
        if backend == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s JSON-able ``obj`` on every rank (sent as JSON text, never pickled)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return obj
    data = json.dumps(obj).encode() if torch.distributed.get_rank() == src else b""
    size = torch.tensor([len(data)], dtype=torch.long)
    torch.distributed.broadcast(size, src)
    buf = torch.zeros(int(size), dtype=torch.uint8)
    if torch.distributed.get_rank() == src:
        buf[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    torch.distributed.broadcast(buf, src)
    return json.loads(bytes(buf.tolist()).decode())


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


def initialize(model: torch.nn.Module, config: dict[str, Any], *, lr: float, weight_decay: float,
               warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0,
               betas: tuple[float, float] = (0.9, 0.999)):
    """A DeepSpeed engine over the trainable parameters, AdamW, warmup + cosine LR.

    Returns ``(engine, scheduler)``; DeepSpeed steps the scheduler at each accumulation
    boundary. Parameters without gradient (the frozen base LM) are left out.
    """
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    # No weight decay on biases and norms, as is usual for AdamW.
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas)
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


# ------------------------------------------------------------------------------ metrics

def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLog:
    """Rank 0's per-step metrics line and optional TensorBoard scalars.

    ``update`` is called on every rank at a log step (it all-reduces the window's sums).
    """

    def __init__(self, dist: DistInfo, total_steps: int, tensorboard_dir: Path | None = None):
        self.dist = dist
        self.total_steps = total_steps
        self.writer = None
        self.start = time.perf_counter()
        self.steps_timed = 0
        self.window_start = time.perf_counter()
        self.history: list[dict[str, Any]] = []
        if tensorboard_dir is not None and dist.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError("tensorboard logging needs the 'tensorboard' package "
                                   "(pip install tensorboard), or set tensorboard: false") from exc
            self.writer = SummaryWriter(str(tensorboard_dir))

    def update(self, *, step: int, stage: str, lr: float, loss_sum: float, loss_count: float,
               tokens: float, samples: float, data_wait: float, steps: int) -> dict[str, Any] | None:
        """Sum the window over ranks; on rank 0 log the line and return the metrics."""
        loss_sum, loss_count, tokens, samples, data_wait = all_sum(
            [loss_sum, loss_count, tokens, samples, data_wait])
        now = time.perf_counter()
        elapsed = now - self.window_start
        self.window_start = now
        self.steps_timed += steps
        if not self.dist.is_main:
            return None
        per_step = (now - self.start) / max(1, self.steps_timed)
        wait_share = data_wait / self.dist.world_size / elapsed if elapsed > 0 else 0.0
        metrics = {
            "step": step, "stage": stage, "loss": loss_sum / max(loss_count, 1), "lr": lr,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "samples_per_s": samples / elapsed if elapsed > 0 else 0.0,
            "data_wait": wait_share, "eta_s": per_step * (self.total_steps - step),
            "tokens": tokens, "samples": samples, "seconds": elapsed, "steps": steps,
        }
        self.history.append(metrics)
        log.info("step %d/%d | %s | loss %.4f | lr %.2e | tok/s %s | samples/s %.1f | data-wait %.1f%% | eta %s",
                 step, self.total_steps, stage, metrics["loss"], lr, f"{metrics['tokens_per_s']:,.0f}",
                 metrics["samples_per_s"], 100 * wait_share, format_duration(metrics["eta_s"]))
        if self.writer is not None:
            for name in ("loss", "lr", "tokens_per_s", "samples_per_s", "data_wait"):
                self.writer.add_scalar(f"train/{name}", metrics[name], step)
        return metrics

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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
                    dist: DistInfo, rank_state: dict[str, Any] | None = None, keep: int = 0) -> Path:
    """Write checkpoint ``root/step-NNNNNNNN`` on every rank (a collective call).

    ``trainer_state`` is JSON-able and the same on every rank (step, stage, config...); rank
    0's copy is written. ``rank_state`` is each rank's own (its reader position), written
    per rank with its RNG states. ``keep`` > 0 deletes all but the newest ``keep``
    checkpoints afterwards.
    """
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(tmp), tag=ENGINE_DIR, client_state={}, save_latest=False,
                           exclude_frozen_parameters=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with gathered(trainable):
        state = model.trainable_state() if dist.is_main else None
    if dist.is_main:
        model.save(tmp / MODEL_DIR, state=state)
        write_text_atomic(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=1) + "\n")
    (tmp / RANKS_DIR).mkdir(exist_ok=True)
    write_text_atomic(tmp / RANKS_DIR / f"rank-{dist.rank:05d}.json",
                      json.dumps({"rng": rng_state(), "state": rank_state or {}}))
    barrier()
    if dist.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_text_atomic(root / LATEST, final.name + "\n")
        if keep > 0:
            done = sorted(p for p in root.glob("step-*") if p.is_dir())
            for old in done[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    barrier()
    return final


def load_checkpoint(folder: str | os.PathLike, *, engine, dist: DistInfo) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore engine (weights, optimizer, scheduler) and this rank's RNG.

    Returns ``(trainer_state, rank_state)`` as given to :func:`save_checkpoint`.

    The world size must be the one the checkpoint was written with (ZeRO partitions the
    optimizer by rank).
    """
    folder = Path(folder)
    trainer_state = json.loads((folder / TRAINER_STATE).read_text())
    saved_world = trainer_state.get("world_size", dist.world_size)
    if saved_world != dist.world_size:
        raise ValueError(f"{folder} was written by {saved_world} ranks; this run has {dist.world_size} "
                         "(ZeRO optimizer partitions are per rank: resume with the same world size)")
    path, _ = engine.load_checkpoint(str(folder), tag=ENGINE_DIR, load_module_strict=False,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"{folder / ENGINE_DIR}: no DeepSpeed checkpoint files")
    rank_file = folder / RANKS_DIR / f"rank-{dist.rank:05d}.json"
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


def save_final_model(model, folder: Path, dist: DistInfo, **save_kwargs: Any) -> Path:
    """A trained model (anything with ``trainable_state()`` and ``save(folder, state=...)``) as a
    loadable folder: parameters gathered under ZeRO-3, written by rank 0 to a temp name, renamed."""
    folder = Path(folder)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with gathered(trainable):
        state = model.trainable_state() if dist.is_main else None
    if dist.is_main:
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save(tmp, state=state, **save_kwargs)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        log.info("saved model %s", folder)
    barrier()
    return folder


def run_recipe(config_cls: type, train: Callable[[Any, DistInfo], dict[str, Any]], argv: list[str] | None,
               prog: str) -> tuple[Any, DistInfo, dict[str, Any]]:
    """The entry point every trainer shares: strip the deepspeed launcher's ``--local_rank``,
    parse the typed config, join the process group, train; only rank 0 logs at INFO."""
    from dataengine import config as cfg

    argv = strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    config = cfg.parse_config(config_cls, argv, prog=prog)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dist = setup_distributed()
    if not dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    return config, dist, train(config, dist)
