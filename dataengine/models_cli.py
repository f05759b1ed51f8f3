"""``vlmr models``: build the tiny offline models (once) and print where they are cached."""

from __future__ import annotations

import json
from dataclasses import dataclass

from dataengine import config as cfg
from dataengine import models


@dataclass
class ModelsConfig:
    """Build the tiny offline models and tokenizer into the cache and print their folders."""

    json: bool = False
    """Print a JSON object instead of text."""


def main(argv: list[str] | None = None, prog: str = "vlmr models") -> int:
    config = cfg.parse_config(ModelsConfig, argv, prog=prog)
    paths = {"tokenizer": str(models.tiny_tokenizer_path()), "clip": str(models.tiny_clip_path()),
             "llama": str(models.tiny_llama_path())}
    if config.json:
        print(json.dumps(paths, indent=1))
    else:
        for name, path in paths.items():
            print(f"{name:<10} {path}")
    return 0
