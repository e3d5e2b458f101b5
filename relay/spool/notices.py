"""How ``m365relay queue`` tells a relay running on a file spool that it changed a message.

The command changes the spool itself, holding each message's claim, so it works the same
whether the relay runs or not: a stopped relay finds the change when it next starts. A running
relay must also update its in-memory schedule (forget a held message's timer, try a released
one now). For that it reads one-line notices from a FIFO in the spool directory::

    retry ID | release ID | bounce ID    re-read the message from disk and try it now
    hold ID | delete ID                  forget it
    retry *                              re-read the whole queue and try everything now

This is the file store's change notification (:meth:`relay.spool.base.Store.changes`); a
shared store has its own (LISTEN/NOTIFY). A FIFO rather than a signal: no pid file, the notice
says which message changed, it works for a relay embedded in another process (the tests), and
opening it for writing fails with ENXIO exactly when no relay is reading it, which is how the
command knows whether one runs. Notices are only hints: delivery re-checks each message under
its claim, so a lost notice can delay a message but never deliver a held or deleted one.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import stat
import time
from collections.abc import Sequence
from pathlib import Path

from relay.spool.base import Change

__all__ = ["FIFO_NAME", "FifoReader", "notify", "relay_running"]

log = logging.getLogger("m365relay.queue")

FIFO_NAME = "control"
_MAX_NOTICE = 200  # a verb and a queue id; anything longer is not ours
_FLAGS = os.O_NONBLOCK | os.O_CLOEXEC


class FifoReader:
    """The relay's end of the FIFO: turns notices into :class:`Change` records, in order."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / FIFO_NAME
        self._rfd = -1
        self._wfd = -1
        self._buffer = b""
        self.changes: asyncio.Queue[Change] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None

    def open(self) -> None:
        """Create and open the FIFO (blocking I/O). Called before the spool's startup scan:
        notices sent in between then wait in the pipe instead of being lost."""
        # Raises like Spool.open would when the spool cannot exist; the rest only warns.
        self.directory.mkdir(mode=0o700, exist_ok=True)
        try:
            _make_fifo(self.path)
            self._rfd = os.open(self.path, os.O_RDONLY | _FLAGS)
            # Our own writer keeps the FIFO from reading as end-of-file each time a command
            # closes its end.
            self._wfd = os.open(self.path, os.O_WRONLY | _FLAGS)
        except OSError as exc:
            self._close_fds()
            log.warning("no queue control channel at %s (%s): `m365relay queue` changes reach "
                        "this relay only at its next start", self.path, exc)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._rfd < 0:
            return
        self._loop = loop
        loop.add_reader(self._rfd, self._readable)

    def close(self) -> None:
        if self._rfd >= 0 and self._loop is not None:
            self._loop.remove_reader(self._rfd)
        self._loop = None
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._rfd, self._wfd):
            if fd >= 0:
                os.close(fd)
        self._rfd = self._wfd = -1

    def _readable(self) -> None:
        try:
            chunk = os.read(self._rfd, 65536)
        except BlockingIOError:
            return
        *lines, self._buffer = (self._buffer + chunk).split(b"\n")
        if len(self._buffer) > _MAX_NOTICE:
            log.warning("queue control: discarded %d bytes that are not a notice",
                        len(self._buffer))
            self._buffer = b""
        for line in lines:
            verb, _, arg = line.decode("ascii", "replace").strip().partition(" ")
            self.changes.put_nowait(Change(verb, arg))


def _make_fifo(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        os.mkfifo(path, 0o600)
        return
    if not stat.S_ISFIFO(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a FIFO; remove it")


# ---------------------------------------------------------------------- command side


def _open_writer(directory: Path) -> int | None:
    try:
        return os.open(directory / FIFO_NAME, os.O_WRONLY | _FLAGS)
    except OSError as exc:
        # ENXIO: the FIFO is there but nobody reads it, i.e. no relay runs on this spool.
        if exc.errno in (errno.ENXIO, errno.ENOENT):
            return None
        raise


def relay_running(directory: Path) -> bool:
    """Whether a relay is running on this spool now (it reads the control FIFO)."""
    try:
        fd = _open_writer(directory)
    except OSError:
        return False
    if fd is None:
        return False
    os.close(fd)
    return True


def notify(directory: Path, notices: Sequence[str], timeout: float = 5.0) -> bool:
    """Send notices to the relay running on this spool; False if none took them."""
    try:
        fd = _open_writer(directory)
    except OSError as exc:
        log.warning("cannot reach the relay through %s: %s", directory / FIFO_NAME, exc)
        return False
    if fd is None:
        return False
    deadline = time.monotonic() + timeout
    try:
        for notice in notices:
            # One write per notice: writes up to PIPE_BUF are atomic, so notices from two
            # commands never interleave.
            data = f"{notice}\n".encode("ascii")
            while True:
                try:
                    os.write(fd, data)
                    break
                except BlockingIOError:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    select.select([], [fd], [], remaining)
    except BrokenPipeError:
        return False  # the relay stopped meanwhile; it rescans the spool when it starts
    finally:
        os.close(fd)
    return True
