"""dataengine.sources: locating and loading a shard set's manifest, opening its shard URLs.

One small real set (written with the real ShardWriter) is opened as a folder, a manifest
file, ``file://``, ``http://`` (a local http.server thread, with and without Range support),
fsspec ``memory://`` and ``pipe:``; then every way a source can be wrong. Run:
``pytest tests/test_sources.py``.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from dataengine import pack, schema, sources
from dataengine.sources import SourceError, SourceNotFoundError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("srcset") / "set"
    rng = np.random.default_rng(0)

    def sample(i: int, stage: str) -> dict:
        return {"__key__": f"k{i:04d}", "json": {"id": f"r{i}", "stage": stage, "answer_tokens": i},
                "feat.npy": rng.standard_normal((16, 32)).astype(np.float16)}

    infos = pack.write_stages(folder, [("easy", [sample(i, "easy") for i in range(5)]),
                                       ("hard", [sample(i, "hard") for i in range(5, 8)])], maxcount=3)
    schema.Manifest(settings={"command": "test"}, samples=8, failures=1, stages=infos).save(folder)
    (folder / schema.FAILURES_NAME).write_text('{"reason": "empty"}\n')
    return folder


def shard_bytes(where: sources.ManifestLocation, manifest: schema.Manifest, **kw) -> dict[str, bytes]:
    return {s.url: sources.read_url(where.resolve(s.url), **kw) for st in manifest.stages for s in st.shards}


def local_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


# ----------------------------------------------------------------------------- local

def test_folder_manifest_file_and_file_url_open_the_same_set(shard_set):
    expected = schema.Manifest.load(shard_set)
    folder = str(shard_set)
    cases = {
        folder: (folder + "/manifest.json", folder),
        folder + "/": (folder + "/manifest.json", folder),
        folder + "/manifest.json": (folder + "/manifest.json", folder),
        f"file://{folder}": (f"file://{folder}/manifest.json", f"file://{folder}"),
        f"file://{folder}/manifest.json": (f"file://{folder}/manifest.json", f"file://{folder}"),
    }
    for source, (url, base) in cases.items():
        where, manifest = sources.open_manifest(source)
        assert (where.source, where.url, where.base) == (source, url, base)
        assert manifest == expected
        assert shard_bytes(where, manifest) == local_bytes(shard_set)
    assert len(local_bytes(shard_set)) == 3  # easy 3+2, hard 3


def test_manifest_in_the_working_folder_and_any_file_name(shard_set, tmp_path, monkeypatch):
    monkeypatch.chdir(shard_set)
    where, manifest = sources.open_manifest("manifest.json")
    assert where.base == "." and where.resolve("easy-000000.tar") == "./easy-000000.tar"
    assert shard_bytes(where, manifest) == local_bytes(shard_set)
    renamed = tmp_path / "set.v2"  # a manifest file is taken whatever its name
    renamed.write_bytes((shard_set / "manifest.json").read_bytes())
    where, _ = sources.open_manifest(renamed)
    assert where.url == str(renamed) and where.base == str(tmp_path)


def test_open_url_sizes_seeks_and_buffered_lines(shard_set):
    path = shard_set / "easy-000000.tar"
    data = path.read_bytes()
    f, size = sources.open_url(str(path))
    with f:
        assert size == len(data) and f.seekable()
        f.seek(1024)
        assert f.read(100) == data[1024:1124]
    f, _ = sources.open_url(f"file://{shard_set}/{schema.FAILURES_NAME}", buffered=True)
    with f:
        assert [json.loads(line) for line in f] == [{"reason": "empty"}]


# ----------------------------------------------------------------------------- remote

class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files, honouring ``Range: bytes=N-`` when the server's ``ranges`` is set."""

    def log_message(self, *args):
        pass

    def send_head(self):
        spec = self.headers.get("Range")
        if not spec or not self.server.ranges:
            return super().send_head()
        path = self.translate_path(self.path)
        start = int(spec.split("=")[1].split("-")[0])
        f = open(path, "rb")
        size = os.fstat(f.fileno()).st_size
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Length", str(size - start))
        self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        return f


@pytest.fixture(params=[True, False], ids=["ranges", "no-ranges"])
def http_root(request, shard_set):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_RangeHandler, directory=str(shard_set.parent)))
    server.ranges = request.param
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", request.param
    finally:
        server.shutdown()
        server.server_close()


