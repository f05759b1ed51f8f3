"""The prompt files under ``train/prompts/`` and the one loader every command uses.

A prompt file is a ``string.Template``: ``$name`` placeholders, ``$$`` for a dollar sign,
lines starting with ``#`` are documentation and dropped. Each command says which
placeholders its prompt must use and which it may use, so that a typo (``$actor_list``) or a
placeholder never filled is an error naming the file rather than a literal ``$name`` sent
to a model.
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Sequence

PROMPTS = Path(__file__).resolve().parent / "prompts"


def load_prompt(path: str | os.PathLike, *, required: Sequence[str] = (),
                allowed: Sequence[str] = ()) -> string.Template:
    """A prompt file as a ``string.Template`` whose placeholders include ``required`` and
    lie within ``required + allowed``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt file not found")
    text = "\n".join(line for line in path.read_text(encoding="utf-8").splitlines()
                     if not line.startswith("#")).strip()
    if not text:
        raise ValueError(f"{path}: the prompt is empty (only '#' documentation lines)")
    template = string.Template(text)
    if not template.is_valid():
        raise ValueError(f"{path}: a '$' that is not a placeholder (write $$ for a dollar sign)")
    names = set(template.get_identifiers())
    missing = set(required) - names
    unknown = names - set(required) - set(allowed)
    if missing or unknown:
        known = ", ".join("$" + n for n in (*required, *allowed)) or "none"
        raise ValueError(f"{path}: " + "; ".join(
            ([f"missing placeholder(s) {', '.join('$' + n for n in sorted(missing))}"] if missing else []) +
            ([f"unknown placeholder(s) {', '.join('$' + n for n in sorted(unknown))}"] if unknown else []))
            + f" (placeholders: {known})")
    return template
