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


# ------------------------------------------------------------------------ issue 16: bytes that are not UTF-8

def _llava(rid, video="v.mp4"):
    return {"id": rid, "video": video, "conversations": [{"from": "human", "value": "What?"},
                                                          {"from": "gpt", "value": "That."}]}


def _bad_byte_files(tmp_path):
    """The same three records in each format, the second holding byte 0xff; (path, line, offset)."""
    vcg = json.dumps([{"video_id": f"v{i}", "q": "What?", "a": "That."} for i in range(3)], indent=1).encode()
    jsonl = b"\n".join(json.dumps(_llava(str(i), f"v{i}")).encode() for i in range(3)) + b"\n"
    csv_text = (b"video,question,answer,qid,type,a0,a1\nv0,what,0,1,CW,yes,no\n"
                b"v1,\"two\nlines v1\",1,2,CW,yes,no\nv2,ok,0,3,CW,a,b\n")
    cases = []
    for name, data in [("a.json", vcg), ("b.jsonl", jsonl), ("c.csv", csv_text)]:
        data = data.replace(b"v1", b"v\xff1", 1 if name != "c.csv" else 2)
        path = tmp_path / name
        path.write_bytes(data)
        offset = data.index(b"\xff")
        cases.append((path, data[:offset].count(b"\n") + 1, offset))
    return cases


def test_a_byte_that_is_not_utf8_is_named_and_skippable(tmp_path):
    for path, line, offset in _bad_byte_files(tmp_path):
        with pytest.raises(ingest.IngestError) as caught:
            list(ingest.read_annotations(path))
        message = str(caught.value)
        assert str(path) in message and "record 1" in message, message
        assert f"line {line}, byte offset {offset}: byte 0xff is not UTF-8" in message, message
        stats = ingest.IngestStats()
        records = ingest.read_all([path], on_error="skip", stats=stats)
        assert [r.video_id for r in records] == ["v0", "v2"], path
        assert stats.skipped == 1 and stats.failures[0]["reason"] == "not_utf8"
        assert stats.failures[0]["record"] == 1


# ------------------------------------------------------------------------ issue 16: sample keys stay unique

@pytest.mark.parametrize("a, b", [("x.1", "x_1"), ("y/1", "y 1")])
def test_ids_that_clean_to_one_text_keep_separate_keys(tmp_path, a, b):
    from dataengine import schema

    path = write(tmp_path, "ann.json", json.dumps([_llava(a), _llava(b)]))
    records = ingest.read_all([path])
    keys = {schema.sample_key(r.id) for r in records}
    assert len(keys) == 2, keys


def test_ids_that_would_share_a_key_are_an_error_naming_both(tmp_path, monkeypatch):
    from dataengine import schema

    # A key function that loses the difference (as the old one did for x.1 / x_1): the check
    # in read_all must catch it rather than let one key into a tar twice.
    monkeypatch.setattr(schema, "sample_key", lambda rid: rid.replace(".", "_"))
    path = write(tmp_path, "ann.json", json.dumps([_llava("x.1"), _llava("x_1")]))
    with pytest.raises(ingest.IngestError, match=r"'ann-x\.1' and 'ann-x_1' would share the sample key"):
        ingest.read_all([path])


# ------------------------------------------------------------------------ Hugging Face datasets (issue 17)

MSVD_ROWS = {"video_id": [1001, 1002, 1003], "question": ["what is moving?", "how many cats?", "who runs?"],
             "answer": ["a red circle", "3", "a man"], "qtype": ["what", "how many", "who"]}


def _msvd_like(tmp_path):
    datasets = pytest.importorskip("datasets")
    return datasets.Dataset.from_dict(MSVD_ROWS)


def _check_msvd(records, source):
    assert [r.video_id for r in records] == ["1001", "1002", "1003"]
    assert records[0].conversations == [{"from": "human", "value": "<video>\nwhat is moving?"},
                                        {"from": "gpt", "value": "a red circle"}]
    assert records[1].answers() == ["3"]
    assert records[2].extra == {"qtype": "who"} and records[2].source == source


