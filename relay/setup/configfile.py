"""The config init writes, and how a re-run adds to an existing one without losing anything.

A new config is rendered from a commented template. An existing one is never re-serialised
(that would drop the admin's comments and key order): new app blocks and account items are
inserted as text at the end of their sections, a placeholder ``client_id`` is replaced on its own
line, and the result is parsed again and compared with the old data, so nothing is written
unless every old key survives unchanged.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PLACEHOLDER_CLIENT_ID = "00000000-0000-0000-0000-000000000000"
COMMENT_COLUMN = 40
_PLAIN = re.compile(r"^[A-Za-z0-9_./@:+-]+$")


class MergeError(Exception):
    """The existing config cannot be extended safely; the message says what to do."""


@dataclass(frozen=True)
class NewAccount:
    name: str
    mailbox: str
    username: str | None = None  # with password_hash: a device that logs in
    password_hash: str | None = None
    networks: tuple[str, ...] = ()  # matched by address, no AUTH


@dataclass(frozen=True)
class NewApp:
    name: str
    tenant: str
    client_id: str
    key_file: str
    cert_file: str
    cloud: str = "global"
    hve: bool = False
    transport: str = "smtp"


@dataclass(frozen=True)
class NewListener:
    bind: str
    tls: str
    networks: tuple[str, ...]
    certificate: str | None = None
    private_key: str | None = None
    cleartext_auth: bool = False


def q(value: str) -> str:
    """A YAML scalar: plain when that is unambiguous, else JSON's double-quoted form."""
    if _PLAIN.match(value) and value[0] not in "-:@" and value.lower() not in (
            "yes", "no", "on", "off", "true", "false", "null", "~"):
        return value
    return json.dumps(value)


def _c(line: str, comment: str) -> str:
    """``line`` with ``comment`` in the column the rest of the file uses."""
    return f"{line.ljust(COMMENT_COLUMN - 1)} # {comment}"


def _flow_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(q(v) for v in values) + "]"


def render_app(app: NewApp, indent: str = "  ") -> str:
    i, j = indent, indent * 2
    client_note = ("REPLACE: setup-m365.ps1 prints it; then m365relay init --client-id ID"
                   if app.client_id == PLACEHOLDER_CLIENT_ID else "Application (client) ID")
    lines = [
        f"{i}{app.name}:",
        _c(f"{j}tenant: {q(app.tenant)}", "tenant id (GUID) or a verified domain"),
        _c(f"{j}client_id: {app.client_id}", client_note),
        f"{j}# Made by m365relay init; setup-m365.ps1 uploads the certificate (never the key).",
        f"{j}certificate:",
        _c(f"{j}{i}private_key: {{file: {q(app.key_file)}}}", "owner-only (0600)"),
        f"{j}{i}certificate: {{file: {q(app.cert_file)}}}",
        _c(f"{j}{'' if app.cloud != 'global' else '# '}cloud: {app.cloud}",
           "global | usgov | usgov-dod | china"),
    ]
    if app.hve:
        lines.append(_c(f"{j}hve: true", "High Volume Email: each mailbox is an HVE account"))
    if app.transport != "smtp":
        lines.append(_c(f"{j}transport: {app.transport}",
                        "Microsoft Graph sendMail (Mail.Send, Mail.ReadWrite)"))
    return "\n".join(lines) + "\n"


def render_account(account: NewAccount, indent: str = "  ", app: str = "") -> str:
    i = indent
    lines = [f"{i}- name: {q(account.name)}"]
    if account.username and account.password_hash:
        lines += [_c(f"{i}  username: {q(account.username)}", "the device's SMTP AUTH user"),
                  f"{i}  password_hash: {json.dumps(account.password_hash)}"]
    if account.networks:
        lines.append(_c(f"{i}  networks: {_flow_list(account.networks)}",
                        "matched by address, no AUTH"))
    lines += [f"{i}  app: {q(app)}", _c(f"{i}  mailbox: {q(account.mailbox)}", "sends as this"),
              _c(f"{i}  from: rewrite", "From becomes the mailbox (display name kept)")]
    return "\n".join(lines) + "\n"


