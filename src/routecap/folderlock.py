"""One writer per trace folder: an OS-level lock (``flock``) on ``{folder}/.routecap.lock``.

The kernel releases an ``flock`` when its holder exits, however it exits (SIGKILL, OOM, power
loss of a client on NFSv4), so a lock left by a dead process is no lock at all: the next writer
takes it without any guessing about pids or ages. The lock file's content only *describes* the
holder (pid, host, run id, start time) so that a refused writer can say who holds the folder;
it is rewritten by every new holder and never trusted for the locking itself.

NOTE: the ``filelock`` package wraps the same ``flock`` call but truncates the file when it
opens it, which would erase the holder's description at every refused attempt; hence
``fcntl`` directly. Linux NFS clients implement ``flock`` with POSIX byte-range locks, so the
lock also holds between machines that share the folder over NFSv4.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

__all__ = ["LOCK_NAME", "FolderLock", "FolderLockedError", "describe_os_error"]

LOCK_NAME = ".routecap.lock"


class FolderLockedError(OSError):
    """Another process holds the folder's lock; the message names it."""


def describe_os_error(e: OSError, what: str) -> str:
    """One line for an OS error while writing: ``{what}: {reason}`` with the fix where known."""
    reason = {
        errno.ENOSPC: "no space left on the device; free some space or choose another folder",
        errno.EDQUOT: "disk quota exceeded; free some space or choose another folder",
        errno.EROFS: "the file system is read-only; choose a writable folder",
        errno.EACCES: "permission denied; choose a folder you can write to",
        errno.EPERM: "operation not permitted; choose a folder you can write to",
        errno.ENOENT: "no such file or folder",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
    }.get(e.errno or -1, e.strerror or type(e).__name__)
    where = f" ({e.filename})" if e.filename and str(e.filename) not in what else ""
    return f"{what}{where}: {reason}"


class FolderLock:
    """Exclusive, non-blocking lock of a trace folder (created if missing).

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> with FolderLock(d, run_id="r1"):
        ...     try:
        ...         FolderLock(d, run_id="r2").acquire()
        ...     except FolderLockedError as e:
        ...         print("refused")
        refused
    """

    def __init__(self, folder: str | os.PathLike, *, run_id: str = "") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.run_id = run_id
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        if self._fd is not None:
            return self
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{self.folder} exists and is not a folder",
                                     str(self.folder))
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise FolderLockedError(
                errno.EWOULDBLOCK, f"{self.folder} is being written by another routecap process "
                f"({holder}); wait for it to finish, or choose another folder") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": self.run_id,
                    "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except BaseException:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # the description goes with the lock
        except OSError:
            pass
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"null")
        return (f"pid {int(info['pid'])} on host {info['host']}, run {info['run_id'] or '?'}, "
                f"since {info['since']}")
    except (OSError, ValueError, TypeError, KeyError):
        return "holder unknown: it has not described itself yet"


def probe(folder: str | os.PathLike) -> None:
    """Raise :class:`FolderLockedError` if another process holds ``folder``'s lock (a check for
    a clear early error; the lock itself is taken by the writer)."""
    if (Path(folder) / LOCK_NAME).exists():
        FolderLock(folder).acquire().release()
