"""What the HTTP endpoint reads from the running relay: a protocol the service's ``Relay``
satisfies, so that http/ depends on the stages it shows and not on the service that owns it.

The listeners come as :class:`ListenerSnapshot` values taken at request time rather than as
the live handlers and servers; the queue through the :class:`~relay.spool.base.Store`
interface; delivery's bookkeeping (events, connections, pacing) through its own read-only
attributes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pathlib import Path

    from relay.config.records import Config
    from relay.delivery.scheduler import Delivery
    from relay.ingress.limits import AuthGuard
    from relay.spool.base import Store
    from relay.tokens.provider import TokenProvider


@dataclass(frozen=True)
class ListenerSnapshot:
    name: str
    serving: bool  # its socket accepts connections
    closing: bool  # shutting down: refuses new sessions
    sessions: int  # device SMTP sessions open now
    auth_failures: int  # failed device logins since the start
    # End of DATA to the reply: the histogram's cumulative buckets and its sum, in seconds.
    ack_buckets: tuple[tuple[str, float], ...] = ()
    ack_sum: float = 0.0


class RelayView(Protocol):
    """Read-only: the endpoint never changes the relay's state."""

    @property
    def config(self) -> Config: ...
    @property
    def config_path(self) -> Path | None: ...  # named in the page's command hints
    @property
    def hostname(self) -> str: ...
    @property
    def store(self) -> Store: ...
    @property
    def tokens(self) -> TokenProvider: ...
    @property
    def delivery(self) -> Delivery: ...
    @property
    def auth_guard(self) -> AuthGuard: ...  # logins: argon2 checks, cache hits, refusals
    def listener_snapshots(self) -> list[ListenerSnapshot]: ...
