"""``vlmr inspect SOURCE [COMMAND]``: see what is in a shard set without writing code.

Argument parsing and printing only; the work is done by :mod:`dataengine.inspection`
(summary, shard rows, samples, verification) and :mod:`dataengine.report` (HTML + PNG).
``head`` streams through :class:`dataengine.reader.ShardReader` (``shuffle="none"``), so it
shows exactly what a trainer reads; the other commands do not import torch, so they start
in well under a second.

Run::

    vlmr inspect shards/demo                     # summary
    vlmr inspect shards/demo verify --json       # machine-readable, exit 1 on any problem
    python -m tools.cli inspect shards/demo report --out runs/report
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

from dataengine import inspection, report, schema, verify
from dataengine.sources import SourceError
from dataengine.tario import ShardError

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
COMMANDS = ("summary", "ls", "show", "head", "verify", "report")

EPILOG = """\
commands (default: summary):
  summary   format, build settings, stages with shard and sample counts, bytes, answer-token
            range and a text histogram of answer lengths per stage, build failures by reason
  ls        one row per shard: stage, samples, size, answer-token range, first/last key
  show      one sample (KEY, or --index N [--stage S]): conversation, answer tokens, feature
            shapes and statistics, narrative and preference fields; --save DIR writes its
            contact sheet and features
  head      the first N samples in stream order, one compact row each (-n N, --stage S)
  verify    every shard's sha256, sample count and key contiguity against the manifest; every
            sample's members present and decodable without pickle; features finite; answer
            lengths non-decreasing within a stage. Prints every problem with shard and key
  report    a static HTML page (--out DIR): summary, answer-length histogram PNG with the
            easy/hard split, gallery of contact sheets with question and answer

