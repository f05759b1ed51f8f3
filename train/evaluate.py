"""``vlmr eval ...``: the paper's four kinds of evaluation, and exact scoring on the synthetic world.

Every command streams a shard set made by ``vlmr build-shards``, has each model answer
each sample's question about its video (greedy, batched, with a KV cache), scores the
answers, and writes per-sample results and one table that puts the models side by side::

    vlmr eval synthetic  --shards S --world runs/demo/world --models runs/sft runs/ppo
    vlmr eval qa         --shards S --models M1 M2 --judge http://127.0.0.1:8000/v1 --judge-model NAME
    vlmr eval generative --shards S --models M1 M2 --judge /models/llama-3-8b-instruct
    vlmr eval retrieval  --shards S --models M1 M2 [--clip /models/clip-vit-l14]
    vlmr eval action     --shards S --models M1 M2 --classes classInd.txt [--clip PATH]
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 .venv/bin/vlmr eval synthetic ...   # many ranks
    torchrun --nproc_per_node 8 train/evaluate.py qa ...                               # the same

``--models`` takes saved models (a folder with ``vlmr_model.json``, or a training run's
output folder holding ``model/``): the SFT model, the PPO policy, any other — each is
loaded with ``VideoLMM.load`` and asked the same way. ``--predictions FILE`` scores answers
made elsewhere instead (JSONL lines ``{"key", "prediction"[, "prediction2"]}``, ``key`` being
the sample key or the record ``id``). Columns are named by the shortest distinct tails of
the model folders (``runs/sft/model`` and ``runs/ppo/model``: ``sft``, ``ppo``) and by the
predictions files' stems, unless ``--names`` says otherwise.

What each command measures
--------------------------
``synthetic`` — no judge: the synthetic world's truth is known (``dataengine/synth.py``,
``--world`` is the folder with its ``captions.json``). Accuracy per question type
(``qtype``: colour, shape, direction, count, object, event, order, describe; scored by
``train.metrics.answer_correct``: the words of the asked kind, or the sequence of event
phrases, must equal the reference's), event F1 (partial credit on event/order/describe
answers) and the groundedness rate: of the colours, shapes and directions the answers name,
the share really in the video. This runs on CPU in seconds and shows whether a training
stage moved the tiny model the right way.

``qa`` — zero-shot open-ended QA (MSVD-QA, MSRVTT-QA, ActivityNet-QA; paper Table 2): an LLM
judge (``--judge``: ``tiny``, a local model folder, or an OpenAI-compatible URL with
``--judge-model``) compares each answer with the reference using
``train/prompts/eval_qa.txt`` and replies yes/no and a 0–5 score. Reports accuracy (share
of yes) and mean score.

``generative`` — the video-based generative benchmark (paper Table 1): five criteria, each
0–5 from the judge with its own prompt (``train/prompts/eval_generative_*.txt``):
correctness, detail and context on the generic questions, temporal on the temporal ones,
consistency on pairs of differently worded questions about one video.

``retrieval`` — zero-shot text-to-video retrieval (paper Table 3), as the paper describes
it after Li et al.: the CLIP score between the model's generated description of each video
and each ground-truth caption. Captions and descriptions are embedded with the CLIP *text*
tower (``--clip``, tiny by default); for each caption the videos are ranked by the cosine
similarity of their descriptions to it; R@1, R@5, R@10. Ties count against the right video.

``action`` — zero-shot action recognition (UCF101, HMDB51; paper Table 3): the CLIP text
similarity between the model's description of the video and each class prompt
(``--class-template``, default ``a video of a person {class}.``, with ``ApplyEyeMakeup`` or
``brush_hair`` written as ``apply eye makeup``, ``brush hair``); top-1 and top-5.

Annotation forms (build shards from them with ``vlmr build-shards``)
-------------------------------------------------------------------
Any format ``dataengine.ingest`` reads works; the first human turn is the question and the
first answer the reference. Extra keys of a Video-ChatGPT record travel into the sample's
json, which is how the fields below reach the evaluation::

    qa          [{"video_id": "vid1", "q": "what is the man doing?", "a": "cooking"}, ...]
                (or LLaVA JSON/JSONL, or a NExT-QA CSV)
    generative  [{"video_id": "vid1", "q": "...", "a": "...", "task": "generic"},
                 {"video_id": "vid1", "q": "...", "a": "...", "task": "temporal"},
                 {"video_id": "vid2", "q": "...", "q2": "<the same question reworded>", "a": "...",
                  "task": "consistency"},
                 {"video_id": "vid3", "q": "...", "a": "...", "question_pair": "p7"},
                 {"video_id": "vid3", "q": "<reworded>", "a": "...", "question_pair": "p7"}]
                ``task`` defaults to generic (consistency when ``question_pair`` is given);
                a consistency sample holds both wordings (``q2``) or is one of exactly two
                records sharing a ``question_pair`` id (the first in stream order is question 1)
    retrieval   [{"video_id": "vid1", "q": "Describe this video in detail.", "a": "<caption>"}, ...]
                one record per caption; several captions of one video are several queries
    action      [{"video_id": "v_ApplyEyeMakeup_g01_c01", "q": "What is the person doing?",
                  "a": "apply eye makeup", "label": "ApplyEyeMakeup"}, ...]
                ``label`` is a class name of ``--classes`` (or a 0-based index into it); without
                it the answer is taken as the label. ``--classes`` lists one class per line, or
                UCF101's ``classInd.txt`` form ``1 ApplyEyeMakeup``
    synthetic   the synthetic world's own annotations.json (``qtype`` in every record)

Retrieval and action ask every video ``--prompt`` (default "Describe this video in
detail."; an empty prompt asks each sample's own question) and generate each (video,
prompt) once per rank.

Ranks, outputs, failures
------------------------
Under torchrun (ranks and their gloo process group as in ``train.shardstage``) each rank
streams its share of the samples (``dataengine.reader.ShardReader``, no shuffle, with
``remainder="repeat"``: the few samples two ranks get are kept once, by stream index) and
generates; answers are gathered to rank 0 (as JSON, never pickled). Judge
requests are dealt to all ranks and their replies gathered; CLIP scoring runs on rank 0.
Outputs, written by rank 0 to temporary names and renamed::

    OUTPUT/config.json                the command's settings
    OUTPUT/summary.txt                the side-by-side table (also printed)
    OUTPUT/summary.json               every model's metrics and counts, and the table
    OUTPUT/NAME/results.jsonl         one line per sample: question, reference, prediction,
                                      and the verdict/score/rank of that sample
    OUTPUT/NAME/summary.json          that model's part of summary.json

Nothing is lost silently: samples the reader could not read, malformed samples (with
``--on-error skip``), prompts too long for the model, judge replies without a readable
verdict and judge requests that failed after their retries are counted, listed in the
results and shown in the table. Judge replies are cached (``--judge-cache``, default
``$VLMR_CACHE/llm``; temperature 0, a fixed seed), so a re-run sends no request twice.

Tests: ``pytest tests/test_metrics.py tests/test_evaluate.py``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Sequence

from dataengine import config as cfg
from dataengine.schema import sample_key, write_text_atomic
from train import metrics
from train.prompt_files import PROMPTS, load_prompt

if TYPE_CHECKING:
    from train.shardstage import RankInfo

log = logging.getLogger(__name__)

FORMAT = "vlmr-eval/1"
QA_PROMPT = PROMPTS / "eval_qa.txt"
DESCRIBE = "Describe this video in detail."
CRITERIA = ("correctness", "detail", "context", "temporal", "consistency")
# Which criteria the judge is asked for on each kind of generative-benchmark sample.
GENERATIVE_TASKS: dict[str, tuple[str, ...]] = {
    "generic": ("correctness", "detail", "context"),
    "temporal": ("temporal",),
    "consistency": ("consistency",),
}
SYNTHETIC_QTYPES = ("colour", "shape", "direction", "count", "object", "event", "order", "describe")
EVENT_QTYPES = ("event", "order", "describe")
RESULTS_NAME = "results.jsonl"
SUMMARY_JSON = "summary.json"
SUMMARY_TXT = "summary.txt"
MODEL_CONFIG = "vlmr_model.json"  # train.model.MODEL_CONFIG, named here to keep imports lazy

Kind = Literal["pct", "score", "count"]


# =========================================================================== settings

@dataclass
class EvalConfig:
    """Settings every `vlmr eval` command shares."""

    task: ClassVar[str] = ""

    shards: str = ""
    """Shard set to evaluate on (`vlmr build-shards` output): folder or manifest.json, local or URL."""
    models: list[str] = field(default_factory=list)
    """Saved models to compare: folders with vlmr_model.json, or run folders holding model/."""
    predictions: list[str] = field(default_factory=list)
    """Answers made elsewhere, scored like a model: JSONL of {"key", "prediction"[, "prediction2"]}."""
    names: list[str] = field(default_factory=list)
    """Column names, one per --models then --predictions entry (empty: run folder names, predictions file stems)."""
    output: str = ""
    """Output folder (default: runs/eval/TASK): summary.txt/json, config.json, NAME/results.jsonl."""
    stages: list[str] = field(default_factory=list)
    """Stages of the shard set to evaluate, in order (empty: every non-empty stage, in manifest order)."""
    batch_size: int = 8
    """Prompts generated together per rank."""
    max_new_tokens: int = 128
    """Longest answer generated; an answer cut here is counted as 'no EOS'."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the models run (auto: cuda:LOCAL_RANK when CUDA is there, else cpu)."""
    dtype: Literal["", "float32", "bfloat16", "float16"] = ""
    """Load the models' base weights in this dtype (default: as saved)."""
    limit: int = 0
    """Evaluate only the first N samples of the stream (0: all): a quick look."""
    on_error: Literal["raise", "skip"] = "raise"
    """A malformed sample, an unreadable shard member or a failed judge request: stop, or skip and count it."""
    seed: int = 0
    """Seed sent with every judge request (replies are greedy: temperature 0)."""
    progress: bool = True
    """Show a progress bar (rank 0)."""

    def problems(self) -> list[str]:
        p: list[str] = []
        cfg.check(p, bool(self.shards), "--shards: the shard set to evaluate is required")
        cfg.check(p, bool(self.models or self.predictions), "--models (or --predictions): nothing to evaluate")
        cfg.check(p, not self.names or len(self.names) == len(self.models) + len(self.predictions),
                  f"--names: {len(self.names)} names for {len(self.models) + len(self.predictions)} models")
        cfg.check(p, len(set(self.names)) == len(self.names), "--names must be distinct")
        cfg.check(p, self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        cfg.check(p, self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        cfg.check(p, self.limit >= 0, f"--limit must be >= 0, got {self.limit}")
        return p

    def __post_init__(self) -> None:
        if not self.output:
            self.output = f"runs/eval/{self.task}"
        cfg.raise_problems(self.problems(), f"eval {self.task} settings")


@dataclass
class JudgedEvalConfig(EvalConfig):
    """Settings of the evaluations an LLM judges."""

    judge: str = ""
    """The judge: 'tiny', a local causal-LM folder, or an OpenAI-compatible base URL (http://host:port/v1)."""
    judge_model: str = ""
    """Model name sent to a URL judge (required with a URL)."""
    judge_cache: str = ""
    """Judge reply cache (default: $VLMR_CACHE/llm); a re-run sends no request already answered."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's API key; read per request, never written anywhere."""
    judge_max_tokens: int = 128
    """Most tokens per judge reply."""
    timeout: float = 60.0
    """HTTP: seconds to wait for a reply before the attempt counts as failed."""
    max_retries: int = 4
    """HTTP: retries after a timeout, 429 or 5xx (exponential backoff)."""
    backoff: float = 1.0
    """HTTP: first backoff in seconds, doubled each retry (a Retry-After header wins)."""
    concurrency: int = 4
    """HTTP: judge requests in flight at once per rank (a local judge runs one at a time)."""
    judge_device: Literal["cpu", "cuda"] = "cpu"
    """Where a local judge runs."""

    def problems(self) -> list[str]:
        from train.llm_client import is_url

        p = super().problems()
        cfg.check(p, bool(self.judge), "--judge: 'tiny', a local model folder or an http(s) URL is required")
        cfg.check(p, not is_url(self.judge) or bool(self.judge_model), "--judge-model: required with a URL judge")
        cfg.check(p, self.judge_max_tokens >= 1, "--judge-max-tokens must be >= 1")
        cfg.check(p, self.timeout > 0 and self.max_retries >= 0 and self.concurrency >= 1,
                  "need --timeout > 0, --max-retries >= 0, --concurrency >= 1")
        return p


@dataclass
class SyntheticConfig(EvalConfig):
    """Exact scoring on the synthetic world: accuracy per question type, groundedness; no judge."""

    task: ClassVar[str] = "synthetic"

    world: str = ""
    """The synthetic world's folder (or its captions.json): the ground truth of every video."""

    def problems(self) -> list[str]:
        p = super().problems()
        cfg.check(p, bool(self.world), "--world: the synthetic world folder (with captions.json) is required")
        return p


@dataclass
class QAConfig(JudgedEvalConfig):
    """Zero-shot open-ended video QA judged by an LLM: accuracy (yes/no) and mean score (0-5)."""

    task: ClassVar[str] = "qa"

    prompt: str = ""
    """Judge prompt template (default: train/prompts/eval_qa.txt; uses $question, $answer, $prediction)."""


@dataclass
class GenerativeConfig(JudgedEvalConfig):
    """The video-based generative benchmark: correctness, detail, context, temporal, consistency (0-5)."""

    task: ClassVar[str] = "generative"

    prompt_dir: str = ""
    """Folder of judge prompts eval_generative_CRITERION.txt (default: train/prompts)."""


@dataclass
class RetrievalConfig(EvalConfig):
    """Zero-shot text-to-video retrieval by the CLIP score of generated descriptions vs captions."""

    task: ClassVar[str] = "retrieval"

    clip: str = "tiny"
    """CLIP model (text tower used): 'tiny' or a local folder (e.g. a saved CLIP ViT-L/14)."""
    prompt: str = DESCRIBE
    """What each video is asked to get its description ('' asks each sample's own question)."""
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    """Recall@K cut-offs."""

    def problems(self) -> list[str]:
        p = super().problems()
        cfg.check(p, bool(self.ks) and all(k >= 1 for k in self.ks), "--ks: cut-offs >= 1")
        return p


@dataclass
class ActionConfig(EvalConfig):
    """Zero-shot action recognition by the CLIP similarity of generated descriptions and class names."""

    task: ClassVar[str] = "action"

    classes: str = ""
    """Class list: one name per line, or UCF101 classInd.txt lines 'INDEX NAME'."""
    class_template: str = "a video of a person {class}."
    """Text each class is embedded as; {class} becomes the class name in words."""
    clip: str = "tiny"
    """CLIP model (text tower used): 'tiny' or a local folder."""
    prompt: str = DESCRIBE
    """What each video is asked ('' asks each sample's own question)."""
    ks: list[int] = field(default_factory=lambda: [1, 5])
    """Top-K cut-offs."""

    def problems(self) -> list[str]:
        p = super().problems()
        cfg.check(p, bool(self.classes), "--classes: the class list file is required")
        cfg.check(p, "{class}" in self.class_template, "--class-template must contain {class}")
        cfg.check(p, bool(self.ks) and all(k >= 1 for k in self.ks), "--ks: cut-offs >= 1")
        return p


# =========================================================================== ranks
# The ranks themselves (RankInfo, the gloo process group, the device) are train.shardstage's;
# what evaluation adds is moving JSON between them: answers and judge replies to rank 0.

def all_gather_json(ranks: "RankInfo", obj: Any) -> list[Any]:
    """Every rank's JSON-able ``obj``, in rank order, on every rank (sent as JSON bytes, never pickled)."""
    if ranks.world_size == 1:
        return [obj]
    import torch
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    data = json.dumps(obj).encode("utf-8")
    size = torch.tensor([len(data)], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(ranks.world_size)]
    dist.all_gather(sizes, size)
    longest = max(int(n) for n in sizes)
    buf = torch.zeros(longest, dtype=torch.uint8)
    buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    bufs = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in range(ranks.world_size)]
    dist.all_gather(bufs, buf.to(device))
    return [json.loads(b[:int(n)].cpu().numpy().tobytes().decode("utf-8")) for b, n in zip(bufs, sizes)]


def broadcast_json(ranks: "RankInfo", obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if ranks.world_size == 1:
        return obj
    from train.launch import broadcast_object

    return broadcast_object(obj, src=0)


# =========================================================================== what is evaluated

@dataclass(frozen=True)
class Candidate:
    """One column of the table: a saved model, or a file of predictions."""

    name: str
    kind: Literal["model", "predictions"]
    path: Path


def model_folder(spec: str) -> Path:
    """The saved-model folder of ``spec``: itself, or its ``model/`` (a training run's output)."""
    path = Path(spec)
    for folder in (path, path / "model"):
        if (folder / MODEL_CONFIG).is_file():
            return folder
    raise FileNotFoundError(f"{spec}: not a saved model (no {MODEL_CONFIG} in it or in {path / 'model'})")


def distinct_names(paths: Sequence[str]) -> list[str]:
    """Shortest path tails that tell the paths apart: runs/sft/model, runs/ppo/model →
    sft/model, ppo/model; a/x, b/y → x, y."""
    parts = [Path(p).parts or (str(p),) for p in paths]
    deepest = max((len(p) for p in parts), default=1)
    for depth in range(1, deepest + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{'/'.join(p)}#{i}" for i, p in enumerate(parts)]


def resolve_candidates(config: EvalConfig) -> list[Candidate]:
    folders = [model_folder(m) for m in config.models]
    for p in config.predictions:
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p}: predictions file not found")
    # A model is named by its run (runs/sft and runs/sft/model: sft), a predictions file by
    # its stem (preds/sft.jsonl: sft).
    specs = [str(f.parent if f.name == "model" else f) for f in folders] + \
        [str(Path(p).with_suffix("")) for p in config.predictions]
    names = list(config.names) or distinct_names(specs)
    kinds = ["model"] * len(folders) + ["predictions"] * len(config.predictions)
    paths = folders + [Path(p) for p in config.predictions]
    return [Candidate(n, k, p) for n, k, p in zip(names, kinds, paths)]  # type: ignore[arg-type]


def load_predictions(path: Path) -> dict[str, dict[str, Any]]:
    """``key`` → the line, from a JSONL of ``{"key", "prediction"[, "prediction2"]}``."""
    table: dict[str, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not JSON: {exc}") from None
            if not isinstance(row, dict) or not isinstance(row.get("key"), str) \
                    or not isinstance(row.get("prediction"), str):
                raise ValueError(f"{path}:{number}: expected {{\"key\": str, \"prediction\": str}}")
            if row["key"] in table:
                raise ValueError(f"{path}:{number}: key {row['key']!r} given twice")
            table[row["key"]] = row
    return table


# =========================================================================== samples

@dataclass
class EvalItem:
    """One sample to answer: its question(s), reference and the fields its task needs."""

    index: int
    """Position in the evaluated stream (stages in order): results are sorted by it."""
    key: str
    id: str
    video_id: str
    question: str
    answer: str
    prompts: list[str]
    """What the model is asked, in order (the first turn as written, or --prompt; then q2)."""
    fields: dict[str, Any] = field(default_factory=dict)


def first_turns(data: dict[str, Any]) -> tuple[str, str, str]:
    """(first human turn as written, its text without ``<video>``, first answer) of a sample json."""
    turns = data.get("conversations")
    if not isinstance(turns, list):
        raise ValueError("no 'conversations' list")
    human = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "human"), None)
    gpt = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"), None)
    if not isinstance(human, str) or not human.strip():
        raise ValueError("no human turn (question)")
    if not isinstance(gpt, str):
        raise ValueError("no gpt turn (reference answer)")
    question = human.replace("<video>", " ").strip()
    return human, " ".join(question.split()), gpt.strip()


def base_item(index: int, sample: dict[str, Any], prompt_override: str | None = None) -> EvalItem:
    data = sample.get("json")
    if not isinstance(data, dict):
        raise ValueError("sample has no json member")
    raw, question, answer = first_turns(data)
    video_id = data.get("video_id")
    if not isinstance(video_id, str) or not video_id:
        raise ValueError("no 'video_id'")
    prompt = raw if not prompt_override else prompt_override
    return EvalItem(index=index, key=str(sample.get("key", "")), id=str(data.get("id", "")), video_id=video_id,
                    question=question if not prompt_override else prompt_override, answer=answer,
                    prompts=[prompt])


# =========================================================================== answering

class ModelAnswerer:
    """Generates the answers of one model, ``batch_size`` prompts at a time; each distinct
    (video, prompt) once (retrieval asks one prompt of every caption's video)."""

    def __init__(self, folder: Path, config: EvalConfig, device: Any):
        from train.model import VideoLMM

        self.model = VideoLMM.load(folder, dtype=config.dtype or None).to(device)
        self.model.eval()
        self.tokenizer = self.model.tokenizer
        self.batch_size = config.batch_size
        self.max_new_tokens = config.max_new_tokens
        lm_config = getattr(self.model.lm, "config", None)
        self.context = int(getattr(lm_config, "max_position_embeddings", 0) or 0)
        self.done: dict[tuple[str, str], tuple[str, bool]] = {}
        self.pending: list[tuple[tuple[str, str], list[int], Any]] = []
        self.queued: set[tuple[str, str]] = set()

    def add(self, item: EvalItem, feat) -> str | None:
        """Queue the item's prompts; returns a reason when the item cannot be answered."""
        from train import conversation

        for prompt in item.prompts:
            memo = (item.video_id, prompt)
            if memo in self.done or memo in self.queued:
                continue
            ids = self.model.chat.prompt_ids(prompt)
            length = conversation.spliced_length(len(ids), 1, int(feat.shape[0])) + self.max_new_tokens
            if self.context and length > self.context:
                return f"too_long ({length} > context {self.context})"
            self.pending.append((memo, ids, feat))
            self.queued.add(memo)
        if len(self.pending) >= self.batch_size:
            self.flush()
        return None

    def flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:self.batch_size], self.pending[self.batch_size:]
            out = self.model.generate([f for _, _, f in batch], [ids for _, ids, _ in batch],
                                      max_new_tokens=self.max_new_tokens)
            for (memo, _, _), text, ended in zip(batch, out.texts, out.ended):
                self.done[memo] = (text, ended)
                self.queued.discard(memo)

    def answers(self, item: EvalItem) -> list[tuple[str, bool]]:
        return [self.done[(item.video_id, p)] for p in item.prompts]

    def close(self) -> None:
        import torch

        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class PredictionAnswerer:
    """Answers read from a predictions file (by sample key, or record id)."""

    def __init__(self, path: Path):
        self.path = path
        self.table = load_predictions(path)

    def _row(self, item: EvalItem) -> dict[str, Any] | None:
        return self.table.get(item.key) or self.table.get(item.id)

    def add(self, item: EvalItem, feat) -> str | None:
        row = self._row(item)
        if row is None:
            return f"no_prediction (key {item.key!r} not in {self.path})"
        if len(item.prompts) > 1 and not isinstance(row.get("prediction2"), str):
            return f"no_prediction2 (key {item.key!r} asks two questions)"
        return None

    def flush(self) -> None:
        pass

    def answers(self, item: EvalItem) -> list[tuple[str, bool]]:
        row = self._row(item)
        assert row is not None
        texts = [row["prediction"], row.get("prediction2", "")][:len(item.prompts)]
        return [(t, True) for t in texts]

    def close(self) -> None:
        pass


