"""Warn when a file holding a secret can be read by other users of the machine.

Checked: the config file when it holds app credentials inline, secret files named with
``{file: PATH}``, and listener private keys. Group read is fine when the group has at most one
member besides the file's owner, who is then the relay's own user: that is the packaged layout
(``root:m365relay 0640``) and a user's private group; a shared group (``users``) is not.
"""

from __future__ import annotations

import grp
import pwd
import stat
from collections.abc import Iterator
from pathlib import Path

from relay.config.records import Config
from relay.config.values import Secret


def warnings(config: Config, config_path: Path) -> list[str]:
    """One plain sentence per exposed file, with the command that fixes it."""
    out = []
    inline = [key for key, secret in _secrets(config) if secret.source == "inline"]
    who = _other_readers(config_path)
    if inline and who:
        out.append(
            f"{config_path} holds secrets inline ({', '.join(inline)}) and {who} can read it. "
            f"Fix: chmod 600 {config_path} (or 640 with a group only the relay's user is in), "
            "or move each secret to a file readable only by the relay: {file: PATH}.")
    files = [(key, Path(s.source.removeprefix("file:"))) for key, s in _secrets(config)
             if s.source.startswith("file:")]
    files += [(f"listeners[{i}].private_key", lis.private_key)
              for i, lis in enumerate(config.listeners) if lis.private_key is not None]
    files += [(f"apps.{name}.certificate.pfx", app.certificate.pfx)
              for name, app in config.apps.items()
              if app.certificate is not None and app.certificate.pfx is not None]
    seen = set()
    for key, path in files:
        who = _other_readers(path)
        if who and path not in seen:
            seen.add(path)
            out.append(f"{path} ({key}) is a secret and {who} can read it. "
                       f"Fix: chmod 600 {path} (or 640 with a group only the relay's user is in).")
    return out


def _secrets(config: Config) -> Iterator[tuple[str, Secret]]:
    for name, app in config.apps.items():
        if app.client_secret is not None:
            yield f"apps.{name}.client_secret", app.client_secret
        if app.certificate is not None:
            if app.certificate.private_key is not None:
                yield f"apps.{name}.certificate.private_key", app.certificate.private_key
            if app.certificate.passphrase is not None:
                yield f"apps.{name}.certificate.passphrase", app.certificate.passphrase


def _other_readers(path: Path) -> str:
    """Who besides the owner can read ``path`` ("" if nobody, or if it cannot be checked)."""
    try:
        st = path.stat()
    except OSError:
        return ""
    mode = f"mode {stat.S_IMODE(st.st_mode):04o}"
    if st.st_mode & stat.S_IROTH:
        return f"every user ({mode})"
    if st.st_mode & stat.S_IRGRP:
        members = _members(st.st_gid) - {_user(st.st_uid)}
        if len(members) > 1:
            return f"members of group {_group(st.st_gid)} ({', '.join(sorted(members))}; {mode})"
    return ""


def _members(gid: int) -> set[str]:
    try:
        group = grp.getgrgid(gid)
    except KeyError:
        return set()
    # Users whose primary group it is are not listed in gr_mem.
    primary = {u.pw_name for u in pwd.getpwall() if u.pw_gid == gid}
    return set(group.gr_mem) | primary


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
