"""One LLM client for every command that asks a language model for text (QA generation, judging).

Two backends behind one protocol, :class:`LLMClient`::

    complete(messages, *, temperature=0.0, seed=0, max_tokens=512, label="") -> Completion

- :class:`LocalLLM` — a local causal LM folder (``tiny`` or a checkpoint path) loaded with
  ``AutoModelForCausalLM`` + ``AutoTokenizer``. The messages go through the tokenizer's chat
  template; a tokenizer without one (the tiny model's) gets the plain format of
  :func:`plain_prompt`. Greedy at temperature 0; sampling otherwise, seeded per request.
- :class:`HTTPChatLLM` — an OpenAI-compatible endpoint, ``POST {url}/chat/completions``, with
  the standard library only. The API key is read from an environment variable at request
  time and sent as a bearer token; it is never stored in an attribute, a file or a log line,
  and is blanked out of any error text the server echoes back. Timeouts, 408/429/5xx and
  broken connections are retried with exponential backoff (``Retry-After`` honoured), at most
  ``max_retries`` times, then :class:`LLMError`; other 4xx (bad key, model, URL) fail at once
  with ``fatal=True``. Redirects are never followed (fatal: the key would go with them).
  At most ``concurrency`` requests are in flight.

:class:`CachedLLM` wraps either: one JSON file per request under the cache folder, keyed by
sha256 of (backend identity, messages, temperature, seed, max_tokens, label), written to a
temporary name and renamed. A re-run or a resumed run sends no request already answered.
Failed requests are not cached (a re-run tries them again).

:func:`make_client` picks the backend from a spec (``tiny``/path or ``http(s)://`` URL);
:class:`EndpointSettings` holds the endpoint settings every LLM-asking command's config shares;
:func:`complete_many` answers a list of :class:`ChatRequest` on a thread pool, in order.
``label`` names a request in logs and errors (say, the video id) and is part of its cache key.

Use::

    client = make_client("http://127.0.0.1:8000/v1", model="llama-3-8b", cache_dir="runs/llm-cache")
    reply = client.complete([{"role": "user", "content": "..."}], temperature=0.0, seed=0, label="vid_1")
    for reply in complete_many(client, [ChatRequest(messages, label=key) for ...], on_error="skip"): ...

Tried from the command line through ``vlmr generate-qa --limit 1`` (see train/generate_qa.py).
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence, TypeVar, runtime_checkable

from dataengine.schema import write_text_atomic

log = logging.getLogger(__name__)

Message = dict[str, str]
T = TypeVar("T")
R = TypeVar("R")

# 408 Request Timeout and 429 Too Many Requests are the endpoint saying "later", like 5xx.
RETRYABLE_STATUS = frozenset({408, 429})
CACHE_FORMAT = "vlmr-llm-cache/1"


class LLMError(RuntimeError):
    """A request that produced no reply. ``fatal`` means retrying cannot help (bad key, model
    name or URL): callers should stop rather than go on to the next item."""

    def __init__(self, message: str, *, fatal: bool = False, status: int | None = None):
        super().__init__(message)
        self.fatal = fatal
        self.status = status


@dataclass(frozen=True)
class Completion:
    """One reply. ``usage`` is the backend's token counts (``prompt_tokens``,
    ``completion_tokens``, ``total_tokens``) or None when it reports none; ``cached`` says the
    reply came from :class:`CachedLLM` and cost nothing now."""

    text: str
    usage: dict[str, int] | None = None
    cached: bool = False


@dataclass(frozen=True)
class ChatRequest:
    """One request for :func:`complete_many`."""

    messages: Sequence[Message]
    temperature: float = 0.0
    seed: int = 0
    max_tokens: int = 512
    label: str = ""


@runtime_checkable
class LLMClient(Protocol):
    """What every backend (and the cache wrapper) provides."""

    identity: dict[str, str]
    """What makes replies differ between backends (kind and model), for cache keys; no secrets."""
    concurrency: int
    """How many requests are worth running at once (1 for a local model)."""

    def complete(self, messages: Sequence[Message], *, temperature: float = 0.0, seed: int = 0,
                 max_tokens: int = 512, label: str = "") -> Completion: ...


def _check_messages(messages: Sequence[Message]) -> list[Message]:
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': str, 'content': str}}, got {message!r}")
        out.append({"role": message["role"], "content": message["content"]})
    if not out:
        raise ValueError("no messages")
    return out


# --------------------------------------------------------------------------- local model

def plain_prompt(messages: Sequence[Message]) -> str:
    """The prompt for a tokenizer without a chat template: each message as ``role: content``,
    separated by a blank line, then ``assistant:`` for the model to continue::

        system: You write QA pairs.

        user: Describe the video.

        assistant:
    """
    parts = [f"{m['role']}: {m['content'].strip()}" for m in messages]
    return "\n\n".join(parts + ["assistant:"])


class LocalLLM:
    """A local causal LM by path (or ``tiny``), run in this process. The weights load on the
    first request, so a run answered wholly from the cache never loads them. Thread-safe
    (one generation at a time); ``concurrency`` is 1 since parallel CPU generation gains nothing."""

    concurrency = 1

    def __init__(self, spec: str | os.PathLike = "tiny", *, device: str = "cpu", dtype: Any = None):
        from dataengine.models import TINY, resolve_lm

        self.path = resolve_lm(spec)
        self.device = device
        self.dtype = dtype
        # The tiny model's folder name carries its config hash, so its identity is the same on
        # every machine whatever $VLMR_CACHE is; a real checkpoint is named by its folder.
        name = f"tiny/{self.path.name}" if str(spec) == TINY else str(Path(self.path).resolve())
        self.identity = {"backend": "local", "model": name}
        self._lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        return self._tokenizer

    @property
    def model(self) -> Any:
        if self._model is None:
            import torch
            from transformers import AutoModelForCausalLM

            from dataengine.models import quiet_loading

            dtype = self.dtype or (torch.bfloat16 if str(self.device).startswith("cuda") else torch.float32)
            with quiet_loading():
                model = AutoModelForCausalLM.from_pretrained(str(self.path), local_files_only=True, dtype=dtype)
            self._model = model.to(self.device).eval().requires_grad_(False)
            log.info("loaded %s on %s", self.identity["model"], self.device)
        return self._model

    def prompt_text(self, messages: Sequence[Message]) -> str:
        """The exact text the model is given for ``messages``."""
        messages = _check_messages(messages)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return plain_prompt(messages)

    def complete(self, messages: Sequence[Message], *, temperature: float = 0.0, seed: int = 0,
                 max_tokens: int = 512, label: str = "") -> Completion:
        import torch
        from transformers import GenerationConfig

        text = self.prompt_text(messages)
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        # A chat template writes its own BOS; the plain format lets the tokenizer add it.
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=not templated)
        prompt_tokens = int(enc.input_ids.shape[1])
        with self._lock:
            model = self.model
        context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        if context:
            if prompt_tokens >= context:
                raise LLMError(f"{label or 'request'}: prompt of {prompt_tokens} tokens exceeds the context "
                               f"of {self.identity['model']} ({context} tokens)")
            # The reply gets what room the context leaves, as an endpoint would cut it at its limit.
            max_tokens = min(max_tokens, context - prompt_tokens)
        tok = self.tokenizer
        gen = GenerationConfig(
            max_new_tokens=max_tokens, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        with self._lock, torch.no_grad(), torch.random.fork_rng(devices=[]):
            # fork_rng: seeding here must not move any other RNG stream of the process.
            torch.manual_seed(seed)
            out = model.generate(input_ids=enc.input_ids.to(self.device),
                                 attention_mask=enc.attention_mask.to(self.device), generation_config=gen)
        new = out[0, prompt_tokens:]
        reply = tok.decode(new, skip_special_tokens=True)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": int(new.shape[0]),
                 "total_tokens": prompt_tokens + int(new.shape[0])}
        return Completion(text=reply, usage=usage)


# --------------------------------------------------------------------------- HTTP endpoint

def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(retry: int, backoff: float, max_backoff: float, retry_after: float | None = None) -> float:
    """Wait before retry number ``retry`` (0-based): ``backoff * 2**retry``, or the server's
    ``Retry-After`` when it gave one; never more than ``max_backoff``."""
    delay = retry_after if retry_after is not None else backoff * (2 ** retry)
    return min(max(0.0, delay), max_backoff)


def chat_endpoint(url: str) -> str:
    """``{url}/chat/completions`` unless the URL already ends there."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


