"""App registrations the sandbox knows, and the Exchange Online constants tokens must carry."""

from __future__ import annotations

from dataclasses import dataclass

from relay.sandbox.federated import FederatedCredential

# What Exchange Online SMTP expects from an app-only token (see MICROSOFT365.md §1).
AUDIENCE = "https://outlook.office365.com"
SCOPE = f"{AUDIENCE}/.default"
SEND_ROLE = "SMTP.SendAsApp"
# Entra also issues tokens whose aud is Exchange Online's first-party app id; accept both.
AUDIENCE_APP_ID = "00000002-0000-0ff1-ce00-000000000000"
# What Microsoft Graph sendMail expects (MICROSOFT365.md §6).
GRAPH_AUDIENCE = "https://graph.microsoft.com"
GRAPH_SCOPE = f"{GRAPH_AUDIENCE}/.default"
GRAPH_SEND_ROLE = "Mail.Send"  # sendMail and messages/{id}/send
GRAPH_DRAFT_ROLE = "Mail.ReadWrite"  # drafts, attachments, upload sessions (large messages)
GRAPH_READ_ROLES = frozenset({"Mail.Read", "Mail.ReadBasic", "Mail.ReadWrite"})


@dataclass(frozen=True)
class SandboxApp:
    """One app registration plus its Exchange Online service principal and mailbox grants."""

    tenant: str  # tenant id or domain, as it appears in the authority path
    client_id: str
    client_secret: str | None = None
    # Public certificate for client-assertion (private_key_jwt) sign-in.
    certificate_pem: bytes | None = None
    # Workload identity federation: trust tokens from this external issuer (no secret at all).
    federated: FederatedCredential | None = None
    roles: tuple[str, ...] = (SEND_ROLE,)
    # Microsoft Graph application permissions (roles of a token for GRAPH_SCOPE): what the
    # README asks for, Mail.ReadWrite included for messages too large for one sendMail.
    graph_roles: tuple[str, ...] = (GRAPH_SEND_ROLE, GRAPH_DRAFT_ROLE)
    # Mailboxes the service principal has FullAccess on; None means any mailbox.
    mailboxes: frozenset[str] | None = None

    def may_use(self, mailbox: str) -> bool:
        if self.mailboxes is None:
            return True
        return mailbox.casefold() in {m.casefold() for m in self.mailboxes}


DEMO_APP = SandboxApp(
    tenant="demo-tenant",
    client_id="11111111-2222-3333-4444-555555555555",
    client_secret="sandbox-demo-secret",  # noqa: S106 - published; only the sandbox accepts it
)
