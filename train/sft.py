"""Curriculum SFT of the video LMM on DeepSpeed, streaming from shards.

The model (``train.model.VideoLMM``) is a causal LM under LoRA (or QLoRA) plus a projector
from CLIP width to LM width; each sample's ``<video>`` placeholder becomes its projected
``feat`` rows and the loss is the NLL of the assistant tokens only (vicuna v1 template,
``train.conversation``). The curriculum is a list of stages streamed in order — by default
``easy`` (short answers) for one epoch, then ``hard`` — under one warmup + cosine LR
schedule whose length comes from the manifest's sample counts. ``--curriculum mixed``
instead shuffles all the stages together in every epoch (what the tiny random-init demo LM
needs; see ``SFTConfig.curriculum``).

The LoRA adapters go on the attention and MLP projections (the paper's r=32, alpha=32); on
the random-init ``tiny`` LM also on ``lm_head`` (``default_lora_targets``): its frozen random
output layer and final norm cap every logit near ±3, so with the base head alone no answer
token gets more than a few per cent of probability — the loss stays above about 4 nats per
token, however long it trains.

Data path: ``dataengine.reader.ShardReader`` deals each stage to the ranks (every rank gets
the same number of samples, hence the same number of steps), runs the length guard and
tokenization in its read-ahead thread (a sample longer than ``max_length`` once the video
rows are spliced in is truncated or skipped by one rule on every rank, and counted), and the
loop batches ``micro_batch`` samples at a time; in a sequential curriculum a batch never
mixes stages (a stage's last batch may be short). A skipped sample's slot holds the
reader's stand-in with no target tokens, so ranks stay in step.

Batches come through torchdata's ``StatefulDataLoader`` over the reader. Checkpoints (every
``save_every`` steps and at the end) hold adapter, projector, optimizer, scheduler, step,
stage, the loader's state (the reader's position) and RNG states; ``--resume`` continues from
the latest one so that the following losses equal an uninterrupted run's. The final model is
``OUTPUT/model`` (load it with ``VideoLMM.load``). The run folder, the metrics line, the
shared settings and what ``--max-steps`` / ``--stop-after-steps`` / ``--overwrite`` mean are
``train/runs.py``'s and ``train/trainer_config.py``'s, the same for the three trainers. A
non-finite feature or loss stops the run naming the shard and key (``train/finite.py``).

Run it::

    vlmr train sft --config train/configs/sft_tiny.yaml              # one process
    python train/sft.py --config train/configs/sft_tiny.yaml         # the same
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 train/sft.py --config train/configs/sft_tiny.yaml
    deepspeed --num_gpus 8 train/sft.py --config my.yaml --zero-stage 2 --precision bf16
    deepspeed --hostfile hosts.txt train/sft.py --config my.yaml     # multi-node: shards on
                                                                     # shared storage or s3://
    vlmr train sft --config train/configs/sft_tiny.yaml --resume     # continue the latest checkpoint

On a machine without CUDA it runs on DeepSpeed's CPU accelerator over gloo (give each rank
one thread with OMP_NUM_THREADS when ranks share cores).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

from torch.utils.data import IterableDataset

from dataengine import config as cfg
from train.trainer_config import SupervisedConfig, budget

log = logging.getLogger(__name__)

STATE_FORMAT = "vlmr-sft-state/1"
# Settings a resumed run must share with the checkpoint: they fix the data order and the plan.
PLAN_FIELDS = ("shards", "stages", "epochs_per_stage", "micro_batch", "grad_accum", "shuffle",
               "window", "seed", "max_length", "length_policy", "model", "lora_r", "lora_alpha", "qlora",
               "lora_targets", "curriculum", "max_steps", "template")


@dataclass
class SFTConfig(SupervisedConfig):
    """Curriculum SFT of the video LMM (easy, then hard) on DeepSpeed, streaming from shards."""

    NAME: ClassVar[str] = "sft"

    output: str = "runs/sft"
    """Run folder: config.json, metrics.jsonl, checkpoints/, and model/ (the trained model)."""
    model: str = "tiny"
    """Base causal LM: 'tiny' or a local checkpoint folder (e.g. a Vicuna/LLaVA-1.5 7B)."""
    tokenizer: str = ""
    """Tokenizer folder or 'tiny' (default: the one in the model folder)."""
    feat_dim: int = 0
    """Width of the video features; 0 reads it from the first sample of the shards."""
    curriculum: Literal["sequential", "mixed"] = "sequential"
    """sequential: the stages one after another (the paper's curriculum; a batch never mixes
    stages). mixed: each epoch shuffles all the stages together, sample by sample. The tiny
    random-init demo LM needs mixed: after an easy-only stage it no longer learns the long
    answers (it repeats one word), and a hard-only stage then makes it forget the short ones."""
    epochs_per_stage: int = 1
    """Epochs of each stage before moving to the next (mixed: epochs of all stages together)."""
    length_policy: Literal["truncate", "skip"] = "truncate"
    """Too-long samples: cut the last answer to fit, or leave the sample out (both counted)."""
    lora_r: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=list)
    """Modules of the base LM that get LoRA adapters; empty: the attention and MLP
    projections (q/k/v/o/gate/up/down_proj) as in the paper, plus lm_head for the
    random-init 'tiny' LM (its frozen output layer caps every logit near ±3)."""

    def problems(self) -> list[str]:
        p = super().problems()
        cfg.check(p, self.epochs_per_stage >= 1, "--epochs-per-stage must be >= 1")
        cfg.check(p, self.lora_r >= 1 and self.lora_alpha > 0, "--lora-r must be >= 1, --lora-alpha > 0")
        cfg.check(p, 0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)")
        cfg.check(p, self.feat_dim >= 0, "--feat-dim must be >= 0")
        return p


@dataclass(frozen=True)
class Phase:
    """One epoch of one stage of the curriculum, and how many optimizer steps it gives.

    A mixed curriculum's epoch reads several stages; its ``stage`` is their names joined by
    '+' (e.g. 'easy+hard'), the label metrics and logs carry.
    """

    stage: str
    epoch: int
    samples_per_rank: int
    steps: int
    stages: tuple[str, ...] = ()
    """The shard stages this phase reads (empty: just ``stage``)."""

    @property
    def reads(self) -> tuple[str, ...]:
        return self.stages or (self.stage,)


# ---------------------------------------------------------------------------- data

class SamplePreparer:
    """Runs in the reader's read-ahead thread: length guard, then tokenization.

    Returns None for a sample the guard leaves out (the reader counts it and fills its slot).
    """

    def __init__(self, tokenizer, max_length: int, policy: str, on_error: str = "raise",
                 template: str = "vicuna_v1"):
        from train import conversation
        from train.length import LengthGuard

        self.tokenizer = tokenizer
        self.max_length = max_length
        self.on_error = on_error
        self.template = template
        chat = conversation.chat_template(template, tokenizer)
        self.guard = LengthGuard(tokenizer, max_length, policy=policy, render=chat.render, count=chat.count_tokens)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        from train.finite import check_features
        from train.model import tokenize_sample

        if not check_features(sample, self.on_error):
            return None
        sample = self.guard.apply(sample)
        if sample is None:
            return None
        # max_length again: a safety net that cuts the tail should a tokenizer count differ.
        return tokenize_sample(sample, self.tokenizer, max_length=self.max_length, template=self.template)


def make_reader(config: SFTConfig, stage: str, epoch: int, dist, prepare=None):
    from dataengine.reader import ShardReader

    return ShardReader(config.shards, stages=[stage], rank=dist.rank, world_size=dist.world_size,
                       batch_size=config.micro_batch, shuffle=config.shuffle, window=config.window,
                       seed=config.seed, epoch=epoch, fields=("json", "feat"), on_error=config.on_error,
                       verify=config.verify, guard=prepare)


class MixedStages(IterableDataset):
    """Several stages' readers merged sample by sample (``curriculum: mixed``).

    Each stage is dealt to the ranks by its own reader, so every rank has the same number of
    samples of each stage; the merge order is a permutation of the stage labels seeded by
    (seed, epoch), the same on every rank. The state is the readers' states plus the number
    of samples handed out, so a resumed epoch continues the same sequence.
    """

    STATE_FORMAT = "vlmr-mixed-stages/1"

    def __init__(self, readers: list, seed: int, epoch: int):
        import numpy as np

        super().__init__()
        self.readers = readers
        labels = np.repeat(np.arange(len(readers)), [len(r) for r in readers])
        self.order = [int(x) for x in np.random.default_rng([seed, epoch, len(readers)]).permutation(labels)]
        self.position = 0

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        streams = [iter(r) for r in self.readers]
        try:
            while self.position < len(self.order):
                which = self.order[self.position]
                sample = next(streams[which], None)
                if sample is None:
                    raise RuntimeError(f"stage {self.readers[which].stages} ended before its planned "
                                       "samples (the manifest's counts do not match the shards?)")
                self.position += 1  # counted before it is handed out: the state covers it
                yield sample
        finally:
            for stream in streams:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()

    def state_dict(self) -> dict[str, Any]:
        return {"format": self.STATE_FORMAT, "position": self.position,
                "readers": [r.state_dict() for r in self.readers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != self.STATE_FORMAT or len(state.get("readers", ())) != len(self.readers):
            raise ValueError(f"reader state is not a mixed state of {len(self.readers)} stages "
                             "(resume with the curriculum and stages the checkpoint was made with)")
        self.position = int(state["position"])
        for reader, reader_state in zip(self.readers, state["readers"]):
            reader.load_state_dict(reader_state)

    def stats(self) -> dict[str, Any]:
        from dataengine.reader import ReaderStats

        total = ReaderStats()
        for reader in self.readers:
            total.add(ReaderStats.from_dict(reader.stats()))
        return total.to_dict()


def make_stream(config: SFTConfig, phase: Phase, dist, tokenizer=None):
    """``(reader, preparers)`` of a phase: one stage's reader, or a :class:`MixedStages`.

    With a tokenizer, each reader gets a :class:`SamplePreparer` (length guard and
    tokenization in its read-ahead thread); each thread has a tokenizer of its own.
    """
    import copy

    readers, preparers = [], []
    for i, stage in enumerate(phase.reads):
        prepare = None
        if tokenizer is not None:
            prepare = SamplePreparer(tokenizer if i == 0 else copy.deepcopy(tokenizer),
                                     config.max_length, config.length_policy, config.on_error, config.template)
            preparers.append(prepare)
        readers.append(make_reader(config, stage, phase.epoch, dist, prepare))
    if len(readers) == 1 and not phase.stages:
        return readers[0], preparers
    return MixedStages(readers, config.seed, phase.epoch), preparers


def plan_curriculum(config: SFTConfig, dist) -> list[Phase]:
    """Phases in order with their step counts, from the manifest alone (no tar is opened)."""
    phases = []
    per_step = config.micro_batch * config.grad_accum
    if config.curriculum == "mixed":
        groups = [("+".join(config.stages), tuple(config.stages))]
    else:
        groups = [(stage, ()) for stage in config.stages]
    for name, stages in groups:
        for epoch in range(config.epochs_per_stage):
            phase = Phase(name, epoch, 0, 0, stages)
            per_rank = len(make_stream(config, phase, dist)[0])
            # The last micro-batch of a stage may be short; micro-batches that do not make a
            # whole accumulation are left unused (and reported).
            steps = -(-per_rank // config.micro_batch) // config.grad_accum
            if steps == 0:
                log.warning("stage %s has %d samples per rank, fewer than one step (%d): skipped",
                            name, per_rank, per_step)
            phases.append(Phase(name, epoch, per_rank, steps, stages))
    if not any(p.steps for p in phases):
        raise ValueError(f"{config.shards}: stages {config.stages} give no full step of "
                         f"{per_step} samples per rank on {dist.world_size} rank(s)")
    phases = [dataclasses.replace(p, steps=n) for p, n in zip(phases, budget([p.steps for p in phases],
                                                                              config.max_steps))]
    while not phases[-1].steps:  # --max-steps ended the run in an earlier phase
        phases.pop()
    return phases


def feat_width(config: SFTConfig) -> int:
    """The shards' feature width D, from the first sample of the first stage."""
    from dataengine.reader import ShardReader

    reader = ShardReader(config.shards, stages=[config.stages[0]], shuffle="none", fields=("feat",),
                         prefetch_bytes=0)
    sample = next(iter(reader))
    return int(sample["feat"].shape[-1])


