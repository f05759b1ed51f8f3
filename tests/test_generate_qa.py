"""`vlmr generate-qa`: narratives in, Video-ChatGPT QA out, through the stub chat server
(good, malformed, slow, 429/500 replies), the cache (a re-run sends nothing), the tiny local
model (its gibberish is rejected and counted), and into `vlmr build-shards`."""

import json
import logging
import threading
from collections import Counter, defaultdict

import pytest
from llm_stub_server import Reply, StubChatServer, qa_responder

from dataengine import ingest
from tools import cli
from train import generate_qa
from train.generate_qa import (Actor, GenerateQAConfig, NarrativeError, ReplyError, build_messages, filter_pairs,
                               load_prompt, mentions_actor, narrative_from_record, parse_pairs, read_narratives)
from train.llm_client import CachedLLM, make_client

SECRET = "sk-test-1a2b3c4d5e6f-do-not-leak"

# One real Video Localized Narratives record (fields as in the public OVIS sample, traces cut
# short) and the simple form.
VIDLN = {"vidln_id": 0, "dataset_id": "OVIS_train", "video_id": "c1a40349",
         "keyframe_names": ["img_0000005", "img_0000012"],
         "actor_narratives": [
             {"actor_name": "Group of people", "keyframe_selection_indices": [0, 1],
              "caption": "A group of people is cycling on the grey road.",
              "traces": [[{"x": 0.74, "y": 0.32, "time_ms_since_epoch": 1646807048278, "kf_idx": 0}]]},
             {"actor_name": "background", "caption": "A road between green trees.", "traces": []}]}