class _Transient(Exception):
    """A failed attempt worth retrying, with the server's Retry-After if any."""

    def __init__(self, message: str, retry_after: float | None = None, status: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """urllib would follow a redirect with the Authorization header, to any host: never follow."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        return None  # urllib then raises the 3xx as an HTTPError


_OPENER = urllib.request.build_opener(_RefuseRedirects)


class HTTPChatLLM:
    """An OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp server, ...).

    Redirects are refused (a fatal :class:`LLMError` naming the target): following one would
    send the API key to wherever the endpoint points, and take that host's reply as the
    completion. Give the URL the endpoint redirects to instead.
    """

    def __init__(self, url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0, max_retries: int = 4, backoff: float = 1.0,
                 max_backoff: float = 60.0, concurrency: int = 4):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"not an http(s) URL: {url!r}")
        if not model:
            raise ValueError("an HTTP endpoint needs a model name (--model)")
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("need concurrency >= 1, max_retries >= 0, timeout > 0")
        self.endpoint = chat_endpoint(url)
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.concurrency = concurrency
        # The URL is left out on purpose: the same model behind a moved endpoint keeps its cache.
        self.identity = {"backend": "openai-chat", "model": model}
        self._slots = threading.BoundedSemaphore(concurrency)
        if not os.environ.get(api_key_env):
            log.info("$%s is not set: requests to %s carry no Authorization header",
                     api_key_env, self.endpoint)

    def __repr__(self) -> str:
        return f"HTTPChatLLM({self.endpoint!r}, model={self.model!r}, key from ${self.api_key_env})"

    def _redact(self, text: str) -> str:
        key = os.environ.get(self.api_key_env)
        return text.replace(key, "***") if key else text

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _attempt(self, body: bytes) -> Completion:
        request = urllib.request.Request(self.endpoint, data=body, headers=self._headers(), method="POST")
        try:
            with self._slots, _OPENER.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                target = self._redact(str(exc.headers.get("Location", "?")))
                raise LLMError(f"HTTP {exc.code} from {self.endpoint}: a redirect to {target}; redirects are "
                               "refused (the API key would go with it): use the URL it points to",
                               fatal=True, status=exc.code) from None
            detail = self._redact(exc.read()[:300].decode("utf-8", "replace"))
            message = f"HTTP {exc.code} from {self.endpoint}: {detail}"
            if exc.code in RETRYABLE_STATUS or exc.code >= 500:
                raise _Transient(message, parse_retry_after(exc.headers.get("Retry-After")), exc.code) from None
            raise LLMError(message, fatal=True, status=exc.code) from None
        except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets are OSErrors
            reason = getattr(exc, "reason", exc)
            kind = "timed out" if isinstance(reason, TimeoutError) or isinstance(exc, TimeoutError) else "failed"
            raise _Transient(f"request to {self.endpoint} {kind} ({self._redact(str(reason))})") from None
        try:
            data = json.loads(raw)
            message = data["choices"][0]["message"]
            text = message.get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            # A proxy's error page or a cut-off body: the next attempt may get a real reply.
            raise _Transient(f"unreadable reply body from {self.endpoint}: "
                             f"{self._redact(raw[:200].decode('utf-8', 'replace'))!r}") from None
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
        if usage is not None:
            usage = {k: int(v) for k, v in usage.items() if isinstance(v, (int, float))
                     and k in ("prompt_tokens", "completion_tokens", "total_tokens")} or None
        return Completion(text=text, usage=usage)

    def complete(self, messages: Sequence[Message], *, temperature: float = 0.0, seed: int = 0,
                 max_tokens: int = 512, label: str = "") -> Completion:
        body = json.dumps({"model": self.model, "messages": _check_messages(messages),
                           "temperature": temperature, "seed": seed, "max_tokens": max_tokens}).encode()
        what = f"{label}: " if label else ""
        for retry in range(self.max_retries + 1):
            try:
                return self._attempt(body)
            except _Transient as exc:
                if retry == self.max_retries:
                    raise LLMError(f"{what}gave up after {retry + 1} attempt(s): {exc}", status=exc.status) from None
                delay = backoff_delay(retry, self.backoff, self.max_backoff, exc.retry_after)
                log.warning("%s%s; retry %d/%d in %.2f s", what, exc, retry + 1, self.max_retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")


# --------------------------------------------------------------------------- cache

class CachedLLM:
    """Any :class:`LLMClient` with a response cache: one JSON file per request.

    The key is sha256 of (identity, messages, temperature, seed, max_tokens, label); the file
    ``{cache_dir}/{key[:2]}/{key}.json`` holds the request and the reply (never a key or
    header). ``hits``/``misses`` count this process's lookups.
    """

    def __init__(self, client: LLMClient, cache_dir: str | os.PathLike):
        self.client = client
        self.cache_dir = Path(cache_dir)
        self.identity = dict(client.identity)
        self.concurrency = client.concurrency
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def key(self, messages: Sequence[Message], *, temperature: float, seed: int, max_tokens: int,
            label: str) -> tuple[str, dict[str, Any]]:
        request = {"identity": self.identity, "messages": _check_messages(messages),
                   "temperature": float(temperature), "seed": int(seed), "max_tokens": int(max_tokens),
                   "label": label}
        blob = json.dumps(request, sort_keys=True, ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(blob).hexdigest(), request

    def path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def complete(self, messages: Sequence[Message], *, temperature: float = 0.0, seed: int = 0,
                 max_tokens: int = 512, label: str = "") -> Completion:
        key, request = self.key(messages, temperature=temperature, seed=seed, max_tokens=max_tokens, label=label)
        path = self.path(key)
        if path.exists():
            try:
                entry = json.loads(path.read_text(encoding="utf-8"))
                completion = Completion(text=entry["text"], usage=entry.get("usage"), cached=True)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("unreadable cache entry %s (%s): asking again", path, exc)
            else:
                with self._lock:
                    self.hits += 1
                return completion
        completion = self.client.complete(messages, temperature=temperature, seed=seed,
                                          max_tokens=max_tokens, label=label)
        entry = {"format": CACHE_FORMAT, "request": request, "text": completion.text, "usage": completion.usage}
        write_text_atomic(path, json.dumps(entry, ensure_ascii=False, indent=1) + "\n")
        with self._lock:
            self.misses += 1
        return completion


# --------------------------------------------------------------------------- construction, fan-out

def is_url(spec: str) -> bool:
    return str(spec).startswith(("http://", "https://"))


@dataclass
class EndpointSettings:
    """How requests to an OpenAI-compatible endpoint are sent: the settings every command that
    asks an LLM shares (composed into its config by inheritance; :meth:`endpoint_problems` in
    its checks, :meth:`client_kwargs` into :func:`make_client`)."""

    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's API key; read per request, never written anywhere."""
    timeout: float = 60.0
    """HTTP: seconds to wait for a reply before the attempt counts as failed."""
    max_retries: int = 4
    """HTTP: retries of a request after a timeout, 429 or 5xx (exponential backoff)."""
    backoff: float = 1.0
    """HTTP: first backoff in seconds, doubled each retry (a Retry-After header wins)."""
    concurrency: int = 4
    """HTTP: requests in flight at once (a local model runs one at a time)."""

    def endpoint_problems(self) -> list[str]:
        """What is wrong with these settings, one line per field, naming its flag."""
        checks = [(self.timeout > 0, f"--timeout must be > 0, got {self.timeout}"),
                  (self.max_retries >= 0, f"--max-retries must be >= 0, got {self.max_retries}"),
                  (self.backoff >= 0, f"--backoff must be >= 0, got {self.backoff}"),
                  (self.concurrency >= 1, f"--concurrency must be >= 1, got {self.concurrency}"),
                  (bool(self.api_key_env), "--api-key-env must name an environment variable")]
        return [message for ok, message in checks if not ok]

    def client_kwargs(self) -> dict[str, Any]:
        """These settings as :func:`make_client` keywords."""
        return {"api_key_env": self.api_key_env, "timeout": self.timeout, "max_retries": self.max_retries,
                "backoff": self.backoff, "concurrency": self.concurrency}


