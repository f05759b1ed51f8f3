"""A sequential tar member parser: 512-byte ustar/GNU headers over any readable file object.

Python's ``tarfile`` copies each byte about three times (buffered reader, ``ExFileObject``,
``bytes`` slices). This parser reads a header into a reused 512-byte block, then lets the
caller either read the member's data with one ``readinto`` straight into a buffer it owns
(one read, one copy) or skip it: a ``seek`` on seekable files, a read-and-discard on
streams. It never reads ahead of what the caller asked for, so a skipped member on a local
file is not even read.

    reader = TarReader(open(path, "rb", buffering=0), url=path)
    while (member := reader.next()) is not None:
        if wanted(member.name):
            buf = bytearray(member.size)
            reader.readinto(member, buf)
        # else: the next call to next() skips the data

What is handled: ustar and GNU headers, POSIX ``prefix`` names, GNU ``L`` long names, pax
``x`` headers (``path`` and ``size``), pax ``g`` globals and directories (skipped), GNU
base-256 sizes. Every header checksum is checked. A file that ends inside a header or a
member, or without the end-of-archive block, raises :class:`TruncatedTarError`; anything
else malformed raises :class:`TarError`; both name the URL and the byte offset.

Around the parser, the rules every reader of a shard shares (the streaming reader, ``vlmr
inspect``, the webdataset stage): :func:`split_name` (which sample and member a name is),
:func:`decode_npy` (an ``.npy`` member as an array, never unpickled), :class:`ShardError` (a
shard that is not what its manifest says), and :func:`scan_tar`, which walks a damaged tar to
its end: it reports each damaged header and resynchronises at the next valid one.
"""

from __future__ import annotations

import ast
import functools
import math
import os
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

import numpy as np

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_DISCARD_CHUNK = 1 << 20


class TarError(ValueError):
    """A malformed tar; the message names the URL and the byte offset of the problem."""

    def __init__(self, url: str, offset: int, message: str):
        super().__init__(f"{url}: byte {offset}: {message}")
        self.url = url
        self.offset = offset
        self.reason = message


class TruncatedTarError(TarError):
    """The file ends inside a header or a member, or before the end-of-archive block."""


class ShardError(ValueError):
    """A shard cannot be read as the manifest says; names the URL, and the key/member or offset.

    ``reason`` is a short label (counted by the reader's statistics); ``whole_shard`` says that
    the rest of the shard is lost (a broken structure), not only one sample."""

    def __init__(self, url: str, message: str, *, key: str | None = None, member: str | None = None,
                 offset: int | None = None, reason: str = "error", whole_shard: bool = False):
        where = [url]
        if key is not None:
            where.append(f"key {key!r}")
        if member is not None:
            where.append(f"member {member!r}")
        if offset is not None:
            where.append(f"byte {offset}")
        super().__init__(f"{', '.join(where)}: {message}")
        self.url, self.key, self.member, self.offset = url, key, member, offset
        self.reason = reason
        self.whole_shard = whole_shard


