"""Curriculum SFT of the video LMM on DeepSpeed, streaming from shards.

The model (``train.model.VideoLMM``) is a causal LM under LoRA (or QLoRA) plus a projector
from CLIP width to LM width; each sample's ``<video>`` placeholder becomes its projected
``feat`` rows and the loss is the NLL of the assistant tokens only (vicuna v1 template,
``train.conversation``). The curriculum is a list of stages streamed in order — by default
``easy`` (short answers) for one epoch, then ``hard`` — under one warmup + cosine LR
schedule whose length comes from the manifest's sample counts.

Data path: ``dataengine.reader.ShardReader`` deals each stage to the ranks (every rank gets
the same number of samples, hence the same number of steps), runs the length guard and
tokenization in its read-ahead thread (a sample longer than ``max_length`` once the video
rows are spliced in is truncated or skipped by one rule on every rank, and counted), and the
loop batches ``micro_batch`` samples at a time; a batch never mixes stages (a stage's last
batch may be short). A skipped sample's slot holds the reader's stand-in with no target
tokens, so ranks stay in step.

Checkpoints (every ``save_every`` steps and at the end) hold adapter, projector, optimizer,
scheduler, step, stage, reader position and RNG states; ``--resume`` continues from the
latest one so that the following losses equal an uninterrupted run's. The final model is
``OUTPUT/model`` (load it with ``VideoLMM.load``).

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

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from dataengine import config as cfg

log = logging.getLogger(__name__)

STATE_FORMAT = "vlmr-sft-state/1"
# Settings a resumed run must share with the checkpoint: they fix the data order and the plan.
PLAN_FIELDS = ("shards", "stages", "epochs_per_stage", "micro_batch", "grad_accum", "shuffle",
               "window", "seed", "max_length", "length_policy", "model", "lora_r", "lora_alpha", "qlora")


@dataclass
class SFTConfig:
    """Curriculum SFT of the video LMM (easy, then hard) on DeepSpeed, streaming from shards."""

    shards: str = "shards/demo"
    """Shard set made by `vlmr build-shards`: folder or manifest.json, local or URL (s3://, https://)."""
    output: str = "runs/sft"
    """Run folder: config.json, metrics.jsonl, checkpoints/, and model/ (the trained model)."""
    model: str = "tiny"
    """Base causal LM: 'tiny' or a local checkpoint folder (e.g. a Vicuna/LLaVA-1.5 7B)."""
    tokenizer: str = ""
    """Tokenizer folder or 'tiny' (default: the one in the model folder)."""
    feat_dim: int = 0
    """Width of the video features; 0 reads it from the first sample of the shards."""
    stages: list[str] = field(default_factory=lambda: ["easy", "hard"])
    """Curriculum: stages of the shard set, trained in this order."""
    epochs_per_stage: int = 1
    """Epochs of each stage before moving to the next."""
    micro_batch: int = 8
    """Samples per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (global batch = micro_batch x grad_accum x ranks)."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.0
    """Final LR as a fraction of the peak (cosine decay)."""
    warmup_ratio: float = 0.03
    """Share of all steps (both stages) spent in linear warmup."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """Gradient norm clipping (0 turns it off)."""
    max_length: int = 2048
    """Longest sequence the model sees, video rows included."""
    length_policy: Literal["truncate", "skip"] = "truncate"
    """Too-long samples: cut the last answer to fit, or leave the sample out (both counted)."""
    lora_r: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    qlora: bool = False
    """Load the base LM 4-bit nf4 (bitsandbytes) under the LoRA adapters."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3 (QLoRA: 0-2)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    shuffle: Literal["window", "none", "stage"] = "window"
    """Reader shuffle; 'window' keeps the curriculum's length order at the scale of a window."""
    window: int = 64
    """Samples per shuffle window."""
    on_error: Literal["raise", "skip"] = "raise"
    """Corrupt shard data: stop naming the shard, or skip and count it."""
    seed: int = 0
    """Seeds the LoRA/projector initialisation and the reader's shuffle."""
    save_every: int = 0
    """Write a checkpoint every N optimizer steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (0 keeps all)."""
    resume: bool = False
    """Continue from OUTPUT/checkpoints/latest (same ranks and plan settings)."""
    max_steps: int = 0
    """Stop after this many optimizer steps of the whole run, as an interrupted run would:
    nothing is saved at the stop (0: the full curriculum). The LR schedule still spans the
    whole curriculum, so --resume carries on from the last checkpoint."""
    log_every: int = 1
    """Metrics line every N steps (rank 0)."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to OUTPUT/tensorboard (needs the tensorboard package)."""
    log_keys: bool = False
    """Write the sample keys each rank trains on, per step, to OUTPUT/keys/rank-N.tsv (audit)."""

    def __post_init__(self) -> None:
        p: list[str] = []
        cfg.check(p, bool(self.stages), "--stages: at least one stage")
        cfg.check(p, self.epochs_per_stage >= 1, "--epochs-per-stage must be >= 1")
        cfg.check(p, self.micro_batch >= 1, "--micro-batch must be >= 1")
        cfg.check(p, self.grad_accum >= 1, "--grad-accum must be >= 1")
        cfg.check(p, self.lr > 0, "--lr must be > 0")
        cfg.check(p, 0 <= self.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]")
        cfg.check(p, 0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)")
        cfg.check(p, self.weight_decay >= 0 and self.grad_clip >= 0, "--weight-decay and --grad-clip must be >= 0")
        cfg.check(p, self.max_length >= 2, "--max-length must be >= 2")
        cfg.check(p, self.lora_r >= 1 and self.lora_alpha > 0, "--lora-r must be >= 1, --lora-alpha > 0")
        cfg.check(p, 0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)")
        cfg.check(p, self.zero_stage in (0, 1, 2, 3), f"--zero-stage must be 0..3, got {self.zero_stage}")
        cfg.check(p, not (self.qlora and self.zero_stage == 3),
                  "--qlora with --zero-stage 3: ZeRO-3 cannot partition 4-bit weights; use 0-2")
        cfg.check(p, self.window >= 1, "--window must be >= 1")
        cfg.check(p, self.feat_dim >= 0, "--feat-dim must be >= 0")
        cfg.check(p, self.save_every >= 0 and self.keep_checkpoints >= 0 and self.max_steps >= 0,
                  "--save-every, --keep-checkpoints and --max-steps must be >= 0")
        cfg.check(p, self.log_every >= 1, "--log-every must be >= 1")
        cfg.raise_problems(p, "sft settings")


@dataclass(frozen=True)
class Phase:
    """One epoch of one stage of the curriculum, and how many optimizer steps it gives."""

    stage: str
    epoch: int
    samples_per_rank: int
    steps: int


# ---------------------------------------------------------------------------- data

class SamplePreparer:
    """Runs in the reader's read-ahead thread: length guard, then tokenization.

    Returns None for a sample the guard leaves out (the reader counts it and fills its slot).
    """

    def __init__(self, tokenizer, max_length: int, policy: str):
        import functools

        from dataengine.reader import LengthGuard
        from train import conversation

        self.tokenizer = tokenizer
        self.max_length = max_length
        self.guard = LengthGuard(
            tokenizer, max_length, policy=policy,
            render=functools.partial(conversation.render, eos=tokenizer.eos_token or conversation.SEP2),
            count=lambda text: conversation.count_tokens(text, tokenizer))

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        from train.model import tokenize_sample

        sample = self.guard.apply(sample)
        if sample is None:
            return None
        # max_length again: a safety net that cuts the tail should a tokenizer count differ.
        return tokenize_sample(sample, self.tokenizer, max_length=self.max_length)


def make_reader(config: SFTConfig, stage: str, epoch: int, dist, prepare=None):
    from dataengine.reader import ShardReader

    return ShardReader(config.shards, stages=[stage], rank=dist.rank, world_size=dist.world_size,
                       batch_size=config.micro_batch, shuffle=config.shuffle, window=config.window,
                       seed=config.seed, epoch=epoch, fields=("json", "feat"), on_error=config.on_error,
                       guard=prepare)


def plan_curriculum(config: SFTConfig, dist) -> list[Phase]:
    """Phases in order with their step counts, from the manifest alone (no tar is opened)."""
    phases = []
    per_step = config.micro_batch * config.grad_accum
    for stage in config.stages:
        for epoch in range(config.epochs_per_stage):
            per_rank = len(make_reader(config, stage, epoch, dist))
            # The last micro-batch of a stage may be short; micro-batches that do not make a
            # whole accumulation are left unused (and reported).
            steps = -(-per_rank // config.micro_batch) // config.grad_accum
            if steps == 0:
                log.warning("stage %s has %d samples per rank, fewer than one step (%d): skipped",
                            stage, per_rank, per_step)
            phases.append(Phase(stage, epoch, per_rank, steps))
    if not any(p.steps for p in phases):
        raise ValueError(f"{config.shards}: stages {config.stages} give no full step of "
                         f"{per_step} samples per rank on {dist.world_size} rank(s)")
    return phases


def feat_width(config: SFTConfig) -> int:
    """The shards' feature width D, from the first sample of the first stage."""
    from dataengine.reader import ShardReader

    reader = ShardReader(config.shards, stages=[config.stages[0]], shuffle="none", fields=("feat",),
                         prefetch_bytes=0)
    sample = next(iter(reader))
    return int(sample["feat"].shape[-1])


def micro_batches(reader, config: SFTConfig, tokenizer) -> Iterator[dict[str, Any]]:
    """Batches of ``micro_batch`` consecutive samples of one rank's stream (the last may be
    short; every rank has the same number of samples, so the same batches)."""
    from train.model import collate

    samples = iter(reader)
    try:
        while True:
            chunk = []
            for sample in samples:
                chunk.append(sample)
                if len(chunk) == config.micro_batch:
                    break
            if not chunk:
                return
            yield collate(chunk, tokenizer)
    finally:
        samples.close()


# ---------------------------------------------------------------------------- one step

def train_step(engine, batches: Iterator[dict[str, Any]], grad_accum: int, device) -> dict[str, float]:
    """One optimizer step over ``grad_accum`` micro-batches; returns this rank's sums."""
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
        out = engine(batch["input_ids"].to(device), batch["feat"].to(device),
                     batch["attention_mask"].to(device), batch["labels"].to(device))
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

def train(config: SFTConfig, dist) -> dict[str, Any]:
    """Run (or resume) the curriculum; returns a summary (steps, last metrics, model path)."""
    import torch

    from dataengine.models import load_tokenizer, resolve_lm
    from dataengine.schema import write_text_atomic
    from train import launch

    out = Path(config.output)
    ckpt_root = out / "checkpoints"
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.json", json.dumps(cfg.to_dict(config), indent=1) + "\n")
    torch.manual_seed(config.seed)

    # -- setup, in dependency order: tokenizer, curriculum, model, engine -----------------
    tokenizer = load_tokenizer(config.tokenizer or resolve_lm(config.model))
    phases = plan_curriculum(config, dist)
    total_steps = sum(p.steps for p in phases)
    model, engine, scheduler = build_engine(config, tokenizer, total_steps)
    log.info("sft: %d rank(s), %s, %d steps (%s), %s trainable parameters", dist.world_size,
             config.model, total_steps, ", ".join(f"{p.stage}#{p.epoch}: {p.steps}" for p in phases),
             f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
    step, phase_index, phase_step, reader_state = resume_position(config, engine, dist, ckpt_root, phases)

    metrics = launch.MetricsLog(dist, total_steps, out / "tensorboard" if config.tensorboard else None)
    metrics_file = out / "metrics.jsonl"
    keys_file = out / "keys" / f"rank-{dist.rank:05d}.tsv"
    if config.log_keys:
        keys_file.parent.mkdir(parents=True, exist_ok=True)
    last: dict[str, Any] | None = None
    stopped = False

    # -- the curriculum: phases in order, one LR schedule -----------------------------------
    engine.train()
    for index in range(phase_index, len(phases)):
        phase = phases[index]
        if index != phase_index:
            phase_step, reader_state = 0, None
        if phase_step >= phase.steps:
            continue
        prepare = SamplePreparer(tokenizer, config.max_length, config.length_policy)
        reader = make_reader(config, phase.stage, phase.epoch, dist, prepare)
        if reader_state is not None:
            reader.load_state_dict(reader_state)
        batches = micro_batches(reader, config, tokenizer)
        window = {"loss_sum": 0.0, "loss_count": 0.0, "tokens": 0.0, "samples": 0.0, "data_wait": 0.0, "steps": 0}
        try:
            while phase_step < phase.steps:
                if config.max_steps and step >= config.max_steps:
                    stopped = True
                    break
                lr = scheduler.get_last_lr()[0]  # the LR this step uses
                sums = train_step(engine, batches, config.grad_accum, dist.device)
                step += 1
                phase_step += 1
                for k in ("loss_sum", "loss_count", "tokens", "samples", "data_wait"):
                    window[k] += sums[k]
                window["steps"] += 1
                if config.log_keys:
                    with open(keys_file, "a", encoding="utf-8") as f:
                        f.write(f"{step}\t{phase.stage}\t" + " ".join(sums["keys"]) + "\n")
                if step % config.log_every == 0 or phase_step == phase.steps:
                    last = metrics.update(step=step, stage=phase.stage, lr=lr, **window)
                    if last is not None:
                        with open(metrics_file, "a", encoding="utf-8") as f:
                            f.write(json.dumps(last) + "\n")
                    window = dict.fromkeys(window, 0.0)
                    window["steps"] = 0
                is_last = index == len(phases) - 1 and phase_step == phase.steps
                if (config.save_every and step % config.save_every == 0) or is_last:
                    state = {"format": STATE_FORMAT, "step": step, "phase": index, "phase_step": phase_step,
                             "stage": phase.stage, "epoch": phase.epoch, "world_size": dist.world_size,
                             "config": cfg.to_dict(config)}
                    # Taken between steps: the reader has handed out exactly the samples trained on.
                    launch.save_checkpoint(ckpt_root, step, engine=engine, model=model, trainer_state=state,
                                           rank_state={"reader": reader.state_dict()}, dist=dist,
                                           keep=config.keep_checkpoints)
        finally:
            batches.close()
        report_phase(phase, config, reader, prepare, dist, finished=not stopped)
        if stopped:
            break

    metrics.close()
    summary = {"steps": step, "total_steps": total_steps, "stopped_early": stopped, "last": last,
               "model": None}
    if not stopped:
        summary["model"] = str(save_final_model(model, out / "model", dist))
    return summary


def build_engine(config: SFTConfig, tokenizer, total_steps: int):
    """The model (fresh LoRA + projector from ``seed``) inside a DeepSpeed engine."""
    from train import launch
    from train.model import ModelSettings, VideoLMM

    settings = ModelSettings(lm=config.model, feat_dim=config.feat_dim or feat_width(config),
                             lora_r=config.lora_r, lora_alpha=config.lora_alpha,
                             lora_dropout=config.lora_dropout, qlora=config.qlora,
                             dtype="bfloat16" if config.precision == "bf16" else "float32")
    model = VideoLMM.build(settings, tokenizer, seed=config.seed)
    ds_config = launch.deepspeed_config(micro_batch=config.micro_batch, grad_accum=config.grad_accum,
                                        zero_stage=config.zero_stage, precision=config.precision,
                                        grad_clip=config.grad_clip)
    engine, scheduler = launch.initialize(
        model, ds_config, lr=config.lr, weight_decay=config.weight_decay,
        warmup_steps=int(config.warmup_ratio * total_steps), total_steps=total_steps,
        min_lr_ratio=config.min_lr_ratio)
    return model, engine, scheduler


def resume_position(config: SFTConfig, engine, dist, ckpt_root: Path, phases: list[Phase]):
    """``(step, phase index, steps done in it, reader state)``: zeros, or the latest checkpoint's
    (whose engine, optimizer, scheduler and RNG states are loaded here)."""
    from train import launch

    if not config.resume:
        return 0, 0, 0, None
    folder = launch.latest_checkpoint(ckpt_root)
    if folder is None:
        log.warning("--resume: no checkpoint under %s; starting from the beginning", ckpt_root)
        return 0, 0, 0, None
    state, rank_state = launch.load_checkpoint(folder, engine=engine, dist=dist)
    check_resumable(state, config, folder)
    log.info("resumed %s: step %d, stage %s", folder, state["step"], phases[state["phase"]].stage)
    return state["step"], state["phase"], state["phase_step"], rank_state["reader"]


def check_resumable(state: dict[str, Any], config: SFTConfig, folder: Path) -> None:
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{folder}: not an SFT checkpoint (format {state.get('format')!r})")
    saved, now = state["config"], cfg.to_dict(config)
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in PLAN_FIELDS if saved.get(k) != now.get(k)]
    if diff:
        raise ValueError(f"{folder}: cannot resume with different plan settings:\n  " + "\n  ".join(diff))


def report_phase(phase: Phase, config: SFTConfig, reader, prepare: SamplePreparer, dist,
                 finished: bool = True) -> dict[str, Any]:
    """What the length guard and the reader left out or changed in a phase, summed over
    ranks; rank 0 logs it and appends it to OUTPUT/stages.jsonl. The counts are of the
    samples read in this process (the read-ahead included), so a resumed phase counts anew."""
    from train import launch

    stats = reader.stats()
    counts = prepare.guard.counts
    per_step = config.micro_batch * config.grad_accum
    fit, truncated, dropped, substituted, skipped = (int(v) for v in launch.all_sum(
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


def save_final_model(model, folder: Path, dist) -> Path:
    """The trained model as a loadable folder, written to a temp name and renamed (rank 0)."""
    from train import launch

    trainable = [p for p in model.parameters() if p.requires_grad]
    with launch.gathered(trainable):
        state = model.trainable_state() if dist.is_main else None
    if dist.is_main:
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save(tmp, state=state)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        log.info("saved model %s", folder)
    launch.barrier()
    return folder


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The ``deepspeed`` launcher appends ``--local_rank=N``; LOCAL_RANK carries it too."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            continue
        if arg in ("--local_rank", "--local-rank"):
            if i + 1 < len(argv):
                os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
            continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None, prog: str = "train/sft.py") -> int:
    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    config = cfg.parse_config(SFTConfig, argv, prog=prog)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from train import launch

    dist = launch.setup_distributed()
    if not dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    summary = train(config, dist)
    if dist.is_main:
        log.info("sft: %d/%d steps%s; model: %s", summary["steps"], summary["total_steps"],
                 " (stopped at --max-steps)" if summary["stopped_early"] else "", summary["model"])
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("VLMR_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    sys.exit(main())
