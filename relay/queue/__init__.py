"""``m365relay queue``: inspect and manage the spool of a running or stopped relay.

Three parts, one per concern:

* :mod:`relay.queue.ops` changes messages (hold, release, delete, retry, bounce), each under
  the message's :meth:`~relay.spool.base.Store.claim`, which delivery also takes per attempt;
* the store's change notification (for files :mod:`relay.spool.notices`, a FIFO in the
  spool) tells a running relay what changed, so its in-memory schedule follows at once; a
  stopped relay finds the changes in the store at start;
* :mod:`relay.queue.view` and :mod:`relay.queue.cli` are the command and its output.
"""
