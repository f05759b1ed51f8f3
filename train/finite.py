"""Non-finite numbers are errors that name where they came from, never silently skipped steps.

A flipped byte in a shard's float16 feature array decodes without error; if it lands in an
exponent, the array holds inf or NaN, the loss becomes NaN, and DeepSpeed (with loss
scaling) only prints "OVERFLOW! Skipping step" while the run goes on and exits 0. The
trainers therefore check the features of every sample as it is read
(:func:`check_features`, in the reader's read-ahead thread) and every loss before its
backward pass (:func:`check_loss`); the messages name the shard and the key. ``verify``
(the reader's sha256 check of each shard against its manifest) catches the damage even
where it does not make a number non-finite.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """A feature array or a loss holds inf or NaN; the message names the shard and key."""


def where(sample: dict[str, Any]) -> str:
    return f"{sample.get('shard', '?')}, key {sample.get('key', '?')!r}"


def check_features(sample: dict[str, Any], on_error: str, members: Sequence[str] = ("feat", "clips")) -> bool:
    """True when every feature array of ``sample`` is finite. Otherwise raise
    :class:`NonFiniteError` (``on_error="raise"``) or log it and return False (``"skip"``:
    the caller leaves the sample out, and the reader counts it)."""
    for name in members:
        value = sample.get(name)
        if value is None:
            continue
        finite = bool(torch.isfinite(value).all()) if isinstance(value, torch.Tensor) \
            else bool(np.isfinite(np.asarray(value)).all())
        if not finite:
            message = (f"{where(sample)}: {name} holds inf or NaN (corrupt shard data? "
                       "check it with `vlmr inspect SHARDS verify`, or train with --verify)")
            if on_error == "raise":
                raise NonFiniteError(message)
            log.warning("skipping %s", message)
            return False
    return True


def check_loss(loss: torch.Tensor, *, step: int, rank: int, keys: Sequence[str], shards: Sequence[str] = ()) -> None:
    """Raise :class:`NonFiniteError` naming the batch when ``loss`` is inf or NaN."""
    if bool(torch.isfinite(loss.detach()).all()):
        return
    named = ", ".join(f"{s}#{k}" if s else k for s, k in zip(list(shards) or [""] * len(keys), keys))
    raise NonFiniteError(f"non-finite loss ({float(loss.detach().float().mean())}) at step {step} on rank {rank}; "
                         f"the batch held: {named}")
