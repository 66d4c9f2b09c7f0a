"""Plan-proof claims and reads (PostgreSQL): on tables without statistics (as freshly migrated
and seeded, before any ANALYZE) the claim and the read use the same plans as with statistics,
never scan a table, and touch a number of rows set by the claim, not by the tables' size."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from runs_app import relay
from runs_app.db import table
from runs_app.models import Run, RunEvent, RunOutbox, RunState
from runs_app.relay import claim, lease, read
from runs_app.testing import MemoryPublisher
from tests.relay_helpers import seed_runs

pytestmark = [pytest.mark.postgresql, pytest.mark.django_db]

LIMIT = 50
TABLES = (Run, RunState, RunOutbox, RunEvent)


def forget_statistics() -> None:
    """Back to "never analyzed": no column statistics, unknown row counts (PostgreSQL 14+ reads
    reltuples = -1 so), as a freshly migrated and seeded database is. Rolled back with the test."""
    names = [model._meta.db_table for model in TABLES]
    with connection.cursor() as cursor:
        cursor.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        if not cursor.fetchone()[0]:
            return  # not allowed: the tables are then as fresh as this test database is
        cursor.execute(
            "DELETE FROM pg_statistic WHERE starelid IN"
            " (SELECT oid FROM pg_class WHERE relname = ANY(%s))",
            [names],
        )
        cursor.execute(
            "UPDATE pg_class SET reltuples = -1, relpages = 0, relallvisible = 0"
            " WHERE oid IN (SELECT oid FROM pg_class WHERE relname = ANY(%s)"
            " UNION SELECT indexrelid FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid"
            " WHERE c.relname = ANY(%s))",
            [names, names],
        )


def analyze() -> None:
    with connection.cursor() as cursor:
        for model in TABLES:
            cursor.execute(f"ANALYZE {table(model)}")


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def explain(sql: str, params: list[Any]) -> tuple[list[tuple[str, str]], int]:
    """The plan's (node type, relation or index) list and the table rows its scans touched
    (returned plus removed by a filter or a recheck, times loops). A bitmap scan's rows are
    counted once, at its heap scan: its index scan's are the same rows. Run for real
    (ANALYZE) and rolled back."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", params)
        (document,) = cursor.fetchone()
        transaction.set_rollback(True)
    plan = document[0]["Plan"] if isinstance(document, list) else document
    shape: list[tuple[str, str]] = []
    touched = 0
    for node in nodes(plan):
        kind = node["Node Type"]
        target = node.get("Index Name") or node.get("Relation Name") or ""
        shape.append((kind, target))
        if "Scan" in kind and target and kind != "Bitmap Index Scan":
            removed = node.get("Rows Removed by Filter", 0)
            removed += node.get("Rows Removed by Index Recheck", 0)
            touched += (node.get("Actual Rows", 0) + removed) * node.get("Actual Loops", 1)
    return shape, touched


def accesses(shape: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """How a plan reaches the tables: each index it walks (by an index scan, an index-only
    scan or a bitmap: the same entries, fetched in another order) and each table it scans
    whole. Which of those the planner picks for an index depends on its row estimates, which
    differ with and without statistics; the rows touched are bounded apart."""
    found: set[tuple[str, str]] = set()
    for kind, target in shape:
        if kind in ("Index Scan", "Index Only Scan", "Bitmap Index Scan"):
            found.add(("index", target))
        elif kind == "Seq Scan":
            found.add(("scan", target))
    return found


def claim_sql() -> tuple[str, list[Any]]:
    return claim._claim_postgresql(LIMIT, None, ("", False), True)


def read_sql(runs: list[tuple[str, int]]) -> tuple[str, list[Any]]:
    return read.read_postgresql_query(runs, 100, 32 * 1024 * 1024)


def seed() -> list[tuple[str, int]]:
    """10,000 delivered runs (40,000 published events, unpruned) and 200 runs with 5 pending.

    Enough outbox rows that a scan of the table costs the planner clearly more than 50 probes
    of its key: with 2,000 the two were within 1% of each other (a coin toss between plans on
    a fresh database, and a 0.4 ms scan either way); the guarantee is about tables that grow."""
    done = seed_runs(10000, 4, prefix="done")
    RunOutbox.objects.filter(run_id__in=done).update(next_seq=5)
    RunEvent.objects.filter(run_id__in=done).update(published_at=timezone.now())
    todo = seed_runs(200, 5, prefix="todo")
    return [(run_id, 1) for run_id in todo[:LIMIT]]


def test_claim_and_read_plans_do_not_depend_on_statistics() -> None:
    claimed = seed()
    forget_statistics()
    fresh_claim, claim_rows = explain(*claim_sql())
    fresh_read, read_rows = explain(*read_sql(claimed))
    analyze()
    analyzed_claim, _ = explain(*claim_sql())
    analyzed_read, _ = explain(*read_sql(claimed))

    assert accesses(fresh_claim) == accesses(analyzed_claim)
    assert accesses(fresh_read) == accesses(analyzed_read)
    for shape in (fresh_claim, fresh_read):
        assert not [node for node in shape if node[0] == "Seq Scan"], shape
    assert ("index", "runs_app_event_pending") in accesses(fresh_claim)
    # The claim walks one index entry, one outbox row and one cursor probe per run it takes;
    # the read its events and each run's scope: a few hundred rows, of about 70,000 in the tables.
    assert claim_rows <= 4 * LIMIT, claim_rows
    assert read_rows <= 3 * (LIMIT * 5 + LIMIT), read_rows


def test_a_pass_costs_the_same_statements_on_a_fresh_database() -> None:
    seed()
    forget_statistics()
    with CaptureQueriesContext(connection) as big:
        result = relay.drain_outbox_once(publisher=MemoryPublisher(), batch_size=LIMIT)
    assert result.runs_touched == LIMIT and result.published == LIMIT * 5
    with CaptureQueriesContext(connection) as small:
        assert relay.drain_outbox_once(publisher=MemoryPublisher(), batch_size=2).published == 4
    assert len(big) == len(small)  # claim, read, acknowledgement (and their savepoints)


def test_the_acknowledgement_touches_only_the_acknowledged_events_on_a_fresh_database() -> None:
    seed()
    taken = claim.claim_runs(LIMIT)
    assert len(taken.runs) == LIMIT
    batches = [(run.run_id, run.next_seq, run.next_seq + 4) for run in taken.runs]
    token = RunOutbox._meta.get_field("lease_token").get_db_prep_value(taken.token, connection)
    forget_statistics()
    sql, params = lease._acknowledge_postgresql(batches, set(), token)
    shape, rows = explain(sql, params)  # type: ignore[arg-type]
    assert not [node for node in shape if node[0] == "Seq Scan"], shape
    # Each acknowledged run's outbox row and its 5 events, found by key: not the 1,000 pending
    # events of the other runs, nor the 40,000 published ones, nor the 10,000 other outbox rows.
    assert rows <= 3 * (LIMIT * 5 + LIMIT), (rows, shape)
