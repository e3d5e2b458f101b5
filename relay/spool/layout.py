"""The spool directory's layout and the bookkeeping under it: the folders, new queue ids,
scanning a folder into entries, retry-state files, moving damaged files to corrupt/, and
writing a small file atomically. :class:`relay.spool.store.Spool` builds the queue's
operations on it."""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

from relay.message import DeliveryState, QueueEntry
from relay.spool.base import SpoolError, SpoolFullError, SpoolWriteError
from relay.spool.fileformat import (
    _ID_RE,
    _RANDOM_CHARS,
    _TIME_CHARS,
    _b32,
    _BadFile,
    _envelope_from,
    _read_header,
    _state_from,
)
from relay.spool.fsutil import (
    _CREATE_FLAGS,
    FILE_MODE,
    _discard,
    _fsync_dir,
    _listdir,
    _write_all,
)

log = logging.getLogger("m365relay.spool")

Opener = Callable[[str, int, int], int]
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class SpoolLayout:
    """The folders of one spool directory and the helpers every operation uses.

    ``opener`` replaces :func:`os.open` for the files this class writes (queue files in tmp/,
    state and reason files). It exists so tests can inject real write failures, e.g. by
    returning a descriptor for ``/dev/full``; production code never passes it.
    """

    def __init__(
        self,
        directory: Path,
        *,
        min_free_bytes: int = 0,
        opener: Opener | None = None,
        owner: tuple[int, int] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.min_free_bytes = min_free_bytes
        self._opener: Opener = opener if opener is not None else os.open
        # (uid, gid) for files this process creates: root running `m365relay queue` on the
        # relay's spool must not leave files the relay's own user cannot read.
        self._owner = owner
        self._tmp = self.directory / "tmp"
        self._queue = self.directory / "queue"
        self._state = self.directory / "state"
        self._failed = self.directory / "failed"
        self._corrupt = self.directory / "corrupt"
        self._hold = self.directory / "hold"
        self._id_lock = threading.Lock()
        self._last_id_us = 0

    def _clean_tmp(self) -> None:
        for path in _listdir(self._tmp):
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("could not remove leftover spool file %s: %s", path, exc)
                continue
            # The client never got a 250 for these, so it still holds the message.
            log.info("removed unfinished spool file %s (never acknowledged to a client)", path)

    def _clean_orphan_states(self, live_ids: set[str]) -> None:
        for path in _listdir(self._state):
            if path.name.endswith(".json") and path.name[:-5] in live_ids:
                continue
            try:
                path.unlink()
                log.info("removed retry state %s: its message is no longer queued", path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("could not remove stale retry state %s: %s", path, exc)

    def _check_free_space(self, needed: int) -> None:
        if self.min_free_bytes <= 0:
            return
        try:
            st = os.statvfs(self._tmp)
        except OSError as exc:
            raise SpoolWriteError(
                f"cannot check free space in {self.directory}: {exc}. Check that "
                "spool.directory exists and is readable by the relay's user."
            ) from exc
        free = st.f_bavail * st.f_frsize
        if free - needed < self.min_free_bytes:
            raise SpoolFullError(
                f"spool filesystem at {self.directory} has {free} bytes free; storing this "
                f"{needed}-byte message would leave less than the {self.min_free_bytes}-byte "
                "reserve (spool.min_free_space). Free space there, or point spool.directory "
                "at a larger filesystem."
            )

    def _new_id(self) -> str:
        with self._id_lock:
            # Strictly increasing within the process even if the clock stalls or steps back.
            now_us = max(time.time_ns() // 1000, self._last_id_us + 1)
            self._last_id_us = now_us
        while True:
            queue_id = _b32(now_us, _TIME_CHARS) + _b32(secrets.randbits(20), _RANDOM_CHARS)
            # A collision needs the same microsecond and the same 20 random bits in another
            # process; cheap to rule out, and rename() would otherwise overwrite silently.
            if not (self._queue / queue_id).exists():
                return queue_id

    def _write_error(self, what: str, exc: OSError) -> SpoolError:
        if exc.errno in _FULL_ERRNOS:
            return SpoolFullError(
                f"{what}: the spool filesystem at {self.directory} is full or over quota "
                f"({exc.strerror}). Free space there, or point spool.directory at a larger "
                "filesystem."
            )
        return SpoolWriteError(
            f"{what} in {self.directory}: {exc}. Check that spool.directory is on a healthy, "
            "writable local filesystem owned by the relay's user."
        )

    def _scan(self, folder: Path, *, quarantine: bool = True) -> list[QueueEntry]:
        entries: list[QueueEntry] = []
        for path in _listdir(folder):
            try:
                entry = self._load(path)
            except FileNotFoundError:
                continue  # delivered or failed by another thread while we were listing
            except _BadFile as exc:
                if quarantine:
                    self._quarantine(path, str(exc))
                else:
                    log.warning("queue file %s is damaged (%s); skipped", path, exc)
                continue
            except OSError:
                log.exception("cannot read queue file %s, skipping it for now", path)
                continue
            entries.append(entry)
        entries.sort(key=lambda e: (e.envelope.received_at, e.id))
        return entries

    def _load(self, path: Path) -> QueueEntry:
        if not _ID_RE.fullmatch(path.name):
            raise _BadFile("file name is not a queue id")
        with path.open("rb") as f:
            meta = _read_header(f, os.fstat(f.fileno()).st_size)
        return QueueEntry(
            id=path.name,
            envelope=_envelope_from(meta),
            state=self._load_state(path.name),
            size=meta["size"],
        )

    def _load_state(self, queue_id: str) -> DeliveryState:
        path = self._state / f"{queue_id}.json"
        try:
            raw = json.loads(path.read_bytes())
            return _state_from(raw)
        except FileNotFoundError:
            return DeliveryState()
        except (OSError, ValueError, _BadFile) as exc:
            # The state only schedules retries; the message itself is intact, so deliver now
            # rather than hold mail hostage to a damaged bookkeeping file.
            log.warning("retry state %s is unreadable (%s); will try delivery now", path, exc)
            return DeliveryState()

    def _quarantine(self, path: Path, why: str) -> None:
        dest = self._corrupt / path.name
        n = 1
        while dest.exists():
            dest = self._corrupt / f"{path.name}.{n}"
            n += 1
        try:
            path.rename(dest)
            _fsync_dir(self._corrupt)
            _fsync_dir(self._queue)
        except FileNotFoundError:
            return
        except OSError:
            log.exception("queue file %s is damaged (%s) and could not be moved to %s; "
                          "it is left in place and will not be delivered", path, why, dest)
            return
        try:
            self._write_atomic(dest.with_name(dest.name + ".reason"), f"{why}\n".encode())
        except OSError as exc:
            log.warning("could not write reason file next to %s: %s", dest, exc)
        log.warning("queue file %s is damaged (%s); moved to %s for inspection", path, why, dest)

    def _open_new(self, path: Path) -> int:
        fd = self._opener(str(path), _CREATE_FLAGS, FILE_MODE)
        try:
            # open()'s mode is filtered by the umask; set it exactly. By path rather than fchmod
            # because a test opener may hand back a descriptor for another file (/dev/full).
            path.chmod(FILE_MODE)
            self._own(path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _own(self, path: Path) -> None:
        if self._owner is not None:
            os.chown(path, *self._owner)

    def _write_atomic(self, dest: Path, data: bytes) -> None:
        # Staged in tmp/ (same filesystem) so open() sweeps up any leftover from a crash.
        tmp_path = self._tmp / f"{dest.name}.{secrets.token_hex(4)}"
        try:
            fd = self._open_new(tmp_path)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            tmp_path.rename(dest)
            _fsync_dir(dest.parent)
        except OSError:
            _discard(tmp_path)
            raise
