"""Running a ``vlmr eval`` command: candidates → answers (every rank) → scores → per-sample
results and the side-by-side table (rank 0); the command entry points. See :mod:`train.eval`."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from dataengine import config as cfg
from dataengine.schema import sample_key, write_text_atomic
from train.eval.answering import Candidate, collect_answers, resolve_candidates
from train.eval.configs import (FORMAT, RESULTS_NAME, SUMMARY_JSON, SUMMARY_TXT, ActionConfig, EvalConfig,
                                GenerativeConfig, Kind, QAConfig, RetrievalConfig, SyntheticConfig)
from train.eval.tasks import ActionTask, GenerativeTask, QATask, RetrievalTask, Row, SyntheticTask, Task

log = logging.getLogger(__name__)

# =========================================================================== reporting

def format_value(value: Any, kind: Kind) -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "score":
        return f"{value:.2f}"
    return str(int(value))


def format_table(title: str, columns: Sequence[dict[str, Any]]) -> str:
    """Metrics as rows, models as columns; percentages (pct) as 0–100, scores with two decimals."""
    labels: list[str] = []
    kinds: dict[str, Kind] = {}
    for column in columns:
        for label, _, kind in column["rows"]:
            if label not in kinds:
                labels.append(label)
                kinds[label] = kind
    header = ["metric"] + [c["name"] for c in columns]
    body = [[label + (" (%)" if kinds[label] == "pct" else "")] +
            [format_value(dict((lab, v) for lab, v, _ in c["rows"]).get(label), kinds[label]) for c in columns]
            for label in labels]
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells))

    return "\n".join([title, line(header), line(["-" * w for w in widths])] + [line(row) for row in body])


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# =========================================================================== running

TASKS: dict[str, type[Task]] = {"synthetic": SyntheticTask, "qa": QATask, "generative": GenerativeTask,
                                 "retrieval": RetrievalTask, "action": ActionTask}


def evaluate(config: EvalConfig) -> dict[str, Any] | None:
    """Run one evaluation over every candidate; returns the summary on rank 0 (None elsewhere)."""
    from dataengine.dist import Ranks
    from train.shardpass import pick_device, process_group, source_stages

    ranks = Ranks.from_env()
    with process_group(ranks):
        if not config.stages:
            config = dataclasses.replace(config, stages=source_stages(config.shards))
        device = pick_device(config.device, ranks)
        candidates = resolve_candidates(config)
        task = TASKS[config.task](config, ranks, device)  # type: ignore[arg-type]
        out = Path(config.output)
        if ranks.is_main:
            write_text_atomic(out / "config.json", json.dumps(cfg.to_dict(config), indent=1) + "\n")
        columns = []
        for candidate in candidates:
            answered = collect_answers(task, candidate, config, ranks, device)
            rows = task.score(None if answered is None else answered["records"])
            if answered is not None and rows is not None:
                columns.append(report_candidate(candidate, answered, rows, out))
        if not ranks.is_main:
            return None
        table = format_table(f"vlmr eval {config.task}: {config.shards} (stages {', '.join(config.stages)})", columns)
        summary = {"format": FORMAT, "task": config.task, "shards": config.shards, "table": table,
                   "candidates": columns, "config": cfg.to_dict(config)}
        write_text_atomic(out / SUMMARY_JSON, json.dumps(summary, indent=1) + "\n")
        write_text_atomic(out / SUMMARY_TXT, table + "\n")
        print(table, flush=True)
        return summary


def report_candidate(candidate: Candidate, answered: dict[str, Any], rows: list[Row], out: Path) -> dict[str, Any]:
    """Write one candidate's results.jsonl and summary.json (rank 0); returns its table column."""
    records = answered["records"]
    skipped = Counter(s["reason"] for s in answered["skipped"])
    rows = list(rows) + [("samples", len(records), "count"), ("skipped", sum(skipped.values()), "count"),
                         ("answers without EOS", sum(not r.get("ended", True) for r in records), "count")]
    column = {"name": candidate.name, "kind": candidate.kind, "source": str(candidate.path),
              "metrics": {label: value for label, value, _ in rows}, "rows": [list(r) for r in rows],
              "skipped": dict(skipped), "reader": answered["reader"], "seconds": round(answered["seconds"], 2)}
    folder = out / sample_key(candidate.name)
    lines = records + [dict(s, skipped=True) for s in answered["skipped"]]
    write_jsonl(folder / RESULTS_NAME, sorted(lines, key=lambda line: line["index"]))
    write_text_atomic(folder / SUMMARY_JSON, json.dumps(column, indent=1) + "\n")
    log.info("%s: %d samples scored, %d skipped%s (%.1f s) -> %s", candidate.name, len(records),
             sum(skipped.values()), f" ({dict(skipped)})" if skipped else "", answered["seconds"], folder)
    return column


def _main(config_cls: type[EvalConfig], argv: list[str] | None, prog: str) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = cfg.parse_config(config_cls, argv, prog=prog)
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)
    evaluate(config)
    return 0


def synthetic_main(argv: list[str] | None = None, prog: str = "vlmr eval synthetic") -> int:
    return _main(SyntheticConfig, argv, prog)


def qa_main(argv: list[str] | None = None, prog: str = "vlmr eval qa") -> int:
    return _main(QAConfig, argv, prog)


def generative_main(argv: list[str] | None = None, prog: str = "vlmr eval generative") -> int:
    return _main(GenerativeConfig, argv, prog)


def retrieval_main(argv: list[str] | None = None, prog: str = "vlmr eval retrieval") -> int:
    return _main(RetrievalConfig, argv, prog)


def action_main(argv: list[str] | None = None, prog: str = "vlmr eval action") -> int:
    return _main(ActionConfig, argv, prog)


MAINS = {"synthetic": synthetic_main, "qa": qa_main, "generative": generative_main,
         "retrieval": retrieval_main, "action": action_main}


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("VLMR_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if len(sys.argv) < 2 or sys.argv[1] not in MAINS:
        print(f"usage: python -m train.eval.run {{{','.join(MAINS)}}} [options]", file=sys.stderr)
        sys.exit(2)
    sys.exit(MAINS[sys.argv[1]](sys.argv[2:], prog=f"train.eval.run {sys.argv[1]}"))
