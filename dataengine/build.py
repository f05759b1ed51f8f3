"""``vlmr build-shards``: annotations + videos → curriculum-sorted WebDataset shards.

Phases, each a pass with its own progress bar::

    ingest   annotation files → records (format detected by content); videos given as
             webdataset shards (video2dataset's KEY.mp4 + KEY.json/KEY.txt) are unpacked first,
             and their captions are the records when no annotations are given
    resolve  video ids → files under --videos (with or without extension)
    encode   per video not yet cached: ffmpeg decode (process pool) → CLIP → pooled features
    pack     sort by answer tokens → easy / hard → tars (temp name → rename) → manifest (last)

A broken video (missing, empty, corrupt, audio-only) is written to ``failures.jsonl`` with its
reason and the number of samples left out; the build goes on. Re-running after a kill
re-encodes nothing already cached and produces byte-identical shards.

Before any of it: --out and the cache must take files (else one line naming the path), and
the build holds ``OUT/.vlmr.lock`` (:mod:`dataengine.lock`): a second build into the same
folder is refused, naming this one.

Run::

    vlmr build-shards --annotations data/ann.json --videos data/videos --out shards/NAME
    # many processes / nodes: each rank encodes a disjoint slice, rank 0 packs
    torchrun --nproc_per_node 2 -m dataengine.build --annotations ... --videos ... --out ...
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from tqdm import tqdm

from dataengine import config as cfg
from dataengine import decode, dist, features, ingest, lock, models, pack, schema

log = logging.getLogger(__name__)

STAGED_VIDEOS = ".staged-videos"
"""Under --out: videos unpacked from webdataset shards for the decoder, while the build runs."""


@dataclass
class BuildConfig:
    """Build curriculum-sorted WebDataset shards from annotations and videos."""

    annotations: list[str] = field(default_factory=list)
    """Annotation files: Video-ChatGPT JSON, LLaVA JSON/JSONL, NExT-QA CSV, or Hugging Face datasets
    (a save_to_disk folder, parquet, JSON/CSV with video/question/answer columns); detected by content.
    Optional when --videos are shards with captions (each caption becomes a description sample)."""
    videos: str = ""
    """Folder holding the videos (searched recursively; ids match with or without extension), or
    webdataset shards of videos as video2dataset writes them (a .tar, or a folder of .tar files
    holding KEY.mp4 + KEY.json/KEY.txt; the video id is KEY)."""
    out: str = "shards/demo"
    """Output folder for the tars, manifest.json and failures.jsonl."""
    encoder: str = models.TINY
    """Vision encoder: 'tiny', 'small' (EfficientNet-Lite0 ImageNet feature map) or a local CLIP folder
    (e.g. a saved CLIP ViT-L/14)."""
    tokenizer: str = models.TINY
    """Tokenizer that measures answer length: 'tiny' or a local folder (use the LMM's own)."""
    frames: int = 50
    """Frames sampled uniformly over each video for `feat`."""
    clips: int = 3
    """Consecutive clips per video for `clips` (narratives); 0 omits clips (SFT-only sets)."""
    clip_frames: int = 20
    """Frames sampled uniformly within each clip."""
    easy_fraction: float | None = None
    """Share of samples (shortest answers first) in stage 'easy' (default 0.65, the paper's split)."""
    split_at: int | None = None
    """Alternative to --easy-fraction: answers of at most this many tokens are 'easy'."""
    maxcount: int = 1000
    """Most samples per tar."""
    maxsize_mb: float = 1024.0
    """Most megabytes per tar (a shard closes before it would grow past this)."""
    workers: int = 2
    """Decoding processes (ffmpeg runs in each)."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where the encoder runs; under torchrun each rank uses cuda:LOCAL_RANK."""
    batch_size: int = 64
    """Frames per encoder batch."""
    cache: str = ""
    """Feature cache folder (default: $VLMR_CACHE/features). Shared across builds and ranks."""
    on_error: Literal["raise", "skip"] = "raise"
    """Malformed annotation records: stop with the file and record index, or skip and count them."""
    seed: int = 0
    """Recorded in the manifest; the build itself is deterministic without randomness."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        cfg.check(problems, bool(self.annotations) or (bool(self.videos) and bool(ingest.video_shards(self.videos))),
                  "--annotations: at least one file is required (unless --videos are shards with captions)")
        cfg.check(problems, bool(self.videos), "--videos: the videos folder is required")
        cfg.check(problems, self.frames >= 1, f"--frames must be >= 1, got {self.frames}")
        cfg.check(problems, self.clips >= 0, f"--clips must be >= 0, got {self.clips}")
        cfg.check(problems, self.clip_frames >= 1, f"--clip-frames must be >= 1, got {self.clip_frames}")
        cfg.check(problems, not (self.easy_fraction is not None and self.split_at is not None),
                  "give --easy-fraction or --split-at, not both")
        if self.easy_fraction is not None:
            cfg.check(problems, 0.0 <= self.easy_fraction <= 1.0,
                      f"--easy-fraction must be in [0, 1], got {self.easy_fraction}")
        if self.split_at is not None:
            cfg.check(problems, self.split_at >= 0, f"--split-at must be >= 0, got {self.split_at}")
        cfg.check(problems, self.maxcount >= 1, f"--maxcount must be >= 1, got {self.maxcount}")
        cfg.check(problems, self.maxsize_mb > 0, f"--maxsize-mb must be > 0, got {self.maxsize_mb}")
        cfg.check(problems, self.workers >= 0, f"--workers must be >= 0, got {self.workers}")
        cfg.check(problems, self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        cfg.raise_problems(problems, "build-shards settings")

    @property
    def split(self) -> pack.Split:
        if self.split_at is not None:
            return pack.Split(easy_fraction=None, split_at=self.split_at)
        return pack.Split(easy_fraction=0.65 if self.easy_fraction is None else self.easy_fraction)


@dataclass
class BuildSummary:
    videos_ok: int = 0
    videos_failed: int = 0
    videos_encoded: int = 0
    """Videos decoded and encoded in this run (the rest came from the cache)."""
    samples: dict[str, int] = field(default_factory=dict)
    samples_dropped: int = 0
    records_skipped: int = 0
    shards: int = 0
    bytes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    failure_reasons: Counter = field(default_factory=Counter)

    def lines(self) -> list[str]:
        stages = ", ".join(f"{k} {v}" for k, v in self.samples.items()) or "none"
        times = ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
        reasons = ", ".join(f"{k} {v}" for k, v in self.failure_reasons.most_common()) or "none"
        return [
            f"videos: {self.videos_ok} ok, {self.videos_failed} failed ({reasons}); "
            f"{self.videos_encoded} encoded now, {self.videos_ok - self.videos_encoded} from cache",
            f"samples: {stages}; {self.samples_dropped} left out with failed videos, "
            f"{self.records_skipped} malformed records skipped",
            f"shards: {self.shards}, {self.bytes / 1e6:.1f} MB",
            f"time: {times}",
        ]


# ----------------------------------------------------------------------------- phases

@dataclass
class VideoJob:
    """One file to decode, and every video id that resolves to it (``v1`` and ``v1.mp4``)."""

    video_ids: dict[str, int]
    """Video id -> number of samples that reference it."""
    path: Path | None
    cache_key: str = ""

    @property
    def name(self) -> str:
        return ", ".join(self.video_ids)

    @property
    def samples(self) -> int:
        return sum(self.video_ids.values())


def plan_jobs(per_video: Counter, index: dict[str, Path]) -> list[VideoJob]:
    """One job per distinct file (ids that name the same file share it); unresolved ids each get one."""
    by_file: dict[str, VideoJob] = {}
    for video_id, samples in sorted(per_video.items()):
        path = ingest.resolve_video(video_id, index)
        slot = str(path.resolve()) if path is not None else f"missing:{video_id}"
        by_file.setdefault(slot, VideoJob({}, path)).video_ids[video_id] = samples
    return list(by_file.values())


def decode_settings(config: BuildConfig, encoder_identity: str, image_size: int) -> dict[str, Any]:
    """Everything that changes the cached features of a video besides its bytes."""
    return {"frames": config.frames, "clips": config.clips, "clip_frames": config.clip_frames,
            "size": image_size, "encoder": encoder_identity, "pooling": "vcg-mean/1",
            "decoder": decode.DECODER_VERSION}


def encode_videos(jobs: list[VideoJob], config: BuildConfig, cache: features.FeatureCache,
                  encoder: features.Encoder, settings: dict[str, Any], *,
                  show_progress: bool = True) -> Iterator[tuple[VideoJob, str | None, str]]:
    """Decode and encode each job not in the cache; yields (job, failure reason or None, message).

    Hashing comes first so that cached videos are never decoded; decoding runs in a process
    pool while this process encodes.
    """
    todo: list[VideoJob] = []
    for job in tqdm(jobs, desc="hash", unit="video", disable=not show_progress, leave=False):
        if job.path is None:
            yield job, "missing", f"video {job.name!r} not found under {config.videos}"
            continue
        try:
            job.cache_key = cache.key(decode.sha256_file(job.path), settings)
        except OSError as exc:
            yield job, "unreadable", f"{job.path}: {exc}"
            continue
        if cache.has(job.cache_key):
            yield job, None, "cached"
        else:
            todo.append(job)
    results = decode.decode_many([job.path for job in todo], workers=config.workers,
                                 frames=config.frames, clips=config.clips,
                                 clip_frames=config.clip_frames, size=encoder.image_size)
    # decode_many yields in input order, so results pair with jobs one to one.
    for job, (_, result) in tqdm(zip(todo, results), total=len(todo), desc="decode+encode", unit="video",
                                 disable=not show_progress):
        if isinstance(result, decode.DecodeError):
            yield job, result.reason, str(result)
            continue
        clips = result.clips if config.clips > 0 else None
        feat, clip_feats = features.encode_video(encoder, result.frames, clips)
        thumb = decode.contact_sheet(result.frames)
        with naming_path(cache.root):
            cache.put(job.cache_key, features.CachedFeatures(feat=feat, clips=clip_feats, thumb=thumb))
        yield job, None, "encoded"


def sample_json(record: ingest.Record, answer_tokens: int, stage: str) -> dict[str, Any]:
    data = {k: v for k, v in record.extra.items()}
    data.update(id=record.id, video_id=record.video_id, source=record.source,
                conversations=record.conversations, answer_tokens=answer_tokens, stage=stage)
    return data


def answer_token_counts(records: list[ingest.Record], tokenizer) -> list[int]:
    """Answer length in tokenizer tokens: all assistant turns of a conversation together."""
    counts = []
    for record in tqdm(records, desc="tokenize", unit="sample", leave=False, disable=len(records) < 2000):
        counts.append(sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in record.answers()))
    return counts


def pack_samples(ordered: list[tuple[ingest.Record, int]], keys: dict[str, str], cut: int,
                 config: BuildConfig, cache: features.FeatureCache) -> list[schema.StageInfo]:
    """Write easy then hard samples; features come from the cache one sample at a time."""
    last: tuple[str, features.CachedFeatures] | None = None  # samples of one video often sit close

    def samples(part: list[tuple[ingest.Record, int]], stage: str) -> Iterator[dict[str, Any]]:
        nonlocal last
        for record, tokens in part:
            key = keys[record.video_id]
            if last is None or last[0] != key:
                last = (key, cache.get(key))
            cached = last[1]
            sample = {"__key__": schema.sample_key(record.id), schema.JSON: sample_json(record, tokens, stage),
                      schema.FEAT: cached.feat}
            if cached.clips is not None:
                sample[schema.CLIPS] = cached.clips
            sample[schema.THUMB] = cached.thumb
            yield sample

    stages = [(schema.STAGE_EASY, ordered[:cut]), (schema.STAGE_HARD, ordered[cut:])]
    maxsize = int(config.maxsize_mb * 1e6)
    with tqdm(total=len(ordered), desc="pack", unit="sample") as bar:
        def counted(part, stage):
            for s in samples(part, stage):
                yield s
                bar.update(1)
        return pack.write_stages(config.out, [(name, counted(part, name)) for name, part in stages],
                                 maxcount=config.maxcount, maxsize=maxsize)


@contextlib.contextmanager
def naming_path(path: str | os.PathLike):
    """Give an OSError that names no file (a failed write: ENOSPC, EIO) the path being written."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def writable_folder(path: Path, what: str) -> None:
    """Create ``path`` if needed and prove a file can be written there; an OSError naming
    the path (and, when a parent is a file, that parent) otherwise."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OSError(errno.ENOTDIR, f"{what}: {existing} is a file, not a folder", str(path))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, f"{what}: cannot create this folder ({exc.strerror})", str(path)) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OSError(exc.errno, f"{what}: cannot write here ({exc.strerror})", str(path)) from None


def check_outputs(config: BuildConfig) -> None:
    """Before any long work: the output and cache folders exist (or can be made) and take files."""
    writable_folder(Path(config.out), "--out")
    writable_folder(cache_folder(config), "--cache")


def cache_folder(config: BuildConfig) -> Path:
    return Path(config.cache) if config.cache else models.cache_root() / "features"


def describe_os_error(exc: OSError) -> str:
    """One line naming the path: ``PATH: what went wrong``."""
    if exc.filename is None:
        return str(exc)
    return f"{exc.filename}: {exc.strerror or exc}"


def build(config: BuildConfig, ranks: dist.Ranks | None = None) -> BuildSummary:
    """The whole build; returns its summary (rank 0 holds the complete one).

    Rank 0 holds the output folder's lock (:mod:`dataengine.lock`) for the whole build, so
    a second build into the same ``--out`` is refused before it touches anything; the other
    ranks start once it holds it.
    """
    ranks = ranks or dist.Ranks(device=dist.pick_device(config.device))
    check_outputs(config)
    if not ranks.is_main:
        ranks.barrier()  # rank 0 holds the lock
        return build_locked(config, ranks)
    with lock.FolderLock(config.out, command="build-shards"):
        ranks.barrier()
        return build_locked(config, ranks)


def stage_videos(config: BuildConfig, ranks: dist.Ranks) -> tuple[Path, list[str]]:
    """The videos folder and annotation files of the build. Videos given as webdataset shards
    are unpacked by rank 0 into ``OUT/.staged-videos`` (removed when the build is done); their
    captions are the annotations when none are given."""
    shards = ingest.video_shards(config.videos)
    if not shards:
        return Path(config.videos), list(config.annotations)
    staged = Path(config.out) / STAGED_VIDEOS
    if ranks.is_main:
        with naming_path(staged):
            ingest.stage_video_shards(shards, staged)
    ranks.barrier()
    captions = staged / ingest.CAPTIONS_NAME
    if not config.annotations and not captions.read_text(encoding="utf-8").strip():
        raise ingest.IngestError(f"{config.videos}: no --annotations given, and its shards hold no captions "
                                 "(KEY.txt, or a 'caption' in KEY.json) to make samples from")
    return staged / "videos", list(config.annotations) or [str(captions)]


def build_locked(config: BuildConfig, ranks: dist.Ranks) -> BuildSummary:
    summary = BuildSummary()
    out = Path(config.out)

    t0 = time.perf_counter()
    stats = ingest.IngestStats()
    videos, annotations = stage_videos(config, ranks)
    records = ingest.read_all(annotations, on_error=config.on_error, stats=stats)
    summary.records_skipped = stats.skipped
    index = ingest.index_videos(videos)
    per_video = Counter(r.video_id for r in records)
    jobs = plan_jobs(per_video, index)
    summary.seconds["ingest"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    encoder = features.load_encoder(config.encoder, device=str(ranks.device), batch_size=config.batch_size)
    cache = features.FeatureCache(cache_folder(config))
    settings = decode_settings(config, encoder.identity, encoder.image_size)
    mine = jobs[ranks.rank::ranks.world_size]
    outcomes = []
    for job, reason, message in encode_videos(mine, config, cache, encoder, settings,
                                              show_progress=ranks.is_main):
        outcomes += [{"video_id": video_id, "path": str(job.path) if job.path else None, "samples": samples,
                      "key": job.cache_key, "reason": reason, "message": message}
                     for video_id, samples in job.video_ids.items()]
        if reason is not None:
            log.warning("left out %d sample(s) of %s: %s", job.samples, job.name, message)
    summary.seconds["encode"] = time.perf_counter() - t0
    if ranks.world_size > 1:
        # Each rank leaves its outcomes beside the output; rank 0 merges them after the barrier.
        schema.write_text_atomic(out / f".outcomes-rank{ranks.rank}.jsonl",
                                 "".join(json.dumps(o) + "\n" for o in outcomes))
        ranks.barrier()
        if not ranks.is_main:
            return summary
        outcomes = []
        for r in range(ranks.world_size):
            path = out / f".outcomes-rank{r}.jsonl"
            outcomes += [json.loads(line) for line in path.read_text().splitlines()]
            path.unlink()

    t0 = time.perf_counter()
    failed = {o["video_id"]: o for o in outcomes if o["reason"] is not None}
    keys = {o["video_id"]: o["key"] for o in outcomes if o["reason"] is None}
    summary.videos_ok = len({o["key"] for o in outcomes if o["reason"] is None})
    summary.videos_failed = len({o["path"] or o["video_id"] for o in failed.values()})
    summary.videos_encoded = len({o["key"] for o in outcomes if o["message"] == "encoded"})
    summary.failure_reasons = Counter(o["reason"] for o in failed.values())
    summary.samples_dropped = sum(o["samples"] for o in failed.values())

    # An old manifest would describe tars that are about to be replaced: drop it first.
    (out / schema.MANIFEST_NAME).unlink(missing_ok=True)
    kept = [r for r in records if r.video_id in keys]
    tokenizer = models.load_tokenizer(config.tokenizer)
    counts = answer_token_counts(kept, tokenizer)
    ordered = pack.order_samples(list(zip(kept, counts)), answer_tokens=lambda rt: rt[1],
                                 key=lambda rt: schema.sample_key(rt[0].id))
    cut = config.split.cut([t for _, t in ordered])
    with naming_path(out):
        stages = pack_samples(ordered, keys, cut, config, cache)
    failure_lines = [{"video_id": o["video_id"], "path": o["path"], "reason": o["reason"],
                      "message": o["message"], "samples": o["samples"]}
                     for o in sorted(failed.values(), key=lambda o: o["video_id"])]
    failure_lines += stats.failures
    schema.write_text_atomic(out / schema.FAILURES_NAME,
                             "".join(json.dumps(line, sort_keys=True) + "\n" for line in failure_lines))
    manifest = schema.Manifest(
        settings={"command": "build-shards", **cfg.to_dict(config),
                  "split": {"easy_fraction": config.split.easy_fraction, "split_at": config.split.split_at},
                  "encoder_identity": encoder.identity, "image_size": encoder.image_size,
                  "annotation_formats": stats.formats},
        samples=len(ordered), failures=len(failure_lines), stages=stages)
    pack.remove_stale_shards(out, keep=[s.url for st in stages for s in st.shards])
    manifest.save(out)
    shutil.rmtree(out / STAGED_VIDEOS, ignore_errors=True)
    summary.seconds["pack"] = time.perf_counter() - t0
    summary.samples = {st.name: st.samples for st in stages}
    summary.shards = sum(len(st.shards) for st in stages)
    summary.bytes = sum(s.bytes for st in stages for s in st.shards)
    return summary


def main(argv: list[str] | None = None, prog: str = "vlmr build-shards") -> int:
    """Exit status: 0 built; 1 an input or output problem (named in one line); 2 bad settings;
    3 an internal failure of the decoder (a bug of ours, with the ffmpeg command)."""
    try:
        config = cfg.parse_config(BuildConfig, argv, prog=prog)
    except cfg.ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    created = dist.init("gloo")  # the ranks only meet at barriers; features travel through the cache
    ranks = dist.Ranks.from_env(config.device)
    try:
        summary = build(config, ranks)
    except (ingest.IngestError, lock.FolderLocked) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a path that cannot be read or written, a full disk: one line, no traceback
        print(f"{prog}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except decode.InternalDecodeError as exc:  # our bug, not the input's: its own exit status
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 3
    finally:
        if created:
            dist.close()
    if ranks.is_main:
        print(f"built {config.out}")
        for line in summary.lines():
            print("  " + line)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
