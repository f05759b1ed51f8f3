"""The video LMM: splice, loss, save -> load, batched KV-cache generation, QLoRA training."""

from __future__ import annotations

import math

import pytest
import torch
from checkpoints import real_lm  # noqa: F401  (a fixture)

from dataengine.models import load_tokenizer
from train import conversation
from train.conversation import IGNORE_INDEX
from train.model import LORA_TARGETS, ModelSettings, VideoLMM, collate, default_lora_targets, suppress_token, token_nll

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS, DIM = 24, 64


def _sample(i: int, answer: str, rows: int = ROWS, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed * 1000 + i)
    return {"key": f"k{i}", "feat": torch.randn(rows, DIM, generator=g).half(),
            "json": {"conversations": [{"from": "human", "value": "<video>\nWhat happens in the video?"},
                                       {"from": "gpt", "value": answer}]}}


SAMPLES = [_sample(0, "A red circle moves left."),
           _sample(1, "A blue square moves up. Then the square moves up. Then it spins."),
           _sample(2, "Yes.")]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def model(tok):
    m = VideoLMM.build(ModelSettings(), tok, seed=0)
    # Fresh LoRA B is zero; make the adapters matter so that save -> load is a real check.
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return m.eval()


def test_splice_puts_video_rows_at_the_placeholder(model, tok):
    batch = collate(SAMPLES, tok)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    embeds, new_mask, new_labels, positions = model.splice(ids, batch["feat"], mask, labels)
    lengths = mask.sum(1)
    assert torch.equal(new_mask.sum(1), lengths - 1 + ROWS)
    assert embeds.shape[1] == int(lengths.max()) - 1 + ROWS
    assert batch["tokens"] == int(new_mask.sum())
    video_id = conversation.video_token_id(tok)
    with torch.no_grad():
        projected = model.projector(batch["feat"].float())
        text = model.lm.get_input_embeddings()(ids)
    for b in range(len(SAMPLES)):
        at = int((ids[b] == video_id).nonzero()[0, 0])
        assert torch.allclose(embeds[b, at:at + ROWS], projected[b])
        assert torch.equal(embeds[b, :at], text[b, :at])
        assert torch.equal(embeds[b, at + ROWS], text[b, at + 1])
        assert (new_labels[b, at:at + ROWS] == IGNORE_INDEX).all()
        n = int(new_mask[b].sum())
        assert torch.equal(positions[b, :n], torch.arange(n))
    # Targets survive the splice unchanged and in order.
    for b in range(len(SAMPLES)):
        assert torch.equal(new_labels[b][new_labels[b] != IGNORE_INDEX], labels[b][labels[b] != IGNORE_INDEX])


def test_left_and_right_padding_give_the_same_logits(model, tok):
    right = collate(SAMPLES, tok, padding_side="right")
    left = collate(SAMPLES, tok, padding_side="left")
    with torch.no_grad():
        r = model(right["input_ids"], right["feat"], right["attention_mask"])
        lo = model(left["input_ids"], left["feat"], left["attention_mask"], padding_side="left")
    for b in range(len(SAMPLES)):
        n = int(r.attention_mask[b].sum())
        assert torch.allclose(r.logits[b, :n], lo.logits[b, -n:], atol=1e-4)
    # And the same as the sample alone, unpadded (padding changes nothing).
    alone = collate(SAMPLES[2:], tok)
    with torch.no_grad():
        a = model(alone["input_ids"], alone["feat"], alone["attention_mask"])
    n = int(a.attention_mask[0].sum())
    assert torch.allclose(r.logits[2, :n], a.logits[0], atol=1e-4)


def test_text_only_rows_and_variable_video_lengths(model, tok):
    text_only = {"key": "t", "feat": torch.zeros(ROWS, DIM).half(),
                 "json": {"conversations": [{"from": "human", "value": "What shape?"},
                                            {"from": "gpt", "value": "A box."}]}}
    short_video = _sample(5, "A disk.", rows=10)
    batch = collate([SAMPLES[0], text_only, short_video], tok)
    assert isinstance(batch["feat"], list)
    with torch.no_grad():
        out = model(batch["input_ids"], batch["feat"], batch["attention_mask"], batch["labels"])
    lengths = batch["attention_mask"].sum(1)
    assert out.attention_mask.sum(1).tolist() == [lengths[0] - 1 + ROWS, lengths[1], lengths[2] - 1 + 10]
    assert torch.isfinite(out.loss)


