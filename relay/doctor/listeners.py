"""Doctor's view of the listeners' TLS: which certificate each serves and its SHA-256
fingerprint (what an admin compares on a printer's "accept this certificate?" prompt)."""

from __future__ import annotations

import datetime
from pathlib import Path

from relay.config.records import Config, Listener
from relay.doctor.report import Check, Status

WARN_BEFORE = datetime.timedelta(days=14)


def listener_checks(config: Config) -> list[Check]:
    return [_check(listener, config.spool.directory) for listener in config.listeners
            if listener.tls != "none"]


def _check(listener: Listener, state_dir: Path | None) -> Check:
    from relay.ingress import selfsigned

    link = f"listener {listener.name} TLS"
    key = f"listeners[{listener.name}]"
    if listener.certificate is None:
        if state_dir is None:  # cannot happen: cluster mode's config check requires one
            return Check(link, Status.FAIL, summary="No certificate configured.",
                         fix=f"Set `{key}.certificate` and `{key}.private_key`.")
        path = selfsigned.path_for(listener, state_dir)
        names = selfsigned.names_for(listener)
        why = selfsigned.stale(path, names)
        if why is not None and not path.exists():
            return Check(link, Status.OK, detail=f"self-signed certificate for "
                         f"{names.describe()}, made at the relay's next start in {path}")
        if why is not None:
            return Check(link, Status.WARN, detail=f"self-signed {path}",
                         summary=f"{why}; the relay makes a new one at its next start or "
                                 "reload, and devices that pinned the old fingerprint must "
                                 "accept the new one.",
                         fix="Restart or reload the relay (`systemctl reload m365relay`), "
                             "then give devices the new fingerprint, or run doctor as the "
                             "relay's user if the file is only unreadable to you.")
        return _describe(link, key, path, "self-signed certificate")
    from relay.ingress.tls import new_context

    try:
        new_context(listener, listener.certificate, listener.private_key)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        return Check(link, Status.FAIL, detail=f"certificate {listener.certificate}",
                     summary=f"The relay cannot serve this certificate and key: {exc}.",
                     fix=f"Point `{key}.certificate` at the PEM chain and `{key}.private_key` "
                         "at its own key (unencrypted); a key from another certificate shows "
                         "as KEY_VALUES_MISMATCH.")
    return _describe(link, key, listener.certificate, "certificate")


def _describe(link: str, key: str, path: Path, kind: str) -> Check:
    from cryptography import x509

    from relay.ingress.tls import pem_fingerprint

    try:
        data = path.read_bytes()
        cert = x509.load_pem_x509_certificate(data)
        fingerprint = pem_fingerprint(data)
    except (OSError, ValueError) as exc:
        return Check(link, Status.FAIL, detail=f"{kind} {path}",
                     summary=f"The certificate cannot be read: {exc}.",
                     fix=f"Check `{key}.certificate` (a PEM certificate chain) and that the "
                         "relay's user may read it.")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [*san.get_values_for_type(x509.DNSName),
                 *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]
    except x509.ExtensionNotFound:
        names = []
    until = cert.not_valid_after_utc
    detail = (f"{kind} {path}, SHA-256 {fingerprint}, for {', '.join(names) or 'no names'}, "
              f"valid until {until:%Y-%m-%d}")
    left = until - datetime.datetime.now(datetime.UTC)
    if left < datetime.timedelta(0):
        return Check(link, Status.FAIL, detail=detail,
                     summary="The certificate has expired: devices that check it refuse "
                             "STARTTLS.",
                     fix=f"Renew it (`certbot renew`, or your CA), keep `{key}.certificate` "
                         "pointing at it, then `systemctl reload m365relay` (no restart "
                         "needed).")
    if left < WARN_BEFORE:
        return Check(link, Status.WARN, detail=detail,
                     summary=f"The certificate expires in {left.days} day(s).",
                     fix="Renew it, then `systemctl reload m365relay`: new connections get "
                         "the new certificate without a restart.")
    return Check(link, Status.OK, detail=detail)
