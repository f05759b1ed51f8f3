"""One rank of the distributed reader check; tests/test_reader_dist.py runs it under torchrun:

    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 --master_port PORT \\
        tests/reader_dist_worker.py SHARD_FOLDER OUT.json

Each rank streams the easy and hard stages through a StatefulDataLoader with two workers,
all-reduces once per batch (as DDP does for gradients: a rank with fewer batches would
hang the other, so the process group has a timeout and the run fails instead), stops after
STOP batches, saves the loader state, resumes in a fresh reader, and finishes the epoch.
Rank 0 writes what every rank yielded to OUT.json.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
from torchdata.stateful_dataloader import StatefulDataLoader

from dataengine.reader import ShardReader

BATCH = 3
STOP = 4


def main(folder: str, out: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()

    def loader(reader: ShardReader) -> StatefulDataLoader:
        return StatefulDataLoader(reader, batch_size=BATCH, num_workers=2,
                                  collate_fn=lambda samples: [s["json"]["id"] for s in samples])

    def reader() -> ShardReader:
        return ShardReader(folder, stages=["easy", "hard"], rank=rank, world_size=world, batch_size=BATCH,
                           shuffle="window", window=4, seed=11, epoch=0)

    def step(batch: list[int]) -> None:
        count = torch.tensor([len(batch)], dtype=torch.int64)
        dist.all_reduce(count)  # blocks until every rank reaches the same step

    first = loader(reader())
    head, steps = [], 0
    for batch in first:
        step(batch)
        head += batch
        steps += 1
        if steps == STOP:
            break
    state = first.state_dict()
    del first

    resumed_reader = reader()
    resumed_reader.load_state_dict(json.loads(json.dumps(state)))  # through a JSON checkpoint
    rest = []
    for batch in loader(resumed_reader):
        step(batch)
        rest += batch
        steps += 1

    total = torch.tensor([len(head) + len(rest)], dtype=torch.int64)
    dist.all_reduce(total)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "head": head, "rest": rest, "steps": steps,
                                      "expected": reader().sequence(), "total": int(total)})
    if rank == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2])
