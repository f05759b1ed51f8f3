"""`vlmr train ppo`: the model-level statements of correct PPO, and the recipe end to end.

Fast tests run the real models (tiny Llama, 4-bit nf4 base, peft adapters, DeepSpeed on
CPU) on random video features; they check the statements of docs/ppo.md
that need a model (the math ones are in tests/test_rl.py):

    P2  rollout logprobs = update logprobs: ratio exactly 1, clipfrac 0 at the first minibatch
    P3  dropout off: two identical forwards agree (policy, reference, value, reward model)
    P4  tokens after the first EOS change nothing
    P5  responses without EOS are penalised; the EOS rate is what the metrics report
    P9  the same sequence with more or less padding: same logprobs, values and reward
    P10 rollout tensors frozen during the update; each sample once per PPO epoch

Slow tests run on the synthetic world (the fixture ``world_models``): shards built by
`build-shards`, a policy from 30 SFT steps on the easy stage, and a reward model trained
here from that SFT model with the Bradley–Terry loss of ``train.reward`` on pairs that differ
in one token: an answer the SFT policy sampled, with and without a "favourite" token that
about half of its answers hold and no prompt does. The RM recipe (``train/rm.py``) is not run,
to keep the fixture to seconds; the folder is the one it writes (``RewardModel.save``, with
reward statistics). Then: the final policy says the favourite far more often than the SFT
policy and the RM scores it higher, while KL stays bounded; resume equals an uninterrupted
run; two ranks under torchrun.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from train import actor_critic, ppo, rl

REPO = Path(__file__).resolve().parents[1]
FEAT_ROWS, FEAT_DIM = 5, 64
QUESTIONS = ["What happens in the video?", "What colour is the shape?", "Which direction does it move?",
             "How many shapes are there?"]


# ---------------------------------------------------------------------------- fixtures

def _perturb_lora(lm: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Non-zero LoRA B so that adapters change the function (a fresh adapter is a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in lm.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * std)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An SFT model and a reward model folder on the tiny LM, with random (non-zero) LoRAs."""
    from train.model import ModelSettings, VideoLMM
    from train.reward import RewardModel, RewardStats

    root = tmp_path_factory.mktemp("ppo_models")
    sft = VideoLMM.build(ModelSettings(feat_dim=FEAT_DIM), seed=0)
    _perturb_lora(sft.lm, seed=1)
    sft.save(root / "sft")
    rm = RewardModel.from_sft(root / "sft", seed=2)
    _perturb_lora(rm.lmm.lm, seed=3)
    rm.stats = RewardStats(mean=0.25, std=2.0, count=10, source="test")
    rm.save(root / "rm")
    return SimpleNamespace(root=root, sft=root / "sft", rm=root / "rm")


def small_config(folders, **overrides) -> ppo.PPOConfig:
    settings = dict(shards="unused", sft=str(folders.sft), reward_model=str(folders.rm),
                    output=str(folders.root / "run"),
                    rollout_batch=8, step_batch=4, micro_batch=2, generation_batch=4, max_new_tokens=6,
                    max_length=128, lr=1e-2, qlora=True, zero_stage=2, kl_coef=0.1, seed=0,
                    # the random policy rarely ends: without this every score is the same penalty
                    penalize_no_eos=False)
    return ppo.PPOConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def setup(folders):
    """ActorCritic on one shared 4-bit base, a DeepSpeed engine over it, and prompt samples."""
    from train import launch

    dist = launch.setup_distributed()
    config = small_config(folders)
    model = actor_critic.ActorCritic.load(config)
    sizes = ppo.Sizes.of(config, 1)
    ds_config = launch.deepspeed_config(micro_batch=sizes.micro, grad_accum=sizes.grad_accum, zero_stage=2,
                                        precision="fp32", grad_clip=1.0)
    engine, _ = launch.initialize(model, ds_config, lr=config.lr, weight_decay=0.0, warmup_steps=0, total_steps=100,
                                  min_lr_ratio=1.0)
    prepare = ppo.PromptPreparer(model.tokenizer, config.max_length, config.max_new_tokens)
    g = torch.Generator().manual_seed(0)
    samples = [prepare({"key": f"k{i}", "feat": torch.randn(FEAT_ROWS, FEAT_DIM, generator=g).half(),
                        "json": {"conversations": [{"from": "human", "value": "<video>\n" + QUESTIONS[i % 4]},
                                                   {"from": "gpt", "value": "ignored"}]}})
               for i in range(8)]
    return SimpleNamespace(config=config, model=model, engine=engine, sizes=sizes, samples=samples, dist=dist)


