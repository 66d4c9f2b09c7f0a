#!/usr/bin/env python
"""Where a relay pass spends its time: drain a backlog (1 event per run unless
``--events-per-run``) and break each runs_app pass into
its SQL statements (count and time per pass, from Django's query log), its commits and the
rest (Python); the raw relay's passes on the same backlog for comparison.

    DATABASE_URL=postgres://root@127.0.0.1:5432/postgres python bench/profile_drain.py --runs 20000

(Re)creates its own database (``--database-name``, default ``bench_runs_app_profile``). Times are
wall-clock per statement, client side (round trip included); statements are grouped by their
first words.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if p and Path(p).resolve() != HERE]

from bench.run import (  # noqa: E402
    DEFAULT_URL,
    configure_django,
    database_name,
    positive_int,
    recreate_database,
)


def kind(sql: str) -> str:
    """A statement's group: its first words, identifiers kept, literals dropped."""
    text = re.sub(r"\s+", " ", sql).strip()
    text = re.sub(r"'[^']*'", "?", text)
    words = text.split(" ")
    if text.upper().startswith("UPDATE") and "lease_token" in text and "SKIP LOCKED" in text:
        return "claim: UPDATE outbox ... WHERE run_id IN (... FOR UPDATE SKIP LOCKED)"
    if text.startswith("WITH acked AS"):  # before the read's test: it has unnest and LATERAL too
        return "ack: WITH acked AS (UPDATE outbox ...), marked AS (UPDATE event ...)"
    if "unnest" in text and "LATERAL" in text:
        return "read: SELECT ... unnest(...) CROSS JOIN LATERAL (events)"
    return " ".join(words[:6])[:90]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=positive_int, default=20_000)
    parser.add_argument("--events-per-run", type=positive_int, default=1)
    parser.add_argument(
        "--database-name",
        type=database_name,
        default="bench_runs_app_profile",
        help="the database to (re)create (default bench_runs_app_profile, always bench_*)",
    )
    args = parser.parse_args()
    url = recreate_database(os.environ.get("DATABASE_URL") or DEFAULT_URL, args.database_name)
    configure_django(url)
    from django.core.management import call_command
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from bench import app, raw
    from bench.publishers import NoopPublisher

    call_command("migrate", verbosity=0)
    publisher = NoopPublisher()

    def seed() -> None:
        with raw.connect(url) as conn:
            raw.reset(conn)
            raw.seed_outbox(conn, args.runs, args.events_per_run)
            raw.settle(conn)

    # runs_app, pass by pass, every statement captured (Django logs BEGIN and COMMIT too).
    seed()
    connection.ensure_connection()
    per_kind: dict[str, list[float]] = defaultdict(list)
    passes: list[float] = []
    claims: list[float] = []
    plans: list[tuple[int, str]] = []
    expected = -(-args.runs // 100)
    claim_sql = ""

    def explain(sql: str) -> str:
        from django.db import transaction

        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + sql)
            lines = [row[0] for row in cursor.fetchall()]
            transaction.set_rollback(True)
        return "\n".join("      " + line for line in lines)

    while True:
        with CaptureQueriesContext(connection) as queries:
            began = time.perf_counter()
            published = app.drain_pass(publisher)
            elapsed = time.perf_counter() - began
        if not published:
            break
        passes.append(elapsed)
        for query in queries.captured_queries:
            name = kind(query["sql"])
            per_kind[name].append(float(query["time"]))
            if name.startswith("claim"):
                claims.append(float(query["time"]))
                claim_sql = query["sql"]
        if claim_sql and len(passes) in (1, expected * 9 // 10):
            # The next pass's claim, planned and run in a transaction rolled back.
            plans.append((len(passes), explain(claim_sql)))
    count = len(passes)
    total = sum(passes)
    events = args.runs * args.events_per_run
    sql_time = sum(sum(times) for times in per_kind.values())
    print(
        f"runs_app: {args.runs:,} runs x {args.events_per_run} event(s), {count} passes,"
        f" {events / total:,.0f} ev/s"
    )
    print(
        f"  per pass: {total / count * 1000:.2f} ms = SQL and commits"
        f" {sql_time / count * 1000:.2f} ms + Python {(total - sql_time) / count * 1000:.2f} ms"
    )
    edge = max(1, count // 10)
    print(
        f"  first/last tenth of the passes: pass {sum(passes[:edge]) / edge * 1000:.1f} ->"
        f" {sum(passes[-edge:]) / edge * 1000:.1f} ms, claim {sum(claims[:edge]) / edge * 1000:.1f}"
        f" -> {sum(claims[-edge:]) / edge * 1000:.1f} ms"
    )
    print("  statement (per pass: count, mean ms each, ms per pass):")
    for name, times in sorted(per_kind.items(), key=lambda item: -sum(item[1])):
        print(
            f"    {len(times) / count:5.2f} x {sum(times) / len(times) * 1000:7.2f} ms"
            f" = {sum(times) / count * 1000:7.2f} ms  {name}"
        )

    for after, plan in plans:
        print(f"  the claim after {after} pass(es), EXPLAIN ANALYZE (rolled back):\n{plan}")

    # The raw relay on the same backlog: three statements (claim, read, ack), two commits.
    seed()
    with raw.connect(url) as conn:
        raw_passes = []
        while True:
            began = time.perf_counter()
            if not raw.drain_pass(conn, publisher, runs=100, events=100):
                break
            raw_passes.append(time.perf_counter() - began)
    raw_total = sum(raw_passes)
    print(
        f"raw: {len(raw_passes)} passes, {events / raw_total:,.0f} ev/s,"
        f" {raw_total / len(raw_passes) * 1000:.2f} ms per pass"
        f" (first {raw_passes[0] * 1000:.1f} ms, last {raw_passes[-1] * 1000:.1f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
