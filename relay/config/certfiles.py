"""A listener's ``certificate``/``private_key`` pair checked at load (ssl only), so that
``check-config`` and a SIGHUP report an unusable pair by key path instead of the start failing."""

from __future__ import annotations

import ssl
from pathlib import Path


def check_pair(certfile: Path, keyfile: Path) -> None:
    """Raise ValueError saying why this certificate and key cannot be served."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(certfile), str(keyfile), password=no_passphrase)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ValueError("`private_key` is not the key of `certificate` "
                             f"(KEY_VALUES_MISMATCH): {keyfile} belongs to another "
                             "certificate; after a renewal, point both at the new pair") from None
        raise ValueError(f"`certificate` and `private_key` cannot be used: {exc.reason or exc}; "
                         "they must be PEM (a certificate chain, and its key)") from None
    except OSError as exc:
        raise ValueError(f"cannot read `certificate` or `private_key`: {exc.strerror or exc}"
                         ) from None


def no_passphrase() -> str:
    """The ``password`` callback for ``load_cert_chain``: without one OpenSSL would prompt on
    the terminal, and a relay started by hand would hang at start, or on SIGHUP with its event
    loop stopped."""
    raise ValueError("the private key is encrypted with a passphrase; the relay starts "
                     "unattended, so keep it decrypted and readable by the relay's user only "
                     "(`openssl pkey -in KEY -out KEY.plain`, mode 0600)")
