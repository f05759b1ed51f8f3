"""Does the method improve a model? Measured on a held-out synthetic world, `small` preset.

Every figure is computed on videos no stage trained on, with 95 % intervals from a bootstrap
over videos (a video's questions are resampled together); differences are paired (the same
videos for both sides). Per seed, in RUN/seed-S/:

1. **Curriculum**: SFT easy-then-hard (``sequential``) vs the same samples and steps
   shuffled together (``mixed``): accuracy on the held-out world (the paper's Table 4 direction).
2. **Judge context**: the curriculum SFT model samples two answers per training prompt and
   judges them with ``--context none | video | clips`` (the same sampled pairs for all three:
   sampling is seeded by the keys); agreement of its choice with the ground-truth preference,
   and how often its two orders agree (the paper's Table 5 direction).
3. **Reward models**: the pairs of a seeded quarter of the videos are held out. The
   AI-feedback RM trains on the clips-context pairs whose two orders agree (as a real run
   keeps them); the ground-truth RM on the same training videos' pairs labelled by the truth.
   Both are scored on the held-out pairs labelled by the truth.
4. **PPO**: from the curriculum SFT model, once against each RM; SFT vs PPO accuracy on the
   held-out world.

Goals (issue 15): the ground-truth-RM PPO beats SFT with an interval that excludes zero; the
AI-feedback PPO beats SFT; clips context beats none. The closing lines say met / not met.

Run (an hour or more on 2 CPU cores; minutes on a GPU)::

    python benchmarks/bench_method.py                       # 48 videos, 16 held out, 1 seed
    python benchmarks/bench_method.py --seeds 0 1 2 --videos 96 --device cuda
    python benchmarks/bench_method.py --size reduced        # a smaller world and fewer steps

Stages run as the ``vlmr`` commands a user runs (the ``*_small.yaml`` configs with flags on
top); a stage whose output exists is not run again, so a killed benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train import demo_summary as ds  # noqa: E402

CONFIGS = ROOT / "train" / "configs"
SIZES = {
    # videos, held-out videos, SFT epochs per stage, RM epochs, PPO steps, answer tokens
    "full": dict(videos=48, eval_videos=16, sft_epochs=2, rm_epochs=2, ppo_steps=24, new_tokens=80),
    "reduced": dict(videos=12, eval_videos=8, sft_epochs=1, rm_epochs=1, ppo_steps=4, new_tokens=48),
}


def vlmr(*args: str, log: Path) -> None:
    """One stage, as a user runs it; its output goes to ``log`` (and a line per stage to stdout)."""
    cmd = [sys.executable, "-m", "tools", *args]
    started = time.time()
    print(f"  $ vlmr {shlex.join(args)}", flush=True)
    with open(log, "a") as f:
        f.write(f"\n$ vlmr {shlex.join(args)}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"stage failed ({proc.returncode}) after {time.time() - started:.0f} s: "
                         f"vlmr {shlex.join(args)}; see {log}")
    print(f"    {time.time() - started:.0f} s", flush=True)


def once(marker: Path, run) -> None:
    if not marker.exists():
        run()


def results(eval_dir: Path, name: str) -> dict[str, list[bool]]:
    return ds.correct_by_video(ds.read_jsonl(eval_dir / name / "results.jsonl"))


def judge_agreement(pairs: Path) -> dict:
    """Truth agreement and position agreement over every judged pair (judge run with soft
    labels, so that disagreeing pairs are in the output), with intervals over videos."""
    truth_by_video: dict[str, list[bool]] = {}
    orders_by_video: dict[str, list[bool]] = {}
    masses = []
    for r in ds.pair_records(pairs):
        video = str(r["video_id"])
        orders_by_video.setdefault(video, []).append(bool(r["judge"].get("agree")))
        masses += r["judge"].get("ab_mass") or []
        pref = ds.truth_preference(r.get("qtype", ""), r["reference"], r["chosen"], r["rejected"])
        if pref:
            truth_by_video.setdefault(video, []).append(pref > 0)
    flat = [x for v in truth_by_video.values() for x in v]
    orders = [x for v in orders_by_video.values() for x in v]
    return {"truth_agreement": sum(flat) / len(flat) if flat else float("nan"),
            "truth_ci95": ds.bootstrap_ci(truth_by_video), "ranked_pairs": len(flat),
            "position_agreement": sum(orders) / len(orders) if orders else float("nan"),
            "ab_mass": sum(masses) / len(masses) if masses else float("nan"), "pairs": len(orders),
            "by_video": truth_by_video}


def split_pairs(pairs: Path, out: Path, seed: int) -> tuple[Path, Path]:
    """Held-out videos as ``vlmr train rm --eval-fraction`` draws them (train.rm.heldout_videos)."""
    from train.rm import heldout_videos

    ids = [str(r["video_id"]) for r in ds.pair_records(pairs)]
    held = heldout_videos(ids, 0.25, seed)
    train, heldout = out / "train", out / "heldout"
    if not (heldout / "manifest.json").exists():
        ds.rewrite_pairs(pairs, train, lambda d: None if d["video_id"] in held else d)
        ds.rewrite_pairs(pairs, heldout, lambda d: d if d["video_id"] in held else None)
    return train, heldout


def pct(x: float) -> str:
    return f"{100 * x:5.1f} %"


def interval(lo_hi) -> str:
    lo, hi = lo_hi
    return f"[{100 * lo:5.1f}, {100 * hi:5.1f}]"


def diff_line(label: str, d: dict) -> str:
    return (f"{label:<44} {100 * d['diff']:+6.1f} points  95 % CI [{100 * d['lo']:+.1f}, "
            f"{100 * d['hi']:+.1f}] over {d['videos']} videos")


def one_seed(run: Path, seed: int, size: dict, device: str) -> dict:
    run.mkdir(parents=True, exist_ok=True)
    log = run / "stages.log"
    n = str(size["new_tokens"])
    dev = ["--device", device]
    c = str(CONFIGS)

    # The worlds: training videos and held-out videos from seeds that never meet.
    once(run / "shards" / "manifest.json", lambda: (
        vlmr("synth", "--out", str(run / "world"), "--videos", str(size["videos"]), "--seed", str(seed), log=log),
        vlmr("build-shards", "--annotations", str(run / "world" / "annotations.json"), "--videos",
             str(run / "world" / "videos"), "--out", str(run / "shards"), "--encoder", "small", "--tokenizer",
             "small", "--frames", "8", "--clips", "3", "--clip-frames", "4", "--workers", "2", *dev, log=log)))
    once(run / "shards-eval" / "manifest.json", lambda: (
        vlmr("synth", "--out", str(run / "world-eval"), "--videos", str(size["eval_videos"]), "--seed",
             str(1000 + seed), log=log),
        vlmr("build-shards", "--annotations", str(run / "world-eval" / "annotations.json"), "--videos",
             str(run / "world-eval" / "videos"), "--out", str(run / "shards-eval"), "--encoder", "small",
             "--tokenizer", "small", "--frames", "8", "--clips", "0", "--workers", "2", *dev, log=log)))

    # 1. curriculum vs shuffled, same samples and steps
    for name, curriculum in (("sft", "sequential"), ("sft-shuffled", "mixed")):
        once(run / name / "model" / "vlmr_model.json", lambda name=name, curriculum=curriculum: vlmr(
            "train", "sft", "--config", f"{c}/sft_small.yaml", "--shards", str(run / "shards"), "--output",
            str(run / name), "--overwrite", "--curriculum", curriculum, "--epochs-per-stage",
            str(size["sft_epochs"]), "--seed", str(seed), log=log))

    # 2. narratives, then one judge run per context (soft: every judged pair is in the output)
    once(run / "narrated" / "manifest.json", lambda: vlmr(
        "narrate", "--config", f"{c}/narrate_small.yaml", "--model", str(run / "sft" / "model"), "--in",
        str(run / "shards"), "--out", str(run / "narrated"), "--overwrite", *dev, log=log))
    for context in ("none", "video", "clips"):
        once(run / f"pairs-{context}" / "manifest.json", lambda context=context: vlmr(
            "judge", "--config", f"{c}/judge_small.yaml", "--model", str(run / "sft" / "model"), "--in",
            str(run / "narrated"), "--out", str(run / f"pairs-{context}"), "--overwrite", "--context", context,
            "--disagreement", "soft", "--max-new-tokens", n, "--seed", str(seed), *dev, log=log))

    # 3. reward models: AI feedback (orders agree) vs ground truth, held-out videos apart
    train, heldout = split_pairs(run / "pairs-clips", run / "pairs-split", seed)
    once(run / "pairs-ai" / "manifest.json", lambda: ds.rewrite_pairs(
        train, run / "pairs-ai", lambda d: d if d["judge"].get("agree") else None))
    once(run / "pairs-truth" / "manifest.json", lambda: ds.write_truth_pairs(train, run / "pairs-truth"))
    once(run / "heldout-truth" / "manifest.json", lambda: ds.write_truth_pairs(heldout, run / "heldout-truth"))
    rm_eval = {}
    for name in ("ai", "truth"):
        once(run / f"rm-{name}" / "model", lambda name=name: vlmr(
            "train", "rm", "--config", f"{c}/rm_small.yaml", "--shards", str(run / f"pairs-{name}"), "--model",
            str(run / "sft" / "model"), "--output", str(run / f"rm-{name}"), "--overwrite", "--eval-fraction", "0",
            "--eval-shards", str(run / "heldout-truth"), "--epochs", str(size["rm_epochs"]), "--seed", str(seed),
            log=log))
        out = run / f"rm-{name}" / "truth_eval.json"
        once(out, lambda name=name, out=out: vlmr(
            "eval", "rm", "--model", str(run / f"rm-{name}" / "model"), "--shards", str(run / "heldout-truth"),
            "--output", str(out), log=log))
        rm_eval[name] = json.loads(out.read_text())

    # 4. PPO against each reward model, then everything on the held-out world
    for name in ("ai", "truth"):
        once(run / f"ppo-{name}" / "model" / "vlmr_model.json", lambda name=name: vlmr(
            "train", "ppo", "--config", f"{c}/ppo_small.yaml", "--shards", str(run / "shards"), "--sft",
            str(run / "sft" / "model"), "--reward-model", str(run / f"rm-{name}" / "model"), "--output",
            str(run / f"ppo-{name}"), "--overwrite", "--max-steps", str(size["ppo_steps"]), "--seed", str(seed),
            log=log))
    models = ["sft", "sft-shuffled", "ppo-ai", "ppo-truth"]
    once(run / "eval" / "summary.json", lambda: vlmr(
        "eval", "synthetic", "--config", f"{c}/eval_synthetic_small.yaml", "--shards", str(run / "shards-eval"),
        "--world", str(run / "world-eval"), "--models", *[str(run / m) for m in models], "--output",
        str(run / "eval"), "--max-new-tokens", n, *dev, log=log))

    acc = {m: results(run / "eval", m) for m in models}
    judge = {ctx: judge_agreement(run / f"pairs-{ctx}") for ctx in ("none", "video", "clips")}
    return {"accuracy": acc, "judge": judge, "rm": rm_eval}


def report(seeds: dict[int, dict]) -> dict:
    """Print the tables and the goals; returns the figures (also written to RUN/bench_method.json)."""
    merged_acc: dict[str, dict[str, list[bool]]] = {}
    merged_judge: dict[str, dict[str, list[bool]]] = {}
    for seed, r in seeds.items():
        for m, by_video in r["accuracy"].items():
            merged_acc.setdefault(m, {}).update({f"{seed}/{v}": x for v, x in by_video.items()})
        for ctx, j in r["judge"].items():
            merged_judge.setdefault(ctx, {}).update({f"{seed}/{v}": x for v, x in j["by_video"].items()})
    out: dict = {"seeds": sorted(seeds), "models": {}, "judge": {}, "rm": {}, "diffs": {}}
    print("\nheld-out accuracy (exact scoring), all seeds")
    for m, by_video in merged_acc.items():
        flat = [x for v in by_video.values() for x in v]
        ci = ds.bootstrap_ci(by_video)
        out["models"][m] = {"accuracy": sum(flat) / len(flat), "ci95": ci, "samples": len(flat)}
        print(f"  {m:<14} {pct(sum(flat) / len(flat))}  95 % CI {interval(ci)}  ({len(flat)} questions)")
    diffs = {
        "curriculum_vs_shuffled": ds.paired_bootstrap_diff(merged_acc["sft-shuffled"], merged_acc["sft"]),
        "ppo_truth_rm_vs_sft": ds.paired_bootstrap_diff(merged_acc["sft"], merged_acc["ppo-truth"]),
        "ppo_ai_rm_vs_sft": ds.paired_bootstrap_diff(merged_acc["sft"], merged_acc["ppo-ai"]),
    }
    print("\npaired differences (second minus first)")
    print("  " + diff_line("curriculum SFT - shuffled SFT", diffs["curriculum_vs_shuffled"]))
    print("  " + diff_line("PPO (ground-truth RM) - SFT", diffs["ppo_truth_rm_vs_sft"]))
    print("  " + diff_line("PPO (AI-feedback RM) - SFT", diffs["ppo_ai_rm_vs_sft"]))
    print("\njudge (the curriculum SFT model judging its own pairs), all seeds")
    for ctx, by_video in merged_judge.items():
        flat = [x for v in by_video.values() for x in v]
        per_seed = [seeds[s]["judge"][ctx] for s in seeds]
        pos = sum(j["position_agreement"] * j["pairs"] for j in per_seed) / max(sum(j["pairs"] for j in per_seed), 1)
        mass = sum(j["ab_mass"] for j in per_seed) / len(per_seed)
        agree = sum(flat) / len(flat) if flat else float("nan")
        out["judge"][ctx] = {"truth_agreement": agree, "ci95": ds.bootstrap_ci(by_video),
                             "ranked_pairs": len(flat), "position_agreement": pos, "ab_mass": mass}
        print(f"  --context {ctx:<6} agrees with truth {pct(agree)}  95 % CI {interval(ds.bootstrap_ci(by_video))}"
              f"  ({len(flat)} pairs the truth ranks); orders agree {pct(pos)}; mass on A/B {pct(mass)}")
    diffs["judge_clips_vs_none"] = ds.paired_bootstrap_diff(merged_judge["none"], merged_judge["clips"])
    print("  " + diff_line("judge truth agreement: clips - none", diffs["judge_clips_vs_none"]))
    print("\nreward models on held-out pairs labelled by ground truth")
    for name in ("ai", "truth"):
        accs = [seeds[s]["rm"][name]["accuracy"] for s in seeds]
        pairs = sum(seeds[s]["rm"][name]["pairs"] for s in seeds)
        out["rm"][name] = {"accuracy": sum(accs) / len(accs), "pairs": pairs}
        label = "AI feedback" if name == "ai" else "ground truth"
        print(f"  RM trained on {label:<13} accuracy {pct(sum(accs) / len(accs))} on {pairs} pairs")
    out["diffs"] = diffs
    goals = [("ground-truth-RM PPO beats SFT, interval excludes 0", diffs["ppo_truth_rm_vs_sft"]["lo"] > 0),
             ("AI-feedback PPO beats SFT", diffs["ppo_ai_rm_vs_sft"]["diff"] > 0),
             ("judge: clips context beats none", diffs["judge_clips_vs_none"]["diff"] > 0)]
    print("\ngoals")
    for text, met in goals:
        print(f"  {'met    ' if met else 'NOT met'}  {text}")
    out["goals"] = {text: met for text, met in goals}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench_method")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--videos", type=int, default=0, help="training videos (default: by --size)")
    parser.add_argument("--eval-videos", type=int, default=0, help="held-out videos (default: by --size)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    size = dict(SIZES[args.size])
    size["videos"] = args.videos or size["videos"]
    size["eval_videos"] = args.eval_videos or size["eval_videos"]
    out = Path(args.out)
    started = time.time()
    print(f"bench_method: {size}, seeds {args.seeds}, device {args.device} -> {out}")
    per_seed = {}
    for seed in args.seeds:
        print(f"seed {seed}")
        per_seed[seed] = one_seed(out / f"seed-{seed}", seed, size, args.device)
    figures = report(per_seed)
    figures.update(size=size, seconds=round(time.time() - started, 1), device=args.device)
    from dataengine.schema import write_text_atomic

    write_text_atomic(out / "bench_method.json", json.dumps(figures, indent=1, default=list) + "\n")
    print(f"\n{time.time() - started:.0f} s -> {out / 'bench_method.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
