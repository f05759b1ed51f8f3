"""``vlmr eval rm``: held-out pairwise accuracy of a saved reward model on preference shards.

It reads pairs exactly as ``vlmr train rm`` does (the same preparer, reader and scoring), so
the figure equals the training run's held-out evaluation on the same shards::

    vlmr eval rm --model runs/rm/model --shards runs/rm/split/heldout
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m train.eval.rm --model ... --shards ...
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

from dataengine import config as cfg
from train.rm import PairPreparer, RMConfig, eval_metrics, format_eval, make_reader, score_pairs


@dataclass
class EvalRMConfig:
    """Held-out pairwise accuracy of a reward model on preference shards."""

    model: str = "runs/rm/model"
    """A reward model folder written by `vlmr train rm` (OUTPUT/model, or a checkpoint's model/)."""
    shards: str = ""
    """Preference shards to evaluate on (e.g. OUTPUT/split/heldout of `vlmr train rm --eval-fraction`)."""
    stages: list[str] = field(default_factory=lambda: ["pairs"])
    batch_size: int = 8
    """Pairs per forward pass."""
    max_pairs: int = 0
    """Pairs evaluated (0: all)."""
    length_policy: Literal["skip", "truncate"] = "skip"
    """Pairs longer than the model's max_length: left out (counted) or cut to fit."""
    on_error: Literal["raise", "skip"] = "raise"
    """Corrupt shard data or malformed pairs: stop naming the shard and key, or skip and count them."""
    output: str = ""
    """Also write the metrics as JSON to this file."""

    def __post_init__(self) -> None:
        p: list[str] = []
        cfg.check(p, bool(self.shards), "--shards: the preference shards to evaluate on are required")
        cfg.check(p, bool(self.stages), "--stages: at least one stage")
        cfg.check(p, self.max_pairs >= 0, "--max-pairs must be >= 0")
        cfg.check(p, self.batch_size >= 1, "--batch-size must be >= 1")
        cfg.raise_problems(p, "eval rm settings")


def evaluate_model(config: EvalRMConfig, dist) -> dict[str, Any]:
    """Held-out metrics of a saved reward model on preference shards (every rank calls it)."""
    from train.reward import RewardModel

    model = RewardModel.load(config.model).to(dist.device)
    # The reader and preparer take the training settings that matter for reading pairs.
    rm = RMConfig(shards=config.shards, stages=config.stages, max_length=model.max_length,
                  length_policy=config.length_policy, context=model.context, on_error=config.on_error)
    ids = {"pad_token_id": model.lmm.pad_token_id, "video_token_id": model.lmm.video_token_id}
    reader = make_reader(config.shards, rm, 0, dist, PairPreparer(model.tokenizer, rm, model.lmm.chat),
                         evaluation=True)
    sums = score_pairs(model, reader, batch_size=config.batch_size, limit=config.max_pairs,
                       device=dist.device, rank=dist.rank, world_size=dist.world_size, **ids)
    return {"model": config.model, "shards": config.shards, **eval_metrics(sums)}


def eval_main(argv: list[str] | None = None, prog: str = "vlmr eval rm") -> int:
    config = cfg.parse_config(EvalRMConfig, list(sys.argv[1:] if argv is None else argv), prog=prog)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from dataengine import dist as collective

    with collective.process_group() as ranks:
        metrics = evaluate_model(config, ranks)
    if ranks.is_main:
        print(f"{config.model} on {config.shards}: {format_eval(metrics)}")
        print(json.dumps(metrics))
        if config.output:
            from dataengine.schema import write_text_atomic

            write_text_atomic(config.output, json.dumps(metrics, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("VLMR_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    sys.exit(eval_main())
