"""``vlmr generate-qa``: object-centric QA pairs from Video Localized Narratives, by an LLM.

The paper's SFT mix holds 180k question-answer pairs that an LLM wrote from Video Localized
Narratives (per-actor descriptions of appearance and actions; paper §3.2, Appendix B). For
each video this command fills ``train/prompts/object_qa.txt`` with the actors' descriptions,
asks the LLM for pairs about each object's appearance, its actions and their order, and the
relations between objects, checks the reply, and writes Video-ChatGPT JSON that
``vlmr build-shards`` ingests as is::

    [{"video_id": "c1a40349", "q": "...", "a": "...", "source": "vln-object-qa"}, ...]

Input: JSONL, one narrative per line (blank lines allowed; mouse traces are ignored). Either
the real Video Localized Narratives records::

    {"video_id": "c1a40349", "dataset_id": "OVIS_train", "actor_narratives": [
        {"actor_name": "Group of people", "caption": "A group of people is cycling ...",
         "traces": [...], ...}, ...], ...}

(``description`` is read where ``caption`` is absent), or the simple form::

    {"video_id": "v1", "actors": [{"name": "Dog", "description": "A brown dog runs ..."}]}

An actor named ``background`` describes the scene: it fills ``$background`` and is not an
actor that answers must mention. An actor without a description is left out and counted.

A reply must hold a JSON list of ``{"question", "answer"}`` (the first JSON array of objects
in the text is taken; code fences and chatter around it are fine). Otherwise the request is
asked again, at most ``--parse-retries`` times, each time with seed+1 and at least
``--retry-temperature`` (a greedy request would only repeat itself); then the video goes to
the rejects file (``OUT.rejects.jsonl``) with every raw reply and the last attempt's reason:
``unparseable`` (no JSON array), ``not_pairs`` (arrays, but no question-answer objects) or
``llm_error`` (the endpoint failed after its own retries; such a video is asked again by a
re-run). Of the pairs, items that are not question-answer objects, those with an empty side,
those whose answer names no actor of the video (a content word of an actor's name, plural or
singular), and repeats of a question already kept are dropped and counted. Replies are
cached (``--cache``, default ``$VLMR_CACHE/llm``) by (model, prompt, settings, video), so a
re-run or a resumed run sends no request twice; ``OUT.summary.json`` records the settings
and counts.

Run::

    vlmr generate-qa --narratives vidln/OVIS_train.jsonl --llm tiny --out qa.json
    OPENAI_API_KEY=... vlmr generate-qa --narratives vidln/OVIS_train.jsonl \\
        --llm https://api.openai.com/v1 --model gpt-4o-mini --concurrency 8 --out qa.json
    vlmr build-shards --annotations vcg.json qa.json --videos videos/ --out shards/sft
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import string
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from tqdm import tqdm

from dataengine import config as cfg
from dataengine.models import cache_root
from dataengine.schema import write_text_atomic
from train import prompt_files
from train.llm_client import EndpointSettings, LLMClient, LLMError, Message, is_url, make_client, ordered_map

log = logging.getLogger(__name__)

SOURCE = "vln-object-qa"
DEFAULT_PROMPT = prompt_files.PROMPTS / "object_qa.txt"
BACKGROUND = "background"


@dataclass
class GenerateQAConfig(EndpointSettings):
    """Write object-centric QA pairs from Video Localized Narratives with an LLM."""

    narratives: str = ""
    """Video Localized Narratives JSONL (real `actor_narratives` records or the simple `actors` form)."""
    llm: str = ""
    """The LLM: 'tiny', a local causal-LM folder, or an OpenAI-compatible base URL (http://host:port/v1)."""
    out: str = "qa.json"
    """Output Video-ChatGPT JSON; OUT.rejects.jsonl and OUT.summary.json are written beside it."""
    model: str = ""
    """Model name sent to a URL endpoint (required with a URL; a local model is named by its path)."""
    prompt: str = ""
    """Prompt template file (default: train/prompts/object_qa.txt; must use $actors)."""
    cache: str = ""
    """Reply cache folder (default: $VLMR_CACHE/llm). Shared by runs; makes re-runs free."""
    pairs_per_video: int = 6
    """How many pairs the prompt asks for per video."""
    temperature: float = 0.0
    """Sampling temperature of the first request per video (0 = greedy)."""
    seed: int = 0
    """Seed of the first request per video; retry k uses seed + k."""
    max_tokens: int = 1024
    """Most tokens per reply."""
    parse_retries: int = 2
    """Times a video is asked again when its reply is not a list of question-answer pairs."""
    retry_temperature: float = 0.7
    """Lowest temperature of those retries (at temperature 0 a retry would repeat the reply)."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where a local model runs."""
    limit: int = 0
    """Only the first N narratives (0 = all): try a prompt on a few videos first."""
    on_error: Literal["raise", "skip"] = "raise"
    """Malformed narrative records: stop with the file and line, or skip and count them."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        cfg.check(problems, bool(self.narratives), "--narratives: the narratives JSONL is required")
        cfg.check(problems, bool(self.llm), "--llm: 'tiny', a local model folder or an http(s) URL is required")
        cfg.check(problems, bool(self.out), "--out: the output file is required")
        cfg.check(problems, not is_url(self.llm) or bool(self.model), "--model: required with a URL endpoint")
        cfg.check(problems, self.pairs_per_video >= 1, f"--pairs-per-video must be >= 1, got {self.pairs_per_video}")
        cfg.check(problems, self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}")
        cfg.check(problems, self.retry_temperature >= 0,
                  f"--retry-temperature must be >= 0, got {self.retry_temperature}")
        cfg.check(problems, self.max_tokens >= 1, f"--max-tokens must be >= 1, got {self.max_tokens}")
        cfg.check(problems, self.parse_retries >= 0, f"--parse-retries must be >= 0, got {self.parse_retries}")
        cfg.check(problems, self.limit >= 0, f"--limit must be >= 0, got {self.limit}")
        problems += self.endpoint_problems()
        cfg.raise_problems(problems, "generate-qa settings")

    @property
    def out_path(self) -> Path:
        return Path(self.out)

    @property
    def rejects_path(self) -> Path:
        return self.out_path.with_name(self.out_path.name + ".rejects.jsonl")

    @property
    def summary_path(self) -> Path:
        return self.out_path.with_name(self.out_path.name + ".summary.json")

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache) if self.cache else cache_root() / "llm"


# ----------------------------------------------------------------------------- narratives

class NarrativeError(ValueError):
    """A narratives file or record that cannot be read; the message names file and line."""


@dataclass(frozen=True)
class Actor:
    name: str
    description: str


@dataclass(frozen=True)
class Narrative:
    """One video's narrative: its actors (in the annotator's order) and the scene, if told."""

    video_id: str
    actors: tuple[Actor, ...]
    background: str = ""
    line: int = 0


@dataclass
class NarrativeStats:
    records: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)
    actors_without_description: int = 0


def _clean(value: Any) -> str:
    return " ".join(value.split()) if isinstance(value, str) else ""


def narrative_from_record(raw: Any, line: int = 0, stats: NarrativeStats | None = None) -> Narrative:
    """A :class:`Narrative` from one JSON record of either schema; ValueError if unusable."""
    if not isinstance(raw, dict):
        raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
    video_id = raw.get("video_id")
    if isinstance(video_id, (int, float)) and not isinstance(video_id, bool):
        video_id = str(video_id)
    if not isinstance(video_id, str) or not video_id.strip():
        raise ValueError("missing video_id")
    if "actor_narratives" in raw:
        items, name_key = raw["actor_narratives"], "actor_name"
    elif "actors" in raw:
        items, name_key = raw["actors"], "name"
    else:
        raise ValueError("no 'actor_narratives' (Video Localized Narratives) or 'actors' list")
    if not isinstance(items, list):
        raise ValueError(f"actors must be a list, got {type(items).__name__}")
    actors, background = [], []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"actor {i} is not an object")
        name = _clean(item.get(name_key))
        if not name:
            raise ValueError(f"actor {i} has no {name_key!r}")
        description = _clean(item.get("caption")) or _clean(item.get("description"))
        if not description:
            if stats is not None:
                stats.actors_without_description += 1
            continue
        if name.lower() == BACKGROUND:
            background.append(description)
        else:
            actors.append(Actor(name, description))
    if not actors:
        raise ValueError("no actor with a description")
    return Narrative(video_id=video_id.strip(), actors=tuple(actors), background=" ".join(background), line=line)


def read_narratives(path: str | Path, *, on_error: str = "raise",
                    stats: NarrativeStats | None = None) -> Iterator[Narrative]:
    """Narratives of a JSONL file, in file order. A bad line raises :class:`NarrativeError`
    naming the file and line, or with ``on_error="skip"`` is counted in ``stats`` and logged."""
    path = Path(path)
    if not path.is_file():
        raise NarrativeError(f"{path}: narratives file not found")
    stats = stats if stats is not None else NarrativeStats()
    with open(path, encoding="utf-8-sig") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                try:
                    raw = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"not JSON ({exc.msg})") from None
                narrative = narrative_from_record(raw, number, stats)
            except ValueError as exc:
                if on_error == "raise":
                    raise NarrativeError(f"{path}:{number}: {exc}") from None
                stats.skipped += 1
                stats.reasons[str(exc).split(" (")[0]] += 1
                log.warning("%s:%d: skipped: %s", path, number, exc)
                continue
            stats.records += 1
            yield narrative


# ----------------------------------------------------------------------------- prompt

def load_prompt(path: str | Path | None = None) -> string.Template:
    """The prompt template (default ``object_qa.txt``); must use ``$actors``."""
    return prompt_files.load_prompt(path or DEFAULT_PROMPT, required=("actors",),
                                    allowed=("background", "pairs_per_video"))


def build_messages(template: string.Template, narrative: Narrative, pairs_per_video: int) -> list[Message]:
    actors = "\n".join(f"- {a.name}: {a.description}" for a in narrative.actors)
    background = f"Background: {narrative.background}\n" if narrative.background else ""
    text = template.substitute(actors=actors, background=background, pairs_per_video=pairs_per_video)
    return [{"role": "user", "content": re.sub(r"\n{3,}", "\n\n", text)}]


# ----------------------------------------------------------------------------- reply parsing

class ReplyError(ValueError):
    """A reply that holds no list of question-answer pairs; ``reason`` is its count key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


