"""Summaries: medians and ranges over rounds, the issue's targets, a terminal table, Markdown."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from typing import Any

MB = 1024 * 1024

# (key, column title, formatter)
COLUMNS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("msgs_per_s", "msgs/s", lambda v: f"{v:.1f}"),
    ("ack_p50_ms", "ack p50 ms", lambda v: f"{v:.1f}"),
    ("ack_p99_ms", "ack p99 ms", lambda v: f"{v:.1f}"),
    ("end_s", "wall s", lambda v: f"{v:.2f}"),
    ("token_requests", "tokens", lambda v: f"{v:g}"),
    ("upstream_connections", "upstream conns", lambda v: f"{v:g}"),
    ("sut_cpu_s", "SUT CPU s", lambda v: f"{v:.2f}"),
    ("client_cpu_s", "client CPU s", lambda v: f"{v:.2f}"),
    ("sut_peak_rss", "peak RSS MB", lambda v: f"{v / MB:.1f}"),
    ("idle_rss", "idle RSS MB", lambda v: f"{v / MB:.1f}"),
    ("idle_connections", "idle conns held", lambda v: f"{v:g}"),
    ("idle_added_bytes", "+idle conns MB", lambda v: f"{v / MB:.1f}"),
    ("cold_start_s", "cold start s", lambda v: f"{v:.2f}"),
    ("first_delivery_s", "1st delivery s", lambda v: f"{v:.2f}"),
    ("auth_logins", "logins", lambda v: f"{v:g}"),
    ("auth_checks", "argon2 checks", lambda v: f"{v:g}"),
    ("client_login_refused", "logins refused", lambda v: f"{v:g}"),
    ("db_cpu_s", "DB CPU s", lambda v: f"{v:.2f}"),
    ("db_round_trips_per_msg", "DB round trips/msg", lambda v: f"{v:.1f}"),
    ("db_xacts_per_msg", "DB xacts/msg", lambda v: f"{v:.1f}"),
)
_DB = ("db_cpu_s", "db_round_trips_per_msg", "db_xacts_per_msg")
PG_TARGETS = ("m365relay-pg", "m365relay-pg2")
PG_GOAL = 0.8  # the PostgreSQL store on one node against the file store, burst throughput
# Per scenario, the columns worth showing (the rest are in the JSON).
SHOWN = {
    "burst": ("msgs_per_s", "ack_p50_ms", "ack_p99_ms", "token_requests",
              "upstream_connections", "sut_cpu_s", "client_cpu_s", "sut_peak_rss", *_DB),
    "printer": ("msgs_per_s", "ack_p50_ms", "ack_p99_ms", "token_requests",
                "upstream_connections", "sut_cpu_s", "client_cpu_s", "sut_peak_rss", *_DB),
    "large": ("end_s", "ack_p50_ms", "idle_rss", "sut_peak_rss", "sut_cpu_s", "token_requests",
              "upstream_connections"),
    "idle": ("idle_rss", "idle_connections", "idle_added_bytes", "sut_peak_rss", "token_requests",
             "upstream_connections"),
    "faults": ("msgs_per_s", "ack_p50_ms", "ack_p99_ms", "token_requests",
               "upstream_connections", "sut_cpu_s", "sut_peak_rss", *_DB),
    "cold": ("cold_start_s", "first_delivery_s", "sut_peak_rss"),
}
_AUTH_SHOWN = ("msgs_per_s", "ack_p50_ms", "ack_p99_ms", "upstream_connections", "sut_cpu_s",
               "sut_peak_rss", "auth_logins", "auth_checks", "client_login_refused")
SHOWN.update({name: _AUTH_SHOWN for name in ("burst-auth", "printer-auth", "printers-nat-auth")})
# Each AUTH scenario and the network-mapped one of the same shape (issue 14).
AUTH_PAIRS = (("burst", "burst-auth"), ("printer", "printer-auth"))


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{scenario: {target: {metric: {median, min, max, n}, "ok": all ok, "runs": n}}}"""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for result in results:
        slot = out.setdefault(result["scenario"], {}).setdefault(
            result["target"], {"runs": 0, "complete": 0, "ok": True, "errors": [],
                               "_good": {}, "_all": {}})
        slot["runs"] += 1
        good = bool(result.get("ok"))
        slot["complete"] += good
        slot["ok"] = slot["ok"] and good
        if result.get("error"):
            slot["errors"].append(result["error"])
        elif not good:
            slot["errors"].append(_why(result))
        for key, value in result.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                slot["_all"].setdefault(key, []).append(float(value))
                if good:
                    slot["_good"].setdefault(key, []).append(float(value))
    for targets in out.values():
        for slot in targets.values():
            # Figures come from the runs that delivered everything and verified: a fast
            # wrong (or partial) run must not improve a median.
            good_values, all_values = slot.pop("_good"), slot.pop("_all")
            values = good_values if slot["complete"] else all_values
            slot["metrics"] = {k: {"median": statistics.median(v), "min": min(v),
                                   "max": max(v), "n": len(v)} for k, v in values.items()}
    return out