def fresh_rollout(setup, step=0):
    return ppo.rollout(setup.model, setup.samples, setup.config, setup.sizes, step=step, rank=0, device="cpu",
                       kl_coef=setup.config.kl_coef)[0]


def inputs_of(setup, responses, lengths, rows=None):
    """Model inputs of chosen rows of the samples with the given responses."""
    rows = list(range(len(setup.samples))) if rows is None else rows
    mask, _ = rl.response_mask(responses, setup.model.views["policy"].eos_token_id, lengths)
    return ppo.sequence_inputs(setup.model, [setup.samples[i]["prompt_ids"] for i in rows], responses, mask,
                               [setup.samples[i]["feat"] for i in rows]), mask


def forward(setup, inputs, responses):
    with torch.no_grad():
        lp, v, _ = setup.model(inputs["input_ids"], inputs["feat"], inputs["attention_mask"], inputs["positions"],
                               responses)
        ref = setup.model.reference_logprobs(inputs["input_ids"], inputs["feat"], inputs["attention_mask"],
                                             inputs["positions"], responses)
    return lp, v, ref


# ---------------------------------------------------------------------------- models

def test_one_shared_4bit_base_and_reference_is_the_sft_model(setup, folders):
    import bitsandbytes as bnb

    from train.model import VideoLMM

    model = setup.model
    assert model.critic_lm is None  # SFT and RM share their base: one copy
    base_layers = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    sft = VideoLMM.load(folders.sft, qlora=True)
    assert base_layers == sum(isinstance(m, bnb.nn.Linear4bit) for m in sft.modules()) > 0
    trainable = {actor_critic._adapter_of(n) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"policy", "value", None}  # None: the value head
    assert all(p.requires_grad for p in model.value_head.parameters())
    # reference = SFT exactly (PPO adapter off), and a fresh PPO adapter starts as the SFT model
    responses = torch.tensor([[7, 9, 11, 2]] * 2)
    inputs, mask = inputs_of(setup, responses, torch.tensor([4, 4]), rows=[0, 1])
    lp, values, ref = forward(setup, inputs, responses)
    assert torch.equal(lp, ref)
    assert bool((values == 0).all())  # zero-initialised value head
    with torch.no_grad():
        out = sft(inputs["input_ids"], inputs["feat"], inputs["attention_mask"], logits_to_keep=inputs["positions"])
    logits = out.logits.index_fill(-1, torch.tensor([sft.video_token_id]), float("-inf"))  # never said in PPO
    torch.testing.assert_close(rl.logprobs_from_logits(logits, responses), ref, atol=1e-5, rtol=0)


def test_reward_on_the_shared_base_equals_the_saved_reward_model(setup, folders):
    from train.reward import RewardModel

    rm = RewardModel.load(folders.rm, qlora=True)
    feats = [s["feat"] for s in setup.samples[:3]]
    questions = [s["question"] for s in setup.samples[:3]]
    responses = [[7, 9, 2], [11, 12, 13, 14], [2]]
    shared = setup.model.score(feats, questions, responses, None, batch_size=2)
    torch.testing.assert_close(shared, rm.score(feats, questions, responses), atol=1e-5, rtol=0)
    torch.testing.assert_close(setup.model.reward.normalise(shared), (shared - 0.25) / 2.0)


def test_reward_model_on_another_base_gets_a_base_of_its_own(setup, folders, tmp_path):
    import shutil

    from dataengine.models import resolve_lm
    from train.model import MODEL_CONFIG

    other_lm = tmp_path / "other_lm"  # the same weights under another path: another base
    shutil.copytree(resolve_lm("tiny"), other_lm)
    rm = tmp_path / "rm"
    shutil.copytree(folders.rm, rm)
    data = json.loads((rm / MODEL_CONFIG).read_text())
    data["settings"]["lm"] = str(other_lm)
    (rm / MODEL_CONFIG).write_text(json.dumps(data))
    model = actor_critic.ActorCritic.load(small_config(folders, reward_model=str(rm)))
    assert model.critic_lm is not None and model.critic_lm is not model.lm
    feats, questions = [s["feat"] for s in setup.samples[:2]], [s["question"] for s in setup.samples[:2]]
    responses = [[7, 9, 2], [11, 12]]
    torch.testing.assert_close(model.score(feats, questions, responses, None, 2),
                               setup.model.score(feats, questions, responses, None, 2), atol=1e-5, rtol=0)
    trainable = {actor_critic._adapter_of(n) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"policy", "value", None}


