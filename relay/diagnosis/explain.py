"""Turn upstream failures into a retry decision and advice an admin can act on.

Four kinds of failure reach the relay, each explained by its stage's module with its own
declarative table of rules; the first rule that matches decides the :class:`Verdict` and
supplies a one-line summary and a fix, both templates filled with the ids from
:class:`Context`. Adding a code means adding one row:

* :mod:`relay.diagnosis.smtp`: SMTP replies from Exchange Online;
* :mod:`relay.diagnosis.entra`: error bodies from the Entra ID token endpoint;
* :mod:`relay.diagnosis.network`: network and TLS exceptions;
* :mod:`relay.diagnosis.graph`: Microsoft Graph error bodies.

This module is the one entry point the other stages import.
"""

from __future__ import annotations

from relay.diagnosis.advice import Context, Explanation, Verdict
from relay.diagnosis.entra import TOKEN_RULES, explain_token_error
from relay.diagnosis.graph import explain_graph
from relay.diagnosis.network import explain_connection_error
from relay.diagnosis.smtp import SMTP_RULES, explain_smtp

__all__ = [
    "SMTP_RULES",
    "TOKEN_RULES",
    "Context",
    "Explanation",
    "Verdict",
    "explain_connection_error",
    "explain_graph",
    "explain_smtp",
    "explain_token_error",
]