def _render_listener(listener: NewListener) -> list[str]:
    out = ["listeners:",
           "  - name: devices",
           _c(f"    bind: {q(listener.bind)}", "where devices send (port 0: any free port)"),
           _c(f"    tls: {listener.tls}", "none | starttls | implicit")]
    if listener.certificate and listener.private_key:
        out += [_c(f"    certificate: {q(listener.certificate)}",
                   "self-signed by init; replace with your CA's"),
                _c(f"    private_key: {q(listener.private_key)}", "owner-only (0600)")]
    out.append(_c(f"    networks: {_flow_list(listener.networks)}", "who may connect at all"))
    if listener.cleartext_auth:
        out.append(_c(f"    cleartext_auth_networks: {_flow_list(listener.networks)}",
                      "passwords without TLS: only for devices that cannot do STARTTLS"))
    return out


def render_config(*, listener: NewListener, app: NewApp, accounts: Sequence[NewAccount],
                  spool: str) -> str:
    today = dt.datetime.now(dt.UTC).date().isoformat()
    head = [
        f"# m365relay configuration, written by `m365relay init` on {today}.",
        "# Every key is in the README's configuration reference. Relative paths are relative to",
        "# this file's folder. Check it with:  m365relay check-config THIS-FILE",
        "# Run `m365relay init --config THIS-FILE` again to add a mailbox or a device: it keeps",
        "# everything here, comments included.",
        "",
        *_render_listener(listener),
        "",
        _c("apps:", "Entra ID app registrations"),
        render_app(app).rstrip("\n"),
        "",
        _c("accounts:", "local identity -> app + mailbox"),
        *(render_account(a, app=app.name).rstrip("\n") for a in accounts),
        "",
        "spool:",
        _c(f"  directory: {q(spool)}", "owner-only; 250 is answered only after fsync here"),
        "",
        _c("# delivery:", "defaults follow Exchange Online's limits"),
        _c("#   max_age: 5d", "then the message bounces to its sender"),
        _c("#   connections_per_mailbox: 3", "Exchange allows 3 per mailbox"),
        _c("# http: {}", "status page and /metrics on 127.0.0.1:9925"),
    ]
    return "\n".join(head) + "\n"


# --- merging into an existing config -------------------------------------------------------


def _block(lines: list[str], key: str) -> tuple[int, int]:
    """(first line, end) of the top-level block ``key:``; end is where the next one starts."""
    start = next((n for n, line in enumerate(lines)
                  if re.match(rf"^{re.escape(key)}:\s*(#.*)?$", line.rstrip("\n"))), None)
    if start is None:
        raise MergeError(f"`{key}:` is not a block in the existing config (init only appends to "
                         f"a block written as `{key}:` on its own line); add the entry by hand")
    end = next((n for n in range(start + 1, len(lines))
                if re.match(r"^[^\s#-]", lines[n])), len(lines))
    # Comments and blank lines just before the next key belong to it, not to this block.
    while end - 1 > start and (not lines[end - 1].strip() or lines[end - 1].startswith("#")):
        end -= 1
    return start, end


def _child_indent(lines: list[str], start: int, end: int, *, item: bool) -> str:
    for line in lines[start + 1:end]:
        stripped = line.lstrip(" ")
        if not stripped.strip() or stripped.startswith("#"):
            continue
        if item and not stripped.startswith("-"):
            continue
        return line[:len(line) - len(stripped)]
    return "  "


def _insert(text: str, key: str, render: Any, *, item: bool) -> str:
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    start, end = _block(lines, key)
    indent = _child_indent(lines, start, end, item=item)
    lines.insert(end, render(indent))
    return "".join(lines)