def _reason_name(reason: str) -> str:
    return reason.split(" ", 1)[0]


def collect_answers(task: "Task", candidate: Candidate, config: EvalConfig, ranks: "RankInfo",
                    device: Any) -> dict[str, Any] | None:
    """Stream this rank's samples, answer them, gather everything to rank 0.

    Returns on rank 0 ``{"records": [...], "skipped": [...], "reader": {...}}`` (records and
    skips sorted by stream index, each index once); None on the other ranks.
    """
    from tqdm import tqdm

    from dataengine.reader import ShardReader

    started = time.perf_counter()
    reader = ShardReader(config.shards, stages=config.stages, rank=ranks.rank, world_size=ranks.world_size,
                         batch_size=1, shuffle="none", remainder="repeat", fields=("json", "feat"),
                         on_error=config.on_error)
    sequence = reader.sequence()
    wanted = len(sequence) if not config.limit else \
        1 + max((i for i, index in enumerate(sequence) if index < config.limit), default=-1)
    answerer: ModelAnswerer | PredictionAnswerer
    if candidate.kind == "model":
        answerer = ModelAnswerer(candidate.path, config, device)
    else:
        answerer = PredictionAnswerer(candidate.path)
    items: list[EvalItem] = []
    skipped: list[dict[str, Any]] = []
    samples = iter(reader)
    bar = tqdm(total=wanted, desc=f"{task.name} {candidate.name}", unit="sample",
               disable=not (ranks.is_main and config.progress))
    try:
        for position in range(wanted):
            sample = next(samples)
            bar.update(1)
            index = sequence[position]
            if config.limit and index >= config.limit:
                continue
            where = f"{sample.get('shard', config.shards)} key {sample.get('key', '?')}"
            if sample.get("substitute_for"):  # the reader's stand-in for a sample it could not read
                skipped.append({"index": index, "key": "", "reason": "unreadable",
                                "detail": str(sample["substitute_for"])})
                continue
            try:
                item = task.parse(index, sample)
            except ValueError as exc:
                if config.on_error == "raise":
                    raise ValueError(f"{where}: {exc}") from None
                log.warning("skipping %s: %s", where, exc)
                skipped.append({"index": index, "key": sample.get("key", ""), "reason": "malformed",
                                "detail": str(exc)})
                continue
            reason = answerer.add(item, sample["feat"])
            if reason is not None:
                if candidate.kind == "predictions" and config.on_error == "raise":
                    raise ValueError(f"{where}: {reason}")
                log.warning("not answered: %s: %s", where, reason)
                skipped.append({"index": index, "key": item.key, "reason": _reason_name(reason), "detail": reason})
                continue
            items.append(item)
        answerer.flush()
        records = []
        for item in items:
            answers = answerer.answers(item)
            record = {"index": item.index, "key": item.key, "id": item.id, "video_id": item.video_id,
                      "question": item.question, "answer": item.answer,
                      "prediction": answers[0][0], "ended": answers[0][1], **item.fields}
            if len(answers) > 1:
                record["prediction2"], record["ended2"] = answers[1]
            records.append(record)
    finally:
        samples.close()
        bar.close()
        answerer.close()
    stats = reader.stats()
    parts = all_gather_json(ranks, {"records": records, "skipped": skipped,
                                   "reader": {"skipped": stats["skipped"], "errors": stats["errors"][:5]},
                                   "seconds": time.perf_counter() - started})
    return merge_ranks(parts) if ranks.is_main else None


