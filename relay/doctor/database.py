"""doctor's look at the cluster queue's database (``spool.postgres``): reachable, over TLS, a
primary, the schema this relay needs, and the rights it uses; each problem with its fix (the
same words as ``m365relay db status``, :mod:`relay.spool.pgcheck`)."""

from __future__ import annotations

from relay.config.records import Config
from relay.doctor.report import Check, Status
from relay.spool import pgcheck

LINK = "queue database"


async def database_checks(config: Config) -> list[Check]:
    dsn = config.spool.postgres
    if dsn is None:
        return []
    try:
        report = await pgcheck.inspect(dsn)
    except Exception as exc:
        what, fix = pgcheck.explain(exc, dsn)
        return [Check(LINK, Status.FAIL, detail=dsn.shown,
                      summary=f"The relay cannot reach its queue: {what}. Mail would get 451.",
                      fix=fix)]
    detail = (f"{dsn.shown} as {report.user}: PostgreSQL {report.server}, "
              f"{'primary' if report.primary else 'standby'}, "
              f"{report.tls or 'not encrypted'}, schema {report.version}/{report.latest}")
    found = pgcheck.problems(report, dsn)
    if not found:
        return [Check(LINK, Status.OK, detail=detail)]
    # Unencrypted or unverified TLS works; the rest stops mail.
    serious = [p for p in found if "encrypt" not in p[0]]
    return [Check(LINK, Status.FAIL if serious else Status.WARN, detail=detail,
                  summary="; ".join(w for w, _ in found).capitalize() + ".",
                  fix=" Then ".join(f for _, f in found) + ".")]
