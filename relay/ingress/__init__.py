"""Ingress, where a message enters: the device-facing SMTP listener (aiosmtpd), one session per
connection, the DATA reader, and the abuse limits (connection slots, AUTH guessing, log throttling).

A session applies policy (passwords, sender identity, header rewrite), then commits the message to
the spool before answering 250, or hands it to passthrough delivery."""
