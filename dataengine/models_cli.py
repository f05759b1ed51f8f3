"""``vlmr models``: build or convert a preset's models (once) and print where they are cached."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from dataengine import config as cfg
from dataengine import models


@dataclass
class ModelsConfig:
    """Build the tiny models or convert the small preset's packaged weights into the model
    cache ($VLMR_CACHE, default ~/.cache/vlmr), and print their folders."""

    preset: Literal["tiny", "small"] = "tiny"
    """tiny: random-weight models for tests; small: SmolLM2-135M-Instruct and EfficientNet-Lite0
    from their installed packages (checked by sha256, converted once)."""
    json: bool = False
    """Print a JSON object instead of text."""


def preset_paths(preset: str) -> dict[str, str]:
    if preset == models.SMALL:
        lm = str(models.small_lm_path())
        return {"tokenizer": lm, "encoder": str(models.small_encoder_path()), "lm": lm}
    return {"tokenizer": str(models.tiny_tokenizer_path()), "encoder": str(models.tiny_clip_path()),
            "lm": str(models.tiny_llama_path())}


def main(argv: list[str] | None = None, prog: str = "vlmr models") -> int:
    config = cfg.parse_config(ModelsConfig, argv, prog=prog)
    paths = preset_paths(config.preset)
    if config.json:
        print(json.dumps(paths, indent=1))
    else:
        for name, path in paths.items():
            print(f"{name:<10} {path}")
    return 0
