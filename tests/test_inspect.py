"""`vlmr inspect`: summary, ls, show, head, verify and report, on intact and damaged shard sets.

Most tests use a small set written here with the real ShardWriter (fast, and every field is
known); the slow test runs every command on shards built from the synthetic world.
"""

from __future__ import annotations

import functools
import hashlib
import html.parser
import http.server
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataengine import inspection, pack, report, schema, verify as verification
from tools import inspect as cli

EASY_TOKENS = [1, 2, 2, 3, 5, 6, 7]
HARD_TOKENS = [12, 13, 20, 31, 40]
FEAT_SHAPE, CLIPS_SHAPE = (24, 64), (3, 20, 64)


def thumb_jpeg(i: int) -> bytes:
    image = Image.new("RGB", (4 * 48, 48), (30 + 20 * i % 200, 120, 200))
    for k in range(4):  # four "frames", a square moving right
        image.paste((250, 40, 40), (k * 48 + 6 + 8 * k, 16, k * 48 + 22 + 8 * k, 32))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def make_sample(i: int, tokens: int, stage: str, **extra_json) -> dict:
    rng = np.random.default_rng(i)
    data = {"id": f"rec-{i}", "video_id": f"vid_{i % 4:05d}", "source": "ann.json", "stage": stage,
            "answer_tokens": tokens,
            "conversations": [{"from": "human", "value": f"<video>\nQuestion number {i}?"},
                              {"from": "gpt", "value": " ".join(["answer"] * tokens) + f" {i}."}]}
    data.update(extra_json)
    return {"__key__": f"k{i:04d}", "json": data,
            "feat.npy": rng.standard_normal(FEAT_SHAPE).astype(np.float16),
            "clips.npy": rng.standard_normal(CLIPS_SHAPE).astype(np.float16),
            "thumb.jpg": thumb_jpeg(i)}


def standard_samples() -> dict[str, list[dict]]:
    easy = [make_sample(i, t, "easy") for i, t in enumerate(EASY_TOKENS)]
    hard = [make_sample(len(easy) + i, t, "hard") for i, t in enumerate(HARD_TOKENS)]
    # later issues add fields: shown, never rejected
    hard[2]["json"].update(narrative="A red circle moves left. Then a blue square moves up.",
                           chosen="a red circle", rejected="a green square",
                           judge={"score_chosen": 4, "score_rejected": 1}, qtype="describe")
    return {"easy": easy, "hard": hard}


FAILURES = [{"video_id": "bad_00000", "path": "videos/bad_00000.mp4", "reason": "empty",
             "message": "file has 0 bytes", "samples": 2},
            {"video_id": "bad_00001", "path": "videos/bad_00001.mp4", "reason": "corrupt",
             "message": "Invalid data", "samples": 3},
            {"video_id": "bad_00002", "path": "videos/bad_00002.mp4", "reason": "corrupt",
             "message": "Invalid data", "samples": 1}]


def write_set(folder: Path, stages: dict[str, list[dict]], *, maxcount: int = 3, failures=FAILURES,
              settings: dict | None = None) -> schema.Manifest:
    infos = pack.write_stages(folder, list(stages.items()), maxcount=maxcount)
    manifest = schema.Manifest(
        settings=settings or {"command": "build-shards", "encoder": "tiny", "frames": 8, "clips": 3, "clip_frames": 4},
        samples=sum(len(v) for v in stages.values()), failures=len(failures), stages=infos)
    (folder / schema.FAILURES_NAME).write_text("".join(json.dumps(f) + "\n" for f in failures))
    manifest.save(folder)
    return manifest


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(argv: list[str], capsys):
    code, out, _ = run([*argv, "--json"], capsys)
    return code, json.loads(out)


