"""The fake Entra's pages for a person: approve a device code, revoke a user's sign-ins.

Real Entra shows https://microsoft.com/devicelogin, where the person types the code from the
device and signs in. The sandbox has no passwords: the form asks for the code and the address
to sign in as, so the README's delegated flow can be tried in a browser, or with curl:

    curl --cacert .demo/sandbox/ca.pem https://localhost:18443/devicelogin \\
         -d user_code=ABCDEFGHI -d user=alice@contoso.example
    curl --cacert .demo/sandbox/ca.pem https://localhost:18443/revoke -d user=alice@contoso.example

Revoking is what a password change or an admin's "Revoke sessions" does to the refresh tokens.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping

from relay.sandbox.delegated import DelegatedGrants

_ADDRESS = re.compile(r"^[^@\s<>\"]+@[^@\s<>\"]+\.[^@\s<>\"]+$")


def _page(title: str, *paragraphs: str, form: str = "") -> str:
    body = "".join(f"<p>{p}</p>\n" for p in paragraphs)
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title} - m365relay "
            f"sandbox</title></head>\n<body>\n<h1>{title}</h1>\n{body}{form}</body></html>\n")


_DEVICE_FORM = """<form method="post" action="/devicelogin">
<p><label>Code shown by `m365relay login`: <input name="user_code" value="{code}"
 autocomplete="off" required></label></p>
<p><label>Sign in as (the account's mailbox): <input name="user" type="email" value="{user}"
 required></label></p>
<p><button type="submit">Sign in and allow</button></p>
</form>
"""
_REVOKE_FORM = """<form method="post" action="/revoke">
<p><label>User whose sign-ins to revoke: <input name="user" type="email" required></label></p>
<p><button type="submit">Revoke sign-ins</button></p>
</form>
"""


def signin_page(grants: DelegatedGrants, name: str, method: str,
                form: Mapping[str, str]) -> tuple[int, str]:
    """(HTTP status, HTML) for GET/POST of /devicelogin or /revoke."""
    user = form.get("user", "").strip()
    if name == "revoke":
        if method != "POST":
            return 200, _page("Revoke sign-ins", "As a password change or an admin's "
                              "revocation does: the relay's stored sign-in stops working and "
                              "mail waits until `m365relay login` is run again.",
                              form=_REVOKE_FORM)
        if not _ADDRESS.match(user):
            return 400, _page("Revoke sign-ins", "Give the user's address.", form=_REVOKE_FORM)
        count = grants.revoke(user)
        return 200, _page("Sign-ins revoked", f"Revoked {count} refresh token(s) of "
                          f"{html.escape(user)}.")
    code = form.get("user_code", "").strip().upper().replace("-", "")
    if method != "POST":
        return 200, _page("Enter code", "Enter the code that `m365relay login` printed, and "
                          "the address to sign in as. (Real Entra asks for the password and "
                          "consent here.)", form=_DEVICE_FORM.format(
                              code=html.escape(code), user=html.escape(user)))
    if not code or not _ADDRESS.match(user):
        return 400, _page("Enter code", "Both the code and an email address are needed.",
                          form=_DEVICE_FORM.format(code=html.escape(code),
                                                   user=html.escape(user)))
    try:
        grants.approve(code, user)
    except KeyError:
        return 400, _page("Enter code", f"The code {html.escape(code)} is not valid: check it, "
                          "or run `m365relay login` again (a code expires after 15 minutes and "
                          "works once).", form=_DEVICE_FORM.format(code="",
                                                                  user=html.escape(user)))
    return 200, _page("You're signed in", f"Signed in as {html.escape(user)}. You can close "
                      "this page: `m365relay login` finishes on its own within a few seconds.")
