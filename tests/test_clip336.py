"""The paper's encoder geometry: a CLIP ViT-L/14-336-shaped folder through `vlmr build-shards`.

The official VLM-RLAIF code feeds frames through CLIP ViT-L/14 at 336 px: 24 x 24 = 576
patches per frame from the penultimate layer, CLS dropped. The folder here has that geometry
(336 px, patch 14, the preprocessor file in the form the OpenAI release ships: integer
``size``/``crop_size``) and a scaled-down width, so the shards must hold T + 576 rows.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from checkpoints import vlmr

WIDTH = 32  # 1024 for ViT-L/14


def write_clip336(folder: Path) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPModel

    vision = dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=336, patch_size=14, projection_dim=WIDTH)
    text = dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=512, max_position_embeddings=77, projection_dim=WIDTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=WIDTH))
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "size": 336}, indent=2))
    return folder


@pytest.mark.slow
def test_a_336px_clip_folder_gives_576_patches_per_frame(synth_world, tmp_path):
    encoder = write_clip336(tmp_path / "clip336")
    out = tmp_path / "shards"
    frames, clips, clip_frames = 4, 2, 2
    vlmr("build-shards", "--annotations", synth_world / "annotations.json", "--videos", synth_world / "videos",
         "--out", out, "--encoder", encoder, "--frames", frames, "--clips", clips, "--clip-frames", clip_frames,
         "--workers", "1")
    arrays: dict[str, list[np.ndarray]] = {"feat": [], "clips": []}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                kind = member.name.rsplit(".", 2)[-2] if member.name.endswith(".npy") else None
                if kind in arrays:
                    arrays[kind].append(np.load(io.BytesIO(tar.extractfile(member).read())))
    assert arrays["feat"] and len(arrays["feat"]) == len(arrays["clips"])
    assert all(f.shape == (frames + 576, WIDTH) and np.isfinite(f.astype(np.float32)).all() for f in arrays["feat"])
    assert all(c.shape == (clips, clip_frames + 576, WIDTH) for c in arrays["clips"])
