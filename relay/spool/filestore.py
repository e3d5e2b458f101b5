"""The file store behind the :class:`~relay.spool.base.Store` interface: today's spool
(:mod:`relay.spool.store`, blocking and Postfix-like) run in threads, with the control FIFO
(:mod:`relay.spool.notices`) as its change notification.

One thread hop per call; :meth:`FileStore.checkout` (claim + load) and :meth:`FileStore.checkin`
(remove + release) each do a delivery's two steps in one hop, which the benchmark showed is
worth it (a hop costs about as much as the unlink); the removal's unlink itself is made on the
loop, so the record of a delivery never waits for a thread.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from relay.message import Content, DeliveryState, Envelope, Message, QueueEntry
from relay.spool import notices
from relay.spool.base import Change, CheckOut
from relay.spool.base import Claim as AnyClaim
from relay.spool.layout import Opener
from relay.spool.store import Claim, Spool

__all__ = ["FileStore"]


class FileStore:
    """A :class:`~relay.spool.base.Store` on one spool directory; ``spool`` is the blocking
    API underneath, which the tests and the benchmark also use directly."""

    def __init__(self, directory: Path, *, min_free_bytes: int = 0, opener: Opener | None = None,
                 owner: tuple[int, int] | None = None, listen: bool = True) -> None:
        self.spool = Spool(directory, min_free_bytes=min_free_bytes, opener=opener, owner=owner)
        self.directory = self.spool.directory
        # The relay listens; a queue command only announces (it must not read the FIFO).
        self._fifo = notices.FifoReader(self.directory) if listen else None
        # The records that decide whether a crash duplicates mail (after a 250) get a thread
        # of their own: in the shared pool they queued behind ingress fsyncs and argon2 checks.
        self._records = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-records")

    @property
    def location(self) -> str:
        return str(self.directory)

    # --- lifecycle

    async def open(self) -> list[QueueEntry]:
        fifo = self._fifo
        if fifo is None:
            return await asyncio.to_thread(self.spool.open)

        def opened() -> list[QueueEntry]:
            # The FIFO opens before the scan, so a notice sent meanwhile waits in the pipe
            # instead of being missed.
            fifo.open()
            return self.spool.open()

        try:
            entries = await asyncio.to_thread(opened)
        except BaseException:
            fifo.close()
            raise
        fifo.start(asyncio.get_running_loop())
        return entries

    async def close(self) -> None:
        if self._fifo is not None:
            self._fifo.close()
        # A record already in its thread still completes (the interpreter joins it).
        self._records.shutdown(wait=False)

    # --- accepting mail

    async def commit(self, envelope: Envelope, content: Content) -> str:
        return await asyncio.to_thread(self.spool.commit, envelope, content)

    # --- delivery

    async def checkout(self, queue_id: str) -> CheckOut:
        return await asyncio.to_thread(self._check_out, queue_id)

    def _check_out(self, queue_id: str) -> CheckOut:
        out = CheckOut(queue_id)
        try:
            claim = self.spool.claim(queue_id)
        except OSError as exc:
            out.lock_error = exc  # e.g. no locks on this filesystem: deliver unlocked
        else:
            if claim is None:
                out.missing = True
                return out
            out.claim = claim
        try:
            out.message = self.spool.load(queue_id, claim=claim if out.claim else None)
        except OSError as exc:
            out.error = exc
        except BaseException:
            _close(out)
            raise
        return out

    async def checkin(self, out: CheckOut, *, remove: bool = False) -> None:
        if not remove:
            _close(out)  # closing a file we did not unlink is no disk work
            return
        # The unlink is the record that Exchange has the message: made here, on the loop (one
        # metadata change, as quick as a log line), since in a thread it waited behind ingress
        # fsyncs and argon2 checks, seconds under load, and a crash meanwhile meant a copy
        # more. The rest (the retry state; closing the last descriptor of the unlinked file
        # frees it, which is disk work too) on the store's own thread.
        self.spool.forget(out.queue_id)
        await asyncio.get_running_loop().run_in_executor(
            self._records, self._remove_and_close, out)

    def _remove_and_close(self, out: CheckOut) -> None:
        try:
            self.spool.remove(out.queue_id)
        finally:
            _close(out)

    async def save_state(self, queue_id: str, state: DeliveryState, *, urgent: bool = False
                         ) -> None:
        if urgent:  # an fsync: not on the loop, and not behind ingress in the shared pool
            await asyncio.get_running_loop().run_in_executor(
                self._records, self.spool.save_state, queue_id, state)
            return
        await asyncio.to_thread(self.spool.save_state, queue_id, state)

    async def fail(self, queue_id: str, reason: str) -> str:
        return str(await asyncio.to_thread(self.spool.fail, queue_id, reason))

    # --- the queue commands

    async def claim(self, queue_id: str, *, held: bool = False, wait: float | None = None
                    ) -> Claim | None:
        return await asyncio.to_thread(self.spool.claim, queue_id, held=held, wait=wait)

    async def unclaim(self, claim: AnyClaim) -> None:
        if isinstance(claim, Claim):
            claim.release()

    async def load(self, queue_id: str, *, claim: AnyClaim | None = None, held: bool = False
                   ) -> Message:
        own = claim if isinstance(claim, Claim) else None
        return await asyncio.to_thread(self.spool.load, queue_id, claim=own, held=held)

    async def read(self, queue_id: str, *, held: bool = False) -> bytes:
        return await asyncio.to_thread(self.spool.read, queue_id, held=held)

    async def remove(self, queue_id: str) -> None:
        await asyncio.to_thread(self.spool.remove, queue_id)

    async def hold(self, queue_id: str) -> None:
        await asyncio.to_thread(self.spool.hold, queue_id)

    async def release(self, queue_id: str) -> None:
        await asyncio.to_thread(self.spool.release, queue_id)

    async def delete(self, queue_id: str, *, held: bool = False) -> None:
        await asyncio.to_thread(self.spool.delete, queue_id, held=held)

    # --- looking

    async def entries(self, *, quarantine: bool = True, mine: bool = False
                      ) -> list[QueueEntry]:
        del mine  # one relay per spool: all of it is this relay's
        return await asyncio.to_thread(self.spool.entries, quarantine=quarantine)

    async def held_entries(self) -> list[QueueEntry]:
        return await asyncio.to_thread(self.spool.held_entries)

    async def entry(self, queue_id: str, *, held: bool = False) -> QueueEntry | None:
        return await asyncio.to_thread(self.spool.entry, queue_id, held=held)

    async def locate(self, queue_id: str) -> str | None:
        return await asyncio.to_thread(self.spool.locate, queue_id)

    async def is_claimed(self, queue_id: str, *, held: bool = False) -> bool:
        return await asyncio.to_thread(self.spool.is_claimed, queue_id, held=held)

    async def kept_aside(self) -> dict[str, int]:
        def count() -> dict[str, int]:
            return {name: _count(self.directory / name) for name in ("failed", "corrupt")}
        return await asyncio.to_thread(count)

    async def free_space(self) -> int | None:
        def free() -> int | None:
            try:
                return shutil.disk_usage(self.directory).free
            except OSError:
                return None
        return await asyncio.to_thread(free)

    async def probe(self) -> str | None:
        return await asyncio.to_thread(probe_spool, self.directory, self.spool.min_free_bytes)

    # --- change notification

    async def changes(self) -> AsyncIterator[Change]:
        if self._fifo is None:
            return
        while True:
            yield await self._fifo.changes.get()

    async def announce(self, changes: Sequence[Change]) -> bool:
        lines = [f"{c.verb} {c.queue_id}" for c in changes]
        return await asyncio.to_thread(notices.notify, self.directory, lines)

    async def relay_running(self) -> bool:
        return await asyncio.to_thread(notices.relay_running, self.directory)


def _close(out: CheckOut) -> None:
    if out.message is not None:
        out.message.close()
    if isinstance(out.claim, Claim):
        out.claim.release()


def _count(folder: Path) -> int:
    try:
        return sum(1 for p in folder.iterdir() if p.is_file() and p.suffix != ".reason")
    except FileNotFoundError:
        return 0


def probe_spool(directory: Path, min_free: int) -> str | None:
    """Write, fsync and remove a file in the spool's tmp/, as accepting a message would."""
    path = directory / "tmp" / f".readyz-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"m365relay readiness probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        path.unlink()
    except OSError as exc:
        return (f"spool not writable: cannot write {path}: {exc.strerror or exc}; new mail "
                "would get 451. Check that spool.directory is a writable local directory owned "
                "by the relay's user")
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return None  # the write worked; the space check is only a warning sign
    if free < min_free:
        return (f"spool low on space: {free // 2**20} MB free, below spool.min_free_space "
                f"({min_free // 2**20} MB), so new mail gets 452; free disk space under "
                f"{directory}")
    return None