SIMPLE = {"video_id": "v2", "actors": [
    {"name": "Dog", "description": "A brown dog runs to the left, then jumps over the red ball."},
    {"name": "Ball", "description": "A red ball rolls to the right."}]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def simple(video_id, *actors):
    return {"video_id": video_id, "actors": [{"name": n, "description": d} for n, d in actors]}


def run_cli(tmp_path, narratives, llm, *extra):
    argv = ["generate-qa", "--narratives", str(narratives), "--llm", llm, "--out", str(tmp_path / "qa.json"),
            "--cache", str(tmp_path / "cache"), *extra]
    return cli.main(argv)


def outputs(tmp_path):
    rows = json.loads((tmp_path / "qa.json").read_text())
    rejects = [json.loads(line) for line in (tmp_path / "qa.json.rejects.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "qa.json.summary.json").read_text())
    return rows, rejects, summary


# ----------------------------------------------------------------------------- narratives

def test_real_and_simple_records(tmp_path):
    real = narrative_from_record(VIDLN, line=1)
    assert real.video_id == "c1a40349"
    assert real.actors == (Actor("Group of people", "A group of people is cycling on the grey road."),)
    assert real.background == "A road between green trees."
    described = dict(VIDLN, actor_narratives=[{"actor_name": "Cat", "description": "A cat  sleeps."}])
    assert narrative_from_record(described).actors == (Actor("Cat", "A cat sleeps."),)
    assert narrative_from_record(SIMPLE).actors[1] == Actor("Ball", "A red ball rolls to the right.")
    assert narrative_from_record({"video_id": 42, "actors": [{"name": "Cat", "description": "Sleeps."}]}).video_id == "42"


@pytest.mark.parametrize("record, message", [
    ({"actors": [{"name": "a", "description": "b"}]}, "missing video_id"),
    ({"video_id": "v", "objects": []}, "no 'actor_narratives'"),
    ({"video_id": "v", "actors": "dog"}, "must be a list"),
    ({"video_id": "v", "actors": [{"description": "b"}]}, "actor 0 has no 'name'"),
    ({"video_id": "v", "actor_narratives": [{"actor_name": "background", "caption": "grass"}]}, "no actor"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_records_are_named(record, message):
    with pytest.raises(ValueError, match=message):
        narrative_from_record(record)


def test_read_narratives_raise_names_line_or_skip_counts(tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text(json.dumps(SIMPLE) + "\n\n{not json\n" + json.dumps({"video_id": "v3", "actors": []}) + "\n"
                    + json.dumps(simple("v4", ("Cat", ""), ("Owl", "An owl blinks."))) + "\n")
    with pytest.raises(NarrativeError, match=r"n.jsonl:3: not JSON"):
        list(read_narratives(path))
    stats = generate_qa.NarrativeStats()
    kept = list(read_narratives(path, on_error="skip", stats=stats))
    assert [n.video_id for n in kept] == ["v2", "v4"] and [n.line for n in kept] == [1, 5]
    assert stats.skipped == 2 and stats.reasons == Counter({"not JSON": 1, "no actor with a description": 1})
    assert stats.actors_without_description == 1
    with pytest.raises(NarrativeError, match="not found"):
        list(read_narratives(tmp_path / "missing.jsonl"))


# ----------------------------------------------------------------------------- prompt

def test_default_prompt_is_documented_and_filled():
    raw = generate_qa.DEFAULT_PROMPT.read_text()
    assert raw.startswith("#") and "$actors" in raw
    template = load_prompt()
    assert "#" not in template.template.splitlines()[0]
    (message,) = build_messages(template, narrative_from_record(VIDLN), pairs_per_video=5)
    assert message["role"] == "user"
    text = message["content"]
    assert "- Group of people: A group of people is cycling on the grey road." in text
    assert "Background: A road between green trees." in text and "Write 5 question-answer pairs" in text
    assert "$" not in text and "# " not in text
    (plain,) = build_messages(template, narrative_from_record(SIMPLE), 3)
    assert "Background" not in plain["content"] and "\n\n\n" not in plain["content"]


def test_custom_prompt_must_use_actors(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("# doc line\nActors:\n$actors\nCost: $$5\n")
    (message,) = build_messages(load_prompt(good), narrative_from_record(SIMPLE), 2)
    assert message["content"].startswith("Actors:\n- Dog:") and message["content"].endswith("Cost: $5")
    (tmp_path / "bad.txt").write_text("Write $pairs_per_video pairs.")
    with pytest.raises(ValueError, match=r"bad.txt: missing placeholder\(s\) \$actors"):
        load_prompt(tmp_path / "bad.txt")
    (tmp_path / "typo.txt").write_text("$actors $actor_list")
    with pytest.raises(ValueError, match="unknown placeholder.*actor_list"):
        load_prompt(tmp_path / "typo.txt")


# ----------------------------------------------------------------------------- reply parsing, filters

PAIRS = [{"question": "What colour is the dog?", "answer": "The dog is brown."}]


@pytest.mark.parametrize("text", [
    json.dumps(PAIRS),
    "```json\n" + json.dumps(PAIRS) + "\n```",
    "Sure! Here are [1] pair(s):\n" + json.dumps(PAIRS) + "\nHope this helps [really].",
    json.dumps([{"Q": "What colour is the dog?", "A": "The dog is brown."}]),
    json.dumps({"pairs": PAIRS}),
])
def test_parse_pairs_is_lenient(text):
    (item,) = parse_pairs(text)
    assert generate_qa._pair_fields(item) == ("What colour is the dog?", "The dog is brown.")


@pytest.mark.parametrize("text, reason", [
    ("The dog is brown and runs left.", "unparseable"),
    ('[{"question": "What colour', "unparseable"),  # cut off at max_tokens
    ("", "unparseable"),
    ("[]", "not_pairs"),
    ('["What colour is the dog?", "Brown."]', "not_pairs"),
    ('[{"question": "What colour is the dog?"}]', "not_pairs"),
])
def test_parse_pairs_rejects(text, reason):
    with pytest.raises(ReplyError) as info:
        parse_pairs(text)
    assert info.value.reason == reason


def test_mentions_actor_by_name_words_plural_and_irregular():
    actors = (Actor("Man in black", "..."), Actor("Group of people", "..."), Actor("Dog", "..."))
    assert mentions_actor("The dogs bark.", actors)
    assert mentions_actor("Two men walk by.", actors)  # men -> man
    assert mentions_actor("A person on the left waves.", actors)  # people -> person
    assert not mentions_actor("It is sunny and the road is grey.", actors)
    assert mentions_actor("It rolls away.", (Actor("It", "..."),))  # stopwords only: whole words
    assert not mentions_actor("Italy is far.", (Actor("It", "..."),))


def test_filter_pairs_counts_every_reason():
    actors = (Actor("Dog", "..."), Actor("Red ball", "..."))
    items = [
        {"question": "What colour is the dog?", "answer": "The dog is brown."},
        {"question": "What does the ball do?", "answer": "The ball rolls to the right."},
        {"question": "What colour is the DOG ?", "answer": "It is a brown dog."},  # same question
        {"question": "What is the weather?", "answer": "It is sunny."},  # names no actor
        {"question": "  ", "answer": "The dog."},
        {"question": "Where is the dog?", "answer": ""},
        {"question": "Who?", "answer": ["dog"]},
        "The dog is brown.",
    ]
    dropped = Counter()
    kept = filter_pairs(items, actors, dropped)
    assert kept == [("What colour is the dog?", "The dog is brown."), ("What does the ball do?", "The ball rolls to the right.")]
    assert dropped == Counter(duplicate=1, no_actor_mentioned=1, empty=2, malformed_pair=2)


def test_config_errors_are_collected():
    with pytest.raises(Exception) as info:
        GenerateQAConfig(narratives="", llm="http://127.0.0.1:1/v1", pairs_per_video=0, concurrency=0)
    text = str(info.value)
    for flag in ("--narratives", "--model", "--pairs-per-video", "--concurrency"):
        assert flag in text


# ----------------------------------------------------------------------------- end to end, stub server

def test_stub_end_to_end_then_rerun_sends_nothing(tmp_path, capsys):
    narratives = write_jsonl(tmp_path / "n.jsonl", [VIDLN, SIMPLE])
    with StubChatServer() as server:
        assert run_cli(tmp_path, narratives, server.url, "--model", "stub") == 0
        assert server.request_count == 2
        first = (tmp_path / "qa.json").read_bytes()
        printed = capsys.readouterr().out
        assert run_cli(tmp_path, narratives, server.url, "--model", "stub") == 0
        assert server.request_count == 2  # every reply came from the cache
        rerun_printed = capsys.readouterr().out
    assert (tmp_path / "qa.json").read_bytes() == first
    rows, rejects, summary = outputs(tmp_path)
    assert [r["video_id"] for r in rows] == ["c1a40349"] * 2 + ["v2"] * 4
    assert all(set(r) == {"video_id", "q", "a", "source"} and r["source"] == "vln-object-qa" for r in rows)
    assert rejects == []
    assert summary["summary"]["cached"] == 2 and summary["llm"] == {"backend": "openai-chat", "model": "stub"}
    assert "pairs kept: 6" in printed and "tokens: " in printed and "(prompt " in printed
    assert "2 from cache, 0 asked now" in rerun_printed and "none spent" in rerun_printed
    # what build-shards reads: Video-ChatGPT records, the source kept
    records = list(ingest.read_annotations(tmp_path / "qa.json"))
    assert ingest.detect_format(tmp_path / "qa.json") == "vcg"
    assert len(records) == 6 and {r.source for r in records} == {"vln-object-qa"}
    assert records[0].conversations[0]["value"].startswith("<video>\n")


def scripted(plan):
    """A responder that plays ``plan[video_id]`` (a list of Replies; the last one repeats)."""
    seen, lock = defaultdict(int), threading.Lock()

    def responder(body):
        prompt = body["messages"][-1]["content"]
        video = next(v for v in plan if f"- {v.upper()} cat:" in prompt)
        with lock:
            n = seen[video]
            seen[video] += 1
        replies = plan[video]
        reply = replies[min(n, len(replies) - 1)]
        return reply(body) if callable(reply) else reply

    return responder


def test_stub_good_malformed_slow_and_failing_replies(tmp_path, caplog):
    good = qa_responder
    mixed = json.dumps([
        {"question": "What colour is the cat?", "answer": "The cat is black."},
        {"question": "what colour is the cat", "answer": "The cat is black."},
        {"question": "Is it sunny?", "answer": "Yes, it is sunny."},
        {"question": "", "answer": "The cat."}])
    plan = {
        "good": [good],
        "fenced": [Reply.ok("Here you go:\n```json\n" + mixed + "\n```")],
        "retried": [Reply.ok("I cannot write JSON, sorry."), good],  # fixed on the re-ask
        "hopeless": [Reply.ok("No."), Reply.ok("Still no."), Reply.ok("[1, 2, 3]")],
        "busy": [Reply.error(429, retry_after="0"), Reply.error(500), good],  # transport retries
        "down": [Reply.error(503)],
        "slow": [Reply.slow(3.0)],
    }
    narratives = write_jsonl(tmp_path / "n.jsonl", [simple(v, (f"{v.upper()} cat", f"The {v} cat sits.")) for v in plan])
    caplog.set_level(logging.WARNING)
    with StubChatServer(responder=scripted(plan)) as server:
        extra = ["--model", "stub", "--timeout", "0.3", "--max-retries", "2", "--backoff", "0.001",
                 "--concurrency", "3", "--parse-retries", "2"]
        assert run_cli(tmp_path, narratives, server.url, *extra) == 0
        per_video = Counter(next(v for v in plan if f"- {v.upper()} cat:" in r["body"]["messages"][-1]["content"])
                            for r in server.requests)
        assert per_video == Counter(good=1, fenced=1, retried=2, hopeless=3, busy=3, down=3, slow=3)
        retried = [r["body"] for r in server.requests if "- RETRIED cat:" in r["body"]["messages"][-1]["content"]]
        assert sorted((b["seed"], b["temperature"]) for b in retried) == [(0, 0.0), (1, 0.7)]
        rows, rejects, summary = outputs(tmp_path)
        count = summary["summary"]
        assert {r["video_id"] for r in rows} == {"good", "fenced", "retried", "busy"}
        assert [r["q"] for r in rows if r["video_id"] == "fenced"] == ["What colour is the cat?"]
        assert count["rejected"] == {"not_pairs": 1, "llm_error": 2}
        assert count["dropped"] == {"duplicate": 1, "no_actor_mentioned": 1, "empty": 1}
        assert count["pairs"] == len(rows) == 2 + 1 + 2 + 2
        by_video = {r["video_id"]: r for r in rejects}
        assert by_video["hopeless"]["replies"] == ["No.", "Still no.", "[1, 2, 3]"]
        assert by_video["hopeless"]["reason"] == "not_pairs" and by_video["hopeless"]["attempts"] == 3
        assert "HTTP 503" in by_video["down"]["message"] and "timed out" in by_video["slow"]["message"]
        assert count["tokens"]["total_tokens"] > 0
        assert "retry 1/2" in caplog.text

        # Resume: answered requests come from the cache; only the failed videos are asked again.
        before = server.request_count
        assert run_cli(tmp_path, narratives, server.url, *extra) == 0
        assert server.request_count - before == 3 + 3  # 'down' and 'slow', each 1 + 2 retries
        assert outputs(tmp_path)[2]["summary"]["cached"] == 1 + 1 + 2 + 3 + 1


def test_fatal_endpoint_error_stops_the_run(tmp_path, capsys):
    narratives = write_jsonl(tmp_path / "n.jsonl", [SIMPLE, dict(SIMPLE, video_id="v3")])
    with StubChatServer(responder=lambda body: Reply.error(404, body='{"error": "model not found"}')) as server:
        assert run_cli(tmp_path, narratives, server.url, "--model", "nope", "--concurrency", "1") == 1
        assert server.request_count == 1
    assert "HTTP 404" in capsys.readouterr().err and not (tmp_path / "qa.json").exists()


def test_api_key_is_used_but_never_written_or_logged(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("VLMR_QA_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    narratives = write_jsonl(tmp_path / "n.jsonl", [VIDLN, SIMPLE])
    with StubChatServer() as server:
        server.push(Reply.error(500, body=f"bad gateway for key {SECRET}"))
        assert run_cli(tmp_path, narratives, server.url, "--model", "stub", "--api-key-env", "VLMR_QA_KEY",
                       "--backoff", "0.001", "--concurrency", "1") == 0
        assert {r["headers"].get("Authorization") for r in server.requests} == {f"Bearer {SECRET}"}
    captured = capsys.readouterr()
    assert SECRET not in caplog.text + captured.out + captured.err
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) >= 5  # narratives, qa.json, rejects, summary, cache entries
    for path in written:
        assert SECRET not in path.read_text(errors="replace"), path
    assert json.loads((tmp_path / "qa.json.summary.json").read_text())["settings"]["api_key_env"] == "VLMR_QA_KEY"


# ----------------------------------------------------------------------------- tiny local model

@pytest.mark.slow
def test_tiny_local_model_replies_are_rejected_and_counted(tmp_path):
    narratives = write_jsonl(tmp_path / "n.jsonl", [VIDLN, SIMPLE])
    assert run_cli(tmp_path, narratives, "tiny", "--max-tokens", "8", "--parse-retries", "1") == 0
    rows, rejects, summary = outputs(tmp_path)
    count = summary["summary"]
    # The random-weight tiny model writes gibberish: every video is asked twice, then rejected.
    assert rows == [] and count["videos"] == 2 and count["replies"] == 4
    assert sum(count["rejected"].values()) == 2 and set(count["rejected"]) <= {"unparseable", "not_pairs"}
    assert [r["video_id"] for r in rejects] == ["c1a40349", "v2"]
    assert all(len(r["replies"]) == 2 and r["attempts"] == 2 for r in rejects)
    assert count["tokens"]["completion_tokens"] <= 4 * 8
    assert summary["llm"]["model"].startswith("tiny/llama-")
    # The re-run is answered by the cache alone: the weights are never even loaded.
    config = GenerateQAConfig(narratives=str(narratives), llm="tiny", out=str(tmp_path / "qa.json"),
                              cache=str(tmp_path / "cache"), max_tokens=8, parse_retries=1)
    client = make_client("tiny", cache_dir=config.cache_dir)
    again = generate_qa.generate(config, client=client, progress=False)
    assert isinstance(client, CachedLLM) and not client.client.loaded
    assert again.cached == again.requests == 4 and again.rejected == Counter(count["rejected"])


# ----------------------------------------------------------------------------- into shards

@pytest.mark.slow
def test_generated_qa_builds_into_shards_with_other_sources(tmp_path, synth_world):
    from dataengine import build, schema

    captions = json.loads((synth_world / "annotations.json").read_text())
    videos = sorted({a["video_id"] for a in captions})[:2]
    narratives = write_jsonl(tmp_path / "n.jsonl", [
        simple(v, ("Red circle", "A red circle moves left, then grows."), ("Blue square", "A blue square stays still."))
        for v in videos])
    with StubChatServer() as server:
        assert run_cli(tmp_path, narratives, server.url, "--model", "stub") == 0
    rows = json.loads((tmp_path / "qa.json").read_text())
    assert len(rows) == 8
    out = tmp_path / "shards"
    build.build(build.BuildConfig(
        annotations=[str(synth_world / "annotations.json"), str(tmp_path / "qa.json")],
        videos=str(synth_world / "videos"), out=str(out), frames=4, clips=0, workers=1,
        cache=str(tmp_path / "features")))
    manifest = schema.Manifest.load(out)
    assert manifest.samples == len(captions) + len(rows)
    import webdataset as wds

    urls = [str(out / s.url) for st in manifest.stages for s in st.shards]
    sources = Counter(s["json"]["source"] for s in wds.WebDataset(urls, shardshuffle=False).decode())
    assert sources["vln-object-qa"] == len(rows) and sum(sources.values()) == manifest.samples
