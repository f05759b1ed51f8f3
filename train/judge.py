"""``vlmr judge``: two sampled answers per prompt, judged with the video's context -> preference shards.

The paper's context-aware preference collection (§3.1, Table 5), per prompt:

1. **Sample** two responses from the SFT model (temperature / top-p sampling, KV cache, the
   prompts of ``batch_size`` samples in one ``generate`` call). A pair that is identical
   (after whitespace normalisation) or has an empty response is sampled again, at most
   ``max_resample`` times, then dropped and counted.
2. **Judge** it: the judge model (the SFT model, or ``--judge-model``) gets the video's
   features and the user turn of ``train/prompts/judge_question.txt``: the rules
   (``judge_rules.txt``), the context chosen by ``--context``, the question and answers A
   and B. ``--context none`` gives no description, ``video`` one caption of the whole video
   (``narrative_video``), ``clips`` the per-clip narrative (``narrative``); the last two come
   from ``vlmr narrate``. So the paper's ablation (no context / 1 clip / 3 clips) is a flag.
3. **Read the verdict from probabilities, twice.** The preference is the judge's next-token
   distribution right after ``ASSISTANT:``, restricted to the two tokens that start the
   replies " A" and " B" (the first token the tokenizer gives for the reply text " A" / " B"
   appended to the prompt; checked to decode to "A" / "B"): ``p_A = P(A) / (P(A) + P(B))``.
   Nothing is parsed from generated text. Each pair is asked in both orders: response 1 in
   position A (``p_a_first`` = P(response 1)), then response 2 in position A
   (``p_a_swapped`` = P(response 2)). Position bias cancels in the average
   ``p_first = (p_a_first + 1 - p_a_swapped) / 2``; the chosen response is the one it
   favours, ``margin = |p_a_first - p_a_swapped|`` and the two orders *agree* when both
   pick the same response. Disagreeing pairs are dropped (``--disagreement drop``) or kept
   with ``soft_label`` = P(chosen better) = (1 + margin) / 2 (``soft``); both are counted.
   A judge that always says "A" disagrees with itself on every pair, so position bias is
   dropped, not learned.

Output: a shard set with one stage, ``pairs``; per sample ``json`` and ``feat.npy`` (and
``clips.npy`` with ``--keep-clips``)::

    id, video_id, source, qtype, ...      as in the input
    stage "pairs", prompt_stage           the input stage (easy / hard)
    answer_tokens                         the dataset answer's length (keeps the stream's order)
    conversations                         the prompt: the turns up to the last human turn
    reference                             the dataset's answer to it (not judged)
    chosen, rejected                      the two sampled responses
    narrative                             the context text the judge saw ("" with --context none)
    judge                                 {p_a_first, p_a_swapped, margin, agree, chosen_is_first,
                                           context, model, sampler, ab_mass?, soft_label?}
    responses                             {chosen_ended, rejected_ended, attempts}

``ab_mass`` is the judge's next-token probability mass on the two letter tokens in the two
asks: near 0 means the judge does not answer in the expected format and its verdicts are
noise. ``soft_label`` only appears on disagreeing pairs kept by ``--disagreement soft``;
elsewhere the label is 1 (chosen is better).

Outcomes counted in the closing summary (and written to failures.jsonl when dropped):
``kept``, ``kept_soft``, ``dropped_identical``, ``dropped_empty``, ``dropped_disagreement``,
``too_long`` (the prompt plus ``max_new_tokens``, or the judge's prompt, does not fit
``max_length``), ``bad_sample`` and ``unreadable`` (with ``--on-error skip``).

**Determinism.** The two responses of a batch are sampled with a seed made from ``--seed``,
the keys of the batch's samples and the attempt number; batches are cut within one unit of
work (``train/shardpass.py``), which does not depend on ranks. So 1 or N ranks, and a run
killed and resumed, write the same pairs.

Run::

    vlmr judge --model runs/sft/model --in shards/demo-narrated --out shards/demo-pairs --context clips
    vlmr judge --config train/configs/judge_tiny.yaml
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m train.judge --model ... --in ... --out ...
    # after a kill: the same command again (finished shards are kept)

Tests: ``pytest tests/test_judge.py`` (a ground-truth judge and sampler built from the
synthetic world live in ``tests/judge_fixtures.py``).
"""

