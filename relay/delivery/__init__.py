"""Delivery, from the spool to Exchange Online: lanes per (app, mailbox), retries and bounces
(DSNs), pacing within Exchange Online's limits, passthrough (the client waits for the verdict), and
the event counts the status page and ``/metrics`` show."""
