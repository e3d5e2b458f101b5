"""What the setup scripts must grant, per cloud and per kind of app, with the sources.

Evidence labels as in MICROSOFT365.md: [V] read in Microsoft's documentation (the page is named),
[P] partly checked (third-party material quoting Microsoft, or a Microsoft example rather than a
reference), UNVERIFIED: no solid source was found.
"""

from __future__ import annotations

from dataclasses import dataclass

# Well-known first-party appIds of the resource service principals (the same in every tenant).
# Office 365 Exchange Online [V]: Microsoft 365 Enterprise "How to configure Exchange Server
#   on-premises to use Hybrid Modern Authentication" (Get-MgServicePrincipal -Filter "AppId eq
#   '00000002-0000-0ff1-ce00-000000000000'"); the sandbox accepts it as a token audience too.
EXCHANGE_ONLINE_APP_ID = "00000002-0000-0ff1-ce00-000000000000"
# Microsoft Graph [V]: Azure CLI reference "az ad app permission add" ("to get available
#   permissions for Microsoft Graph API, run az ad sp show --id 00000003-0000-0000-c000-...").
MICROSOFT_GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"


@dataclass(frozen=True)
class Cloud:
    # Connect-MgGraph -Environment; Get-MgEnvironment lists Global, USGov, USGovDoD, China [V]
    # (learn.microsoft.com/powershell/module/microsoft.graph.authentication/get-mgenvironment).
    graph_environment: str
    # Connect-ExchangeOnline -ExchangeEnvironmentName [V for GCC High and DoD:
    # MicrosoftDocs/office-docs-powershell app-only-auth-powershell-v2.md; P for O365China and
    # O365Default: Microsoft's connect-to-exchange-online-powershell examples as mirrored].
    exchange_environment: str
    # `az cloud set --name` [P: Maester's Connect-Maester docs pair AzureUSGovernment and
    # AzureChinaCloud with these clouds; `az cloud list` shows the names].
    az_cloud: str


CLOUDS = {
    "global": Cloud("Global", "O365Default", "AzureCloud"),
    "usgov": Cloud("USGov", "O365USGovGCCHigh", "AzureUSGovernment"),
    "usgov-dod": Cloud("USGovDoD", "O365USGovDoD", "AzureUSGovernment"),
    "china": Cloud("China", "O365China", "AzureChinaCloud"),
}


@dataclass(frozen=True)
class Permission:
    resource_app_id: str
    value: str  # looked up on the resource's service principal by value, never by GUID
    resource_name: str


@dataclass(frozen=True)
class Grants:
    """What one app needs in Entra and in Exchange."""

    entra: tuple[Permission, ...]  # application permissions, admin-consented
    exchange_service_principal: bool  # New-ServicePrincipal in Exchange Online
    mailbox_full_access: bool  # Add-MailboxPermission FullAccess per mailbox
    rbac_roles: tuple[str, ...]  # RBAC for Applications roles, scoped to the mailboxes
    hve_allowed_apps: bool  # Add-HVEAppAccess per HVE account
    smtp_auth: bool  # Set-CASMailbox -SmtpClientAuthenticationDisabled $false


def grants(*, transport: str, hve: bool, rbac: bool) -> Grants:
    if hve:
        # HVE: Office 365 Exchange Online application permission Mail.Send with admin consent,
        # and the app on each HVE account's Allowed Apps list [V: "OAuth authentication for
        # high volume emails for Microsoft 365"; Add-HVEAppAccess reference]. HVE accounts are
        # mail users, not mailboxes: no FullAccess, no CAS mailbox.
        return Grants((Permission(EXCHANGE_ONLINE_APP_ID, "Mail.Send", "Office 365 Exchange "
                                  "Online"),), False, False, (), True, False)
    if transport == "graph":
        # Graph sendMail needs Mail.Send; drafts and upload sessions for large mail need
        # Mail.ReadWrite [V: MICROSOFT365.md §6, Graph permission tables]. With RBAC for
        # Applications the Entra grant is left out (it would allow every mailbox) and Exchange
        # roles are scoped instead [P: MICROSOFT365.md §6; role names UNVERIFIED beyond
        # "Application Mail.Send"].
        if rbac:
            return Grants((), True, False, ("Application Mail.Send", "Application Mail.ReadWrite"),
                          False, False)
        return Grants((Permission(MICROSOFT_GRAPH_APP_ID, "Mail.Send", "Microsoft Graph"),
                       Permission(MICROSOFT_GRAPH_APP_ID, "Mail.ReadWrite", "Microsoft Graph")),
                      False, False, (), False, False)
    if rbac:
        # RBAC for Applications: no SMTP.SendAsApp in Entra ("would trigger an unnecessary check
        # for mailbox permissions") [V: smtp-app-rbac-onboarding.md, MICROSOFT365.md §1].
        return Grants((), True, False, ("Application SMTP.SendAsApp",), False, True)
    # The OAuth doc's path [V: how-to-authenticate-an-imap-pop-smtp-application-by-using-oauth].
    return Grants((Permission(EXCHANGE_ONLINE_APP_ID, "SMTP.SendAsApp", "Office 365 Exchange "
                              "Online"),), True, True, (), False, True)