def merge_ranks(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from every rank's: each stream index once (``remainder="repeat"`` gives the
    last few samples to two ranks), sorted by index; reader counts summed."""
    merged: dict[int, dict[str, Any]] = {}
    lost: dict[int, dict[str, Any]] = {}
    reader_skipped: Counter = Counter()
    errors: list[str] = []
    for part in parts:
        for record in part["records"]:
            merged.setdefault(record["index"], record)
        for skip in part["skipped"]:
            lost.setdefault(skip["index"], skip)
        reader_skipped.update(part["reader"]["skipped"])
        errors += part["reader"]["errors"]
    return {"records": [merged[i] for i in sorted(merged)],
            "skipped": [lost[i] for i in sorted(lost) if i not in merged],
            "reader": {"skipped": dict(reader_skipped), "errors": errors[:10]},
            "seconds": max(p["seconds"] for p in parts)}


# =========================================================================== judging

def user_message(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


class Judge:
    """The LLM judge of a run, with its cache; requests are dealt to all ranks."""

    def __init__(self, config: JudgedEvalConfig, ranks: "RankInfo"):
        from dataengine.models import cache_root
        from train.llm_client import make_client

        self.config = config
        self.ranks = ranks
        cache = config.judge_cache or str(cache_root() / "llm")
        self.client = make_client(config.judge, model=config.judge_model, cache_dir=cache,
                                  api_key_env=config.api_key_env, timeout=config.timeout,
                                  max_retries=config.max_retries, backoff=config.backoff,
                                  concurrency=config.concurrency, device=config.judge_device)

    def ask(self, requests: list[dict[str, Any]] | None) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Replies to rank 0's ``requests`` (``{"messages", "label"}``), in order, on every rank:
        ``{"text"}`` or ``{"error"}``; and the request counts (sent, cached, failed).

        Every rank answers its share (request i goes to rank i % world), so all ranks must
        call this together. Failures are gathered before anyone raises, so that every rank
        raises together rather than leaving the others waiting.
        """
        from tqdm import tqdm

        from train.llm_client import ChatRequest, LLMError, complete_many

        requests = broadcast_json(self.ranks, requests)
        mine = requests[self.ranks.rank::self.ranks.world_size]
        hits, misses = self.client.hits, self.client.misses
        chats = (ChatRequest(r["messages"], temperature=0.0, seed=self.config.seed,
                             max_tokens=self.config.judge_max_tokens, label=r["label"]) for r in mine)
        replies: list[dict[str, Any]] = []
        fatal = ""
        try:
            for reply in tqdm(complete_many(self.client, chats, on_error="skip"), total=len(mine), desc="judge",
                              unit="request", disable=not (self.ranks.is_main and self.config.progress)):
                replies.append({"error": str(reply)} if isinstance(reply, LLMError) else {"text": reply.text})
        except LLMError as exc:  # fatal: bad URL, key or model name; retrying cannot help
            fatal = str(exc)
        counts = [self.client.misses - misses, self.client.hits - hits]
        parts = all_gather_json(self.ranks, {"replies": replies, "fatal": fatal, "counts": counts})
        fatal_errors = [p["fatal"] for p in parts if p["fatal"]]
        if fatal_errors:
            raise RuntimeError(f"judge {self.config.judge}: {fatal_errors[0]}")
        ordered: list[dict[str, Any]] = [{}] * len(requests)
        for rank, part in enumerate(parts):
            ordered[rank::self.ranks.world_size] = part["replies"]
        failed = [(r["label"], o["error"]) for r, o in zip(requests, ordered) if "error" in o]
        if failed and self.config.on_error == "raise":
            raise RuntimeError(f"{len(failed)} judge request(s) failed after retries; first: {failed[0][0]}: "
                               f"{failed[0][1]} (--on-error skip counts them instead)")
        sent = sum(p["counts"][0] for p in parts)
        cached = sum(p["counts"][1] for p in parts)
        return ordered, {"sent": sent, "cached": cached, "failed": len(failed)}