def test_two_videos_in_one_row_are_refused(model, tok):
    ids = torch.tensor([[tok.bos_token_id, conversation.video_token_id(tok), conversation.video_token_id(tok)]])
    with pytest.raises(ValueError, match="more than one <video>"):
        model.splice(ids, torch.zeros(1, ROWS, DIM))


def test_token_nll_by_hand():
    # Vocabulary of 2; uniform logits give NLL log 2 per target, whatever the target.
    logits = torch.zeros(1, 3, 2)
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])
    total, count = token_nll(logits, labels)
    assert count == 2 and math.isclose(float(total), 2 * math.log(2), rel_tol=1e-6)
    # logits favouring token 1 by 2 nats at position 0: NLL of 1 is log(1 + e^-2).
    logits[0, 0] = torch.tensor([0.0, 2.0])
    total, _ = token_nll(logits, torch.tensor([[IGNORE_INDEX, 1, IGNORE_INDEX]]))
    assert math.isclose(float(total), math.log(1 + math.exp(-2)), rel_tol=1e-6)
    # No targets: zero loss that still backpropagates (every rank runs the same backward).
    logits.requires_grad_(True)
    total, count = token_nll(logits, torch.full((1, 3), IGNORE_INDEX))
    total.backward()
    assert count == 0 and float(total.detach()) == 0 and logits.grad is not None


def test_a_stand_in_sample_has_no_targets(tok):
    stand_in = dict(SAMPLES[0], substitute_for="shard.tar#k9")
    batch = collate([SAMPLES[1], stand_in], tok)
    assert batch["substitutes"] == 1
    assert (batch["labels"][1] == IGNORE_INDEX).all()
    assert (batch["labels"][0] != IGNORE_INDEX).any()


def test_save_then_load_gives_the_same_logits(model, tok, tmp_path):
    batch = collate(SAMPLES, tok)
    with torch.no_grad():
        before = model(batch["input_ids"], batch["feat"], batch["attention_mask"]).logits
    model.save(tmp_path / "saved")
    names = {p.name for p in (tmp_path / "saved").iterdir()}
    assert {"vlmr_model.json", "adapter_model.safetensors", "adapter_config.json",
            "projector.safetensors", "tokenizer.json"} <= names
    loaded = VideoLMM.load(tmp_path / "saved")
    with torch.no_grad():
        after = loaded(batch["input_ids"], batch["feat"], batch["attention_mask"]).logits
    assert torch.equal(before, after)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = VideoLMM.load(tmp_path / "saved", trainable=True)
    assert any(p.requires_grad for n, p in trainable.named_parameters() if "lora_" in n)
    assert all(p.requires_grad for p in trainable.projector.parameters())


