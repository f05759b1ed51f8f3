"""Tokens/s of the SFT recipe's step against a bare PyTorch loop over the same batches and model.

The recipe's step (``train.sft``'s own pieces: ShardReader with the length guard and
tokenization in its read-ahead thread, micro-batching and collation, the DeepSpeed engine
with ZeRO) and the baseline — a plain loop (forward, backward, clip, AdamW, LR schedule)
over the *same* micro-batches, collated in memory beforehand, on the same model built from
the same seed — run in one process, in lockstep: a recipe step, then a bare step, and so
on, so that load from other processes on a shared machine hits both alike. The ratio is
the recipe's overhead: DeepSpeed, the reader and collation together.

With ``--ranks 2`` the script relaunches itself under torchrun and compares the recipe on
2 ranks with a bare DistributedDataParallel loop over each rank's same batches.

    python benchmarks/bench_sft.py                      # 1 process
    python benchmarks/bench_sft.py --ranks 2            # 2 ranks (gloo on CPU)
    python benchmarks/bench_sft.py --zero-stage 0 --micro-batch 8 --steps 30

Prints figures and ratios; nothing is asserted (speed is measured here, never in tests).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def make_shards(folder: Path, samples: int) -> Path:
    from test_sft import write_shards  # the tests' shard world: answers of varied length

    return write_shards(folder, n=samples, maxcount=64)


def recipe_config(args, shards: Path):
    from train.sft import SFTConfig

    return SFTConfig(shards=str(shards), output="unused", micro_batch=args.micro_batch, grad_accum=1,
                     lr=1e-3, warmup_ratio=0.0, max_length=512, zero_stage=args.zero_stage, stages=["easy"])


def recipe_side(args, shards: Path, dist, tokenizer):
    """The recipe's own pieces, as ``train.sft.train`` wires them: reader with the length
    guard and tokenization in its read-ahead thread, micro-batching + collation, DeepSpeed."""
    from train import sft

    config = recipe_config(args, shards)
    total = args.warmup + args.steps
    _, engine, _ = sft.build_engine(config, tokenizer, total)
    engine.train()
    reader = sft.make_reader(config, "easy", 0, dist,
                             sft.SamplePreparer(tokenizer, config.max_length, config.length_policy))
    batches = iter(sft.make_loader(reader, config, tokenizer))
    count = iter(range(1, 1 << 30))

    def step() -> dict[str, float]:
        return sft.train_step(engine, batches, 1, dist, next(count))

    return step, batches


def same_batches(args, shards: Path, dist, tokenizer) -> list[dict]:
    """The micro-batches the recipe's rank reads, in order, collated once in memory."""
    from train import sft

    config = recipe_config(args, shards)
    reader = sft.make_reader(config, "easy", 0, dist,
                             sft.SamplePreparer(tokenizer, config.max_length, config.length_policy))
    batches = iter(sft.make_loader(reader, config, tokenizer))
    return [next(batches) for _ in range(args.warmup + args.steps)]