def split_name(name: str) -> tuple[str, str]:
    """(key, suffix) of a member name, by WebDataset's rule: the key ends at the first dot
    after the last slash (``a/b.c.feat.npy`` -> ``a/b``, ``c.feat.npy``)."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def unsafe_name(name: str) -> str | None:
    """Why a member name would escape the folder a plain ``tar x`` extracts into (an absolute
    path, a ``..`` component), or None when it is safe."""
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "a '..' component"
    return None


@functools.lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """(dtype, shape, fortran order, element count) of an .npy header: a Python literal,
    never unpickled.

    Cached: a shard repeats the same few headers, and parsing one costs more than reading
    a megabyte."""
    meta = ast.literal_eval(header.decode("latin1"))
    dtype = np.dtype(meta["descr"])
    shape = tuple(int(d) for d in meta["shape"])
    if any(d < 0 for d in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    return dtype, shape, bool(meta["fortran_order"]), math.prod(shape)


def decode_npy(buf, what: str) -> np.ndarray:
    """The array of an ``.npy`` file held in ``buf`` (a uint8 array, or bytes), no copy: a
    view of ``buf`` (writable when ``buf`` is; byte-swapped copies for non-native order).

    Object arrays are refused (they need pickle, which shards never use); the header is read
    with ``ast.literal_eval``, and the data length must match the shape exactly."""
    if not isinstance(buf, np.ndarray):
        buf = np.frombuffer(buf, dtype=np.uint8)
    raw = buf.data
    head = raw[:12].tobytes()
    if len(head) < 10 or head[:6] != b"\x93NUMPY":
        raise ValueError(f"{what}: not an .npy file (bad magic)")
    major = head[6]
    if major == 1:
        hlen, start = head[8] | head[9] << 8, 10
    elif major in (2, 3):
        hlen, start = int.from_bytes(head[8:12], "little"), 12
    else:
        raise ValueError(f"{what}: unknown .npy version {major}")
    try:
        dtype, shape, fortran, count = _npy_header(raw[start:start + hlen].tobytes())
    except KeyError as exc:
        raise ValueError(f"{what}: unreadable .npy header: no {exc} entry") from None
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        raise ValueError(f"{what}: unreadable .npy header: {exc}") from None
    if dtype.hasobject:
        raise ValueError(f"{what}: object arrays need pickle, which shards never use")
    offset = start + hlen
    if len(buf) - offset != count * dtype.itemsize:
        raise ValueError(f"{what}: .npy data holds {len(buf) - offset} bytes, "
                         f"shape {shape} of {dtype} needs {count * dtype.itemsize}")
    array = buf[offset:].view(dtype).reshape(shape, order="F" if fortran else "C")
    if not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))
    return array


@dataclass(frozen=True, slots=True)
class TarMember:
    """One regular file in a tar.

    ``offset`` is where its first header starts (a GNU long-name or pax header when there is
    one), so seeking there and calling :meth:`TarReader.next` yields this member again.
    """

    name: str
    offset: int
    data_offset: int
    size: int

    @property
    def end(self) -> int:
        """Offset of the header after this member (data padded to whole blocks)."""
        return self.data_offset + _padded(self.size)


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 when the high bit is set."""
    if field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        if field[0] & 0x40:  # negative base-256 (never a valid size)
            value -= 1 << (8 * (len(field) - 1))
        return value
    text = field.split(b"\0", 1)[0]
    return int(text, 8) if text.strip() else 0