# =========================================================================== CLIP text scoring

class ClipText:
    """Unit-norm CLIP text embeddings, loaded on first use.

    The embedding is CLIP's: the text tower's hidden state at the end-of-text token, through
    the text projection. The end-of-text position is taken here rather than by
    transformers' pooling, which for configs with ``eos_token_id == 2`` (a legacy rule, and
    the tiny model's) takes the position of the *highest token id*: right for OpenAI's
    tokenizer, whose end-of-text token has the highest id, but an arbitrary word for any
    other, giving texts with a common prefix the same embedding. Each text is ended with
    the tokenizer's EOS when the tokenizer did not add it, and pooled at its last token.
    """

    def __init__(self, spec: str, device: Any):
        self.spec, self.device = spec, device
        self._model = self._tokenizer = None

    def embed(self, texts: Sequence[str], batch: int = 64):
        import numpy as np
        import torch

        from dataengine.models import load_clip
        from train.model import pad_sequences

        if self._model is None:
            self._model, self._tokenizer = load_clip(self.spec, device=self.device)
        model, tokenizer = self._model, self._tokenizer
        context = int(model.config.text_config.max_position_embeddings)
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
        rows = []
        with torch.no_grad():
            for start in range(0, len(texts), batch):
                # An empty answer still gets an embedding (of a lone full stop).
                chunk = [t if t.strip() else "." for t in texts[start:start + batch]]
                encoded = tokenizer(chunk, truncation=True, max_length=context - 1)["input_ids"]
                ids = [list(e) + ([eos] if eos is not None and (not e or e[-1] != eos) else []) for e in encoded]
                input_ids, mask = pad_sequences(ids, pad, side="right")
                hidden = model.text_model(input_ids=input_ids.to(self.device),
                                          attention_mask=mask.to(self.device)).last_hidden_state
                last = (mask.sum(1) - 1).to(self.device)
                features = model.text_projection(hidden[torch.arange(hidden.shape[0], device=self.device), last])
                rows.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
        width = int(model.config.projection_dim)
        return np.concatenate(rows) if rows else np.zeros((0, width), np.float32)


