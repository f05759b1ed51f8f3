"""The shared LLM client: HTTP retries/backoff/timeouts against a local stub server, the
response cache, the concurrency limit, key hygiene, and the local (tiny) backend."""

import json
import logging
import threading
import time

import pytest
from llm_stub_server import Reply, StubChatServer

from train import llm_client
from train.llm_client import (CachedLLM, ChatRequest, HTTPChatLLM, LLMError, LocalLLM, backoff_delay,
                              complete_many, make_client, parse_retry_after, plain_prompt)

USER = [{"role": "user", "content": "Say hi."}]
SECRET = "sk-test-9f8e7d6c5b4a-do-not-leak"


def fast_client(server, **kw):
    settings = dict(timeout=2.0, max_retries=3, backoff=0.001, max_backoff=1.0, concurrency=2)
    return HTTPChatLLM(server.url, "stub-model", **{**settings, **kw})


@pytest.fixture
def server():
    with StubChatServer(responder=lambda body: Reply.ok("hi")) as s:
        yield s


# ----------------------------------------------------------------------------- pure parts

def test_plain_prompt_format():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Say hi. "}]
    assert plain_prompt(messages) == "system: Be brief.\n\nuser: Say hi.\n\nassistant:"


def test_backoff_delay_doubles_caps_and_honours_retry_after():
    assert [backoff_delay(r, 0.5, 3.0) for r in range(4)] == [0.5, 1.0, 2.0, 3.0]
    assert backoff_delay(0, 0.5, 3.0, retry_after=2.5) == 2.5  # the server's word wins
    assert backoff_delay(3, 0.5, 3.0, retry_after=0.0) == 0.0
    assert backoff_delay(0, 0.5, 3.0, retry_after=100.0) == 3.0  # but never past the cap


def test_parse_retry_after_seconds_and_http_date():
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 0.25 ") == 0.25
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    # HTTP-date form: 1994-11-06 08:49:37 UTC is 784111777; ten seconds before that, 10 s to wait.
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now=784111767.0) == pytest.approx(10.0)
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now=784111800.0) == 0.0