def test_dropout_is_off_and_identical_forwards_agree(setup):  # P3
    model = setup.model
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    responses = torch.tensor([[5, 6, 7, 2], [8, 9, 10, 11]])
    inputs, _ = inputs_of(setup, responses, torch.tensor([4, 4]), rows=[2, 3])
    model.train()
    first = forward(setup, inputs, responses)
    model.eval()
    second = forward(setup, inputs, responses)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    feats, questions = [s["feat"] for s in setup.samples[:2]], [s["question"] for s in setup.samples[:2]]
    assert torch.equal(model.score(feats, questions, [[5, 2], [6, 7]], None, 2),
                       model.score(feats, questions, [[5, 2], [6, 7]], None, 2))


def test_logprobs_read_the_positions_generation_samples_from(setup):  # P2: same slicing
    from train.model import pad_sequences

    model = setup.model
    model.use("policy")
    rows = setup.samples[:4]
    greedy = model.views["policy"].generate([s["feat"] for s in rows], [s["prompt_ids"] for s in rows],
                                            max_new_tokens=6, do_sample=False)
    responses, _ = pad_sequences(greedy.token_ids, model.views["policy"].pad_token_id)
    lengths = torch.tensor([len(t) for t in greedy.token_ids])
    inputs, mask = inputs_of(setup, responses, lengths, rows=[0, 1, 2, 3])
    with torch.no_grad():
        logits = model._logits("policy", inputs["input_ids"], inputs["feat"], inputs["attention_mask"],
                               inputs["positions"])
    # greedy tokens are the argmax of the logits the logprobs are read from, at every valid position
    assert torch.equal(logits.argmax(-1)[mask == 1], responses[mask == 1])
    # and the <video> placeholder can never be sampled
    video = model.views["policy"].video_token_id
    assert bool(torch.isneginf(logits[..., video]).all())


# ---------------------------------------------------------------------------- rollouts and updates

def test_first_minibatch_ratio_is_exactly_one_and_rollouts_stay_frozen(setup):  # P2, P10
    ro = fresh_rollout(setup)
    frozen = {name: getattr(ro, name).clone() for name in ("responses", "mask", "logprobs", "ref_logprobs", "values",
                                                           "rewards", "advantages", "returns")}
    assert all(not getattr(ro, name).requires_grad for name in frozen)
    weights = [p.detach().clone() for p in setup.model.trainable]
    try:
        sums = ppo.ppo_step(setup.engine, setup.model, ro, setup.config, setup.sizes, step=0, rank=0, device="cpu")
    finally:  # the other tests expect the policy as loaded
        with torch.no_grad():
            for param, saved in zip(setup.model.trainable, weights):
                param.copy_(saved)
    records = sums["records"]
    first = [r for r in records if r["epoch"] == 0 and r["minibatch"] == 0]
    assert len(first) == setup.sizes.grad_accum
    for r in first:
        assert r["max_logratio"] == 0.0 and r["ratio"] == 1.0 and r["clipfrac"] == 0.0
    # after the first optimizer step the policy has moved: the check above can fail
    assert max(r["max_logratio"] for r in records if (r["epoch"], r["minibatch"]) != (0, 0)) > 0
    for name, before in frozen.items():
        assert torch.equal(getattr(ro, name), before), name
    # each sample exactly once per PPO epoch, in a different order per epoch
    orders = []
    for epoch in range(setup.config.ppo_epochs):
        used = [i for r in records if r["epoch"] == epoch for i in r["indices"]]
        assert sorted(used) == list(range(len(ro)))
        orders.append(used)
    assert orders[0] != orders[1]