SOURCE: a shard folder, its manifest.json, or a URL of either (http(s)://, file://, fsspec).
Every command takes --json (head prints JSON Lines, one sample per line).
Exit status: 0 fine; 1 the data has problems (verify found some, or a damaged shard stopped
a command); 2 usage errors (bad options, SOURCE not a shard set, unknown stage or key).

examples:
  vlmr inspect shards/demo
  vlmr inspect shards/demo show --index 0 --stage hard --save /tmp/sample
  vlmr inspect shards/demo head -n 5 --stage easy
  vlmr inspect shards/demo verify --json | jq .problems
  vlmr inspect http://host/shards/demo/manifest.json ls
"""


def build_parser(prog: str) -> argparse.ArgumentParser:
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                           help="print machine-readable JSON instead of text")
    summary_opts = argparse.ArgumentParser(add_help=False)
    summary_opts.add_argument("--no-scan", dest="scan", action="store_false", default=argparse.SUPPRESS,
                              help="use the manifest alone (no pass over the tars, so no histogram)")
    summary_opts.add_argument("--bins", type=_positive, default=argparse.SUPPRESS,
                              help="histogram bins per stage (default: 8)")
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        usage=f"{prog} SOURCE [COMMAND] [options]",
        description="Look inside a shard set: summary, ls, show, head, verify, report.")
    parser.add_argument("source", metavar="SOURCE", help="shard folder, manifest.json, or URL of either")
    parser.add_argument("--json", action="store_true", default=False,
                        help="print machine-readable JSON instead of text")
    parser.add_argument("--no-scan", dest="scan", action="store_false", default=True,
                        help="summary from the manifest alone (no pass over the tars, so no histogram)")
    parser.add_argument("--bins", type=_positive, default=8, help="summary histogram bins per stage (default: 8)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = False
    sub.add_parser("summary", parents=[json_flag, summary_opts], help="(default) what the set holds",
                   description="Format, build settings, stages, bytes, answer lengths, build failures.")
    p = sub.add_parser("ls", parents=[json_flag], help="one row per shard",
                       description="One row per shard, from the manifest: stage, samples, size, "
                                   "answer-token range, first and last key.")
    p.add_argument("--stage", help="only this stage")
    p = sub.add_parser("show", parents=[json_flag], help="one sample in full",
                       description="One sample: conversation, answer tokens, feature shapes/dtypes and "
                                   "statistics, narrative and preference fields, other fields.")
    p.add_argument("key", nargs="?", metavar="KEY", help="the sample's key (as in `ls`/`head`)")
    p.add_argument("--index", type=_non_negative, help="position in stream order (within --stage if given)")
    p.add_argument("--stage", help="count --index within this stage")
    p.add_argument("--save", metavar="DIR", help="write the sample's members (contact sheet, features, json) here")
    p = sub.add_parser("head", parents=[json_flag], help="the first samples, compact rows",
                       description="Stream the first N samples (shuffle none) as compact rows.")
    p.add_argument("-n", type=_non_negative, default=10, help="how many samples (default: 10)")
    p.add_argument("--stage", help="only this stage")
    p = sub.add_parser("verify", parents=[json_flag], help="check every byte; exit 1 on any problem",
                       description="Check every shard and sample against the manifest and the format; "
                                   "print every problem with shard and key; exit 1 if there is any.")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    p = sub.add_parser("report", parents=[json_flag], help="static HTML page with pictures",
                       description="Write a static HTML report (summary, answer-length histogram, "
                                   "gallery of contact sheets) viewable offline.")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for index.html and its images")
    p.add_argument("--gallery", type=_non_negative, default=24, help="samples in the gallery (default: 24)")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


# ================================================================================ main

def main(argv: list[str] | None = None, prog: str = "vlmr inspect") -> int:
    parser = build_parser(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in COMMANDS and len(argv) > 1 and not argv[1].startswith("-") \
                and not Path(argv[0]).exists():
            parser.error(f"SOURCE comes first: {prog} {argv[1]} {argv[0]} ...")
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help exits 0, usage errors 2
        return int(exc.code or 0)
    command = args.command or "summary"
    try:
        shard_set = inspection.open_shard_set(args.source)
        return COMMAND_FUNCS[command](shard_set, args)
    except BrokenPipeError:  # `vlmr inspect ... | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (SourceError, KeyError, LookupError) as exc:
        return _fail(args, exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc), EXIT_USAGE, prog)
    except (ShardError, ValueError, OSError) as exc:
        return _fail(args, str(exc), EXIT_PROBLEMS, prog)


def _fail(args: argparse.Namespace, message: str, code: int, prog: str) -> int:
    if args.json:
        _print_json({"error": message, "exit": code})
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=1, default=str))


def _width() -> int:
    return max(60, min(160, shutil.get_terminal_size((120, 24)).columns))


def _clip(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


# ================================================================================ summary

def cmd_summary(shard_set: inspection.ShardSet, args: argparse.Namespace) -> int:
    summary = inspection.summarize(shard_set, scan=args.scan)
    if args.json:
        out = summary.to_dict()
        for stage, raw in zip(out["stages"], summary.stages):
            stage["histogram"] = None if raw.answer_tokens is None else [
                vars(b) for b in inspection.histogram(raw.answer_tokens, bins=args.bins)]
        _print_json(out)
        return EXIT_OK
    s = summary
    shards = sum(st.shards for st in s.stages)
    print(f"{s.source}")
    print(f"  format {s.format}: {s.samples} samples in {shards} shards, {inspection.human_bytes(s.bytes)}")
    if s.derived_from:
        print(f"  derived from {s.derived_from}")
    if s.settings:
        print("settings:")
        for key, value in s.settings.items():
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            print(f"  {key:<18} {_clip(text, _width() - 22)}")
    print("stages (stream order):")
    name_w = max([5] + [len(st.name) for st in s.stages])
    for st in s.stages:
        print(f"  {st.name:<{name_w}}  {st.shards:>4} shards  {st.samples:>8} samples  "
              f"{inspection.human_bytes(st.bytes):>9}  answer tokens {st.min_answer_tokens}..{st.max_answer_tokens}")
    if s.split:
        print(f"  curriculum split: easy <= {s.split[0]} tokens, hard >= {s.split[1]}")
    if args.scan:
        print("answer lengths (tokens):")
        for st in s.stages:
            print(f"  {st.name}")
            for line in text_histogram(st.answer_tokens or {}, args.bins):
                print("    " + line)
    log_ = s.failure_log
    if not log_.present:
        note = f" (the manifest counts {s.failures})" if s.failures else ""
        print(f"failures at build time: no {schema.FAILURES_NAME}{note}")
    else:
        reasons = ", ".join(f"{r} {n}" for r, n in log_.reasons.most_common(5)) or "none"
        more = f", +{len(log_.reasons) - 5} more reasons" if len(log_.reasons) > 5 else ""
        bad = f"; {len(log_.bad_lines)} unreadable line(s)" if log_.bad_lines else ""
        print(f"failures at build time: {log_.count} ({reasons}{more}); "
              f"{log_.samples_left_out} sample(s) left out{bad}")
    return EXIT_OK


def text_histogram(counts: dict[int, int], bins: int, bar: int = 40) -> list[str]:
    """``lo-hi  ██████ n`` lines, bars scaled to the largest bin."""
    if not counts:
        return ["(no samples)"]
    rows = inspection.histogram(counts, bins=bins)
    top = max(b.count for b in rows) or 1
    labels = [f"{b.lo}-{b.hi}" if b.hi != b.lo else f"{b.lo}" for b in rows]
    label_w = max(len(label) for label in labels)
    lines = []
    for b, label in zip(rows, labels):
        eighths = round(b.count / top * bar * 8)
        blocks = "█" * (eighths // 8) + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[eighths % 8]
        lines.append(f"{label:>{label_w}}  {blocks:<{bar}} {b.count}")
    return lines


# ================================================================================ ls

def cmd_ls(shard_set: inspection.ShardSet, args: argparse.Namespace) -> int:
    rows = inspection.shard_rows(shard_set, args.stage)
    if args.json:
        _print_json(rows)
        return EXIT_OK
    header = ("stage", "shard", "samples", "size", "tokens", "first key", "last key")
    table = [header] + [(r["stage"], r["url"], str(r["samples"]), inspection.human_bytes(r["bytes"]),
                         f"{r['min_answer_tokens']}..{r['max_answer_tokens']}", r["first_key"], r["last_key"])
                        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    right = {2, 3, 4}
    for row in table:
        print("  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                        for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    return EXIT_OK


# ================================================================================ show

def cmd_show(shard_set: inspection.ShardSet, args: argparse.Namespace) -> int:
    if (args.key is None) == (args.index is None):
        raise LookupError("show needs a KEY or --index N (not both)")
    if args.stage is not None:
        shard_set.manifest.stage(args.stage)  # KeyError naming the known stages
    raw = inspection.find_sample(shard_set, key=args.key, index=args.index, stage=args.stage)
    if raw is None:
        where = f" in stage {args.stage!r}" if args.stage else ""
        if args.key is not None:
            raise LookupError(f"no sample with key {args.key!r}{where} in {shard_set.source}")
        total = shard_set.manifest.stage(args.stage).samples if args.stage else shard_set.manifest.samples
        raise LookupError(f"--index {args.index} is past the end: {total} samples{where}")
    info = inspection.describe_sample(raw)
    saved = [str(p) for p in inspection.save_sample(raw, args.save)] if args.save else []
    if args.json:
        _print_json(dict(info, saved=saved) if args.save else info)
        return EXIT_OK
    width = _width()
    print(f"key {info['key']}   stage {info['stage']}, #{info['index']} in the stream "
          f"(#{info['stage_index']} in its stage)   {info['shard']}")
    print(f"  id {info['id']}   video {info['video_id']}   source {info['source']}   "
          f"answer tokens {info['answer_tokens']}")
    print("conversation:")
    for turn in info["conversations"] or []:
        speaker = str(turn.get("from", "?")) if isinstance(turn, dict) else "?"
        value = str(turn.get("value", "")) if isinstance(turn, dict) else str(turn)
        _wrapped(f"{speaker}:", value, width)
    print("features:")
    for suffix, st in info["features"].items():
        shape = "x".join(str(d) for d in st["shape"])
        stats = ("no finite values" if st["mean"] is None else
                 f"mean {st['mean']:+.4f}  std {st['std']:.4f}  min {st['min']:+.3f}  max {st['max']:+.3f}")
        print(f"  {suffix:<10} {st['dtype']:<8} {shape:<12} {stats}  NaN {st['nan']}  inf {st['inf']}")
    if not info["features"]:
        print("  (none)")
    if "narrative" in info:
        print("narrative:")
        _wrapped("", str(info["narrative"]), width)
    for key, value in info.get("preference", {}).items():
        print(f"{key}:")
        _wrapped("", value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, indent=1), width)
    if info.get("other_fields"):
        print("other fields:")
        for key, value in info["other_fields"].items():
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            _wrapped(f"{key}:", text, width)
    print("members: " + ", ".join(f"{s} {inspection.human_bytes(n)}" for s, n in info["members"].items()))
    for path in saved:
        print(f"saved {path}")
    return EXIT_OK


def _wrapped(label: str, text: str, width: int) -> None:
    indent = "  " + " " * (len(label) + 1 if label else 2)
    lines = []
    for paragraph in text.splitlines() or [""]:
        lines += textwrap.wrap(paragraph, width=width - len(indent)) or [""]
    first = f"  {label} " if label else indent
    for i, line in enumerate(lines):
        print((first if i == 0 else indent) + line)


# ================================================================================ head

def cmd_head(shard_set: inspection.ShardSet, args: argparse.Namespace) -> int:
    stages = [args.stage] if args.stage else [st.name for st in shard_set.manifest.stages if st.samples]
    if args.stage:
        shard_set.manifest.stage(args.stage)
    if args.n == 0 or not stages or not sum(shard_set.manifest.stage(s).samples for s in stages):
        return EXIT_OK
    from dataengine.reader import ShardReader

    reader = ShardReader(shard_set.source, stages=stages, shuffle="none", prefetch_bytes=0)
    width = _width()
    if not args.json:
        print(f"{'#':>5}  {'stage':<6} {'key':<24} {'tokens':>6}  {'feat':<9} question → answer")
    for position, sample in enumerate(itertools.islice(reader, args.n)):  # never reads sample n+1
        row = sample_row(position, sample)
        if args.json:
            print(json.dumps(row, ensure_ascii=False))
            continue
        feat = "x".join(str(d) for d in row["shapes"].get("feat", [])) or "-"
        lead = f"{row['index']:>5}  {row['stage']:<6} {_clip(row['key'], 24):<24} {row['answer_tokens']!s:>6}  {feat:<9} "
        qa = f"{row['question']} → {row['answer']}"
        extra = f"  [+{', '.join(row['extra'])}]" if row["extra"] else ""
        print(lead + _clip(qa, max(20, width - len(lead) - len(extra))) + extra)
    return EXIT_OK


def sample_row(position: int, sample: dict[str, Any]) -> dict[str, Any]:
    """A compact row of a sample as the reader yields it (json dict, tensors, bytes)."""
    data = sample.get("json") or {}
    question, answer = inspection.question_and_answer(data)
    shapes = {name: list(value.shape) for name, value in sample.items() if hasattr(value, "shape")}
    return {"index": position, "stage": sample.get("stage"), "key": sample.get("key"),
            "answer_tokens": data.get("answer_tokens"), "shapes": shapes, "question": question, "answer": answer,
            "extra": sorted(k for k in data if k in ("narrative", *inspection.PREFERENCE_FIELDS)),
            "shard": sample.get("shard")}


# ================================================================================ verify

def cmd_verify(shard_set: inspection.ShardSet, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    show_bar = sys.stderr.isatty() if args.progress is None else args.progress
    bar = tqdm(total=shard_set.bytes, unit="B", unit_scale=True, desc="verify", disable=not show_bar,
               file=sys.stderr, leave=False)

    def on_problem(problem: verify.Problem) -> None:
        if not args.json:
            bar.write(f"PROBLEM {problem.kind}: {problem}", file=sys.stdout)

    try:
        result = verify.verify(shard_set, on_problem=on_problem, progress=bar.update)
    finally:
        bar.close()
    if args.json:
        _print_json(result.to_dict())
        return EXIT_OK if result.ok else EXIT_PROBLEMS
    for note in result.notes:
        print(f"note: {note}")
    what = (f"{result.shards} shards, {result.samples} samples, {inspection.human_bytes(result.bytes)} read")
    if result.ok:
        print(f"verify: OK ({what})")
        return EXIT_OK
    kinds = ", ".join(f"{k} {n}" for k, n in Counter(p.kind for p in result.problems).most_common())
    shards = len({p.shard for p in result.problems})
    print(f"verify: {len(result.problems)} problem(s) in {shards} file(s): {kinds} ({what})")
    return EXIT_PROBLEMS


# ================================================================================ report

def cmd_report(shard_set: inspection.ShardSet, args: argparse.Namespace) -> int:
    result = report.write_report(shard_set, args.out, gallery=args.gallery)
    out = {"index": str(result.path), "histogram": str(result.path.parent / report.HISTOGRAM_NAME),
           "gallery": len(result.gallery), "samples": result.summary.samples}
    if args.json:
        _print_json(out)
    else:
        print(f"report: {out['index']} ({out['samples']} samples, {out['gallery']} in the gallery); "
              "open it in any browser, it needs no network")
    return EXIT_OK


COMMAND_FUNCS = {"summary": cmd_summary, "ls": cmd_ls, "show": cmd_show, "head": cmd_head,
                 "verify": cmd_verify, "report": cmd_report}


if __name__ == "__main__":
    sys.exit(main())
