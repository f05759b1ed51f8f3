"""A fake two-rank process group whose backend reports ``nccl`` — on a machine without CUDA.

NCCL takes only CUDA tensors; gloo, which the CPU tests run on, takes CPU ones, so a
collective that forgets to move its tensors passes every gloo test and crashes on the
first multi-GPU run. :func:`install` makes ``torch.distributed`` report an initialised
group of two ranks on ``nccl`` whose collectives raise, as NCCL does, on a tensor that is
not on CUDA. ``Tensor.to("cuda")`` returns a CPU copy marked as on CUDA, which the fake
collectives accept (the other rank is this one's twin: a sum doubles, a gather repeats).
"""

from __future__ import annotations

import torch
import torch.distributed as tdist

WORLD = 2


def _on_cuda(t: torch.Tensor) -> bool:
    return bool(getattr(t, "_fake_cuda", False))


def _check(t: torch.Tensor) -> None:
    if not _on_cuda(t):
        raise RuntimeError("Tensors must be CUDA and dense (fake NCCL got a tensor on "
                           f"{t.device})")


def install(monkeypatch) -> None:
    original_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        targets = list(args) + list(kwargs.values())
        if any(isinstance(a, (str, torch.device)) and torch.device(a).type == "cuda" for a in targets):
            out = self.detach().clone()
            out._fake_cuda = True
            return out
        return original_to(self, *args, **kwargs)

    def all_reduce(t, op=None, group=None, async_op=False):
        _check(t)
        t.mul_(WORLD)

    def all_gather(out, t, group=None, async_op=False):
        _check(t)
        for o in out:
            _check(o)
            o.copy_(t)

    def broadcast(t, src, group=None, async_op=False):
        _check(t)

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(tdist, "is_available", lambda: True)
    monkeypatch.setattr(tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(tdist, "get_world_size", lambda group=None: WORLD)
    monkeypatch.setattr(tdist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(tdist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(tdist, "all_reduce", all_reduce)
    monkeypatch.setattr(tdist, "all_gather", all_gather)
    monkeypatch.setattr(tdist, "broadcast", broadcast)