def _why(result: dict[str, Any]) -> str:
    verdict = result.get("verified", {})
    parts = [f"{k} {verdict[k]}" for k in ("lost", "duplicates", "corrupted", "unexpected")
             if verdict.get(k)]
    if result.get("given_up"):
        parts.append(f"{result['given_up']} message(s) refused to the client")
    top = next(iter(result.get("client_errors", {})), "")
    return (f"{result['target']} round {result['round']}: " + ", ".join(parts)
            + (f" (first client error: {top})" if top else ""))


def _cell(metric: dict[str, Any] | None, fmt: Callable[[float], str]) -> str:
    if metric is None:
        return "—"
    if metric["n"] == 1 or metric["min"] == metric["max"]:
        return fmt(metric["median"])
    return f"{fmt(metric['median'])} ({fmt(metric['min'])}-{fmt(metric['max'])})"


def tables(summary: dict[str, dict[str, dict[str, Any]]], titles: dict[str, str],
           markdown: bool = False) -> str:
    parts: list[str] = []
    for scenario, targets in summary.items():
        keys = SHOWN.get(scenario, ("msgs_per_s",))
        if not any(t in PG_TARGETS for t in targets):  # no database: no empty columns
            keys = tuple(k for k in keys if k not in _DB)
        heads = ["target", *(title for key, title, _ in COLUMNS if key in keys), "verified"]
        rows = []
        for target, slot in targets.items():
            metrics = slot["metrics"]
            row = [target]
            for key, _title, fmt in COLUMNS:
                if key in keys:
                    row.append(_cell(metrics.get(key), fmt))
            row.append(f"{'yes' if slot['ok'] else 'NO'} "
                       f"({slot['complete']}/{slot['runs']} runs complete)")
            rows.append(row)
        parts.append(_render(f"{scenario}: {titles.get(scenario, '')}", heads, rows, markdown))
        ratio = ratios(targets)
        if ratio:
            parts.append(ratio + ("\n" if markdown else ""))
        errors = [e for slot in targets.values() for e in slot["errors"]]
        if errors:
            parts.append("incomplete runs (left out of the medians): "
                         + "; ".join(sorted(set(errors)))[:600] + "\n")
    return "\n".join(parts)


def ratios(targets: dict[str, dict[str, Any]]) -> str:
    def median(target: str) -> float | None:
        slot = targets.get(target)
        metric = slot["metrics"].get("msgs_per_s") if slot else None
        return metric["median"] if metric else None

    relay, direct, proxy = median("m365relay"), median("direct"), median("emailproxy")
    out = []
    if relay and direct:
        out.append(f"m365relay/direct = {relay / direct:.2f}x")
    if relay and proxy:
        out.append(f"m365relay/emailproxy = {relay / proxy:.1f}x")
    for pg in PG_TARGETS:
        value = median(pg)
        if relay and value:
            out.append(f"{pg}/m365relay = {value / relay:.2f}x")
    return "throughput (medians): " + ", ".join(out) if out else ""


def auth_comparison(summary: dict[str, dict[str, dict[str, Any]]],
                    markdown: bool = False) -> str:
    """The relay with a login per connection beside the relay mapped by network, same run."""
    heads = ["shape", "msgs/s by network", "msgs/s with AUTH", "AUTH/network",
             "SUT CPU s by network", "SUT CPU s with AUTH", "argon2 checks", "logins refused"]
    rows = []
    for plain, auth in AUTH_PAIRS:
        if plain not in summary or auth not in summary:
            continue
        net = _m(summary, plain, "m365relay", "msgs_per_s")
        with_auth = _m(summary, auth, "m365relay", "msgs_per_s")
        cells = [_fmt(net, "{:.1f}"), _fmt(with_auth, "{:.1f}"),
                 f"{with_auth / net:.2f}x" if net and with_auth else "—",
                 _fmt(_m(summary, plain, "m365relay", "sut_cpu_s"), "{:.2f}"),
                 _fmt(_m(summary, auth, "m365relay", "sut_cpu_s"), "{:.2f}"),
                 _fmt(_m(summary, auth, "m365relay", "auth_checks"), "{:g}"),
                 _fmt(_m(summary, auth, "m365relay", "client_login_refused"), "{:g}")]
        rows.append([plain, *cells])
    if not rows:
        return ""
    return _render("m365relay: login per connection (AUTH) vs mapped by network", heads, rows,
                   markdown)


