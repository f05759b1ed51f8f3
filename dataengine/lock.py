"""One writer per output folder: a lock file that names its holder.

Two commands writing into one folder at the same time (two builds, a build and a narrate
run) would delete each other's temporary files and overwrite each other's tars, and the
one that finishes last would write a manifest that looks complete. So every command that
writes a shard set holds ``OUT/.vlmr.lock`` while it writes::

    with lock.FolderLock(out, command="build-shards"):
        ...  # write tars, then the manifest

The file holds one JSON line naming the holder (``host``, ``pid``, ``command``, ``started``,
UTC). A second writer is refused with :class:`FolderLocked`, whose message names the holder.

The lock is an ``flock`` on that file, held for as long as the holder lives: the kernel
drops it when the process ends, however it ends, so a ``kill -9`` leaves no lock behind,
only a file naming a process that is gone. The next writer on the same host takes it over
and says so (a warning naming the old holder). A file naming another host is never taken
over automatically (flock may not reach across hosts on every shared filesystem): the
message says which host and process to check and that deleting the file releases it.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_NAME = ".vlmr.lock"


class FolderLocked(RuntimeError):
    """Another process writes into the folder; the message names it and the lock file."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    command = holder.get("command") or "?"
    return (f"{command!r} (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"started {holder.get('started', '?')})")


def _read_holder(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    if not raw.strip():
        return None
    try:
        holder = json.loads(raw)
    except ValueError:
        return {"command": raw[:200].decode("utf-8", "replace").strip()}
    return holder if isinstance(holder, dict) else None


class FolderLock:
    """Hold ``folder/.vlmr.lock`` (created with the folder if needed) as the one writer.

    ``acquire()`` raises :class:`FolderLocked` when another live process holds it;
    ``release()`` deletes the file. A context manager; not reentrant (a second lock on the
    same folder in the same process is refused like any other writer).
    """

    def __init__(self, folder: str | os.PathLike, command: str):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command
        self.took_over: dict[str, Any] | None = None
        """The old holder whose stale lock this one replaced, if any."""
        self._fd: int | None = None

    def _holder_record(self) -> dict[str, Any]:
        # No argv: the file is readable by all, and a command line may carry a URL with a password.
        return {"host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    def acquire(self) -> "FolderLock":
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: already held by this object")
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                        raise
                    raise self._refusal(_read_holder(fd), held=True) from None
                try:
                    same_file = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same_file = False
                if not same_file:  # the holder released (deleted) it between our open and flock
                    os.close(fd)
                    continue
                old = _read_holder(fd)
                if old is not None:
                    self._take_over(old)
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, (json.dumps(self._holder_record()) + "\n").encode())
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return self

    def _take_over(self, old: dict[str, Any]) -> None:
        """The file names a holder but nobody holds the flock: a process that was killed."""
        if old.get("host") != socket.gethostname():
            raise self._refusal(old, held=False)
        pid = old.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
            # pid reused by an unrelated process since (the flock is what counts); say so
            log.warning("%s: pid %d is alive but holds no lock (a reused pid)", self.path, pid)
        log.warning("%s: taking over the lock of %s, which is no longer running (killed?)",
                    self.path, _describe(old))
        self.took_over = old

    def _refusal(self, holder: dict[str, Any] | None, *, held: bool) -> FolderLocked:
        who = _describe(holder) if holder else "another process"
        if held:
            hint = ""
            pid = (holder or {}).get("pid")
            if (holder or {}).get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
                hint = (f" (pid {pid} is gone, but a process it started still holds the lock: "
                        "end it, then rerun)")
            return FolderLocked(f"{self.folder} is being written by {who}{hint}; wait for it to finish, "
                                f"or write to another folder (lock file: {self.path})")
        return FolderLocked(f"{self.folder} is locked by {who}, on another host: if that process is "
                            f"no longer running, delete {self.path} and rerun")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            # Delete before unlocking: a waiter that opened this file sees, after its flock,
            # that the path no longer names it, and starts over on a new file.
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
