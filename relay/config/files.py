"""How the relay tells that a file the config names has changed since it was read.

Two ways, one each for two questions:

* :func:`stat_stamp`, on every use (a handshake, a token request): a stat, no read. Modification
  time, size and inode together, so a file rewritten in place (an editor) and one replaced by a
  rename (certbot's and cert-manager's renewals, the kubelet's ``..data`` swap) both show.
* :func:`content_digest`, at a reload (SIGHUP): the bytes themselves, so that touching a file
  or copying the same contents again is no change, and a replacement within the file system's
  timestamp granularity is one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

Stamp = tuple[int, int, int]


def stat_stamp(path: Path) -> Stamp:
    """(mtime in ns, size, inode). Raises OSError when the file cannot be stat'ed."""
    st = path.stat()
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def stat_stamps(paths: Iterable[Path]) -> tuple[Stamp | None, ...]:
    """One stamp a path, None for one that cannot be stat'ed (a renewal in progress)."""
    stamps: list[Stamp | None] = []
    for path in paths:
        try:
            stamps.append(stat_stamp(path))
        except OSError:
            stamps.append(None)
    return tuple(stamps)


def content_digest(paths: Iterable[Path | None]) -> bytes:
    """A SHA-256 over the files' contents, in order; a None path and an unreadable file (by
    its errno) count too, so that a file appearing or becoming unreadable is a change."""
    digest = hashlib.sha256()
    for path in paths:
        if path is None:
            digest.update(b"-")
            continue
        try:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        except OSError as exc:
            digest.update(f"unreadable {exc.errno}".encode())
    return digest.digest()