def make_client(spec: str, *, model: str = "", cache_dir: str | os.PathLike | None = None,
                api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0, max_retries: int = 4,
                backoff: float = 1.0, max_backoff: float = 60.0, concurrency: int = 4,
                device: str = "cpu") -> LLMClient:
    """``http(s)://...`` → :class:`HTTPChatLLM` (``model`` required); ``tiny`` or a local
    folder → :class:`LocalLLM`. With ``cache_dir``, wrapped in :class:`CachedLLM`."""
    client: LLMClient
    if is_url(spec):
        client = HTTPChatLLM(spec, model, api_key_env=api_key_env, timeout=timeout, max_retries=max_retries,
                             backoff=backoff, max_backoff=max_backoff, concurrency=concurrency)
    else:
        client = LocalLLM(spec, device=device)
    return CachedLLM(client, cache_dir) if cache_dir else client


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads, results in input order, at most
    ``2 * workers`` items in flight (a long input is never all submitted at once). An
    exception from ``fn`` is raised when its item's turn comes."""
    if workers <= 1:
        yield from map(fn, items)
        return
    window = 2 * workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llm") as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def complete_many(client: LLMClient, requests: Iterable[ChatRequest], *, workers: int | None = None,
                  on_error: str = "raise") -> Iterator[Completion | LLMError]:
    """Answer ``requests`` in order on ``workers`` threads (default ``client.concurrency``).
    With ``on_error="skip"`` a request that failed after its retries yields its
    :class:`LLMError` instead of raising (a fatal one still raises)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")

    def one(request: ChatRequest) -> Completion | LLMError:
        try:
            return client.complete(request.messages, temperature=request.temperature, seed=request.seed,
                                   max_tokens=request.max_tokens, label=request.label)
        except LLMError as exc:
            if on_error == "raise" or exc.fatal:
                raise
            return exc

    yield from ordered_map(one, requests, workers or client.concurrency)