def test_tokens_after_eos_change_nothing(setup):  # P4
    eos = setup.model.views["policy"].eos_token_id
    pad = setup.model.views["policy"].pad_token_id
    assert pad != eos
    n = len(setup.samples)
    clean = torch.full((n, 6), pad)
    clean[:, :3] = torch.tensor([12, 13, eos])
    lengths = torch.full((n,), 3)
    noisy = clean.clone()
    video = setup.model.views["policy"].video_token_id
    noisy[:, 3:] = torch.tensor([eos, video, 41])  # after the first EOS: more EOS, even <video>, other ids
    a, _ = ppo.evaluate_rollout(setup.model, setup.samples, clean, lengths, setup.config, setup.sizes, step=0, rank=0,
                                device="cpu", kl_coef=0.1)
    b, _ = ppo.evaluate_rollout(setup.model, setup.samples, noisy, torch.full((n,), 6), setup.config, setup.sizes,
                                step=0, rank=0, device="cpu", kl_coef=0.1)
    assert a.mask.sum(1).tolist() == [3] * n and bool(a.ended.all())
    for name in ("mask", "responses", "raw_scores", "logprobs", "ref_logprobs", "values", "rewards", "advantages",
                 "returns"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_missing_eos_is_penalised_and_eos_rate_reported(setup, tmp_path):  # P5
    eos = setup.model.views["policy"].eos_token_id
    n = len(setup.samples)
    responses = torch.tensor([[12, 13, 14, 15]] * n)
    responses[::2, 1] = eos  # even rows end after 2 tokens, odd rows use the whole budget without EOS
    config = dataclasses.replace(setup.config, penalize_no_eos=True, no_eos_penalty=-8.0)
    ro, _ = ppo.evaluate_rollout(setup.model, setup.samples, responses, torch.full((n,), 4), config, setup.sizes,
                                 step=0, rank=0, device="cpu", kl_coef=0.1)
    assert ro.ended.tolist() == [True, False] * (n // 2)
    assert torch.equal(ro.shaped_scores[1::2], torch.full((n // 2,), -8.0))
    torch.testing.assert_close(ro.shaped_scores[::2], ro.scores[::2])
    # the penalty is the reward at the last (budget) token, besides the KL terms
    torch.testing.assert_close(ro.rewards[1, 3], -8.0 - 0.1 * ro.kl[1, 3])
    times = {"generate": 1.0, "score": 1.0, "forward": 1.0, "train": 1.0}
    train_sums = {k: 0.0 for k in ("pg_loss", "vf_loss", "clipfrac", "vf_clipfrac", "approx_kl", "ratio")}
    from train.runs import Run

    run = Run(tmp_path, setup.config, setup.dist, ppo.STATE_FORMAT, ppo.PLAN_FIELDS)
    metrics = ppo.log_metrics(run, 1, 1, ro, {**train_sums, "micro_batches": 1.0}, times, 0.1, 1)
    assert metrics["eos_rate"] == 0.5
    assert metrics["response_len"] == 3.0


def test_rollout_whitens_over_ranks_under_nccl(setup, monkeypatch):
    """Regression (issue 14.2): the rollout's advantage whitening all-reduced CPU tensors, which
    NCCL rejects: multi-GPU PPO crashed at its first step. Under a fake two-rank NCCL group
    (tests/fake_group.py: CPU tensors rejected, the other rank this one's twin) the rollout
    runs, and its advantages are those of whitening both ranks' tokens together."""
    import fake_group

    eos = setup.model.views["policy"].eos_token_id
    n = len(setup.samples)
    responses = torch.tensor([[12, 13, eos, 15]] * n)
    args = (setup.model, setup.samples, responses, torch.full((n,), 4), setup.config, setup.sizes)
    alone, _ = ppo.evaluate_rollout(*args, step=0, rank=0, device="cpu", kl_coef=0.1)
    fake_group.install(monkeypatch)
    twins, _ = ppo.evaluate_rollout(*args, step=0, rank=0, device="cpu", kl_coef=0.1)
    monkeypatch.undo()
    raw, _ = rl.gae(alone.rewards, alone.values, alone.mask, setup.config.gamma, setup.config.lam)
    both = rl.masked_whiten(torch.cat([raw, raw]), torch.cat([alone.mask, alone.mask]))[:n]
    torch.testing.assert_close(twins.advantages, both)
    assert not torch.allclose(twins.advantages, alone.advantages)  # n-1 vs 2n-1: the sums did travel


def test_padding_changes_no_logprob_value_or_reward(setup):  # P9
    eos = setup.model.views["policy"].eos_token_id
    short = torch.tensor([[21, 22, eos]])
    alone, _ = inputs_of(setup, short, torch.tensor([3]), rows=[0])
    lp1, v1, ref1 = forward(setup, alone, short)
    # the same row batched with a longer prompt and a longer response, and with wider padding
    padded = torch.cat([torch.cat([short, torch.zeros(1, 5, dtype=torch.long)], 1),
                        torch.tensor([[30, 31, 32, 33, 34, 35, 36, 37]])])
    batch, _ = inputs_of(setup, padded, torch.tensor([3, 8]), rows=[0, 1])
    assert batch["input_ids"].shape[1] > alone["input_ids"].shape[1]
    lp2, v2, ref2 = forward(setup, batch, padded)
    for x, y in ((lp1, lp2), (v1, v2), (ref1, ref2)):
        torch.testing.assert_close(x[0], y[0, :3], atol=2e-5, rtol=0)
    feats, questions = [s["feat"] for s in setup.samples[:2]], [s["question"] for s in setup.samples[:2]]
    score_alone = setup.model.score(feats[:1], questions[:1], [[21, 22, eos]], None, 1)
    score_batch = setup.model.score(feats, questions, [[21, 22, eos], [30, 31, 32, 33, 34, 35, 36, 37]], None, 2)
    torch.testing.assert_close(score_alone[0], score_batch[0], atol=2e-5, rtol=0)


def test_saved_policy_is_a_video_lmm_computing_the_same_function(setup, tmp_path):
    from train.model import VideoLMM

    model = setup.model
    policy = {n: p for n, p in model.lm.named_parameters() if actor_critic._adapter_of(n) == "policy"}
    saved = {n: p.detach().clone() for n, p in policy.items()}
    g = torch.Generator().manual_seed(9)
    try:
        with torch.no_grad():  # a trained-looking PPO adapter (a fresh one adds nothing)
            for name, param in policy.items():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=g) * 0.05)
        responses = torch.tensor([[7, 8, 9, 2]] * 2)
        inputs, _ = inputs_of(setup, responses, torch.tensor([4, 4]), rows=[0, 1])
        lp, _, ref = forward(setup, inputs, responses)
        assert not torch.allclose(lp, ref, atol=1e-3)
        model.save(tmp_path / "policy")
        loaded = VideoLMM.load(tmp_path / "policy")
        assert loaded.settings.lora_r == 32 + setup.config.lora_r and loaded.settings.qlora
        with torch.no_grad():
            out = loaded(inputs["input_ids"], inputs["feat"], inputs["attention_mask"],
                         logits_to_keep=inputs["positions"])
        logits = out.logits.index_fill(-1, torch.tensor([loaded.video_token_id]), float("-inf"))
        torch.testing.assert_close(rl.logprobs_from_logits(logits, responses), lp, atol=1e-4, rtol=0)
    finally:
        with torch.no_grad():
            for name, param in policy.items():
                param.copy_(saved[name])


def test_concat_lora_sums_the_adapters():
    g = torch.Generator().manual_seed(0)
    a1, b1 = torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g)
    a2, b2 = torch.randn(4, 5, generator=g), torch.randn(3, 4, generator=g)
    only2 = torch.randn(4, 5, generator=g), torch.randn(6, 4, generator=g)
    first = {"m.q.lora_A.weight": a1, "m.q.lora_B.weight": b1}
    second = {"m.q.lora_A.weight": a2, "m.q.lora_B.weight": b2, "m.v.lora_A.weight": only2[0],
              "m.v.lora_B.weight": only2[1]}
    out, rank, targets = actor_critic.concat_lora([first, second], [{"m.q": 2.0}, {"m.q": 0.5, "m.v": 0.25}])
    assert rank == 6 and targets == {"q", "v"}
    torch.testing.assert_close(out["m.q.lora_B.weight"] @ out["m.q.lora_A.weight"], 2.0 * b1 @ a1 + 0.5 * b2 @ a2)
    torch.testing.assert_close(out["m.v.lora_B.weight"] @ out["m.v.lora_A.weight"], 0.25 * only2[1] @ only2[0])


def test_prompt_preparer_leaves_out_prompts_too_long_once_spliced(setup):
    from train import conversation

    tokens = len(conversation.prompt_ids("<video>\nWhat happens?", setup.model.tokenizer))
    # the placeholder becomes the feature rows: 10 rows fit exactly with 6 new tokens, 11 do not
    prepare = ppo.PromptPreparer(setup.model.tokenizer, max_length=tokens - 1 + 10 + 6, max_new_tokens=6)

    def sample(rows):
        return {"key": f"rows{rows}", "feat": torch.zeros(rows, FEAT_DIM),
                "json": {"conversations": [{"from": "human", "value": "<video>\nWhat happens?"}]}}

    assert prepare(sample(11)) is None and prepare.counts == {"fit": 0, "too_long": 1, "non_finite": 0}
    kept = prepare(sample(10))
    assert len(kept["prompt_ids"]) == tokens and kept["question"] == "<video>\nWhat happens?"
    assert prepare.counts == {"fit": 1, "too_long": 1, "non_finite": 0}
    with pytest.raises(ValueError, match="bad"):
        prepare({"key": "bad", "feat": torch.zeros(2, FEAT_DIM), "json": {"conversations": []}})


def test_batch_sizes_are_checked_against_ranks(folders):
    config = small_config(folders)
    assert ppo.Sizes.of(config, 1) == ppo.Sizes(rollout=8, minibatch=4, micro=2, grad_accum=2)
    assert ppo.Sizes.of(config, 2) == ppo.Sizes(rollout=4, minibatch=2, micro=2, grad_accum=1)
    with pytest.raises(ValueError, match="multiples"):
        ppo.Sizes.of(config, 3)
    with pytest.raises(ValueError, match="multiple of --step-batch"):
        small_config(folders, rollout_batch=6)


def test_shipped_config_parses():
    from dataengine import config as cfg

    config = cfg.parse_config(ppo.PPOConfig, ["--config", str(REPO / "train/configs/ppo_tiny.yaml")])
    assert config.qlora and config.lora_r == 64 and config.lora_alpha == 16
    assert config.rollout_batch % config.step_batch == 0


# ---------------------------------------------------------------------------- end to end on the synthetic world

@pytest.fixture(scope="module")
def world_models(synth_world, tmp_path_factory):
    return build_world_models(synth_world, tmp_path_factory.mktemp("ppo_world"))


def build_world_models(world: Path, root: Path, seed: int = 0, favourite_share: float = 0.5) -> SimpleNamespace:
    """Prompt shards from the synthetic world; a policy after a few SFT steps on the easy stage;
    a reward model with a strong, simple preference: responses that contain one token.

    The token (``favourite``) is one the SFT policy already samples in about ``favourite_share``
    of its answers (so PPO finds it often, and a rollout's rewards vary most) and no prompt
    holds (so the RM learns the preference within tens of steps). An RM trained on true-vs-wrong answers gave a signal
    too weak for a learning test: its reward went from -1.2055 to -1.2060 on one CPU and rose
    on another (issue 14.3)."""
    from dataengine import build
    from dataengine.reader import ShardReader
    from train.model import LORA_TARGETS, ModelSettings, VideoLMM, collate, pad_sequences
    from train.reward import RewardModel, RewardStats, bradley_terry_loss, encode_response

    shards = root / "shards"
    build.build(build.BuildConfig(annotations=[str(world / "annotations.json")],
                                  videos=str(world / "videos"), out=str(shards), frames=4, clips=0,
                                  maxcount=16, workers=1, cache=str(root / "cache")))
    samples = list(ShardReader(shards, stages=["easy", "hard"], shuffle="none", fields=("json", "feat")))
    easy = [s for s in samples if s["json"]["stage"] == "easy"]
    rng = random.Random(seed)
    torch.manual_seed(seed)

    # The LM head is among the LoRA targets: the tiny LM's head is random with small weights,
    # and without an adapter on it no policy can give any token more than a few percent.
    sft = VideoLMM.build(ModelSettings(feat_dim=int(samples[0]["feat"].shape[-1]),
                                       lora_targets=list(LORA_TARGETS) + ["lm_head"]), seed=seed)
    optimizer = torch.optim.AdamW([p for p in sft.parameters() if p.requires_grad], lr=5e-3)
    for _ in range(30):
        batch = collate(rng.sample(easy, 8), sft.tokenizer)
        loss = sft(batch["input_ids"], batch["feat"], batch["attention_mask"], batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sft.save(root / "sft")

    # What the policy says now: the favourite is a token in about a fifth of its answers.
    prompts = [s["json"]["conversations"][0]["value"] for s in samples]
    said = sft.generate(torch.stack([s["feat"] for s in samples]), prompts, max_new_tokens=12, temperature=1.0,
                        do_sample=True, seed=seed).token_ids
    # Candidates are tokens no prompt holds (the chat template's system line included): the RM
    # learns "the favourite is in the answer" quickly only when the answer is the only place it
    # is. Seed 1 once picked " the", which every prompt holds: 400 RM steps left it at chance.
    special = set(sft.tokenizer.all_special_ids)
    in_prompts = {t for p in prompts for t in sft.chat.prompt_ids(p)}
    share = collections.Counter(t for answer in said for t in set(answer) if t not in special | in_prompts)
    candidates = [t for t in sorted(share, key=lambda t: (abs(share[t] / len(said) - favourite_share), t))
                  if 0.2 <= share[t] / len(said) <= 0.8][:4] or [min(share, key=lambda t: -share[t])]

    def train_rm(favourite: int, rm_seed: int, steps: int):
        rm = RewardModel.from_sft(root / "sft", seed=rm_seed)
        optimizer = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=5e-3)

        def pair(sample):
            # The same answer with and without the favourite token (in a random place before the
            # end: tokens after an EOS are not scored).
            base = [t for t in rng.choice(said) if t != favourite and t not in special] or [favourite + 1]
            plus = list(base)
            plus.insert(rng.randrange(len(plus) + 1), favourite)
            prompt = sample["json"]["conversations"][0]["value"]
            return encode_response(prompt, plus, rm.tokenizer), encode_response(prompt, base, rm.tokenizer)

        def scores(chunk, pairs):
            ids, mask = pad_sequences([c for c, _ in pairs] + [r for _, r in pairs], rm.lmm.pad_token_id)
            return rm(ids, torch.stack([s["feat"] for s in chunk] * 2), mask)

        def held_accuracy():
            with torch.no_grad():
                r = torch.stack([scores(samples[i:i + 8], [pair(s) for s in samples[i:i + 8]])
                                 for i in range(0, 48, 8)])
            return float((r[:, :8] > r[:, 8:]).float().mean()), r

        for step in range(1, steps + 1):
            chunk = rng.sample(samples, 8)
            r = scores(chunk, [pair(s) for s in chunk])
            loss = bradley_terry_loss(r[:8], r[8:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 40 == 0 and held_accuracy()[0] >= 0.95:
                break
        return rm, *held_accuracy(), step

    # The preference is learnt suddenly, after a plateau whose length depends on the token, the
    # RM's initialisation and the CPU's kernels (measured: under 40 steps for seeds 0-2 natively,
    # but seed 1 under ATEN_CPU_CAPABILITY=avx2 stayed at 0.65 for 400 steps): train until it is
    # (checked every 40 steps); if it is not within 120, start over with the next candidate token
    # and another RM seed (seed 0 under ATEN_CPU_CAPABILITY=default: the second candidate learnt
    # in 40 steps where the first had not in 400).
    rm_steps = 0
    for attempt, favourite in enumerate(candidates):
        rm, accuracy, r, step = train_rm(favourite, seed + attempt, 120)
        rm_steps += step
        if accuracy >= 0.95:
            break
    r = r.flatten()
    rm.stats = RewardStats.from_sums(len(r), float(r.sum()), float((r ** 2).sum()), source="test fixture")
    rm.save(root / "rm")
    return SimpleNamespace(root=root, shards=shards, sft=root / "sft", rm=root / "rm", favourite=favourite,
                           share=share[favourite] / len(said), rm_accuracy=accuracy, rm_steps=rm_steps)


def ppo_argv(world, output, *extra):
    return ["--config", str(REPO / "train/configs/ppo_tiny.yaml"), "--shards", str(world.shards),
            "--sft", str(world.sft), "--reward-model", str(world.rm), "--output", str(output), *extra]


def read_metrics(output):
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]


LEARNING_METRICS = ("reward_raw", "reward", "kl", "kl_coef", "entropy", "pg_loss", "vf_loss", "clipfrac", "approx_kl",
                    "response_len", "eos_rate")


def sampled_answers(world, folder: Path, draws: int = 4) -> SimpleNamespace:
    """The policy in ``folder`` answering every prompt of the world ``draws`` times (fixed sampling
    seeds, so two policies are compared on the same draws): per answer, whether it holds the
    favourite, and the fixture's RM score normalised as PPO's reward (the no-EOS penalty aside)."""
    from dataengine.reader import ShardReader
    from train.model import VideoLMM
    from train.reward import RewardModel

    samples = list(ShardReader(world.shards, stages=["easy", "hard"], shuffle="none", fields=("json", "feat")))
    feat = [s["feat"] for s in samples]
    prompts = [s["json"]["conversations"][0]["value"] for s in samples]
    policy, rm = VideoLMM.load(folder), RewardModel.load(world.rm)
    holds, reward = [], []
    with torch.no_grad():
        for draw in range(draws):
            said = policy.generate(feat, prompts, max_new_tokens=12, temperature=1.0, do_sample=True,
                                   seed=1000 + draw).token_ids
            holds += [world.favourite in answer for answer in said]
            reward.append(rm.normalise(rm.score(feat, prompts, said)))
    return SimpleNamespace(share=sum(holds) / len(holds), reward=torch.cat(reward))


@pytest.mark.slow
def test_end_to_end_reward_rises_with_bounded_kl(world_models, tmp_path):
    """The recipe learns what its reward model wants, on any CPU: the fixture's RM prefers
    answers holding one token that about half of the SFT policy's answers hold. Eight steps of
    32 prompts; then the final policy and the SFT policy answer the same 192 sampled prompts
    (same seeds) and the RM scores both. Measured with 1 thread: the favourite's share went from
    0.2-0.45 to 0.8-1.0 for seeds 0-2 natively and for seed 2 under ATEN_CPU_CAPABILITY=default,
    but only 0.29 -> 0.41 for seed 0 under default kernels; so what is asserted is that the
    paired gain is there (four standard errors), not its size."""
    from train.model import VideoLMM

    # Why a failure here would not be PPO's: the SFT policy says the favourite sometimes, and the
    # RM has learnt to prefer it.
    assert 0.2 <= world_models.share <= 0.8, f"SFT policy's share of answers with the favourite: {world_models.share}"
    assert world_models.rm_accuracy > 0.9, (f"fixture RM's held-out pair accuracy: {world_models.rm_accuracy} "
                                            f"after {world_models.rm_steps} steps")
    out = tmp_path / "run"
    # The demo config's LR is tuned for the demo's near-noise reward model; this RM has a signal.
    # 32 prompts a step (4x the demo's) make each step's advantage estimate far less noisy; β 0.3
    # (not 0.1) held KL under 2 where 0.1 let one seed reach 10 by step 6.
    assert ppo.main(ppo_argv(world_models, out, "--lr", "2e-3", "--kl-coef", "0.3", "--rollout-batch", "32",
                             "--step-batch", "16", "--micro-batch", "4", "--generation-batch", "32",
                             "--max-steps", "8", "--epochs", "8")) == 0
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert all(abs(m["kl"]) < 10 for m in metrics), [m["kl"] for m in metrics]
    for m in metrics:
        assert all(k in m for k in LEARNING_METRICS + ("time_generate", "time_score", "time_train"))
    assert VideoLMM.load(out / "model").settings.lora_r == 32 + 64

    before, after = sampled_answers(world_models, world_models.sft), sampled_answers(world_models, out / "model")
    gain = after.reward - before.reward  # paired: the same prompt and sampling seed
    # The size of the gain depends on the CPU's kernels (the favourite's share rose 0.29 -> 0.41
    # under ATEN_CPU_CAPABILITY=default, 0.36 -> 0.98 natively, seed 0); that there is one does
    # not: the paired mean gain must stand four standard errors above zero, and the favourite
    # must be said more often.
    standard_error = float(gain.std()) / len(gain) ** 0.5
    assert float(gain.mean()) > 4 * standard_error, (float(gain.mean()), standard_error)
    assert after.share > before.share + 0.05, (before.share, after.share)


@pytest.mark.slow
def test_resume_continues_exactly(world_models, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    # an adaptive β and a moving LR: the KL controller and the scheduler must come back too
    common = ("--max-steps", "4", "--save-every", "2", "--kl-target", "1.0", "--kl-horizon", "20", "--warmup-steps", "3",
              "--min-lr-ratio", "0.1")
    assert ppo.main(ppo_argv(world_models, full, *common)) == 0
    assert ppo.main(ppo_argv(world_models, cut, *common, "--stop-after-steps", "3")) == 0  # stops after step 3
    assert (cut / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    assert not (cut / "model").exists()
    assert ppo.main(ppo_argv(world_models, cut, *common, "--resume")) == 0
    want = {m["step"]: m for m in read_metrics(full)}
    got = [m for m in read_metrics(cut)]
    assert [m["step"] for m in got] == [1, 2, 3, 3, 4]
    for m in got[3:]:
        assert {k: m[k] for k in LEARNING_METRICS} == {k: want[m["step"]][k] for k in LEARNING_METRICS}
    assert len({m["kl_coef"] for m in got}) > 1  # β did move


@pytest.mark.slow
def test_two_ranks_under_torchrun(world_models, tmp_path):
    out = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train/ppo.py"), *ppo_argv(world_models, out, "--max-steps", "2")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(torch.isfinite(torch.tensor([m[k] for k in LEARNING_METRICS])).all() for m in metrics)
    ranks = sorted(p.name for p in (out / "checkpoints" / "step-00000002" / "ranks").iterdir())
    assert ranks == ["rank-00000.json", "rank-00001.json"]
    assert (out / "model" / "adapter_model.safetensors").exists()
