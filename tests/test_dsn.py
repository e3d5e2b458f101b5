"""Bounces: a well-formed RFC 3464 report a mail client can show and a program can parse."""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage, Message
from email.utils import parsedate_to_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.delivery.dsn import build_dsn
from relay.message import Envelope

ARRIVAL = 1_700_000_000.0
NOW = 1_700_400_000.0

ORIGINAL = (
    b"From: Scanner <scanner@contoso.example>\r\n"
    b"To: alice@contoso.example\r\n"
    b"Subject: Scan from MFP-3F\r\n"
    b"Message-ID: <scan-1@printer.lan>\r\n"
    b"\r\n"
    b"BODY-MARKER this text must not come back in the bounce\r\n"
)


def make_envelope(**overrides: object) -> Envelope:
    fields: dict[str, object] = {
        "mail_from": "scanner@contoso.example",
        "rcpt_tos": ("alice@contoso.example", "bob@contoso.example"),
        "account": "contoso",
        "app": "relay-app",
        "mailbox": "scanner@contoso.example",
        "bounce_to": "it@contoso.example",
        "client": "192.0.2.10",
        "received_at": ARRIVAL,
        "original_from": "scan@printer.lan",
    }
    fields.update(overrides)
    return Envelope(**fields)  # type: ignore[arg-type]


DEFAULT_FAILED = {"alice@contoso.example": "550 5.1.1 User unknown"}


def dsn(
    failed: dict[str, str] | None = None,
    original: bytes = ORIGINAL,
    envelope: Envelope | None = None,
    explanation: str = "",
) -> bytes:
    return build_dsn(
        queue_id="1K0XDPJQ1A6HNX8",
        envelope=envelope or make_envelope(),
        failed=DEFAULT_FAILED if failed is None else failed,
        original=original,
        reporting_mta="relay.contoso.example",
        from_addr="postmaster@contoso.example",
        arrival=ARRIVAL,
        now=NOW,
        explanation=explanation,
    )


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(msg: EmailMessage) -> list[EmailMessage]:
    return list(msg.iter_parts())  # type: ignore[arg-type]


def status_blocks(msg: EmailMessage) -> list[Message]:
    report = parts(msg)[1]
    assert report.get_content_type() == "message/delivery-status"
    blocks = report.get_payload()
    assert isinstance(blocks, list)
    return [b for b in blocks if isinstance(b, Message)]


def assert_transport_safe(data: bytes) -> None:
    """CRLF only, no line over the RFC 5322 limit."""
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


# ---------------------------------------------------------------------- structure


def test_report_structure_and_top_level_headers() -> None:
    data = dsn()
    msg = parse(data)

    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers",
    ]
    assert msg["From"].addresses[0].display_name == "Mail Delivery System"
    assert msg["From"].addresses[0].addr_spec == "postmaster@contoso.example"
    assert msg["To"].addresses[0].addr_spec == "it@contoso.example"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    assert re.fullmatch(r"<[^<>@\s]+@relay\.contoso\.example>", msg["Message-ID"])
    assert not msg.defects
    assert_transport_safe(data)
    assert data.isascii()


def test_message_ids_differ_between_bounces() -> None:
    assert parse(dsn())["Message-ID"] != parse(dsn())["Message-ID"]


def test_per_message_fields() -> None:
    [per_message, *_] = status_blocks(parse(dsn()))
    assert per_message["Reporting-MTA"] == "dns; relay.contoso.example"
    assert per_message["X-M365Relay-Queue-ID"] == "1K0XDPJQ1A6HNX8"
    assert per_message["X-M365Relay-Sender"] == "rfc822; scan@printer.lan"
    assert parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVAL


@pytest.mark.parametrize(
    ("reply", "status", "diagnostic_type"),
    [
        ("550 5.1.1 User unknown", "5.1.1", "smtp"),
        ("554 5.6.211 Invalid MIME Content: Single text value size (32777) exceeded allowed "
         "maximum (32768) for the 'X-Long' header.", "5.6.211", "smtp"),
        ("550-5.7.708 Service unavailable.\r\n550 5.7.708 Access denied, traffic not accepted",
         "5.7.708", "smtp"),
        ("452 4.5.3 Too many recipients", "4.5.3", "smtp"),
        ("554 Transaction failed", "5.0.0", "smtp"),
        ("451 Temporary local problem", "4.0.0", "smtp"),
        ("550 Address 10.5.1.2 is not allowed", "5.0.0", "smtp"),
        ("550 5.1.10.4 looks like an address, not a status", "5.0.0", "smtp"),
        ("5.4.7 message expired after 5 days", "5.4.7", "X-M365Relay"),
        ("connection refused", "5.0.0", "X-M365Relay"),
        ("", "5.0.0", "X-M365Relay"),
    ],
)
def test_status_and_diagnostic_come_from_the_reply(
    reply: str, status: str, diagnostic_type: str
) -> None:
    [_, block] = status_blocks(parse(dsn({"alice@contoso.example": reply})))
    assert block["Final-Recipient"] == "rfc822; alice@contoso.example"
    assert block["Action"] == "failed"
    assert block["Status"] == status
    diagnostic = " ".join(str(block["Diagnostic-Code"]).split())
    assert diagnostic == f"{diagnostic_type}; {' '.join(reply.split())}".rstrip()


def test_one_block_per_recipient_with_its_own_status() -> None:
    failed = {
        "alice@contoso.example": "550 5.1.1 User unknown",
        "bob@contoso.example": "552 5.2.2 Mailbox full",
        "carol@contoso.example": "5.4.7 message expired after 5 days",
    }
    blocks = status_blocks(parse(dsn(failed)))[1:]
    assert [(b["Final-Recipient"], b["Status"]) for b in blocks] == [
        ("rfc822; alice@contoso.example", "5.1.1"),
        ("rfc822; bob@contoso.example", "5.2.2"),
        ("rfc822; carol@contoso.example", "5.4.7"),
    ]


def test_long_diagnostic_is_folded_not_cut() -> None:
    reply = "550 5.7.1 " + " ".join(f"word{i}" for i in range(300))
    data = dsn({"alice@contoso.example": reply})
    [_, block] = status_blocks(parse(data))
    assert " ".join(str(block["Diagnostic-Code"]).split()) == f"smtp; {reply}"
    report = data.split(b"message/delivery-status", 1)[1].split(b"--=_", 1)[0]
    assert max(len(line) for line in report.split(b"\r\n")) <= 78
    assert_transport_safe(data)


def test_non_ascii_recipient_uses_utf8_address_type_and_stays_7bit() -> None:
    data = dsn({"jörg+scans@bücher.example": "550 5.1.1 User unknown"})
    [_, block] = status_blocks(parse(data))
    assert block["Final-Recipient"] == r"utf-8; j\x{F6}rg\x{2B}scans@b\x{FC}cher.example"
    assert data.isascii()
    assert "jörg+scans@bücher.example" in parts(parse(data))[0].get_content()


# ---------------------------------------------------------------------- human text


def test_human_text_says_what_failed_and_why() -> None:
    failed = {
        "alice@contoso.example": "550 5.1.1 User unknown",
        "bob@contoso.example": "552 5.2.2 Mailbox full",
    }
    explanation = "Check the recipient address in the scanner's address book."
    text = parts(parse(dsn(failed, explanation=explanation)))[0].get_content()
    for rcpt, reply in failed.items():
        assert rcpt in text
        assert reply in text
    assert " ".join(explanation.split()) in " ".join(text.split())
    assert "Scan from MFP-3F" in text
    assert "1K0XDPJQ1A6HNX8" in text


def test_without_explanation_no_stray_paragraph() -> None:
    with_text = parts(parse(dsn(explanation="EXPLAINED-HERE")))[0].get_content()
    without = parts(parse(dsn()))[0].get_content()
    assert "EXPLAINED-HERE" in with_text
    assert "EXPLAINED-HERE" not in without


# ---------------------------------------------------------------------- original headers