_FENCE = re.compile(r"```[a-zA-Z]*")


def parse_pairs(text: str) -> list[Any]:
    """The first JSON array in ``text`` that holds at least one object with a question and an
    answer. Keys are matched without case; ``q``/``a`` are accepted too. Returns the array's
    items (non-pair items included: :func:`filter_pairs` counts them)."""
    cleaned = _FENCE.sub("", text or "")
    decoder = json.JSONDecoder()
    found_array = False
    for match in re.finditer(r"\[", cleaned):
        try:
            value, _ = decoder.raw_decode(cleaned, match.start())
        except json.JSONDecodeError:
            continue
        if not isinstance(value, list):
            continue
        found_array = True
        if any(_pair_fields(item) is not None for item in value):
            return value
    if found_array:
        raise ReplyError("not_pairs", "a JSON array, but no {question, answer} objects in it")
    raise ReplyError("unparseable", "no JSON array in the reply")


def _pair_fields(item: Any) -> tuple[Any, Any] | None:
    if not isinstance(item, dict):
        return None
    lowered = {str(k).lower(): v for k, v in item.items()}
    question = lowered.get("question", lowered.get("q"))
    answer = lowered.get("answer", lowered.get("a"))
    if question is None or answer is None:
        return None
    return question, answer


_STOPWORDS = frozenset(
    "a an the of in on at to with and or by for from into onto over under near its his her their "
    "this that these those is are was were be who which one some other another".split())
