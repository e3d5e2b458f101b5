"""``m365relay doctor``: find the first broken link between the config and Exchange Online.

config valid → credential readable → token endpoint reachable → token acquired → token grants
SMTP → upstream reachable → STARTTLS ok → XOAUTH2 accepted → (``--send-to``) test message sent.
Each failure carries the Azure portal step or PowerShell command that fixes it, with the real
ids filled in.

Modules: ``command`` (CLI and :func:`~relay.doctor.command.diagnose`), ``chain`` (the walk),
``credential`` and ``claims`` (local checks), ``listeners`` (the certificate each TLS
listener serves, with its fingerprint), ``report`` (results and their rendering). This
package imports nothing on its own, so ``m365relay --help`` stays fast.
"""