def test_original_headers_are_returned_but_not_the_body() -> None:
    data = dsn()
    headers = parts(parse(data))[2].get_content()
    assert "Subject: Scan from MFP-3F" in headers
    assert "Message-ID: <scan-1@printer.lan>" in headers
    assert b"BODY-MARKER" not in data


def test_large_original_gives_a_small_bounce() -> None:
    original = ORIGINAL + b"A" * (5 * 1024 * 1024)
    assert len(dsn(original=original)) < 16 * 1024


def test_original_without_blank_line_is_capped() -> None:
    original = b"Subject: no body separator\r\n" + b"X-Filler: yyyy\r\n" * 50_000
    data = dsn(original=original)
    assert len(data) < 200 * 1024
    headers = parts(parse(data))[2].get_content()
    assert headers.startswith("Subject: no body separator")
    assert "cut short" in parts(parse(data))[0].get_content()


def test_8bit_headers_do_not_break_the_bounce() -> None:
    original = (
        b"From: Sc\xe4nner <scanner@contoso.example>\r\n"  # Latin-1, not UTF-8
        b"Subject: Rechnung f\xc3\xbcr M\xc3\xa4rz\r\n"  # raw UTF-8
        b"X-Broken: \xff\xfe\x00\x80\r\n"
        b"\r\n"
        b"body \xff\r\n"
    )
    data = dsn(original=original)
    assert data.isascii(), "8-bit content is transfer-encoded, so any relay can carry it"
    assert_transport_safe(data)
    msg = parse(data)
    headers_part = parts(msg)[2]
    assert headers_part["Content-Transfer-Encoding"] == "quoted-printable"
    raw = headers_part.get_payload(decode=True)
    assert isinstance(raw, bytes)
    assert raw.rstrip(b"\r\n") == original.split(b"\r\n\r\n")[0], "exact bytes survive"
    assert "Rechnung für März" in headers_part.get_content()
    assert "Rechnung für März" in parts(msg)[0].get_content()


@pytest.mark.parametrize(
    "original",
    [
        b"",
        b"\r\njust a body, no headers\r\n",
        b"not a header line at all\r\nneither: is this?\r\n\r\nbody",
        b"Subject: =?utf-8?q?broken=ZZ?=\r\nSubject: second\r\n\r\n",
        b"Subject: bare\rCR\nand LF\n\nbody",
        b"X-Long: " + b"x" * 5000 + b"\r\n\r\nbody",
        b"\x00\x01\x02\x03\r\n\r\n",
    ],
)
def test_malformed_originals_still_give_a_parseable_bounce(original: bytes) -> None:
    data = dsn(original=original)
    assert_transport_safe(data)
    msg = parse(data)
    assert [p.get_content_type() for p in parts(msg)][1] == "message/delivery-status"
    assert status_blocks(msg)[1]["Status"] == "5.1.1"


@settings(max_examples=150, deadline=None)
@given(
    original=st.binary(max_size=3000),
    reply=st.text(max_size=300),
    rcpt=st.text(min_size=1, max_size=60),
    explanation=st.text(max_size=300),
)
def test_any_input_gives_a_well_formed_bounce(
    original: bytes, reply: str, rcpt: str, explanation: str
) -> None:
    data = dsn({rcpt: reply}, original=original, explanation=explanation)
    assert data.isascii()
    assert_transport_safe(data)
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    blocks = status_blocks(msg)
    assert len(blocks) == 2
    assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", blocks[1]["Status"])


# ---------------------------------------------------------------------- safety


def test_addresses_cannot_inject_header_fields() -> None:
    env = make_envelope(bounce_to="it@contoso.example\r\nBcc: victim@evil.example")
    msg = parse(dsn(envelope=env))
    assert msg["Bcc"] is None
    assert "victim@evil.example" not in str(msg.get_all("Bcc") or "")


def test_no_dsn_for_messages_without_a_bounce_address() -> None:
    with pytest.raises(ValueError, match="no bounce address"):
        dsn(envelope=make_envelope(bounce_to=""))


def test_no_dsn_without_failed_recipients() -> None:
    with pytest.raises(ValueError, match="failed recipient"):
        dsn({})