def _fit_one_answer(model, sample, tok, steps: int) -> float:
    """Adam on one sample's answer tokens; the last per-token loss."""
    batch = collate([sample], tok)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(batch["input_ids"], batch["feat"], batch["attention_mask"], batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_the_random_heads_logit_cap_and_the_head_adapter_that_lifts_it(tok):
    """Regression: on the random-init tiny LM, LoRA on the attention/MLP projections alone
    cannot fit even one one-word answer (the frozen head bounds every logit near ±3: about
    4.1 nats per token at best); with ``default_lora_targets('tiny')`` (lm_head too) it can."""
    sample = _sample(7, "blue")
    capped = VideoLMM.build(ModelSettings(lora_targets=list(LORA_TARGETS)), tok, seed=0)
    assert _fit_one_answer(capped, sample, tok, steps=30) > 3.5
    lifted = VideoLMM.build(ModelSettings(lora_targets=default_lora_targets("tiny")), tok, seed=0)
    assert _fit_one_answer(lifted, sample, tok, steps=30) < 0.1
    feat = sample["feat"][None]
    answer = lifted.generate(feat, ["What happens in the video?"], max_new_tokens=4)
    assert answer.texts == ["blue"] and answer.ended == [True]


def test_a_head_adapter_saves_without_the_base_head(tok, tmp_path):
    from safetensors import safe_open

    model = VideoLMM.build(ModelSettings(lora_targets=default_lora_targets("tiny")), tok, seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    batch = collate(SAMPLES, tok)
    with torch.no_grad():
        before = model(batch["input_ids"], batch["feat"], batch["attention_mask"]).logits
    model.save(tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "adapter_model.safetensors"), "pt") as f:
        head_keys = sorted(k for k in f.keys() if "lm_head" in k)
    # The frozen base head comes back from the base spec; only its adapter is saved.
    assert head_keys == ["base_model.model.lm_head.lora_A.weight", "base_model.model.lm_head.lora_B.weight"]
    loaded = VideoLMM.load(tmp_path / "saved")
    assert "lm_head" in loaded.settings.lora_targets
    with torch.no_grad():
        after = loaded(batch["input_ids"], batch["feat"], batch["attention_mask"]).logits
    assert torch.equal(before, after)


def test_load_refuses_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="vlmr_model.json"):
        VideoLMM.load(tmp_path)


def _greedy_without_cache(model, feat, prompt, steps):
    ids = list(prompt)
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids]), feat[None]).logits
        logits[0, -1, model.video_token_id] = float("-inf")  # generate never emits the placeholder
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if nxt == model.eos_token_id:
            break
        ids.append(nxt)
    return out


def test_generate_matches_uncached_greedy_and_is_batch_independent(model, tok):
    feats = torch.stack([s["feat"] for s in SAMPLES])
    questions = ["What happens in the video?", "What colour is the shape?", "Describe this video in detail."]
    batched = model.generate(feats, questions, max_new_tokens=6)
    for b, q in enumerate(questions):
        single = model.generate(feats[b:b + 1], [q], max_new_tokens=6)
        assert single.token_ids[0] == batched.token_ids[b]
    reference = _greedy_without_cache(model, feats[0], conversation.prompt_ids(questions[0], tok), 6)
    assert batched.token_ids[0] == reference
    assert batched.texts[0] == tok.decode(reference, skip_special_tokens=True).strip()


def test_generate_never_emits_the_video_placeholder(tok):
    model = VideoLMM.build(ModelSettings(), tok, seed=0)
    def favour_video(module, inputs, logits):  # make <video> the favourite next token everywhere
        logits[..., model.video_token_id] += 100.0
        return logits

    model.lm.get_output_embeddings().register_forward_hook(favour_video)
    feats = torch.stack([s["feat"] for s in SAMPLES])
    greedy = model.generate(feats, ["What happens?"] * len(SAMPLES), max_new_tokens=5)
    sampled = model.generate(feats, ["What happens?"] * len(SAMPLES), max_new_tokens=5, do_sample=True, seed=1)
    for ids in greedy.token_ids + sampled.token_ids:
        assert ids and model.video_token_id not in ids


def test_sampling_is_seeded(model):
    feats = torch.stack([s["feat"] for s in SAMPLES])
    q = ["What happens in the video?"] * 3
    a = model.generate(feats, q, max_new_tokens=8, do_sample=True, temperature=1.0, top_p=0.9, seed=3)
    b = model.generate(feats, q, max_new_tokens=8, do_sample=True, temperature=1.0, top_p=0.9, seed=3)
    c = model.generate(feats, q, max_new_tokens=8, do_sample=True, temperature=1.0, top_p=0.9, seed=4)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert all(len(t) <= 8 for t in a.token_ids)