def _pax_records(data: bytes, url: str, offset: int) -> dict[str, str]:
    """``"LEN key=value\\n"`` records of a pax extended header."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
            record = data[space + 1:pos + length - 1]  # drop the trailing newline
            key, value = record.split(b"=", 1)
        except ValueError as exc:
            raise TarError(url, offset, f"malformed pax record at {pos}: {exc}") from None
        if length <= 0:
            raise TarError(url, offset, f"malformed pax record length {length}")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


class TarReader:
    """Walks the members of a tar in file order, reading only what the caller asks for.

    ``fileobj`` must have ``readinto``; it is used with ``seek`` when ``seekable`` (by
    default, what the file object says). ``offset`` is the position the file object is at,
    which must be a header boundary. ``size`` (the file's length, when known) lets a member
    that runs past the end be reported at its header rather than at the next read.
    """

    def __init__(self, fileobj: BinaryIO, url: str, *, offset: int = 0,
                 seekable: bool | None = None, size: int | None = None):
        self.fileobj = fileobj
        self.url = url
        self.seekable = fileobj.seekable() if seekable is None else seekable
        self.size = size
        self.position = offset
        """Byte offset of the file object (what has been read or skipped so far)."""
        self.bytes_read = 0
        """Bytes actually transferred from the file object (skips by seek excluded)."""
        self._next_header = offset
        self._scratch: bytearray | None = None
        self.ended = False

    # -- low-level movement ----------------------------------------------------------------
    def _read_exact(self, view: memoryview, what: str) -> None:
        start = self.position
        got = 0
        total = len(view)
        while got < total:
            n = self.fileobj.readinto(view[got:])
            if not n:
                raise TruncatedTarError(
                    self.url, start + got,
                    f"file ends inside {what} ({got} of {total} bytes from byte {start})")
            got += n
        self.position += total
        self.bytes_read += total

    def _skip_to(self, offset: int) -> None:
        """Move forward to ``offset``: seek when possible, else read and discard."""
        if offset == self.position:
            return
        if offset < self.position:
            raise ValueError(f"{self.url}: cannot move back from byte {self.position} to {offset}")
        if self.seekable:
            self.fileobj.seek(offset)
            self.position = offset
            return
        if self._scratch is None:
            self._scratch = bytearray(_DISCARD_CHUNK)
        view = memoryview(self._scratch)
        while self.position < offset:
            n = min(offset - self.position, _DISCARD_CHUNK)
            self._read_exact(view[:n], f"data skipped up to byte {offset}")

    def seek(self, offset: int) -> None:
        """Go to a header boundary (a :attr:`TarMember.offset`); back only when seekable."""
        if offset < self.position:
            if not self.seekable:
                raise ValueError(f"{self.url}: stream cannot move back to byte {offset}")
            self.fileobj.seek(offset)
            self.position = offset
        else:
            self._skip_to(offset)
        self._next_header = offset
        self.ended = False

    # -- headers ---------------------------------------------------------------------------
    def _read_header(self) -> bytes | None:
        """The next 512-byte header, or None at end of archive (checksum verified)."""
        offset = self.position
        header = self.fileobj.read(BLOCK)
        if not header:
            raise TruncatedTarError(self.url, offset, "file ends without the end-of-archive block")
        self.position += len(header)
        self.bytes_read += len(header)
        if len(header) < BLOCK:  # streams may return short reads
            rest = bytearray(BLOCK - len(header))
            self._read_exact(memoryview(rest), "a header")
            header += rest
        if header == _ZERO_BLOCK:
            return None
        field = header[148:156]
        try:
            stored = int(field.split(b"\0", 1)[0], 8)
        except ValueError:
            raise TarError(self.url, offset, f"unreadable header checksum {field!r}") from None
        unsigned = sum(header) - sum(field) + 8 * 32  # the checksum field counts as spaces
        if stored != unsigned:
            signed = sum(b - 256 if b > 127 else b for b in header) \
                - sum(b - 256 if b > 127 else b for b in field) + 8 * 32
            if stored != signed:
                raise TarError(self.url, offset,
                               f"header checksum mismatch (stored {stored}, computed {unsigned})")
        return header

    def _member_data(self, size: int, offset: int, what: str) -> bytes:
        data = bytearray(size)
        self._read_exact(memoryview(data), what)
        self._skip_to(offset + _padded(size))
        return bytes(data)

    def next(self) -> TarMember | None:
        """The next regular file member, or None at the end of the archive.

        Data of the previous member that the caller did not read is skipped.
        """
        if self.ended:
            return None
        self._skip_to(self._next_header)
        first = self.position
        long_name: str | None = None
        pax: dict[str, str] = {}
        while True:
            offset = self.position
            header = self._read_header()
            if header is None:
                self.ended = True
                return None
            typeflag = header[156:157]
            try:
                size = _number(header[124:136])
            except ValueError:
                raise TarError(self.url, offset, f"unreadable member size {header[124:136]!r}") from None
            if typeflag in _REGULAR and not pax and long_name is None and header[345] == 0 \
                    and 0 <= size and (self.size is None or self.position + size <= self.size):
                # The common case: a plain ustar member with a short name.
                member = TarMember(header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape"),
                                   first, self.position, size)
                self._next_header = self.position + (size + BLOCK - 1) // BLOCK * BLOCK
                return member
            if "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError:
                    raise TarError(self.url, offset, f"unreadable pax size {pax['size']!r}") from None
            if size < 0:
                raise TarError(self.url, offset, f"negative member size {size}")
            data_offset = self.position
            if self.size is not None and data_offset + size > self.size:
                raise TruncatedTarError(
                    self.url, offset,
                    f"member at byte {offset} declares {size} bytes but the file ends at byte {self.size}")
            if typeflag == b"L":
                long_name = self._member_data(size, data_offset, "a GNU long name") \
                    .split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue
            if typeflag == b"x":
                pax = _pax_records(self._member_data(size, data_offset, "a pax header"), self.url, offset)
                continue
            if typeflag in (b"g", b"K", b"5"):
                # pax globals, GNU long link names and directories carry no member data
                self._skip_to(data_offset + _padded(size))
                first = self.position
                continue
            if typeflag not in _REGULAR:
                raise TarError(self.url, offset,
                               f"unsupported member type {typeflag!r} (only regular files belong in a shard)")
            if "path" in pax:
                name = pax["path"]
            elif long_name is not None:
                name = long_name
            else:
                name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if header[257:263] == b"ustar\0":  # POSIX ustar: a prefix may hold the leading dirs
                    prefix = header[345:500].split(b"\0", 1)[0]
                    if prefix:
                        name = prefix.decode("utf-8", "surrogateescape") + "/" + name
            member = TarMember(name=name, offset=first, data_offset=data_offset, size=size)
            self._next_header = member.end
            return member

    # -- member data -----------------------------------------------------------------------
    def goto_data(self, member: TarMember) -> None:
        """Move to ``member``'s data (forward, or back on seekable files), e.g. to read a
        member found earlier; the following :meth:`next` continues after it."""
        if self.position != member.data_offset:
            if member.data_offset < self.position:
                if not self.seekable:
                    raise ValueError(f"{self.url}: stream cannot move back to byte {member.data_offset}")
                self.fileobj.seek(member.data_offset)
                self.position = member.data_offset
            else:
                self._skip_to(member.data_offset)
        self._next_header = member.end
        self.ended = False

    def readinto(self, member: TarMember, buf) -> None:
        """Read ``member``'s data into ``buf`` (exactly ``member.size`` bytes, writable)."""
        if self.position != member.data_offset:
            raise ValueError(f"{self.url}: member {member.name!r} is not the current member")
        view = memoryview(buf).cast("B")
        if len(view) != member.size:
            raise ValueError(f"buffer of {len(view)} bytes for member {member.name!r} of {member.size}")
        self._read_exact(view, f"member {member.name!r}")

    def read(self, member: TarMember) -> bytes:
        buf = bytearray(member.size)
        self.readinto(member, buf)
        return bytes(buf)


def file_size(fileobj) -> int | None:
    """The length of a local file object, or None when it has no file descriptor."""
    try:
        return os.fstat(fileobj.fileno()).st_size
    except (AttributeError, OSError, ValueError):
        return None


# ------------------------------------------------------------------ walking a damaged tar

@dataclass
class ScannedMember:
    name: str
    offset: int
    """Byte offset of the member's (first) header in the tar."""
    size: int
    data: bytes | None
    """The member's bytes, or None when the caller did not ask for them."""


@dataclass
class TarDamage:
    kind: str
    """``truncated`` or ``bad_header``."""
    offset: int
    message: str
    """What happened and what the scan did about it."""
    reason: str = ""
    """What happened only (for callers that stop at the damage)."""


def _is_header(block: bytes) -> bool:
    """Whether a 512-byte block is a ustar header with a correct checksum (a resync point)."""
    if block[257:262] != b"ustar":
        return False
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(block[:148]) + 8 * 32 + sum(block[156:])


class _Pushback:
    """A forward-only stream with bytes put back in front (the header found by a resync)."""

    def __init__(self, f: BinaryIO, pending: bytes):
        self._f = f
        self._pending = memoryview(pending)

    def seekable(self) -> bool:
        return False

    def readinto(self, buf) -> int:
        if self._pending:
            n = min(len(buf), len(self._pending))
            memoryview(buf).cast("B")[:n] = self._pending[:n]
            self._pending = self._pending[n:]
            return n
        return self._f.readinto(buf)

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        return bytes(buf[: self.readinto(buf)])


def _read_up_to(f: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes, fewer only at the end of the stream."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = f.readinto(view[got:])
        if not k:
            break
        got += k
    return bytes(buf[:got])


def scan_tar(f: BinaryIO, url: str, want: Callable[[str], bool] = lambda name: True, *,
             seekable: bool = False, size: int | None = None) -> Iterator[ScannedMember | TarDamage]:
    """Members of a tar stream in order (via :class:`TarReader`), and its damage.

    ``want(name)`` says whether to read a member's bytes (otherwise ``data`` is None and the
    bytes are skipped, by seek when ``seekable``). On a damaged header, yields one
    :class:`TarDamage` and resumes at the next block that is a valid ustar header (the
    members in between are lost, and reported as lost); a stream that ends inside a member
    or without the end-of-archive block yields a ``truncated`` damage and stops. ``size``, the
    file's length when known, lets a skipped member cut by truncation be named.
    """
    reader = TarReader(f, url, offset=0, seekable=seekable, size=size)
    while True:
        try:
            member = reader.next()
            if member is None:
                return
            data = reader.read(member) if want(member.name) else None
        except TruncatedTarError as exc:
            yield TarDamage("truncated", exc.offset, exc.reason, exc.reason)
            return
        except TarError as exc:
            bad_at, position = exc.offset, reader.position
            aligned = bad_at + (position - bad_at + BLOCK - 1) // BLOCK * BLOCK
            raw = f if seekable else reader.fileobj
            if seekable:
                f.seek(aligned)
            elif aligned > position:
                _read_up_to(raw, aligned - position)
            position = aligned
            while True:  # resynchronise: the next block that is a valid ustar header
                block = _read_up_to(raw, BLOCK)
                if len(block) < BLOCK:
                    yield TarDamage("bad_header", bad_at,
                                    f"{exc.reason} at byte {bad_at}; no valid header after it (end of file at "
                                    f"byte {position + len(block)}): the rest of the shard is lost", exc.reason)
                    return
                if _is_header(block):
                    break
                position += BLOCK
            yield TarDamage("bad_header", bad_at,
                            f"{exc.reason} at byte {bad_at}; resumed at the next valid header at byte {position} "
                            f"({position - bad_at} bytes in between are lost)", exc.reason)
            if seekable:
                f.seek(position)
                reader = TarReader(f, url, offset=position, seekable=True, size=size)
            else:
                reader = TarReader(_Pushback(raw, block), url, offset=position, seekable=False)
            continue
        yield ScannedMember(name=member.name, offset=member.offset, size=member.size, data=data)
