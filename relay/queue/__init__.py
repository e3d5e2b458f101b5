"""``m365relay queue``: inspect and manage the spool of a running or stopped relay.

Three parts, one per concern:

* :mod:`relay.queue.ops` changes messages (hold, release, delete, retry, bounce), each under
  the message's :meth:`~relay.spool.Spool.claim`, the lock delivery also takes for an attempt;
* :mod:`relay.service.control` tells a running relay what changed (a FIFO in the spool), so
  its in-memory schedule follows at once; a stopped relay finds the changes on disk at start;
* :mod:`relay.queue.view` and :mod:`relay.queue.cli` are the command and its output.
"""