def test_qlora_trains_lora_weights(tok):
    """4-bit base: an eval forward (the CPU repack trap) then training still moves LoRA A and B."""
    import bitsandbytes as bnb

    model = VideoLMM.build(ModelSettings(qlora=True, lora_r=8, lora_alpha=8), tok, seed=0)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(not m.support_avx512bf16_for_cpu for m in layers)
    batch = collate(SAMPLES, tok)
    model.eval()
    with torch.no_grad():
        model(batch["input_ids"], batch["feat"], batch["attention_mask"])
    model.train()
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        out = model(batch["input_ids"], batch["feat"], batch["attention_mask"], batch["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    changed = {n for n, p in model.named_parameters() if n in lora and not torch.equal(p, lora[n])}
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    assert changed == set(lora)
    assert losses[-1] < losses[0]


# ------------------------------------------------------------- a checkpoint shaped like a real one

def test_real_shaped_checkpoint_generates_and_round_trips(real_lm, tmp_path):
    """The tokenizer fills the LM's vocabulary, so the added <video> id equals its size."""
    model = VideoLMM.build(ModelSettings(lm=str(real_lm), lora_r=4, lora_alpha=4), seed=0).eval()
    rows = model.lm.get_output_embeddings().weight.shape[0]
    assert model.video_token_id == rows == len(model.tokenizer) - 1
    feats = torch.stack([s["feat"] for s in SAMPLES])
    greedy = model.generate(feats, ["What happens?"] * 3, max_new_tokens=4)
    sampled = model.generate(feats, ["What happens?"] * 3, max_new_tokens=4, do_sample=True, seed=2)
    assert all(ids and max(ids) < rows for ids in greedy.token_ids + sampled.token_ids)
    model.save(tmp_path / "saved")
    loaded = VideoLMM.load(tmp_path / "saved")
    assert loaded.generate(feats, ["What happens?"] * 3, max_new_tokens=4).token_ids == greedy.token_ids


def test_suppress_token_leaves_logits_without_that_row_alone():
    logits = torch.zeros(2, 5)
    assert torch.equal(suppress_token(logits, 5), logits)
    out = suppress_token(logits, 3)
    assert out[:, 3].eq(float("-inf")).all() and torch.equal(out[:, :3], logits[:, :3])
    assert logits[:, 3].eq(0).all()  # not in place


def test_check_vocab_names_a_tokenizer_that_does_not_belong_to_the_lm(real_lm, tok):
    with pytest.raises(ValueError, match="embedding rows"):
        VideoLMM.build(ModelSettings(lm=str(real_lm), lora_r=4, lora_alpha=4), tok, seed=0)


def test_the_chat_template_is_saved_with_the_model(real_lm, tmp_path):
    """template: tokenizer renders prompts with the checkpoint's own template, after save -> load too."""
    model = VideoLMM.build(ModelSettings(lm=str(real_lm), lora_r=4, lora_alpha=4, template="tokenizer"), seed=0)
    tok = model.tokenizer
    assert model.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    prompt = model.chat.prompt_ids("What happens?")
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n") and prompt.count(model.video_token_id) == 1
    model.save(tmp_path / "saved")
    loaded = VideoLMM.load(tmp_path / "saved")
    assert loaded.settings.template == "tokenizer" and loaded.chat.prompt_ids("What happens?") == prompt
    sample = dict(SAMPLES[0])
    batch = collate([sample], tok, template="tokenizer")
    targets = batch["labels"][batch["labels"] != IGNORE_INDEX].tolist()
    assert tok.decode(targets) == "A red circle moves left.<|im_end|>"
    with pytest.raises(ValueError, match="template"):
        ModelSettings(template="chatml")


@pytest.mark.slow
def test_a_saved_model_folder_is_byte_identical_across_runs(tmp_path):
    """peft writes target_modules in hash order; two processes (two hash seeds) must still agree."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = ("import sys; from train.model import ModelSettings, VideoLMM; "
              "VideoLMM.build(ModelSettings(lora_r=4, lora_alpha=4), seed=0).save(sys.argv[1])")
    folders = []
    for seed in ("1", "2"):
        folder = tmp_path / f"run{seed}"
        env = dict(os.environ, PYTHONHASHSEED=seed, OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, "-c", script, str(folder)], cwd=root, env=env, check=True,
                       capture_output=True)
        folders.append(folder)
    names = sorted(p.name for p in folders[0].iterdir())
    assert names == sorted(p.name for p in folders[1].iterdir()) and "adapter_config.json" in names
    for name in names:
        assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes(), name
