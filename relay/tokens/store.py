"""Encrypted, owner-only files holding one account's msal token cache each.

The cache holds a refresh token that can send mail as the person for up to 90 days, so it
never goes into the YAML config, is Fernet-encrypted (AES-128-CBC + HMAC-SHA256) with a key
from the environment or a key file, and is replaced atomically (write, fsync, rename) so a
crash mid-write leaves the old sign-in intact.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def new_key() -> str:
    return Fernet.generate_key().decode("ascii")


class TokenStoreError(ValueError):
    """The store cannot be read or written; the message says what to do."""


def _bare_login(account: str) -> str:
    return f"m365relay login {account}"


class Sealer:
    """Fernet with ``token_store.key``: what the files and the cluster's database rows hold."""

    def __init__(self, key: str, *, login: Callable[[str], str] = _bare_login) -> None:
        self._login = login
        try:
            self._fernet = Fernet(key.strip().encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raise TokenStoreError(
                "token_store.key is not a Fernet key (32 bytes, url-safe base64); create one "
                "with `m365relay login --new-key`") from None

    def seal(self, text: str) -> bytes:
        return self._fernet.encrypt(text.encode("utf-8"))

    def unseal(self, blob: bytes, account: str, where: str) -> str:
        try:
            return self._fernet.decrypt(blob).decode("utf-8")
        except InvalidToken:
            raise TokenStoreError(
                f"{where} does not decrypt with token_store.key (the key changed, or nodes "
                f"have different keys?); run `{self._login(account)}` again") from None


class TokenStore:
    def __init__(self, directory: Path, key: str, *,
                 login: Callable[[str], str] = _bare_login) -> None:
        """``login``: the sign-in command for an account, with the config in use."""
        self.directory = directory
        self.sealer = Sealer(key, login=login)

    def path(self, account: str) -> Path:
        return self.directory / f"{_SAFE.sub('_', account)}.token"

    def mtime(self, account: str) -> int | None:
        try:
            return self.path(account).stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def load(self, account: str) -> str | None:
        try:
            blob = self.path(account).read_bytes()
        except FileNotFoundError:
            return None
        return self.sealer.unseal(blob, account, str(self.path(account)))

    def save(self, account: str, text: str) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = self.path(account)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.directory)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(self.sealer.seal(text))
                out.flush()
                os.fsync(out.fileno())
            Path(tmp).replace(target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
