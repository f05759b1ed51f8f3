"""Where a shard set lives: opening URLs, finding and loading the manifest, resolving shard URLs.

The one place that knows about sources, shared by :class:`dataengine.reader.ShardReader`
and ``vlmr inspect`` (:mod:`dataengine.inspection`)::

    from dataengine import sources
    where, manifest = sources.open_manifest("https://host/sets/demo")  # folder, manifest or URL
    for stage in manifest.stages:
        for shard in stage.shards:
            f, size = sources.open_url(where.resolve(shard.url))

A SOURCE is a shard folder or its manifest file, as a local path, ``file://``,
``http(s)://`` (standard library; seeks by Range request when the server supports them)
or any fsspec URL whose backend is installed (``s3://`` needs s3fs, ``gs://`` gcsfs;
chained URLs like ``simplecache::s3://...`` too). ``pipe:COMMAND`` runs COMMAND (split
like a shell would, never through a shell) with ``{}`` replaced by the file name
(``manifest.json``, then each shard's URL, quoted as one argument); it runs a command, so
it is refused unless the caller passes ``allow_pipe=True``.

Shard URLs in a manifest are relative to the manifest's folder. A manifest is data, never
a command: a ``pipe:`` shard URL is refused whatever the caller allows, and a shard URL
that leaves the folder (an absolute path, another URL, ``../``) is refused unless the
caller passes ``allow_outside=True`` (it trusts that manifest).

Every way a source can fail to open is a :class:`SourceError` (a ``ValueError``) naming
the source or the manifest URL; nothing there, or a folder without a manifest, is the
subclass :class:`SourceNotFoundError`, which is also a ``FileNotFoundError``.

This module must not import torch: ``vlmr inspect`` starts in half a second because
nothing on its path does. Tests: ``pytest tests/test_sources.py``.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import shlex
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import BinaryIO

from dataengine import schema
from dataengine.schema import Manifest
from dataengine.tario import file_size

_READ_CHUNK = 4 << 20
# A URL names its scheme before "://" (or "::" for fsspec's chained URLs); one letter
# would be a Windows drive. A plain path may hold colons ("runs/a:b"), so "x:" alone is not one.
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)(?:://|::)")


class SourceError(ValueError):
    """A source cannot be opened as a shard set: refused, unreadable manifest, bad manifest."""


class SourceNotFoundError(SourceError, FileNotFoundError):
    """Nothing at the source, or a folder without a manifest (also a ``FileNotFoundError``)."""


# ------------------------------------------------------------------------------- URLs

def url_scheme(url: str) -> str:
    """``""`` for a plain path, else the lower-case scheme (``file``, ``http``, ``pipe``, ``s3``...)."""
    if url.startswith("pipe:"):
        return "pipe"
    if url[:5].lower() == "file:":
        return "file"
    match = _URL.match(url)
    return match.group(1).lower() if match else ""


def local_path(url: str) -> str | None:
    """The local path of a plain path or a ``file://`` URL; None for anything else."""
    scheme = url_scheme(url)
    if scheme == "":
        return url
    if scheme == "file":
        return urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    return None


def leaves_folder(name: str) -> bool:
    """Whether a shard URL from a manifest points outside the manifest's folder: an absolute
    path, a URL, or a relative path that climbs out with ``..``."""
    if url_scheme(name) or os.path.isabs(name):
        return True
    normal = posixpath.normpath(name)
    return normal == ".." or normal.startswith("../")


def resolve_url(base: str, name: str, *, allow_outside: bool = False) -> str:
    """``name`` (a shard URL from a manifest) relative to ``base``, the manifest's folder.

    A manifest never runs a command: a ``pipe:`` name is refused, always; under a ``pipe:``
    template (the user's own command), ``name`` takes the place of ``{}``, quoted as one
    argument. A name that leaves the folder (absolute path, URL, ``../``) is refused unless
    ``allow_outside`` (the user trusts the manifest); then it is used as it is.
    """
    if url_scheme(name) == "pipe":
        raise SourceError(f"shard URL {name!r} would run a command; a manifest never runs one "
                          "(the pipe: template given as the source is the only command)")
    if leaves_folder(name):
        if not allow_outside:
            raise SourceError(f"shard URL {name!r} points outside the shard set's folder; pass "
                              "allow_outside=True if you trust this manifest")
        return name
    if url_scheme(base) == "pipe":
        return base.replace("{}", shlex.quote(name))
    return base.rstrip("/") + "/" + name if base else name


# ------------------------------------------------------------------------------- streams

