"""What the kernel says about a process: CPU seconds, RSS, peak RSS; and CPU pinning.

Read straight from /proc so the harness needs nothing beyond the standard library, and so the
numbers mean exactly what `ps` and `top` would show an admin.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of all threads of ``pid`` so far."""
    raw = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    # The command name may contain spaces and parentheses; fields start after the last ")".
    fields = raw.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def rss_bytes(pid: int) -> int:
    return _status_kib(pid, "VmRSS") * 1024


def peak_rss_bytes(pid: int) -> int:
    """VmHWM: the highest RSS since start, or since :func:`reset_peak_rss`."""
    return _status_kib(pid, "VmHWM") * 1024


def reset_peak_rss(pid: int) -> bool:
    """Make VmHWM restart from the current RSS (Linux >= 4.0, same user or root)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5", encoding="ascii")
    except OSError:
        return False
    return True


def threads(pid: int) -> int:
    return _status_kib(pid, "Threads")


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (PostgreSQL's backends and helpers of its postmaster)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text(encoding="ascii", errors="replace")
        except OSError:
            continue  # exited meanwhile
        if int(raw.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


@dataclass(frozen=True)
class Layout:
    """Which CPUs each process of a run may use; empty sets mean "no pinning".

    ``sut`` is the core of the thing that talks TLS + XOAUTH2 to the fake Exchange: the relay
    or emailproxy, or in the direct runs the load generator itself, so every target gets the
    same dedicated core for the path under test. In cluster mode the PostgreSQL server is part
    of the system under test and shares ``sut`` (as the file store's fsyncs, kernel time on the
    relay's core, do); the second relay of ``m365relay-pg2`` runs on ``sut2``.
    """

    fakes: frozenset[int]
    load: frozenset[int]
    sut: frozenset[int]
    sut2: frozenset[int] = frozenset()

    def describe(self) -> str:
        if not self.sut:
            return "not pinned (the scheduler places every process)"
        return (f"fakes on CPU {_cpus(self.fakes)}, load generator on CPU {_cpus(self.load)}, "
                f"system under test on CPU {_cpus(self.sut)} (in direct runs the load "
                f"generator moves to CPU {_cpus(self.sut)}: it is the one doing TLS + XOAUTH2; "
                f"PostgreSQL, when a target needs it, on CPU {_cpus(self.sut)} too, the second "
                f"relay of m365relay-pg2 on CPU {_cpus(self.sut2)})")


def _cpus(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def plan_layout(pin: bool) -> Layout:
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return Layout(frozenset(), frozenset(), frozenset())
    if len(cpus) == 2:
        # Two cores: the fakes and the load generator share one, the SUT gets the other (both
        # relays of a two-node run and their database included: what a second node costs
        # shows up as lost throughput, not as a borrowed core).
        sut = frozenset({cpus[1]})
        return Layout(frozenset({cpus[0]}), frozenset({cpus[0]}), sut, sut)
    sut = frozenset({cpus[1]})
    return Layout(frozenset({cpus[0]}), frozenset({cpus[2]}), sut,
                  frozenset({cpus[3]}) if len(cpus) >= 4 else sut)


def pin_process(pid: int, cpus: frozenset[int]) -> None:
    """Pin every thread of ``pid`` (sched_setaffinity on a pid moves only that thread)."""
    if not cpus:
        return
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError, OSError):
            os.sched_setaffinity(int(task.name), cpus)


def pinned_command(command: list[str], cpus: frozenset[int]) -> list[str]:
    """Prefix ``taskset`` so the process and all its threads start on ``cpus``."""
    if not cpus:
        return command
    return ["taskset", "-c", _cpus(cpus), *command]
