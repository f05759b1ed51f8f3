"""The settings every trainer shares, and their checks, written once.

``SFTConfig``, ``RMConfig`` and ``PPOConfig`` are these dataclasses plus their own fields:
the command line, ``--help`` and YAML keys stay flat (``--lr``, not ``--trainer.lr``), and a
field's docstring, default and range check live here only. A trainer that needs another
default re-declares the field (``lr: float = 2e-5``); its check stays the shared one.

Each config checks itself in ``__post_init__``: :meth:`TrainerConfig.problems` collects
every problem (the subclass adds its own to the shared ones) and one error lists them all.

Run length, three settings that mean different things:

- ``max_steps`` is a **budget**: train at most this many optimizer steps (PPO: PPO steps),
  with the LR schedule fitted to them, then save a checkpoint and the final model, as
  ``max_steps`` does in HF Trainer, torchtune and litgpt;
- ``stop_after_steps`` **simulates an interruption**: stop after this many steps exactly as
  a killed run would — nothing saved at the stop, the LR schedule still spanning the whole
  run — so that ``--resume`` can be tested against an uninterrupted run;
- without either, the run trains the whole plan (every epoch / stage).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from dataengine import config as cfg


@dataclass
class TrainerConfig:
    """Settings shared by the SFT, reward-model and PPO trainers."""

    NAME: ClassVar[str] = "trainer"

    shards: str = "shards/demo"
    """Shard set to train on: folder or manifest.json, local or URL (s3://, https://)."""
    stages: list[str] = field(default_factory=lambda: ["easy", "hard"])
    """Stages of the shard set to read, in this order."""
    output: str = "runs/train"
    """Run folder: config.json, metrics.jsonl, checkpoints/, tensorboard/ and model/ (the trained model)."""
    overwrite: bool = False
    """Start afresh in a run folder that holds an earlier run: its checkpoints, metrics and model are deleted."""
    resume: bool = False
    """Continue the run in OUTPUT from its latest checkpoint (same ranks and plan settings)."""
    seed: int = 0
    """Seeds the fresh weights (adapters, projector, heads), the data order and any sampling."""
    max_steps: int = 0
    """Budget: train at most this many steps (the LR schedule fits them), then save the model (0: the whole plan)."""
    stop_after_steps: int = 0
    """Stop after this many steps as a killed run would, saving nothing at the stop, the LR schedule still
    spanning the whole run (to test --resume; 0: never)."""
    save_every: int = 0
    """Write a checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk, the newest (0 keeps all)."""
    micro_batch: int = 8
    """Samples per rank per forward pass."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.0
    """Final LR as a fraction of the peak (cosine decay)."""
    weight_decay: float = 0.0
    """AdamW weight decay (not on biases and norms)."""
    grad_clip: float = 1.0
    """Gradient norm clipping (0 turns it off)."""
    max_length: int = 2048
    """Longest sequence the model sees, video rows included."""
    qlora: bool = False
    """Load the base LM 4-bit nf4 (bitsandbytes) under the LoRA adapters."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3 (QLoRA: 0-2)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Compute precision (bf16: base weights and DeepSpeed in bfloat16)."""
    shuffle: Literal["window", "none", "stage"] = "window"
    """Reader shuffle; 'window' keeps the curriculum's length order at the scale of a window,
    'stage' is a uniform shuffle within each stage."""
    window: int = 64
    """Samples per shuffle window (--shuffle window)."""
    on_error: Literal["raise", "skip"] = "raise"
    """Corrupt shard data: stop naming the shard and key, or skip and count it."""
    verify: bool = False
    """Check each shard's sha256 against the manifest before reading it (one extra read per shard):
    catches damage inside feature arrays, which otherwise decodes without error."""
    tensorboard: bool = False
    """Also write the metrics as TensorBoard scalars to OUTPUT/tensorboard (needs the tensorboard package)."""

    def __post_init__(self) -> None:
        cfg.raise_problems(self.problems(), f"{self.NAME} settings")

    def problems(self) -> list[str]:
        """Every problem of the shared settings; subclasses add theirs to this list."""
        p: list[str] = []
        cfg.check(p, bool(self.stages), "--stages: at least one stage")
        cfg.check(p, not (self.resume and self.overwrite), "give --resume or --overwrite, not both")
        for name in ("max_steps", "stop_after_steps", "save_every", "keep_checkpoints"):
            cfg.check(p, getattr(self, name) >= 0, f"{flag(name)} must be >= 0")
        cfg.check(p, self.micro_batch >= 1, "--micro-batch must be >= 1")
        cfg.check(p, self.lr > 0, "--lr must be > 0")
        cfg.check(p, 0 <= self.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]")
        cfg.check(p, self.weight_decay >= 0 and self.grad_clip >= 0, "--weight-decay and --grad-clip must be >= 0")
        cfg.check(p, self.max_length >= 2, "--max-length must be >= 2")
        cfg.check(p, self.zero_stage in (0, 1, 2, 3), f"--zero-stage must be 0..3, got {self.zero_stage}")
        cfg.check(p, not (self.qlora and self.zero_stage == 3),
                  "--qlora with --zero-stage 3: ZeRO-3 cannot partition 4-bit weights; use 0-2")
        cfg.check(p, self.window >= 1, "--window must be >= 1")
        return p


@dataclass
class SupervisedConfig(TrainerConfig):
    """What SFT and the reward model add: fixed batches from shards, accumulated, logged per step."""

    grad_accum: int = 1
    """Micro-batches per optimizer step (global batch = micro_batch x grad_accum x ranks)."""
    warmup_ratio: float = 0.03
    """Share of all steps spent in linear warmup."""
    log_every: int = 1
    """Metrics line every N steps (rank 0)."""
    log_keys: bool = False
    """Write the sample keys each rank trains on, per step, to OUTPUT/keys/rank-N.tsv (audit)."""
    template: Literal["vicuna_v1", "tokenizer"] = "vicuna_v1"
    """Chat template of a model built here from a base LM: vicuna_v1 (LLaVA-1.5/Vicuna) or tokenizer (the
    checkpoint's own chat template, e.g. Llama-3, Qwen2, SmolLM2). A saved SFT model keeps its own."""

    def problems(self) -> list[str]:
        p = super().problems()
        cfg.check(p, self.grad_accum >= 1, "--grad-accum must be >= 1")
        cfg.check(p, 0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)")
        cfg.check(p, self.log_every >= 1, "--log-every must be >= 1")
        return p


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_defaults(cls: type) -> dict[str, Any]:
    """Each field's default, without constructing (and checking) an instance."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def budget(plan: list[int], max_steps: int) -> list[int]:
    """A plan of steps per phase cut to ``max_steps`` in all (0: unchanged); phases left empty
    keep their place with 0 steps. E.g. budget([5, 3, 4], 7) == [5, 2, 0]."""
    if not max_steps:
        return list(plan)
    out, left = [], max_steps
    for n in plan:
        out.append(min(n, left))
        left -= out[-1]
    return out