from __future__ import annotations

import logging
import math
import os
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Protocol, Sequence

import torch

from dataengine import config as cfg
from dataengine import schema
from dataengine.dist import Ranks
from train import shardpass
from train.prompt_files import PROMPTS, load_prompt
from train.narrate import VIDEO_TOKEN, clean_text, context_length, load_model, \
    model_fingerprint
from train.shardpass import Outcome, PassSummary

log = logging.getLogger(__name__)

DEFAULT_RULES = PROMPTS / "judge_rules.txt"
DEFAULT_QUESTION = PROMPTS / "judge_question.txt"
CONTEXT_FIELDS = {"video": "narrative_video", "clips": "narrative"}
# Input json fields that do not describe a preference pair (replaced or meaningless there).
_NOT_COPIED = ("conversations", "narrative", "narrative_clips", "narrative_video", "stage")


@dataclass
class JudgeConfig:
    """Sample two answers per prompt with the SFT model and judge them with the video's context."""

    model: str = ""
    """SFT model folder: samples the two responses (and judges them unless --judge-model)."""
    judge_model: str = ""
    """Another local VideoLMM folder to judge with (default: the SFT model itself, as in the paper)."""
    input: str = ""
    """Prompt shards (`vlmr narrate` output for --context video|clips): folder or manifest.json. `--in` works too."""
    out: str = ""
    """Output folder for the preference shards (stage 'pairs')."""
    stages: list[str] = field(default_factory=list)
    """Input stages to read, in this order (default: every stage of the input, in manifest order)."""
    context: Literal["none", "video", "clips"] = "clips"
    """What the judge reads about the video: nothing, one caption of the whole video, or the per-clip narrative."""
    temperature: float = 1.0
    """Sampling temperature of the two responses."""
    top_p: float = 0.9
    """Nucleus sampling of the two responses (1 keeps the whole distribution)."""
    max_new_tokens: int = 256
    """Most tokens per response."""
    max_resample: int = 2
    """Times an identical or empty pair is sampled again before it is dropped."""
    disagreement: Literal["drop", "soft"] = "drop"
    """Pairs whose two orders disagree: drop them, or keep them with a soft label."""
    rules: str = ""
    """Rules file (default: train/prompts/judge_rules.txt)."""
    question_prompt: str = ""
    """Judge prompt template (default: train/prompts/judge_question.txt)."""
    batch_size: int = 8
    """Prompts per batch: 2x this many rows per generate call and per judge forward."""
    samples_per_shard: int = 256
    """Most samples per output shard (one shard per run of this many input samples: the unit of resume)."""
    keep_clips: bool = False
    """Copy the per-clip features (clips.npy) into the pairs too."""
    max_length: int = 0
    """Longest sequence a model may see, video rows included (0: the LM's own limit)."""
    seed: int = 0
    """Seeds the response sampling (with each batch's sample keys and the attempt number)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the models run; under torchrun each rank takes cuda:LOCAL_RANK."""
    dtype: str = ""
    """Compute dtype of the base LMs: float32 or bfloat16 (default: as the models were saved)."""
    on_error: Literal["raise", "skip"] = "raise"
    """Unreadable or malformed samples: stop naming the shard and key, or skip and count them."""
    overwrite: bool = False
    """Replace an output folder that holds another run (otherwise a rerun resumes)."""
    progress: bool = True
    """Show a progress bar (rank 0)."""

    def __post_init__(self) -> None:
        p: list[str] = []
        cfg.check(p, bool(self.model), "--model: the SFT model folder is required")
        cfg.check(p, bool(self.input), "--in: the input shard set is required")
        cfg.check(p, bool(self.out), "--out: the output folder is required")
        cfg.check(p, self.temperature > 0, f"--temperature must be > 0, got {self.temperature}")
        cfg.check(p, 0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        cfg.check(p, self.max_new_tokens >= 1, "--max-new-tokens must be >= 1")
        cfg.check(p, self.max_resample >= 0, "--max-resample must be >= 0")
        cfg.check(p, self.batch_size >= 1, "--batch-size must be >= 1")
        cfg.check(p, self.samples_per_shard >= 1, "--samples-per-shard must be >= 1")
        cfg.check(p, self.max_length >= 0, "--max-length must be >= 0")
        cfg.check(p, self.seed >= 0, "--seed must be >= 0")
        cfg.check(p, self.dtype in ("", "float32", "bfloat16", "float16"),
                  f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        cfg.raise_problems(p, "judge settings")


# Settings that do not change what is written (left out of the resume check).
NOT_IDENTITY = ("model", "judge_model", "input", "out", "device", "overwrite", "progress")


# ---------------------------------------------------------------------------- protocols

@dataclass(frozen=True)
class Response:
    """One sampled answer."""

    text: str
    ended: bool = True
    """The sampler ended it itself (EOS) within its token budget."""


class ResponseSampler(Protocol):
    """Samples two responses per prompt; ``name`` is recorded with every pair."""

    name: str

    def sample(self, samples: Sequence[dict[str, Any]], prompts: Sequence[list[dict[str, str]]],
               seed: int) -> list[tuple[Response, Response] | None]:
        """Two responses for each (sample, prompt turns), or None when the prompt does not fit.

        Must depend only on its arguments (``seed`` changes with each attempt)."""
        ...


@dataclass(frozen=True)
class Comparison:
    """One question to the judge: which of two answers is better."""

    sample: dict[str, Any]
    """The input sample (``key``, ``json``, ``feat``...)."""
    question: str
    answer_a: str
    answer_b: str
    context: str
    """The video's description per --context ("" for none)."""


class Judge(Protocol):
    """Says how likely answer A is the better one; ``name`` is recorded with every pair.

    ``prefer`` returns one probability per comparison, or None when it cannot judge it (the
    prompt does not fit). A judge may also expose ``last_mass``: per comparison of the last
    call, the probability mass it put on the two letter tokens (a format check).
    """

    name: str

    def prefer(self, comparisons: Sequence[Comparison]) -> list[float | None]: ...


# ---------------------------------------------------------------------------- pure parts

@dataclass(frozen=True)
class Verdict:
    """The debiased decision over the two asks of one pair."""

    first_is_better: bool
    """Response 1 is chosen (at an exact tie, 0.5, response 1 is)."""
    agree: bool
    """Both asks favour the same response (neither is exactly 0.5)."""
    margin: float
    """|p_a_first - p_a_swapped| in [0, 1]: how far the debiased preference is from a coin toss."""
    p_chosen: float
    """Debiased probability that the chosen response is better: (1 + margin) / 2."""


def decide(p_a_first: float, p_a_swapped: float) -> Verdict:
    """Combine the two asks of a pair.

    ``p_a_first``: P(A) with response 1 in position A; ``p_a_swapped``: P(A) with response 2
    in position A. E.g. (0.8, 0.3): P(response 1 better) = (0.8 + 0.7) / 2 = 0.75, both asks
    favour response 1: chosen 1, agree, margin 0.5, p_chosen 0.75. A judge that always says
    A, (0.9, 0.9): 0.5, the asks favour different responses: disagree, margin 0.
    """
    for p in (p_a_first, p_a_swapped):
        if not (0.0 <= p <= 1.0) or math.isnan(p):
            raise ValueError(f"a judge probability must be in [0, 1], got {p}")
    p_first = (p_a_first + (1.0 - p_a_swapped)) / 2.0
    first_wins_first_ask = p_a_first > 0.5
    first_wins_swapped_ask = p_a_swapped < 0.5
    agree = (first_wins_first_ask == first_wins_swapped_ask) and p_a_first != 0.5 and p_a_swapped != 0.5
    margin = abs(p_a_first - p_a_swapped)
    return Verdict(first_is_better=p_first >= 0.5, agree=agree, margin=margin, p_chosen=(1.0 + margin) / 2.0)


def prompt_turns(conversations: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """The prompt of a conversation: its turns up to and including the last human turn."""
    last = max((i for i, t in enumerate(conversations) if t.get("from") in ("human", "user")), default=None)
    if last is None:
        raise ValueError("conversation has no human turn to answer")
    return [{"from": t["from"], "value": t["value"]} for t in conversations[:last + 1]]


def reference_answer(conversations: Sequence[dict[str, Any]], prompt_length: int) -> str | None:
    """The dataset's answer to the prompt (the turn after it), if any."""
    if prompt_length < len(conversations) and conversations[prompt_length].get("from") in ("gpt", "assistant"):
        return conversations[prompt_length]["value"]
    return None


def question_text(turns: Sequence[dict[str, str]]) -> str:
    """The question as the judge reads it: earlier turns as "USER:/ASSISTANT:" lines, then the
    last question; the video placeholder removed (the judge's prompt holds the video once)."""
    from train.conversation import ROLES

    lines = [f"{ROLES.get(t['from'], t['from'])}: {clean_text(t['value'])}" for t in turns[:-1]]
    lines.append(clean_text(turns[-1]["value"]))
    return "\n".join(lines)


def normalise(text: str) -> str:
    return " ".join(text.split())


def judge_text(template: string.Template, *, rules: str, context: str, question: str, answer_a: str,
               answer_b: str) -> str:
    """The judge's user turn; without context, the template's lines holding $context are left out."""
    if not context:
        lines = [line for line in template.template.splitlines() if "$context" not in line
                 and "${context}" not in line]
        template = string.Template("\n".join(lines))
    return template.substitute(rules=rules, context=context, question=question, answer_a=answer_a,
                               answer_b=answer_b).strip()


def context_of(sample: dict[str, Any], mode: str) -> str:
    """The context text of a sample per mode; a missing narrative is an error naming the key."""
    if mode == "none":
        return ""
    name = CONTEXT_FIELDS[mode]
    value = sample["json"].get(name)
    if not isinstance(value, str):
        hint = " (with --whole-video)" if mode == "video" else ""
        raise ValueError(f"{sample['shard']}: key {sample['key']!r}: --context {mode} needs the json field "
                         f"{name!r}: run `vlmr narrate`{hint} on the prompt shards first")
    return clean_text(value)


def choice_token_ids(chat) -> tuple[int, int]:
    """Ids of the first tokens of the replies "A" and "B", as the model's chat template
    (a :class:`train.conversation.ChatTemplate`) tokenizes an answer in training.

    Found by tokenizing a judge exchange whose answer is the letter (never hard-coded);
    each must decode to its letter, and they must differ.
    """
    from train.conversation import IGNORE_INDEX

    tokenizer = chat.tokenizer
    question = {"from": "human", "value": f"{VIDEO_TOKEN}\nWhich answer is better, A or B?"}
    ids = []
    for letter in "AB":
        full, labels = chat.tokenize([question, {"from": "gpt", "value": letter}])
        token = next(i for i, lab in zip(full, labels) if lab != IGNORE_INDEX)
        if tokenizer.decode([token]).strip() != letter:
            raise ValueError(f"tokenizer {type(tokenizer).__name__}, template {chat.name}: the first token of the "
                             f"reply {letter!r} is {tokenizer.decode([token])!r}, not the letter; cannot read "
                             "the judge's verdict from one token")
        ids.append(int(token))
    if ids[0] == ids[1]:
        raise ValueError("the replies ' A' and ' B' start with the same token")
    return ids[0], ids[1]


# ---------------------------------------------------------------------------- the models

class ModelSampler:
    """Two sampled responses per prompt from a :class:`train.model.VideoLMM`, one generate call per batch."""

    def __init__(self, model, *, temperature: float, top_p: float, max_new_tokens: int, max_length: int,
                 name: str):
        self.model = model
        self.temperature, self.top_p = temperature, top_p
        self.max_new_tokens, self.max_length = max_new_tokens, max_length
        self.name = name

    def prompt_ids(self, turns: Sequence[dict[str, str]]) -> list[int]:
        return self.model.chat.prompt_ids(turns[-1]["value"], history=turns[:-1])

    def sample(self, samples: Sequence[dict[str, Any]], prompts: Sequence[list[dict[str, str]]],
               seed: int) -> list[tuple[Response, Response] | None]:
        from train import conversation

        video_id = self.model.video_token_id
        out: list[tuple[Response, Response] | None] = [None] * len(samples)
        rows, feats, where = [], [], []
        for i, (sample, turns) in enumerate(zip(samples, prompts)):
            ids = self.prompt_ids(turns)
            length = conversation.spliced_length(len(ids), ids.count(video_id), int(sample["feat"].shape[0]))
            if length + self.max_new_tokens > self.max_length:
                continue
            rows += [ids, ids]
            feats += [sample["feat"], sample["feat"]]
            where.append(i)
        if not rows:
            return out
        gen = self.model.generate(feats, rows, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                  top_p=self.top_p, do_sample=True, seed=seed)
        for k, i in enumerate(where):
            a, b = 2 * k, 2 * k + 1
            out[i] = (Response(clean_text(gen.texts[a]), gen.ended[a]),
                      Response(clean_text(gen.texts[b]), gen.ended[b]))
        return out


class ModelJudge:
    """Preferences from a VideoLMM's next-token probabilities of the two letter tokens."""

    def __init__(self, model, *, template: string.Template, rules: str, max_length: int, batch_rows: int,
                 name: str):
        self.model = model
        self.template, self.rules = template, rules
        self.max_length, self.batch_rows = max_length, batch_rows
        self.name = name
        self.choice_ids = choice_token_ids(model.chat)
        self.last_mass: list[float | None] = []

    def prefer(self, comparisons: Sequence[Comparison]) -> list[float | None]:
        from train import conversation
        from train.model import pad_sequences

        video_id = self.model.video_token_id
        out: list[float | None] = [None] * len(comparisons)
        self.last_mass = [None] * len(comparisons)
        todo = []
        for i, c in enumerate(comparisons):
            text = judge_text(self.template, rules=self.rules, context=c.context, question=c.question,
                              answer_a=c.answer_a, answer_b=c.answer_b)
            ids = self.model.chat.prompt_ids(text)
            if conversation.spliced_length(len(ids), ids.count(video_id), int(c.sample["feat"].shape[0])) \
                    <= self.max_length:
                todo.append((i, ids))
        a_id, b_id = self.choice_ids
        for lo in range(0, len(todo), self.batch_rows):
            chunk = todo[lo:lo + self.batch_rows]
            input_ids, mask = pad_sequences([ids for _, ids in chunk], self.model.pad_token_id, side="left")
            device = self.model.projector[0].weight.device
            feats = [comparisons[i].sample["feat"] for i, _ in chunk]
            # Left padding: the last position of every row is its prompt's last token.
            result = self.model(input_ids.to(device), feats, attention_mask=mask.to(device), padding_side="left",
                                logits_to_keep=1)
            logp = torch.log_softmax(result.logits[:, -1].float(), dim=-1)
            for (i, _), row in zip(chunk, logp):
                out[i] = float(torch.sigmoid(row[a_id] - row[b_id]))
                self.last_mass[i] = float(row[a_id].exp() + row[b_id].exp())
        return out


# ---------------------------------------------------------------------------- the pass

@dataclass
class _Prepared:
    sample: dict[str, Any]
    turns: list[dict[str, str]]
    question: str
    context: str
    responses: tuple[Response, Response] | None = None
    attempts: int = 0
    reason: str | None = None


class JudgeWork:
    """The judge pass over one rank's units (see :class:`train.shardpass.PassWork`)."""

    command = "judge"

    def __init__(self, sampler: ResponseSampler, judge: Judge, *, context: str, batch_size: int,
                 max_resample: int, disagreement: str, keep_clips: bool, seed: int, on_error: str):
        self.sampler, self.judge = sampler, judge
        self.context = context
        self.batch_size = batch_size
        self.max_resample = max_resample
        self.disagreement = disagreement
        self.keep_clips = keep_clips
        self.seed = seed
        self.on_error = on_error
        self._stats = self._zero()

    @staticmethod
    def _zero() -> dict[str, float]:
        return {"responses": 0, "responses_unfinished": 0, "pairs_resampled": 0, "ab_mass_sum": 0.0, "ab_mass_n": 0}

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
        extras, self._stats = self._stats, self._zero()
        return extras

    def merge_extras(self, extras: Sequence[dict[str, Any]]) -> dict[str, Any]:
        total = {k: sum(e.get(k, 0) for e in extras) for k in self._zero()}
        merged = {"responses sampled": int(total["responses"]),
                  "responses without EOS": int(total["responses_unfinished"]),
                  "pairs re-sampled": int(total["pairs_resampled"])}
        if total["ab_mass_n"]:
            merged["mean judge mass on A/B"] = round(total["ab_mass_sum"] / total["ab_mass_n"], 4)
        return merged

    # -- one batch ---------------------------------------------------------------------------
    def _prepare(self, sample: dict[str, Any]) -> _Prepared | tuple[str, str]:
        try:
            conversations = sample["json"].get("conversations")
            if not isinstance(conversations, list):
                raise ValueError("json has no conversations list")
            turns = prompt_turns(conversations)
            return _Prepared(sample=sample, turns=turns, question=question_text(turns),
                             context=context_of(sample, self.context))
        except (ValueError, KeyError, TypeError) as exc:
            message = str(exc) if str(exc).startswith(sample["shard"]) else \
                f"{sample['shard']}: key {sample['key']!r}: {exc}"
            if self.on_error == "raise":
                raise ValueError(message) from exc
            return ("bad_sample", message)

    def _sample_pairs(self, items: list[_Prepared]) -> None:
        """Sample until each item has a usable pair, or a reason it has none."""
        pending = list(items)
        for attempt in range(self.max_resample + 1):
            if not pending:
                break
            seed = shardpass.key_seed(self.seed, [p.sample["key"] for p in pending], attempt)
            pairs = self.sampler.sample([p.sample for p in pending], [p.turns for p in pending], seed)
            retry = []
            for item, pair in zip(pending, pairs):
                item.attempts = attempt + 1
                if pair is None:
                    item.reason = "too_long"
                    continue
                self._stats["responses"] += 2
                self._stats["responses_unfinished"] += (not pair[0].ended) + (not pair[1].ended)
                if not pair[0].text or not pair[1].text:
                    item.reason = "dropped_empty"
                elif normalise(pair[0].text) == normalise(pair[1].text):
                    item.reason = "dropped_identical"
                else:
                    item.responses, item.reason = pair, None
                    continue
                retry.append(item)
            if attempt < self.max_resample:
                self._stats["pairs_resampled"] += len(retry)
            pending = retry

    def _batch(self, batch: list[dict[str, Any]]) -> Iterator[Outcome]:
        prepared = [self._prepare(s) for s in batch]
        items = [p for p in prepared if isinstance(p, _Prepared)]
        self._sample_pairs(items)
        judged = [p for p in items if p.responses is not None]
        comparisons = []
        for p in judged:
            r1, r2 = p.responses
            comparisons += [Comparison(p.sample, p.question, r1.text, r2.text, p.context),
                            Comparison(p.sample, p.question, r2.text, r1.text, p.context)]
        probabilities = self.judge.prefer(comparisons) if comparisons else []
        if len(probabilities) != len(comparisons):
            raise RuntimeError(f"judge {self.judge.name} gave {len(probabilities)} answers to {len(comparisons)} "
                               "comparisons")
        masses = list(getattr(self.judge, "last_mass", None) or [None] * len(comparisons))
        asks = {id(p): (probabilities[2 * k], probabilities[2 * k + 1], masses[2 * k], masses[2 * k + 1])
                for k, p in enumerate(judged)}
        for sample, p in zip(batch, prepared):
            data = sample["json"]
            info = {"id": data.get("id"), "video_id": data.get("video_id")}
            if not isinstance(p, _Prepared):
                yield Outcome(sample["key"], p[0], message=p[1], info=info)
            elif p.responses is None:
                yield Outcome(sample["key"], p.reason or "too_long", info=info,
                              message=f"after {p.attempts} sampling attempt(s)" if p.reason != "too_long" else
                              "the prompt with the video rows and max_new_tokens exceeds max_length")
            else:
                yield self._pair(p, *asks[id(p)], info=info)

    def _pair(self, p: _Prepared, p_first: float | None, p_swapped: float | None, mass_first: float | None,
              mass_swapped: float | None, *, info: dict[str, Any]) -> Outcome:
        key = p.sample["key"]
        if p_first is None or p_swapped is None:
            return Outcome(key, "too_long", info=info, message="the judge's prompt exceeds max_length")
        verdict = decide(p_first, p_swapped)
        if mass_first is not None and mass_swapped is not None:
            # Counted over every judged pair, dropped ones included: the mass says whether the
            # judge answers with a letter at all, whatever it then prefers.
            self._stats["ab_mass_sum"] += mass_first + mass_swapped
            self._stats["ab_mass_n"] += 2
        if not verdict.agree and self.disagreement == "drop":
            dropped = {**info, "p_a_first": p_first, "p_a_swapped": p_swapped}
            if mass_first is not None and mass_swapped is not None:
                dropped["ab_mass"] = [mass_first, mass_swapped]
            return Outcome(key, "dropped_disagreement", info=dropped,
                           message=f"p_a_first {p_first:.3f}, p_a_swapped {p_swapped:.3f}")
        r1, r2 = p.responses
        chosen, rejected = (r1, r2) if verdict.first_is_better else (r2, r1)
        judge_info: dict[str, Any] = {
            "p_a_first": p_first, "p_a_swapped": p_swapped, "margin": verdict.margin, "agree": verdict.agree,
            "chosen_is_first": verdict.first_is_better, "context": self.context, "model": self.judge.name,
            "sampler": self.sampler.name}
        if mass_first is not None and mass_swapped is not None:
            judge_info["ab_mass"] = [mass_first, mass_swapped]
        if not verdict.agree:
            judge_info["soft_label"] = verdict.p_chosen
        src = p.sample["json"]
        data = {k: v for k, v in src.items() if k not in _NOT_COPIED}
        data.update(stage=schema.STAGE_PAIRS, prompt_stage=src.get("stage", p.sample.get("stage")),
                    conversations=p.turns, reference=reference_answer(src["conversations"], len(p.turns)),
                    chosen=chosen.text, rejected=rejected.text, narrative=p.context, judge=judge_info,
                    responses={"chosen_ended": chosen.ended, "rejected_ended": rejected.ended,
                               "attempts": p.attempts})
        out = dict(p.sample, json=data)
        members = shardpass.output_members(out, drop=() if self.keep_clips else ("clips",))
        return Outcome(key, shardpass.KEPT if verdict.agree else "kept_soft", sample=members)


# ---------------------------------------------------------------------------- run

def identity(config: JudgeConfig, sampler: ResponseSampler, judge: Judge,
             fingerprints: dict[str, str]) -> dict[str, Any]:
    values = {k: v for k, v in cfg.to_dict(config).items() if k not in NOT_IDENTITY}
    return {**values, "sampler": sampler.name, "judge": judge.name, **fingerprints}


def run(config: JudgeConfig, *, sampler: ResponseSampler | None = None, judge: Judge | None = None,
        ranks: Ranks | None = None, after_unit=None) -> PassSummary:
    """Judge ``config.input`` into preference shards ``config.out``; a collective call under several ranks.

    ``sampler`` and ``judge`` replace the models (tests plug in ground-truth ones); a model is
    loaded only for a part that is not given.
    """
    ranks = ranks or Ranks()
    rules = load_prompt(config.rules or DEFAULT_RULES).substitute()
    template = load_prompt(config.question_prompt or DEFAULT_QUESTION, required=("question", "answer_a", "answer_b"),
                           allowed=("rules", "context"))
    if config.context != "none" and "context" not in template.get_identifiers():
        raise ValueError(f"--context {config.context}: the judge prompt has no $context placeholder")
    device = shardpass.pick_device(config.device, ranks)
    fingerprints: dict[str, str] = {}
    sft = None
    if sampler is None or (judge is None and not config.judge_model):
        sft = load_model(config.model, device, config.dtype)
        fingerprints["model_fingerprint"] = model_fingerprint(config.model)
    if sampler is None:
        sampler = ModelSampler(sft, temperature=config.temperature, top_p=config.top_p,
                               max_new_tokens=config.max_new_tokens,
                               max_length=context_length(sft, config.max_length),
                               name=str(Path(config.model).resolve()))
    if judge is None:
        judge_path = config.judge_model or config.model
        judge_model = sft if not config.judge_model else load_model(config.judge_model, device, config.dtype)
        fingerprints["judge_fingerprint"] = model_fingerprint(judge_path)
        judge = ModelJudge(judge_model, template=template, rules=rules,
                           max_length=context_length(judge_model, config.max_length),
                           batch_rows=2 * config.batch_size, name=str(Path(judge_path).resolve()))
        log.info("judge reads its verdict from the tokens %s",
                 [judge_model.tokenizer.decode([t]) for t in judge.choice_ids])
    work = JudgeWork(sampler, judge, context=config.context, batch_size=config.batch_size,
                     max_resample=config.max_resample, disagreement=config.disagreement,
                     keep_clips=config.keep_clips, seed=config.seed, on_error=config.on_error)
    settings = {**cfg.to_dict(config), "rules_text": rules, "question_template": template.template,
                "sampler": sampler.name, "judge": judge.name}
    fields = ("json", "feat", "clips") if config.keep_clips else ("json", "feat")
    with torch.inference_mode():
        return shardpass.run_pass(
            work, source=config.input, out=config.out, stages=config.stages or None, out_stage=schema.STAGE_PAIRS,
            samples_per_shard=config.samples_per_shard, settings=settings,
            identity=identity(config, sampler, judge, fingerprints), fields=fields, on_error=config.on_error,
            ranks=ranks, overwrite=config.overwrite, progress=config.progress, after_unit=after_unit)


def main(argv: list[str] | None = None, prog: str = "vlmr judge") -> int:
    return shardpass.pass_main(JudgeConfig, run, argv, prog,
                                 headline=lambda c: f"judged {c.input} -> {c.out} (context {c.context})")


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("VLMR_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    sys.exit(main(sys.argv[1:], prog="python -m train.judge"))