def bare_side(args, shards: Path, batches: list[dict], dist, tokenizer):
    """A plain loop doing the recipe's work: the same model (the recipe's settings: LoRA
    targets, rank, alpha; the same seed), the same AdamW groups and weight decay, clipping and
    LR schedule; forward, backward, clip, step. (Before, it built the model with other LoRA
    targets and AdamW's default weight decay 0.01: its losses drifted 1.76 nats from the
    recipe's though the batches were the same.)"""
    import torch

    from train import sft
    from train.launch import WarmupCosine, param_groups
    from train.model import VideoLMM

    config = recipe_config(args, shards)
    model = VideoLMM.build(sft.model_settings(config), tokenizer, seed=config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(model, config.weight_decay)
    if dist.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(groups, lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(0, len(batches)))
    model.train()
    it = iter(batches)

    def step() -> dict[str, float]:
        b = next(it)
        out = model(b["input_ids"], b["feat"], b["attention_mask"], b["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return {"tokens": b["tokens"], "loss_sum": out.loss.item()}

    return step


def measure(args) -> None:
    from dataengine import dist as collective
    from dataengine.models import load_tokenizer, resolve_lm
    from train import launch

    dist = launch.setup_distributed()
    logging.getLogger("train").setLevel(logging.WARNING)
    tokenizer = load_tokenizer(resolve_lm("tiny"))
    shards = Path(args.shards)
    bare_step = bare_side(args, shards, same_batches(args, shards, dist, tokenizer), dist, tokenizer)
    recipe_step, recipe_batches = recipe_side(args, shards, dist, tokenizer)
    # Lockstep: a recipe step, then a bare step on the same batch, and so on. The machine is
    # shared, so load that comes and goes hits both sides alike; per-step ratios are kept.
    times = {"recipe": [], "bare": []}
    tokens, wait, losses = 0.0, 0.0, []
    for i in range(args.warmup + args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        sums = recipe_step()
        dist.barrier()
        t1 = time.perf_counter()
        bare = bare_step()
        dist.barrier()
        t2 = time.perf_counter()
        if i >= args.warmup:
            times["recipe"].append(t1 - t0)
            times["bare"].append(t2 - t1)
            tokens += sums["tokens"]
            wait += sums["data_wait"]
            losses.append((sums["loss_sum"], bare["loss_sum"]))
    del recipe_batches  # the reader's read-ahead thread ends with its iterator
    tokens, wait = collective.all_sum([tokens, wait])
    if not dist.is_main:
        return
    what = "bare DDP loop" if dist.world_size > 1 else "bare PyTorch loop"
    recipe_s, bare_s = sum(times["recipe"]), sum(times["bare"])
    ratios = [b / r for r, b in zip(times["recipe"], times["bare"])]
    print(f"\nSFT step, tiny LM + LoRA r=32, micro-batch {args.micro_batch} per rank, ZeRO-{args.zero_stage}, "
          f"{dist.world_size} rank(s), {args.steps} timed steps in lockstep "
          f"(threads per rank: {os.environ.get('OMP_NUM_THREADS', 'default')})")
    print(f"  {'':<20}{'tokens/s':>10}{'s/step':>9}")
    print(f"  {'recipe':<20}{tokens / recipe_s:>10,.0f}{recipe_s / args.steps:>9.3f}")
    print(f"  {what:<20}{tokens / bare_s:>10,.0f}{bare_s / args.steps:>9.3f}")
    print(f"  recipe / {what}: {bare_s / recipe_s:.3f}x (median of per-step ratios {statistics.median(ratios):.3f}x)")
    print(f"  data-wait share of the recipe's step time: {100 * wait / dist.world_size / recipe_s:.2f}%")
    same = max(abs(a - b) for a, b in losses)
    print(f"  same batches, same model and optimizer: largest loss difference between the two sides {same:.2e}"
          + ("" if same < 1e-3 else " (DeepSpeed's ZeRO flattens and reduces gradients in another order: float "
                                    "rounding, amplified over the steps)"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=320, help="samples in the benchmark shards")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=40, help="timed steps")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--shards", default="", help=argparse.SUPPRESS)  # set for the torchrun workers
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)
    if args.shards:
        measure(args)
        return 0
    per_rank_needed = (args.warmup + args.steps) * args.micro_batch * args.ranks
    with tempfile.TemporaryDirectory() as tmp:
        # The benchmark streams the easy stage only (65 % of the samples).
        shards = make_shards(Path(tmp) / "shards", max(args.samples, int(per_rank_needed / 0.6) + 8))
        if args.ranks == 1:
            args.shards = str(shards)
            measure(args)
            return 0
        from train.launch import free_port

        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__,
               "--shards", str(shards), "--micro-batch", str(args.micro_batch), "--warmup", str(args.warmup),
               "--steps", str(args.steps), "--zero-stage", str(args.zero_stage)]
        return subprocess.run(cmd, env=env, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