_IRREGULAR = {"men": "man", "women": "woman", "people": "person", "children": "child", "persons": "person"}


def _word(word: str) -> str:
    word = _IRREGULAR.get(word, word)
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]  # "dogs" mentions "dog"; a crude stem is enough to match a name
    return word


def _words(text: str) -> list[str]:
    return [_word(w) for w in re.findall(r"[a-z0-9]+", text.lower())]


def actor_keywords(name: str) -> frozenset[str]:
    """The words of an actor's name that count as mentioning it (``Man in black`` → man, black)."""
    return frozenset(w for w in _words(name) if w not in _STOPWORDS and len(w) > 1)


def mentions_actor(text: str, actors: tuple[Actor, ...]) -> bool:
    """True when ``text`` uses a content word of some actor's name (plural or singular)."""
    words = set(_words(text))
    for actor in actors:
        keywords = actor_keywords(actor.name)
        # A name of stopwords only ("It") must appear as whole words.
        if keywords & words or (not keywords and set(_words(actor.name)) <= words):
            return True
    return False


def _normalised(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def filter_pairs(items: list[Any], actors: tuple[Actor, ...], dropped: Counter) -> list[tuple[str, str]]:
    """Kept ``(question, answer)`` pairs; every dropped item is counted in ``dropped`` under
    ``malformed_pair``, ``empty``, ``no_actor_mentioned`` or ``duplicate`` (a question already
    kept for this video, compared without case and punctuation)."""
    kept: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in items:
        fields = _pair_fields(item)
        if fields is None or not all(isinstance(v, str) for v in fields):
            dropped["malformed_pair"] += 1
            continue
        question, answer = (" ".join(v.split()) for v in fields)
        if not question or not answer:
            dropped["empty"] += 1
            continue
        if not mentions_actor(answer, actors):
            dropped["no_actor_mentioned"] += 1
            continue
        key = _normalised(question)
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        kept.append((question, answer))
    return kept


# ----------------------------------------------------------------------------- per video

@dataclass
class VideoResult:
    narrative: Narrative
    pairs: list[tuple[str, str]] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    reject: dict[str, Any] | None = None
    requests: int = 0
    cached: int = 0
    usage: Counter = field(default_factory=Counter)
    """Tokens of replies produced in this run (cached replies cost nothing now)."""


def generate_for_video(client: LLMClient, template: string.Template, narrative: Narrative,
                       config: GenerateQAConfig) -> VideoResult:
    """Ask, check, ask again on a bad reply; returns the kept pairs or a reject record."""
    result = VideoResult(narrative)
    messages = build_messages(template, narrative, config.pairs_per_video)
    replies: list[str] = []
    reason, message = "", ""
    for attempt in range(config.parse_retries + 1):
        temperature = config.temperature if attempt == 0 else max(config.temperature, config.retry_temperature)
        try:
            completion = client.complete(messages, temperature=temperature, seed=config.seed + attempt,
                                         max_tokens=config.max_tokens, label=narrative.video_id)
        except LLMError as exc:
            if exc.fatal:
                raise
            reason, message = "llm_error", str(exc)
            break  # the client already retried with backoff; a re-run tries again (not cached)
        result.requests += 1
        if completion.cached:
            result.cached += 1
        elif completion.usage:
            result.usage.update(completion.usage)
        replies.append(completion.text)
        try:
            items = parse_pairs(completion.text)
        except ReplyError as exc:
            reason, message = exc.reason, str(exc)
            continue
        result.pairs = filter_pairs(items, narrative.actors, result.dropped)
        return result
    result.reject = {"video_id": narrative.video_id, "line": narrative.line, "reason": reason,
                     "message": message, "attempts": len(replies), "replies": replies}
    return result


# ----------------------------------------------------------------------------- run

@dataclass
class QASummary:
    videos: int = 0
    videos_with_pairs: int = 0
    pairs: int = 0
    rejected: Counter = field(default_factory=Counter)
    """Videos whose replies were rejected, by reason."""
    dropped: Counter = field(default_factory=Counter)
    """Pairs filtered out, by reason."""
    records_skipped: int = 0
    actors_without_description: int = 0
    requests: int = 0
    cached: int = 0
    tokens: Counter = field(default_factory=Counter)

    def lines(self) -> list[str]:
        def counts(c: Counter) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"
        if self.tokens:
            total = self.tokens["total_tokens"] or self.tokens["prompt_tokens"] + self.tokens["completion_tokens"]
            token_line = (f"tokens: {total} (prompt {self.tokens['prompt_tokens']}, "
                          f"completion {self.tokens['completion_tokens']})")
        elif self.requests == self.cached:
            token_line = "tokens: none spent (every reply from the cache)"
        else:
            token_line = "tokens: not reported by the endpoint"
        return [
            f"videos: {self.videos} ({self.videos_with_pairs} with pairs); {self.records_skipped} malformed "
            f"records skipped, {self.actors_without_description} actors without description left out",
            f"pairs kept: {self.pairs}",
            f"rejected videos: {sum(self.rejected.values())} ({counts(self.rejected)})",
            f"dropped pairs: {sum(self.dropped.values())} ({counts(self.dropped)})",
            f"replies: {self.requests} ({self.cached} from cache, {self.requests - self.cached} asked now); "
            f"{token_line}",
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"videos": self.videos, "videos_with_pairs": self.videos_with_pairs, "pairs": self.pairs,
                "rejected": dict(self.rejected), "dropped": dict(self.dropped),
                "records_skipped": self.records_skipped,
                "actors_without_description": self.actors_without_description,
                "replies": self.requests, "cached": self.cached, "tokens": dict(self.tokens)}


def generate(config: GenerateQAConfig, client: LLMClient | None = None, progress: bool = True) -> QASummary:
    """Run the whole command; ``client`` overrides the one built from ``config`` (it should
    already be cached if a cache is wanted)."""
    template = load_prompt(config.prompt or None)
    stats = NarrativeStats()
    narratives = list(itertools.islice(read_narratives(config.narratives, on_error=config.on_error, stats=stats),
                                       config.limit or None))
    if client is None:
        client = make_client(config.llm, model=config.model, cache_dir=config.cache_dir,
                             device=config.device, **config.client_kwargs())
    summary = QASummary(records_skipped=stats.skipped, actors_without_description=stats.actors_without_description)
    rows: list[dict[str, str]] = []
    rejects: list[dict[str, Any]] = []
    bar = tqdm(total=len(narratives), desc="generate-qa", unit="video", disable=not progress)
    results = ordered_map(lambda n: generate_for_video(client, template, n, config), narratives,
                          workers=min(config.concurrency, client.concurrency))
    for result in results:
        summary.videos += 1
        summary.requests += result.requests
        summary.cached += result.cached
        summary.tokens.update(result.usage)
        summary.dropped.update(result.dropped)
        if result.reject is not None:
            summary.rejected[result.reject["reason"]] += 1
            rejects.append(result.reject)
        if result.pairs:
            summary.videos_with_pairs += 1
        for question, answer in result.pairs:
            rows.append({"video_id": result.narrative.video_id, "q": question, "a": answer, "source": SOURCE})
        summary.pairs = len(rows)
        bar.update(1)
        bar.set_postfix(pairs=summary.pairs, rejected=sum(summary.rejected.values()), refresh=False)
    bar.close()

    write_text_atomic(config.out_path, json.dumps(rows, ensure_ascii=False, indent=1) + "\n")
    write_text_atomic(config.rejects_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    write_text_atomic(config.summary_path, json.dumps(
        {"settings": cfg.to_dict(config), "llm": client.identity, "summary": summary.to_dict()},
        ensure_ascii=False, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None, prog: str = "vlmr generate-qa") -> int:
    try:
        config = cfg.parse_config(GenerateQAConfig, argv, prog=prog)
    except cfg.ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    try:
        summary = generate(config)
    except (NarrativeError, FileNotFoundError, ValueError, LLMError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {config.out} ({summary.pairs} pairs); rejects in {config.rejects_path}")
    for line in summary.lines():
        print("  " + line)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
