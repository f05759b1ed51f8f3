"""The demo's verdict as data: ``runs/demo/summary.json`` from the files its stages wrote.

Read, never recomputed by a second copy of a stage: the held-out evaluation's per-sample
results (``eval/NAME/results.jsonl``), the judge's preference shards and counts
(``pairs/``: ``summary.json`` and the kept pairs), the reward model's held-out evaluation
(``rm/eval.json``) and its evaluation on the same held-out pairs relabelled by the
synthetic world's ground truth (``rm/truth_eval.json``, written by ``vlmr eval rm`` on the
shards :func:`write_truth_pairs` makes)::

    {"models": {"sft": {"accuracy": a, "ci95": [lo, hi], "samples": n}, "ppo": {...}},
     "judge": {"ab_mass": m, "position_agreement": p, "truth_agreement": t, "pairs": k},
     "rm": {"heldout_accuracy": h, "truth_accuracy": g}, "seconds": s}

Accuracies are fractions. ``ci95`` is a percentile bootstrap over videos (a video's
questions are resampled together: they share one set of features, so they are not
independent). ``ab_mass`` is the mean probability the judge puts on the two letters over
the kept pairs' two asks; ``position_agreement`` the share of judged pairs whose two orders
picked the same response; ``truth_agreement`` how often the judge's chosen response is the
one the ground truth prefers, over the kept pairs where the ground truth prefers one.

Ground truth prefers the answer that :func:`train.metrics.answer_correct` accepts, and
between two answers to an event question neither gets exactly right, the one with the
higher event F1 (partial credit); equal scores: no preference.

Run (``tools/demo.sh`` does)::

    python -m train.demo_summary truth-pairs --pairs runs/demo/rm/split/heldout --out runs/demo/truth-pairs
    python -m train.demo_summary summarize --run runs/demo --seconds 812
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from train import metrics

log = logging.getLogger(__name__)

EVENT_QTYPES = ("event", "order", "describe")
BOOTSTRAP_SAMPLES = 2000


# ------------------------------------------------------------------------------ ground truth

def truth_score(qtype: str, answer: str, reference: str) -> float:
    """1 for a right answer; an event answer that is not exactly right gets its event F1."""
    if metrics.answer_correct(qtype, answer, reference):
        return 1.0
    if qtype in EVENT_QTYPES:
        return float(metrics.event_f1(answer, reference) or 0.0) * 0.999  # below an exact answer
    return 0.0


def truth_preference(qtype: str, reference: str, first: str, second: str) -> int:
    """+1 when ground truth prefers ``first``, -1 when ``second``, 0 when neither."""
    a, b = truth_score(qtype, first, reference), truth_score(qtype, second, reference)
    return int(np.sign(a - b))


# ------------------------------------------------------------------------------ statistics

def bootstrap_ci(correct_by_video: Mapping[str, Sequence[bool]], samples: int = BOOTSTRAP_SAMPLES,
                 seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the accuracy, resampling videos with replacement."""
    videos = sorted(correct_by_video)
    if not videos:
        return (float("nan"), float("nan"))
    right = np.array([sum(map(bool, correct_by_video[v])) for v in videos], dtype=np.float64)
    count = np.array([len(correct_by_video[v]) for v in videos], dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(videos), size=(samples, len(videos)))
    acc = right[picks].sum(axis=1) / np.maximum(count[picks].sum(axis=1), 1.0)
    lo, hi = np.percentile(acc, [2.5, 97.5])
    return (float(lo), float(hi))