def test_chat_endpoint_and_make_client_choice(tmp_path):
    assert llm_client.chat_endpoint("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert llm_client.chat_endpoint("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"
    with pytest.raises(ValueError, match="model"):
        make_client("http://127.0.0.1:9/v1")
    client = make_client("https://example.invalid/v1", model="m", cache_dir=tmp_path)
    assert isinstance(client, CachedLLM) and isinstance(client.client, HTTPChatLLM)
    assert client.identity == {"backend": "openai-chat", "model": "m"}
    local = make_client("tiny")  # resolving is cheap: weights load on the first request
    assert isinstance(local, LocalLLM) and not local.loaded
    assert local.identity["model"].startswith("tiny/llama-")
    with pytest.raises(FileNotFoundError):
        make_client(str(tmp_path / "no_such_model"))


# ----------------------------------------------------------------------------- HTTP backend

def test_http_ok_sends_settings_and_reports_usage(server):
    reply = fast_client(server).complete(USER, temperature=0.3, seed=7, max_tokens=11)
    assert reply.text == "hi" and not reply.cached
    assert reply.usage == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["body"] == {"model": "stub-model", "messages": USER, "temperature": 0.3, "seed": 7,
                               "max_tokens": 11}


def test_http_usage_absent_is_none():
    with StubChatServer(responder=lambda body: Reply.ok("hi"), report_usage=False) as server:
        assert fast_client(server).complete(USER).usage is None


def test_http_429_then_ok_waits_retry_after(server):
    server.push(Reply.error(429, retry_after="0.3"))
    reply = fast_client(server).complete(USER)
    assert reply.text == "hi" and server.request_count == 2
    gap = server.requests[1]["time"] - server.requests[0]["time"]
    assert gap >= 0.28  # backoff alone would be 0.001 s


@pytest.mark.parametrize("failure", [Reply.error(500), Reply.error(503), Reply.garbage()])
def test_http_5xx_or_garbage_then_ok(server, failure):
    server.push(failure, failure)
    assert fast_client(server).complete(USER).text == "hi"
    assert server.request_count == 3


def test_http_timeout_then_ok(server):
    server.push(Reply.slow(3.0, "too late"))
    start = time.monotonic()
    reply = fast_client(server, timeout=0.3).complete(USER)
    assert reply.text == "hi" and server.request_count == 2
    assert time.monotonic() - start < 2.0


def test_http_gives_up_after_bounded_retries():
    with StubChatServer(responder=lambda body: Reply.error(502)) as server:
        with pytest.raises(LLMError, match="gave up after 3 attempt") as info:
            fast_client(server, max_retries=2).complete(USER, label="video v7")
        assert server.request_count == 3
    assert not info.value.fatal and info.value.status == 502 and "video v7" in str(info.value)


def test_http_connection_refused_is_retried_then_error():
    with StubChatServer() as server:
        url = server.url
    client = HTTPChatLLM(url, "m", timeout=0.5, max_retries=1, backoff=0.001)
    with pytest.raises(LLMError, match="gave up after 2"):
        client.complete(USER)


def test_http_4xx_is_fatal_at_once_and_key_is_redacted(monkeypatch):
    monkeypatch.setenv("VLMR_TEST_KEY", SECRET)
    echo = json.dumps({"error": {"message": f"Incorrect API key provided: {SECRET}"}})
    with StubChatServer(responder=lambda body: Reply.error(401, body=echo)) as server:
        with pytest.raises(LLMError) as info:
            fast_client(server, api_key_env="VLMR_TEST_KEY").complete(USER)
        assert server.request_count == 1  # a bad key does not get better by retrying
        assert server.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert info.value.fatal and info.value.status == 401
    assert SECRET not in str(info.value) and "***" in str(info.value)


@pytest.mark.parametrize("status", [301, 302, 307])
def test_a_redirect_to_another_host_is_refused_and_gets_no_key(monkeypatch, status):
    """Issue 16: urllib followed a 302 to another host with the Authorization header and took
    that host's reply as the completion."""
    monkeypatch.setenv("VLMR_TEST_KEY", SECRET)
    with StubChatServer(responder=lambda body: Reply.ok("from the other host")) as elsewhere:
        target = elsewhere.url.replace("127.0.0.1", "localhost") + "/chat/completions"  # another host, port
        with StubChatServer(responder=lambda body: Reply.redirect(target, status)) as server:
            with pytest.raises(LLMError) as info:
                fast_client(server, api_key_env="VLMR_TEST_KEY").complete(USER)
            assert server.request_count == 1  # not retried either
        assert elsewhere.request_count == 0
    assert info.value.fatal and info.value.status == status
    assert f"redirect to {target}" in str(info.value) and SECRET not in str(info.value)


def test_no_key_in_environment_sends_no_authorization(server, monkeypatch):
    monkeypatch.delenv("VLMR_TEST_KEY", raising=False)
    fast_client(server, api_key_env="VLMR_TEST_KEY").complete(USER)
    assert "Authorization" not in server.requests[0]["headers"]


def test_key_is_never_written_to_cache_or_logs(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("VLMR_TEST_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    with StubChatServer(responder=lambda body: Reply.ok("hi")) as server:
        server.push(Reply.error(500, body=f"upstream said {SECRET}"))  # logged as a retry warning
        client = CachedLLM(fast_client(server, api_key_env="VLMR_TEST_KEY"), tmp_path / "cache")
        client.complete(USER, label="v1")
        assert server.requests[-1]["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert "retry 1/3" in caplog.text
    assert SECRET not in caplog.text and SECRET not in repr(client.client)
    assert SECRET not in json.dumps(vars(client.client), default=str)
    files = list((tmp_path / "cache").rglob("*"))
    assert any(f.suffix == ".json" for f in files)
    for f in files:
        if f.is_file():
            assert SECRET not in f.read_text()


# ----------------------------------------------------------------------------- cache

def test_cache_second_call_sends_nothing_and_keys_on_settings(server, tmp_path):
    client = CachedLLM(fast_client(server), tmp_path)
    first = client.complete(USER, seed=1, label="v1")
    again = client.complete(USER, seed=1, label="v1")
    assert server.request_count == 1 and not first.cached and again.cached
    assert again.text == first.text and again.usage == first.usage
    for changed in (dict(seed=2, label="v1"), dict(seed=1, label="v2"), dict(seed=1, label="v1", temperature=0.5),
                    dict(seed=1, label="v1", max_tokens=7)):
        client.complete(USER, **changed)
    assert server.request_count == 5
    client.complete([{"role": "user", "content": "Say bye."}], seed=1, label="v1")
    assert server.request_count == 6
    assert (client.hits, client.misses) == (1, 6)
    # A fresh wrapper on the same folder (a resumed run) sends nothing it already has.
    resumed = CachedLLM(fast_client(server), tmp_path)
    assert resumed.complete(USER, seed=2, label="v1").cached and server.request_count == 6
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_cache_other_model_misses_and_corrupt_entry_is_asked_again(server, tmp_path):
    CachedLLM(fast_client(server), tmp_path).complete(USER)
    other = CachedLLM(HTTPChatLLM(server.url, "other-model", backoff=0.001), tmp_path)
    assert not other.complete(USER).cached and server.request_count == 2
    client = CachedLLM(fast_client(server), tmp_path)
    key, _ = client.key(USER, temperature=0.0, seed=0, max_tokens=512, label="")
    client.path(key).write_text("{ truncated")
    assert not client.complete(USER).cached and server.request_count == 3
    assert client.complete(USER).cached  # rewritten whole


def test_failures_are_not_cached(tmp_path):
    with StubChatServer(responder=lambda body: Reply.ok("hi")) as server:
        server.push(Reply.error(500), Reply.error(500))
        client = CachedLLM(fast_client(server, max_retries=1), tmp_path)
        with pytest.raises(LLMError):
            client.complete(USER)
        assert client.complete(USER).text == "hi" and server.request_count == 3


# ----------------------------------------------------------------------------- fan-out

def test_complete_many_keeps_order_and_concurrency_limit():
    arrived, state = threading.Condition(), {"now": 0, "max": 0}

    def responder(body):
        with arrived:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
            arrived.notify_all()
            # Hold each request until a second one is in flight (so a slow machine still sees
            # the overlap), then a little longer, so a third would be seen if the limit leaked.
            arrived.wait_for(lambda: state["now"] >= 2, timeout=2.0)
        time.sleep(0.05)
        with arrived:
            state["now"] -= 1
        return Reply.ok(f"seed {body['seed']}")

    with StubChatServer(responder=responder) as server:
        client = fast_client(server, concurrency=2)
        requests = [ChatRequest(USER, seed=i, label=f"v{i}") for i in range(8)]
        replies = list(complete_many(client, requests, workers=6))  # more workers than slots
    assert [r.text for r in replies] == [f"seed {i}" for i in range(8)]
    assert state["max"] == 2


def test_complete_many_skip_yields_errors_in_place():
    def responder(body):
        return Reply.error(500) if body["seed"] == 1 else Reply.ok("ok")

    with StubChatServer(responder=responder) as server:
        client = fast_client(server, max_retries=1)
        results = list(complete_many(client, [ChatRequest(USER, seed=i) for i in range(3)], on_error="skip"))
        assert isinstance(results[1], LLMError) and [r.text for r in (results[0], results[2])] == ["ok", "ok"]
        with pytest.raises(LLMError):
            list(complete_many(client, [ChatRequest(USER, seed=1)]))


# ----------------------------------------------------------------------------- local backend

@pytest.fixture(scope="module")
def tiny_llm():
    return LocalLLM("tiny")


def test_local_tiny_is_greedy_deterministic_and_reports_usage(tiny_llm):
    assert tiny_llm.tokenizer.chat_template is None
    assert tiny_llm.prompt_text(USER) == "user: Say hi.\n\nassistant:"
    a = tiny_llm.complete(USER, max_tokens=6)
    b = tiny_llm.complete(USER, max_tokens=6, seed=123)  # greedy: the seed does not matter
    assert a.text == b.text and a.usage["completion_tokens"] <= 6
    assert a.usage["total_tokens"] == a.usage["prompt_tokens"] + a.usage["completion_tokens"]
    s1 = tiny_llm.complete(USER, temperature=1.0, seed=5, max_tokens=6)
    s2 = tiny_llm.complete(USER, temperature=1.0, seed=5, max_tokens=6)
    assert s1.text == s2.text  # sampling, but seeded per request


def test_local_context_limit_cuts_the_reply_or_fails_clearly(tiny_llm):
    context = tiny_llm.model.config.max_position_embeddings
    content = "Say hi."
    while len(tiny_llm.tokenizer(tiny_llm.prompt_text([{"role": "user", "content": content}])).input_ids) < context - 8:
        content += " hi"  # a token or two at a time: the prompt ends a few tokens short of the limit
    reply = tiny_llm.complete([{"role": "user", "content": content}], max_tokens=500)
    assert context - 8 <= reply.usage["prompt_tokens"] < context and reply.usage["total_tokens"] <= context
    with pytest.raises(LLMError, match="exceeds the context") as info:
        tiny_llm.complete([{"role": "user", "content": "word " * 2000}], max_tokens=4, label="v9")
    assert not info.value.fatal and "v9" in str(info.value)


def test_local_uses_chat_template_when_the_tokenizer_has_one():
    llm = LocalLLM("tiny")
    llm.tokenizer.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                                   "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert llm.prompt_text(USER) == "<|user|>Say hi.\n<|assistant|>"


def test_endpoint_settings_are_checked_and_reach_the_client(server):
    from train.llm_client import EndpointSettings, make_client

    assert EndpointSettings().endpoint_problems() == []
    bad = EndpointSettings(timeout=0, max_retries=-1, backoff=-1, concurrency=0, api_key_env="")
    assert [line.split()[0] for line in bad.endpoint_problems()] == [
        "--timeout", "--max-retries", "--backoff", "--concurrency", "--api-key-env"]
    settings = EndpointSettings(api_key_env="VLMR_TEST_KEY", timeout=3.0, max_retries=1, backoff=0.01, concurrency=2)
    client = make_client(server.url, model="stub-model", **settings.client_kwargs())
    assert (client.api_key_env, client.timeout, client.max_retries, client.backoff, client.concurrency) == \
        ("VLMR_TEST_KEY", 3.0, 1, 0.01, 2)