def text_similarity(embed, queries: Sequence[str], documents: Sequence[str]):
    """(Q, D) similarity of query texts to document texts, ``embed`` giving unit rows.

    Equal texts get bit-equal scores: each distinct text is embedded once and each
    distinct (query, document) product computed once, then spread back. Embedded in
    different batches or multiplied in different matrix tiles, equal inputs need not give
    bit-equal floats (it depends on the CPU's kernels and thread count), and the rankings
    count exact ties against the target (``metrics.target_ranks``).
    """
    import numpy as np

    query_texts, query_index = np.unique(np.asarray(list(queries), dtype=object), return_inverse=True)
    doc_texts, doc_index = np.unique(np.asarray(list(documents), dtype=object), return_inverse=True)
    distinct = embed(list(query_texts)) @ embed(list(doc_texts)).T
    return distinct[np.ix_(query_index.reshape(-1), doc_index.reshape(-1))]


# =========================================================================== tasks

Row = tuple[str, Any, Kind]


class Task:
    """What one command asks of each sample (:meth:`parse`) and how it scores the answers
    (:meth:`score`, called on every rank; rank 0 gets the merged records, others None)."""

    name = ""

    def __init__(self, config: EvalConfig, ranks: "RankInfo", device: Any):
        self.config, self.ranks, self.device = config, ranks, device

    def parse(self, index: int, sample: dict[str, Any]) -> EvalItem:
        return base_item(index, sample)

    def score(self, records: list[dict[str, Any]] | None) -> list[Row] | None:
        raise NotImplementedError


