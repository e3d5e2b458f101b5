"""The spool, the durable mail queue: commit before 250, claim with a lock, load, save delivery
state, remove, hold and release. Today one implementation, the Postfix-like file store."""
