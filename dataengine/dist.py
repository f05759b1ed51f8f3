"""This process's place among the ranks, and every collective the project uses.

One module for the builder (``dataengine.build``), the shard-to-shard stages, evaluation
and the three trainers, so that they agree on three things:

- **who we are**: :class:`Ranks` (rank, world size, local rank, device), read from the
  launcher's environment (``torchrun``, ``deepspeed``; one process without it);
- **how long a rank may wait**: one timeout, :data:`TIMEOUT`, for every process group we
  create. Ranks meet at barriers after uneven work (one rank decodes longer videos, judges
  more units, writes a larger checkpoint); a rank that fails is ended by the launcher, so a
  long timeout never hides a crash, while the default 10-30 minutes kills healthy runs;
- **where tensors go**: NCCL only takes CUDA tensors, gloo only CPU ones.
  :func:`backend_device` says which; every collective here moves its tensors there and
  hands results back on the caller's device. Code elsewhere never calls
  ``torch.distributed`` collectives itself.

Objects travel as JSON text (:func:`all_gather_json`, :func:`broadcast_json`), never as
pickles, so a rank never unpickles another's bytes.

Without a process group (one plain process) every collective returns its input.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as tdist

TIMEOUT = datetime.timedelta(hours=24)
"""How long a rank waits for the others at any collective of a group created here."""


@dataclass(frozen=True)
class Ranks:
    """This process's rank, the number of ranks, its rank on this node, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto") -> "Ranks":
        """From the launcher's RANK / WORLD_SIZE / LOCAL_RANK (a single process without them).

        ``device``: ``auto`` (this rank's GPU when there is one, else the CPU), ``cpu`` or ``cuda``.
        """
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), local_rank,
                   pick_device(device, local_rank))

    def barrier(self) -> None:
        barrier()


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto``: this rank's GPU when there is one, else the CPU; ``cpu``; ``cuda``."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} requested, but torch sees no CUDA device")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init(backend: str | None = None, timeout: datetime.timedelta = TIMEOUT) -> bool:
    """Join the launcher's process group when there are several ranks (nothing for one).

    Returns True when this call created the group (so the caller destroys it at the end).
    """
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or tdist.is_initialized():
        return False
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    tdist.init_process_group(backend, timeout=timeout)
    return True


def close() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


@contextlib.contextmanager
def process_group(backend: str | None = None, timeout: datetime.timedelta = TIMEOUT) -> Iterator[Ranks]:
    """``with dist.process_group() as ranks:`` joins the group (several ranks) and destroys it
    at the end when it created it; an existing group is joined and left alone."""
    created = init(backend, timeout)
    try:
        yield Ranks.from_env()
    finally:
        if created:
            close()


def active() -> bool:
    """True when there is a process group of more than one rank."""
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def backend_device() -> torch.device:
    """Where the group's backend takes tensors: this rank's GPU for NCCL, else the CPU."""
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if active():
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``t`` over ranks, as a new tensor on ``t``'s device and dtype."""
    if not active():
        return t.clone()
    work = t.detach().to(backend_device(), copy=True)
    tdist.all_reduce(work)
    return work.to(t.device)


def all_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum of numbers over ranks (float64, so token counts stay exact)."""
    return all_reduce_sum(torch.tensor([float(v) for v in values], dtype=torch.float64)).tolist()


def all_gather_json(obj: Any) -> list[Any]:
    """Every rank's JSON-able ``obj``, in rank order, on every rank."""
    if not active():
        return [obj]
    device, world = backend_device(), tdist.get_world_size()
    # Tensors are made on the CPU and moved: one place decides the device.
    data = json.dumps(obj).encode("utf-8")
    size = torch.tensor([len(data)], dtype=torch.long).to(device)
    sizes = [torch.zeros(1, dtype=torch.long).to(device) for _ in range(world)]
    tdist.all_gather(sizes, size)
    longest = max(int(n) for n in sizes)
    buf = torch.zeros(longest, dtype=torch.uint8)
    if data:
        buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    bufs = [torch.zeros(longest, dtype=torch.uint8).to(device) for _ in range(world)]
    tdist.all_gather(bufs, buf.to(device))
    return [json.loads(b[:int(n)].cpu().numpy().tobytes().decode("utf-8")) for b, n in zip(bufs, sizes)]


def broadcast_json(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s JSON-able ``obj`` on every rank."""
    if not active():
        return obj
    device = backend_device()
    data = json.dumps(obj).encode("utf-8") if tdist.get_rank() == src else b""
    size = torch.tensor([len(data)], dtype=torch.long).to(device)
    tdist.broadcast(size, src)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8)
    if data:
        buf[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(device)
    tdist.broadcast(buf, src)
    return json.loads(buf.cpu().numpy().tobytes().decode("utf-8"))
