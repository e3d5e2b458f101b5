"""A spool written by the release before the layout refactor (tests/fixtures/spool-v0.1/, made
by tests/fixtures/make_spool_v0_1.py with the code of commit 2425be5) is delivered by this one:
the on-disk format did not change, so an upgrade in place loses nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import RelayFactory, wait_until

from relay.sandbox import Sandbox

FIXTURE = Path(__file__).parent / "fixtures" / "spool-v0.1"


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


async def test_a_spool_from_the_previous_release_is_delivered(
        relays: RelayFactory, sandbox: Sandbox, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    shutil.copytree(FIXTURE, spool)
    before = {name: files(spool / name) for name in ("hold", "failed", "corrupt")}
    assert len(files(spool / "queue")) == 3 and all(before.values())
    data = relays.config()
    data["delivery"]["max_age"] = "3650d"  # the fixture's messages arrived in 2025
    relay = await relays.start(data)

    got = await sandbox.exchange.wait_for_messages(3)
    by_subject = {m.data.split(b"Subject: ")[1].split(b"\r\n")[0]: m for m in got}
    assert sorted(by_subject) == [b"fixture deferred", b"fixture queued one",
                                  b"fixture queued two"]
    assert by_subject[b"fixture queued one"].rcpt_tos == ("someone@example.org",)
    assert by_subject[b"fixture queued two"].rcpt_tos == ("one@example.org", "two@example.org")
    # dot-stuffing undone by the fake, 8-bit bytes intact: the body as it was committed
    assert b"\r\n.a line that needs dot-stuffing\r\nGr\xc3\xbc\xc3\x9fe\r\n" in (
        by_subject[b"fixture queued two"].data)
    # The state file said one recipient was already done: only the pending one gets it.
    assert by_subject[b"fixture deferred"].rcpt_tos == ("pending@example.org",)
    assert by_subject[b"fixture deferred"].auth_user == "printers@contoso.example"
    assert by_subject[b"fixture queued one"].auth_user == "scanner@contoso.example"

    await wait_until(lambda: not files(spool / "queue") and not files(spool / "state"))
    # Held, failed and corrupt entries stay exactly where the old release left them.
    assert {name: files(spool / name) for name in before} == before
    assert relay.delivery.counters.delivered == 4 and relay.delivery.counters.bounced == 0
    assert len(sandbox.exchange.messages) == 3
