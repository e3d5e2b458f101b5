"""A real Docker engine for the image tests: found or started, a local Debian base, the build.

Docker Hub is out of reach on the test machines, so ``python:3.11-slim`` cannot be pulled: the
base is made from Debian's packages (debootstrap from the mirror apt uses, ``docker import``,
then deploy/docker/debian-base.Dockerfile adds python3.11) and kept in the engine between runs.
A dockerd started here keeps its images under /var/lib (the cache) and its socket, pid file
and log under /run; it has no bridge and no iptables rules (the tests use the host network).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE_TAG = "m365relay-base:bookworm"
ROOTFS_TAG = "m365relay-rootfs:bookworm"
IMAGE_TAG = "m365relay:test"
SUITE = "bookworm"
DATA_ROOT = Path("/var/lib/m365relay-test/docker")
RUN_DIR = Path("/run/m365relay-test")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


class EngineUnavailable(Exception):
    """No Docker engine can run here; the text says why."""


@dataclass
class Engine:
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None  # the dockerd we started, if any
    log: Path | None = None
    built: dict[str, float] = field(default_factory=dict)  # step -> seconds

    def run(self, *args: str, timeout: float = 120, check: bool = True,
            input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["docker", *args], env=self.env, capture_output=True,
                                text=input is None, input=input, timeout=timeout, check=False)
        if check and result.returncode != 0:
            out = result.stdout if isinstance(result.stdout, str) else result.stdout.decode()
            err = result.stderr if isinstance(result.stderr, str) else result.stderr.decode()
            raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}:\n"
                                 f"{out}\n{err}")
        return result

    def has_image(self, tag: str) -> bool:
        return self.run("image", "inspect", tag, check=False).returncode == 0

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


def _answers(env: dict[str, str]) -> bool:
    try:
        return subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                              env=env, capture_output=True, timeout=20,
                              check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def find_or_start() -> Engine:
    """The engine DOCKER_HOST (or the default socket) points to, else a dockerd of our own."""
    if shutil.which("docker") is None:
        raise EngineUnavailable("no docker client: scripts/setup installs docker.io")
    env = dict(os.environ, DOCKER_BUILDKIT="0")  # the classic builder: engine 20.10 has it
    if _answers(env):
        return Engine(env)
    ours = dict(env, DOCKER_HOST=f"unix://{RUN_DIR}/docker.sock")
    if _answers(ours):  # another test session started it; it stops it too
        return Engine(ours)
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise EngineUnavailable("no dockerd: scripts/setup installs docker.io")
    if os.geteuid() != 0:
        raise EngineUnavailable("dockerd needs root and none is running for this user")
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    DATA_ROOT.mkdir(parents=True, exist_ok=True)
    log = RUN_DIR / "dockerd.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [dockerd, "--data-root", str(DATA_ROOT), "--exec-root", str(RUN_DIR / "exec"),
             "--pidfile", str(RUN_DIR / "dockerd.pid"), "--host", ours["DOCKER_HOST"],
             "--bridge", "none", "--iptables=false"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    engine = Engine(ours, process, log)
    deadline = time.monotonic() + 60
    while not _answers(ours):
        if process.poll() is not None or time.monotonic() > deadline:
            engine.stop()
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise EngineUnavailable(f"dockerd did not start (log {log}):\n" + "\n".join(tail))
        time.sleep(0.2)
    return engine


def debian_mirror() -> str:
    """The Debian mirror apt already uses for the suite (no host of our own choosing)."""
    if mirror := os.environ.get("DEBIAN_MIRROR"):
        return mirror
    sources = Path("/etc/apt/sources.list.d")
    files = [Path("/etc/apt/sources.list"), *sorted(sources.glob("*.list")),
             *sorted(sources.glob("*.sources"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":  # deb822 stanzas
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"(?m)^(\w[\w-]*):\s*(.*)$", stanza))
                if SUITE in fields.get("Suites", "").split():
                    return fields["URIs"].split()[0]
        for line in text.splitlines():
            words = re.sub(r"\[.*?\]", "", line.split("#")[0]).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                return words[1]
    raise EngineUnavailable(f"apt has no source for Debian {SUITE}; set DEBIAN_MIRROR to a "
                            "Debian mirror URL")


def _slim(rootfs: Path) -> None:
    """What a container never reads: downloaded packages, package lists, docs, translations."""
    for pattern in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*", "usr/share/doc/*",
                    "usr/share/man/*", "usr/share/info/*", "usr/share/locale/*"):
        for path in rootfs.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.name != "lock":
                path.unlink()


def ensure_base(engine: Engine) -> str:
    """m365relay-base:bookworm, made once and then reused from the engine's store."""
    if engine.has_image(BASE_TAG):
        return BASE_TAG
    if shutil.which("debootstrap") is None:
        raise EngineUnavailable("no debootstrap: scripts/setup installs it")
    with tempfile.TemporaryDirectory(prefix="m365relay-base-") as tmp:
        if not engine.has_image(ROOTFS_TAG):
            rootfs = Path(tmp) / "rootfs"
            started = time.monotonic()
            result = subprocess.run(
                ["debootstrap", "--variant=minbase", SUITE, str(rootfs), debian_mirror()],
                capture_output=True, text=True, timeout=1200, check=False)
            if result.returncode != 0:
                raise AssertionError(f"debootstrap failed:\n{result.stdout[-3000:]}"
                                     f"\n{result.stderr[-3000:]}")
            _slim(rootfs)
            tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True,
                                 timeout=600, check=True)
            engine.run("import", "-", ROOTFS_TAG, input=tar.stdout, timeout=600)
            engine.built["debootstrap + import"] = time.monotonic() - started
        context = Path(tmp) / "context"
        context.mkdir()
        shutil.copy(CA_BUNDLE, context / "ca-certificates.crt")
        started = time.monotonic()
        engine.run("build", "--network", "host", "-q", "-t", BASE_TAG,
                   "--build-arg", f"ROOTFS={ROOTFS_TAG}",
                   "-f", str(ROOT / "deploy/docker/debian-base.Dockerfile"), str(context),
                   timeout=1200)
        engine.built["base python3.11"] = time.monotonic() - started
    return BASE_TAG


