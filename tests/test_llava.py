"""Starting from LLaVA-1.5: the LM and the pretrained projector from a LLaVA folder, both layouts.

The folders are scaled-down LLaVA-1.5 checkpoints written in each layout the way the real
ones are: transformers' ``LlavaForConditionalGeneration`` (keys as on the hub,
``language_model.model.*`` / ``multi_modal_projector.linear_1``, and as transformers 5
saves them) and the original haotian-liu/LLaVA code's (a Llama folder with
``mm_projector_type: mlp2x_gelu`` and ``model.mm_projector.0|2.*``, in the weight file or
in a separate ``mm_projector.bin``). What ``VideoLMM.build`` loads must equal what was
written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoints import LLAMA, write_tokenizer

from train.model import ModelSettings, VideoLMM, llava_layout

pytestmark = pytest.mark.usefixtures("one_thread")

FEAT = 48  # the vision width (1024 for CLIP ViT-L/14-336), scaled down


def _llama(folder: Path):
    """A tokenizer in ``folder`` and a seeded Llama sized to it (not saved)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    write_tokenizer(folder, "chatml")
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **LLAMA)
    torch.manual_seed(7)
    return config, LlamaForCausalLM(config)


def _projector_weights(hidden: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"0.weight": torch.randn(hidden, FEAT, generator=g), "0.bias": torch.randn(hidden, generator=g),
            "2.weight": torch.randn(hidden, hidden, generator=g), "2.bias": torch.randn(hidden, generator=g)}