def make_loader(stream, config: SFTConfig, tokenizer):
    """Batches of ``micro_batch`` consecutive samples of one rank's stream of a phase (the last
    may be short; every rank has the same number of samples, so the same batches), through
    torchdata's ``StatefulDataLoader``: its ``state_dict()`` (the reader's position inside it)
    is what a checkpoint stores. One process: the reader's own thread reads ahead."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    from train.model import collate

    def collate_batch(samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(samples, tokenizer, template=config.template)
        batch["shards"] = [s.get("shard", "") for s in samples]
        return batch

    return StatefulDataLoader(stream, batch_size=config.micro_batch, num_workers=0, collate_fn=collate_batch)


# ---------------------------------------------------------------------------- one step

def train_step(engine, batches: Iterator[dict[str, Any]], grad_accum: int, ranks, step: int) -> dict[str, float]:
    """Optimizer step ``step`` over ``grad_accum`` micro-batches; returns this rank's sums.
    A non-finite loss stops the run, naming the batch's shards and keys."""
    from train.finite import check_loss

    sums = {"loss_sum": 0.0, "loss_count": 0.0, "tokens": 0.0, "samples": 0.0, "data_wait": 0.0,
            "substitutes": 0.0}
    keys: list[str] = []
    for _ in range(grad_accum):
        t0 = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            raise RuntimeError("the reader ended before the planned steps (the manifest's counts "
                               "do not match the shards?)")
        sums["data_wait"] += time.perf_counter() - t0
        device = ranks.device
        out = engine(batch["input_ids"].to(device), batch["feat"].to(device),
                     batch["attention_mask"].to(device), batch["labels"].to(device))
        check_loss(out.loss, step=step, rank=ranks.rank, keys=batch["keys"], shards=batch["shards"])
        engine.backward(out.loss)
        engine.step()
        if batch["targets"]:
            sums["loss_sum"] += out.loss.item()
            sums["loss_count"] += 1
        sums["tokens"] += batch["tokens"]
        sums["samples"] += len(batch["keys"])
        sums["substitutes"] += batch["substitutes"]
        keys.extend(batch["keys"])
    sums["keys"] = keys  # type: ignore[assignment]
    return sums


