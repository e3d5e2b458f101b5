"""What init is asked to do: flags first, questions on a terminal for the rest.

Every question has a flag. Without a terminal, or with ``--non-interactive``, nothing is asked:
missing required values are reported together, each by its flag.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
_EMAIL = re.compile(r"^[A-Za-z0-9.!#$%&*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")
_GUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
_DOMAIN = re.compile(r"^[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
LOOPBACK = ("127.0.0.0/8", "::1")
CLOUD_NAMES = ("global", "usgov", "usgov-dod", "china")


class UsageError(Exception):
    """Bad or missing input; the message names the flag."""


@dataclass
class Plan:
    app: str
    new_app: bool
    tenant: str
    client_id: str | None
    cloud: str = "global"
    hve: bool = False
    transport: str = "smtp"
    grant: str = "FullAccess"
    devices: list[tuple[str, str]] = field(default_factory=list)  # (name, mailbox)
    trusted: list[tuple[str, str]] = field(default_factory=list)  # (cidr, mailbox)
    mailboxes: list[str] = field(default_factory=list)  # all the app will send as
    networks: list[str] = field(default_factory=list)  # who may connect to a new listener
    listen: str = "127.0.0.1:2525"
    tls: str = "none"
    spool: str = "/var/spool/m365relay"


def email(value: str) -> str:
    value = value.strip()
    if not _EMAIL.match(value):
        raise ValueError(f"{value!r} is not an email address")
    return value


def tenant(value: str) -> str:
    value = value.strip()
    if not (_GUID.match(value) or _DOMAIN.match(value) or re.match(r"^[A-Za-z0-9-]+$", value)):
        raise ValueError(f"{value!r} is neither a tenant id (GUID) nor a domain such as "
                         "contoso.onmicrosoft.com")
    return value


def guid(value: str) -> str:
    value = value.strip()
    if not _GUID.match(value):
        raise ValueError(f"{value!r} is not an Application (client) ID (a GUID)")
    return value.lower()


def network(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise ValueError(f"{value!r} is not a network (CIDR such as 192.168.10.0/24)") from None


def name(value: str) -> str:
    value = value.strip()
    if not _NAME.match(value):
        raise ValueError(f"{value!r} is not a usable name (letters, digits, . _ -)")
    return value


def bind(value: str) -> str:
    host, sep, port = value.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError(f"{value!r} is not HOST:PORT (0.0.0.0:587, 127.0.0.1:2525)")
    return value.strip()


def with_mailbox(value: str, check: Callable[[str], str], default: str | None,
                 flag: str) -> tuple[str, str]:
    """``X[=MAILBOX]``: the mailbox defaults to the first one given."""
    left, sep, right = value.partition("=")
    mailbox = email(right) if sep else default
    if mailbox is None:
        raise ValueError(f"{flag} {value}: which mailbox? Write {flag} {left}=box@example.com "
                         "or give --mailbox first")
    return check(left), mailbox


def default_app_name(tenant_value: str) -> str:
    if _GUID.match(tenant_value):
        return "m365"
    return re.sub(r"[^a-z0-9-]", "", tenant_value.split(".", maxsplit=1)[0].lower()) or "m365"


class Asker:
    """Questions on a terminal; without one, the first question raises UsageError."""

    def __init__(self, interactive: bool, ask: Callable[[str], str] = input) -> None:
        self.interactive = interactive
        self._ask = ask
        self.missing: list[str] = []

    def value(self, flag: str, question: str, check: Callable[[str], T],
              default: str | None = None) -> T | None:
        if not self.interactive:
            if default is None:
                self.missing.append(flag)
                return None
            return check(default)
        suffix = f" [{default}]" if default is not None else ""
        while True:
            answer = self._ask(f"{question}{suffix}: ").strip()
            if not answer and default is not None:
                answer = default
            if not answer:
                print("  (an answer is needed here)")
                continue
            try:
                return check(answer)
            except ValueError as exc:
                print(f"  {exc}")

    def values(self, question: str, check: Callable[[str], T], default: str = "") -> list[T]:
        """A comma-separated list; empty is allowed."""
        if not self.interactive:
            return [check(v) for v in default.split(",") if v.strip()]
        while True:
            answer = self._ask(f"{question}{f' [{default}]' if default else ''}: ").strip()
            answer = answer or default
            try:
                return [check(v) for v in answer.split(",") if v.strip()]
            except ValueError as exc:
                print(f"  {exc}")


def existing_app(raw: Mapping[str, Any], wanted: str | None) -> str | None:
    found = raw.get("apps")
    apps: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    if wanted:
        return wanted
    if len(apps) == 1:
        return str(next(iter(apps)))
    if apps:
        raise UsageError(f"the config has several apps ({', '.join(sorted(apps))}); say which "
                         "one with --app NAME")
    return None


def app_mailboxes(raw: Mapping[str, Any], app: str) -> list[str]:
    found = [a.get("mailbox") for a in raw.get("accounts") or []
             if isinstance(a, Mapping) and a.get("app") == app]
    return list(dict.fromkeys(m for m in found if isinstance(m, str)))


def gather(args: argparse.Namespace, raw: Mapping[str, Any] | None, asker: Asker) -> Plan:
    """The plan for a new config (``raw`` None) or for additions to an existing one."""
    try:
        return _gather(args, raw, asker)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _gather(args: argparse.Namespace, raw: Mapping[str, Any] | None, asker: Asker) -> Plan:
    apps = dict(raw.get("apps") or {}) if raw else {}
    app_name = existing_app(raw, args.app) if raw else args.app
    if app_name is not None:
        app_name = name(app_name)
    known = apps.get(app_name) if app_name else None
    if isinstance(known, Mapping):
        plan = Plan(app=str(app_name), new_app=False, tenant=str(known.get("tenant")),
                    client_id=args.client_id and guid(args.client_id),
                    cloud=str(known.get("cloud", "global")), hve=bool(known.get("hve", False)),
                    transport=str(known.get("transport", "smtp")), grant=args.grant or "FullAccess")
        already = app_mailboxes(raw or {}, plan.app)
    else:
        tenant_value = args.tenant and tenant(args.tenant)
        tenant_value = tenant_value or asker.value(
            "--tenant", "Microsoft 365 tenant (contoso.onmicrosoft.com or the tenant id)", tenant)
        plan = Plan(app=app_name or default_app_name(tenant_value or "m365"), new_app=True,
                    tenant=tenant_value or "", client_id=args.client_id and guid(args.client_id))
        already = []
        plan.cloud = args.cloud or asker.value(
            "--cloud", "Cloud (global, usgov, usgov-dod, china)", _choice(CLOUD_NAMES),
            "global") or "global"
        plan.transport = args.transport or asker.value(
            "--transport", "Deliver over SMTP AUTH or Microsoft Graph (smtp, graph)",
            _choice(("smtp", "graph")), "smtp") or "smtp"
        plan.hve = bool(args.hve)
        plan.grant = args.grant or "FullAccess"
    extending = raw is not None
    mailboxes = [email(m) for m in args.mailbox]
    if not mailboxes and not (args.device or args.trusted_network):
        if asker.interactive:
            question = "Mailbox(es) to add" if extending else "Mailbox(es) to send as"
            mailboxes = asker.values(f"{question}, comma-separated", email)
            while not mailboxes and not extending:
                print("  (at least one mailbox is needed)")
                mailboxes = asker.values(f"{question}, comma-separated", email)
        elif not extending:
            asker.missing.append("--mailbox")
    default_box: str | None = next(iter(mailboxes or already), None)
    plan.devices = [with_mailbox(d, name, default_box, "--device") for d in args.device]
    plan.trusted = [with_mailbox(t, network, default_box, "--trusted-network")
                    for t in args.trusted_network]
    if asker.interactive and not (args.device or args.trusted_network):
        _ask_devices(asker, plan, default_box)
    used = {m for _, m in plan.devices} | {m for _, m in plan.trusted}
    # A mailbox no device sends as gets a device account of its own (named after it).
    for box in mailboxes:
        if box not in used:
            plan.devices.append((name(re.sub(r"[^A-Za-z0-9_.-]", "-", box.split("@")[0])), box))
    plan.mailboxes = list(dict.fromkeys([*already, *mailboxes, *(m for _, m in plan.devices),
                                         *(m for _, m in plan.trusted)]))
    if extending and not (plan.devices or plan.trusted or plan.client_id or plan.new_app):
        raise UsageError("nothing to add: give --mailbox, --device, --trusted-network or "
                             "--client-id (the existing config is left as it is)")
    if asker.missing:
        raise UsageError(f"init needs {' and '.join(asker.missing)} (or run it in a terminal "
                         "to be asked)")
    if not extending:
        _listener(args, plan, asker)
    return plan


def _ask_devices(asker: Asker, plan: Plan, default_box: str | None) -> None:
    networks = asker.values("Networks whose devices send WITHOUT a password (CIDR, "
                            "comma-separated; empty for none)", network)
    plan.trusted += [(n, default_box or "") for n in networks]
    devices = asker.values("Devices that log in with a generated password (names, "
                           "comma-separated; empty for none)", name)
    plan.devices += [(d, default_box or "") for d in devices]


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def check(value: str) -> str:
        value = value.strip().lower()
        if value not in options:
            raise ValueError(f"{value!r}: choose one of {', '.join(options)}")
        return value
    return check


def _listener(args: argparse.Namespace, plan: Plan, asker: Asker) -> None:
    plan.networks = list(dict.fromkeys([*(network(n) for n in args.network),
                                        *(n for n, _ in plan.trusted)]))
    if asker.interactive and not args.network:
        more = asker.values("Other networks devices connect from (CIDR; empty: only those "
                            "above, or this host)", network)
        plan.networks = list(dict.fromkeys([*plan.networks, *more]))
    lan = any(not ipaddress.ip_network(n).is_loopback for n in plan.networks)
    plan.networks = plan.networks or list(LOOPBACK)
    tls_default = "starttls" if plan.devices else "none"
    plan.tls = args.tls or asker.value("--tls", "TLS on the device port (none, starttls, "
                                       "implicit)", _choice(("none", "starttls", "implicit")),
                                       tls_default) or tls_default
    port = {"starttls": 587, "implicit": 465}.get(plan.tls, 25 if lan else 2525)
    listen_default = f"{'0.0.0.0' if lan else '127.0.0.1'}:{port}"  # noqa: S104 - a LAN port
    plan.listen = args.listen or asker.value("--listen", "Address the relay listens on",
                                             bind, listen_default) or listen_default
    plan.spool = str(args.spool) if args.spool else plan.spool
