"""Sender and recipient policy of an account: who it may send as, whom it may send to.

Patterns are full addresses or ``*@domain`` (that domain only, not its subdomains), compared
case-insensitively. The *sending identity* is the address the message goes out as: the
account's ``mailbox``, or an allowed sender; with ``send_as: authenticate`` the relay signs in to
Exchange Online as that address (its own Sent Items, no SendAs grant needed), with
``send_as: sendas`` it signs in as ``mailbox`` and relies on a SendAs grant.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from relay.config.records import Account


def matches(address: str, patterns: Iterable[str]) -> bool:
    address = address.casefold()
    domain = address.rpartition("@")[2]
    for raw in patterns:
        pattern = raw.casefold()
        if pattern == address or (pattern.startswith("*@") and pattern[2:] == domain):
            return True
    return False


def may_send_as(account: Account, address: str) -> bool:
    """The account's own mailbox, or an address its ``allowed_from`` lists."""
    return (address.casefold() == str(account.mailbox).casefold()
            or matches(address, account.allowed_from))


def may_send_to(account: Account, address: str) -> bool:
    return not account.allowed_recipients or matches(address, account.allowed_recipients)


def sender_refusal(account: Account, address: str, what: str) -> str | None:
    """The 550 for a sender ``enforce``/``allow`` refuses, or None."""
    if account.from_ == "rewrite" or may_send_as(account, address):
        return None
    also = " or an address in accounts[].allowed_from" if account.from_ == "allow" or \
        account.allowed_from else " (add it to accounts[].allowed_from to allow it)"
    return (f"550 5.7.1 {what} <{address}> refused: account {account.name} may only send as "
            f"<{account.mailbox}>{also} (from: {account.from_})")


def recipient_refusal(account: Account, address: str) -> str | None:
    if may_send_to(account, address):
        return None
    return (f"550 5.7.1 Recipient <{address}> not allowed for account {account.name} "
            "(accounts[].allowed_recipients)")


@dataclass(frozen=True)
class Identity:
    sender: str  # the From the message goes out with
    keep_from: bool  # False: the From header is rewritten to ``sender`` (the mailbox)
    mailbox: str  # the mailbox to sign in to Exchange Online as
    mail_from: str  # the envelope sender upstream (Exchange wants the signed-in mailbox)


def sending_identity(account: Account, header_from: str | None, envelope_from: str) -> Identity:
    """Who the message goes out as, after the account's ``from`` policy has admitted it."""
    wanted = header_from or envelope_from
    if wanted and may_send_as(account, wanted):
        sender, keep = wanted, True
    else:  # rewrite (enforce/allow refused it before we get here)
        sender, keep = str(account.mailbox), False
    if sender.casefold() == str(account.mailbox).casefold():
        sender = str(account.mailbox)
    mailbox = sender if account.send_as == "authenticate" else str(account.mailbox)
    return Identity(sender=sender, keep_from=keep, mailbox=mailbox, mail_from=mailbox)
