"""A local imitation of Exchange Online and its Entra ID token endpoint.

``m365relay sandbox`` runs it for admins trying device settings before Azure is set up;
the tests run it in-process as the upstream, asserting on what it recorded and injecting
faults. Everything is real on the wire: HTTPS and STARTTLS with a throwaway CA, signed
tokens, and XOAUTH2 checked against them.
"""

from relay.sandbox.apps import AUDIENCE, DEMO_APP, SCOPE, SEND_ROLE, SandboxApp
from relay.sandbox.core import Sandbox, run_sandbox
from relay.sandbox.entra import FakeEntra
from relay.sandbox.exchange import FakeExchange, ReceivedMessage

__all__ = [
    "AUDIENCE",
    "DEMO_APP",
    "SCOPE",
    "SEND_ROLE",
    "FakeEntra",
    "FakeExchange",
    "ReceivedMessage",
    "Sandbox",
    "SandboxApp",
    "run_sandbox",
]
