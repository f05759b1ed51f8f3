"""Annotation readers: every format, detection by content, malformed records named and counted."""

import json

import pytest

from dataengine import ingest


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_videochatgpt_json(tmp_path):
    path = write(tmp_path, "vcg.json", json.dumps([
        {"video_id": "v_abc", "q": "What colour?", "a": "Red."},
        {"video_id": "v_def", "q": "Describe it.", "a": "A long answer.", "qtype": "describe"},
    ]))
    assert ingest.detect_format(path) == "vcg"
    records = list(ingest.read_annotations(path))
    assert [r.video_id for r in records] == ["v_abc", "v_def"]
    assert records[0].conversations == [{"from": "human", "value": "<video>\nWhat colour?"},
                                        {"from": "gpt", "value": "Red."}]
    assert records[0].source == "vcg" and records[0].id == "vcg-0000000"
    assert records[1].extra == {"qtype": "describe"}


def test_llava_json_and_jsonl(tmp_path):
    rec = {"id": "x1", "video": "clip.mp4", "conversations": [
        {"from": "human", "value": "<image>\nWhat happens?"}, {"from": "gpt", "value": "A ball rolls."},
        {"from": "human", "value": "Then?"}, {"from": "gpt", "value": "It stops."}]}
    j = write(tmp_path, "llava.json", json.dumps([rec]))
    jl = write(tmp_path, "llava2.jsonl", json.dumps(rec) + "\n\n" + json.dumps(dict(rec, id="x2")) + "\n")
    assert ingest.detect_format(j) == "llava"
    assert ingest.detect_format(jl) == "llava-jsonl"
    (a,) = ingest.read_annotations(j)
    assert a.video_id == "clip.mp4"
    assert a.conversations[0]["value"] == "<video>\nWhat happens?"  # <image> normalised
    assert a.answers() == ["A ball rolls.", "It stops."]
    assert [r.id for r in ingest.read_annotations(jl)] == ["llava2-x1", "llava2-x2"]


def test_llava_without_placeholder_gets_one(tmp_path):
    rec = {"id": "1", "video": "v", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}]}
    (r,) = ingest.read_annotations(write(tmp_path, "l.json", json.dumps([rec])))
    assert r.conversations[0]["value"] == "<video>\nQ?"


def test_nextqa_csv(tmp_path):
    path = write(tmp_path, "nextqa.csv",
                 "video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4\n"
                 "4010069381,369,640,480,how do the two man play the instrument,2,6,CH,"
                 "roll the handle,tap their feet,strum the string,hit with sticks,pat with hand\n")
    assert ingest.detect_format(path) == "nextqa"
    (r,) = ingest.read_annotations(path)
    assert r.video_id == "4010069381"
    assert r.conversations[1]["value"] == "strum the string"
    assert r.conversations[0]["value"].endswith("instrument?")
    assert r.extra["type"] == "CH" and r.extra["answer_index"] == 2 and r.extra["qid"] == "6"


@pytest.mark.parametrize("bad", [
    {"video_id": "v", "q": "", "a": "x"},
    {"video_id": "v", "q": "q?"},
    ["not", "a", "record"],
])
def test_malformed_record_names_file_and_index(tmp_path, bad):
    path = write(tmp_path, "bad.json", json.dumps([{"video_id": "ok", "q": "q", "a": "a"}, bad]))
    with pytest.raises(ingest.IngestError, match=r"bad\.json: record 1"):
        list(ingest.read_annotations(path))
    stats = ingest.IngestStats()
    records = list(ingest.read_annotations(path, on_error="skip", stats=stats))
    assert len(records) == 1 and stats.skipped == 1 and stats.records == 1
    assert stats.failures[0]["record"] == 1 and "bad.json" in stats.failures[0]["annotation"]


def test_malformed_llava_turns_and_jsonl_lines(tmp_path):
    bad_turns = {"id": "1", "video": "v", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}
    path = write(tmp_path, "l.json", json.dumps([bad_turns]))
    with pytest.raises(ingest.IngestError, match="record 0.*human"):
        list(ingest.read_annotations(path))
    jl = write(tmp_path, "l.jsonl", '{"id": "1", "video": "v", "conversations": []}\n{broken\n')
    stats = ingest.IngestStats()
    assert list(ingest.read_annotations(jl, on_error="skip", stats=stats)) == []
    assert stats.skipped == 2


def test_nextqa_bad_answer_index(tmp_path):
    path = write(tmp_path, "n.csv", "video,question,answer,qid,type,a0,a1\nv1,why,7,1,CW,x,y\n")
    with pytest.raises(ingest.IngestError, match=r"n\.csv: record 0.*a7"):
        list(ingest.read_annotations(path))


def test_unknown_and_empty_files(tmp_path):
    with pytest.raises(ingest.IngestError, match="empty"):
        ingest.detect_format(write(tmp_path, "e.json", "  "))
    with pytest.raises(ingest.IngestError, match="unknown annotation format"):
        ingest.detect_format(write(tmp_path, "x.txt", "hello,world\n1,2\n"))
    with pytest.raises(ingest.IngestError, match="not found"):
        list(ingest.read_annotations(tmp_path / "nope.json"))


def test_duplicate_ids_across_files_are_an_error(tmp_path):
    a = tmp_path / "a"; b = tmp_path / "b"; a.mkdir(); b.mkdir()
    rec = json.dumps([{"video_id": "v", "q": "q", "a": "a"}])
    with pytest.raises(ingest.IngestError, match="already read"):
        ingest.read_all([write(a, "same.json", rec), write(b, "same.json", rec)])


def test_video_resolution_with_and_without_extension(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["v_abc.mp4", "sub/clip.mkv", "other.webm"]:
        (tmp_path / name).write_bytes(b"x")
    index = ingest.index_videos(tmp_path)
    assert ingest.resolve_video("v_abc", index).name == "v_abc.mp4"
    assert ingest.resolve_video("v_abc.mp4", index).name == "v_abc.mp4"
    assert ingest.resolve_video("sub/clip", index).name == "clip.mkv"
    assert ingest.resolve_video("other.avi", index).name == "other.webm"  # same stem, other container
    assert ingest.resolve_video("missing", index) is None
