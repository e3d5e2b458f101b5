"""``python -m bench``: run the scenarios against direct, m365relay and emailproxy, alternating.

Order: for each scenario, for each round, every target once, the order rotated each round
(ABC, BCA, CAB, ...), so a burst of noise from other work on the machine hits all targets alike
and medians over rounds stay comparable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import database, procstat, report
from bench.database import BenchDatabase
from bench.harness import FakesProcess, Run
from bench.scenarios import FULL, select, targets_of
from bench.targets import BENCH_VENV, PG_TARGETS, ROOT, TARGETS

RESULTS = ROOT / "bench" / "results"
README = ROOT / "bench" / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
VENV_PACKAGES = ("emailproxy", "py-spy")


def ensure_venv(profile: bool) -> None:
    """bench/.venv with emailproxy (and py-spy); PyPI is the only thing contacted."""
    python = BENCH_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {BENCH_VENV} (emailproxy from PyPI) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    wanted = ["emailproxy"] + (["py-spy"] if profile else [])
    missing = [p for p in wanted if not (BENCH_VENV / "bin" / p).exists()]  # same names
    if missing:
        subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", *missing], check=True)


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    emailproxy_version = ""
    meta = list((BENCH_VENV / "lib").glob("python*/site-packages/emailproxy-*.dist-info"))
    if meta:
        emailproxy_version = meta[0].name.removesuffix(".dist-info").split("-", 1)[1]
    return {
        "nproc": os.cpu_count(), "cpu_model": model, "ram_gib": round(mem / 2**30, 1),
        "python": platform.python_version(), "kernel": platform.release(),
        "emailproxy": emailproxy_version,
    }


def build_parser() -> argparse.ArgumentParser:
    names = [s.name for s in FULL]
    parser = argparse.ArgumentParser(
        prog="bench/run", description="m365relay benchmark: direct vs m365relay vs emailproxy "
                                      "against the sandbox fakes, on loopback only.")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (100 msgs instead of 1,000, 3 MiB instead of 30 MiB, "
                             "100 idle connections) and 1 round, for iteration")
    parser.add_argument("--rounds", type=int, default=None,
                        help="repetitions of every scenario x target (default 3; 1 with --quick)")
    parser.add_argument("--scenario", action="append", choices=names,
                        help="run only this scenario (repeatable)")
    parser.add_argument("--target", action="append", choices=list(TARGETS),
                        help="run only this target (repeatable); m365relay-pg and "
                             "m365relay-pg2 (cluster mode on a throwaway PostgreSQL) run in "
                             "burst by default and in any load scenario when named here")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write results (default bench/results/{quick,full}.json)")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin processes to CPUs (see bench/README.md)")
    parser.add_argument("--db-cpu", choices=("sut", "load"), default="sut",
                        help="where the PostgreSQL of the cluster targets runs: beside the "
                             "relay on its core (sut: one VM, the default) or with the fakes "
                             "and the load generator (load: as a database on its own host "
                             "takes nothing from the relay's core)")
    parser.add_argument("--profile", action="store_true",
                        help="record a py-spy profile of every m365relay/emailproxy run "
                             "(speedscope JSON next to the run's log); costs CPU, so the "
                             "figures of a profiled run are not for the record")
    parser.add_argument("--no-install", action="store_true",
                        help="do not create bench/.venv; emailproxy runs fail if it is missing")
    parser.add_argument("--update-readme", action="store_true",
                        help="replace the results section of bench/README.md with this run")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (configs, logs, spools) for inspection")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="run nothing: print the tables of an earlier results file (with "
                             "--update-readme, also put them into bench/README.md)")
    return parser


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    scenarios = select(args.scenario, args.quick)
    rounds = args.rounds or (1 if args.quick else 3)
    layout = procstat.plan_layout(pin=not args.no_pin)
    work = Path(tempfile.mkdtemp(prefix="m365relay-bench-"))
    pg_problem = database.available()
    plan = {s.name: targets_of(s, args.target, pg=pg_problem is None) for s in scenarios}
    if pg_problem and not args.target:
        print(f"PostgreSQL targets left out: {pg_problem}", flush=True)
    fakes = await FakesProcess.start(work / "sandbox", layout.fakes)
    procstat.pin_process(os.getpid(), layout.load)
    print(f"process layout: {layout.describe()}", flush=True)
    results: list[dict[str, Any]] = []
    started = time.time()
    load_at_start = os.getloadavg()
    db: BenchDatabase | None = None
    # A SIGTERM (a `timeout`, a CI cancel) unwinds like Ctrl-C, so the finally below still
    # stops the PostgreSQL server, which would otherwise outlive the run.
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        # One server for the whole bench run, a database per run (bench/database.py).
        if any(t in PG_TARGETS for targets in plan.values() for t in targets):
            db_cpus = layout.sut if args.db_cpu == "sut" else layout.load
            db = await asyncio.to_thread(BenchDatabase.start, db_cpus)
        for scenario in scenarios:
            targets = plan[scenario.name]
            for round_no in range(rounds):
                shift = round_no % max(len(targets), 1)
                for target in targets[shift:] + targets[:shift]:
                    run = Run(scenario, target, round_no, fakes=fakes, layout=layout, work=work,
                              profile=args.profile, db=db)
                    result = await run.execute()
                    results.append(result)
                    print(_line(result), flush=True)
    finally:
        await fakes.stop()
        if db is not None:
            await asyncio.to_thread(db.destroy)
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    summary = report.summarize(results)
    return {
        "mode": "quick" if args.quick else "full", "rounds": rounds,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1), "layout": layout.describe(),
        "machine": machine(), "loadavg_at_start": load_at_start,
        "loadavg_at_end": os.getloadavg(),
        "scenarios": {s.name: {"title": s.title, "messages": s.messages, "size": s.size,
                               "clients": s.clients, "per_connection": s.per_connection,
                               "mailboxes": s.mailboxes, "idle_connections": s.idle_connections,
                               "drop": s.drop, "data_432": s.data_432, "auth": s.auth}
                      for s in scenarios},
        "summary": summary, "targets": report.check_targets(summary, results),
        "runs": results,
    }


def _line(result: dict[str, Any]) -> str:
    status = "ok" if result.get("ok") else "FAILED"
    parts = [f"{result['scenario']:>17} {result['target']:>13} round {result['round']}: {status}"]
    for key, fmt in (("msgs_per_s", "{:.1f} msgs/s"), ("ack_p99_ms", "p99 {:.1f} ms"),
                     ("end_s", "wall {:.2f} s"), ("token_requests", "tokens {}"),
                     ("upstream_connections", "upstream {}"),
                     ("idle_connections", "{} idle held"),
                     ("idle_added_bytes", "+{:.1f} MB idle"),
                     ("cold_start_s", "cold {:.2f} s"),
                     ("db_statements_per_msg", "db stmts/msg {:.2f}"),
                     ("db_xacts_per_msg", "db xacts/msg {:.2f}")):
        value = result.get(key)
        if value is not None:
            parts.append(fmt.format(value / 2**20 if key == "idle_added_bytes" else value))
    if not result.get("ok"):
        problems = result.get("error") or result.get("verified", {}).get("problems")
        parts.append(f"-- {problems}")
    return ", ".join(parts)


def _print(data: dict[str, Any]) -> None:
    titles = {name: s["title"] for name, s in data["scenarios"].items()}
    print(report.tables(data["summary"], titles))
    comparison = report.auth_comparison(data["summary"])
    if comparison:
        print(comparison)
    cluster = report.pg_section(data["summary"], data["runs"])
    if cluster:
        print(cluster)
    print("Targets of issue 6 (m365relay):")
    print(report.targets_text(data["targets"]))


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    titles = {name: s["title"] for name, s in data["scenarios"].items()}
    return "\n".join([
        f"Run of {data['started']} ({data['mode']} mode, {data['rounds']} rounds, "
        f"{data['duration_s'] / 60:.0f} min). Machine: {m['nproc']} CPUs ({m['cpu_model']}), "
        f"{m['ram_gib']} GiB RAM, Python {m['python']}, Linux {m['kernel']}; emailproxy "
        f"{m['emailproxy']}. Process layout: {data['layout']}. Load average "
        f"{', '.join(f'{x:.2f}' for x in data['loadavg_at_start'])} at the start, "
        f"{', '.join(f'{x:.2f}' for x in data['loadavg_at_end'])} at the end.",
        "",
        "Cells are the median over rounds with the (min-max) range.",
        "",
        report.tables(data["summary"], titles, markdown=True),
        report.auth_comparison(data["summary"], markdown=True),
        report.pg_section(data["summary"], data["runs"], markdown=True),
        "**Targets of issue 6 (m365relay)**",
        "",
        report.targets_text(data["targets"], markdown=True),
    ])


def update_readme(text: str) -> None:
    readme = README.read_text(encoding="utf-8")
    if START not in readme or END not in readme:
        raise SystemExit(f"{README} has no {START} ... {END} section to replace")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{text}\n{END}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render is not None:
        data = json.loads(args.render.read_text(encoding="utf-8"))
        _print(data)
        if args.update_readme:
            update_readme(markdown(data))
            print(f"updated the results section of {README}")
        return 0
    wants_emailproxy = not args.target or "emailproxy" in args.target
    if not args.no_install and (wants_emailproxy or args.profile):
        ensure_venv(args.profile)
    # 1,000 idle clients need ~3,000 descriptors across the processes; children inherit this.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 16384), hard), hard))
    data = asyncio.run(run_all(args))
    print()
    _print(data)
    path = args.json or RESULTS / f"{data['mode']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    md = markdown(data)
    path.with_suffix(".md").write_text(md, encoding="utf-8")
    print(f"\nresults: {path} and {path.with_suffix('.md')}")
    if args.update_readme:
        update_readme(md)
        print(f"updated the results section of {README}")
    all_verified = all(r.get("verified", {}).get("ok", False) for r in data["runs"])
    return 0 if all_verified and all(r.get("ok") for r in data["runs"]) else 1