def member_offsets(tar_path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(tar_path) as tar:
        return {m.name: m for m in tar.getmembers()}


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clean") / "shards"
    write_set(folder, standard_samples())
    return folder


@pytest.fixture
def copy_of(clean_set, tmp_path):
    def copy() -> Path:
        target = tmp_path / "copy"
        shutil.copytree(clean_set, target)
        return target
    return copy


# ============================================================================ summary / ls

def test_summary_text_counts_stages_histogram_and_failures(clean_set, capsys):
    code, out, _ = run([clean_set], capsys)
    assert code == 0
    assert "vlmr-shards/1: 12 samples in 5 shards" in out
    assert "easy" in out and "hard" in out and "answer tokens 1..7" in out and "answer tokens 12..40" in out
    assert "curriculum split: easy <= 7 tokens, hard >= 12" in out
    assert "failures at build time: 3 (corrupt 2, empty 1); 6 sample(s) left out" in out
    assert "frames" in out and "build-shards" in out  # build settings
    histogram = out.split("answer lengths (tokens):")[1].split("failures")[0]
    bars = [line for line in histogram.splitlines() if "█" in line or line.strip().endswith(" 0")]
    assert sum(int(line.split()[-1]) for line in bars) == 12


def test_summary_json_and_no_scan(clean_set, capsys):
    code, data = run_json([clean_set], capsys)
    assert code == 0
    assert data["samples"] == 12 and data["failures"] == 3 and data["split"] == [7, 12]
    easy, hard = data["stages"]
    assert easy["answer_tokens"] == {"1": 1, "2": 2, "3": 1, "5": 1, "6": 1, "7": 1}
    assert sum(hard["answer_tokens"].values()) == 5 and sum(b["count"] for b in hard["histogram"]) == 5
    assert data["failure_log"]["reasons"] == {"corrupt": 2, "empty": 1}
    assert data["failure_log"]["samples_left_out"] == 6
    assert data["bytes"] == sum(p.stat().st_size for p in clean_set.glob("*.tar"))
    code, fast = run_json([clean_set, "summary", "--no-scan"], capsys)
    assert code == 0 and fast["stages"][0]["answer_tokens"] is None and fast["samples"] == 12
    code, out, _ = run([clean_set, "--no-scan"], capsys)
    assert code == 0 and "answer tokens 1..7" in out and "answer lengths (tokens):" not in out


def test_histogram_bins_are_integer_aligned_and_complete():
    counts = {1: 3, 2: 5, 3: 12, 4: 1, 99: 1}
    bins = inspection.histogram(counts, bins=10)
    assert bins[0].lo == 1 and bins[-1].hi == 99
    assert all(b.hi - b.lo == bins[0].hi - bins[0].lo for b in bins[:-1])
    assert sum(b.count for b in bins) == 22
    assert inspection.histogram({5: 2}, bins=8) == [inspection.Bin(5, 5, 2)]


def test_ls_rows_match_manifest(clean_set, capsys):
    manifest = schema.Manifest.load(clean_set)
    code, rows = run_json([clean_set, "ls"], capsys)
    assert code == 0
    expected = [(st.name, s.url, s.samples, s.first_key, s.last_key) for st in manifest.stages for s in st.shards]
    assert [(r["stage"], r["url"], r["samples"], r["first_key"], r["last_key"]) for r in rows] == expected
    code, out, _ = run([clean_set, "ls", "--stage", "hard"], capsys)
    assert code == 0 and "hard-000001.tar" in out and "easy-000000.tar" not in out
    assert "12..20" in out  # answer-token range of the first hard shard


# ============================================================================ show

def test_show_by_key_has_conversation_features_and_later_fields(clean_set, capsys):
    sample = standard_samples()["hard"][2]
    code, info = run_json([clean_set, "show", sample["__key__"]], capsys)
    assert code == 0
    assert info["stage"] == "hard" and info["stage_index"] == 2 and info["index"] == 9
    assert info["conversations"] == sample["json"]["conversations"] and info["answer_tokens"] == 20
    assert info["narrative"].startswith("A red circle")
    assert info["preference"] == {"chosen": "a red circle", "rejected": "a green square",
                                  "judge": {"score_chosen": 4, "score_rejected": 1}}
    assert info["other_fields"] == {"qtype": "describe"}
    feat = sample["feat.npy"].astype(np.float32)
    stats = info["features"]["feat.npy"]
    assert stats["shape"] == list(FEAT_SHAPE) and stats["dtype"] == "float16"
    assert stats["mean"] == pytest.approx(feat.mean(), rel=1e-5) and stats["std"] == pytest.approx(feat.std(), rel=1e-5)
    assert stats["nan"] == 0 and stats["inf"] == 0
    assert info["features"]["clips.npy"]["shape"] == list(CLIPS_SHAPE)
    code, out, _ = run([clean_set, "show", sample["__key__"]], capsys)
    assert code == 0
    for text in ("Question number 9?", "narrative:", "blue square moves up", "chosen:", "judge:",
                 "qtype:", "float16", "24x64", "3x20x64", "NaN 0"):
        assert text in out, text


def test_show_by_index_within_stage_and_save_writes_exact_members(clean_set, tmp_path, capsys):
    code, info = run_json([clean_set, "show", "--index", "3", "--stage", "hard", "--save", tmp_path / "s"], capsys)
    assert code == 0 and info["key"] == "k0010" and info["index"] == 10
    code, info = run_json([clean_set, "show", "--index", "10"], capsys)
    assert info["key"] == "k0010"
    with tarfile.open(clean_set / "hard-000001.tar") as tar:
        for suffix in ("json", "feat.npy", "clips.npy", "thumb.jpg"):
            assert (tmp_path / "s" / f"k0010.{suffix}").read_bytes() == tar.extractfile(f"k0010.{suffix}").read()
    feat = np.load(tmp_path / "s" / "k0010.feat.npy", allow_pickle=False)
    assert feat.shape == FEAT_SHAPE
    assert Image.open(tmp_path / "s" / "k0010.thumb.jpg").size == (192, 48)


@pytest.mark.parametrize("argv, message", [
    (["show", "nope"], "no sample with key 'nope'"),
    (["show", "--index", "12"], "past the end: 12 samples"),
    (["show", "--index", "5", "--stage", "hard"], "past the end: 5 samples in stage 'hard'"),
    (["show", "--index", "0", "--stage", "medium"], "stage 'medium' not in manifest (stages: easy, hard)"),
    (["show"], "needs a KEY or --index"),
    (["ls", "--stage", "medium"], "stage 'medium' not in manifest"),
])
def test_usage_errors_exit_2_with_a_clear_message(clean_set, capsys, argv, message):
    code, out, err = run([clean_set, *argv], capsys)
    assert code == 2 and message in err


def test_bad_sources_exit_2(tmp_path, capsys):
    code, _, err = run([tmp_path / "missing"], capsys)
    assert code == 2 and "no such file or folder" in err
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "easy-000000.tar").write_bytes(b"")
    code, _, err = run([tmp_path / "unfinished"], capsys)
    assert code == 2 and "no manifest.json" in err and "unfinished build" in err
    (tmp_path / "other.json").write_text('{"format": "something/9"}')
    code, out, err = run([tmp_path / "other.json", "--json"], capsys)
    assert code == 2 and "unknown format" in json.loads(out)["error"]