def test_http_folder_and_manifest_urls(http_root, shard_set):
    root, ranges = http_root
    for source in (f"{root}/set", f"{root}/set/", f"{root}/set/manifest.json"):
        where, manifest = sources.open_manifest(source)
        assert (where.url, where.base) == (f"{root}/set/manifest.json", f"{root}/set")
        assert manifest == schema.Manifest.load(shard_set)
        assert shard_bytes(where, manifest) == local_bytes(shard_set)
    data = (shard_set / "easy-000000.tar").read_bytes()
    f, size = sources.open_url(f"{root}/set/easy-000000.tar")
    with f:
        assert size == len(data)
        assert f.read(10) == data[:10]
        f.seek(3000)  # forward: Range request or read-through
        assert f.read(512) == data[3000:3512]
        f.seek(100)  # back: a new request, ranged when the server allows
        assert f.read(50) == data[100:150] and f.ranges is ranges
    with pytest.raises(SourceNotFoundError, match=r"nothere/manifest.json: cannot read the manifest: HTTP Error 404"):
        sources.open_manifest(f"{root}/nothere")
    with pytest.raises(FileNotFoundError):  # a missing shard: the caller names it
        sources.open_url(f"{root}/set/gone.tar")


def test_fsspec_memory_source(shard_set):
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in shard_set.iterdir():
        fs.pipe(f"/sourcestest/{path.name}", path.read_bytes())
    where, manifest = sources.open_manifest("memory://sourcestest")
    assert where.url == "memory://sourcestest/manifest.json"
    assert shard_bytes(where, manifest) == local_bytes(shard_set)
    with pytest.raises(SourceNotFoundError, match="cannot read the manifest"):
        sources.open_manifest("memory://nosuchset")


# ----------------------------------------------------------------------------- pipe

def test_pipe_needs_opt_in_and_runs_nothing_without_it(shard_set, tmp_path):
    marker = tmp_path / "ran"
    source = f"pipe:touch {marker} {{}}"
    for call in (lambda: sources.open_manifest(source), lambda: sources.locate_manifest(source),
                 lambda: sources.open_url(f"pipe:touch {marker}"), lambda: sources.read_url(f"pipe:touch {marker}")):
        with pytest.raises(SourceError, match="allow_pipe=True"):
            call()
    assert not marker.exists()
    where, manifest = sources.open_manifest(f"pipe:cat {shard_set}/{{}}", allow_pipe=True)
    assert where.url == f"pipe:cat {shard_set}/manifest.json"
    assert where.resolve("easy-000000.tar") == f"pipe:cat {shard_set}/easy-000000.tar"
    assert where.resolve("my set.tar") == f"pipe:cat {shard_set}/'my set.tar'"  # one argument
    assert shard_bytes(where, manifest, allow_pipe=True) == local_bytes(shard_set)
    with pytest.raises(SourceError, match=r"needs a \{\} where the file name goes"):
        sources.open_manifest(f"pipe:cat {shard_set}/manifest.json", allow_pipe=True)
    with pytest.raises(SourceError, match="cannot read the manifest: exited with status 3"):
        sources.open_manifest(f"pipe:sh -c 'cat {shard_set}/$0; exit 3' {{}}", allow_pipe=True)


def _manifest_naming(folder, shard_set, url):
    """A copy of shard_set's manifest under ``folder`` whose first shard URL is ``url``."""
    data = json.loads((shard_set / "manifest.json").read_text())
    data["stages"][0]["shards"][0]["url"] = url
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


def test_a_manifest_never_runs_a_command(shard_set, tmp_path):
    """Issue 16: with allow_pipe=True, a manifest entry "url": "pipe:touch X" ran."""
    marker = tmp_path / "ran"
    for source in (_manifest_naming(tmp_path / "set", shard_set, f"pipe:touch {marker}"),
                   f"pipe:cat {_manifest_naming(tmp_path / 'set2', shard_set, f'pipe:touch {marker}')}/{{}}"):
        with pytest.raises(SourceError, match="would run a command; a manifest never runs one"):
            where, manifest = sources.open_manifest(source, allow_pipe=True)
            shard_bytes(where, manifest, allow_pipe=True)  # (the old code ran the command here)
        assert not marker.exists()
        with pytest.raises(SourceError, match="would run a command"):  # trusting the folder is not enough
            sources.open_manifest(source, allow_pipe=True, allow_outside=True)