def pg_section(summary: dict[str, dict[str, dict[str, Any]]], results: list[dict[str, Any]],
               markdown: bool = False) -> str:
    """Cluster mode against the file store of the same run: the throughput goal, ack p99, and
    what each message cost the database (statements per message, from pg_stat_statements)."""
    parts: list[str] = []
    for scenario, targets in summary.items():
        pgs = [t for t in PG_TARGETS if t in targets]
        if not pgs:
            continue
        file_rate = _m(summary, scenario, "m365relay", "msgs_per_s")
        heads = ["target", "msgs/s", f"x file store (goal >= {PG_GOAL:g} on one node)",
                 "ack p50 ms", "ack p99 ms", "relay CPU s", "DB CPU s", "DB round trips/msg",
                 "DB statements/msg", "DB xacts/msg", "WAL KiB/msg", "WAL flushes/msg"]
        rows = []
        for target in ("m365relay", *pgs):
            if target not in targets:
                continue
            rate = _m(summary, scenario, target, "msgs_per_s")
            if target == "m365relay" or rate is None or not file_rate:
                versus = "—" if target != "m365relay" else "1.00x"
            else:
                verdict = ("holds" if rate / file_rate >= PG_GOAL else "MISSED"
                           ) if target == "m365relay-pg" else ""
                versus = f"{rate / file_rate:.2f}x {verdict}".strip()
            rows.append([target, _fmt(rate, "{:.1f}"), versus] + [
                _fmt(_m(summary, scenario, target, key), fmt) for key, fmt in (
                    ("ack_p50_ms", "{:.1f}"), ("ack_p99_ms", "{:.1f}"), ("sut_cpu_s", "{:.2f}"),
                    ("db_cpu_s", "{:.2f}"), ("db_round_trips_per_msg", "{:.2f}"),
                    ("db_statements_per_msg", "{:.2f}"), ("db_xacts_per_msg", "{:.2f}"),
                    ("db_wal_kib_per_msg", "{:.1f}"), ("db_wal_syncs_per_msg", "{:.2f}"))])
        parts.append(_render(f"{scenario}: PostgreSQL queue (cluster mode) against the file "
                             "store, medians over rounds", heads, rows, markdown))
        for target in pgs:
            table = statement_table(results, scenario, target)
            if table:
                parts.append(_render(f"{scenario} {target}: statements per message (median "
                                     "over complete runs; >= 0.01 per message)",
                                     ["statement", "calls/msg", "mean ms"], table, markdown))
    return "\n".join(parts)


def statement_table(results: list[dict[str, Any]], scenario: str, target: str
                    ) -> list[list[str]]:
    runs = [r for r in results if r["scenario"] == scenario and r["target"] == target
            and r.get("ok") and r.get("db_statements")]
    per_msg: dict[str, list[float]] = {}
    mean: dict[str, list[float]] = {}
    for run in runs:
        for item in run["db_statements"]:
            per_msg.setdefault(item["query"], []).append(item["per_msg"])
            mean.setdefault(item["query"], []).append(item["mean_ms"])
    rows = []
    for query, values in per_msg.items():
        # A run in which it never ran counts as 0.
        calls = statistics.median(values + [0.0] * (len(runs) - len(values)))
        if calls >= 0.01:
            rows.append((calls, [query, f"{calls:.2f}",
                                 f"{statistics.median(mean[query]):.3f}"]))
    rows.sort(key=lambda r: -r[0])
    return [row for _, row in rows]


