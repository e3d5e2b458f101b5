"""The scenarios of issue 6, at full size and in a quick size for iteration and the smoke test."""

from __future__ import annotations

from dataclasses import dataclass, replace

from bench.targets import BASE_TARGETS, PG_TARGETS

KIB = 1024
MIB = 1024 * 1024


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str                  # "load" | "large" | "idle" | "cold"
    messages: int = 0
    clients: int = 1
    per_connection: int = 1
    mailboxes: int = 1
    size: int = 8 * KIB
    idle_connections: int = 0
    drop: float = 0.0          # share of DATA attempts hung up on after the final dot
    data_432: float = 0.0      # share of DATA attempts answered 432 4.3.2
    # The PostgreSQL targets run where m365relay does when asked for with --target (load
    # scenarios only), and in burst by default.
    targets: tuple[str, ...] = BASE_TARGETS
    timeout: float = 900.0     # the whole run, delivery included
    # Relay clients log in (AUTH PLAIN, one account per mailbox, all from 127.0.0.1) on every
    # connection instead of being mapped by source address, as pooled apps and NATed
    # printers do (issue 14).
    auth: bool = False

    @property
    def title(self) -> str:
        if self.kind == "large":
            return f"one {self.size / MIB:g} MiB message"
        if self.kind == "idle":
            return f"{self.idle_connections:,} idle client connections"
        if self.kind == "cold":
            return "cold start: process start to first accepted connection, then 1 message"
        text = (f"{self.messages:,} msgs of {self.size // KIB} KiB, {self.clients} client(s), "
                f"{self.per_connection} msg(s)/connection, {self.mailboxes} mailbox(es)")
        if self.auth:
            text += "; AUTH PLAIN per connection, all clients from one address"
        if self.drop or self.data_432:
            text += (f"; upstream answers 432 4.3.2 to {self.data_432:.0%} and hangs up after "
                     f"DATA on {self.drop:.0%} of attempts")
        return text


FULL: tuple[Scenario, ...] = (
    Scenario("burst", "load",
             messages=1000, clients=10, per_connection=10, mailboxes=5,
             targets=BASE_TARGETS + PG_TARGETS),
    Scenario("printer", "load",
             messages=200, clients=1, per_connection=1, mailboxes=1),
    # The same shapes with a login per connection, from one address (issue 14): only the relay
    # differs from its network-mapped runs (emailproxy's clients always log in; direct is
    # XOAUTH2), so only the relay runs them, in the same run as the scenarios above.
    Scenario("burst-auth", "load", messages=1000, clients=10, per_connection=10, mailboxes=5,
             auth=True, targets=("m365relay",)),
    Scenario("printer-auth", "load", messages=200, clients=1, per_connection=1, mailboxes=1,
             auth=True, targets=("m365relay",)),
    # Ten printers behind one NAT, five accounts, a login for every message.
    Scenario("printers-nat-auth", "load", messages=500, clients=10, per_connection=1,
             mailboxes=5, auth=True, targets=("m365relay",)),
    Scenario("large", "large", messages=1, size=30 * MIB),
    Scenario("idle", "idle", idle_connections=1000,
             targets=("m365relay", "emailproxy")),
    Scenario("faults", "load", messages=500, clients=10, per_connection=10, mailboxes=5,
             drop=0.05, data_432=0.20),
    Scenario("cold", "cold", messages=1, targets=("m365relay", "emailproxy")),
)


def quick(scenario: Scenario) -> Scenario:
    """A few seconds per run: same shape, fewer messages."""
    if scenario.kind == "load":
        return replace(scenario, messages=max(scenario.messages // 10, scenario.clients * 2),
                       timeout=120)
    if scenario.kind == "large":
        return replace(scenario, size=3 * MIB, timeout=120)
    if scenario.kind == "idle":
        return replace(scenario, idle_connections=100, timeout=120)
    return replace(scenario, timeout=120)


def targets_of(scenario: Scenario, wanted: list[str] | None, *, pg: bool = True
               ) -> list[str]:
    """The targets a scenario runs: ``wanted`` (--target) if given, else its own; ``pg``:
    whether PostgreSQL can run here (without it a default run leaves those targets out)."""
    own = list(scenario.targets)
    if wanted and scenario.kind == "load" and "m365relay" in own:
        own += [t for t in PG_TARGETS if t not in own]
    if not wanted:
        return [t for t in own if pg or t not in PG_TARGETS]
    return [t for t in own if t in wanted]


def select(names: list[str] | None, quick_mode: bool) -> list[Scenario]:
    known = {s.name: s for s in FULL}
    chosen = [known[n] for n in names] if names else list(FULL)
    return [quick(s) for s in chosen] if quick_mode else chosen