# ---------------------------------------------------------------------------- recipe

WINDOW_KEYS = ("loss_sum", "loss_count", "tokens", "samples", "data_wait")


def train(config: SFTConfig, ranks) -> dict[str, Any]:
    """Run (or resume) the curriculum; returns a summary (steps, last metrics, model path)."""
    import torch

    from dataengine.models import load_tokenizer, resolve_lm
    from train import launch
    from train.runs import Run

    run = Run.open(config, ranks, state_format=STATE_FORMAT, plan_fields=PLAN_FIELDS)
    torch.manual_seed(config.seed)

    # -- setup, in dependency order: tokenizer, curriculum, model, engine -----------------
    tokenizer = load_tokenizer(config.tokenizer or resolve_lm(config.model))
    phases = plan_curriculum(config, ranks)
    total_steps = sum(p.steps for p in phases)
    model, engine, scheduler = build_engine(config, tokenizer, total_steps)
    log.info("sft: %d rank(s), %s, %d steps (%s), %s trainable parameters", ranks.world_size,
             config.model, total_steps, ", ".join(f"{p.stage}#{p.epoch}: {p.steps}" for p in phases),
             f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
    step, phase_index, phase_step, loader_state = 0, 0, 0, None
    resumed = run.resume(engine, before_load=lambda folder: check_same_adapters(
        folder, engine.module.settings.lora_targets))
    if resumed is not None:
        state, rank_state = resumed
        step, phase_index, phase_step, loader_state = (state["step"], state["phase"], state["phase_step"],
                                                       rank_state["loader"])
    last: dict[str, Any] | None = None
    stopped, first_step = False, step

    # -- the curriculum: phases in order, one LR schedule -----------------------------------
    engine.train()
    for index in range(phase_index, len(phases)):
        phase = phases[index]
        if index != phase_index:
            phase_step, loader_state = 0, None
        if phase_step >= phase.steps:
            continue
        reader, preparers = make_stream(config, phase, ranks, tokenizer)
        loader = make_loader(reader, config, tokenizer)
        if loader_state is not None:
            loader.load_state_dict(loader_state)
        batches = iter(loader)
        window = dict.fromkeys(WINDOW_KEYS, 0.0)
        window_steps = 0
        while phase_step < phase.steps:
            if config.stop_after_steps and step >= config.stop_after_steps:
                stopped = True
                break
            lr = scheduler.get_last_lr()[0]  # the LR this step uses
            sums = train_step(engine, batches, config.grad_accum, ranks, step + 1)
            step += 1
            phase_step += 1
            window_steps += 1
            for k in WINDOW_KEYS:
                window[k] += sums[k]
            if config.log_keys:
                run.record_keys(step, phase.stage, sums["keys"])
            if step % config.log_every == 0 or phase_step == phase.steps:
                last = log_metrics(run, step, total_steps, phase.stage, lr, window, window_steps, step - first_step)
                window, window_steps = dict.fromkeys(WINDOW_KEYS, 0.0), 0
            if (config.save_every and step % config.save_every == 0) or step == total_steps:
                # Taken between steps: the loader has handed out exactly the samples trained on.
                run.save(step, engine=engine, model=model,
                         trainer_state={"phase": index, "phase_step": phase_step, "stage": phase.stage,
                                        "epoch": phase.epoch},
                         rank_state={"loader": loader.state_dict()})
        report_phase(phase, config, reader, preparers, ranks, finished=not stopped)
        if stopped:
            break

    run.close()
    summary = {"steps": step, "total_steps": total_steps, "stopped_early": stopped, "last": last, "model": None}
    if not stopped:
        summary["model"] = str(launch.save_final_model(model, run.model_dir, ranks))
    return summary


def log_metrics(run, step: int, total_steps: int, stage: str, lr: float, window: dict[str, float], steps: int,
                done_here: int) -> dict[str, Any]:
    """The window's sums over ranks; rank 0 writes the line ``step | stage | loss | lr | tok/s |
    samples/s | data-wait | eta`` and the metrics. Every rank calls it (it all-reduces)."""
    from dataengine import dist
    from train.runs import metrics_line

    loss_sum, loss_count, tokens, samples, data_wait = dist.all_sum([window[k] for k in WINDOW_KEYS])
    elapsed = run.lap()
    metrics = {"step": step, "stage": stage, "loss": loss_sum / max(loss_count, 1), "lr": lr,
               "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
               "samples_per_s": samples / elapsed if elapsed > 0 else 0.0,
               "data_wait": data_wait / run.ranks.world_size / elapsed if elapsed > 0 else 0.0,
               "eta_s": run.eta(done_here, step, total_steps), "tokens": tokens, "samples": samples,
               "seconds": elapsed, "steps": steps}
    run.log(metrics, metrics_line(step, total_steps, [
        stage, f"loss {metrics['loss']:.4f}", f"lr {lr:.2e}", f"tok/s {metrics['tokens_per_s']:,.0f}",
        f"samples/s {metrics['samples_per_s']:.1f}", f"data-wait {100 * metrics['data_wait']:.1f}%"],
        metrics["eta_s"]))
    return metrics


def model_settings(config: SFTConfig):
    """The video LMM's settings for this config (fresh LoRA on ``lora_targets`` or the defaults)."""
    from train.model import ModelSettings, default_lora_targets

    targets = list(config.lora_targets or default_lora_targets(config.model))
    if str(config.model) == "tiny" and "lm_head" not in targets:
        log.warning("--lora-targets without lm_head on the random-init tiny LM: its frozen head caps "
                    "every logit near ±3, so the loss cannot go much below 4 nats per token")
    return ModelSettings(lm=config.model, feat_dim=config.feat_dim or feat_width(config),
                         lora_r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                         lora_targets=targets, qlora=config.qlora, template=config.template,
                         dtype="bfloat16" if config.precision == "bf16" else "float32")


def build_engine(config: SFTConfig, tokenizer, total_steps: int):
    """The model (fresh LoRA + projector from ``seed``) inside a DeepSpeed engine."""
    from train import launch
    from train.model import VideoLMM

    model = VideoLMM.build(model_settings(config), tokenizer, seed=config.seed)
    ds_config = launch.deepspeed_config(micro_batch=config.micro_batch, grad_accum=config.grad_accum,
                                        zero_stage=config.zero_stage, precision=config.precision,
                                        grad_clip=config.grad_clip)
    engine, scheduler = launch.initialize(
        model, ds_config, lr=config.lr, weight_decay=config.weight_decay,
        warmup_steps=int(config.warmup_ratio * total_steps), total_steps=total_steps,
        min_lr_ratio=config.min_lr_ratio)
    return model, engine, scheduler


def check_same_adapters(folder: Path, targets: list[str]) -> None:
    """The checkpoint's model has adapters on the modules this run wraps (a run made before
    lm_head joined the tiny LM's default targets has none there)."""
    from train import launch
    from train.model import MODEL_CONFIG

    saved = folder / launch.MODEL_DIR / MODEL_CONFIG
    if not saved.exists():
        return
    saved_targets = json.loads(saved.read_text())["settings"].get("lora_targets")
    if saved_targets is not None and sorted(saved_targets) != sorted(targets):
        raise ValueError(f"{folder}: cannot resume: its LoRA adapters wrap {sorted(saved_targets)}, this run's "
                         f"would wrap {sorted(targets)} (pass --lora-targets {' '.join(saved_targets)})")


def report_phase(phase: Phase, config: SFTConfig, reader, preparers: list[SamplePreparer], dist,
                 finished: bool = True) -> dict[str, Any]:
    """What the length guard and the reader left out or changed in a phase, summed over
    ranks; rank 0 logs it and appends it to OUTPUT/stages.jsonl. The counts are of the
    samples read in this process (the read-ahead included), so a resumed phase counts anew."""
    from dataengine import dist as collective

    stats = reader.stats()
    counts = {k: sum(p.guard.counts[k] for p in preparers) for k in ("fit", "truncated", "dropped")}
    per_step = config.micro_batch * config.grad_accum
    fit, truncated, dropped, substituted, skipped = (int(v) for v in collective.all_sum(
        [counts["fit"], counts["truncated"], counts["dropped"], stats["substituted"], stats["skipped_total"]]))
    report = {"stage": phase.stage, "epoch": phase.epoch, "steps": phase.steps, "finished": finished,
              "fit": fit, "truncated": truncated, "left_out": dropped, "reader_skipped": skipped,
              "stand_ins": substituted,
              "unused_tail_per_rank": max(0, phase.samples_per_rank - phase.steps * per_step)}
    if dist.is_main:
        log.info("stage %s epoch %d %s: length guard fit %d, truncated %d, left out %d; reader skipped %d "
                 "(their %d slots held stand-ins without targets); %d sample(s) per rank after the last "
                 "full step unused", phase.stage, phase.epoch, "done" if finished else "interrupted",
                 fit, truncated, dropped, skipped, substituted, report["unused_tail_per_rank"])
        with open(Path(config.output) / "stages.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(report) + "\n")
    return report


def main(argv: list[str] | None = None, prog: str = "train/sft.py") -> int:
    from train import launch

    config, dist, summary = launch.run_recipe(SFTConfig, train, argv, prog)
    if dist.is_main:
        log.info("sft: %d/%d steps%s; model: %s", summary["steps"], summary["total_steps"],
                 " (stopped at --stop-after-steps)" if summary["stopped_early"] else "", summary["model"])
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("VLMR_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    sys.exit(main())
