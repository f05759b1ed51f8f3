"""Video features: patch tokens from an image encoder, Video-ChatGPT pooling, and a cache.

One encoder interface, two kinds (:func:`load_encoder` picks by the folder):

- CLIP (the paper's ViT-L/14, at 224 px → 256 patches or 336 px → 576): the penultimate
  layer's tokens, CLS dropped;
- a CNN feature map (the ``small`` preset's EfficientNet-Lite0): the last map's cells as
  patches, 7×7 = 49 at 224 px, 1280 channels.

For T frames, the encoder gives T×P×D patch tokens. Pooling keeps both kinds of information
the LMM needs in T+P tokens::

    temporal = mean over patches   → T×D   (what happens when)
    spatial  = mean over frames    → P×D   (what is where)
    feat     = [temporal; spatial] → (T+P)×D, float16

The same pooling per clip gives ``clips`` of shape (K, F+P, D).

The cache stores, per (video content hash, decode settings, encoder identity), the pooled
``feat``, ``clips`` and the contact sheet, each written to a temporary name and renamed, so a
build killed at any point resumes without encoding a finished video again, and a second
dataset over the same videos encodes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from dataengine import models


class Encoder(Protocol):
    """Anything that turns uint8 frames (N, S, S, 3) into patch tokens (N, P, D)."""

    image_size: int
    identity: str
    vision: models.VisionSpec

    def encode(self, frames: np.ndarray) -> np.ndarray: ...


def pool(patch_tokens: np.ndarray) -> np.ndarray:
    """Video-ChatGPT pooling: (T, P, D) → (T+P, D) float16 (means taken in float32)."""
    if patch_tokens.ndim != 3:
        raise ValueError(f"expected (T, P, D) patch tokens, got shape {patch_tokens.shape}")
    x = patch_tokens.astype(np.float32, copy=False)
    temporal = x.mean(axis=1)
    spatial = x.mean(axis=0)
    return np.concatenate([temporal, spatial], axis=0).astype(np.float16)


class _BatchedEncoder:
    """Frames → normalised pixels in batches → ``_patch_tokens`` (N, P, D); shared by both kinds."""

    def __init__(self, spec: str, model, vision: models.VisionSpec, device: str, batch_size: int):
        import torch

        self.spec = spec
        self.device = device
        self.batch_size = batch_size
        self.model, self.vision = model, vision
        self.image_size = vision.image_size
        self.dtype = next(self.model.parameters()).dtype
        self._mean = torch.tensor(vision.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(vision.std, dtype=torch.float32).view(1, 3, 1, 1)
        self.identity = encoder_identity(spec)

    def _patch_tokens(self, pixels):
        raise NotImplementedError

    def encode(self, frames: np.ndarray) -> np.ndarray:
        import torch

        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected (N, S, S, 3) uint8 frames, got {frames.shape}")
        out = []
        with torch.inference_mode():
            for start in range(0, len(frames), self.batch_size):
                chunk = torch.from_numpy(np.ascontiguousarray(frames[start:start + self.batch_size]))
                pixels = chunk.permute(0, 3, 1, 2).float().div_(255.0)
                pixels = ((pixels - self._mean) / self._std).to(self.device, self.dtype)
                out.append(self._patch_tokens(pixels).float().cpu().numpy())
        if not out:
            return np.zeros((0, self.vision.num_patches, self.vision.hidden_size), np.float32)
        return np.concatenate(out, axis=0)


class ClipEncoder(_BatchedEncoder):
    """``CLIPVisionModel`` from a local folder (or ``tiny``): penultimate layer, CLS dropped."""

    def __init__(self, spec: str = models.TINY, device: str = "cpu", batch_size: int = 64):
        if models.encoder_kind(models.resolve_encoder(spec)) != "clip":
            raise ValueError(f"encoder {spec!r} is not a CLIP folder: open it with features.load_encoder")
        model, vision = models.load_vision_encoder(spec, device=device)
        super().__init__(spec, model, vision, device, batch_size)

    def _patch_tokens(self, pixels):
        return self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:, :]


class FeatureMapEncoder(_BatchedEncoder):
    """A CNN (EfficientNet-Lite): each cell of its last feature map (C×H×W) is a patch of width C."""

    def __init__(self, spec: str = models.SMALL, device: str = "cpu", batch_size: int = 64):
        model, vision = models.load_feature_map_encoder(models.resolve_encoder(spec), device=device)
        super().__init__(spec, model, vision, device, batch_size)

    def _patch_tokens(self, pixels):
        fmap = self.model.extract_features(pixels)  # (N, C, H, W)
        return fmap.flatten(2).transpose(1, 2)  # (N, H·W, C), cells in row-major order


def load_encoder(spec: str = models.TINY, device: str = "cpu", batch_size: int = 64) -> Encoder:
    """The encoder a spec names (``tiny``, ``small`` or a folder), of the kind its folder holds."""
    if models.encoder_kind(models.resolve_encoder(spec)) == "feature_map":
        return FeatureMapEncoder(spec, device=device, batch_size=batch_size)
    return ClipEncoder(spec, device=device, batch_size=batch_size)


def encoder_identity(spec: str) -> str:
    """A string that changes when the encoder's weights or config change."""
    path = models.resolve_encoder(spec)
    digest = hashlib.sha256()
    for name in ("config.json", "preprocessor_config.json"):
        if (path / name).exists():
            digest.update((path / name).read_bytes())
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}".encode())
    return f"{path.name}:{digest.hexdigest()[:16]}"


@dataclass
class CachedFeatures:
    feat: np.ndarray
    clips: np.ndarray | None
    thumb: bytes


class FeatureCache:
    """``ROOT/ab/abcdef…/{feat.npy, clips.npy, thumb.jpg}``, one folder per cache key.

    A folder appears under its final name only when complete (built in a temp folder, renamed).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(content_hash: str, settings: dict) -> str:
        blob = json.dumps({"video": content_hash, **settings}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def _dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    def has(self, key: str) -> bool:
        return (self._dir(key) / "feat.npy").exists()

    def get(self, key: str) -> CachedFeatures:
        folder = self._dir(key)
        feat = np.load(folder / "feat.npy", allow_pickle=False)
        clips_path = folder / "clips.npy"
        clips = np.load(clips_path, allow_pickle=False) if clips_path.exists() else None
        return CachedFeatures(feat=feat, clips=clips, thumb=(folder / "thumb.jpg").read_bytes())

    def put(self, key: str, value: CachedFeatures) -> None:
        final = self._dir(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=final.parent))
        try:
            np.save(tmp / "feat.npy", value.feat, allow_pickle=False)
            if value.clips is not None:
                np.save(tmp / "clips.npy", value.clips, allow_pickle=False)
            (tmp / "thumb.jpg").write_bytes(value.thumb)
            try:
                os.replace(tmp, final)
            except OSError:
                if not self.has(key):  # not a concurrent writer of the same key
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def encode_video(encoder: Encoder, frames: np.ndarray, clips: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Pooled ``feat`` (T+P, D) and ``clips`` (K, F+P, D), encoding all frames in one batch run."""
    n_frames = len(frames)
    batches = [frames]
    if clips is not None and len(clips):
        k, f = clips.shape[:2]
        batches.append(clips.reshape(k * f, *clips.shape[2:]))
    tokens = encoder.encode(np.concatenate(batches, axis=0) if len(batches) > 1 else frames)
    feat = pool(tokens[:n_frames])
    if clips is None or not len(clips):
        return feat, None
    clip_tokens = tokens[n_frames:].reshape(k, f, *tokens.shape[1:])
    return feat, np.stack([pool(c) for c in clip_tokens])