class SyntheticTask(Task):
    name = "synthetic"

    def __init__(self, config: SyntheticConfig, ranks: "RankInfo", device: Any):
        from dataengine.synth import load_captions

        super().__init__(config, ranks, device)
        self.truth = load_captions(config.world)
        self.vocabulary: dict[str, dict[str, set[str]]] = {}

    def parse(self, index: int, sample: dict[str, Any]) -> EvalItem:
        item = base_item(index, sample)
        qtype = sample["json"].get("qtype")
        if not isinstance(qtype, str) or not qtype:
            raise ValueError("no 'qtype' (not a synthetic-world sample?)")
        truth = self.truth.get(item.video_id)
        if truth is None or "broken" in truth:
            raise ValueError(f"video {item.video_id!r} has no ground truth in {self.config.world}")
        item.fields["qtype"] = qtype
        return item

    def score(self, records):
        if records is None:
            return None
        by_type: dict[str, list[bool]] = defaultdict(list)
        f1s: list[float] = []
        grounded = mentioned = 0
        for r in records:
            vid = r["video_id"]
            if vid not in self.vocabulary:
                self.vocabulary[vid] = metrics.video_vocabulary(self.truth[vid])
            r["correct"] = metrics.answer_correct(r["qtype"], r["prediction"], r["answer"])
            by_type[r["qtype"]].append(r["correct"])
            if r["qtype"] in EVENT_QTYPES:
                r["event_f1"] = metrics.event_f1(r["prediction"], r["answer"])
                if r["event_f1"] is not None:
                    f1s.append(r["event_f1"])
            r["grounded"], r["mentioned"] = metrics.groundedness(r["prediction"], self.vocabulary[vid])
            grounded += r["grounded"]
            mentioned += r["mentioned"]
        everything = [c for values in by_type.values() for c in values]
        rows: list[Row] = [("accuracy", metrics.ratio(sum(everything), len(everything)), "pct")]
        order = [q for q in SYNTHETIC_QTYPES if q in by_type] + sorted(set(by_type) - set(SYNTHETIC_QTYPES))
        for qtype in order:
            rows.append((f"accuracy/{qtype}", metrics.ratio(sum(by_type[qtype]), len(by_type[qtype])), "pct"))
        rows += [("event F1", metrics.ratio(sum(f1s), len(f1s)), "pct"),
                 ("groundedness", metrics.ratio(grounded, mentioned), "pct"),
                 ("mentions", mentioned, "count")]
        return rows