def test_help_and_argument_errors(clean_set, capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for command in cli.COMMANDS:
        assert f"  {command}" in out
    assert "Exit status" in out and "--json" in out
    code, out, _ = run([clean_set, "show", "--help"], capsys)
    assert code == 0 and "--save" in out and "--index" in out
    code, _, err = run([clean_set, "head", "-n", "-1"], capsys)
    assert code == 2 and "must be >= 0" in err
    code, _, err = run(["verify", clean_set], capsys)
    assert code == 2 and "SOURCE comes first" in err


# ============================================================================ head

def test_head_streams_first_samples_in_order(clean_set, capsys):
    code, out, _ = run([clean_set, "head", "-n", "4", "--json"], capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["key"] for r in rows] == ["k0000", "k0001", "k0002", "k0003"]
    assert [r["answer_tokens"] for r in rows] == EASY_TOKENS[:4]
    assert rows[0]["shapes"] == {"feat": list(FEAT_SHAPE), "clips": list(CLIPS_SHAPE)}
    assert rows[0]["question"] == "Question number 0?" and rows[0]["answer"] == "answer 0."
    code, out, _ = run([clean_set, "head", "-n", "3", "--stage", "hard"], capsys)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4  # header + 3 rows
    assert "k0007" in lines[1] and "k0009" in lines[3] and "[+chosen, judge, narrative, rejected]" in lines[3]
    code, out, _ = run([clean_set, "head", "-n", "100", "--json"], capsys)
    assert len(out.splitlines()) == 12


# ============================================================================ verify

def test_verify_clean_set_is_ok(clean_set, capsys):
    code, out, _ = run([clean_set, "verify"], capsys)
    assert code == 0 and "verify: OK (5 shards, 12 samples" in out
    code, result = run_json([clean_set, "verify"], capsys)
    assert code == 0 and result["ok"] and result["problems"] == [] and result["samples"] == 12


def problems_of(folder: Path, capsys) -> tuple[int, list[dict], str]:
    code, out, _ = run([folder, "verify"], capsys)
    code_json, result = run_json([folder, "verify"], capsys)
    assert code == code_json
    return code, result["problems"], out


def kinds(problems) -> set[str]:
    return {p["kind"] for p in problems}


def test_verify_truncated_shard(copy_of, capsys):
    folder = copy_of()
    tar = folder / "easy-000001.tar"
    clips = member_offsets(tar)["k0004.clips.npy"]
    tar.write_bytes(tar.read_bytes()[: clips.offset_data + 100])  # cut inside k0004's clips
    code, problems, out = problems_of(folder, capsys)
    assert code == 1
    assert kinds(problems) == {"truncated", "missing_member", "bytes", "sha256", "sample_count"}
    truncated = next(p for p in problems if p["kind"] == "truncated")
    assert truncated["shard"].endswith("easy-000001.tar") and truncated["key"] == "k0004"
    assert {p["key"] for p in problems if p["kind"] == "missing_member"} == {"k0004"}
    assert "2 samples read, the manifest says 3" in out and "PROBLEM truncated" in out
    assert "verify: 6 problem(s) in 1 file(s)" in out


def test_verify_flipped_byte_in_feature_data_and_in_npy_header(copy_of, capsys):
    folder = copy_of()
    tar = folder / "hard-000000.tar"
    members = member_offsets(tar)
    flip(tar, members["k0008.feat.npy"].offset_data + 300)  # inside the float data
    flip(tar, members["k0009.clips.npy"].offset_data + 12, 0x20)  # inside the npy header dict
    code, problems, _ = problems_of(folder, capsys)
    assert code == 1
    assert kinds(problems) == {"sha256", "decode"}
    decode = next(p for p in problems if p["kind"] == "decode")
    assert decode["key"] == "k0009" and "unreadable .npy header" in decode["message"]


def test_verify_flipped_byte_in_a_header_resyncs_and_reports_every_problem(copy_of, capsys):
    folder = copy_of()
    tar = folder / "easy-000000.tar"
    members = member_offsets(tar)
    flip(tar, members["k0000.clips.npy"].offset + 2)  # the member's name: header checksum fails
    flip(tar, members["k0002.json"].offset + 130)  # a second damaged header in the same shard
    code, problems, out = problems_of(folder, capsys)
    assert code == 1
    bad = [p for p in problems if p["kind"] == "bad_header"]
    assert [p["offset"] for p in bad] == [members["k0000.clips.npy"].offset, members["k0002.json"].offset]
    assert "checksum mismatch" in bad[0]["message"] and "resumed at the next valid header" in bad[0]["message"]
    missing = {(p["key"], p["message"]) for p in problems if p["kind"] == "missing_member"}
    assert missing == {("k0000", "no clips.npy member"), ("k0002", "no json member")}
    # the damage is located after the last member read; the sample between the two damaged
    # headers was still read whole and checked
    assert bad[1]["key"] == "k0001" and "after member k0001.thumb.jpg" in bad[1]["message"]
    assert not [p for p in problems if p["key"] == "k0001" and p["kind"] != "bad_header"]
    result = verification.verify(inspection.open_shard_set(folder))
    assert result.samples == 12


def test_verify_missing_member_and_nan_features_and_order(tmp_path, capsys):
    stages = standard_samples()
    del stages["easy"][1]["feat.npy"]  # a sample without features
    del stages["easy"][4]["thumb.jpg"]  # and one without its contact sheet
    stages["hard"][1]["feat.npy"][3, 5] = np.nan
    stages["hard"][1]["clips.npy"][0, 0, 0] = np.inf
    stages["hard"][3]["json"]["answer_tokens"] = 11  # after 20: decreasing within the stage
    write_set(tmp_path, stages)
    code, problems, out = problems_of(tmp_path, capsys)
    assert code == 1
    found = {(p["kind"], p["key"]) for p in problems}
    assert found == {("missing_member", "k0001"), ("missing_member", "k0004"), ("nonfinite", "k0008"),
                     ("order", "k0010")}
    nonfinite = [p["message"] for p in problems if p["kind"] == "nonfinite"]
    assert nonfinite == ["feat.npy has 1 NaN and 0 inf value(s)", "clips.npy has 0 NaN and 1 inf value(s)"]
    assert "answer_tokens 11 after 20" in out


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> schema.ShardInfo:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = path.read_bytes()
    return schema.ShardInfo(url=path.name, samples=3, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                            min_answer_tokens=1, max_answer_tokens=3, first_key="a", last_key="a")


def test_verify_non_contiguous_key_and_duplicates(tmp_path, capsys):
    def members(key, tokens):
        sample = make_sample(tokens, tokens, "easy")
        return [(f"{key}.{suffix}", pack.encode_member(suffix, sample[suffix]))
                for suffix in ("json", "feat.npy", "clips.npy", "thumb.jpg")]
    a, b = members("a", 1), members("b", 2)
    info = write_tar(tmp_path / "easy-000000.tar", a[:2] + b + a[2:])  # a, b, a again
    manifest = schema.Manifest(settings={"command": "build-shards", "clips": 3}, samples=3, failures=0,
                               stages=[schema.StageInfo("easy", [info])])
    manifest.save(tmp_path)
    code, problems, out = problems_of(tmp_path, capsys)
    assert code == 1
    found = {(p["kind"], p["key"]) for p in problems}
    assert ("non_contiguous", "a") in found
    assert ("missing_member", "a") in found  # each part of `a` lacks what the other part holds
    assert "no failures.jsonl" not in out  # failures: 0 and no file is fine


def test_verify_flags_member_names_that_leave_the_folder(tmp_path, capsys):
    def members(key, tokens):
        sample = make_sample(tokens, tokens, "easy")
        return [(f"{key}.{suffix}", pack.encode_member(suffix, sample[suffix]))
                for suffix in ("json", "feat.npy", "clips.npy", "thumb.jpg")]
    escaping = members("../up", 1) + members("/abs/x", 2) + members("fine/a..b", 3)
    info = write_tar(tmp_path / "easy-000000.tar", escaping)
    manifest = schema.Manifest(settings={"command": "build-shards", "clips": 3}, samples=3, failures=0,
                               stages=[schema.StageInfo("easy", [info])])
    manifest.save(tmp_path)
    code, problems, _ = problems_of(tmp_path, capsys)
    assert code == 1
    unsafe = [p for p in problems if p["kind"] == "unsafe_name"]
    assert len(unsafe) == 8  # every member of the first two samples; "a..b" is a plain name
    assert "'../up.json' is a '..' component" in unsafe[0]["message"]
    assert "'/abs/x.json' is an absolute path" in unsafe[4]["message"]
    assert all(p["offset"] is not None for p in unsafe)


def test_verify_reports_problems_in_many_shards_and_set_level(copy_of, capsys):
    folder = copy_of()
    (folder / "hard-000001.tar").unlink()
    truncated = folder / "easy-000002.tar"
    truncated.write_bytes(truncated.read_bytes()[:700])
    with open(folder / schema.FAILURES_NAME, "a") as f:
        f.write("not json\n")
    (folder / ".easy-000009.tar.x.tmp").write_bytes(b"")
    code, problems, out = problems_of(folder, capsys)
    assert code == 1
    assert {p["shard"].rsplit("/", 1)[-1] for p in problems} == {"hard-000001.tar", "easy-000002.tar",
                                                                  schema.FAILURES_NAME}
    assert {"missing_shard", "truncated", "failures"} <= kinds(problems)
    assert "note:" in out and "interrupted write" in out


def test_damaged_shard_stops_other_commands_with_exit_1(copy_of, capsys):
    folder = copy_of()
    tar = folder / "easy-000001.tar"
    offset = member_offsets(tar)["k0004.json"].offset
    flip(tar, offset + 5)
    for argv in ([], ["show", "k0005"], ["head", "-n", "12"]):
        code, _, err = run([folder, *argv], capsys)
        assert code == 1, argv
        assert "easy-000001.tar" in err and f"byte {offset}" in err and "checksum" in err
    code, _, err = run([folder, "show", "k0002"], capsys)  # in the intact shard before: fine
    assert code == 0
    code, _, err = run([folder, "head", "-n", "3"], capsys)
    assert code == 0


def test_scans_hold_one_sample_at_a_time(tmp_path):
    """Verify and summary stream: peak memory stays near one sample, not the set (10 MB here)."""
    rng = np.random.default_rng(0)
    samples = [{"__key__": f"k{i:03d}", "json": {"id": str(i), "video_id": "v", "conversations": [],
                                                  "answer_tokens": i, "stage": "easy"},
                "feat.npy": rng.standard_normal((256, 512)).astype(np.float16)} for i in range(40)]
    write_set(tmp_path, {"easy": samples}, maxcount=10, failures=[], settings={"command": "test"})
    del samples
    shard_set = inspection.open_shard_set(tmp_path)
    tracemalloc.start()
    try:
        result = verification.verify(shard_set)
        inspection.summarize(shard_set)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.ok and result.samples == 40 and result.bytes > 10_000_000
    assert peak < 3_000_000, peak


# ============================================================================ report

class PageParser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.cards = 0
        self.text: list[str] = []
        self.styles = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag in ("a", "link", "script"):
            self.links.append(attrs.get("href") or attrs.get("src") or "")
        if tag == "div" and attrs.get("class") == "card":
            self.cards += 1
        if tag == "style":
            self.styles += 1

    def handle_data(self, data):
        self.text.append(data)


def check_report(out: Path, n_gallery: int, stage_colours=("easy", "hard")) -> PageParser:
    page = (out / "index.html").read_text(encoding="utf-8")
    parser = PageParser()
    parser.feed(page)
    parser.close()
    assert parser.styles == 1 and parser.links == []  # inline CSS, nothing fetched from anywhere
    assert "http://" not in page and "https://" not in page
    assert parser.images[0] == report.HISTOGRAM_NAME and parser.cards == n_gallery
    for src in parser.images:
        assert not os.path.isabs(src) and (out / src).is_file(), src
        with Image.open(out / src) as image:
            image.load()
    with Image.open(out / report.HISTOGRAM_NAME) as hist:
        pixels = {colour for _, colour in hist.convert("RGB").getcolors(1 << 20)}
    for name in stage_colours:  # bars of each stage are drawn
        assert report.stage_colour(name, 0) in pixels, name
    return parser


def test_report_writes_an_offline_page_with_histogram_and_gallery(clean_set, tmp_path, capsys):
    out = tmp_path / "report"
    code, info = run_json([clean_set, "report", "--out", out, "--gallery", "6"], capsys)
    assert code == 0 and info["gallery"] == 6 and info["samples"] == 12
    parser = check_report(out, 6)
    text = " ".join(parser.text)
    assert "Question number 0?" in text  # the first sample of each stage is in the gallery
    assert "Curriculum split (dashed): easy answers have at most 7 tokens, hard answers at least 12." in text
    assert "corrupt" in text and "12 samples in 5 shards" in text
    thumbs = sorted(p.name for p in (out / report.THUMBS_DIR).iterdir())
    assert len(thumbs) == 6
    key = thumbs[0][: -len(".jpg")]
    stage = "easy" if int(key[1:]) < 7 else "hard"
    tar = next(clean_set.glob(f"{stage}-*.tar"))
    with tarfile.open(tar) as t:
        if f"{key}.thumb.jpg" in t.getnames():
            assert (out / report.THUMBS_DIR / thumbs[0]).read_bytes() == t.extractfile(f"{key}.thumb.jpg").read()


def test_gallery_picks_spread_over_each_stage(clean_set):
    picks = report.gallery_picks(inspection.open_shard_set(clean_set), 6)
    assert sorted(picks["easy"]) == [0, 2, 4, 5] or len(picks["easy"]) == 4
    assert len(picks["hard"]) == 2 and all(0 <= i < 5 for i in picks["hard"])
    assert report.gallery_picks(inspection.open_shard_set(clean_set), 1) == {"easy": {3}, "hard": {2}}


def test_histogram_png_marks_the_split():
    image = report.render_histogram([("easy", {1: 4, 2: 6}), ("hard", {10: 3, 11: 1})], (2, 10), bins=10)
    assert image.size == (760, 380)
    rgb = image.convert("RGB")
    dark_columns = {x for x in range(60, rgb.width) for y in range(60, 300) if rgb.getpixel((x, y)) == (0, 0, 0)}
    assert dark_columns, "no dashed split line"
    easy_x = [x for x in range(rgb.width) if rgb.getpixel((x, 320)) == report.stage_colour("easy", 0)]
    hard_x = [x for x in range(rgb.width) if rgb.getpixel((x, 320)) == report.stage_colour("hard", 1)]
    assert max(easy_x) < min(dark_columns) <= max(dark_columns) < min(hard_x)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no headless browser installed (the screenshot is optional)")
def test_report_renders_in_headless_chromium(clean_set, tmp_path):
    out = tmp_path / "report"
    report.write_report(inspection.open_shard_set(clean_set), out, gallery=6)
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--no-first-run", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                        "--window-size=1280,1600", f"--screenshot={shot}", (out / "index.html").as_uri()],
                       check=True, timeout=60, capture_output=True)
    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(1 << 20)
    assert colours is not None and len(colours) > 50  # text, the chart and the contact sheets drew
    # the chart's bar colours made it to the screen (the PNG was found and drawn)
    present = {c for _, c in colours}
    assert report.stage_colour("easy", 0) in present and report.stage_colour("hard", 1) in present


