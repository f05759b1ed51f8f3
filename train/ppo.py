"""PPO from AI feedback: the SFT policy, a QLoRA adapter, rewards from the frozen reward model.

The algorithm, in plain words. Each step, every rank takes ``rollout_batch / ranks`` prompts
(the first human turn of samples streamed from prompt shards; the answers are ignored) and

1. **generates** a response to each with the policy (sampling at ``temperature``, KV cache,
   batches of ``generation_batch``); tokens after the first EOS are padding, and a response
   that reaches ``max_new_tokens`` without EOS is penalised;
2. **scores** it with the reward model, normalised with the RM's saved statistics
   ((r - mean) / std), replaced by ``no_eos_penalty`` when there is no EOS, minus an
   optional length penalty;
3. computes, with one forward function, the policy's log-probabilities, the reference's
   (the same base with the PPO adapter switched off: the SFT model) and the value model's
   values; per token the reward is ``-β·(logπ - logπ_ref)``, plus the score at the last valid
   token; GAE(γ, λ) gives advantages and returns; the advantages are whitened over the
   valid tokens of the whole rollout (all ranks);
4. **trains** ``ppo_epochs`` epochs over the rollout in minibatches of ``step_batch`` (each
   sample exactly once per epoch): clipped policy loss + ``vf_coef`` × clipped value loss,
   one optimizer step per minibatch with gradient clipping; then β is updated (fixed or
   adaptive to ``kl_target``).

The math lives in ``train/rl.py`` (tested against hand-computed values; the properties it
guarantees are in ``docs/ppo.md``), the models in ``train/actor_critic.py``; this file is
the recipe that wires them: config, setup, the loop, checkpoints.

Models (:class:`train.actor_critic.ActorCritic`), on one 4-bit nf4 base when the SFT model and the reward model
share their base LM (the usual case: the RM is trained from the SFT model), as adapters of
one peft model, switched per forward:

    policy     base + SFT LoRA (frozen) + PPO LoRA "policy" (trainable, r=64, alpha=16)
    reference  base + SFT LoRA — the PPO adapter off; no second copy of any weight
    reward     base + RM LoRA "reward" (frozen) + RM projector + RM head       (frozen)
    value      base + LoRA "value" initialised from the RM's + RM projector + zero head

The projectors stay frozen (the policy's is the SFT one, so the reference is exactly SFT).
When the bases differ (e.g. a 13B RM for a 7B policy), the reward and value adapters share a
second base. One DeepSpeed engine trains the policy and value adapters and the value head
together on the summed loss, as the public implementation's actor-critic does. Logprobs
are computed the same way at rollout, reference and update time (same temperature, same
slicing), in the micro-batches of the first PPO epoch, so at its first minibatch the ratio
is exactly 1. Dropout is off everywhere.

Prompts come through torchdata's ``StatefulDataLoader`` over the reader. Checkpoints (every
``save_every`` steps and at the end) hold the trainable weights (policy and value adapters,
value head), optimizer, LR schedule, KL controller, step, the loader's state (the reader's
position) and RNG states; ``--resume`` continues so that the following steps equal
an uninterrupted run's. The final policy is ``OUTPUT/model``, a plain ``VideoLMM`` folder
(its adapter is the SFT and PPO LoRAs concatenated into one of rank r_sft + r_ppo, which
computes the same function), so ``VideoLMM.load`` and the evaluations read it like the SFT
model.

Run it::

    vlmr train ppo --config train/configs/ppo_tiny.yaml             # one process
    python train/ppo.py --config train/configs/ppo_tiny.yaml        # the same
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 train/ppo.py --config train/configs/ppo_tiny.yaml
    deepspeed --num_gpus 8 train/ppo.py --config my.yaml --precision bf16
    vlmr train ppo --config train/configs/ppo_tiny.yaml --resume    # continue the latest checkpoint

On a machine without CUDA it runs on DeepSpeed's CPU accelerator over gloo.
Benchmark: ``python benchmarks/bench_ppo.py``. Tests: ``pytest tests/test_rl.py tests/test_ppo.py``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Sequence

import torch

from dataengine import config as cfg
from dataengine import dist
from train import rl
from train.actor_critic import ActorCritic
from train.trainer_config import TrainerConfig, budget

log = logging.getLogger(__name__)

STATE_FORMAT = "vlmr-ppo-state/1"
# Settings a resumed run must share with the checkpoint: they fix the data order and the plan.
PLAN_FIELDS = ("shards", "stages", "sft", "reward_model", "rollout_batch", "step_batch", "micro_batch",
               "ppo_epochs", "epochs", "max_steps", "shuffle", "window", "seed", "lora_r", "lora_alpha", "qlora",
               "max_new_tokens", "generation_batch", "max_length", "temperature")


@dataclass
class PPOConfig(TrainerConfig):
    """PPO of the SFT video LMM against a frozen reward model (QLoRA policy, value from the RM)."""

    NAME: ClassVar[str] = "ppo"

    shards: str = "shards/demo"
    """Prompt shards made by `vlmr build-shards` (first human turn = prompt; answers ignored)."""
    sft: str = "runs/sft/model"
    """The SFT model folder (`vlmr train sft`): the policy's start and the frozen reference."""
    reward_model: str = "runs/rm/model"
    """The reward model folder (`vlmr train rm`): frozen scorer, and the value model's start."""
    output: str = "runs/ppo"
    """Run folder: config.json, metrics.jsonl, checkpoints/, and model/ (the PPO policy)."""
    lora_r: int = 64
    """Rank of the PPO adapter on the policy."""
    lora_alpha: float = 16
    lora_targets: list[str] = field(default_factory=list)
    """Modules the PPO adapter wraps (default: the SFT adapter's)."""
    qlora: bool = True
    """Load the shared base LM 4-bit nf4 (bitsandbytes) under the adapters."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-2 (generation needs whole weights on every rank)."""
    rollout_batch: int = 256
    """Prompts per PPO step over all ranks."""
    step_batch: int = 128
    """Samples per optimizer step (PPO minibatch) over all ranks."""
    micro_batch: int = 8
    """Sequences per rank per forward pass (update, old logprobs, reference, values)."""
    generation_batch: int = 32
    """Prompts per rank per generate call."""
    max_new_tokens: int = 896
    """Length budget of a response (tokens, EOS included)."""
    max_length: int = 2048
    """Longest prompt + response the model sees, video rows included; longer prompts are skipped (counted)."""
    temperature: float = 1.0
    """Sampling temperature; the logprobs of rollout, reference and update use the same."""
    kl_coef: float = 0.1
    """β of the per-token KL penalty (k1); the starting value when adaptive."""
    kl_target: float = 0.0
    """Per-sequence KL target for the adaptive controller (0: β stays fixed)."""
    kl_horizon: float = 10000
    """Horizon (samples) of the adaptive KL controller."""
    penalize_no_eos: bool = True
    """Replace the score of a response without EOS by no_eos_penalty."""
    no_eos_penalty: float = -8.0
    length_penalty: float = 0.0
    """Subtracted from the score per valid response token (0: none)."""
    gamma: float = 1.0
    lam: float = 1.0
    """GAE λ."""
    whiten_advantages: bool = True
    """Whiten advantages over the valid tokens of the whole rollout (all ranks)."""
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    vf_coef: float = 0.1
    """Weight of the value loss in the summed loss."""
    ppo_epochs: int = 2
    """Passes over each rollout."""
    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 1.0
    """Final LR as a fraction of the peak (1: constant after warmup)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup."""
    epochs: int = 1
    """Passes over the prompts (--max-steps cuts the run shorter)."""
    shuffle: Literal["window", "none", "stage"] = "stage"
    """Prompt order; 'stage' is a uniform shuffle within each stage."""

    def problems(self) -> list[str]:
        p = super().problems()
        cfg.check(p, self.lora_r >= 1 and self.lora_alpha > 0, "--lora-r must be >= 1, --lora-alpha > 0")
        cfg.check(p, self.zero_stage in (0, 1, 2), f"--zero-stage must be 0..2 for PPO, got {self.zero_stage}")
        for name in ("rollout_batch", "step_batch", "generation_batch", "max_new_tokens", "ppo_epochs", "epochs"):
            cfg.check(p, getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1")
        cfg.check(p, self.rollout_batch % max(self.step_batch, 1) == 0,
                  f"--rollout-batch {self.rollout_batch} must be a multiple of --step-batch {self.step_batch} "
                  "(each sample is used exactly once per PPO epoch)")
        cfg.check(p, self.max_length > self.max_new_tokens, "--max-length must exceed --max-new-tokens")
        cfg.check(p, self.temperature > 0, "--temperature must be > 0")
        cfg.check(p, self.kl_coef >= 0 and self.kl_target >= 0 and self.kl_horizon > 0,
                  "--kl-coef and --kl-target must be >= 0, --kl-horizon > 0")
        cfg.check(p, self.length_penalty >= 0, "--length-penalty must be >= 0")
        cfg.check(p, 0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "--gamma and --lam must be in [0, 1]")
        cfg.check(p, self.clip_range > 0 and self.value_clip_range > 0, "clip ranges must be > 0")
        cfg.check(p, self.vf_coef >= 0, "--vf-coef must be >= 0")
        cfg.check(p, self.warmup_steps >= 0, "--warmup-steps must be >= 0")
        return p


@dataclass(frozen=True)
class Sizes:
    """Per-rank batch sizes of a run, checked against the number of ranks."""

    rollout: int
    """Prompts per rank per step."""
    minibatch: int
    """Samples per rank per optimizer step."""
    micro: int
    grad_accum: int

    @classmethod
    def of(cls, config: PPOConfig, world_size: int) -> "Sizes":
        problems = []
        if config.rollout_batch % world_size or config.step_batch % world_size:
            problems.append(f"--rollout-batch {config.rollout_batch} and --step-batch {config.step_batch} "
                            f"must be multiples of the {world_size} ranks")
        minibatch = config.step_batch // world_size
        if minibatch % config.micro_batch:
            problems.append(f"--step-batch per rank ({minibatch}) must be a multiple of --micro-batch "
                            f"{config.micro_batch}")
        cfg.raise_problems(problems, f"ppo batch sizes on {world_size} rank(s)")
        return cls(config.rollout_batch // world_size, minibatch, config.micro_batch,
                   minibatch // config.micro_batch)


# ---------------------------------------------------------------------------- data

class PromptPreparer:
    """Runs in the reader's read-ahead thread: the prompt's token ids and the length check.

    The prompt is the first human turn (its ``<video>`` placeholder included). A prompt whose
    spliced length plus ``max_new_tokens`` exceeds ``max_length`` is left out (None: the
    reader counts it and fills its slot) — decided from the sample alone, so every rank
    decides the same, before any batch is built.
    """

    def __init__(self, tokenizer, max_length: int, max_new_tokens: int, on_error: str = "raise", chat=None):
        from train import conversation

        self.tokenizer = tokenizer
        # The policy's chat template (VideoLMM.chat); vicuna v1 when not given.
        self.chat = chat or conversation.chat_template(conversation.DEFAULT_TEMPLATE, tokenizer)
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.on_error = on_error
        self.counts = {"fit": 0, "too_long": 0, "non_finite": 0}

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        from train import conversation
        from train.finite import check_features

        if not check_features(sample, self.on_error):
            self.counts["non_finite"] += 1
            return None

        try:
            first = sample["json"]["conversations"][0]
            if first.get("from") not in ("human", "user"):
                raise ValueError(f"the first turn is from {first.get('from')!r}, not a human prompt")
            question = first["value"]
            ids = self.chat.prompt_ids(question)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ValueError(f"sample {sample.get('key', '?')}: no prompt: {exc}") from exc
        video = conversation.video_token_id(self.tokenizer)
        length = conversation.spliced_length(len(ids), ids.count(video), int(sample["feat"].shape[0]))
        if length + self.max_new_tokens > self.max_length:
            self.counts["too_long"] += 1
            log.info("prompt of %s: %d tokens + %d new > max_length %d: left out", sample.get("key"), length,
                     self.max_new_tokens, self.max_length)
            return None
        self.counts["fit"] += 1
        return dict(sample, prompt_ids=ids, question=question)


def make_reader(config: PPOConfig, epoch: int, ranks, rollout: int, prepare=None):
    from dataengine.reader import ShardReader

    return ShardReader(config.shards, stages=list(config.stages), rank=ranks.rank, world_size=ranks.world_size,
                       batch_size=rollout, shuffle=config.shuffle, window=config.window, seed=config.seed,
                       epoch=epoch, fields=("json", "feat"), on_error=config.on_error, verify=config.verify,
                       guard=prepare)


def make_loader(reader, sizes: Sizes):
    """Rollouts of prompts (lists of ``sizes.rollout`` samples) through torchdata's
    ``StatefulDataLoader``; its ``state_dict()`` is what a checkpoint stores."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    return StatefulDataLoader(reader, batch_size=sizes.rollout, num_workers=0, collate_fn=list)


def plan_steps(config: PPOConfig, ranks, sizes: Sizes) -> list[int]:
    """PPO steps of each prompt epoch (from the manifest alone), cut to ``max_steps`` in all."""
    per_epoch = len(make_reader(config, 0, ranks, sizes.rollout)) // sizes.rollout
    if per_epoch == 0:
        raise ValueError(f"{config.shards}: stages {config.stages} hold fewer than one rollout of "
                         f"{sizes.rollout} prompts per rank on {ranks.world_size} rank(s)")
    return [n for n in budget([per_epoch] * config.epochs, config.max_steps) if n]


# ---------------------------------------------------------------------------- rollout

@dataclass
class Rollout:
    """One rank's rollout: B samples, response tensors (B, T); frozen during the update."""

    keys: list[str]
    feats: list[torch.Tensor]
    prompt_ids: list[list[int]]
    responses: torch.Tensor
    """(B, T) sampled ids; pad after the generated length."""
    lengths: torch.Tensor
    """(B,) generated tokens per row."""
    mask: torch.Tensor
    """(B, T) valid tokens: up to and including the first EOS."""
    ended: torch.Tensor
    raw_scores: torch.Tensor
    """(B,) the reward model's raw scores."""
    scores: torch.Tensor
    """(B,) normalised with the RM's statistics."""
    shaped_scores: torch.Tensor
    """(B,) after the no-EOS and length penalties: what is added at the last valid token."""
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    substitutes: int = 0

    def __len__(self) -> int:
        return len(self.keys)


def sequence_inputs(model: ActorCritic, ro_prompts: Sequence[Sequence[int]], responses: torch.Tensor,
                    mask: torch.Tensor, feats: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Model inputs for rows of a rollout: prompt + valid response tokens, right-padded.

    responses, mask (b, T). Tokens after the first EOS never enter the model. Returns
    ``input_ids``, ``attention_mask`` (b, L), ``feat`` ((b, N, D) or b tensors) and
    ``positions`` (b, T): the spliced position whose output predicts response token t of
    each row, i.e. (spliced prompt length) - 1 + t, clamped into the batch's length on
    padding (masked anyway).
    """
    from train import conversation
    from train.model import pad_sequences

    video = model.views["policy"].video_token_id
    counts = mask.sum(1).long().tolist()
    rows = [list(p) + responses[i, :counts[i]].tolist() for i, p in enumerate(ro_prompts)]
    input_ids, attention_mask = pad_sequences(rows, model.views["policy"].pad_token_id, side="right")
    starts = torch.tensor([conversation.spliced_length(len(p), list(p).count(video), int(f.shape[0]))
                           for p, f in zip(ro_prompts, feats)])
    spliced = int((starts + torch.tensor(counts)).max())
    T = responses.shape[1]
    positions = (starts.unsqueeze(1) - 1 + torch.arange(T).unsqueeze(0)).clamp(max=spliced - 1)
    same = all(f.shape == feats[0].shape for f in feats)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "positions": positions,
            "feat": torch.stack(list(feats)) if same else list(feats)}


def _to(inputs: dict[str, Any], device) -> dict[str, Any]:
    feat = inputs["feat"]
    return {"input_ids": inputs["input_ids"].to(device), "attention_mask": inputs["attention_mask"].to(device),
            "positions": inputs["positions"].to(device),
            "feat": feat.to(device) if isinstance(feat, torch.Tensor) else [f.to(device) for f in feat]}


def epoch_plan(n: int, sizes: Sizes, seed: int, step: int, epoch: int, rank: int) -> list[list[torch.Tensor]]:
    """Minibatches (each a list of micro-batch index tensors) of one PPO epoch of a rollout.

    Seeded by (seed, step, epoch, rank) only, so a resumed run draws the same; the rollout's
    old logprobs are computed in epoch 0's micro-batches, which the first update repeats.
    """
    minibatches = rl.minibatch_indices(n, sizes.minibatch, seed=_mix(seed, step, epoch, rank, 1))
    return [list(mb.split(sizes.micro)) for mb in minibatches]


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (deterministic; no hash randomisation)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value * 6364136223846793005 + int(part) + 1442695040888963407) % (1 << 63)
    return value


def rollout(model: ActorCritic, samples: Sequence[dict[str, Any]], config: PPOConfig, sizes: Sizes, *,
            step: int, rank: int, device, kl_coef: float) -> tuple[Rollout, dict[str, float]]:
    """Generate, score and evaluate one rank's rollout; returns it and the time split."""
    t0 = time.perf_counter()
    responses, lengths = generate_responses(model, samples, config, step=step, rank=rank, device=device)
    generated = time.perf_counter() - t0
    ro, times = evaluate_rollout(model, samples, responses, lengths, config, sizes, step=step, rank=rank,
                                 device=device, kl_coef=kl_coef)
    return ro, {"generate": generated, **times}


def generate_responses(model: ActorCritic, samples: Sequence[dict[str, Any]], config: PPOConfig, *, step: int,
                       rank: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled responses (B, T), right-padded, and their generated lengths (B,).

    Batches of ``generation_batch`` prompts with the KV cache; each batch's sampler is
    seeded by (seed, step, rank, batch), so a resumed run samples the same responses.
    """
    from train.model import pad_sequences

    model.eval()
    token_lists: list[list[int]] = []
    for k, lo in enumerate(range(0, len(samples), config.generation_batch)):
        chunk = samples[lo:lo + config.generation_batch]
        gen = model.generate([torch.as_tensor(s["feat"]).to(device) for s in chunk],
                             [list(s["prompt_ids"]) for s in chunk], max_new_tokens=config.max_new_tokens,
                             seed=_mix(config.seed, step, rank, k, 0))
        token_lists.extend(gen.token_ids)
    pad = model.views["policy"].pad_token_id
    responses, _ = pad_sequences([t or [pad] for t in token_lists], pad, side="right")
    return responses, torch.tensor([len(t) for t in token_lists])


def evaluate_rollout(model: ActorCritic, samples: Sequence[dict[str, Any]], responses: torch.Tensor,
                     lengths: torch.Tensor, config: PPOConfig, sizes: Sizes, *, step: int, rank: int, device,
                     kl_coef: float) -> tuple[Rollout, dict[str, float]]:
    """Score responses, compute old/reference logprobs and values, rewards, GAE; all frozen.

    responses (B, T) with ``lengths`` (B,) generated tokens each; tokens after the first EOS
    are padding whatever their ids.
    """
    times = {"score": 0.0, "forward": 0.0}
    n = len(samples)
    feats = [torch.as_tensor(s["feat"]) for s in samples]
    prompts = [list(s["prompt_ids"]) for s in samples]
    mask, ended = rl.response_mask(responses, model.views["policy"].eos_token_id, lengths)
    # Tokens after the first EOS are padding, whatever was there.
    responses = responses.masked_fill(mask == 0, model.views["policy"].pad_token_id)
    model.eval()

    # -- score with the frozen reward model ----------------------------------------------
    t0 = time.perf_counter()
    counts = mask.sum(1).long().tolist()
    narratives = [_narrative(s) for s in samples] if model.reward.context == "narrative" else None
    raw = model.score([f.to(device) for f in feats], [s["question"] for s in samples],
                      [responses[i, :counts[i]].tolist() for i in range(n)], narratives, sizes.micro).cpu()
    scores = model.reward.normalise(raw)
    shaped = rl.shaped_scores(scores, ended, mask.sum(1), no_eos_penalty=config.no_eos_penalty
                              if config.penalize_no_eos else None, length_penalty=config.length_penalty)
    times["score"] = time.perf_counter() - t0

    # -- old logprobs, values and reference logprobs, in epoch 0's micro-batches ----------
    t0 = time.perf_counter()
    T = responses.shape[1]
    logprobs, ref_logprobs, values, entropy = (torch.zeros(n, T) for _ in range(4))
    with torch.no_grad():
        for minibatch in epoch_plan(n, sizes, config.seed, step, 0, rank):
            for idx in minibatch:
                inputs = _to(sequence_inputs(model, [prompts[i] for i in idx], responses[idx], mask[idx],
                                             [feats[i] for i in idx]), device)
                resp = responses[idx].to(device)
                lp, v, ent = model(inputs["input_ids"], inputs["feat"], inputs["attention_mask"],
                                   inputs["positions"], resp)
                ref = model.reference_logprobs(inputs["input_ids"], inputs["feat"], inputs["attention_mask"],
                                               inputs["positions"], resp)
                logprobs[idx], values[idx], entropy[idx], ref_logprobs[idx] = lp.cpu(), v.cpu(), ent.cpu(), ref.cpu()
    # Padding carries nothing: exactly 0 in every rollout tensor.
    logprobs, ref_logprobs, values, entropy = (rl.only_valid(x, mask)
                                               for x in (logprobs, ref_logprobs, values, entropy))
    rewards, kl = rl.kl_penalized_rewards(shaped, logprobs, ref_logprobs, mask, kl_coef)
    advantages, returns = rl.gae(rewards, values, mask, config.gamma, config.lam)
    if config.whiten_advantages:
        # Over the whole rollout batch: every rank's valid tokens (dist places the sums where
        # the backend takes them: NCCL only takes CUDA tensors).
        advantages = rl.masked_whiten(advantages, mask, all_reduce=dist.all_reduce_sum)
    times["forward"] = time.perf_counter() - t0
    ro = Rollout(keys=[s.get("key", "") for s in samples], feats=feats, prompt_ids=prompts, responses=responses,
                 lengths=lengths, mask=mask, ended=ended, raw_scores=raw, scores=scores, shaped_scores=shaped,
                 logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, entropy=entropy, rewards=rewards,
                 kl=kl, advantages=advantages, returns=returns,
                 substitutes=sum(1 for s in samples if s.get("substitute_for")))
    return ro, times


def _narrative(sample: dict[str, Any]) -> str:
    narrative = sample["json"].get("narrative")
    if not isinstance(narrative, str):
        raise ValueError(f"sample {sample.get('key', '?')}: the reward model scores with the narrative as "
                         "context, but the prompt shards carry none (use shards written by `vlmr narrate`)")
    return narrative


# ---------------------------------------------------------------------------- update

def ppo_step(engine, model: ActorCritic, ro: Rollout, config: PPOConfig, sizes: Sizes, *, step: int, rank: int,
             device) -> dict[str, Any]:
    """``ppo_epochs`` passes over the rollout in minibatches, one optimizer step each.

    Returns this rank's sums for the metrics line and ``records``: one per micro-batch
    (epoch, minibatch, sample indices, mean ratio, clipfrac, max |logπ - logπ_old|).
    """
    from train.finite import check_loss

    model.train()
    sums = {"pg_loss": 0.0, "vf_loss": 0.0, "clipfrac": 0.0, "vf_clipfrac": 0.0, "approx_kl": 0.0, "ratio": 0.0,
            "micro_batches": 0.0}
    records = []
    for epoch in range(config.ppo_epochs):
        for m, minibatch in enumerate(epoch_plan(len(ro), sizes, config.seed, step, epoch, rank)):
            for idx in minibatch:
                inputs = _to(sequence_inputs(model, [ro.prompt_ids[i] for i in idx], ro.responses[idx],
                                             ro.mask[idx], [ro.feats[i] for i in idx]), device)
                mask = ro.mask[idx].to(device)
                logprobs, values, _ = engine(inputs["input_ids"], inputs["feat"], inputs["attention_mask"],
                                             inputs["positions"], ro.responses[idx].to(device))
                old = ro.logprobs[idx].to(device)
                pg = rl.policy_loss(logprobs, old, ro.advantages[idx].to(device), mask, config.clip_range)
                vf_loss, vf_clipfrac = rl.value_loss(values, ro.values[idx].to(device), ro.returns[idx].to(device),
                                                     mask, config.value_clip_range)
                loss = pg.loss + config.vf_coef * vf_loss
                check_loss(loss, step=step + 1, rank=rank, keys=[ro.keys[i] for i in idx])
                engine.backward(loss)
                engine.step()
                for name, value in (("pg_loss", pg.loss), ("vf_loss", vf_loss), ("clipfrac", pg.clipfrac),
                                    ("vf_clipfrac", vf_clipfrac), ("approx_kl", pg.approx_kl), ("ratio", pg.ratio)):
                    sums[name] += float(value.detach())
                sums["micro_batches"] += 1
                records.append({"epoch": epoch, "minibatch": m, "indices": idx.tolist(), "ratio": float(pg.ratio),
                                "clipfrac": float(pg.clipfrac),
                                "max_logratio": float(rl.only_valid((logprobs.detach() - old).abs(), mask).max())})
    sums["records"] = records  # type: ignore[assignment]
    return sums


# ---------------------------------------------------------------------------- metrics

METRIC_SUMS = ("samples", "raw_score", "score", "shaped_score", "return", "kl", "entropy_sum", "tokens", "ended",
               "pg_loss", "vf_loss", "clipfrac", "vf_clipfrac", "approx_kl", "ratio", "micro_batches",
               "generate", "score_time", "forward", "train", "substitutes", "value_sq_err", "value_count")


def log_metrics(run, step: int, total_steps: int, ro: Rollout, train_sums: dict[str, Any], times: dict[str, float],
                kl_coef: float, done_here: int) -> dict[str, Any]:
    """Sum this rank's figures over ranks; rank 0 writes the step's line and the metrics
    (every rank calls it, and gets the metrics: β's update uses the all-reduced KL)."""
    from train.runs import metrics_line

    mask = ro.mask
    seq_kl = rl.sequence_kl(ro.kl, mask)
    local = {
        "samples": len(ro), "raw_score": float(ro.raw_scores.sum()), "score": float(ro.scores.sum()),
        "shaped_score": float(ro.shaped_scores.sum()), "return": float(ro.rewards.sum()),
        "kl": float(seq_kl.sum()), "entropy_sum": float((ro.entropy * mask).sum()), "tokens": float(mask.sum()),
        "ended": float(ro.ended.sum()), **{k: float(train_sums[k]) for k in ("pg_loss", "vf_loss", "clipfrac",
                                                                           "vf_clipfrac", "approx_kl", "ratio",
                                                                           "micro_batches")},
        "generate": times["generate"], "score_time": times["score"], "forward": times["forward"],
        "train": times["train"], "substitutes": float(ro.substitutes),
        "value_sq_err": float((((ro.values - ro.returns) ** 2) * mask).sum()), "value_count": float(mask.sum()),
    }
    total = dict(zip(METRIC_SUMS, dist.all_sum([local[k] for k in METRIC_SUMS])))
    n, mb, world = max(total["samples"], 1), max(total["micro_batches"], 1), run.ranks.world_size
    step_time = sum(times.values())
    metrics = {
        "step": step, "reward_raw": total["raw_score"] / n, "reward": total["score"] / n,
        "score_shaped": total["shaped_score"] / n, "return": total["return"] / n, "kl": total["kl"] / n,
        "kl_coef": kl_coef, "entropy": total["entropy_sum"] / max(total["tokens"], 1),
        "pg_loss": total["pg_loss"] / mb, "vf_loss": total["vf_loss"] / mb, "clipfrac": total["clipfrac"] / mb,
        "vf_clipfrac": total["vf_clipfrac"] / mb, "approx_kl": total["approx_kl"] / mb, "ratio": total["ratio"] / mb,
        "response_len": total["tokens"] / n, "eos_rate": total["ended"] / n,
        "time_generate": total["generate"] / world, "time_score": (total["score_time"] + total["forward"]) / world,
        "time_reward_model": total["score_time"] / world, "time_forward": total["forward"] / world,
        "time_train": total["train"] / world,
        "rollout_tokens_per_s": total["tokens"] / max(total["generate"] / world, 1e-9),
        "substitutes": total["substitutes"], "value_mse": total["value_sq_err"] / max(total["value_count"], 1),
        "eta_s": run.eta(done_here, step, total_steps),
    }
    m = metrics
    run.log(metrics, metrics_line(step, total_steps, [
        f"reward {m['reward']:.3f} (raw {m['reward_raw']:.3f})", f"kl {m['kl']:.3f} β {kl_coef:.3f}",
        f"ent {m['entropy']:.2f}", f"pg {m['pg_loss']:.4f}", f"vf {m['vf_loss']:.4f}", f"clip {m['clipfrac']:.3f}",
        f"akl {m['approx_kl']:.4f}", f"len {m['response_len']:.1f}", f"eos {100 * m['eos_rate']:.0f}%",
        f"gen {m['time_generate']:.1f}s score {m['time_score']:.1f}s train {m['time_train']:.1f}s ({step_time:.1f}s)"],
        m["eta_s"]))
    return metrics


# ---------------------------------------------------------------------------- recipe

def train(config: PPOConfig, ranks) -> dict[str, Any]:
    """Run (or resume) PPO; returns a summary (steps, last metrics, model path)."""
    from train import launch
    from train.runs import Run

    run = Run.open(config, ranks, state_format=STATE_FORMAT, plan_fields=PLAN_FIELDS)
    torch.manual_seed(config.seed)

    # -- setup, in dependency order: sizes, plan, models, engine, KL controller --------------
    sizes = Sizes.of(config, ranks.world_size)
    plan = plan_steps(config, ranks, sizes)
    total_steps = sum(plan)
    model = ActorCritic.load(config)
    optimizer_steps = total_steps * config.ppo_epochs * (sizes.rollout // sizes.minibatch)
    ds_config = launch.deepspeed_config(micro_batch=sizes.micro, grad_accum=sizes.grad_accum,
                                        zero_stage=config.zero_stage, precision=config.precision,
                                        grad_clip=config.grad_clip)
    engine, _ = launch.initialize(model, ds_config, lr=config.lr, weight_decay=config.weight_decay,
                                  warmup_steps=config.warmup_steps, total_steps=optimizer_steps,
                                  min_lr_ratio=config.min_lr_ratio)
    kl_ctl = rl.make_kl_controller(config.kl_coef, config.kl_target or None, config.kl_horizon)
    log.info("ppo: %d rank(s), %d steps (%s) of %d prompts, %d optimizer steps, %s trainable parameters; "
             "%s", ranks.world_size, total_steps, "+".join(map(str, plan)), config.rollout_batch, optimizer_steps,
             f"{sum(p.numel() for p in model.trainable):,}",
             "one shared base" if model.critic_lm is None else "two bases (policy / reward+value)")
    step, epoch, epoch_step, loader_state = 0, 0, 0, None
    resumed = run.resume(engine)
    if resumed is not None:
        state, rank_state = resumed
        step, epoch, epoch_step, loader_state = (state["step"], state["epoch"], state["epoch_step"],
                                                 rank_state["loader"])
        kl_ctl.load_state_dict(state["kl_controller"])
    last: dict[str, Any] | None = None
    stopped, first_step = False, step
    prepare = PromptPreparer(model.tokenizer, config.max_length, config.max_new_tokens, config.on_error,
                             model.views["policy"].chat)

    # -- the loop: prompt epochs, PPO steps ---------------------------------------------------
    for e in range(epoch, len(plan)):
        if e != epoch:
            epoch_step, loader_state = 0, None
        reader = make_reader(config, e, ranks, sizes.rollout, prepare)
        loader = make_loader(reader, sizes)
        if loader_state is not None:
            loader.load_state_dict(loader_state)
        prompts = iter(loader)
        while epoch_step < plan[e]:
            if config.stop_after_steps and step >= config.stop_after_steps:
                stopped = True
                break
            samples = next(prompts)
            ro, times = rollout(model, samples, config, sizes, step=step, rank=ranks.rank, device=ranks.device,
                                kl_coef=kl_ctl.value)
            t0 = time.perf_counter()
            train_sums = ppo_step(engine, model, ro, config, sizes, step=step, rank=ranks.rank, device=ranks.device)
            times["train"] = time.perf_counter() - t0
            kl_used = kl_ctl.value
            step += 1
            epoch_step += 1
            last = log_metrics(run, step, total_steps, ro, train_sums, times, kl_used, step - first_step)
            kl_ctl.update(last["kl"], n_steps=config.rollout_batch)  # every rank: the same all-reduced KL
            if (config.save_every and step % config.save_every == 0) or step == total_steps:
                run.save(step, engine=engine, model=model,
                         trainer_state={"epoch": e, "epoch_step": epoch_step, "kl_controller": kl_ctl.state_dict(),
                                        "prompts": dict(prepare.counts)},
                         rank_state={"loader": loader.state_dict()})
        report_epoch(e, reader, prepare, ranks)
        if stopped:
            break

    run.close()
    summary = {"steps": step, "total_steps": total_steps, "stopped_early": stopped, "last": last, "model": None}
    if not stopped:
        summary["model"] = str(launch.save_final_model(model, run.model_dir, ranks))
    return summary


def report_epoch(epoch: int, reader, prepare: PromptPreparer, ranks) -> None:
    """Log, summed over ranks, the prompts left out (too long, non-finite features) and what the reader skipped."""
    stats = reader.stats()
    fit, too_long, non_finite, substituted, skipped = dist.all_sum(
        [prepare.counts["fit"], prepare.counts["too_long"], prepare.counts["non_finite"], stats["substituted"],
         stats["skipped_total"]])
    if ranks.is_main:
        log.info("prompt epoch %d: of the prompts read (the reader reads ahead), %d fit, %d were left out as "
                 "too long, %d for non-finite features; reader skipped %d (their %d slots repeat an earlier "
                 "prompt)", epoch, fit, too_long, non_finite, skipped, substituted)


def main(argv: list[str] | None = None, prog: str = "train/ppo.py") -> int:
    from train import launch

    config, ranks, summary = launch.run_recipe(PPOConfig, train, argv, prog)
    if ranks.is_main:
        log.info("ppo: %d/%d steps%s; model: %s", summary["steps"], summary["total_steps"],
                 " (stopped at --stop-after-steps)" if summary["stopped_early"] else "", summary["model"])
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("VLMR_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    sys.exit(main())