def _fmt(value: float | None, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def _render(title: str, heads: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = [f"**{title}**", "", "| " + " | ".join(heads) + " |",
                 "|" + "|".join("---" for _ in heads) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        return "\n".join(lines) + "\n"
    widths = [max(len(r[i]) for r in [heads, *rows]) for i in range(len(heads))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines) + "\n"


# -- the targets -------------------------------------------------------------------


def _m(summary: dict[str, Any], scenario: str, target: str, key: str,
       stat: str = "median") -> float | None:
    metric = summary.get(scenario, {}).get(target, {}).get("metrics", {}).get(key)
    return None if metric is None else float(metric[stat])


def _all_runs(results: Iterable[dict[str, Any]], target: str) -> list[dict[str, Any]]:
    return [r for r in results if r["target"] == target]


def check_targets(summary: dict[str, Any], results: list[dict[str, Any]]
                  ) -> list[dict[str, Any]]:
    """Each of issue 6's targets: holds, misses, or could not be judged (None)."""
    checks: list[dict[str, Any]] = []

    def add(name: str, holds: bool | None, figure: str) -> None:
        checks.append({"target": name, "holds": holds, "figure": figure})

    def ratio(scenario: str, other: str, need: float, name: str) -> None:
        relay = _m(summary, scenario, "m365relay", "msgs_per_s")
        base = _m(summary, scenario, other, "msgs_per_s")
        if relay is None or not base:
            add(name, None, "not measured")
            return
        add(name, relay / base >= need,
            f"{relay / base:.2f}x ({relay:.1f} vs {base:.1f} msgs/s, medians)")

    ratio("burst", "direct", 1.0, "throughput >= 1.0x direct, 10 msgs/connection")
    ratio("printer", "direct", 2.0, "throughput >= 2x direct, 1 msg/connection")
    ratio("burst", "emailproxy", 5.0, "throughput >= 5x emailproxy, 10 msgs/connection")
    ratio("printer", "emailproxy", 5.0, "throughput >= 5x emailproxy, 1 msg/connection")

    relay_runs = _all_runs(results, "m365relay")
    tokens = [r.get("token_requests") for r in relay_runs if "token_requests" in r]
    add("exactly one token request per app per lifetime",
        bool(tokens) and all(t == 1 for t in tokens),
        f"per run: {sorted(set(tokens))}" if tokens else "not measured")

    clean = [r for r in relay_runs if r["scenario"] not in ("faults",)
             and "upstream_connections_per_mailbox" in r and "messages" in r]
    worst = max((r["upstream_connections_per_mailbox"] for r in clean), default=None)
    add("upstream connections <= 3 per mailbox over a run (fault-free scenarios)",
        None if worst is None else worst <= 3,
        "not measured" if worst is None else f"worst run: {worst:.1f} per mailbox")

    p99 = _m(summary, "burst", "m365relay", "ack_p99_ms")
    add("ack latency p99 <= 50 ms at 10 clients", None if p99 is None else p99 <= 50,
        "not measured" if p99 is None else f"{p99:.1f} ms (median of runs)")

    idle = _m(summary, "large", "m365relay", "idle_rss")
    peak = _m(summary, "large", "m365relay", "sut_peak_rss")
    size = next((r.get("large_size") for r in relay_runs if r.get("large_size")), None)
    if idle is not None and peak is not None and size:
        limit = idle + 1.5 * size
        add("30 MB message: peak RSS <= idle RSS + 1.5 x size", peak <= limit,
            f"peak {peak / MB:.1f} MB vs limit {limit / MB:.1f} MB "
            f"(idle {idle / MB:.1f} MB + 1.5 x {size / MB:.1f} MB)")
    else:
        add("30 MB message: peak RSS <= idle RSS + 1.5 x size", None, "not measured")

    idle_rss = [r["idle_rss"] for r in relay_runs if "idle_rss" in r]
    worst_idle = max(idle_rss, default=None)
    add("idle RSS <= 40 MB", None if worst_idle is None else worst_idle <= 40 * MB,
        "not measured" if worst_idle is None else
        f"worst {worst_idle / MB:.1f} MB after one delivery (median "
        f"{statistics.median(idle_rss) / MB:.1f} MB)")

    added = _m(summary, "idle", "m365relay", "idle_added_bytes")
    count = _m(summary, "idle", "m365relay", "idle_connections")
    add("1,000 idle connections add <= 15 MB",
        None if added is None or count is None or count < 1000 else added <= 15 * MB,
        "not measured" if added is None else
        f"+{added / MB:.1f} MB for {count:.0f} connections (median)")

    fault_runs = [r for r in relay_runs if r["scenario"] == "faults"]
    if fault_runs:
        lost = sum(r.get("verified", {}).get("lost", 0) for r in fault_runs)
        bad = sum(r.get("verified", {}).get("corrupted", 0)
                  + r.get("verified", {}).get("duplicates", 0) for r in fault_runs)
        backlog = sum(r.get("spool_backlog", 0) for r in fault_runs)
        injected = [r.get("faults_injected", {}) for r in fault_runs]
        add("faults: 0 lost, 0 corrupted, every deferred delivered later",
            all(r.get("ok") for r in fault_runs) and not lost and not bad and not backlog,
            f"{len(fault_runs)} runs: lost {lost}, corrupted/duplicated {bad}, left in spool "
            f"{backlog}; injected per run {injected}")
    else:
        add("faults: 0 lost, 0 corrupted, every deferred delivered later", None,
            "not measured")
    return checks


def targets_text(checks: list[dict[str, Any]], markdown: bool = False) -> str:
    def mark(holds: bool | None) -> str:
        return {True: "holds", False: "MISSED", None: "n/a"}[holds]

    if markdown:
        lines = ["| target | result | figure |", "|---|---|---|"]
        lines += [f"| {c['target']} | {mark(c['holds'])} | {c['figure']} |" for c in checks]
        return "\n".join(lines) + "\n"
    return "\n".join(f"  [{mark(c['holds']):>6}] {c['target']}: {c['figure']}" for c in checks)