# ============================================================================ remote sources

@pytest.fixture(scope="module")
def http_url(clean_set):
    handler = functools.partial(_QuietHandler, directory=str(clean_set.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{clean_set.name}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_remote_source_over_http(http_url, clean_set, capsys):
    code, summary = run_json([http_url], capsys)
    assert code == 0 and summary["samples"] == 12 and summary["failure_log"]["reasons"] == {"corrupt": 2, "empty": 1}
    code, rows = run_json([http_url + "/manifest.json", "ls"], capsys)
    assert code == 0 and len(rows) == 5
    code, out, _ = run([http_url, "head", "-n", "2", "--json"], capsys)
    assert code == 0 and [json.loads(line)["key"] for line in out.splitlines()] == ["k0000", "k0001"]
    code, info = run_json([http_url, "show", "k0009"], capsys)
    assert code == 0 and info["shard"].startswith("http://") and info["narrative"]
    code, result = run_json([http_url, "verify"], capsys)
    assert code == 0 and result["ok"] and result["samples"] == 12


# ============================================================================ real shards

@pytest.mark.slow
def test_every_command_on_synthetic_world_shards(tmp_path, capsys):
    """synth (4 videos + 2 broken) -> build-shards -> every inspect command, then a damaged copy."""
    from dataengine.build import BuildConfig, build
    from dataengine.synth import render_world

    world = tmp_path / "world"
    render_world(world, videos=4, seed=0, broken=2, progress=False)
    shards = tmp_path / "shards"
    build(BuildConfig(annotations=[str(world / "annotations.json")], videos=str(world / "videos"), out=str(shards),
                      frames=8, clips=3, clip_frames=4, maxcount=8, workers=1, cache=str(tmp_path / "cache")))
    manifest = schema.Manifest.load(shards)

    code, summary = run_json([shards], capsys)
    assert code == 0 and summary["samples"] == manifest.samples > 0
    assert summary["failures"] == 2 and sum(summary["failure_log"]["reasons"].values()) == 2
    assert sum(sum(st["answer_tokens"].values()) for st in summary["stages"]) == manifest.samples
    code, out, _ = run([shards], capsys)
    assert code == 0 and "curriculum split" in out and "frames             8" in out

    code, rows = run_json([shards, "ls"], capsys)
    assert code == 0 and len(rows) == sum(len(st.shards) for st in manifest.stages)

    code, out, _ = run([shards, "head", "-n", "3", "--json"], capsys)
    heads = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and heads[0]["key"] == manifest.stages[0].shards[0].first_key
    p = heads[0]["shapes"]["feat"][0] - 8  # patches of the tiny encoder
    assert heads[0]["shapes"] == {"feat": [8 + p, heads[0]["shapes"]["feat"][1]],
                                  "clips": [3, 4 + p, heads[0]["shapes"]["feat"][1]]}

    last = manifest.stages[-1].shards[-1].last_key
    code, info = run_json([shards, "show", last, "--save", tmp_path / "saved"], capsys)
    assert code == 0 and info["stage"] == "hard" and info["features"]["feat.npy"]["nan"] == 0
    assert (tmp_path / "saved" / f"{last}.thumb.jpg").is_file()

    code, out, _ = run([shards, "verify"], capsys)
    assert code == 0 and f"{manifest.samples} samples" in out

    out_dir = tmp_path / "report"
    code, info = run_json([shards, "report", "--out", out_dir, "--gallery", "8"], capsys)
    assert code == 0
    parser = check_report(out_dir, info["gallery"])
    assert info["gallery"] >= 2 and any("Describe" in t or "?" in t for t in parser.text)

    damaged = tmp_path / "damaged"
    shutil.copytree(shards, damaged)
    first = damaged / manifest.stages[0].shards[0].url
    members = member_offsets(first)
    second_key = sorted({n.split(".")[0] for n in members} - {manifest.stages[0].shards[0].first_key})[0]
    flip(first, members[f"{second_key}.feat.npy"].offset + 1)  # a header
    last_tar = damaged / manifest.stages[-1].shards[-1].url
    last_tar.write_bytes(last_tar.read_bytes()[:-3000])  # truncated (end blocks and some data gone)
    code, problems, _ = problems_of(damaged, capsys)
    assert code == 1
    assert ("bad_header", first.name) in {(p["kind"], p["shard"].rsplit("/", 1)[-1]) for p in problems}
    assert any(p["kind"] == "missing_member" and p["key"] == second_key for p in problems)
    assert any(p["shard"].endswith(last_tar.name) and p["kind"] in ("truncated", "bytes") for p in problems)