def test_saved_dataset_folder_parquet_json_and_csv_through_datasets(tmp_path):
    ds = _msvd_like(tmp_path)
    ds.save_to_disk(str(tmp_path / "msvd_saved"))
    ds.to_parquet(str(tmp_path / "msvd.parquet"))
    (tmp_path / "msvd.json").write_text(json.dumps([dict(zip(MSVD_ROWS, row)) for row in zip(*MSVD_ROWS.values())]))
    # a CSV of free-form answers (not NExT-QA's option index); its "3" is read back as a number
    with open(tmp_path / "msvd.csv", "w") as f:
        f.write("video_id,question,answer,qtype\n" + "".join(
            f"{v},{q},{a},{t}\n" for v, q, a, t in zip(*MSVD_ROWS.values())))
    for name, fmt in [("msvd_saved", "hf-disk"), ("msvd.parquet", "hf-parquet"), ("msvd.json", "hf-json"),
                      ("msvd.csv", "hf-csv")]:
        path = tmp_path / name
        assert ingest.detect_format(path) == fmt
        stats = ingest.IngestStats()
        records = ingest.read_all([path], stats=stats)
        _check_msvd(records, source="msvd_saved" if fmt == "hf-disk" else "msvd")
        assert stats.formats == {str(path): fmt}


def test_dataset_columns_map_onto_records(tmp_path):
    datasets = pytest.importorskip("datasets")
    turns = [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "Two shapes."}]
    llava = datasets.Dataset.from_dict({"id": ["a.1", "b"], "video": ["v1.mp4", "v2.mp4"],
                                        "conversations": [turns, turns], "score": [0.5, 1.0]})
    llava.to_parquet(str(tmp_path / "llava.parquet"))
    records = ingest.read_all([tmp_path / "llava.parquet"])
    assert [r.id for r in records] == ["llava-a.1", "llava-b"]
    assert records[0].conversations[0]["value"] == "<video>\nDescribe it."
    assert records[0].extra == {"score": 0.5}
    # a malformed row is named and skippable like any other record
    bad = datasets.Dataset.from_dict({"video": ["v1", "v2"], "instruction": ["Q?", ""], "output": ["A.", "B."]})
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ingest.IngestError, match=r"bad: record 1 \(hf-disk\): turn 0 value must be"):
        ingest.read_all([tmp_path / "bad"])
    stats = ingest.IngestStats()
    assert len(ingest.read_all([tmp_path / "bad"], on_error="skip", stats=stats)) == 1 and stats.skipped == 1


def test_dataset_dict_split_and_unknown_columns_are_clear_errors(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = _msvd_like(tmp_path)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(ingest.IngestError, match=r"splits \['test', 'train'\]; give one split's folder"):
        ingest.read_all([tmp_path / "two"])
    assert len(ingest.read_all([tmp_path / "two" / "test"])) == 3
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "one"))
    assert len(ingest.read_all([tmp_path / "one"])) == 3
    datasets.Dataset.from_dict({"clip": ["x"], "text": ["y"]}).to_parquet(str(tmp_path / "odd.parquet"))
    with pytest.raises(ingest.IngestError, match=r"odd\.parquet: records of unknown columns \['clip', 'text'\]"):
        ingest.read_all([tmp_path / "odd.parquet"])
    (tmp_path / "plain").mkdir()
    with pytest.raises(ingest.IngestError, match="not one written by datasets' save_to_disk"):
        ingest.read_all([tmp_path / "plain"])
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "odd.parquet").read_bytes()[:-20])
    with pytest.raises(ingest.IngestError, match=r"cut\.parquet: cannot read it as a hf-parquet dataset"):
        ingest.read_all([tmp_path / "cut.parquet"])