class HttpStream(io.RawIOBase):
    """An HTTP(S) object read front to back; seeks by Range request when the server allows,
    otherwise by reading and discarding (forward only, or from a new request)."""

    _DISCARD_LIMIT = 1 << 20  # forward gaps up to this are read through rather than re-requested

    def __init__(self, url: str, offset: int = 0, timeout: float = 60.0):
        self.url = url
        self.timeout = timeout
        self.ranges: bool | None = None
        """Whether the server honours Range requests (None: not asked yet)."""
        self._resp = None
        self._pos = 0
        self.size: int | None = None
        self._request(offset)

    def _request(self, offset: int) -> None:
        if self._resp is not None:
            self._resp.close()
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            resp = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers),  # noqa: S310
                                          timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise FileNotFoundError(f"{self.url}: {exc}") from exc
            raise OSError(f"{self.url}: {exc}") from exc
        except urllib.error.URLError as exc:
            raise OSError(f"{self.url}: {exc}") from exc
        self._resp = resp
        self._pos = 0
        if offset and resp.status == 206:
            self.ranges = True
            self._pos = offset
        elif offset:
            self.ranges = False
        length = resp.headers.get("Content-Length")
        if length is not None and self.size is None:
            self.size = int(length) + self._pos
        if self._pos < offset:
            self._discard(offset - self._pos)

    def _discard(self, n: int) -> None:
        scratch = bytearray(min(n, self._DISCARD_LIMIT))
        while n:
            got = self.readinto(memoryview(scratch)[:min(n, len(scratch))])
            if not got:
                raise OSError(f"{self.url}: ends at byte {self._pos}, before the requested offset")
            n -= got

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def readinto(self, b) -> int:
        n = self._resp.readinto(b)
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: offset, io.SEEK_CUR: self._pos + offset}.get(whence)
        if target is None:
            raise io.UnsupportedOperation("HTTP streams seek from the start or the current position only")
        if target == self._pos:
            return target
        if target > self._pos and (self.ranges is False or target - self._pos <= self._DISCARD_LIMIT):
            self._discard(target - self._pos)
        else:
            self._request(target)
        return self._pos

    def close(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None
        super().close()


class PipeStream(io.RawIOBase):
    """The standard output of a command (no shell); a non-zero exit is an error naming it."""

    def __init__(self, command: str):
        self.command = command
        args = shlex.split(command)
        if not args:
            raise ValueError("empty pipe: command")
        self._proc = subprocess.Popen(args, stdout=subprocess.PIPE)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, b) -> int:
        n = self._proc.stdout.readinto(b)
        if not n:
            code = self._proc.wait()
            if code != 0:
                raise OSError(f"pipe:{self.command}: exited with status {code}")
        return n

    def close(self) -> None:
        if self._proc.poll() is None:  # stopped early: we do not need the rest
            self._proc.terminate()
        self._proc.stdout.close()
        self._proc.wait()
        super().close()


def _refuse_pipe(url: str) -> SourceError:
    return SourceError(f"{url}: pipe: sources run a command; pass allow_pipe=True to allow it")


def open_url(url: str, *, allow_pipe: bool = False, buffered: bool = False) -> tuple[BinaryIO, int | None]:
    """A readable binary file object for a local path, ``file://``, ``http(s)://``,
    ``pipe:`` or any fsspec URL, and its size when known.

    Local files and HTTP streams are unbuffered (``readinto`` goes straight into the
    caller's buffer) and seekable (HTTP by Range request); ``buffered=True`` wraps them
    for callers that read lines or small pieces. Refuses ``pipe:`` without ``allow_pipe``
    (:class:`SourceError`); a missing file is a ``FileNotFoundError``.
    """
    path = local_path(url)
    scheme = url_scheme(url)
    f: BinaryIO
    if path is not None:
        f = open(path, "rb", buffering=0)
        size = file_size(f)
    elif scheme in ("http", "https"):
        f = HttpStream(url)
        size = f.size
    elif scheme == "pipe":
        if not allow_pipe:
            raise _refuse_pipe(url)
        f, size = PipeStream(url[len("pipe:"):]), None
    else:
        import fsspec  # only for other schemes; a missing backend names the package to install

        f = fsspec.open(url, "rb").open()
        size = getattr(f, "size", None)
    if buffered and isinstance(f, io.RawIOBase):
        f = io.BufferedReader(f)
    return f, size


def read_url(url: str, *, allow_pipe: bool = False) -> bytes:
    """The whole content of a URL (see :func:`open_url`)."""
    f, _ = open_url(url, allow_pipe=allow_pipe)
    with f:
        chunks = []
        while chunk := f.read(_READ_CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)


# ------------------------------------------------------------------------------- manifests

