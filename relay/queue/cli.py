"""``m365relay queue``: mailq, postsuper and qshape for the relay's spool.

Exit codes: 0 done; 1 a message could not be acted on (each line says why) or the spool cannot
be read; 2 usage; 75 a message was still being delivered when ``--wait`` ran out (try again);
78 the config file does not give a usable ``spool.directory``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import yaml

from relay.config.check import Failed, Run, validate
from relay.config.env import DEFAULT_SPOOL, PREFIX, spool_from_env
from relay.config.records import DEFAULT_PATH, ConfigError, SpoolSettings
from relay.queue import view
from relay.queue.ops import Outcome, QueueOps
from relay.spool.base import Change, SpoolError, Store
from relay.spool.filestore import FileStore
from relay.spool.open import open_store

__all__ = ["add_parser"]

Command = Callable[[argparse.Namespace, Store], Coroutine[Any, Any, int]]
EX_TEMPFAIL = 75
EX_CONFIG = 78
# Where the systemd unit and the container image keep it.
DEFAULT_CONFIG = DEFAULT_PATH  # as every command (relay/config/records.py)


class _Usage(Exception):
    """Wrong arguments or no usable spool; the text says what to do. Carries an exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------- parser


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``queue`` and its actions to the main command's subparsers."""
    q = sub.add_parser(
        "queue", help="list, hold, release, retry, delete or bounce queued mail",
        description="Inspect and manage the spool of a running or stopped relay. Changes are "
                    "made under each message's lock, so they never collide with a delivery in "
                    "flight, and a running relay is told at once.")
    _common(q, suppress=False)
    # The same options after the action too (`queue list --json`); SUPPRESS keeps these
    # copies from overwriting values given before it.
    common = argparse.ArgumentParser(add_help=False)
    _common(common, suppress=True)
    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                         help="how long to wait for a delivery attempt in flight before giving "
                              "up on that message (default 60)")
    actions = q.add_subparsers(dest="queue_action", required=True, metavar="ACTION")

    def action(name: str, run: Command, text: str,
               *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p = actions.add_parser(name, parents=[common, *parents], help=text, description=text)
        p.set_defaults(func=_main, queue_run=run)
        return p

    action("list", _list, "list queued and held messages (like mailq)")
    p = action("show", _show, "show one message: envelope, state, error, headers")
    p.add_argument("id", metavar="ID")
    p.add_argument("--raw", action="store_true", help="write the whole message to stdout")
    p = action("summary", _summary, "count messages by mailbox and age, like qshape")
    p.add_argument("--by", choices=["mailbox", "account", "domain"], default="mailbox",
                   help="rows: the sending mailbox (default), the account, or the recipients' "
                        "domains")
    p.add_argument("--held", action="store_true", help="summarize held messages instead")
    p = action("retry", _retry, "deliver now, skipping the backoff and a paused mailbox",
               waiting)
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument("--all", action="store_true", help="every queued message")
    for name, text in (("hold", "keep messages from being delivered until released"),
                       ("release", "release held messages; they are delivered now"),
                       ("delete", "remove messages without delivering or notifying anyone"),
                       ("bounce", "give up on messages: the relay returns each to its sender "
                                  "with a non-delivery report and keeps it in failed/")):
        p = action(name, _change, text, waiting)
        p.add_argument("ids", nargs="+" if name != "release" else "*", metavar="ID")
        if name == "release":
            p.add_argument("--all", action="store_true", help="every held message")
        if name == "bounce":
            p.add_argument("--reason", default="", help="the reason the sender reads, "
                           "starting with a status code (default: \"5.0.0 returned to the "
                           "sender by the relay's administrator\" and the last error)")


def _common(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    where = p.add_mutually_exclusive_group()
    where.add_argument("--config", "-c", type=Path, default=default(None), metavar="FILE",
                       help="the relay's config file (only spool.directory is read; default "
                            f"{DEFAULT_CONFIG} if it exists)")
    where.add_argument("--spool", type=Path, default=default(None), metavar="DIR",
                       help="the spool directory itself")
    p.add_argument("--config-from-env", action="store_true", default=default(False),
                   help="the spool of the M365RELAY_* variables ($M365RELAY_SPOOL, default "
                        f"{DEFAULT_SPOOL}; or the database of $M365RELAY_DATABASE_URL or "
                        "$M365RELAY_DATABASE_URL_FILE) when the --config file does not exist, "
                        "as `serve --config-from-env` has it; the default when no config file "
                        "is found and such variables are set (the container image)")
    p.add_argument("--json", action="store_true", default=default(False),
                   help="machine-readable output")


# ---------------------------------------------------------------------- entry


def _main(args: argparse.Namespace) -> int:
    try:
        where = _spool_dir(args)
        run: Command = args.queue_run
        return asyncio.run(_run_on(run, args, where))
    except _Usage as exc:
        print(f"m365relay queue: {exc}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:  # `queue list | head`
        return 0
    except PermissionError as exc:
        print(f"m365relay queue: {exc}. Run it as the relay's user (sudo -u USER) or root.",
              file=sys.stderr)
        return 1
    except SpoolError as exc:
        print(f"m365relay queue: {exc}", file=sys.stderr)
        return 1


async def _run_on(run: Command, args: argparse.Namespace, where: Path | SpoolSettings
                  ) -> int:
    if isinstance(where, Path):
        return await run(args, _open(where))
    # The cluster queue: every node's mail, under the same claims the nodes take.
    store = open_store(where, listen=False)
    try:
        return await run(args, store)
    finally:
        await store.close()


def _spool_dir(args: argparse.Namespace) -> Path | SpoolSettings:
    """--spool; else the config file; else the variables: as `serve --config FILE
    --config-from-env` chooses (the image's default), so `queue list` alone works there."""
    config = Path(args.config) if args.config is not None else None
    from_env = args.config_from_env or (
        config is None and any(k.startswith(PREFIX) for k in os.environ))
    directory: Path | SpoolSettings
    if args.spool is not None:
        directory = Path(args.spool)
    elif config is not None and (config.exists() or not from_env):
        directory = _from_config(config)
    elif config is None and DEFAULT_CONFIG.exists():
        directory = _from_config(DEFAULT_CONFIG)
    elif from_env:
        directory = _from_env()
    else:
        raise _Usage(f"say which spool: --config FILE (the relay's config; {DEFAULT_CONFIG} "
                     "does not exist), --config-from-env (M365RELAY_* variables) or "
                     "--spool DIR", 2)
    if isinstance(directory, SpoolSettings):
        return directory
    if not (directory / "queue").is_dir():
        raise _Usage(f"no spool at {directory} (its queue/ folder is missing): check "
                     "spool.directory, and start the relay once so it creates the spool")
    return directory


def _from_config(path: Path) -> Path | SpoolSettings:
    # Only the spool section: the queue commands need no secrets, and an admin may run them
    # where the app secrets are not readable.
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise _Usage(f"cannot read {path}: {exc}", EX_CONFIG) from None
    section = data.get("spool") if isinstance(data, dict) else None
    if section is None:
        raise _Usage(f"{path} has no spool section; set spool.directory there, or give "
                     "--spool DIR", EX_CONFIG)
    # Checked as `check-config` checks it, with the same messages ("spool.directory: ...").
    run = Run({"base_dir": str(path.resolve().parent)}, "spool")
    try:
        settings = validate(SpoolSettings, section, run)
    except Failed:
        raise _Usage(f"{path}: {'; '.join(run.problems)}", EX_CONFIG) from None
    return settings.directory if settings.directory is not None else settings


def _from_env() -> Path | SpoolSettings:
    # M365RELAY_SPOOL, or the cluster queue of M365RELAY_DATABASE_URL(_FILE).
    try:
        settings = spool_from_env()
    except ConfigError as exc:
        raise _Usage("; ".join(exc.problems), EX_CONFIG) from None
    return settings.directory if settings.directory is not None else settings


def _open(directory: Path) -> Store:
    owner = None
    st = directory.stat()
    if os.geteuid() == 0 and st.st_uid != 0:
        owner = (st.st_uid, st.st_gid)
    # Never Store.open(): for files that cleans tmp/, which would destroy a running relay's
    # messages in the middle of being received. And only the relay listens for changes.
    return FileStore(directory, owner=owner, listen=False)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(text)


# ---------------------------------------------------------------------- reading


async def _items(store: Store, *, queued: bool = True, held: bool = True) -> list[view.Item]:
    items = []
    if queued:
        items += [view.Item(e, False, await store.is_claimed(e.id))
                  for e in await store.entries(quarantine=False)]
    if held:
        items += [view.Item(e, True, False) for e in await store.held_entries()]
    items.sort(key=lambda it: (it.entry.envelope.received_at, it.entry.id))
    return items


async def _list(args: argparse.Namespace, store: Store) -> int:
    now = time.time()
    items = await _items(store)
    running = await store.relay_running()
    aside = await store.kept_aside()
    failed, corrupt = aside["failed"], aside["corrupt"]
    held = sum(it.held for it in items)
    data = {"relay_running": running, "messages": [view.item_json(it, now) for it in items],
            "count": len(items), "held": held, "failed": failed, "corrupt": corrupt}
    total = sum(it.entry.size for it in items)
    footer = (f"{len(items)} message(s), {view.size(total)}: {len(items) - held} queued, "
              f"{held} held. Kept aside: {failed} in failed/, {corrupt} in corrupt/. "
              f"Relay {'running' if running else 'not running'}.")
    if not items:
        text = f"Queue is empty. {footer.split('. ', 1)[1]}"
    else:
        width = shutil.get_terminal_size((160, 24)).columns
        text = f"{view.format_list(items, now, width)}\n\n{footer}"
    _emit(args, data, text)
    return 0


async def _show(args: argparse.Namespace, store: Store) -> int:
    directory = Path(store.location)
    queue_id = args.id.strip().upper()
    where = await store.locate(queue_id)
    if where not in ("queue", "hold"):
        raise _Usage(f"{queue_id} is not queued" + (f"; it is in {where}/ ({directory / where})"
                                                   if where else
                                                   " (already delivered or deleted?)"))
    held = where == "hold"
    entry = await store.entry(queue_id, held=held)
    data = await store.read(queue_id, held=held) if entry is not None else None
    if entry is None or data is None:
        raise _Usage(f"{queue_id} vanished or could not be read; try `queue list`")
    if args.raw:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return 0
    item = view.Item(entry, held, not held and await store.is_claimed(queue_id))
    headers = view.header_fields(data)
    now = time.time()
    record = {**view.item_json(item, now), "path": str(directory / where / queue_id),
              "headers": [{"name": n, "value": v} for n, v in headers]}
    _emit(args, record, view.format_show(item, headers, str(directory / where / queue_id), now))
    return 0


async def _summary(args: argparse.Namespace, store: Store) -> int:
    entries = (await store.held_entries() if args.held
               else await store.entries(quarantine=False))
    result = view.shape(entries, time.time(), args.by)
    _emit(args, view.shape_json(result, args.by), view.format_summary(result, args.by))
    return 0


# ---------------------------------------------------------------------- changing


async def _retry(args: argparse.Namespace, store: Store) -> int:
    if args.all == bool(args.ids):
        raise _Usage("give queue ids or --all, not both and not neither", 2)
    ops = _ops(args, store)
    if not args.all:
        return await _report(args, store, [await ops.retry(i.upper()) for i in args.ids])
    # A message in flight is being tried already; waiting for it would only slow this down.
    outcomes = [await ops.retry(e.id, wait=0) for e in await store.entries(quarantine=False)]
    return await _report(args, store, outcomes, notices=[Change("retry", "*")])


async def _change(args: argparse.Namespace, store: Store) -> int:
    ops = _ops(args, store)
    ids = [i.upper() for i in args.ids]
    if getattr(args, "all", False):
        if ids:
            raise _Usage("give queue ids or --all, not both", 2)
        ids = [e.id for e in await store.held_entries()]
    elif not ids:
        raise _Usage("give queue ids, or --all", 2)
    async def bounce(queue_id: str) -> Outcome:
        return await ops.bounce(queue_id, args.reason)

    acts: dict[str, Callable[[str], Awaitable[Outcome]]] = {
        "hold": ops.hold, "release": ops.release, "delete": ops.delete, "bounce": bounce}
    act = acts[args.queue_action]
    return await _report(args, store, [await act(i) for i in ids])


_ALL_DONE = {"retry": "due for delivery now", "release": "released, due for delivery now"}


def _ops(args: argparse.Namespace, store: Store) -> QueueOps:
    def waiting(text: str) -> None:
        print(f"m365relay queue: {text}", file=sys.stderr)
    return QueueOps(store, wait=args.wait, on_wait=waiting, selector=_selector(args))


def _selector(args: argparse.Namespace) -> str:
    """How this command was told which spool, so its hints name the same one."""
    if getattr(args, "spool", None) is not None:
        return f"--spool {shlex.quote(str(args.spool))}"
    if getattr(args, "config", None) is not None:
        return f"--config {shlex.quote(str(args.config))}"
    return ""


async def _report(args: argparse.Namespace, store: Store, outcomes: list[Outcome],
                  notices: list[Change] | None = None) -> int:
    if notices is None:
        notices = [Change(o.action, o.id) for o in outcomes if o.result == "ok"]
    told = bool(notices) and await store.announce(notices)
    running = told or await store.relay_running()
    if not outcomes:
        after = "Nothing to do."
    elif not any(o.result == "ok" for o in outcomes):
        after = ""  # nothing changed, so nothing for the relay to pick up
    elif not running:
        after = "The relay is not running; it applies these changes when it starts."
    elif told:
        after = "The running relay was told."
    elif notices:
        after = ("The running relay did not take the notice; it finds the changes on disk when "
                 "it next starts, and never delivers a held or deleted message meanwhile.")
    else:
        after = ""
    if getattr(args, "all", False):  # one line per message would drown the problems
        lines = [f"{o.id}: {o.detail}" for o in outcomes if not o.ok]
        active = sum(o.result == "in-flight" for o in outcomes)
        lines.append(f"{sum(o.ok for o in outcomes)} message(s) {_ALL_DONE[args.queue_action]}"
                     + (f" ({active} being delivered right now)" if active else "") + ".")
    else:
        lines = [f"{o.id}: {o.detail}" for o in outcomes]
    data = {"relay_running": running,
            "results": [{"id": o.id, "action": o.action, "ok": o.ok, "result": o.result,
                         "detail": o.detail} for o in outcomes]}
    _emit(args, data, "\n".join([*lines, after]).strip())
    if all(o.ok for o in outcomes):
        return 0
    if all(o.ok or o.result == "busy" for o in outcomes):
        return EX_TEMPFAIL
    return 1
