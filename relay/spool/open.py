"""The store a config names: the file spool of ``spool.directory``, or the cluster queue of
``spool.postgres`` (imported only then, so the file spool needs no database driver)."""

from __future__ import annotations

from relay.config.records import SpoolSettings
from relay.spool.base import SpoolError, Store
from relay.spool.filestore import FileStore

__all__ = ["open_store"]


def open_store(settings: SpoolSettings, *, listen: bool = True) -> Store:
    """``listen``: follow other processes' changes (the relay does; a queue command only
    announces its own)."""
    if settings.directory is not None:
        return FileStore(settings.directory, min_free_bytes=settings.min_free_space,
                         listen=listen)
    try:
        from relay.spool.postgres import PgStore
    except ImportError as exc:
        raise SpoolError(f"spool.postgres needs the PostgreSQL driver ({exc}); install it with "
                         "pip install 'm365relay[postgres]' (the container image has it)"
                         ) from None
    return PgStore(settings, listen=listen)
