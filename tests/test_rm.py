"""The reward model: Bradley–Terry loss, scoring invariances, and the `vlmr train rm` recipe end to end.

Fast tests check the loss against hand-computed values, the scored token (EOS) and padding
invariance of :meth:`RewardModel.score`, the pair preparation and the held-out split. The
slow ones run the recipe as users do (``python train/rm.py``, ``torchrun``) on preference
shards written from the synthetic world's ground truth (``tests/rm_fixtures.py``): held-out
accuracy well above chance, exact resume, two ranks (ZeRO-3), and ``vlmr eval rm``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rm_fixtures
from dataengine.config import ConfigError, parse_config
from train import rm
from train.eval import rm as eval_rm
from train.reward import RewardModel, RewardStats, as_prompt, bradley_terry_loss, encode_response, with_narrative
from train.rl import last_valid_index

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What colour is the circle?"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_keys(path: Path) -> list[tuple[int, list[str]]]:
    return [(int(line.split("\t")[0]), line.split("\t")[2].split()) for line in path.read_text().splitlines()]


def run_recipe(args: list[str], *, ranks: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    # One thread per rank: on a shared 2-core machine more threads only contend.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if ranks == 1:
        cmd = [sys.executable, str(ROOT / "train" / "rm.py"), *args]
    else:
        from train.launch import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "train" / "rm.py"), *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def read_pairs(source: str | Path) -> list[dict]:
    from dataengine.reader import ShardReader

    return list(ShardReader(source, stages=["pairs"], shuffle="none", fields=("json", "feat"), prefetch_bytes=0))


def accuracy(model: RewardModel, samples: list[dict], feats=None) -> tuple[float, torch.Tensor, torch.Tensor]:
    feats = [s["feat"] for s in samples] if feats is None else feats
    prompts = [s["json"]["conversations"] for s in samples]
    rc = model.score(feats, prompts, [s["json"]["chosen"] for s in samples])
    rr = model.score(feats, prompts, [s["json"]["rejected"] for s in samples])
    return float(((rc > rr).float() + 0.5 * (rc == rr).float()).mean()), rc, rr


# ---------------------------------------------------------------------------- the loss

def test_bradley_terry_loss_by_hand():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    # d = [2, -1]: -log σ(2) = log(1 + e^-2) = 0.126928, -log σ(-1) = log(1 + e) = 1.313262.
    # Centring: 1e-3 * |mean([2 + 0, 0 + 1])| = 1e-3 * 1.5.
    assert bradley_terry_loss(rc, rr).item() == pytest.approx((0.126928 + 1.313262) / 2 + 0.0015, abs=1e-6)
    assert bradley_terry_loss(rc, rr, centre_coef=0.0).item() == pytest.approx(0.720095, abs=1e-6)
    # Margin 1 on both: d = [1, -2]: 0.313262 and 2.126928.
    assert bradley_terry_loss(rc, rr, margin=torch.tensor([1.0, 1.0])).item() == \
        pytest.approx((0.313262 + 2.126928) / 2 + 0.0015, abs=1e-6)
    # Weights [1, 0.5]: (0.126928 + 0.5 * 1.313262) / 2.
    assert bradley_terry_loss(rc, rr, weight=torch.tensor([1.0, 0.5]), centre_coef=0.0).item() == \
        pytest.approx((0.126928 + 0.656631) / 2, abs=1e-6)
    # Soft label 0.75 on d = 2: 0.75 * 0.126928 + 0.25 * -log σ(-2) (= 2.126928); label 1 on the other.
    assert bradley_terry_loss(rc, rr, label=torch.tensor([0.75, 1.0]), centre_coef=0.0).item() == \
        pytest.approx((0.75 * 0.126928 + 0.25 * 2.126928 + 1.313262) / 2, abs=1e-6)
    # The centring term alone: equal scores of 3 give log 2 + 1e-3 * 6.
    assert bradley_terry_loss(torch.tensor([3.0]), torch.tensor([3.0])).item() == \
        pytest.approx(math.log(2) + 0.006, abs=1e-6)


def test_bradley_terry_gradient_pushes_the_pair_apart():
    rc = torch.tensor([0.0, 0.0], requires_grad=True)
    rr = torch.tensor([0.0, 0.0], requires_grad=True)
    bradley_terry_loss(rc, rr, centre_coef=0.0).backward()
    # d/d r_chosen of -log σ(d) at d = 0 is -σ(0) = -0.5, over a batch of 2.
    assert rc.grad.tolist() == pytest.approx([-0.25, -0.25])
    assert rr.grad.tolist() == pytest.approx([0.25, 0.25])
    with pytest.raises(ValueError, match="must be"):
        bradley_terry_loss(torch.zeros(2, 1), torch.zeros(2, 1))


# ---------------------------------------------------------------------------- inputs and targets

def test_last_valid_index_either_padding_side():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0]])
    assert last_valid_index(mask).tolist() == [1, 2, 0]


@pytest.fixture(scope="module")
def tokenizer():
    from dataengine.models import load_tokenizer

    return load_tokenizer("tiny")


def test_encode_response_ends_with_eos_and_ignores_what_follows(tokenizer):
    eos = tokenizer.eos_token_id
    text = encode_response(QUESTION, "The circle is red.", tokenizer)
    assert text[-1] == eos and text.count(eos) == 1
    # Generated ids: the same sequence as the text, tokens after EOS do not matter, EOS added if absent.
    answer = tokenizer(" The circle is red.", add_special_tokens=False)["input_ids"]
    assert encode_response(QUESTION, answer + [eos], tokenizer) == text
    assert encode_response(QUESTION, answer + [eos, 17, 42, eos], tokenizer) == text
    assert encode_response(QUESTION, answer, tokenizer) == text
    # A prompt as a question or as turns: the same ids.
    assert encode_response([{"from": "human", "value": "<video>\n" + QUESTION}], "The circle is red.",
                           tokenizer) == text
    with pytest.raises(ValueError, match="human turn"):
        as_prompt([{"from": "human", "value": "<video>\nQ"}, {"from": "gpt", "value": "A"}])


def test_narrative_goes_after_the_video(tokenizer):
    turns = with_narrative(as_prompt(QUESTION), "A red circle moves left.")
    assert turns[0]["value"] == f"<video>\nContext: A red circle moves left.\n{QUESTION}"
    ids = encode_response(QUESTION, "Red.", tokenizer, narrative="A red circle moves left.")
    assert ids.count(tokenizer.convert_tokens_to_ids("<video>")) == 1


def test_pair_targets_from_the_judge():
    judge = {"margin": 0.6, "soft_label": 0.8}
    plain = rm.RMConfig()
    assert rm.pair_targets(judge, plain, "k") == (1.0, 0.0, 0.8)
    assert rm.pair_targets(judge, rm.RMConfig(confidence="weight"), "k") == (0.6, 0.0, 0.8)
    assert rm.pair_targets(judge, rm.RMConfig(confidence="margin", margin_scale=2.0, soft_labels=False), "k") == \
        (1.0, 1.2, 1.0)
    with pytest.raises(ValueError, match="k: --confidence weight needs judge.margin"):
        rm.pair_targets({}, rm.RMConfig(confidence="weight"), "k")
    with pytest.raises(ValueError, match="not a probability"):
        rm.pair_targets({"soft_label": 1.5}, plain, "k")


def _pair_sample(**json_fields) -> dict:
    data = {"id": "p1", "video_id": "v1", "conversations": [{"from": "human", "value": "<video>\n" + QUESTION}],
            "chosen": "The circle is red.", "rejected": "circle circle circle", "narrative": "A red circle.",
            "judge": {"margin": 1.0}}
    data.update(json_fields)
    return {"key": "p1", "shard": "pairs-000000.tar", "json": {k: v for k, v in data.items() if v is not None},
            "feat": torch.zeros(22, 64, dtype=torch.float16)}


def test_pair_preparer_tokenizes_guards_and_names_bad_pairs(tokenizer):
    prepare = rm.PairPreparer(tokenizer, rm.RMConfig(max_length=128))
    out = prepare(_pair_sample())
    assert out["chosen_ids"] == encode_response(QUESTION, "The circle is red.", tokenizer)
    assert out["rejected_ids"][-1] == tokenizer.eos_token_id and (out["weight"], out["label"]) == (1.0, 1.0)
    # Too long once the 22 video rows are spliced in: left out and counted.
    assert prepare(_pair_sample(rejected="red " * 200)) is None
    # Or the long response is cut to fit, EOS kept.
    cut = rm.PairPreparer(tokenizer, rm.RMConfig(max_length=128, length_policy="truncate"))(
        _pair_sample(rejected="red " * 200))
    assert cut["rejected_ids"][-1] == tokenizer.eos_token_id and len(cut["rejected_ids"]) - 1 + 22 <= 128
    with pytest.raises(ValueError, match="pairs-000000.tar, key 'p1'.*chosen"):
        prepare(_pair_sample(chosen=None))
    skipping = rm.PairPreparer(tokenizer, rm.RMConfig(on_error="skip"))
    assert skipping(_pair_sample(chosen=None)) is None and skipping.counts["malformed"] == 1
    narrated = rm.PairPreparer(tokenizer, rm.RMConfig(context="narrative"))(_pair_sample())
    assert narrated["chosen_ids"] == encode_response(QUESTION, "The circle is red.", tokenizer,
                                                     narrative="A red circle.")
    with pytest.raises(ValueError, match="no narrative"):
        rm.PairPreparer(tokenizer, rm.RMConfig(context="narrative"))(_pair_sample(narrative=""))
    assert prepare.counts["fit"] == 1 and prepare.counts["too_long"] == 1


def test_stand_ins_add_nothing_to_the_loss(tokenizer):
    prepare = rm.PairPreparer(tokenizer, rm.RMConfig())
    good = prepare(_pair_sample())
    batch = rm.collate_pairs([good, dict(good, substitute_for="x#3")], tokenizer.pad_token_id,
                             tokenizer.convert_tokens_to_ids("<video>"))
    assert batch["input_ids"].shape[0] == 4 and batch["valid"].tolist() == [True, False]
    scores = torch.tensor([1.0, 5.0, 0.0, -5.0], requires_grad=True)
    loss, stats = rm.pair_loss(scores, batch, rm.RMConfig(centre_coef=0.0))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0))) and stats["pairs"] == 1
    loss.backward()
    assert scores.grad[1] == 0 and scores.grad[3] == 0
    only = rm.collate_pairs([dict(good, substitute_for="x#3")], tokenizer.pad_token_id, 4)
    zero, stats = rm.pair_loss(torch.tensor([1.0, 2.0], requires_grad=True), only, rm.RMConfig())
    assert zero.item() == 0.0 and zero.requires_grad and stats["pairs"] == 0


# ---------------------------------------------------------------------------- config and split

def test_shipped_config_parses():
    config = parse_config(rm.RMConfig, ["--config", str(ROOT / "train" / "configs" / "rm_tiny.yaml")])
    assert config.stages == ["pairs"] and 0 < config.eval_fraction < 1


def test_invalid_settings_are_reported_together():
    with pytest.raises(ConfigError) as info:
        rm.RMConfig(epochs=0, eval_shards="x", eval_fraction=0.2, lr=0)
    text = str(info.value)
    assert "--epochs" in text and "not both" in text and "--lr" in text


def test_split_by_video_keeps_each_video_on_one_side(tmp_path):
    """Regression for --eval-last-shards: the held-out shards were the longest answers and
    shared videos with training. Now a seeded share of the videos is held out, whole."""
    rng = np.random.default_rng(0)
    videos = [f"v{i}" for i in range(8)]
    pairs = [{"video_id": videos[i % 8], "kind": "text", "question": QUESTION, "chosen": f"c{i}",
              "rejected": f"r{i}"} for i in range(40)]
    captions = {v: {"segments": [{"caption": "a red circle moves left"}]} for v in videos}
    feats = {v: rng.standard_normal((4, 8)).astype(np.float16) for v in videos}
    folder = rm_fixtures.write_preference_shards(tmp_path / "pairs", pairs, feats, captions, maxcount=3)
    train_src, held_src = rm.split_by_video(str(folder), ["pairs"], 0.25, 0, tmp_path / "split")
    train, held = read_pairs(train_src), read_pairs(held_src)
    train_videos, held_videos = ({s["json"]["video_id"] for s in part} for part in (train, held))
    assert len(held_videos) == 2 and not train_videos & held_videos  # 25 % of 8 videos, whole
    assert len(held) == 10 and len(train) == 30
    assert sorted(s["key"] for s in train + held) == sorted(s["key"] for s in read_pairs(folder))
    for sample in held:  # the features travel with their pair
        assert np.array_equal(sample["feat"].numpy(), feats[sample["json"]["video_id"]])
    # Seeded: the same seed holds out the same videos, another seed others.
    assert rm.heldout_videos([s["json"]["video_id"] for s in train + held], 0.25, 0) == held_videos
    assert any(rm.heldout_videos(videos, 0.25, seed) != held_videos for seed in range(1, 5))
    with pytest.raises(ValueError, match="at least 2 videos"):
        rm.heldout_videos(["v0", "v0"], 0.5, 0)


def test_accuracy_on_soft_labelled_pairs_is_reported_apart():
    sums = {"pairs": 4.0, "skipped": 0.0, "correct": 3.0, "margin_sum": 2.0, "chosen_sum": 1.0,
            "rejected_sum": -1.0, "nll_sum": 2.0, "soft_pairs": 2.0, "soft_correct": 1.0}
    metrics = rm.eval_metrics(sums)
    assert metrics["accuracy"] == 0.75 and metrics["accuracy_soft"] == 0.5 and metrics["accuracy_hard"] == 1.0
    assert "soft-labelled 2: acc 0.500, others 1.000" in rm.format_eval(metrics)
    none = rm.eval_metrics(dict(sums, soft_pairs=0.0, soft_correct=0.0))
    assert none["accuracy_soft"] is None and "soft" not in rm.format_eval(none)


# ---------------------------------------------------------------------------- the model

@pytest.fixture(scope="module")
def tiny_rm() -> RewardModel:
    from train.model import ModelSettings

    return RewardModel.from_base(ModelSettings(feat_dim=64, lora_r=8, lora_alpha=16), seed=0)


def test_same_pair_same_score_whatever_the_padding(tiny_rm):
    from train.model import pad_sequences

    g = torch.Generator().manual_seed(0)
    feat = torch.randn(3, 22, 64, generator=g)
    short, long = "The circle is red.", "The circle is red and it moves left, then up, then it shrinks away."
    alone = tiny_rm.score(feat[:1], [QUESTION], [short])
    batched = tiny_rm.score(feat, [QUESTION] * 3, [short, long, "Red."])
    assert batched[0].item() == pytest.approx(alone[0].item(), abs=1e-5)
    assert batched[1].item() != pytest.approx(batched[0].item(), abs=1e-3)  # the response matters
    # Left padding, through forward directly.
    rows = [tiny_rm.encode(QUESTION, short), tiny_rm.encode(QUESTION, long)]
    ids, mask = pad_sequences(rows, tiny_rm.lmm.pad_token_id, side="left")
    with torch.no_grad():
        left = tiny_rm(ids, feat[:2], mask, padding_side="left")
    assert left.tolist() == pytest.approx(batched[:2].tolist(), abs=1e-5)
    # Generated ids (with junk after EOS) score like the text; the video matters too.
    eos = tiny_rm.tokenizer.eos_token_id
    answer = tiny_rm.tokenizer(" " + short, add_special_tokens=False)["input_ids"]
    junk = tiny_rm.score(feat[:1], [QUESTION], [answer + [eos, 11, 12, 13]])
    assert junk.item() == pytest.approx(alone.item(), abs=1e-5)
    assert tiny_rm.score(feat[1:2], [QUESTION], [short]).item() != pytest.approx(alone.item(), abs=1e-4)
    # The scored position is the EOS: the per-position head equals the score there.
    per_token, spliced = tiny_rm.token_scores(ids[:1, -len(rows[0]):], feat[:1])
    assert per_token[0, last_valid_index(spliced)[0]].item() == pytest.approx(alone.item(), abs=1e-5)


def test_save_load_scores_and_statistics(tiny_rm, tmp_path):
    feat = torch.randn(2, 22, 64, generator=torch.Generator().manual_seed(1))
    before = tiny_rm.score(feat, [QUESTION, "How many shapes appear in the video?"], ["Red.", "Two."])
    tiny_rm.stats = RewardStats.from_sums(4, 2.0, 5.0, source="test")  # mean 0.5, var 1.25 - 0.25
    assert (tiny_rm.stats.mean, tiny_rm.stats.std) == (0.5, 1.0)
    tiny_rm.save(tmp_path / "rm", extra={"heldout": {"accuracy": 1.0}})
    loaded = RewardModel.load(tmp_path / "rm")
    after = loaded.score(feat, [QUESTION, "How many shapes appear in the video?"], ["Red.", "Two."])
    assert after.tolist() == pytest.approx(before.tolist(), abs=1e-6)
    assert loaded.normalise(torch.tensor([0.5, 2.5])).tolist() == [0.0, 2.0]
    assert not any(p.requires_grad for p in loaded.parameters())
    data = json.loads((tmp_path / "rm" / "reward_model.json").read_text())
    assert data["heldout"] == {"accuracy": 1.0} and data["stats"]["count"] == 4
    # The backbone folder is a plain VideoLMM; the value model starts from it with a zero head.
    from train.model import VideoLMM

    assert VideoLMM.load(tmp_path / "rm").settings.lora_r == 8
    value = RewardModel.load(tmp_path / "rm", trainable=True)
    value.zero_head()
    assert value.score(feat, [QUESTION] * 2, ["Red.", "Two."]).tolist() == [0.0, 0.0]
    assert value.head.weight.requires_grad
    with pytest.raises(ValueError, match="no statistics"):
        RewardModel(loaded.lmm, loaded.head).normalise(torch.zeros(1))


# ---------------------------------------------------------------------------- slow, end to end

BASE = ["--model", "tiny", "--micro-batch", "8", "--lr", "2e-3", "--warmup-ratio", "0", "--lora-r", "8",
        "--lora-alpha", "16", "--max-length", "256", "--stats-max-pairs", "16", "--eval-batch", "16"]


@pytest.fixture(scope="module")
def pref(synth_world, tmp_path_factory) -> dict[str, Path]:
    """Training pairs (count pairs that need the video + 2/3 of the text pairs, shards of 7)
    and held-out text pairs, with real features of the synthetic world."""
    from dataengine.synth import load_captions

    tmp = tmp_path_factory.mktemp("rm")
    shards = rm_fixtures.build_features(synth_world, tmp / "shards")
    captions = load_captions(synth_world)
    feats = rm_fixtures.video_features(shards)
    text = rm_fixtures.text_pairs(captions)
    train = rm_fixtures.video_pairs(captions, questions=("count",)) + [p for i, p in enumerate(text) if i % 3]
    held = [p for i, p in enumerate(text) if i % 3 == 0]
    return {"pairs": rm_fixtures.write_preference_shards(tmp / "pairs", train, feats, captions, maxcount=7),
            "heldout": rm_fixtures.write_preference_shards(tmp / "heldout", held, feats, captions, seed=1),
            "root": tmp}


@pytest.fixture(scope="module")
def reference(pref) -> Path:
    """One uninterrupted single-process run: 2 epochs of 4 steps, checkpoints every 3, eval every 6."""
    out = pref["root"] / "reference"
    run_recipe(["--shards", str(pref["pairs"]), "--eval-shards", str(pref["heldout"]), "--output", str(out),
                "--epochs", "2", "--save-every", "3", "--eval-every", "6", "--log-keys", *BASE])
    return out


@pytest.mark.slow
def test_heldout_accuracy_well_above_chance(reference, pref, capsys):
    metrics = read_jsonl(reference / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert all(math.isfinite(m["loss"]) for m in metrics)
    held = read_pairs(pref["heldout"])
    evals = read_jsonl(reference / "eval.jsonl")
    assert [e["step"] for e in evals] == [6, 8] and all(e["pairs"] == len(held) for e in evals)
    final = json.loads((reference / "eval.json").read_text())
    # Held-out text pairs (correct answer vs degenerate one): well above chance.
    assert final["accuracy"] >= 0.8, final
    assert final["margin"] > 0 and final["chosen"] > final["rejected"]
    # The saved model scores through the public API exactly what the recipe measured.
    model = RewardModel.load(reference / "model")
    acc, rc, rr = accuracy(model, held)
    assert acc == pytest.approx(final["accuracy"])
    assert float(rc.mean()) == pytest.approx(final["chosen"], abs=1e-4)
    assert float(rr.mean()) == pytest.approx(final["rejected"], abs=1e-4)
    saved = json.loads((reference / "model" / "reward_model.json").read_text())
    assert saved["heldout"] == final
    assert saved["stats"]["count"] == 32 and saved["stats"]["std"] > 0  # 16 training pairs x 2 responses
    train = read_pairs(pref["pairs"])[:16]
    scores = torch.cat(accuracy(model, train)[1:])
    assert saved["stats"]["mean"] == pytest.approx(float(scores.mean()), abs=1e-4)
    assert saved["stats"]["std"] == pytest.approx(float(scores.std(unbiased=False)), abs=1e-4)
    # `vlmr eval rm` prints the same numbers.
    assert eval_rm.eval_main(["--model", str(reference / "model"), "--shards", str(pref["heldout"])]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["pairs"] == len(held) and printed["accuracy"] == pytest.approx(final["accuracy"])
    # Which signal: the count pairs are balanced (each answer text is chosen on one video and
    # rejected on another), so only the video can put them above 0.5. Reported, not asserted.
    counts = [s for s in read_pairs(pref["pairs"]) if s["json"]["kind"] == "video"]
    print(f"\nheld-out text pairs: {final['accuracy']:.3f}; "
          f"training count pairs (text-balanced): {accuracy(model, counts)[0]:.3f}")
    latest = (reference / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-00000008"


@pytest.mark.slow
def test_resume_continues_exactly(reference, pref):
    out = pref["root"] / "interrupted"
    args = ["--shards", str(pref["pairs"]), "--eval-shards", str(pref["heldout"]), "--output", str(out),
            "--epochs", "2", "--save-every", "3", "--eval-every", "6", "--log-keys", *BASE]
    # Killed after step 5: the last checkpoint is step 3 (mid epoch 0), steps 4-5 are lost and
    # redone, and the resumed run crosses into epoch 1.
    run_recipe([*args, "--stop-after-steps", "5"])
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    assert not (out / "model").exists()
    state = json.loads((out / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["phase_step"]) == (3, 0, 3)
    run_recipe([*args, "--resume"])
    ref = {m["step"]: m for m in read_jsonl(reference / "metrics.jsonl")}
    resumed = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in resumed] == list(range(1, 6)) + list(range(4, 9))
    for m in resumed[5:]:
        assert m["loss"] == pytest.approx(ref[m["step"]]["loss"], abs=1e-6), m["step"]
        assert m["accuracy"] == ref[m["step"]]["accuracy"]
    ref_keys = dict(read_keys(reference / "keys" / "rank-00000.tsv"))
    for step, batch in read_keys(out / "keys" / "rank-00000.tsv")[5:]:
        assert batch == ref_keys[step]
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "model" / "score_head.safetensors")) for d in (reference, out))
    assert torch.allclose(a["weight"], b["weight"], atol=1e-6)
    assert json.loads((out / "eval.json").read_text())["accuracy"] == \
        json.loads((reference / "eval.json").read_text())["accuracy"]


@pytest.mark.slow
def test_two_ranks_zero3_disjoint_pairs_and_heldout_counted_once(pref, capsys):
    out = pref["root"] / "two_ranks"
    # 38 pairs of 6 videos: a seeded third of the videos (2) is held out with all their pairs.
    run_recipe(["--shards", str(pref["pairs"]), "--eval-fraction", "0.34", "--output", str(out),
                "--zero-stage", "3", "--log-keys", *BASE, "--micro-batch", "4"], ranks=2)
    held = read_pairs(out / "split" / "heldout" / "manifest.json")
    train = read_pairs(out / "split" / "train" / "manifest.json")
    assert not {s["json"]["video_id"] for s in held} & {s["json"]["video_id"] for s in train}
    steps = len(train) // 2 // 4
    rank0, rank1 = (read_keys(out / "keys" / f"rank-0000{r}.tsv") for r in (0, 1))
    assert [s for s, _ in rank0] == [s for s, _ in rank1] == list(range(1, steps + 1))
    seen0, seen1 = ({k for _, b in rows for k in b} for rows in (rank0, rank1))
    assert not seen0 & seen1 and len(seen0) == len(seen1) == 4 * steps
    assert not {s["key"] for s in held} & (seen0 | seen1)
    final = json.loads((out / "eval.json").read_text())
    assert final["pairs"] == len(held)  # an odd count's repeat on the second rank is not counted
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == list(range(1, steps + 1))
    # Gathered from the ZeRO-3 partitions: one process scores the held-out pairs the same.
    assert eval_rm.eval_main(["--model", str(out / "model"), "--shards", str(out / "split" / "heldout")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["pairs"] == len(held) and printed["accuracy"] == pytest.approx(final["accuracy"])
    assert printed["chosen"] == pytest.approx(final["chosen"], abs=1e-4)


def test_a_tokenizer_chat_template_is_what_the_reward_model_reads_and_scores(tmp_path):
    """Issue 14.6 in the RM: a real checkpoint's own chat template (ChatML here) renders the
    pairs, and the scored token is its end of turn (<|im_end|>), not the newline after it."""
    from checkpoints import write_llama
    from train.model import ModelSettings

    lm = write_llama(tmp_path / "lm", template="chatml")
    model = RewardModel.from_base(ModelSettings(lm=str(lm), feat_dim=8, lora_r=4, lora_alpha=8,
                                                template="tokenizer"), seed=0)
    end = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = model.encode("What colour is the circle?", "Red.")
    assert ids[-1] == end == model.lmm.chat.end_of_turn_id
    assert "<|im_start|>assistant\nRed.<|im_end|>" in model.tokenizer.decode(ids)
    answer = model.tokenizer("Red.", add_special_tokens=False)["input_ids"]
    assert model.encode("What colour is the circle?", answer + [end, 5, 6]) == ids  # generated ids, cut at the end
    prepare = rm.PairPreparer(model.tokenizer, rm.RMConfig(max_length=256), model.lmm.chat)
    pair = prepare({"key": "k", "feat": torch.zeros(3, 8), "json": {
        "conversations": [{"from": "human", "value": "<video>\nWhat colour is the circle?"}],
        "chosen": "Red.", "rejected": "Blue."}})
    assert pair["chosen_ids"] == model.encode("<video>\nWhat colour is the circle?", "Red.")
    settings = rm.build_model(rm.RMConfig(model=str(lm), feat_dim=8, template="tokenizer", lora_r=4), "unused")
    assert settings.lmm.settings.template == "tokenizer"