def paired_bootstrap_diff(a: Mapping[str, Sequence[bool]], b: Mapping[str, Sequence[bool]],
                          samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict[str, float]:
    """Accuracy of ``b`` minus ``a`` on the videos both were scored on, with a 95 % interval
    from resampling those videos (the same draw for both: a paired comparison)."""
    videos = sorted(set(a) & set(b))
    if not videos:
        return {"diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "videos": 0}
    ra = np.array([sum(map(bool, a[v])) for v in videos], dtype=np.float64)
    rb = np.array([sum(map(bool, b[v])) for v in videos], dtype=np.float64)
    na = np.array([len(a[v]) for v in videos], dtype=np.float64)
    nb = np.array([len(b[v]) for v in videos], dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(videos), size=(samples, len(videos)))
    diffs = rb[picks].sum(1) / nb[picks].sum(1) - ra[picks].sum(1) / na[picks].sum(1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"diff": float(rb.sum() / nb.sum() - ra.sum() / na.sum()), "lo": float(lo), "hi": float(hi),
            "videos": len(videos)}


# ------------------------------------------------------------------------------ readers

def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def correct_by_video(results: Iterable[Mapping[str, Any]]) -> dict[str, list[bool]]:
    """``{video_id: [correct, ...]}`` from ``vlmr eval synthetic``'s results.jsonl lines; a
    sample the model could not answer (no ``correct``) counts as wrong."""
    out: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        out[str(r["video_id"])].append(bool(r.get("correct", False)))
    return dict(out)


def model_summary(results_path: Path, seed: int = 0) -> dict[str, Any]:
    by_video = correct_by_video(read_jsonl(results_path))
    flat = [c for values in by_video.values() for c in values]
    return {"accuracy": float(np.mean(flat)) if flat else float("nan"),
            "ci95": list(bootstrap_ci(by_video, seed=seed)), "samples": len(flat)}


def pair_records(pairs: str | Path) -> list[dict[str, Any]]:
    """The ``json`` member of every pair in a preference shard set."""
    from dataengine.reader import ShardReader
    from dataengine.schema import Manifest

    if Manifest.load(pairs).samples == 0:  # a judge that kept no pair (the reader refuses an empty set)
        return []
    return [s["json"] for s in ShardReader(str(pairs), stages=["pairs"], shuffle="none", fields=("json",))]


def judge_summary(pairs_dir: Path) -> dict[str, Any]:
    """Judge statistics from ``vlmr judge``'s output folder (its summary.json and pair shards)."""
    outcomes = json.loads((pairs_dir / "summary.json").read_text()).get("outcomes", {})
    agreed = outcomes.get("kept", 0)
    judged = agreed + outcomes.get("kept_soft", 0) + outcomes.get("dropped_disagreement", 0)
    records = pair_records(pairs_dir)
    masses = [m for r in records for m in (r.get("judge", {}).get("ab_mass") or [])]
    # Dropped pairs were judged too: their asks' mass on the letters is in failures.jsonl.
    failures = pairs_dir / "failures.jsonl"
    if failures.exists():
        masses += [m for f in read_jsonl(failures) if f.get("reason") == "dropped_disagreement"
                   for m in (f.get("ab_mass") or [])]
    prefs = [truth_preference(r.get("qtype", ""), r["reference"], r["chosen"], r["rejected"]) for r in records]
    decided = [p for p in prefs if p != 0]
    return {"ab_mass": float(np.mean(masses)) if masses else None,
            "position_agreement": agreed / judged if judged else None,
            "truth_agreement": sum(p > 0 for p in decided) / len(decided) if decided else None,
            "pairs": len(records)}


def rm_summary(rm_dir: Path) -> dict[str, Any]:
    def accuracy(name: str) -> float | None:
        path = rm_dir / name
        return json.loads(path.read_text()).get("accuracy") if path.exists() else None

    return {"heldout_accuracy": accuracy("eval.json"), "truth_accuracy": accuracy("truth_eval.json")}


def summarize(run: Path, seconds: float, models: Sequence[str] = ("sft", "ppo")) -> dict[str, Any]:
    """The verdict; a model the demo did not get to (no PPO when the judge kept no pair) is null."""
    results = {name: run / "eval" / name / "results.jsonl" for name in models}
    return {"models": {name: model_summary(path) if path.exists() else None for name, path in results.items()},
            "judge": judge_summary(run / "pairs"), "rm": rm_summary(run / "rm"), "seconds": round(seconds, 1)}


def format_summary(summary: Mapping[str, Any]) -> str:
    def pct(x: Any) -> str:
        return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f} %"

    lines = ["model   accuracy   95 % CI (videos)      samples"]
    for name, m in summary["models"].items():
        if m is None:
            lines.append(f"{name:<7} not trained (see above)")
            continue
        lo, hi = m["ci95"]
        lines.append(f"{name:<7} {pct(m['accuracy']):>8}   [{pct(lo)}, {pct(hi)}]   {m['samples']:>7}")
    j, r = summary["judge"], summary["rm"]
    lines += [f"judge: mass on A/B {pct(j['ab_mass'])}, orders agree {pct(j['position_agreement'])}, "
              f"agrees with ground truth {pct(j['truth_agreement'])} (pairs the truth ranks), "
              f"{j['pairs']} pairs kept",
              f"reward model: held-out accuracy {pct(r['heldout_accuracy'])} (judge's labels), "
              f"{pct(r['truth_accuracy'])} (ground-truth labels)",
              f"demo time: {summary['seconds']:.0f} s"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ truth-labelled pairs

def rewrite_pairs(pairs: str | Path, out: Path, relabel: Callable[[dict[str, Any]], dict[str, Any] | None],
                  stage: str = "pairs") -> dict[str, int]:
    """Copy a preference shard set through ``relabel`` (a pair's json -> new json, or None to
    leave it out). Members kept: ``json`` and ``feat`` (what the reward model reads)."""
    from dataengine.pack import ShardWriter
    from dataengine.reader import ShardReader
    from dataengine.schema import Manifest

    counts = {"kept": 0, "left_out": 0}
    writer = ShardWriter(out, stage)
    try:
        for sample in ShardReader(str(pairs), stages=[stage], shuffle="none", fields=("json", "feat")):
            data = relabel(dict(sample["json"]))
            if data is None:
                counts["left_out"] += 1
                continue
            writer.write({"__key__": sample["key"], "json": data, "feat.npy": sample["feat"].numpy()})
            counts["kept"] += 1
    except BaseException:
        writer.abort()
        raise
    Manifest(settings={"rewritten_from": str(pairs), **counts}, samples=counts["kept"],
             stages=[writer.close()], derived_from=str(pairs)).save(out)
    return counts


def truth_relabel(data: dict[str, Any]) -> dict[str, Any] | None:
    """The pair with the response ground truth prefers as ``chosen`` (label 1, no soft label);
    None when the truth ranks neither above the other."""
    pref = truth_preference(data.get("qtype", ""), data["reference"], data["chosen"], data["rejected"])
    if pref == 0:
        return None
    if pref < 0:
        data["chosen"], data["rejected"] = data["rejected"], data["chosen"]
    judge = {k: v for k, v in data.get("judge", {}).items() if k != "soft_label"}
    data["judge"] = dict(judge, label_source="ground_truth", judge_agreed_with_truth=pref > 0)
    return data


def write_truth_pairs(pairs: str | Path, out: Path) -> dict[str, int]:
    """Relabel a preference shard set by ground truth (:func:`truth_relabel`): to measure a
    reward model against the truth, and to train the reference reward model of
    ``benchmarks/bench_method.py`` (an upper bound for the AI-feedback one)."""
    counts = rewrite_pairs(pairs, out, truth_relabel)
    return {"kept": counts["kept"], "unranked": counts["left_out"]}


# ------------------------------------------------------------------------------ command

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.demo_summary", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("truth-pairs", help="relabel preference shards by the synthetic world's ground truth")
    t.add_argument("--pairs", required=True, help="preference shard set (folder or manifest.json)")
    t.add_argument("--out", required=True, help="output folder")
    s = sub.add_parser("summarize", help="print the demo's verdict and write RUN/summary.json")
    s.add_argument("--run", required=True, help="the demo's run folder")
    s.add_argument("--seconds", type=float, required=True, help="wall time of the whole demo")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.command == "truth-pairs":
        counts = write_truth_pairs(args.pairs, Path(args.out))
        print(f"ground-truth pairs -> {args.out}: {counts}")
        return 0
    from dataengine.schema import write_text_atomic

    run = Path(args.run)
    summary = summarize(run, args.seconds)
    write_text_atomic(run / "summary.json", json.dumps(summary, indent=1) + "\n")
    print(format_summary(summary))
    print(f"-> {run / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
