"""Reward model from AI preferences (Bradley–Terry) on DeepSpeed, streaming from preference shards.

The model (``train.reward.RewardModel``) is the SFT video LMM — its LoRA adapter and
projector, trained further — with a scalar head on the final hidden state of the last
valid token (the EOS) in place of the LM head. Each preference sample (``vlmr judge``,
stage ``pairs``: ``conversations`` = the prompt, ``chosen``, ``rejected``, ``narrative``,
``judge``, ``feat``) becomes two sequences, ``prompt + chosen</s>`` and
``prompt + rejected</s>``, scored in one forward pass; the loss is

    −log σ(r_chosen − r_rejected) + 1e-3 · |mean(r_chosen + r_rejected)|

(``train.reward.bradley_terry_loss``), optionally weighted (``--confidence weight``) or
margined (``--confidence margin``) by the judge's confidence |judge.margin| ∈ [0, 1], and
with the judge's ``soft_label`` (probability that "chosen" is better) where it set one.
With ``--context narrative`` the narrative goes into the prompt, after ``<video>``.

Held-out pairs: ``--eval-fraction F`` holds out a share F of the videos, drawn with
``--seed``, with all their pairs, so no video is on both sides (the two parts are written as
shard sets under ``OUTPUT/split/train`` and ``OUTPUT/split/heldout``); or ``--eval-shards
FOLDER`` names a separate set. (Holding out the last shards instead would hold out the
longest answers, since pairs keep the length order, and share videos with training.) Pairwise accuracy, mean margin
(r_chosen − r_rejected) and the chosen/rejected score means are logged every
``--eval-every`` steps and at the end (``OUTPUT/eval.jsonl``), and printed by
``vlmr eval rm`` (``train/eval/rm.py``), with the accuracy on soft-labelled pairs (where the judge was unsure) and
on the others apart. After training, the mean/std of the final model's scores on the chosen
and rejected responses of the training pairs (SFT responses; up to ``--stats-max-pairs``
pairs) are saved with the model (``reward_model.json``) so PPO can normalise rewards.

Data path, steps, checkpoints and ``--resume`` follow ``train/sft.py``: the reader deals
each epoch to the ranks in equal shares, the length guard and tokenization run in its
read-ahead thread (a pair whose prompt + response does not fit ``max_length`` once the
video rows are spliced in is left out, or its responses cut, by one rule on every rank, and
counted; the left-out pair's slot holds the reader's stand-in, which adds nothing to the
loss), one metrics line per step, and checkpoints every ``save_every`` steps hold adapter,
projector, head, optimizer, scheduler, step, reader position and RNG states. The final
model is ``OUTPUT/model`` (``RewardModel.load``).

Run it::

    vlmr train rm --config train/configs/rm_tiny.yaml                 # one process
    python train/rm.py --config train/configs/rm_tiny.yaml            # the same
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 train/rm.py --config train/configs/rm_tiny.yaml
    deepspeed --num_gpus 8 train/rm.py --config my.yaml --zero-stage 2 --precision bf16
    vlmr train rm --config train/configs/rm_tiny.yaml --resume        # continue the latest checkpoint
    vlmr eval rm --model runs/rm/model --shards runs/rm/split/heldout

On a machine without CUDA it runs on DeepSpeed's CPU accelerator over gloo (give each rank
one thread with OMP_NUM_THREADS when ranks share cores).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

from dataengine import config as cfg
from train.trainer_config import SupervisedConfig, budget

log = logging.getLogger(__name__)

STATE_FORMAT = "vlmr-rm-state/1"
# Settings a resumed run must share with the checkpoint: they fix the data order, the split and the model.
PLAN_FIELDS = ("shards", "stages", "eval_shards", "eval_fraction", "max_steps", "epochs", "micro_batch", "grad_accum",
               "shuffle", "window", "seed", "max_length", "length_policy", "context", "confidence",
               "margin_scale", "soft_labels", "model", "lora_r", "lora_alpha", "qlora", "train_projector", "template")
SUM_KEYS = ("loss_sum", "loss_count", "pairs", "correct", "margin_sum", "chosen_sum", "rejected_sum",
            "tokens", "data_wait")


@dataclass
class RMConfig(SupervisedConfig):
    """Reward model (Bradley–Terry) from preference shards, on DeepSpeed."""

    NAME: ClassVar[str] = "rm"

    shards: str = "shards/pairs"
    """Preference shards made by `vlmr judge`: folder or manifest.json, local or URL (s3://, https://)."""
    stages: list[str] = field(default_factory=lambda: ["pairs"])
    """Stages of the shard set to train on, in order."""
    output: str = "runs/rm"
    """Run folder: config.json, metrics.jsonl, eval.jsonl, checkpoints/, split/, and model/ (the reward model)."""
    model: str = "tiny"
    """The SFT model folder (made by `vlmr train sft`: its LoRA and projector are trained on), or a
    base LM ('tiny' or a local causal LM folder) given fresh LoRA and projector."""
    tokenizer: str = ""
    """Tokenizer folder or 'tiny' for a base LM (default: the one in the model folder)."""
    feat_dim: int = 0
    """Width of the video features for a base LM; 0 reads it from the first sample of the shards."""
    context: Literal["none", "narrative"] = "none"
    """Put the judge's context (the sample's narrative) into the prompt after <video>."""
    confidence: Literal["none", "weight", "margin"] = "none"
    """Use the judge's confidence |judge.margin| in [0, 1]: as a per-pair loss weight, as a margin
    the score difference must exceed (times --margin-scale), or not at all."""
    margin_scale: float = 1.0
    """Score margin per unit of judge confidence (--confidence margin)."""
    soft_labels: bool = True
    """Use judge.soft_label (probability that 'chosen' is better) where the judge set one."""
    centre_coef: float = 1e-3
    """Weight of the centring term |mean(r_chosen + r_rejected)| (public code: 1e-3)."""
    epochs: int = 1
    """Passes over the training pairs (paper: 1)."""
    micro_batch: int = 4
    """Pairs per rank per forward pass (twice as many sequences)."""
    lr: float = 2e-5
    """Peak learning rate (AdamW; public code: 2e-5)."""
    length_policy: Literal["skip", "truncate"] = "skip"
    """Too-long pairs: leave the pair out, or cut the too-long response(s) to fit (EOS kept); both counted."""
    lora_r: int = 32
    """LoRA rank for a base LM (an SFT model keeps its own adapter settings)."""
    lora_alpha: int = 32
    """LoRA alpha for a base LM. (No dropout option: a reward model's scores must be deterministic.)"""
    train_projector: bool = True
    """Train the projector with the adapter and head (else it stays as the SFT model's)."""
    shuffle: Literal["window", "none", "stage"] = "stage"
    """Reader shuffle of the training pairs (pairs have no curriculum order: 'stage' is a full shuffle)."""
    eval_shards: str = ""
    """Held-out preference shards (a separate set with the same stages)."""
    eval_fraction: float = 0.0
    """Or: hold out this share of the videos (all pairs of a held-out video, none of it in training),
    drawn with --seed; the two parts are written as shard sets under OUTPUT/split/."""
    eval_every: int = 0
    """Evaluate on the held-out pairs every N optimizer steps (0: only at the end)."""
    eval_batch: int = 8
    """Pairs per forward pass when evaluating and computing the reward statistics."""
    eval_max_pairs: int = 0
    """Held-out pairs evaluated (0: all)."""
    stats_max_pairs: int = 1024
    """Training pairs whose chosen and rejected responses give the saved reward mean/std (0: all)."""

    def problems(self) -> list[str]:
        p = super().problems()
        cfg.check(p, self.epochs >= 1, "--epochs must be >= 1")
        cfg.check(p, self.centre_coef >= 0 and self.margin_scale >= 0, "--centre-coef and --margin-scale must be >= 0")
        cfg.check(p, self.lora_r >= 1 and self.lora_alpha > 0, "--lora-r must be >= 1, --lora-alpha > 0")
        cfg.check(p, self.feat_dim >= 0, "--feat-dim must be >= 0")
        cfg.check(p, 0 <= self.eval_fraction < 1, "--eval-fraction must be in [0, 1)")
        cfg.check(p, not (self.eval_shards and self.eval_fraction),
                  "give --eval-shards or --eval-fraction, not both")
        cfg.check(p, min(self.eval_every, self.eval_max_pairs, self.stats_max_pairs) >= 0,
                  "--eval-every, --eval-max-pairs and --stats-max-pairs must be >= 0")
        cfg.check(p, self.eval_batch >= 1, "--eval-batch must be >= 1")
        return p


@dataclass(frozen=True)
class Phase:
    """One epoch over the training pairs, and how many optimizer steps it gives."""

    epoch: int
    samples_per_rank: int
    steps: int


# ---------------------------------------------------------------------------- data

def heldout_videos(video_ids: list[str], fraction: float, seed: int) -> set[str]:
    """A seeded ``fraction`` of the distinct videos (at least one, never all): the held-out ones.

    Depends only on the set of ids, the fraction and the seed (not on their order)."""
    import numpy as np

    videos = sorted(set(video_ids))
    if len(videos) < 2:
        raise ValueError(f"--eval-fraction needs pairs of at least 2 videos, found {len(videos)}")
    count = min(len(videos) - 1, max(1, round(fraction * len(videos))))
    order = np.random.default_rng([seed, 0x5E1EC7]).permutation(len(videos))
    return {videos[i] for i in order[:count]}


def split_by_video(source: str, stages: list[str], fraction: float, seed: int, folder: Path,
                   on_error: str = "raise") -> tuple[str, str]:
    """Write the pairs of ``stages`` as two shard sets, ``folder/train`` and ``folder/heldout``:
    all pairs of a seeded ``fraction`` of the videos are held out, so no video is on both sides.

    The pairs keep their stream order and their ``json`` and ``feat`` members (what the reward
    model reads). Returns the two manifest paths."""
    from dataengine.pack import ShardWriter
    from dataengine.reader import ShardReader
    from dataengine.schema import MANIFEST_NAME, Manifest

    def pairs():
        return ShardReader(source, stages=stages, shuffle="none", fields=("json", "feat"), on_error=on_error)

    ids = []
    for sample in ShardReader(source, stages=stages, shuffle="none", fields=("json",), on_error=on_error):
        video = sample["json"].get("video_id")
        if not isinstance(video, str) or not video:
            raise ValueError(f"{sample.get('shard')}, key {sample.get('key')!r}: no video_id to split by")
        ids.append(video)
    held = heldout_videos(ids, fraction, seed)
    counts = {"train": 0, "heldout": 0}
    writers = {part: {name: ShardWriter(folder / part, name) for name in stages} for part in counts}
    try:
        for sample in pairs():
            if sample.get("substitute_for"):
                continue  # on_error=skip: the reader's stand-in for an unreadable pair
            part = "heldout" if sample["json"]["video_id"] in held else "train"
            writers[part][sample["stage"]].write({"__key__": sample["key"], "json": sample["json"],
                                                  "feat.npy": sample["feat"].numpy()})
            counts[part] += 1
    except BaseException:
        for part in writers.values():
            for writer in part.values():
                writer.abort()
        raise
    paths = []
    for part, by_stage in writers.items():
        infos = [writer.close() for writer in by_stage.values()]
        Manifest(settings={"split": {"part": part, "by": "video_id", "fraction": fraction, "seed": seed,
                                     "videos": len(held) if part == "heldout" else len(set(ids)) - len(held)}},
                 samples=counts[part], stages=infos, derived_from=str(source)).save(folder / part)
        paths.append(str(folder / part / MANIFEST_NAME))
    log.info("held out %d of %d videos: %d pairs for training, %d held out", len(held), len(set(ids)),
             counts["train"], counts["heldout"])
    return paths[0], paths[1]


def pair_targets(judge: Any, config: RMConfig, where: str) -> tuple[float, float, float]:
    """(weight, margin, label) of one pair from its judge record, per the config."""
    weight, margin, label = 1.0, 0.0, 1.0
    if config.confidence != "none":
        if not isinstance(judge, dict) or not isinstance(judge.get("margin"), (int, float)):
            raise ValueError(f"{where}: --confidence {config.confidence} needs judge.margin (a number)")
        confidence = min(1.0, abs(float(judge["margin"])))
        if config.confidence == "weight":
            weight = confidence
        else:
            margin = config.margin_scale * confidence
    if config.soft_labels and isinstance(judge, dict) and judge.get("soft_label") is not None:
        label = float(judge["soft_label"])
        if not 0.0 <= label <= 1.0:
            raise ValueError(f"{where}: judge.soft_label {label} is not a probability in [0, 1]")
    return weight, margin, label


class PairPreparer:
    """Runs in the reader's read-ahead thread: checks a pair, length guard, tokenization.

    Returns None for a pair left out (too long, or malformed with ``on_error="skip"``); the
    reader counts it and fills its slot. :attr:`counts` says what happened to how many pairs.
    """

    def __init__(self, tokenizer, config: RMConfig, chat=None):
        import collections

        from train import conversation
        from train.length import LengthGuard

        self.tokenizer = tokenizer
        self.config = config
        # The model's chat template (VideoLMM.chat); vicuna v1 when not given.
        self.chat = chat or conversation.chat_template(conversation.DEFAULT_TEMPLATE, tokenizer)
        self.video_token_id = conversation.video_token_id(tokenizer)
        self.guard = LengthGuard(tokenizer, config.max_length, policy=config.length_policy,
                                 render=self.chat.render, count=self.chat.count_tokens)
        self.counts: collections.Counter = collections.Counter()

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return self._prepare(sample)
        except (KeyError, TypeError, ValueError) as exc:
            where = f"{sample.get('shard', '?')}, key {sample.get('key', '?')!r}"
            if self.config.on_error == "raise":
                raise ValueError(f"{where}: {exc}") from exc
            self.counts["malformed"] += 1
            log.warning("skipping malformed pair %s: %s", where, exc)
            return None

    def _prepare(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        from train.conversation import spliced_length
        from train.finite import check_features
        from train.reward import as_prompt, encode_response, with_narrative

        if not check_features(sample, self.config.on_error):
            self.counts["non_finite"] += 1
            return None
        data = sample["json"]
        prompt = as_prompt(data["conversations"])
        responses = [data["chosen"], data["rejected"]]
        if not all(isinstance(r, str) for r in responses):
            raise TypeError("chosen and rejected must be strings")
        if self.config.context == "narrative":
            narrative = data.get("narrative")
            if not isinstance(narrative, str) or not narrative.strip():
                raise ValueError("--context narrative but the pair has no narrative")
            prompt = with_narrative(prompt, narrative)
        # Errors here are tagged with the shard and key by __call__.
        weight, margin, label = pair_targets(data.get("judge"), self.config, "judge")
        rows = int(sample["feat"].shape[0])
        ids = []
        cut = False
        for response in responses:
            guarded = self.guard.apply({"key": sample.get("key"), "feat": sample["feat"],
                                        "json": {"conversations": prompt + [{"from": "gpt", "value": response}]}})
            if guarded is None:
                self.counts["too_long"] += 1
                return None
            turns = guarded["json"]["conversations"]
            cut = cut or turns[-1]["value"] != response
            row = encode_response(turns[:-1], turns[-1]["value"], self.tokenizer, chat=self.chat)
            # A tokenizer whose count differs from the guard's could still overflow: leave it out.
            if spliced_length(len(row), row.count(self.video_token_id), rows) > self.config.max_length:
                self.counts["too_long"] += 1
                return None
            ids.append(row)
        self.counts["truncated" if cut else "fit"] += 1
        judge = data.get("judge")
        soft = isinstance(judge, dict) and judge.get("soft_label") is not None
        return dict(sample, chosen_ids=ids[0], rejected_ids=ids[1], weight=weight, margin=margin, label=label,
                    soft=soft)


def make_reader(source: str, config: RMConfig, epoch: int, dist, prepare=None, *, evaluation: bool = False):
    """Training: the epoch's shuffled share of this rank. Evaluation: every pair once, in
    stream order, dealt one at a time (the last positions repeat; :func:`score_pairs` skips them)."""
    from dataengine.reader import ShardReader

    if evaluation:
        return ShardReader(source, stages=config.stages, rank=dist.rank, world_size=dist.world_size,
                           batch_size=1, shuffle="none", remainder="repeat", fields=("json", "feat"),
                           on_error=config.on_error, verify=config.verify, guard=prepare)
    return ShardReader(source, stages=config.stages, rank=dist.rank, world_size=dist.world_size,
                       batch_size=config.micro_batch, shuffle=config.shuffle, window=config.window,
                       seed=config.seed, epoch=epoch, fields=("json", "feat"), on_error=config.on_error,
                       verify=config.verify, guard=prepare)


def plan_epochs(source: str, config: RMConfig, dist) -> list[Phase]:
    """Epochs with their step counts, from the manifest alone (no tar is opened), cut to
    ``max_steps`` in all."""
    per_step = config.micro_batch * config.grad_accum
    phases = []
    for epoch in range(config.epochs):
        per_rank = len(make_reader(source, config, epoch, dist))
        phases.append(Phase(epoch, per_rank, per_rank // per_step))
    if phases[0].steps == 0:
        raise ValueError(f"{source}: stages {config.stages} give no full step of {per_step} pairs per rank "
                         f"on {dist.world_size} rank(s) ({phases[0].samples_per_rank} per rank)")
    steps = budget([p.steps for p in phases], config.max_steps)
    return [Phase(p.epoch, p.samples_per_rank, n) for p, n in zip(phases, steps) if n]


def feat_width(source: str, config: RMConfig) -> int:
    """The shards' feature width D, from the first sample."""
    from dataengine.reader import ShardReader

    reader = ShardReader(source, stages=config.stages, shuffle="none", fields=("feat",), prefetch_bytes=0)
    return int(next(iter(reader))["feat"].shape[-1])


def collate_pairs(samples: list[dict[str, Any]], pad_token_id: int, video_token_id: int) -> dict[str, Any]:
    """A batch of B pairs as 2B right-padded rows: the B chosen sequences, then the B rejected.

    Returns ``input_ids``, ``attention_mask`` (2B, L), ``feat`` ((2B, N, D) or a list),
    ``valid`` (B,) bool (False for the reader's stand-ins), ``weight``, ``margin``,
    ``label`` (B,), ``tokens`` (real positions once spliced) and ``keys``.
    """
    import torch

    from train.conversation import spliced_length
    from train.model import pad_sequences

    rows = [s["chosen_ids"] for s in samples] + [s["rejected_ids"] for s in samples]
    feats = [torch.as_tensor(s["feat"]) for s in samples] * 2
    input_ids, mask = pad_sequences(rows, pad_token_id, side="right")
    same = all(f.shape == feats[0].shape for f in feats)
    return {
        "input_ids": input_ids, "attention_mask": mask, "feat": torch.stack(feats) if same else feats,
        "valid": torch.tensor([not s.get("substitute_for") for s in samples]),
        "weight": torch.tensor([float(s["weight"]) for s in samples]),
        "margin": torch.tensor([float(s["margin"]) for s in samples]),
        "label": torch.tensor([float(s["label"]) for s in samples]),
        "soft": torch.tensor([bool(s.get("soft")) for s in samples]),
        "shards": [s.get("shard", "") for s in samples],
        "tokens": sum(spliced_length(len(r), r.count(video_token_id), f.shape[0]) for r, f in zip(rows, feats)),
        "keys": [s.get("key", "") for s in samples],
    }


def make_loader(reader, config: RMConfig, ids: dict[str, int]):
    """Batches of ``micro_batch`` consecutive pairs through torchdata's ``StatefulDataLoader``
    (its ``state_dict()``, the reader's position inside it, is what a checkpoint stores)."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    return StatefulDataLoader(reader, batch_size=config.micro_batch, num_workers=0,
                              collate_fn=lambda chunk: collate_pairs(chunk, **ids))


def batches_of(samples: Iterator[dict[str, Any]], size: int, collate) -> Iterator[dict[str, Any]]:
    """Batches of ``size`` consecutive samples (a short last one when the stream ends)."""
    chunk: list[dict[str, Any]] = []
    try:
        for sample in samples:
            chunk.append(sample)
            if len(chunk) == size:
                yield collate(chunk)
                chunk = []
        if chunk:
            yield collate(chunk)
    finally:
        close = getattr(samples, "close", None)
        if close is not None:
            close()


# ---------------------------------------------------------------------------- one step

def pair_loss(scores, batch: dict[str, Any], config: RMConfig):
    """The Bradley–Terry loss of a batch's real pairs from its (2B,) scores, and their sums.

    A batch of only stand-ins gives a zero loss still attached to the graph, so every rank
    runs the same backward.
    """
    from train.reward import bradley_terry_loss

    b = scores.shape[0] // 2
    valid = batch["valid"].to(scores.device)
    rc, rr = scores[:b][valid], scores[b:][valid]
    n = int(valid.sum())
    if n == 0:
        return scores.sum() * 0.0, {"pairs": 0.0}
    use_weight, use_margin = config.confidence == "weight", config.confidence == "margin"
    loss = bradley_terry_loss(rc, rr, weight=batch["weight"][valid.cpu()] if use_weight else None,
                              margin=batch["margin"][valid.cpu()] if use_margin else None,
                              label=batch["label"][valid.cpu()] if config.soft_labels else None,
                              centre_coef=config.centre_coef)
    d = (rc - rr).detach()
    return loss, {"pairs": float(n), "correct": float((d > 0).sum() + 0.5 * (d == 0).sum()),
                  "margin_sum": float(d.sum()), "chosen_sum": float(rc.detach().sum()),
                  "rejected_sum": float(rr.detach().sum())}


def train_step(engine, batches: Iterator[dict[str, Any]], config: RMConfig, ranks, step: int) -> dict[str, Any]:
    """Optimizer step ``step`` over ``grad_accum`` micro-batches; returns this rank's sums.
    A non-finite loss stops the run, naming the batch's shards and keys."""
    from train.finite import check_loss

    device = ranks.device
    sums: dict[str, Any] = dict.fromkeys(SUM_KEYS, 0.0)
    keys: list[str] = []
    for _ in range(config.grad_accum):
        t0 = time.perf_counter()
        batch = next(batches)
        sums["data_wait"] += time.perf_counter() - t0
        feat = batch["feat"].to(device) if hasattr(batch["feat"], "to") else [f.to(device) for f in batch["feat"]]
        scores = engine(batch["input_ids"].to(device), feat, batch["attention_mask"].to(device))
        loss, stats = pair_loss(scores, batch, config)
        check_loss(loss, step=step, rank=ranks.rank, keys=batch["keys"], shards=batch["shards"])
        engine.backward(loss)
        engine.step()
        if stats["pairs"]:
            sums["loss_sum"] += loss.item()
            sums["loss_count"] += 1
            for k, v in stats.items():
                sums[k] += v
        sums["tokens"] += batch["tokens"]
        keys.extend(batch["keys"])
    sums["keys"] = keys
    return sums


def log_metrics(run, step: int, total_steps: int, epoch: int, lr: float, window: dict[str, float], done_here: int
                ) -> dict[str, Any]:
    """The window's sums over ranks; rank 0 writes the line ``step | epoch | loss | acc | margin |
    chosen | rejected | lr | pairs/s | tok/s | data-wait | eta`` and the metrics (every rank calls it)."""
    from dataengine import dist
    from train.runs import metrics_line

    s = dict(zip(SUM_KEYS, dist.all_sum([window[k] for k in SUM_KEYS])))
    elapsed = run.lap()
    pairs = max(s["pairs"], 1.0)
    m = {"step": step, "epoch": epoch, "loss": s["loss_sum"] / max(s["loss_count"], 1),
         "accuracy": s["correct"] / pairs, "margin": s["margin_sum"] / pairs,
         "chosen": s["chosen_sum"] / pairs, "rejected": s["rejected_sum"] / pairs, "lr": lr,
         "pairs_per_s": s["pairs"] / elapsed if elapsed > 0 else 0.0,
         "tokens_per_s": s["tokens"] / elapsed if elapsed > 0 else 0.0,
         "data_wait": s["data_wait"] / run.ranks.world_size / elapsed if elapsed > 0 else 0.0,
         "eta_s": run.eta(done_here, step, total_steps)}
    run.log(m, metrics_line(step, total_steps, [
        f"epoch {epoch}", f"loss {m['loss']:.4f}", f"acc {m['accuracy']:.3f}", f"margin {m['margin']:+.3f}",
        f"chosen {m['chosen']:+.3f}", f"rejected {m['rejected']:+.3f}", f"lr {lr:.2e}",
        f"pairs/s {m['pairs_per_s']:.1f}", f"tok/s {m['tokens_per_s']:,.0f}",
        f"data-wait {100 * m['data_wait']:.1f}%"], m["eta_s"]))
    return m


# ---------------------------------------------------------------------------- evaluation

def score_pairs(model, reader, *, batch_size: int, limit: int, device, rank: int, world_size: int,
                pad_token_id: int, video_token_id: int) -> dict[str, float]:
    """Score every pair of an evaluation reader (:func:`make_reader` with ``evaluation``) once,
    over all ranks; returns the sums over ranks.

    Rank r's i-th sample is global position i·R + r; positions past the end (the reader's
    repeats) and the reader's stand-ins for left-out pairs go through the forward pass — so
    that all ranks run the same passes — but are not counted (stand-ins are, as ``skipped``).
    ``limit`` > 0 scores only the first ``limit`` pairs.
    """
    import torch

    from dataengine import dist

    total = min(reader.total, limit) if limit else reader.total
    per_rank = -(-total // world_size)
    keys = ("pairs", "skipped", "correct", "margin_sum", "chosen_sum", "rejected_sum", "chosen_sq",
            "rejected_sq", "nll_sum", "soft_pairs", "soft_correct")
    sums = dict.fromkeys(keys, 0.0)

    def counted(samples):
        for i, sample in enumerate(samples):
            if i == per_rank:
                return
            yield dict(sample, counted=i * world_size + rank < total)

    def collate(chunk):
        batch = collate_pairs(chunk, pad_token_id, video_token_id)
        batch["counted"] = torch.tensor([s["counted"] for s in chunk])
        return batch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches_of(counted(iter(reader)), batch_size, collate):
                feat = batch["feat"].to(device) if hasattr(batch["feat"], "to") else [f.to(device) for f in batch["feat"]]
                scores = model(batch["input_ids"].to(device), feat, batch["attention_mask"].to(device)).cpu().double()
                b = scores.shape[0] // 2
                use = batch["counted"] & batch["valid"]
                sums["skipped"] += float((batch["counted"] & ~batch["valid"]).sum())
                rc, rr = scores[:b][use], scores[b:][use]
                d = rc - rr
                sums["pairs"] += float(use.sum())
                sums["correct"] += float((d > 0).sum() + 0.5 * (d == 0).sum())
                sums["margin_sum"] += float(d.sum())
                sums["chosen_sum"] += float(rc.sum())
                sums["rejected_sum"] += float(rr.sum())
                sums["chosen_sq"] += float((rc * rc).sum())
                sums["rejected_sq"] += float((rr * rr).sum())
                sums["nll_sum"] += float(-torch.nn.functional.logsigmoid(d).sum())
                soft = batch["soft"][use]
                sums["soft_pairs"] += float(soft.sum())
                sums["soft_correct"] += float((d[soft] > 0).sum() + 0.5 * (d[soft] == 0).sum())
    finally:
        model.train(was_training)
    return dict(zip(keys, dist.all_sum([sums[k] for k in keys])))


def eval_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Pairwise accuracy (ties count half), mean margin r_c − r_r, chosen/rejected means, BT loss;
    and the accuracy on the soft-labelled pairs (the judge was unsure) and on the others apart
    (None where there are none)."""
    n = max(sums["pairs"], 1.0)
    soft, hard = sums.get("soft_pairs", 0.0), sums["pairs"] - sums.get("soft_pairs", 0.0)
    return {"pairs": int(sums["pairs"]), "skipped": int(sums["skipped"]), "accuracy": sums["correct"] / n,
            "soft_pairs": int(soft), "accuracy_soft": sums["soft_correct"] / soft if soft else None,
            "accuracy_hard": (sums["correct"] - sums["soft_correct"]) / hard if hard else None,
            "margin": sums["margin_sum"] / n, "chosen": sums["chosen_sum"] / n,
            "rejected": sums["rejected_sum"] / n, "loss": sums["nll_sum"] / n}


def format_eval(metrics: dict[str, float]) -> str:
    return (f"pairs {metrics['pairs']} | acc {metrics['accuracy']:.3f} | margin {metrics['margin']:+.3f} | "
            f"chosen {metrics['chosen']:+.3f} | rejected {metrics['rejected']:+.3f} | loss {metrics['loss']:.4f}"
            + (f" | soft-labelled {metrics['soft_pairs']}: acc {metrics['accuracy_soft']:.3f}, others "
               + (f"{metrics['accuracy_hard']:.3f}" if metrics["accuracy_hard"] is not None else "none")
               if metrics.get("soft_pairs") else "")
            + (f" | left out {metrics['skipped']}" if metrics["skipped"] else ""))


# ---------------------------------------------------------------------------- recipe

def build_model(config: RMConfig, source: str):
    """The reward model: from the SFT model folder, or a base LM with fresh adapters."""
    from dataengine.models import load_tokenizer, resolve_lm
    from train.model import MODEL_CONFIG, ModelSettings
    from train.reward import RewardModel

    dtype = "bfloat16" if config.precision == "bf16" else "float32"
    if (Path(config.model) / MODEL_CONFIG).exists():
        model = RewardModel.from_sft(config.model, seed=config.seed, qlora=config.qlora, dtype=dtype,
                                     context=config.context, max_length=config.max_length)
    else:
        tokenizer = load_tokenizer(config.tokenizer or resolve_lm(config.model))
        settings = ModelSettings(lm=config.model, feat_dim=config.feat_dim or feat_width(source, config),
                                 lora_r=config.lora_r, lora_alpha=config.lora_alpha,
                                 lora_dropout=0.0, qlora=config.qlora, template=config.template, dtype=dtype)
        model = RewardModel.from_base(settings, tokenizer, seed=config.seed, context=config.context,
                                      max_length=config.max_length)
    model.lmm.projector.requires_grad_(config.train_projector)
    return model


def prepare_sources(config: RMConfig, out: Path, ranks) -> tuple[str, str | None]:
    """The training and held-out shard sources (rank 0 writes the split by video)."""
    from dataengine import dist

    if config.eval_fraction:
        split = out / "split"
        if ranks.is_main and not (config.resume and (split / "heldout" / "manifest.json").exists()):
            split_by_video(config.shards, config.stages, config.eval_fraction, config.seed, split, config.on_error)
        dist.barrier()
        return str(split / "train" / "manifest.json"), str(split / "heldout" / "manifest.json")
    if not config.eval_shards:
        log.warning("no held-out pairs (--eval-shards or --eval-fraction): accuracy is not measured")
    return config.shards, config.eval_shards or None


WINDOW_KEYS = SUM_KEYS


def train(config: RMConfig, ranks) -> dict[str, Any]:
    """Run (or resume) the training; returns a summary (steps, last metrics, held-out metrics, model path)."""
    import torch

    from dataengine.schema import write_text_atomic
    from train import launch
    from train.runs import Run

    run = Run.open(config, ranks, state_format=STATE_FORMAT, plan_fields=PLAN_FIELDS)
    torch.manual_seed(config.seed)

    # -- setup, in dependency order: data split, plan, model, engine ----------------------
    train_source, eval_source = prepare_sources(config, run.root, ranks)
    phases = plan_epochs(train_source, config, ranks)
    total_steps = sum(p.steps for p in phases)
    model, engine, scheduler = build_engine(config, train_source, total_steps)
    tokenizer = model.tokenizer
    ids = {"pad_token_id": model.lmm.pad_token_id, "video_token_id": model.lmm.video_token_id}
    log.info("rm: %d rank(s), %s, %d steps over %d epoch(s) of %d pairs per rank, %s trainable parameters",
             ranks.world_size, config.model, total_steps, len(phases), phases[0].samples_per_rank,
             f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
    step, phase_index, phase_step, loader_state = 0, 0, 0, None
    resumed = run.resume(engine)
    if resumed is not None:
        state, rank_state = resumed
        step, phase_index, phase_step, loader_state = (state["step"], state["phase"], state["phase_step"],
                                                       rank_state["loader"])

    def evaluate(at_step: int) -> dict[str, Any] | None:
        if eval_source is None:
            return None
        return evaluate_heldout(model, eval_source, config, ranks, ids, at_step)

    last: dict[str, Any] | None = None
    stopped, first_step = False, step
    counts: dict[str, Any] = {}

    # -- the epochs, under one LR schedule -----------------------------------------------
    engine.train()
    for index in range(phase_index, len(phases)):
        phase = phases[index]
        if index != phase_index:
            phase_step, loader_state = 0, None
        if phase_step >= phase.steps:
            continue
        prepare = PairPreparer(tokenizer, config, model.lmm.chat)
        reader = make_reader(train_source, config, phase.epoch, ranks, prepare)
        loader = make_loader(reader, config, ids)
        if loader_state is not None:
            loader.load_state_dict(loader_state)
        batches = iter(loader)
        window: dict[str, float] = dict.fromkeys(SUM_KEYS, 0.0)
        while phase_step < phase.steps:
            if config.stop_after_steps and step >= config.stop_after_steps:
                stopped = True
                break
            lr = scheduler.get_last_lr()[0]  # the LR this step uses
            sums = train_step(engine, batches, config, ranks, step + 1)
            step += 1
            phase_step += 1
            for k in SUM_KEYS:
                window[k] += sums[k]
            if config.log_keys:
                run.record_keys(step, phase.epoch, sums["keys"])
            if step % config.log_every == 0 or phase_step == phase.steps:
                last = log_metrics(run, step, total_steps, phase.epoch, lr, window, step - first_step)
                window = dict.fromkeys(SUM_KEYS, 0.0)
            if (config.save_every and step % config.save_every == 0) or step == total_steps:
                # Taken between steps: the loader has handed out exactly the pairs trained on.
                run.save(step, engine=engine, model=model,
                         trainer_state={"phase": index, "phase_step": phase_step, "epoch": phase.epoch},
                         rank_state={"loader": loader.state_dict()})
            if config.eval_every and step % config.eval_every == 0 and step != total_steps:
                evaluate(step)
        counts = report_epoch(phase, config, reader, prepare, ranks, finished=not stopped)
        if stopped:
            break

    run.close()
    summary: dict[str, Any] = {"steps": step, "total_steps": total_steps, "stopped_early": stopped, "last": last,
                               "heldout": None, "stats": None, "model": None, "pairs": counts}
    if stopped:
        return summary
    # -- after training: held-out metrics, reward statistics, the final model -------------
    summary["heldout"] = evaluate(step)
    stats = reward_statistics(model, train_source, config, ranks, ids)
    summary["stats"] = stats.__dict__
    extra = {"heldout": summary["heldout"], "trained_from": config.model, "shards": config.shards, "steps": step}
    model.stats = stats
    summary["model"] = str(launch.save_final_model(model, run.model_dir, ranks, extra=extra))
    if ranks.is_main and summary["heldout"] is not None:
        write_text_atomic(run.root / "eval.json", json.dumps(summary["heldout"], indent=1) + "\n")
    return summary


def build_engine(config: RMConfig, source: str, total_steps: int):
    """The reward model inside a DeepSpeed engine: ``(model, engine, scheduler)``."""
    from train import launch

    model = build_model(config, source)
    ds_config = launch.deepspeed_config(micro_batch=config.micro_batch, grad_accum=config.grad_accum,
                                        zero_stage=config.zero_stage, precision=config.precision,
                                        grad_clip=config.grad_clip)
    engine, scheduler = launch.initialize(
        model, ds_config, lr=config.lr, weight_decay=config.weight_decay,
        warmup_steps=int(config.warmup_ratio * total_steps), total_steps=total_steps,
        min_lr_ratio=config.min_lr_ratio)
    return model, engine, scheduler


def evaluate_heldout(model, source: str, config: RMConfig, dist, ids: dict[str, int], step: int) -> dict[str, Any]:
    """Held-out metrics at ``step``; rank 0 logs them and appends them to OUTPUT/eval.jsonl."""
    reader = make_reader(source, config, 0, dist, PairPreparer(model.tokenizer, config, model.lmm.chat),
                         evaluation=True)
    metrics = eval_metrics(score_pairs(model, reader, batch_size=config.eval_batch, limit=config.eval_max_pairs,
                                       device=dist.device, rank=dist.rank, world_size=dist.world_size, **ids))
    if dist.is_main:
        log.info("eval step %d | %s", step, format_eval(metrics))
        with open(Path(config.output) / "eval.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
    return metrics


def reward_statistics(model, source: str, config: RMConfig, dist, ids: dict[str, int]):
    """Mean/std of the final model's scores on the chosen and rejected responses of (up to
    ``stats_max_pairs``) training pairs, i.e. on responses of the SFT model."""
    from train.reward import RewardStats

    reader = make_reader(source, config, 0, dist, PairPreparer(model.tokenizer, config, model.lmm.chat),
                         evaluation=True)
    sums = score_pairs(model, reader, batch_size=config.eval_batch, limit=config.stats_max_pairs,
                       device=dist.device, rank=dist.rank, world_size=dist.world_size, **ids)
    stats = RewardStats.from_sums(2 * sums["pairs"], sums["chosen_sum"] + sums["rejected_sum"],
                                  sums["chosen_sq"] + sums["rejected_sq"],
                                  source=f"chosen+rejected responses of {int(sums['pairs'])} training pairs of "
                                         f"{config.shards}")
    if dist.is_main:
        log.info("reward statistics: mean %+.4f, std %.4f over %d responses", stats.mean, stats.std, stats.count)
    return stats


def report_epoch(phase: Phase, config: RMConfig, reader, prepare: PairPreparer, ranks,
                 finished: bool = True) -> dict[str, Any]:
    """Which pairs the preparer and the reader left out or changed in an epoch, summed over
    ranks; rank 0 logs it and appends it to OUTPUT/epochs.jsonl. The counts are of the pairs
    read in this process (the read-ahead included), so a resumed epoch counts anew."""
    from dataengine import dist

    stats = reader.stats()
    names = ("fit", "truncated", "too_long", "malformed", "non_finite")
    values = dist.all_sum([prepare.counts[k] for k in names] + [stats["substituted"], stats["skipped_total"]])
    report: dict[str, Any] = {"epoch": phase.epoch, "steps": phase.steps, "finished": finished,
                              **{k: int(v) for k, v in zip(names + ("stand_ins", "reader_skipped"), values)},
                              "unused_tail_per_rank": phase.samples_per_rank
                              - phase.steps * config.micro_batch * config.grad_accum}
    if ranks.is_main:
        log.info("epoch %d %s: pairs fit %d, with responses cut %d, too long %d, malformed %d, non-finite "
                 "features %d; reader skipped %d (their %d slots held stand-ins without loss); %d pair(s) per rank "
                 "after the last full step unused", phase.epoch, "done" if finished else "interrupted",
                 report["fit"], report["truncated"], report["too_long"], report["malformed"],
                 report["non_finite"], report["reader_skipped"], report["stand_ins"],
                 report["unused_tail_per_rank"])
        with open(Path(config.output) / "epochs.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(report) + "\n")
    return report


def main(argv: list[str] | None = None, prog: str = "train/rm.py") -> int:
    from train import launch

    config, dist, summary = launch.run_recipe(RMConfig, train, argv, prog)
    if dist.is_main:
        log.info("rm: %d/%d steps%s; held-out: %s; model: %s", summary["steps"], summary["total_steps"],
                 " (stopped at --stop-after-steps)" if summary["stopped_early"] else "",
                 format_eval(summary["heldout"]) if summary["heldout"] else "not measured", summary["model"])
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("VLMR_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    sys.exit(main())
