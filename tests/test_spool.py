"""The durable queue: what is committed comes back intact, survives restarts, and fails safely."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relay.message import BodyCheck, DeliveryState, Envelope, QueueEntry
from relay.spool.store import (
    Spool,
    SpoolCorruptError,
    SpoolError,
    SpoolFullError,
    SpoolMissingError,
    SpoolWriteError,
)

LOGGER = "m365relay.spool"


def make_envelope(**overrides: object) -> Envelope:
    fields: dict[str, object] = {
        "mail_from": "scanner@contoso.example",
        "rcpt_tos": ("alice@contoso.example", "bob@contoso.example"),
        "account": "contoso",
        "app": "relay-app",
        "mailbox": "scanner@contoso.example",
        "bounce_to": "it@contoso.example",
        "client": "192.0.2.10",
        "received_at": 1_700_000_000.25,
        "original_from": "scan@printer.lan",
        "is_dsn": False,
    }
    fields.update(overrides)
    return Envelope(**fields)  # type: ignore[arg-type]


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def spool(spool_dir: Path) -> Spool:
    s = Spool(spool_dir)
    assert s.open() == []
    return s


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------- round trip

CONTENTS = {
    "8bit": b"Subject: caf\xc3\xa9 \xff\xfe\r\n\r\n\x00\x01\x80\x9f binary \xe4\xf6\xfc\r\n",
    "dot-lines": b"Subject: dots\r\n\r\n.\r\n..leading dots\r\n.\r\n. \r\nend\r\n",
    "long-line": b"Subject: long\r\n\r\n" + b"x" * 100_000 + b"\r\n",
    "bare-lf-and-cr": b"Subject: mixed\n\nline\rwith\r\nendings\n",
    "no-final-newline": b"Subject: x\r\n\r\nno newline at end",
    "empty": b"",
    "header-like-body": b"M365RELAY-SPOOL 1\n{\"size\": 3}\n",
}


@pytest.mark.parametrize("name", sorted(CONTENTS))
def test_read_returns_exactly_the_committed_bytes(spool: Spool, name: str) -> None:
    content = CONTENTS[name]
    queue_id = spool.commit(make_envelope(), content)
    assert spool.read(queue_id) == content
    [entry] = spool.entries()
    assert entry.size == len(content)


def test_large_message_round_trips(spool: Spool) -> None:
    content = random.Random(1).randbytes(5 * 1024 * 1024)
    queue_id = spool.commit(make_envelope(), content)
    assert spool.read(queue_id) == content
    # Stored once, after a small header; nothing left behind in tmp/.
    spool_file = spool.directory / "queue" / queue_id
    assert spool_file.read_bytes().endswith(content)
    assert files_in(spool.directory / "tmp") == []


def test_commit_stores_envelope_and_message_in_one_queue_file(spool: Spool) -> None:
    env = make_envelope(rcpt_tos=("ünïcode@example.com", "x@example.com"), is_dsn=True,
                        bounce_to="")
    queue_id = spool.commit(env, b"hello\r\n")
    assert files_in(spool.directory / "queue") == [queue_id]
    assert files_in(spool.directory / "tmp") == []
    [entry] = spool.entries()
    assert entry == QueueEntry(id=queue_id, envelope=env, state=DeliveryState(), size=7)


def test_queue_ids_are_unique_sortable_and_filename_safe(spool: Spool) -> None:
    ids = [spool.commit(make_envelope(), b"m") for _ in range(300)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids), "ids must sort in commit order"
    for queue_id in ids:
        assert re.fullmatch(r"[0-9A-Z]{12,16}", queue_id)


def test_ids_that_could_escape_the_spool_are_refused(spool: Spool) -> None:
    for bad in ("../../etc/passwd", "", "abc", "0123456789ABCDE/"):
        with pytest.raises(SpoolError):
            spool.read(bad)
        with pytest.raises(SpoolError):
            spool.remove(bad)


# ---------------------------------------------------------------------- permissions


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_files_and_directories_are_owner_only_whatever_the_umask(
    tmp_path: Path, umask: int
) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir(mode=0o755)
    (spool_dir / "queue").mkdir(mode=0o777)
    old = os.umask(umask)
    try:
        spool_dir.chmod(0o755)
        (spool_dir / "queue").chmod(0o777)
        spool = Spool(spool_dir)
        spool.open()
        kept = spool.commit(make_envelope(), b"kept")
        spool.save_state(kept, DeliveryState(attempts=1))
        failed = spool.commit(make_envelope(), b"failed")
        spool.fail(failed, "550 5.1.1 no such user")
    finally:
        os.umask(old)

    assert mode(spool_dir) == 0o700
    for sub in ("tmp", "queue", "state", "failed", "corrupt"):
        assert mode(spool_dir / sub) == 0o700, sub
    written = [
        spool_dir / "queue" / kept,
        spool_dir / "state" / f"{kept}.json",
        spool_dir / "failed" / failed,
        spool_dir / "failed" / f"{failed}.reason",
    ]
    for path in written:
        assert mode(path) == 0o600, path


# ---------------------------------------------------------------------- restart


def test_restart_returns_the_same_entries_with_their_state(spool_dir: Path) -> None:
    first = Spool(spool_dir)
    first.open()
    newer = make_envelope(received_at=1_700_000_100.0, rcpt_tos=("a@x.example",))
    older = make_envelope(received_at=1_700_000_000.0, mail_from="other@x.example")
    newer_id = first.commit(newer, b"newer message")
    older_id = first.commit(older, b"older message \xff")
    state = DeliveryState(
        attempts=3,
        next_attempt_at=1_700_000_900.5,
        pending_rcpts=("bob@contoso.example",),
        last_error="451 4.7.500 Server busy",
    )
    first.save_state(older_id, state)
    before = first.entries()

    second = Spool(spool_dir)
    after = second.open()

    assert after == before
    assert [e.id for e in after] == [older_id, newer_id], "oldest received_at first"
    assert after[0].state == state
    assert after[1].state == DeliveryState()
    assert after[0].envelope == older
    assert second.read(older_id) == b"older message \xff"


def test_state_save_replaces_previous_state(spool: Spool) -> None:
    queue_id = spool.commit(make_envelope(), b"m")
    spool.save_state(queue_id, DeliveryState(attempts=1, last_error="first"))
    spool.save_state(queue_id, DeliveryState(attempts=2, pending_rcpts=()))
    [entry] = Spool(spool.directory).open()
    assert entry.state == DeliveryState(attempts=2, pending_rcpts=())
    assert files_in(spool.directory / "tmp") == []


def test_save_state_for_an_unknown_message_is_refused(spool: Spool) -> None:
    queue_id = spool.commit(make_envelope(), b"m")
    spool.remove(queue_id)
    with pytest.raises(SpoolError, match="not queued"):
        spool.save_state(queue_id, DeliveryState(attempts=1))
    assert files_in(spool.directory / "state") == []


def test_unreadable_state_means_deliver_now_and_is_logged(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    queue_id = spool.commit(make_envelope(), b"m")
    spool.save_state(queue_id, DeliveryState(attempts=5, next_attempt_at=9e9))
    state_file = spool.directory / "state" / f"{queue_id}.json"
    state_file.write_bytes(b"{not json")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        [entry] = Spool(spool.directory).open()

    assert entry.state == DeliveryState()
    assert any(str(state_file) in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING)


def test_state_with_wrong_types_means_deliver_now(spool: Spool) -> None:
    queue_id = spool.commit(make_envelope(), b"m")
    (spool.directory / "state" / f"{queue_id}.json").write_text(
        json.dumps({"attempts": "three", "pending_rcpts": [1, 2]})
    )
    [entry] = Spool(spool.directory).open()
    assert entry.state == DeliveryState()


def test_open_removes_state_files_without_a_message(spool: Spool) -> None:
    queue_id = spool.commit(make_envelope(), b"m")
    spool.save_state(queue_id, DeliveryState(attempts=1))
    (spool.directory / "queue" / queue_id).unlink()
    Spool(spool.directory).open()
    assert files_in(spool.directory / "state") == []


def test_open_removes_unacknowledged_tmp_files(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    leftovers = ["0000000000000AAAA", "state.json.1234abcd"]
    for name in leftovers:
        (spool.directory / "tmp" / name).write_bytes(b"half-written")

    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert Spool(spool.directory).open() == []

    assert files_in(spool.directory / "tmp") == []
    logged = " ".join(r.getMessage() for r in caplog.records)
    for name in leftovers:
        assert name in logged


def test_entries_sees_messages_committed_by_another_instance(spool: Spool) -> None:
    other = Spool(spool.directory)
    queue_id = other.commit(make_envelope(), b"m")
    assert [e.id for e in spool.entries()] == [queue_id]


# ---------------------------------------------------------------------- corrupt files


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-5])


def _append(path: Path) -> None:
    with path.open("ab") as f:
        f.write(b"extra")


def _garbage(path: Path) -> None:
    path.write_bytes(random.Random(2).randbytes(4096))


def _bad_magic(path: Path) -> None:
    path.write_bytes(b"SOMETHING-ELSE 9\n" + path.read_bytes().split(b"\n", 1)[1])


def _bad_json(path: Path) -> None:
    magic, _, rest = path.read_bytes().partition(b"\n")
    _, _, body = rest.partition(b"\n")
    path.write_bytes(magic + b"\n{\"size\": 4,\n" + body)


def _missing_field(path: Path) -> None:
    magic, _, rest = path.read_bytes().partition(b"\n")
    line, _, body = rest.partition(b"\n")
    meta = json.loads(line)
    del meta["rcpt_tos"]
    path.write_bytes(magic + b"\n" + json.dumps(meta).encode() + b"\n" + body)


def _header_only(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:10])


DAMAGE: dict[str, Callable[[Path], None]] = {
    "truncated": _truncate,
    "extra-bytes": _append,
    "garbage": _garbage,
    "bad-magic": _bad_magic,
    "bad-json": _bad_json,
    "missing-field": _missing_field,
    "torn-header": _header_only,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_queue_file_is_moved_to_corrupt_and_reported(
    spool: Spool, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    good = spool.commit(make_envelope(), b"good message\r\n")
    bad = spool.commit(make_envelope(), b"message that will be damaged\r\n")
    spool.save_state(bad, DeliveryState(attempts=2))
    queue_file = spool.directory / "queue" / bad
    DAMAGE[damage](queue_file)
    damaged_bytes = queue_file.read_bytes()

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        entries = Spool(spool.directory).open()

    assert [e.id for e in entries] == [good]
    corrupt = spool.directory / "corrupt"
    assert (corrupt / bad).read_bytes() == damaged_bytes, "kept byte for byte, never deleted"
    assert (corrupt / f"{bad}.reason").read_text().strip()
    assert not queue_file.exists()
    assert not (spool.directory / "state" / f"{bad}.json").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(corrupt / bad) in w and bad in w for w in warnings)


def test_stray_files_in_queue_are_moved_aside_not_deleted(spool: Spool) -> None:
    queue_id = spool.commit(make_envelope(), b"m")
    # A well-formed copy under a name that is not a queue id (an admin's backup, say) must
    # not be delivered: the id could not be used to read, remove or fail it.
    copy = (spool.directory / "queue" / queue_id).read_bytes()
    (spool.directory / "queue" / f"{queue_id}.bak").write_bytes(copy)
    (spool.directory / "queue" / "notes.txt").write_bytes(b"someone put this here")

    assert [e.id for e in Spool(spool.directory).open()] == [queue_id]
    assert (spool.directory / "corrupt" / "notes.txt").read_bytes() == b"someone put this here"
    assert (spool.directory / "corrupt" / f"{queue_id}.bak").read_bytes() == copy


def test_second_corrupt_file_with_same_name_does_not_overwrite_the_first(spool: Spool) -> None:
    queue_id = spool.commit(make_envelope(), b"m")
    (spool.directory / "corrupt" / queue_id).write_bytes(b"earlier evidence")
    _garbage(spool.directory / "queue" / queue_id)
    Spool(spool.directory).open()
    assert (spool.directory / "corrupt" / queue_id).read_bytes() == b"earlier evidence"
    assert (spool.directory / "corrupt" / f"{queue_id}.1").exists()


def test_read_refuses_content_changed_after_commit(spool: Spool) -> None:
    content = b"Subject: x\r\n\r\nimportant numbers: 12345\r\n"
    queue_id = spool.commit(make_envelope(), content)
    queue_file = spool.directory / "queue" / queue_id
    data = bytearray(queue_file.read_bytes())
    data[-4] ^= 0x01  # same size, one flipped bit: only the checksum can notice
    queue_file.write_bytes(bytes(data))

    with pytest.raises(SpoolCorruptError) as info:
        spool.read(queue_id)
    # Tells the scheduler to drop the entry rather than retry a message that is gone.
    assert isinstance(info.value, SpoolMissingError)
    assert (spool.directory / "corrupt" / queue_id).read_bytes() == bytes(data)
    assert spool.entries() == []


# ---------------------------------------------------------------------- write failures


def dev_full(path: str, flags: int, mode: int) -> int:
    """Opener seam: create the real tmp file, as a real failure would, but hand back a
    descriptor for /dev/full so the kernel itself answers ENOSPC on write."""
    os.close(os.open(path, flags, mode))
    return os.open("/dev/full", os.O_WRONLY)


def test_enospc_during_write_is_spool_full_and_leaves_nothing(spool: Spool) -> None:
    created: list[str] = []

    def recording_dev_full(path: str, flags: int, mode: int) -> int:
        created.append(path)
        return dev_full(path, flags, mode)

    full = Spool(spool.directory, opener=recording_dev_full)
    with pytest.raises(SpoolFullError, match=r"spool\.directory") as info:
        full.commit(make_envelope(), b"x" * 10_000)

    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENOSPC
    assert created, "the opener seam was used"
    assert files_in(spool.directory / "tmp") == []
    assert files_in(spool.directory / "queue") == []


def test_quota_exceeded_is_spool_full(spool: Spool) -> None:
    def over_quota(path: str, flags: int, mode: int) -> int:
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), path)

    with pytest.raises(SpoolFullError):
        Spool(spool.directory, opener=over_quota).commit(make_envelope(), b"m")
    assert files_in(spool.directory / "queue") == []


def test_other_write_errors_are_spool_write_error_and_leave_nothing(spool: Spool) -> None:
    def read_only(path: str, flags: int, mode: int) -> int:
        # A descriptor we cannot write to: the kernel answers EBADF on write().
        os.close(os.open(path, flags, mode))
        return os.open(path, os.O_RDONLY)

    with pytest.raises(SpoolWriteError, match=r"spool\.directory") as info:
        Spool(spool.directory, opener=read_only).commit(make_envelope(), b"m")

    assert not isinstance(info.value, SpoolFullError)
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.EBADF
    assert files_in(spool.directory / "tmp") == []
    assert files_in(spool.directory / "queue") == []


def test_failed_state_write_keeps_the_previous_state(spool: Spool) -> None:
    queue_id = spool.commit(make_envelope(), b"m")
    spool.save_state(queue_id, DeliveryState(attempts=1, last_error="kept"))

    failing = Spool(spool.directory, opener=dev_full)
    with pytest.raises(SpoolFullError):
        failing.save_state(queue_id, DeliveryState(attempts=2))

    [entry] = spool.entries()
    assert entry.state == DeliveryState(attempts=1, last_error="kept")
    assert files_in(spool.directory / "tmp") == []


def test_min_free_bytes_refuses_before_writing(spool: Spool) -> None:
    st = os.statvfs(spool.directory)
    free = st.f_bavail * st.f_frsize
    strict = Spool(spool.directory, min_free_bytes=free + 1024**3)
    with pytest.raises(SpoolFullError, match="min_free_space"):
        strict.commit(make_envelope(), b"m")
    assert files_in(spool.directory / "tmp") == []
    assert files_in(spool.directory / "queue") == []

    relaxed = Spool(spool.directory, min_free_bytes=1)
    assert relaxed.read(relaxed.commit(make_envelope(), b"m")) == b"m"


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB filesystem; skipped where mounting is not allowed (non-root CI)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True, check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_really_full_filesystem(small_tmpfs: Path) -> None:
    spool = Spool(small_tmpfs / "spool")
    spool.open()
    with pytest.raises(SpoolFullError) as info:
        spool.commit(make_envelope(), b"x" * (8 * 1024 * 1024))
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENOSPC
    assert files_in(spool.directory / "tmp") == []
    assert files_in(spool.directory / "queue") == []
    # The space held by the failed attempt was given back.
    assert spool.read(spool.commit(make_envelope(), b"y" * 1024 * 1024)) == b"y" * 1024 * 1024


def test_min_free_bytes_counts_the_incoming_message(small_tmpfs: Path) -> None:
    spool = Spool(small_tmpfs / "spool", min_free_bytes=1024 * 1024)
    spool.open()
    message = b"z" * (1536 * 1024)
    spool.commit(make_envelope(), message)  # 4 MiB - 1.5 MiB leaves more than the reserve
    with pytest.raises(SpoolFullError, match="min_free_space"):
        spool.commit(make_envelope(), message)  # would leave under 1 MiB
    assert len(spool.entries()) == 1


# ---------------------------------------------------------------------- remove and fail


def test_remove_deletes_message_and_state(spool: Spool) -> None:
    queue_id = spool.commit(make_envelope(), b"m")
    spool.save_state(queue_id, DeliveryState(attempts=1))
    spool.remove(queue_id)
    assert files_in(spool.directory / "queue") == []
    assert files_in(spool.directory / "state") == []
    assert Spool(spool.directory).open() == []
    spool.remove(queue_id)  # already gone is fine: delivery may race with a manual cleanup


def test_fail_moves_message_to_failed_with_reason(spool: Spool) -> None:
    content = b"Subject: scan\r\n\r\n\xffdata\r\n"
    queue_id = spool.commit(make_envelope(), content)
    spool.save_state(queue_id, DeliveryState(attempts=4))
    queue_bytes = (spool.directory / "queue" / queue_id).read_bytes()

    path = spool.fail(queue_id, "550 5.1.1 User unknown\nat alice@contoso.example")

    assert path == spool.directory / "failed" / queue_id
    assert path.read_bytes() == queue_bytes, "envelope and message kept together"
    reason = (spool.directory / "failed" / f"{queue_id}.reason").read_text()
    assert reason.startswith("550 5.1.1 User unknown\nat alice@contoso.example")
    assert queue_id in reason
    assert files_in(spool.directory / "queue") == []
    assert files_in(spool.directory / "state") == []
    assert files_in(spool.directory / "tmp") == []
    assert Spool(spool.directory).open() == []


def test_operations_on_a_message_no_longer_queued_say_so(spool: Spool) -> None:
    queue_id = spool.commit(make_envelope(), b"m")
    spool.remove(queue_id)
    with pytest.raises(SpoolMissingError):
        spool.read(queue_id)
    with pytest.raises(SpoolMissingError):
        spool.save_state(queue_id, DeliveryState(attempts=1))
    with pytest.raises(SpoolMissingError):
        spool.fail(queue_id, "550 5.1.1 gone")


def test_spool_errors_are_os_errors_with_a_readable_message(spool: Spool) -> None:
    # Callers guard disk work with `except OSError`; these must be caught there too.
    with pytest.raises(OSError, match="min_free_space") as info:
        Spool(spool.directory, min_free_bytes=2**62).commit(make_envelope(), b"m")
    assert info.value.errno is None
    assert str(info.value).startswith("spool filesystem at ")


def test_fail_of_unknown_message_is_refused_without_leaving_a_reason(spool: Spool) -> None:
    queue_id = spool.commit(make_envelope(), b"m")
    spool.remove(queue_id)
    with pytest.raises(SpoolError, match="not queued"):
        spool.fail(queue_id, "whatever")
    assert files_in(spool.directory / "failed") == []


def test_envelope_fields_survive_exactly(spool: Spool) -> None:
    env = make_envelope(
        mail_from="",
        rcpt_tos=("a\"quoted\"@example.com", "b@[192.0.2.1]", "日本@example.jp"),
        original_from="with\nnewline@weird",
        received_at=1_700_000_000.123456,
        client="local",
    )
    queue_id = spool.commit(env, b"m")
    [entry] = Spool(spool.directory).open()
    assert entry.envelope == env
    assert entry.id == queue_id


# ---------------------------------------------------------------------- pieces and load


def test_commit_takes_pieces_without_joining_them(spool: Spool) -> None:
    header = b"Received: by relay\r\nSubject: pieces\r\n\r\n"
    body = bytearray(b"line one\r\n.dot\r\n" * 1000)
    queue_id = spool.commit(make_envelope(), (header, memoryview(body)[10:], b"", b"end\r\n"))
    expected = header + bytes(body[10:]) + b"end\r\n"
    assert spool.read(queue_id) == expected  # same size and checksum as one buffer
    [entry] = spool.entries()
    assert entry.size == len(expected)


@pytest.mark.parametrize("inline_limit", [0, 1 << 30], ids=["streamed", "inline"])
def test_load_verifies_and_describes_the_message(spool: Spool, inline_limit: int) -> None:
    content = random.Random(2).randbytes(700_000) + b"\r\nplain\r\n"
    queue_id = spool.commit(make_envelope(), content)
    claim = spool.claim(queue_id)
    assert claim is not None
    with claim:
        message = spool.load(queue_id, claim=claim, inline_limit=inline_limit)
        assert (message.data is None) == (inline_limit == 0)
        assert message.size == len(content)
        assert message.eightbit  # random bytes have some >= 0x80
        assert not message.clean  # and bare CRs and LFs
        assert message.read_at(5, 100) == content[5:105]
        assert message.read_at(len(content) - 3, 100) == content[-3:]
        assert message.read_all() == content
    ascii_crlf = spool.commit(make_envelope(), b"Subject: a\r\n\r\n" + b"text\r\n" * 50_000)
    message = spool.load(ascii_crlf, inline_limit=inline_limit)
    assert (message.eightbit, message.clean) == (False, True)
    message.close()


def test_large_damaged_message_is_refused_before_anything_is_read_for_sending(
        spool: Spool) -> None:
    content = b"Subject: big\r\n\r\n" + b"0123456789abcdef\r\n" * 200_000
    queue_id = spool.commit(make_envelope(), content)
    queue_file = spool.directory / "queue" / queue_id
    data = bytearray(queue_file.read_bytes())
    data[-1_000_000] ^= 0x01  # same size, one flipped bit in the middle
    queue_file.write_bytes(bytes(data))
    with pytest.raises(SpoolCorruptError):
        spool.load(queue_id, inline_limit=1024)
    assert (spool.directory / "corrupt" / queue_id).exists()
    assert spool.entries() == []


def test_body_check_is_the_same_whatever_the_pieces() -> None:
    samples = [b"a\r\nb\r\n", b"a\r\nb", b"a\nb\r\n", b"a\rb\r\n", b"a\r\r\nb\r\n", b"\r\n",
               b"x\r", b"\n", b"caf\xc3\xa9\r\n", b"\r\n\r\n.\r\n"]
    rng = random.Random(3)
    for sample in samples:
        whole = BodyCheck()
        whole.update(sample)
        bare = re.search(rb"\r(?!\n)|(?<!\r)\n", sample) is not None
        assert (whole.clean, whole.eightbit) == (not bare, not sample.isascii()), sample
        for _ in range(20):
            cuts = sorted(rng.sample(range(len(sample) + 1), min(3, len(sample) + 1)))
            split = BodyCheck()
            for start, end in zip([0, *cuts], [*cuts, len(sample)], strict=True):
                split.update(sample[start:end])
            assert (split.clean, split.eightbit) == (whole.clean, whole.eightbit), (sample,
                                                                                    cuts)