class QATask(Task):
    name = "qa"

    def __init__(self, config: QAConfig, ranks: "RankInfo", device: Any):
        super().__init__(config, ranks, device)
        self.template = load_prompt(config.prompt or QA_PROMPT, required=("question", "answer", "prediction"))
        self.judge = Judge(config, ranks)

    def score(self, records):
        requests = None if records is None else [
            {"messages": user_message(self.template.substitute(question=r["question"], answer=r["answer"],
                                                               prediction=r["prediction"])),
             "label": f"qa:{r['key']}"} for r in records]
        replies, counts = self.judge.ask(requests)
        if records is None:
            return None
        verdicts = []
        for r, reply in zip(records, replies):
            if "error" in reply:
                r["judge_error"] = reply["error"]
                continue
            r["judge"] = reply["text"]
            verdict = metrics.parse_qa_verdict(reply["text"])
            r["pred"], r["score"] = (verdict.pred, verdict.score) if verdict else (None, None)
            verdicts.append(verdict)
        summary = metrics.qa_summary(verdicts)
        return [("accuracy", summary["accuracy"], "pct"), ("score", summary["mean_score"], "score"),
                ("judged", summary["judged"], "count"), ("unparsed replies", summary["unparsed"], "count"),
                ("judge failed", counts["failed"], "count"), ("judge requests sent", counts["sent"], "count"),
                ("judge replies cached", counts["cached"], "count")]


class GenerativeTask(Task):
    name = "generative"

    def __init__(self, config: GenerativeConfig, ranks: "RankInfo", device: Any):
        super().__init__(config, ranks, device)
        folder = Path(config.prompt_dir) if config.prompt_dir else PROMPTS
        single = ("question", "answer", "prediction")
        self.templates = {c: load_prompt(folder / f"eval_generative_{c}.txt", required=single)
                          for c in CRITERIA[:4]}
        self.templates["consistency"] = load_prompt(
            folder / "eval_generative_consistency.txt",
            required=("question1", "question2", "answer", "prediction1", "prediction2"))
        self.judge = Judge(config, ranks)

    def parse(self, index: int, sample: dict[str, Any]) -> EvalItem:
        item = base_item(index, sample)
        data = sample["json"]
        pair = data.get("question_pair")
        task = data.get("task", "consistency" if pair is not None else "generic")
        if task not in GENERATIVE_TASKS:
            raise ValueError(f"task {task!r} is not one of {', '.join(GENERATIVE_TASKS)}")
        item.fields["task"] = task
        if task == "consistency":
            q2 = data.get("q2")
            if isinstance(q2, str) and q2.strip():
                item.fields["question2"] = " ".join(q2.split())
                item.prompts.append(item.fields["question2"])
            elif pair is not None:
                item.fields["question_pair"] = str(pair)
            else:
                raise ValueError("a consistency sample needs 'q2' (the reworded question) or a 'question_pair' id")
        return item

    def pair_up(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Join records sharing a ``question_pair`` id: the first gets the second's question
        and prediction; the second is marked ``paired_with``. A group that is not a pair of
        one video is an error (or, with --on-error skip, left unscored and counted)."""
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in records:
            if "question_pair" in r:
                groups[r["question_pair"]].append(r)
        for pair, group in groups.items():
            problem = (f"{len(group)} sample(s)" if len(group) != 2 else
                       "two videos" if group[0]["video_id"] != group[1]["video_id"] else None)
            if problem:
                keys = ", ".join(r["key"] for r in group)
                message = f"question_pair {pair!r} has {problem} (keys {keys}); needs two of one video"
                if self.config.on_error == "raise":
                    raise ValueError(message)
                for r in group:
                    r["unpaired"] = message
                continue
            first, second = group
            first.update(question2=second["question"], prediction2=second["prediction"], paired_key=second["key"])
            second["paired_with"] = first["key"]
        return records

    def requests_for(self, r: dict[str, Any]) -> list[tuple[str, str]]:
        """(criterion, prompt text) the judge is asked for one record."""
        if r["task"] == "consistency":
            if "prediction2" not in r or "paired_with" in r or "unpaired" in r:
                return []
            return [("consistency", self.templates["consistency"].substitute(
                question1=r["question"], question2=r["question2"], answer=r["answer"],
                prediction1=r["prediction"], prediction2=r["prediction2"]))]
        return [(c, self.templates[c].substitute(question=r["question"], answer=r["answer"],
                                                 prediction=r["prediction"]))
                for c in GENERATIVE_TASKS[r["task"]]]

    def score(self, records):
        asks: list[tuple[int, str]] = []
        requests = None
        if records is not None:
            self.pair_up(records)
            requests = []
            for i, r in enumerate(records):
                for criterion, text in self.requests_for(r):
                    asks.append((i, criterion))
                    requests.append({"messages": user_message(text), "label": f"{criterion}:{r['key']}"})
        replies, counts = self.judge.ask(requests)
        if records is None:
            return None
        scores: dict[str, list[float | None]] = {c: [] for c in CRITERIA}
        for (i, criterion), reply in zip(asks, replies):
            r = records[i]
            if "error" in reply:
                r.setdefault("judge_error", {})[criterion] = reply["error"]
                continue
            r.setdefault("judge", {})[criterion] = reply["text"]
            value = metrics.parse_score(reply["text"])
            r.setdefault("scores", {})[criterion] = value
            scores[criterion].append(value)
        rows: list[Row] = []
        means = []
        for criterion in CRITERIA:
            summary = metrics.score_summary(scores[criterion])
            rows.append((criterion, summary["mean_score"], "score"))
            if summary["mean_score"] is not None:
                means.append(summary["mean_score"])
        rows.append(("mean of criteria", sum(means) / len(means) if len(means) == len(CRITERIA) else None, "score"))
        judged = sum(metrics.score_summary(v)["judged"] for v in scores.values())
        unparsed = sum(metrics.score_summary(v)["unparsed"] for v in scores.values())
        rows += [("judged", judged, "count"), ("unparsed replies", unparsed, "count"),
                 ("unpaired", sum("unpaired" in r for r in records), "count"),
                 ("judge failed", counts["failed"], "count"), ("judge requests sent", counts["sent"], "count"),
                 ("judge replies cached", counts["cached"], "count")]
        return rows


class RetrievalTask(Task):
    name = "retrieval"

    def __init__(self, config: RetrievalConfig, ranks: "RankInfo", device: Any):
        super().__init__(config, ranks, device)
        self.clip = ClipText(config.clip, device)

    def parse(self, index: int, sample: dict[str, Any]) -> EvalItem:
        item = base_item(index, sample, self.config.prompt or None)
        if not item.answer:
            raise ValueError("empty caption (the reference answer)")
        return item

    def score(self, records):
        if records is None:
            return None
        videos: dict[str, int] = {}
        descriptions: list[str] = []
        for r in records:
            if r["video_id"] not in videos:
                videos[r["video_id"]] = len(descriptions)
                descriptions.append(r["prediction"])
        if not records:
            return [(f"R@{k}", None, "pct") for k in self.config.ks] + [("queries", 0, "count"), ("videos", 0, "count")]
        similarity = text_similarity(self.clip.embed, [r["answer"] for r in records], descriptions)
        targets = [videos[r["video_id"]] for r in records]
        ranks = metrics.target_ranks(similarity, targets)
        names = list(videos)
        for r, rank, row in zip(records, ranks, similarity):
            r["rank"] = int(rank)
            r["top"] = [names[j] for j in row.argsort(kind="stable")[::-1][:5]]
        recall = metrics.recall_at_k(similarity, targets, self.config.ks)
        return [(f"R@{k}", recall[k], "pct") for k in self.config.ks] + [
            ("median rank", float(sorted(ranks)[len(ranks) // 2]) + 1, "score"),
            ("queries", len(records), "count"), ("videos", len(videos), "count")]


def load_classes(path: str | Path) -> list[str]:
    """Class names from a file: one per line, or ``INDEX NAME`` lines (UCF101 classInd.txt).
    Blank lines and '#' comments are ignored; a name given twice is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: class list not found")
    names: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"\d+\s+(.+)", line)
        name = (match.group(1) if match else line).strip()
        if name in names:
            raise ValueError(f"{path}:{number}: class {name!r} listed twice")
        names.append(name)
    if not names:
        raise ValueError(f"{path}: no classes")
    return names


