"""A throwaway PostgreSQL server for the cluster-mode tests: Debian's ``postgresql`` binaries,
``initdb`` into a fresh directory, listening on a Unix socket in that directory and on a free
port on 127.0.0.1. Real, never mocked.

``initdb`` and ``postgres`` refuse to run as root, and CI runs as root: then the server runs as
the unprivileged user ``m365relay-pg`` that ``scripts/setup`` creates. Its directory lives under
/tmp (not pytest's 0700 tmp tree, which that user could not enter).

It speaks TLS too (``ssl = on``, a certificate for 127.0.0.1 and localhost from a test CA,
:attr:`PgServer.ca_file`), so ``sslmode=verify-full`` is tested against a real server.

One server serves a whole test session; each test gets a database of its own
(:meth:`PgServer.new_database`), so tests never see each other's rows.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import trustme

USER = "m365relay-pg"


def _bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def available() -> str | None:
    """None, or why no server can run here (what scripts/setup would install)."""
    if _bindir() is None:
        return "PostgreSQL is not installed (scripts/setup installs Debian's postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(USER)
        except KeyError:
            return f"running as root and user {USER} does not exist (scripts/setup creates it)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    def __init__(self) -> None:
        bindir = _bindir()
        assert bindir is not None, available()
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="m365relay-pg-", dir="/tmp"))
        # The server's user must reach its directory; nothing secret lives there.
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self.socket_dir = self.root / "run"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self._as: dict[str, object] = {}
        if os.geteuid() == 0:
            entry = pwd.getpwnam(USER)
            self._as = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
            for path in (self.root,):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run(self.root, [str(self.bindir / "initdb"), "-D", str(self.data), "-U",
                              "postgres", "--auth=trust", "-E", "UTF8", "--no-locale",
                              "--no-sync"])
        self._run(self.root, ["mkdir", "-p", str(self.socket_dir)])
        self.ca = trustme.CA()
        self.ca_file = self.root / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        cert.cert_chain_pems[0].write_to_path(str(self.data / "server.crt"))
        cert.private_key_pem.write_to_path(str(self.data / "server.key"))
        (self.data / "server.key").chmod(0o600)  # or postgres refuses to start
        if self._as:
            for name in ("server.crt", "server.key"):
                os.chown(self.data / name, int(self._as["user"]),  # type: ignore[call-overload]
                         int(self._as["group"]))  # type: ignore[call-overload]
        conf = self.data / "postgresql.conf"
        with conf.open("a") as f:
            f.write("ssl = on\n")
            # Durable as in production (fsync on), but small and quick to start.
            f.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                    f"unix_socket_directories = '{self.socket_dir}'\n"
                    "max_connections = 200\nshared_buffers = 32MB\n"
                    "log_min_messages = warning\nlog_connections = off\n")
        self.started = False
        self._dbs = 0

    def _run(self, cwd: Path, argv: list[str]) -> None:
        out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False,
                             timeout=120, **self._as)  # type: ignore[call-overload]
        if out.returncode:
            raise RuntimeError(f"{argv[0]} failed ({out.returncode}):\n{out.stdout}{out.stderr}")

    # --- lifecycle

    def start(self) -> None:
        self._run(self.root, [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l",
                              str(self.log), "-w", "-t", "60", "start"])
        self.started = True

    def stop(self, mode: str = "fast") -> None:
        """``fast``: as a failover or a restart does (connections cut); ``immediate``: as a
        crash of the database host."""
        if self.started:
            self._run(self.root, [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m",
                                  mode, "-w", "-t", "60", "stop"])
            self.started = False

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    # --- databases

    def dsn(self, dbname: str = "postgres", *, user: str = "postgres", tcp: bool = True) -> str:
        if tcp:
            return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"
        return f"postgresql://{user}@/{dbname}?host={self.socket_dir}&port={self.port}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        out = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", dbname,
             "-c", sql], capture_output=True, text=True, check=False, timeout=60)
        if out.returncode:
            raise RuntimeError(f"psql failed: {out.stderr}")
        return out.stdout.strip()

    def new_database(self, prefix: str = "t") -> str:
        self._dbs += 1
        name = f"{prefix}_{os.getpid()}_{self._dbs}_{int(time.time() * 1000) % 100000}"
        self.psql(f'CREATE DATABASE "{name}"')
        return name