@dataclass(frozen=True)
class ManifestLocation:
    """Where a source's manifest is, and what its shard URLs are relative to."""

    source: str
    """What the caller gave (folder, manifest file, URL or ``pipe:`` template)."""
    url: str
    """The manifest's path or URL."""
    base: str
    """The folder (path or URL) relative shard URLs are under; for ``pipe:``, the template."""
    allow_outside: bool = False
    """Shard URLs may point outside the folder (the caller trusts the manifest)."""

    def resolve(self, name: str) -> str:
        """A shard URL from the manifest, made openable (see :func:`resolve_url`); a refused
        one is a :class:`SourceError` naming the manifest."""
        try:
            return resolve_url(self.base, name, allow_outside=self.allow_outside)
        except SourceError as exc:
            raise SourceError(f"{self.url}: {exc}") from None


def locate_manifest(source: str | os.PathLike, *, allow_pipe: bool = False,
                    allow_outside: bool = False) -> ManifestLocation:
    """Find the manifest of a folder, a manifest file or a URL of either; reads nothing remote.

    Local sources are checked here: a missing path, or a folder without a manifest (with a
    hint when it holds tars: a build that has not finished), is a
    :class:`SourceNotFoundError`. A ``pipe:`` source needs ``allow_pipe`` and a ``{}``.
    """
    source = os.fspath(source)
    scheme = url_scheme(source)
    if scheme == "pipe":
        if not allow_pipe:
            raise _refuse_pipe(source)
        if "{}" not in source:
            raise SourceError(f"{source}: a pipe: source needs a {{}} where the file name goes "
                              "(e.g. 'pipe:cat /data/set/{}')")
        return ManifestLocation(source, source.replace("{}", schema.MANIFEST_NAME), source, allow_outside)
    path = local_path(source)
    trimmed = source.rstrip("/") or source  # "/" stays "/"
    if path is not None:
        if os.path.isdir(path):
            manifest = os.path.join(path, schema.MANIFEST_NAME)
            if not os.path.exists(manifest):
                tars = [n for n in os.listdir(path) if n.endswith(".tar") and not n.startswith(".")]
                hint = (f" ({len(tars)} tar(s) but no manifest: an unfinished build? the manifest "
                        "is written last)") if tars else ""
                raise SourceNotFoundError(f"{source}: no {schema.MANIFEST_NAME} in this folder{hint}")
            return ManifestLocation(source, trimmed + "/" + schema.MANIFEST_NAME, trimmed, allow_outside)
        if os.path.exists(path):  # a manifest file, whatever its name
            base = trimmed.rsplit("/", 1)[0] if "/" in trimmed else "."
            return ManifestLocation(source, trimmed, base, allow_outside)
        raise SourceNotFoundError(f"{source}: no such file or folder")
    if trimmed.endswith(".json"):
        return ManifestLocation(source, trimmed, trimmed.rsplit("/", 1)[0], allow_outside)
    return ManifestLocation(source, trimmed + "/" + schema.MANIFEST_NAME, trimmed, allow_outside)


def parse_manifest(data: bytes, origin: str) -> Manifest:
    """A :class:`Manifest` from the bytes of a manifest file; :class:`SourceError` names ``origin``."""
    try:
        value = json.loads(data)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not text
        raise SourceError(f"{origin}: not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise SourceError(f"{origin}: expected a JSON object, got {type(value).__name__}")
    try:
        return Manifest.from_dict(value, origin=origin)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        raise SourceError(message if message.startswith(origin) else f"{origin}: {message}") from exc


def open_manifest(source: str | os.PathLike, *, allow_pipe: bool = False,
                  allow_outside: bool = False) -> tuple[ManifestLocation, Manifest]:
    """Locate (:func:`locate_manifest`) and load a source's manifest; nothing else is read.

    Every shard URL is checked here (see :func:`resolve_url`): one that would run a command,
    or (without ``allow_outside``) leave the set's folder, is refused before anything is
    opened. Raises :class:`SourceError` naming the source or manifest URL, and
    :class:`SourceNotFoundError` when there is nothing there.
    """
    where = locate_manifest(source, allow_pipe=allow_pipe, allow_outside=allow_outside)
    try:
        data = read_url(where.url, allow_pipe=allow_pipe)
    except (OSError, ValueError) as exc:
        error = SourceNotFoundError if isinstance(exc, FileNotFoundError) else SourceError
        detail = str(exc).removeprefix(where.url + ": ")  # the stream's own message may name the URL
        raise error(f"{where.url}: cannot read the manifest: {detail}") from exc
    manifest = parse_manifest(data, where.url)
    for stage in manifest.stages:
        for shard in stage.shards:
            where.resolve(shard.url)
    return where, manifest
