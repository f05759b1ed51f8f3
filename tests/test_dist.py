"""dataengine.dist: every collective places its tensors where the backend takes them.

The fake NCCL group (``tests/fake_group.py``) rejects CPU tensors as NCCL does; gloo tests
cannot see that mistake (issue 14.2: PPO's advantage whitening all-reduced CPU tensors and
crashed at its first multi-GPU step).
"""

from __future__ import annotations

import pytest
import torch

import fake_group
from dataengine import dist


def test_one_process_collectives_return_their_input():
    assert dist.all_sum([1.0, 2.5]) == [1.0, 2.5]
    t = torch.tensor([1.0, 2.0])
    out = dist.all_reduce_sum(t)
    assert torch.equal(out, t) and out is not t
    assert dist.all_gather_json({"a": 1}) == [{"a": 1}]
    assert dist.broadcast_json([1, "x"]) == [1, "x"]
    ranks = dist.Ranks()
    assert ranks.is_main and ranks.world_size == 1 and ranks.device.type == "cpu"


def test_fake_nccl_rejects_cpu_tensors(monkeypatch):
    fake_group.install(monkeypatch)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.distributed.all_reduce(torch.zeros(2))


def test_collectives_move_tensors_to_cuda_for_nccl(monkeypatch):
    fake_group.install(monkeypatch)
    assert dist.backend_device() == torch.device("cuda", 0)
    assert dist.all_sum([1.0, 2.0]) == [2.0, 4.0]  # two identical ranks
    t = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    out = dist.all_reduce_sum(t)
    assert out.device.type == "cpu" and out.dtype == torch.float64 and torch.equal(out, 2 * t)
    assert torch.equal(t, torch.tensor([[1.0, 3.0]], dtype=torch.float64))  # the input is left alone
    assert dist.all_gather_json({"rank": "r", "n": [1, 2]}) == [{"rank": "r", "n": [1, 2]}] * 2
    assert dist.broadcast_json({"step": 3}) == {"step": 3}


def test_whitening_over_ranks_under_nccl(monkeypatch):
    """PPO's whitening path (rl.masked_whiten with dist.all_reduce_sum) under the fake NCCL
    group: two identical ranks, so the mean is this rank's, the variance over 2n tokens."""
    from train import rl

    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    fake_group.install(monkeypatch)
    white = rl.masked_whiten(x, mask, all_reduce=dist.all_reduce_sum)
    both = rl.masked_whiten(torch.cat([x, x]), torch.cat([mask, mask]))
    assert torch.allclose(white, both[:2], atol=1e-6)
