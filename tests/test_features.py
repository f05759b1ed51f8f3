"""CLIP features: penultimate layer without CLS, Video-ChatGPT pooling, the feature cache."""

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