def test_shard_names_are_one_argument_of_the_users_pipe(tmp_path):
    marker = tmp_path / "ran"
    hostile = f"x.tar {marker} 'quoted' $(touch {marker})"
    count_args = f"pipe:{sys.executable} -c 'import sys; sys.stdout.write(repr(sys.argv[1:]))' {{}}"
    url = sources.resolve_url(count_args, hostile)
    assert sources.read_url(url, allow_pipe=True).decode() == repr([hostile])
    assert not marker.exists()


@pytest.mark.parametrize("url", ["../outside.tar", "sub/../../outside.tar", "/abs/outside.tar",
                                 "file:///abs/outside.tar", "http://elsewhere/x.tar"])
def test_a_shard_url_that_leaves_the_folder_is_refused_unless_allowed(shard_set, tmp_path, url):
    (tmp_path / "outside.tar").write_bytes((shard_set / "easy-000000.tar").read_bytes())
    folder = _manifest_naming(tmp_path / "set", shard_set, url)
    for source in (folder, f"pipe:cat {folder}/{{}}"):
        with pytest.raises(SourceError, match=r"manifest.json: shard URL .* points outside the shard set's folder"):
            sources.open_manifest(source, allow_pipe=True)
    where, _ = sources.open_manifest(folder, allow_outside=True)
    assert where.resolve(url) == url


# ----------------------------------------------------------------------------- bad sources

def test_missing_source_and_folder_without_manifest(tmp_path):
    with pytest.raises(SourceNotFoundError, match="missing: no such file or folder") as info:
        sources.open_manifest(tmp_path / "missing")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceNotFoundError, match=r"empty: no manifest.json in this folder$"):
        sources.open_manifest(empty)
    (empty / "easy-000000.tar").write_bytes(b"")
    (empty / "easy-000001.tar").write_bytes(b"")
    with pytest.raises(SourceNotFoundError, match=r"2 tar\(s\) but no manifest: an unfinished build\?"):
        sources.open_manifest(empty)


@pytest.mark.parametrize("content, message", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\xfa{}", "not valid JSON"),
    (b"[1, 2]", "expected a JSON object, got list"),
    (b'{"format": "something/9"}', "unknown format 'something/9'"),
    (b'{"format": "vlmr-shards/1", "stages": [{"name": "easy"}]}', "malformed stages"),
])
def test_bad_manifests_name_the_file(tmp_path, content, message):
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(SourceError, match=message) as info:
        sources.open_manifest(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}/manifest.json: ")
    assert not isinstance(info.value, FileNotFoundError)


# ----------------------------------------------------------------------------- URL rules

@pytest.mark.parametrize("url, scheme", [
    ("shards/demo", ""), ("/data/runs/a:b/set", ""), ("runs:v2/set", ""), ("C:/data", ""),
    ("file:///data/set", "file"), ("HTTPS://host/set", "https"), ("s3://bucket/set", "s3"),
    ("simplecache::s3://bucket/set", "simplecache"), ("pipe:cat /x/{}", "pipe"),
])
def test_url_scheme(url, scheme):
    assert sources.url_scheme(url) == scheme
    assert (sources.local_path(url) is not None) == (scheme in ("", "file"))


def test_local_path_and_resolve_url():
    assert sources.local_path("file:///data/my%20set/a.tar") == "/data/my set/a.tar"
    assert sources.local_path("http://host/a.tar") is None
    assert sources.resolve_url("shards/demo", "easy-000000.tar") == "shards/demo/easy-000000.tar"
    assert sources.resolve_url("http://h/set/", "easy.tar") == "http://h/set/easy.tar"
    assert sources.resolve_url("http://h/set", "/abs/easy.tar", allow_outside=True) == "/abs/easy.tar"
    assert sources.resolve_url("shards/demo", "s3://b/easy.tar", allow_outside=True) == "s3://b/easy.tar"
    assert sources.resolve_url("shards/demo", "sub/../easy.tar") == "shards/demo/sub/../easy.tar"  # stays in
    assert sources.resolve_url("pipe:cat /x/{}", "easy.tar") == "pipe:cat /x/easy.tar"
    assert sources.resolve_url("", "easy.tar") == "easy.tar"


def test_inspect_path_stays_free_of_torch():
    code = ("import sys; import dataengine.sources, dataengine.inspection, tools.inspect; "
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'torch'); "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
