"""The queue commands that change a message: hold, release, delete, retry, bounce.

Each one takes the message's claim first (waiting for a delivery attempt in flight to end),
then re-checks where the message is, so the outcome is one of: the change was made, or the
attempt finished first and the report says what happened (delivered, failed). A message is
never delivered after ``delete`` or ``hold`` reported success: delivery takes the same claim
and re-checks that the file is still queued before it reads a byte.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from relay.config import progname
from relay.config.commands import command
from relay.spool.base import Claim, SpoolBusyError, SpoolError, Store

__all__ = ["Outcome", "QueueOps"]

DEFAULT_BOUNCE = "5.0.0 returned to the sender by the relay's administrator"

# An operator's command can race another one moving the same message (hold vs release); a
# few rounds of "find it, claim it" settle that without looping forever.
_ROUNDS = 3


@dataclass(frozen=True)
class Outcome:
    id: str
    action: str  # hold | release | delete | retry | bounce
    result: str  # ok | in-flight | not-found | gone | wrong-state | busy | error
    detail: str  # one sentence for people

    @property
    def ok(self) -> bool:
        return self.result in ("ok", "in-flight")


class QueueOps:
    """``wait``: seconds to wait for a delivery attempt in flight before giving up on a message.

    ``on_wait`` is called once per message that has to wait, so the command can say why it
    pauses."""

    def __init__(self, store: Store, *, wait: float = 60.0,
                 on_wait: Callable[[str], None] | None = None, selector: str = "") -> None:
        """``selector``: how the admin named the spool (``--config FILE``), for hints."""
        self.store = store
        self._selector = selector
        self.wait = wait
        self._on_wait = on_wait

    def _release(self, queue_id: str) -> str:
        """The command that releases this message, as the admin can paste it here."""
        return command("queue", "release", queue_id, selector=self._selector,
                       program=progname.command())

    async def hold(self, queue_id: str) -> Outcome:
        async def act(claim: Claim, held: bool) -> Outcome:
            if held:
                return self._out(claim.id, "hold", "wrong-state", "is already on hold")
            await self.store.hold(claim.id)
            return self._out(claim.id, "hold", "ok", "put on hold; it will not be delivered "
                             f"until `{self._release(claim.id)}`")
        return await self._claimed("hold", queue_id, act)

    async def release(self, queue_id: str) -> Outcome:
        async def act(claim: Claim, held: bool) -> Outcome:
            if not held:
                return self._out(claim.id, "release", "wrong-state", "is not on hold")
            await self.store.release(claim.id)
            return self._out(claim.id, "release", "ok", "released; due for delivery now")
        return await self._claimed("release", queue_id, act)

    async def delete(self, queue_id: str) -> Outcome:
        async def act(claim: Claim, held: bool) -> Outcome:
            await self.store.delete(claim.id, held=held)
            return self._out(claim.id, "delete", "ok", "deleted; it will not be delivered and "
                             "no one is notified")
        return await self._claimed("delete", queue_id, act)

    async def retry(self, queue_id: str, *, wait: float | None = None) -> Outcome:
        async def act(claim: Claim, held: bool) -> Outcome:
            if held:
                return self._out(claim.id, "retry", "wrong-state", f"is on hold; use "
                                 f"`{self._release(claim.id)}` to deliver it")
            if claim.state.next_attempt_at > 0:
                await self.store.save_state(claim.id, replace(claim.state, next_attempt_at=0.0))
            return self._out(claim.id, "retry", "ok", "due for delivery now")
        return await self._claimed("retry", queue_id, act, wait=wait)

    async def bounce(self, queue_id: str, reason: str = "") -> Outcome:
        async def act(claim: Claim, held: bool) -> Outcome:
            if held:
                # Only the relay bounces (it sends the DSN through the normal path), and it
                # only looks at queue/.
                await self.store.release(claim.id)
            entry = await self.store.entry(claim.id)
            if entry is None:
                return self._out(claim.id, "bounce", "error", "could not be read; it is left "
                                 "as it was")
            why = reason or DEFAULT_BOUNCE
            if not reason and entry.state.last_error:
                why += f"; last delivery error: {entry.state.last_error}"
            await self.store.save_state(claim.id, replace(entry.state, next_attempt_at=0.0,
                                                    bounce_reason=why))
            dsn = (f"a non-delivery report goes to <{entry.envelope.bounce_to}>"
                   if entry.envelope.bounce_to else "no report is sent (it has no sender to "
                   "return it to)")
            return self._out(claim.id, "bounce", "ok", f"marked for bounce: the relay moves it "
                             f"to failed/ and {dsn}")
        return await self._claimed("bounce", queue_id, act)

    # ------------------------------------------------------------------ claim handling

    async def _claimed(self, action: str, queue_id: str,
                       act: Callable[[Claim, bool], Awaitable[Outcome]],
                       *, wait: float | None = None) -> Outcome:
        wait = self.wait if wait is None else wait
        try:
            where = await self.store.locate(queue_id)
        except SpoolError as exc:
            return self._out(queue_id, action, "not-found", str(exc))
        seen = where in ("queue", "hold")
        for _ in range(_ROUNDS):
            if where not in ("queue", "hold"):
                break
            held = where == "hold"
            try:
                claim = await self._claim(queue_id, held, wait)
            except SpoolBusyError as exc:
                if wait == 0:
                    return self._out(queue_id, action, "in-flight",
                                     "is being delivered right now")
                return self._out(queue_id, action, "busy", str(exc))
            except OSError as exc:
                return self._out(queue_id, action, "error", f"cannot lock it: {exc}")
            if claim is not None:
                try:
                    return await act(claim, held)
                except OSError as exc:
                    return self._out(queue_id, action, "error", str(exc))
                finally:
                    await self.store.unclaim(claim)
            where = await self.store.locate(queue_id)
        return self._out(queue_id, action, "gone" if seen else "not-found",
                         _whereabouts(where, seen))

    async def _claim(self, queue_id: str, held: bool, wait: float) -> Claim | None:
        try:
            return await self.store.claim(queue_id, held=held, wait=0)
        except SpoolBusyError:
            if wait <= 0:
                raise
        if self._on_wait is not None:
            self._on_wait(f"{queue_id} is being delivered right now; waiting up to {wait:.0f}s "
                          "for that attempt to end")
        return await self.store.claim(queue_id, held=held, wait=wait)

    @staticmethod
    def _out(queue_id: str, action: str, result: str, detail: str) -> Outcome:
        return Outcome(queue_id, action, result, detail)


def _whereabouts(where: str | None, seen: bool) -> str:
    if where == "failed":
        return ("failed permanently meanwhile; kept in failed/" if seen
                else "is not queued: it failed permanently and is kept in failed/")
    if where == "corrupt":
        return "is not queued: its file was damaged and moved to corrupt/"
    if seen:
        return "was delivered while we waited for the attempt in flight; nothing was changed"
    return "is not queued (already delivered, deleted, or a mistyped id)"
