"""Ingress, where a message enters: the device-facing SMTP listener (aiosmtpd), one session per
connection (``session``, its AUTH in ``smtpauth``, the peer's address in ``peers``), the
DATA reader, the device quirks accepted as Postfix accepts them (``compat``), the
abuse limits (connection slots, AUTH guessing and its credential cache, log throttling), the
listeners' TLS (``tls``: versions, certificates reloaded on SIGHUP) and the self-signed
certificate a TLS listener without one makes (``selfsigned``).

A session applies policy (passwords, sender identity, header rewrite), then commits the message to
the spool before answering 250, or hands it to passthrough delivery."""
