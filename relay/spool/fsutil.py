"""Filesystem helpers of the file store: directory modes, listing, writes in one writev,
fsync of a directory, and the per-message ``flock``."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from relay.message import Chunk
from relay.spool.base import SpoolBusyError

log = logging.getLogger("m365relay.spool")

DIR_MODE = 0o700
FILE_MODE = 0o600
_IOV_MAX = 1024  # the smallest IOV_MAX (POSIX minimum is 16, Linux and BSDs have 1024)
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def _lock(f: BinaryIO, queue_id: str, wait: float | None) -> None:
    if wait is None:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        return
    # flock has no timeout; a short poll is fine for an operator's command.
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise SpoolBusyError(
                    f"message {queue_id} is still being delivered after {wait:.0f}s; try "
                    "again later, or give --wait more seconds") from None
            time.sleep(0.05)


def _make_dir(path: Path) -> None:
    path.mkdir(mode=DIR_MODE, exist_ok=True)
    # mkdir's mode is filtered by the umask, and an existing directory keeps its old mode.
    # Only its owner may change it; a directory of another user is checked by _open_error.
    if path.stat().st_uid == os.geteuid():
        path.chmod(DIR_MODE)
    elif not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "not writable", str(path))


def _open_error(directory: Path, exc: OSError) -> str:
    """Why the spool cannot be set up, and the command that fixes it."""
    uid = os.geteuid()
    where = Path(exc.filename) if isinstance(exc.filename, str) else directory
    try:
        owner = where.stat().st_uid
    except OSError:
        owner = None
    if isinstance(exc, PermissionError) and owner is not None and owner != uid:
        return (f"the spool directory {where} exists but is owned by uid {owner} and is not "
                f"writable by uid {uid}, the relay's user. Give it to that user: `chown -R "
                f"{uid}:{os.getegid()} DIR` on the directory (for a bind mount: the host's "
                "directory mounted there); or run the relay as its owner (`docker run --user "
                f"{owner}`, Kubernetes `runAsUser`); or use a named volume, which Docker fills "
                "with the image's owner")
    return (f"cannot create the spool directory {directory}: {exc}. Check that "
            "spool.directory points to a writable local directory owned by the relay's user")


def _listdir(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if p.is_file())
    except FileNotFoundError:
        return []


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _write_parts(fd: int, parts: Sequence[Chunk]) -> None:
    """All parts in order, in one writev where the kernel takes them all (it usually does)."""
    views = [v for v in (memoryview(p).cast("B") for p in parts) if v.nbytes]
    while views:
        written = os.writev(fd, views[:_IOV_MAX])
        while views and written >= views[0].nbytes:
            written -= views.pop(0).nbytes
        if written:
            views[0] = views[0][written:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not remove %s after a failed write: %s", path, exc)