def pip_build_args() -> list[str]:
    """The host's pip index settings that mean something inside a build (http/https URLs)."""
    result = subprocess.run(["python3", "-m", "pip", "config", "list"], capture_output=True,
                            text=True, timeout=60, check=False)
    settings: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition("=")
        name = key.rpartition(".")[2]
        settings.setdefault(name, value.strip("'\""))
    for name in ("index-url", "extra-index-url", "trusted-host"):
        if env := os.environ.get("PIP_" + name.upper().replace("-", "_")):
            settings[name] = env
    args = []
    for name in ("index-url", "extra-index-url"):
        urls = [u for u in settings.get(name, "").split() if u.startswith(("http:", "https:"))]
        if urls:
            args += ["--build-arg", f"PIP_{name.upper().replace('-', '_')}={' '.join(urls)}"]
    if settings.get("trusted-host"):
        args += ["--build-arg", f"PIP_TRUSTED_HOST={settings['trusted-host']}"]
    return args


def build_image(engine: Engine, base: str) -> str:
    started = time.monotonic()
    args = ["build", "--network", "host", "-q", "-t", IMAGE_TAG, "--build-arg", f"BASE={base}",
            *pip_build_args()]
    if base == BASE_TAG:  # the base carries the host's CA bundle there
        args += ["--build-arg", f"PIP_CERT={CA_BUNDLE}"]
    engine.run(*args, str(ROOT), timeout=1800)
    engine.built["image"] = time.monotonic() - started
    return IMAGE_TAG


def image_size(engine: Engine, tag: str) -> int:
    return int(engine.run("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())


def inspect(engine: Engine, container: str) -> dict[str, object]:
    data = json.loads(engine.run("inspect", container).stdout)
    assert isinstance(data, list)
    found: dict[str, object] = data[0]
    return found
