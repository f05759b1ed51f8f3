"""``vlmr narrate``: caption every clip of every video with the SFT model -> shards with narratives.

The paper's context (§3.1, Appendix D): a video is cut into clips (build-shards stores their
pooled features as ``clips``, K x (F+P) x D), the SFT model captions each clip with the
prompt of ``train/prompts/narrate.txt`` ("Describe this video in detail."), and the
captions joined in clip order are the video's *narrative*. Each output sample is its input
sample with three json fields added::

    narrative_clips   [caption of clip 1, ..., caption of clip K]   (clip order)
    narrative         the clip captions joined with spaces            (context "clips" of vlmr judge)
    narrative_video   one caption of the whole video (``feat``)      (context "video"; --no-whole-video omits it)

Captions are greedy (deterministic) and generated in batches with the KV cache (all clips of
the videos of ``batch_size`` samples in one ``generate`` call, at most ``batch_rows`` rows).

**Each video once.** Videos repeat across samples (8 questions per video is common) and
samples of one video lie all over the stream (it is sorted by answer length), so each rank
keeps the captions of the videos it has seen (``cache_videos`` of them, least recently used
dropped) and captions a video only the first time. Ranks split *samples*, not videos, so
two ranks may both caption a video: routing samples by video would need a pass over all of
them before the first caption. The duplicates are counted (``videos captioned more than
once`` in the summary, which also counts videos captioned again after a resume). Greedy
captions of a video do not depend on which rank makes them.

The output is a shard set with the input's layout (same stages, one output shard per unit
of the input, see ``train/shardpass.py``), resumable after a kill, on any number of ranks.

Run::

    vlmr narrate --model runs/sft/model --in shards/demo --out shards/demo-narrated
    vlmr narrate --config train/configs/narrate_tiny.yaml
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m train.narrate --model ... --in ... --out ...
    # after a kill: the same command again (finished shards are kept)

Tests: ``pytest tests/test_narrate.py``.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Protocol, Sequence

import torch

from dataengine import config as cfg
from dataengine.dist import Ranks
from train import shardpass
from train.prompt_files import PROMPTS, load_prompt
from train.shardpass import Outcome, PassSummary

log = logging.getLogger(__name__)

DEFAULT_PROMPT = PROMPTS / "narrate.txt"
VIDEO_TOKEN = "<video>"


@dataclass
class NarrateConfig:
    """Caption each clip of each video with the SFT model; add the narrative to every sample."""

    model: str = ""
    """SFT model folder (saved by `vlmr train sft`, e.g. runs/sft/model)."""
    input: str = ""
    """Prompt shards (`vlmr build-shards` output, with clips): folder or manifest.json. `--in` works too."""
    out: str = ""
    """Output shard folder (same stages as the input, narratives added)."""
    stages: list[str] = field(default_factory=list)
    """Input stages to read, in this order (default: every stage of the input, in manifest order)."""
    prompt: str = ""
    """Caption prompt file (default: train/prompts/narrate.txt)."""
    max_new_tokens: int = 128
    """Most tokens per caption."""
    batch_size: int = 8
    """Samples per batch: the clips of their not-yet-captioned videos go to the model together."""
    batch_rows: int = 32
    """Most prompts in one generate call."""
    whole_video: bool = True
    """Also caption the whole video (`feat`) once: `narrative_video`, the context 'video' of vlmr judge."""
    cache_videos: int = 100000
    """Videos whose captions a rank keeps (least recently used dropped beyond this)."""
    samples_per_shard: int = 256
    """Most samples per output shard (one shard per run of this many input samples: the unit of resume)."""
    max_length: int = 0
    """Longest sequence the model may see, video rows and caption included (0: the LM's own limit)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model runs; under torchrun each rank takes cuda:LOCAL_RANK."""
    dtype: str = ""
    """Compute dtype of the base LM: float32 or bfloat16 (default: as the model was saved)."""
    on_error: Literal["raise", "skip"] = "raise"
    """Unreadable samples or samples without clips: stop naming the shard and key, or skip and count them."""
    overwrite: bool = False
    """Replace an output folder that holds another run (otherwise a rerun resumes)."""
    progress: bool = True
    """Show a progress bar (rank 0)."""

    def __post_init__(self) -> None:
        p: list[str] = []
        cfg.check(p, bool(self.model), "--model: the SFT model folder is required")
        cfg.check(p, bool(self.input), "--in: the input shard set is required")
        cfg.check(p, bool(self.out), "--out: the output folder is required")
        cfg.check(p, self.max_new_tokens >= 1, "--max-new-tokens must be >= 1")
        cfg.check(p, self.batch_size >= 1 and self.batch_rows >= 1, "--batch-size and --batch-rows must be >= 1")
        cfg.check(p, self.cache_videos >= 0, "--cache-videos must be >= 0")
        cfg.check(p, self.samples_per_shard >= 1, "--samples-per-shard must be >= 1")
        cfg.check(p, self.max_length >= 0, "--max-length must be >= 0")
        cfg.check(p, self.dtype in ("", "float32", "bfloat16", "float16"),
                  f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        cfg.raise_problems(p, "narrate settings")


# Settings that do not change what is written (left out of the resume check).
NOT_IDENTITY = ("model", "input", "out", "device", "overwrite", "progress", "batch_rows", "cache_videos")


# ---------------------------------------------------------------------------- prompts

def clean_text(text: str) -> str:
    """Generated text as stored: the video placeholder removed (a later prompt holding it would
    splice the video twice), whitespace trimmed."""
    return text.replace(VIDEO_TOKEN, " ").strip()


def context_length(model, requested: int) -> int:
    """``requested``, or (0) the LM's ``max_position_embeddings``."""
    if requested:
        return requested
    limit = getattr(model.lm.config, "max_position_embeddings", None)
    if not limit:
        raise ValueError("the LM config has no max_position_embeddings; pass --max-length")
    return int(limit)


# ---------------------------------------------------------------------------- captioners

class Captioner(Protocol):
    """Captions videos given as feature rows; ``name`` says who captioned (recorded)."""

    name: str

    def caption(self, feats: Sequence[torch.Tensor]) -> list[str | None]:
        """One caption per (N, D) feature tensor, or None when it does not fit the model."""
        ...


class ModelCaptioner:
    """Greedy captions from a :class:`train.model.VideoLMM`, batched by feature shape."""

    def __init__(self, model, prompt: str, *, max_new_tokens: int, batch_rows: int, max_length: int,
                 name: str):
        self.model = model
        self.prompt = prompt
        self.prompt_ids = model.chat.prompt_ids(prompt)
        self.max_new_tokens = max_new_tokens
        self.batch_rows = batch_rows
        self.max_length = max_length
        self.name = name
        self.unfinished = 0
        """Captions cut at max_new_tokens (no EOS)."""

    def fits(self, rows: int) -> bool:
        # The <video> placeholder is one token of prompt_ids and becomes `rows` rows.
        return len(self.prompt_ids) - 1 + rows + self.max_new_tokens <= self.max_length

    def caption(self, feats: Sequence[torch.Tensor]) -> list[str | None]:
        out: list[str | None] = [None] * len(feats)
        by_shape: dict[tuple[int, ...], list[int]] = collections.defaultdict(list)
        for i, f in enumerate(feats):
            if self.fits(int(f.shape[0])):
                by_shape[tuple(f.shape)].append(i)
        for indices in by_shape.values():
            # Same shape, so no padding: a caption depends on its own rows only (up to float rounding).
            for lo in range(0, len(indices), self.batch_rows):
                chunk = indices[lo:lo + self.batch_rows]
                gen = self.model.generate(torch.stack([feats[i] for i in chunk]), [self.prompt_ids] * len(chunk),
                                          max_new_tokens=self.max_new_tokens, do_sample=False)
                for i, text, ended in zip(chunk, gen.texts, gen.ended):
                    out[i] = clean_text(text)
                    self.unfinished += not ended
        return out


# ---------------------------------------------------------------------------- the pass

@dataclass
class _Captions:
    clips: list[str] | None
    """None: a clip did not fit the model."""
    video: str | None


class NarrateWork:
    """The narrate pass over one rank's units (see :class:`train.shardpass.PassWork`)."""

    command = "narrate"

    def __init__(self, captioner: Captioner, *, batch_size: int, whole_video: bool, cache_videos: int,
                 on_error: str):
        self.captioner = captioner
        self.batch_size = batch_size
        self.whole_video = whole_video
        self.cache_videos = cache_videos
        self.on_error = on_error
        self.cache: collections.OrderedDict[str, _Captions] = collections.OrderedDict()
        self._captioned: list[str] = []
        self._cache_hits = 0

    # -- per unit ---------------------------------------------------------------------------
    def process(self, samples: Iterator[dict[str, Any]]) -> Iterator[Outcome]:
        batch: list[dict[str, Any]] = []
        for sample in samples:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield from self._batch(batch)
                batch = []
        if batch:
            yield from self._batch(batch)

    def unit_extras(self) -> dict[str, Any]:
        extras = {"videos_captioned": self._captioned, "cache_hits": self._cache_hits}
        self._captioned, self._cache_hits = [], 0
        return extras

    def merge_extras(self, extras: Sequence[dict[str, Any]]) -> dict[str, Any]:
        captioned = [v for e in extras for v in e.get("videos_captioned", [])]
        distinct = len(set(captioned))
        return {"videos": distinct, "videos captioned": len(captioned),
                "videos captioned more than once": len(captioned) - distinct,
                "cache hits": sum(e.get("cache_hits", 0) for e in extras)}

    # -- one batch --------------------------------------------------------------------------
    def _check(self, sample: dict[str, Any]) -> tuple[str, str] | None:
        """(reason, message) when the sample cannot be narrated, else None; raises with on_error=raise."""
        clips = sample.get("clips")
        problem = None
        if "video_id" not in sample["json"]:
            problem = ("bad_sample", "json has no video_id")
        elif clips is None:
            problem = ("no_clips", "no clips member (was the set built with --clips 0?); narrate needs "
                                   "per-clip features")
        elif clips.dim() != 3 or clips.shape[0] < 1:
            problem = ("bad_sample", f"clips has shape {tuple(clips.shape)}, expected (K >= 1, rows, D)")
        if problem and self.on_error == "raise":
            raise ValueError(f"{sample['shard']}: key {sample['key']!r}: {problem[1]}")
        return problem

    def _batch(self, batch: list[dict[str, Any]]) -> Iterator[Outcome]:
        problems = [self._check(s) for s in batch]
        needed: dict[str, dict[str, Any]] = {}
        for sample, problem in zip(batch, problems):
            video_id = sample["json"].get("video_id")
            if problem is None and video_id not in self.cache and video_id not in needed:
                needed[video_id] = sample
        self._caption(needed)
        fresh = set(needed)  # the first sample of a video captioned now is not a cache hit; later ones are
        for sample, problem in zip(batch, problems):
            data = sample["json"]
            info = {"id": data.get("id"), "video_id": data.get("video_id")}
            if problem is not None:
                yield Outcome(sample["key"], problem[0], message=problem[1], info=info)
                continue
            video_id = data["video_id"]
            captions = self.cache[video_id]
            self.cache.move_to_end(video_id)
            if video_id in fresh:
                fresh.discard(video_id)
            else:
                self._cache_hits += 1
            if captions.clips is None or (self.whole_video and captions.video is None):
                yield Outcome(sample["key"], "too_long", message="the caption prompt with the video rows and "
                              "max_new_tokens exceeds max_length", info=info)
                continue
            narrated = dict(data, narrative_clips=captions.clips,
                            narrative=" ".join(c for c in captions.clips if c))
            if self.whole_video:
                narrated["narrative_video"] = captions.video
            out = dict(sample, json=narrated)
            yield Outcome(sample["key"], shardpass.KEPT, sample=shardpass.output_members(out))
        while len(self.cache) > self.cache_videos:
            self.cache.popitem(last=False)

    def _caption(self, needed: dict[str, dict[str, Any]]) -> None:
        """Caption the clips (and whole video) of each needed video in one captioner call."""
        if not needed:
            return
        feats: list[torch.Tensor] = []
        spans: list[tuple[str, int, int]] = []
        for video_id, sample in needed.items():
            clips = sample["clips"]
            spans.append((video_id, len(feats), int(clips.shape[0])))
            feats.extend(clips.unbind(0))
            if self.whole_video:
                feats.append(sample["feat"])
        captions = self.captioner.caption(feats)
        for video_id, at, k in spans:
            clip_captions = captions[at:at + k]
            whole = captions[at + k] if self.whole_video else None
            self.cache[video_id] = _Captions(
                clips=None if any(c is None for c in clip_captions) else list(clip_captions), video=whole)
            self._captioned.append(video_id)


# ---------------------------------------------------------------------------- run

def identity(config: NarrateConfig, captioner_name: str, model_fingerprint: str) -> dict[str, Any]:
    values = {k: v for k, v in cfg.to_dict(config).items() if k not in NOT_IDENTITY}
    return {**values, "captioner": captioner_name, "model_fingerprint": model_fingerprint}


def model_fingerprint(folder: str | os.PathLike) -> str:
    """Identity of a saved VideoLMM: its config, adapter and projector bytes."""
    folder = Path(folder)
    return shardpass.fingerprint_files(folder / name for name in (
        "vlmr_model.json", "adapter_config.json", "adapter_model.safetensors", "projector.safetensors"))


def load_model(folder: str, device: torch.device, dtype: str = ""):
    from train.model import VideoLMM

    model = VideoLMM.load(folder, dtype=dtype or None)
    return model.to(device).eval()


def run(config: NarrateConfig, *, captioner: Captioner | None = None, ranks: Ranks | None = None,
        after_unit=None) -> PassSummary:
    """Narrate ``config.input`` into ``config.out``; a collective call under several ranks.

    ``captioner`` replaces the SFT model (tests plug in a deterministic one); the prompt and
    model settings then only go into the manifest.
    """
    ranks = ranks or Ranks()
    prompt = load_prompt(config.prompt or DEFAULT_PROMPT).substitute()
    fingerprint = ""
    if captioner is None:
        model = load_model(config.model, shardpass.pick_device(config.device, ranks), config.dtype)
        captioner = ModelCaptioner(model, prompt, max_new_tokens=config.max_new_tokens,
                                   batch_rows=config.batch_rows,
                                   max_length=context_length(model, config.max_length),
                                   name=str(Path(config.model).resolve()))
        fingerprint = model_fingerprint(config.model)
    work = NarrateWork(captioner, batch_size=config.batch_size, whole_video=config.whole_video,
                       cache_videos=config.cache_videos, on_error=config.on_error)
    settings = {**cfg.to_dict(config), "prompt_text": prompt, "captioner": captioner.name}
    with torch.inference_mode():
        summary = shardpass.run_pass(
            work, source=config.input, out=config.out, stages=config.stages or None, out_stage=None,
            samples_per_shard=config.samples_per_shard, settings=settings,
            identity=identity(config, captioner.name, fingerprint), fields=None, on_error=config.on_error,
            ranks=ranks, overwrite=config.overwrite, progress=config.progress, after_unit=after_unit)
    unfinished = getattr(captioner, "unfinished", 0)
    if unfinished:
        log.info("rank %d: %d caption(s) reached max_new_tokens=%d without EOS", ranks.rank, unfinished,
                 config.max_new_tokens)
    return summary


def main(argv: list[str] | None = None, prog: str = "vlmr narrate") -> int:
    return shardpass.pass_main(NarrateConfig, run, argv, prog,
                                 headline=lambda c: f"narrated {c.input} -> {c.out}")


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("VLMR_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    sys.exit(main(sys.argv[1:], prog="python -m train.narrate"))
