"""Policy, what a device may do: local passwords (argon2), whom an account may send as and to,
and the header changes made at submission. Decisions on config records; no network, no spool."""
