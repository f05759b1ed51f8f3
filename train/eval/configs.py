"""Settings of the ``vlmr eval`` commands (typed, checked, one class per command) and the
constants the package shares. See :mod:`train.eval`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from dataengine import config as cfg
from train.llm_client import EndpointSettings, is_url
from train.prompt_files import PROMPTS

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


@dataclass  # (bases in this order so that --help lists EvalConfig's fields first)
class JudgedEvalConfig(EndpointSettings, EvalConfig):
    """Settings of the evaluations an LLM judges. The endpoint settings (:class:`EndpointSettings`)
    are generate-qa's too; here ``--concurrency`` counts judge requests per rank."""

    judge: str = ""
    """The judge: 'tiny', a local causal-LM folder, or an OpenAI-compatible base URL (http://host:port/v1)."""
    judge_model: str = ""
    """Model name sent to a URL judge (required with a URL)."""
    judge_cache: str = ""
    """Judge reply cache (default: $VLMR_CACHE/llm); a re-run sends no request already answered."""
    judge_max_tokens: int = 128
    """Most tokens per judge reply."""
    judge_device: Literal["cpu", "cuda"] = "cpu"
    """Where a local judge runs."""

    def problems(self) -> list[str]:
        p = super().problems()
        cfg.check(p, bool(self.judge), "--judge: 'tiny', a local model folder or an http(s) URL is required")
        cfg.check(p, not is_url(self.judge) or bool(self.judge_model), "--judge-model: required with a URL judge")
        cfg.check(p, self.judge_max_tokens >= 1, "--judge-max-tokens must be >= 1")
        p += self.endpoint_problems()
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