def set_client_id(text: str, app: str, client_id: str) -> str:
    lines = text.splitlines(keepends=True)
    start, end = _block(lines, "apps")
    head = next((n for n in range(start + 1, end)
                 if re.match(rf"^\s+{re.escape(app)}:\s*(#.*)?$", lines[n].rstrip("\n"))), None)
    if head is None:
        raise MergeError(f"apps.{app} is not written as a block in the existing config; set its "
                         "client_id by hand")
    own = len(lines[head]) - len(lines[head].lstrip(" "))
    for n in range(head + 1, end):
        line = lines[n]
        depth = len(line) - len(line.lstrip(" "))
        if line.strip() and not line.lstrip().startswith("#") and depth <= own:
            break
        found = re.match(r"^(\s+client_id:\s*)(\S+)(.*)$", line.rstrip("\n"))
        if found:
            lines[n] = _c(f"{found.group(1)}{client_id}", "Application (client) ID") + "\n"
            return "".join(lines)
    raise MergeError(f"apps.{app} has no `client_id:` line to update; add `client_id: "
                     f"{client_id}` under it")


def merge(text: str, *, app: NewApp | None, accounts: Sequence[NewAccount], app_name: str,
          client_id: str | None) -> str:
    """``text`` with ``app`` and ``accounts`` appended and ``client_id`` set; raises
    MergeError unless every key of the old config is still there, unchanged."""
    old = yaml.safe_load(text)
    if not isinstance(old, Mapping):
        raise MergeError("the existing config is not a YAML mapping")
    new = text
    if app is not None:
        new = _insert(new, "apps", lambda i: render_app(app, i), item=False)
    for account in accounts:
        new = _insert(new, "accounts", lambda i, a=account: render_account(a, i, app_name),
                      item=True)
    if client_id is not None:
        new = set_client_id(new, app_name, client_id)
    _check_kept(old, yaml.safe_load(new), app_name=app_name, client_id=client_id,
                added_app=app is not None, added=len(accounts))
    return new


def _check_kept(old: Mapping[str, Any], new: Any, *, app_name: str, client_id: str | None,
                added_app: bool, added: int) -> None:
    if not isinstance(new, Mapping):
        raise MergeError("appending would break the file's YAML structure; nothing was written")
    expected_apps = dict(old.get("apps") or {})
    if client_id is not None and app_name in expected_apps:
        expected_apps[app_name] = {**expected_apps[app_name], "client_id": client_id}
    for key, value in old.items():
        if key == "apps":
            got = {k: v for k, v in (new.get("apps") or {}).items() if k in expected_apps}
            if got != expected_apps or len(new.get("apps") or {}) != len(expected_apps) + added_app:
                raise MergeError("appending the app would change existing `apps`; nothing was "
                                 "written (is the apps block indented unusually?)")
        elif key == "accounts":
            items = list(new.get("accounts") or [])
            if items[:len(value or [])] != list(value or []) \
                    or len(items) != len(value or []) + added:
                raise MergeError("appending accounts would change existing ones; nothing was "
                                 "written (is the accounts list indented unusually?)")
        elif new.get(key) != value:
            raise MergeError(f"appending would change `{key}`; nothing was written")


def write_atomically(path: Path, text: str, *, backup: bool) -> None:
    """Replace ``path`` with ``text`` (same mode as before, 0600 for a new file), keeping the
    previous version as ``path.bak`` when asked."""
    old = path.stat() if path.exists() else None
    mode = old.st_mode & 0o777 if old else 0o600
    tmp = path.with_name(f".{path.name}.init-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), mode)
        if old is not None and (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
            # root:m365relay 0640 stays root:m365relay, or the relay could not read it.
            os.fchown(f.fileno(), old.st_uid, old.st_gid)
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if backup and path.exists():
        previous = path.read_bytes()
        bak = path.with_name(path.name + ".bak")
        fd = os.open(bak, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            if old is not None and (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(f.fileno(), old.st_uid, old.st_gid)
            f.write(previous)
    tmp.replace(path)
