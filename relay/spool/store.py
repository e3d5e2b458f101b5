"""The durable mail queue, modelled on Postfix's: write to ``tmp/``, fsync, rename into ``queue/``.

Whoever moves, removes or re-schedules a message holds its :meth:`Spool.claim` (an ``flock``
on the file), so a delivery attempt and an operator's ``m365relay queue`` command never act on
one message at once (see ``relay/queue``).

A message is acknowledged to the client (250) only after :meth:`Spool.commit` returns, and by
then the envelope and content sit together in one fsynced file whose directory entry is also
fsynced. Everything here is blocking I/O; :class:`relay.spool.filestore.FileStore` puts it
behind the async :class:`relay.spool.base.Store` interface that the rest of the relay uses.

Layout under the spool directory::

    tmp/      files being written; anything left here at startup was never acknowledged
    queue/    one file per accepted message: magic line, JSON envelope line, raw message
    state/    <id>.json retry state; losing it only means "try again now"
    hold/     messages an operator put on hold (``m365relay queue hold``); never delivered
    failed/   permanently failed messages, with <id>.reason beside each
    corrupt/  queue files that could not be parsed, kept for inspection, never deleted
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import BinaryIO

from relay.message import (
    Content,
    DeliveryState,
    Envelope,
    Message,
    QueueEntry,
    content_parts,
)
from relay.spool.base import (
    SpoolBusyError,
    SpoolCorruptError,
    SpoolError,
    SpoolFullError,
    SpoolMissingError,
    SpoolWriteError,
)
from relay.spool.fileformat import (
    INLINE_LIMIT,
    _BadFile,
    _check_id,
    _encode_header,
    _verified,
)
from relay.spool.fsutil import (
    _discard,
    _fsync_dir,
    _listdir,
    _lock,
    _make_dir,
    _open_error,
    _write_parts,
)
from relay.spool.layout import SpoolLayout

__all__ = [
    "INLINE_LIMIT",
    "Claim",
    "Spool",
    "SpoolBusyError",
    "SpoolCorruptError",
    "SpoolError",
    "SpoolFullError",
    "SpoolMissingError",
    "SpoolWriteError",
]

log = logging.getLogger("m365relay.spool")


class Claim:
    """This process's exclusive right to act on one message, across processes.

    An ``flock`` on the message's file: it belongs to the file, not its name, so it stays valid
    while the holder renames the file (hold, fail) or unlinks it (remove, delete). Released by
    :meth:`release`, or when the object is garbage-collected (the file closes).
    """

    def __init__(self, queue_id: str, file: BinaryIO, state: DeliveryState) -> None:
        self.id = queue_id
        self.state = state  # read under the lock, so it includes any operator's change
        self._file = file

    def release(self) -> None:
        self._file.close()

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Spool(SpoolLayout):
    """The on-disk queue. Safe to call from several threads at once. Constructed as
    :class:`~relay.spool.layout.SpoolLayout` is (directory, ``min_free_bytes``, ``opener``,
    ``owner``)."""

    # ------------------------------------------------------------------ startup

    def open(self) -> list[QueueEntry]:
        """Create the layout, discard unacknowledged leftovers, and return the queue."""
        try:
            _make_dir(self.directory)
            for sub in (self._tmp, self._queue, self._state, self._failed, self._corrupt,
                        self._hold):
                _make_dir(sub)
        except OSError as exc:
            raise SpoolWriteError(_open_error(self.directory, exc)) from exc
        self._clean_tmp()
        entries = self._scan(self._queue)
        held = {p.name for p in _listdir(self._hold)}
        self._clean_orphan_states({e.id for e in entries} | held)
        return entries


    # ------------------------------------------------------------------ accepting mail

    def commit(self, envelope: Envelope, content: Content) -> str:
        """Store the message durably and return its queue id; only then may the client get 250.

        ``content`` may be the message's pieces in order; they are written as they are, never
        joined into one more copy."""
        parts = content_parts(content)
        digest = hashlib.sha256()
        size = 0
        for part in parts:
            digest.update(part)
            size += memoryview(part).nbytes
        header = _encode_header(envelope, size, digest.hexdigest())
        self._check_free_space(len(header) + size)
        queue_id = self._new_id()
        tmp_path = self._tmp / queue_id
        final_path = self._queue / queue_id
        renamed = False
        try:
            fd = self._open_new(tmp_path)
            try:
                _write_parts(fd, (header, *parts))
                os.fsync(fd)
            finally:
                os.close(fd)
            tmp_path.rename(final_path)
            renamed = True
            _fsync_dir(self._queue)
        except OSError as exc:
            # The client will retry after our 4xx, so a half-stored copy must not survive and
            # be delivered as a duplicate.
            _discard(tmp_path)
            if renamed:
                _discard(final_path)
            raise self._write_error(f"could not store message {queue_id}", exc) from exc
        log.debug("queued %s (%d bytes, %d recipients)", queue_id, size,
                  len(envelope.rcpt_tos))
        return queue_id


    # ------------------------------------------------------------------ delivery side

    def read(self, queue_id: str, *, held: bool = False) -> bytes:
        """Return exactly the bytes given to :meth:`commit`, verified as :meth:`load` does."""
        return self.load(queue_id, held=held, inline_limit=sys.maxsize).read_all()

    def load(self, queue_id: str, *, claim: Claim | None = None, held: bool = False,
             inline_limit: int = INLINE_LIMIT) -> Message:
        """The message, ready to send once its size and checksum match what was committed.

        Raises :class:`SpoolCorruptError` (after moving the file to corrupt/) if they no longer
        match, so damaged mail is never sent upstream: a message larger than ``inline_limit``
        is checked in one pass over the file *before* it is sent, then sent piece by piece
        from the same open file (:meth:`Message.read_at`). With ``claim``, reads through the
        claim's locked file: the one that was locked, and no second open.
        """
        path = (self._hold if held else self._queue) / _check_id(queue_id)
        own = claim is None
        try:
            f = path.open("rb") if claim is None else claim._file
            try:
                message = _verified(f, os.fstat(f.fileno()).st_size, inline_limit, own)
            except BaseException:
                if own:
                    f.close()
                raise
        except FileNotFoundError as exc:
            raise SpoolMissingError(
                f"message {queue_id} is not in the queue at {self._queue}"
            ) from exc
        except _BadFile as exc:
            self._quarantine(path, str(exc))
            raise SpoolCorruptError(
                f"message {queue_id} is damaged ({exc}); moved to {self._corrupt}"
            ) from exc
        except OSError as exc:
            raise SpoolError(f"could not read message {queue_id} from {path}: {exc}") from exc
        return message

    def save_state(self, queue_id: str, state: DeliveryState) -> None:
        path = self._queue / _check_id(queue_id)
        if not path.exists():
            raise SpoolMissingError(f"cannot save retry state: message {queue_id} is not queued")
        data = json.dumps(
            {
                "attempts": state.attempts,
                "next_attempt_at": state.next_attempt_at,
                "pending_rcpts": (
                    None if state.pending_rcpts is None else list(state.pending_rcpts)
                ),
                "last_error": state.last_error,
                "bounce_reason": state.bounce_reason,
            }
        ).encode()
        try:
            self._write_atomic(self._state / f"{queue_id}.json", data)
        except OSError as exc:
            raise self._write_error(f"could not save retry state for {queue_id}", exc) from exc

    def remove(self, queue_id: str) -> None:
        """Forget a delivered message. Removing an id that is already gone is not an error."""
        self.forget(queue_id)
        try:
            (self._state / f"{queue_id}.json").unlink(missing_ok=True)
        except OSError as exc:
            # The message is forgotten; open() cleans the orphan state file at the next start.
            log.warning("could not remove the retry state of delivered message %s: %s",
                        queue_id, exc)

    def forget(self, queue_id: str) -> None:
        """The record that a message was delivered: its queue file's unlink, one metadata
        change (microseconds), so a caller may make it the moment Exchange says 250 without
        waiting for a thread. Queue file first, state (:meth:`remove`) after: a crash in
        between leaves an orphan state file, which open() cleans.

        No directory fsync, as Postfix does not sync a delete either: a crash of the process
        cannot undo an unlink, only one of the machine can, and then the message is
        delivered once more, which is the safe side (the syncs would cost a quarter of the
        spool's time per message)."""
        _check_id(queue_id)
        try:
            (self._queue / queue_id).unlink(missing_ok=True)
        except OSError as exc:
            raise SpoolWriteError(
                f"could not remove delivered message {queue_id} from {self.directory}: {exc}. "
                "It may be delivered again after a restart."
            ) from exc

    def fail(self, queue_id: str, reason: str) -> Path:
        """Move a permanently failed message to failed/ with its reason; return its new path."""
        _check_id(queue_id)
        src = self._queue / queue_id
        dest = self._failed / queue_id
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        text = f"{reason.rstrip()}\n\nqueue id: {queue_id}\nfailed at: {stamp}\n"
        if not src.exists():
            raise SpoolMissingError(f"cannot fail message {queue_id}: it is not queued")
        try:
            # Reason first: if we crash before the move, the message is still queued and is
            # simply tried again; the other order could leave a failed message unexplained.
            self._write_atomic(self._failed / f"{queue_id}.reason", text.encode("utf-8"))
            src.rename(dest)
            _fsync_dir(self._failed)
            _fsync_dir(self._queue)
            (self._state / f"{queue_id}.json").unlink(missing_ok=True)
            _fsync_dir(self._state)
        except OSError as exc:
            raise self._write_error(f"could not move message {queue_id} to failed/", exc) from exc
        log.warning("message %s failed permanently, kept as %s: %s", queue_id, dest, reason)
        return dest

    def entries(self, *, quarantine: bool = True) -> list[QueueEntry]:
        """The queue as it is on disk now, oldest first.

        Damaged files are moved to corrupt/, or with ``quarantine=False`` (an operator's
        listing, which must not change the spool) skipped with a warning.
        """
        return self._scan(self._queue, quarantine=quarantine)

    # ------------------------------------------------------------------ operator side

    def claim(self, queue_id: str, *, held: bool = False, wait: float | None = None
              ) -> Claim | None:
        """Lock a message against every other process; None if it is not (or no longer) there.

        Blocks while another process holds it; with ``wait``, gives up after that many seconds
        with :class:`SpoolBusyError`. The holder may then move or change it.
        """
        path = (self._hold if held else self._queue) / _check_id(queue_id)
        try:
            f = path.open("rb")
        except FileNotFoundError:
            return None
        try:
            _lock(f, queue_id, wait)
            # The previous holder may have delivered, held or deleted it meanwhile; then the
            # name is gone or (after a release) names another file.
            try:
                same = os.path.samestat(path.stat(), os.fstat(f.fileno()))
            except FileNotFoundError:
                same = False
            if not same:
                f.close()
                return None
            return Claim(queue_id, f, self._load_state(queue_id))
        except BaseException:
            f.close()
            raise

    def is_claimed(self, queue_id: str, *, held: bool = False) -> bool:
        """Whether another process holds the message now (a delivery attempt in flight)."""
        try:
            with ((self._hold if held else self._queue) / _check_id(queue_id)).open("rb") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def locate(self, queue_id: str) -> str | None:
        """Which folder holds the message: "queue", "hold", "failed", "corrupt", or None."""
        _check_id(queue_id)
        for folder in (self._queue, self._hold, self._failed, self._corrupt):
            if (folder / queue_id).is_file():
                return folder.name
        return None

    def entry(self, queue_id: str, *, held: bool = False) -> QueueEntry | None:
        """One message with its state, or None if it is not there; damaged ones are skipped."""
        path = (self._hold if held else self._queue) / _check_id(queue_id)
        try:
            return self._load(path)
        except FileNotFoundError:
            return None
        except _BadFile as exc:
            log.warning("queue file %s is damaged: %s", path, exc)
            return None

    def held_entries(self) -> list[QueueEntry]:
        """Messages on hold, oldest first."""
        return self._scan(self._hold, quarantine=False)

    def hold(self, queue_id: str) -> None:
        """Move a message to hold/, out of delivery's reach. Call it holding the claim."""
        self._move(queue_id, self._queue, self._hold, "put on hold")

    def release(self, queue_id: str) -> None:
        """Move a held message back to queue/, due now. Call it holding the claim."""
        self._move(queue_id, self._hold, self._queue, "released")
        state = self._load_state(queue_id)
        self.save_state(queue_id, DeliveryState(
            attempts=state.attempts, next_attempt_at=0.0, pending_rcpts=state.pending_rcpts,
            last_error=state.last_error, bounce_reason=state.bounce_reason))

    def delete(self, queue_id: str, *, held: bool = False) -> None:
        """Remove a message for good (`m365relay queue delete`). Call it holding the claim."""
        folder = self._hold if held else self._queue
        try:
            (folder / _check_id(queue_id)).unlink()
            _fsync_dir(folder)
            (self._state / f"{queue_id}.json").unlink(missing_ok=True)
            _fsync_dir(self._state)
        except FileNotFoundError as exc:
            raise SpoolMissingError(f"message {queue_id} is not in {folder}") from exc
        except OSError as exc:
            raise SpoolWriteError(f"could not delete message {queue_id} from {folder}: {exc}. "
                                  "Check that you run this as the relay's user or root.") from exc

    def _move(self, queue_id: str, src: Path, dest: Path, what: str) -> None:
        try:
            if not dest.is_dir():
                # A spool from before hold/ existed; the relay's next start would create it.
                _make_dir(dest)
                self._own(dest)
            (src / _check_id(queue_id)).rename(dest / queue_id)
            _fsync_dir(dest)
            _fsync_dir(src)
        except FileNotFoundError as exc:
            raise SpoolMissingError(f"message {queue_id} is not in {src}") from exc
        except OSError as exc:
            raise SpoolWriteError(f"message {queue_id} could not be {what} ({exc}). Check "
                                  "that you run this as the relay's user or root.") from exc

    # ------------------------------------------------------------------ internals