def class_words(name: str) -> str:
    """A class name in words: ApplyEyeMakeup → apply eye makeup, brush_hair → brush hair."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)
    return " ".join(spaced.replace("_", " ").replace("-", " ").lower().split())


class ActionTask(Task):
    name = "action"

    def __init__(self, config: ActionConfig, ranks: "RankInfo", device: Any):
        super().__init__(config, ranks, device)
        self.classes = load_classes(config.classes)
        self.lookup: dict[str, int] = {}
        for i, name in enumerate(self.classes):
            self.lookup.setdefault(name, i)
            self.lookup.setdefault(class_words(name), i)
        self.clip = ClipText(config.clip, device)

    def label_index(self, label: Any) -> int:
        if isinstance(label, int) and not isinstance(label, bool):
            if 0 <= label < len(self.classes):
                return label
            raise ValueError(f"label {label} outside the {len(self.classes)} classes of {self.config.classes}")
        if isinstance(label, str):
            for form in (label.strip(), class_words(label)):
                if form in self.lookup:
                    return self.lookup[form]
        raise ValueError(f"label {label!r} is not a class of {self.config.classes}")

    def parse(self, index: int, sample: dict[str, Any]) -> EvalItem:
        item = base_item(index, sample, self.config.prompt or None)
        label = sample["json"].get("label", item.answer)
        item.fields["label_index"] = self.label_index(label)
        item.fields["label"] = self.classes[item.fields["label_index"]]
        return item

    def score(self, records):
        if records is None:
            return None
        if not records:
            return [(f"top-{k}", None, "pct") for k in self.config.ks] + [("samples", 0, "count")]
        prompts = [self.config.class_template.replace("{class}", class_words(c)) for c in self.classes]
        similarity = text_similarity(self.clip.embed, [r["prediction"] for r in records], prompts)
        labels = [r["label_index"] for r in records]
        ranks = metrics.target_ranks(similarity, labels)
        for r, rank, row in zip(records, ranks, similarity):
            r["rank"] = int(rank)
            r["top"] = [self.classes[j] for j in row.argsort(kind="stable")[::-1][:5]]
        accuracy = metrics.topk_accuracy(similarity, labels, self.config.ks)
        return [(f"top-{k}", accuracy[k], "pct") for k in self.config.ks] + [("classes", len(self.classes), "count")]


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
    from train.shardstage import RankInfo, pick_device, process_group, source_stages

    ranks = RankInfo.from_env()
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
        print(f"usage: python train/evaluate.py {{{','.join(MAINS)}}} [options]", file=sys.stderr)
        sys.exit(2)
    sys.exit(MAINS[sys.argv[1]](sys.argv[2:], prog=f"train/evaluate.py {sys.argv[1]}"))
