"""PPO step speed: rollout tokens/s and the generation / scoring / training time split.

Builds a tiny SFT model and reward model (random LoRAs, the tiny offline LM, 4-bit nf4 base
by default) in a temp folder, then runs the recipe's own pieces — ``train.ppo.rollout``
(sampling with the KV cache, reward-model scoring, old/reference logprobs and values,
rewards, GAE, whitening) and ``train.ppo.ppo_step`` (DeepSpeed engine, ZeRO-2) — on random
video features, and prints per step where the time goes.

Baseline, in the same process and in alternating rounds (so machine load hits both alike):
the same sampling without a KV cache (a full forward over prompt + response so far at
every new token) — the ratio is what the cache buys.

    python benchmarks/bench_ppo.py                        # 16 prompts x 48 new tokens, 4-bit base
    python benchmarks/bench_ppo.py --no-qlora --max-new-tokens 96

Prints figures and ratios; nothing is asserted (speed is measured here, never in tests).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What happens in the video?", "What colour is the shape?", "Which direction does it move?",
             "How many shapes are there?", "Describe this video in detail."]


def make_models(folder: Path, feat_dim: int) -> tuple[Path, Path]:
    from train.model import ModelSettings, VideoLMM
    from train.reward import RewardModel, RewardStats

    sft = VideoLMM.build(ModelSettings(feat_dim=feat_dim), seed=0)
    sft.save(folder / "sft")
    rm = RewardModel.from_sft(folder / "sft", seed=1)
    rm.stats = RewardStats(mean=0.0, std=1.0, count=1, source="benchmark")
    rm.save(folder / "rm")
    return folder / "sft", folder / "rm"


def make_samples(model, args) -> list[dict]:
    from train.ppo import PromptPreparer

    prepare = PromptPreparer(model.tokenizer, max_length=4096, max_new_tokens=args.max_new_tokens)
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(args.rollout):
        question = "<video>\n" + QUESTIONS[i % len(QUESTIONS)]
        samples.append(prepare({"key": f"bench-{i}",
                                "feat": torch.randn(args.feat_rows, args.feat_dim, generator=g).half(),
                                "json": {"conversations": [{"from": "human", "value": question}]}}))
    return samples


@torch.no_grad()
def generate_without_cache(model, samples, max_new_tokens: int, seed: int) -> int:
    """The baseline: sample like the recipe, but re-run the whole sequence for every token."""
    from train.model import pad_sequences, sample_next

    model.use("policy")
    lmm = model.views["policy"]
    rows = [list(s["prompt_ids"]) for s in samples]
    feat = torch.stack([s["feat"] for s in samples])
    generator = torch.Generator().manual_seed(seed)
    ended = torch.zeros(len(rows), dtype=torch.bool)
    produced = 0
    for _ in range(max_new_tokens):
        ids, mask = pad_sequences(rows, lmm.pad_token_id, side="left")
        logits = lmm(ids, feat, mask, padding_side="left", logits_to_keep=1).logits[:, -1]
        nxt = sample_next(logits.float(), model.temperature, 1.0, True, generator)
        for b, token in enumerate(nxt.tolist()):
            if not ended[b]:
                rows[b].append(token)
                produced += 1
        ended |= nxt == lmm.eos_token_id
        if bool(ended.all()):
            break
        for b in range(len(rows)):
            if ended[b]:
                rows[b].append(lmm.pad_token_id)
    return produced


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollout", type=int, default=16, help="prompts per step (one rank)")
    parser.add_argument("--generation-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--feat-rows", type=int, default=20,
                        help="video rows per prompt (tiny shards: 4 frames + 16 patches)")
    parser.add_argument("--feat-dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed PPO steps (after one warm-up step)")
    parser.add_argument("--qlora", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)

    from train import actor_critic, launch, ppo

    dist = launch.setup_distributed()
    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as tmp:
        sft, rm = make_models(Path(tmp), args.feat_dim)
        config = ppo.PPOConfig(shards="unused", sft=str(sft), reward_model=str(rm), output=tmp,
                               rollout_batch=args.rollout, step_batch=args.rollout // 2, micro_batch=args.micro_batch,
                               generation_batch=args.generation_batch, max_new_tokens=args.max_new_tokens,
                               max_length=4096, qlora=args.qlora, lr=1e-4, penalize_no_eos=False)
        model = actor_critic.ActorCritic.load(config)
        sizes = ppo.Sizes.of(config, 1)
        ds_config = launch.deepspeed_config(micro_batch=sizes.micro, grad_accum=sizes.grad_accum, zero_stage=2,
                                            precision="fp32", grad_clip=1.0)
        engine, _ = launch.initialize(model, ds_config, lr=config.lr, weight_decay=0.0, warmup_steps=0,
                                      total_steps=1000, min_lr_ratio=1.0)
        samples = make_samples(model, args)
        print(f"tiny LM ({'4-bit nf4' if args.qlora else 'fp32'} base), {args.rollout} prompts x "
              f"{args.max_new_tokens} new tokens, {args.feat_rows} video rows each, torch threads "
              f"{torch.get_num_threads()}")

        steps, cached, uncached = [], [], []
        for step in range(args.steps + 1):
            ro, times = ppo.rollout(model, samples, config, sizes, step=step, rank=0, device=dist.device,
                                    kl_coef=config.kl_coef)
            t0 = time.perf_counter()
            ppo.ppo_step(engine, model, ro, config, sizes, step=step, rank=0, device=dist.device)
            times["train"] = time.perf_counter() - t0
            tokens = int(ro.lengths.sum())
            t0 = time.perf_counter()
            baseline_tokens = generate_without_cache(model, samples, args.max_new_tokens, seed=step)
            baseline = time.perf_counter() - t0
            if step == 0:
                continue  # warm-up: allocator, first DeepSpeed step
            steps.append(times)
            cached.append(tokens / times["generate"])
            uncached.append(baseline_tokens / baseline)

    total = {k: statistics.median(t[k] for t in steps) for k in steps[0]}
    step_time = sum(total.values())
    print(f"\nPPO step (median of {len(steps)}): {step_time:.2f} s")
    for name, label in (("generate", "generation (KV cache)"), ("score", "reward model scoring"),
                        ("forward", "old/ref logprobs + values"), ("train", "training (2 PPO epochs)")):
        print(f"  {label:<28} {total[name]:7.2f} s  {100 * total[name] / step_time:5.1f}%")
    rate, base = statistics.median(cached), statistics.median(uncached)
    print(f"\nrollout tokens/s   KV cache {rate:8.1f}   no cache (baseline) {base:8.1f}   ratio {rate / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
