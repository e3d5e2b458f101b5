"""The optional HTTP endpoint: ``/healthz``, ``/readyz``, ``/metrics`` and the status page ``/``,
read from the running relay's bookkeeping."""
