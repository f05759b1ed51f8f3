"""Shard writing: deterministic bytes, atomic names, limits, ordering and splitting."""

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest

from dataengine import pack, schema


def samples(n, with_clips=True):
    rng = np.random.default_rng(0)
    for i in range(n):
        s = {"__key__": f"k{i:03d}", "json": {"id": f"k{i}", "answer_tokens": i},
             "feat.npy": rng.standard_normal((6, 4)).astype(np.float16), "thumb.jpg": b"\xff\xd8jpeg"}
        if with_clips:
            s["clips.npy"] = rng.standard_normal((2, 5, 4)).astype(np.float16)
        yield s


def test_writer_splits_by_count_and_lists_shards(tmp_path):
    (stage,) = pack.write_stages(tmp_path, [("easy", samples(7))], maxcount=3)
    assert [s.url for s in stage.shards] == ["easy-000000.tar", "easy-000001.tar", "easy-000002.tar"]
    assert [s.samples for s in stage.shards] == [3, 3, 1]
    first = stage.shards[0]
    assert (first.first_key, first.last_key, first.min_answer_tokens, first.max_answer_tokens) == ("k000", "k002", 0, 2)
    for info in stage.shards:
        data = (tmp_path / info.url).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info.sha256 and len(data) == info.bytes
    assert not list(tmp_path.glob(".*.tmp"))


def test_members_contiguous_in_fixed_order_and_readable(tmp_path):
    pack.write_stages(tmp_path, [("easy", samples(2))])
    with tarfile.open(tmp_path / "easy-000000.tar") as tar:
        names = tar.getnames()
        assert names[:4] == ["k000.json", "k000.feat.npy", "k000.clips.npy", "k000.thumb.jpg"]
        member = tar.getmember("k000.feat.npy")
        assert member.mtime == 0 and member.uid == 0 and member.mode == 0o444
        feat = np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)
        assert feat.dtype == np.float16 and feat.shape == (6, 4)
        assert json.loads(tar.extractfile("k000.json").read())["answer_tokens"] == 0


def test_byte_identical_rewrites(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    pack.write_stages(a, [("easy", samples(5))], maxcount=2)
    pack.write_stages(b, [("easy", samples(5))], maxcount=2)
    for path in sorted(a.glob("*.tar")):
        assert path.read_bytes() == (b / path.name).read_bytes()


def test_shards_are_written_by_webdataset_with_the_same_bytes_as_ever(tmp_path, monkeypatch):
    import webdataset

    calls = []
    real = webdataset.TarWriter.write
    monkeypatch.setattr(webdataset.TarWriter, "write", lambda self, obj: calls.append(obj) or real(self, obj))
    (stage,) = pack.write_stages(tmp_path, [("easy", samples(5))], maxcount=3)
    assert len(calls) == 5 * 4  # one call per member
    # The bytes the hand-written writer produced before TarWriter took over (pins the format:
    # member order, ustar headers, mtime/uid/gid/mode, end blocks and record padding).
    assert [s.sha256 for s in stage.shards] == [
        "97a12ef38790aae10ae990bba6ea8c5a8093fbeead1ac1adb6a93c698e0a2919",
        "35b3b201761d409bf2a464dd3b8a69855b0d341c433693cd76385e3535c4f2a7"]
    assert [s.bytes for s in stage.shards] == [20480, 10240]


def test_maxsize_closes_shards(tmp_path):
    (stage,) = pack.write_stages(tmp_path, [("hard", samples(6))], maxsize=6000)
    assert len(stage.shards) > 1
    assert all(s.bytes <= 6000 + 10240 for s in stage.shards)  # one sample may not fit; end blocks


def test_abort_leaves_no_partial_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with pack.ShardWriter(tmp_path, "easy") as writer:
            for s in samples(3):
                writer.write(s)
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_bad_keys_rejected(tmp_path):
    with pack.ShardWriter(tmp_path, "easy") as writer:
        with pytest.raises(ValueError, match="must contain no"):
            writer.write({"__key__": "a.b", "json": {}})


def test_order_and_split():
    items = [("b", 3), ("a", 3), ("c", 1), ("d", 9), ("e", 5)]
    ordered = pack.order_samples(items, answer_tokens=lambda x: x[1], key=lambda x: x[0])
    assert [k for k, _ in ordered] == ["c", "a", "b", "e", "d"]  # ties broken by key
    tokens = [t for _, t in ordered]
    assert pack.Split(easy_fraction=0.65).cut(tokens) == 3  # round(5 * 0.65) = 3
    assert pack.Split(easy_fraction=None, split_at=3).cut(tokens) == 3
    assert pack.Split(easy_fraction=None, split_at=0).cut(tokens) == 0
    assert pack.Split(easy_fraction=1.0).cut(tokens) == 5


def test_manifest_roundtrip(tmp_path):
    stages = pack.write_stages(tmp_path, [("easy", samples(2)), ("hard", samples(1))])
    manifest = schema.Manifest(settings={"x": 1}, samples=3, stages=stages)
    manifest.save(tmp_path)
    loaded = schema.Manifest.load(tmp_path)
    assert loaded == manifest and loaded.stage("hard").samples == 1
    with pytest.raises(KeyError, match="stages: easy, hard"):
        loaded.stage("pairs")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(ValueError, match="unknown format"):
        schema.Manifest.load(tmp_path)


def test_sample_key_is_tar_safe_and_keeps_ids_apart():
    assert schema.sample_key("vcg-v_a-1") == "vcg-v_a-1"  # a clean id is its own key
    key = schema.sample_key("vcg-v_a.b/c 1")
    assert key.startswith("vcg-v_a_b_c_1~") and len(key) == len("vcg-v_a_b_c_1~") + 8
    assert "." not in key and "/" not in key
    # ids that clean to the same text stay apart (issue 16: they shared one key)
    for a, b in [("x.1", "x_1"), ("y/1", "y 1"), ("x.1", "x 1")]:
        assert schema.sample_key(a) != schema.sample_key(b), (a, b)
    assert schema.sample_key("x.1") == schema.sample_key("x.1")  # and stay the same across runs


def test_npy_members_are_exactly_what_np_save_writes():
    array = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    assert pack.encode_npy(array) == buf.getvalue()
    assert pack.encode_npy(np.asfortranarray(array)) == buf.getvalue()  # made C-contiguous first
    with pytest.raises(TypeError, match="pickle"):
        pack.encode_npy(np.array([{"a": 1}], dtype=object))