def write_hf_llava(folder: Path, keys: str) -> tuple[dict, dict]:
    """transformers' LLaVA layout; ``keys`` 'hub' (language_model.model.*, as llava-hf ships)
    or 'v5' (model.language_model.*, lm_head.*). Returns (LM state, projector state)."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, LlavaConfig

    text, llama = _llama(folder)
    vision = CLIPVisionConfig(hidden_size=FEAT, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              image_size=32, patch_size=16)
    config = LlavaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projector_hidden_act="gelu",
                         image_token_index=text.vocab_size - 1, vision_feature_layer=-2)
    data = config.to_dict()
    data["architectures"] = ["LlavaForConditionalGeneration"]
    (folder / "config.json").write_text(json.dumps(data, indent=2))
    lm = {k: v.clone() for k, v in llama.state_dict().items()}
    projector = _projector_weights(text.hidden_size)
    state = {}
    for name, tensor in lm.items():
        if keys == "hub":
            state[f"language_model.{name}"] = tensor
        else:
            state[name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name] = tensor
    prefix = "multi_modal_projector" if keys == "hub" else "model.multi_modal_projector"
    for ours, theirs in (("0", "linear_1"), ("2", "linear_2")):
        for part in ("weight", "bias"):
            state[f"{prefix}.{theirs}.{part}"] = projector[f"{ours}.{part}"]
    tower = "vision_tower" if keys == "hub" else "model.vision_tower"
    state[f"{tower}.vision_model.post_layernorm.weight"] = torch.ones(FEAT)  # a part that is not ours
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return lm, projector


def write_original_llava(folder: Path, separate_projector: bool) -> tuple[dict, dict]:
    """haotian-liu/LLaVA's layout: a Llama folder plus model.mm_projector.0|2.* (in the
    weight file, or in mm_projector.bin as a pretraining run writes it)."""
    from safetensors.torch import save_file

    text, llama = _llama(folder)
    data = text.to_dict()
    data.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"], mm_projector_type="mlp2x_gelu",
                mm_hidden_size=FEAT, mm_vision_select_layer=-2, mm_use_im_start_end=False,
                mm_vision_tower="openai/clip-vit-large-patch14-336")
    (folder / "config.json").write_text(json.dumps(data, indent=2))
    lm = {k: v.clone() for k, v in llama.state_dict().items()}
    projector = _projector_weights(text.hidden_size)
    mm = {f"model.mm_projector.{k}": v for k, v in projector.items()}
    if separate_projector:
        save_file(lm, str(folder / "model.safetensors"), metadata={"format": "pt"})
        torch.save(mm, folder / "mm_projector.bin")
    else:
        torch.save({**lm, **mm}, folder / "pytorch_model.bin")
    return lm, projector


LAYOUTS = {
    "hf-hub": (lambda f: write_hf_llava(f, "hub"), "hf"),
    "hf-v5": (lambda f: write_hf_llava(f, "v5"), "hf"),
    "original": (lambda f: write_original_llava(f, separate_projector=False), "original"),
    "original-mm_projector.bin": (lambda f: write_original_llava(f, separate_projector=True), "original"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_lm_and_projector_come_from_a_llava_folder(layout, tmp_path):
    write, name = LAYOUTS[layout]
    lm_state, projector_state = write(tmp_path / "llava")
    assert llava_layout(tmp_path / "llava").name == name
    model = VideoLMM.build(ModelSettings(lm=str(tmp_path / "llava"), feat_dim=FEAT, lora_r=4, lora_alpha=4), seed=0)
    assert model.settings.projector_act == "gelu" and isinstance(model.projector[1], torch.nn.GELU)
    for key, tensor in projector_state.items():
        assert torch.equal(model.projector.state_dict()[key], tensor), key
    base = model.lm.get_base_model()
    assert torch.equal(base.get_input_embeddings().weight, lm_state["model.embed_tokens.weight"])
    assert torch.equal(base.lm_head.weight, lm_state["lm_head.weight"])
    assert torch.equal(base.model.layers[1].self_attn.q_proj.base_layer.weight,
                       lm_state["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(base.model.norm.weight, lm_state["model.norm.weight"])
    # Saved and loaded again: the projector keeps its activation and weights.
    model.save(tmp_path / "saved")
    loaded = VideoLMM.load(tmp_path / "saved")
    assert isinstance(loaded.projector[1], torch.nn.GELU)
    feat = torch.randn(1, 5, FEAT)
    with torch.no_grad():
        assert torch.equal(loaded.projector(feat), model.projector(feat))


def test_features_of_another_width_are_refused_by_name(tmp_path):
    write_original_llava(tmp_path / "llava", separate_projector=True)
    with pytest.raises(ValueError, match=f"maps {FEAT}-wide features .* are 64 wide"):
        VideoLMM.build(ModelSettings(lm=str(tmp_path / "llava"), feat_dim=64, lora_r=4, lora_alpha=4), seed=0)


def test_a_plain_lm_folder_is_no_llava(tmp_path):
    from checkpoints import write_llama

    assert llava_layout(write_llama(tmp_path / "lm")) is None


@pytest.mark.parametrize("layout", ["hf-hub", "original"])
def test_a_llava_folder_loads_4bit_for_qlora(layout, tmp_path):
    """The paper trains QLoRA on LLaVA-1.5: the LM part loads 4-bit from the LLaVA folder too."""
    import bitsandbytes as bnb

    lm_state, projector_state = LAYOUTS[layout][0](tmp_path / "llava")
    model = VideoLMM.build(ModelSettings(lm=str(tmp_path / "llava"), feat_dim=FEAT, lora_r=4, lora_alpha=4,
                                         qlora=True), seed=0)
    assert torch.equal(model.projector[0].weight.float(), projector_state["0.weight"])
    base = model.lm.get_base_model()
    assert torch.equal(base.get_input_embeddings().weight.float(), lm_state["model.embed_tokens.weight"])
    q_proj = base.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    weight = bnb.functional.dequantize_4bit(q_proj.weight.data, q_proj.weight.quant_state).float()
    written = lm_state["model.layers.0.self_attn.q_proj.weight"]
    assert (weight - written).abs().max() < 0.25 * written.abs().max()  # nf4 rounding, not another tensor


def test_a_llava_folder_without_its_lm_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    write_hf_llava(tmp_path / "llava", "hub")
    state = load_file(str(tmp_path / "llava" / "model.safetensors"))
    del state["language_model.model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(tmp_path / "llava" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="layers.1.mlp.up_proj.weight"):
        VideoLMM.build(ModelSettings(lm=str(tmp_path / "llava"), feat_dim=FEAT, lora_r=4, lora_alpha=4), seed=0)
