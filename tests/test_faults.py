"""Fault injection: fail the k-th statement of each write path, for every k; nothing half-written.

Transactional tests (real commits), so "nothing changed" is what another connection would see.
"""

from __future__ import annotations

import pytest
from django.db import connection, transaction

from runs_app import services
from runs_app.models import FlushStatus, Project, Run, RunEvent, RunState, RunStatus
from runs_app.services import Event
from tests.factories import ProjectFactory, RunFactory
from tests.helpers import InjectedFault, assert_atomic_under_faults, failing_statement, snapshot

pytestmark = pytest.mark.django_db(transaction=True)

# Statements each path runs at least. SQLite adds a BEGIN IMMEDIATE to every path; run creation
# adds the advisory lock on PostgreSQL.
BEGIN = 1 if connection.vendor == "sqlite" else 0
# creation lock or BEGIN, id taken? scope busy? max ordinal, run, state, outbox, events
CREATE_STATEMENTS = 8
# SQLite: UPDATE ... RETURNING last_seq, then the bulk insert; PostgreSQL: one statement (the
# counter's UPDATE a CTE of the INSERT)
APPEND_WRITES = 2 if connection.vendor == "sqlite" else 1
APPEND_STATEMENTS = APPEND_WRITES + BEGIN
# lock state, save state, UPDATE ... RETURNING last_seq, insert event
CLOSE_STATEMENTS = 4 + BEGIN


def test_create_run_with_events() -> None:
    faults = assert_atomic_under_faults(
        lambda: services.create_run(
            "s", run_id="r", metadata={"m": 1}, events=[Event("a"), Event("b", {"x": [1]})]
        )
    )
    assert faults >= CREATE_STATEMENTS
    assert [e.seq for e in services.list_events("r")] == [1, 2, 3]
    assert RunState.objects.get(run_id="r").status == RunStatus.ACTIVE


def test_ensure_run_creating() -> None:
    faults = assert_atomic_under_faults(lambda: services.ensure_run("r", scope="s"))
    assert faults >= CREATE_STATEMENTS + 1  # plus the "does it exist?" read
    assert services.ensure_run("r", scope="s")[1] is False
    assert [e.type for e in services.list_events("r")] == ["run.started"]


@pytest.mark.parametrize("count", [1, 25])
def test_append_events(count: int) -> None:
    run = RunFactory.create()
    faults = assert_atomic_under_faults(
        lambda: services.append_events(run, [Event("e", {"i": i}) for i in range(count)])
    )
    assert faults >= APPEND_STATEMENTS
    assert [e.seq for e in services.list_events(run)] == list(range(1, count + 2))
    assert Run.objects.get(pk=run.pk).last_seq == count + 1


def test_complete_run_completed() -> None:
    run = RunFactory.create()
    faults = assert_atomic_under_faults(lambda: services.complete_run(run))
    assert faults >= CLOSE_STATEMENTS
    assert RunState.objects.get(run=run).status == RunStatus.COMPLETED
    assert services.list_events(run)[-1].type == "run.completed"


def test_complete_run_fail_safe_failed() -> None:
    run = RunFactory.create()
    RunState.objects.filter(run=run).update(flush_status=FlushStatus.FAILED, flush_error="x")
    faults = assert_atomic_under_faults(lambda: services.complete_run(run))
    assert faults >= CLOSE_STATEMENTS
    state = RunState.objects.get(run=run)
    assert (state.status, state.error) == (RunStatus.FAILED, "flush_failed: x")
    assert services.list_events(run)[-1].type == "run.failed"


def test_fail_run() -> None:
    run = RunFactory.create()
    faults = assert_atomic_under_faults(lambda: services.fail_run(run, "boom"))
    assert faults >= CLOSE_STATEMENTS
    assert RunState.objects.get(run=run).status == RunStatus.FAILED


def test_every_write_statement_is_covered() -> None:
    """The same paths, counting only writes: each write fails once, nothing half-written."""
    run = RunFactory.create()
    assert (
        assert_atomic_under_faults(
            lambda: services.append_events(run, [Event("a")]), writes_only=True
        )
        >= APPEND_WRITES
    )
    assert (
        assert_atomic_under_faults(
            lambda: services.create_run("w", events=[Event("a")]), writes_only=True
        )
        >= 4
    )
    # The ledger and the run.completed event (one statement on PostgreSQL, two on SQLite); a run
    # that flushed nothing confirms no model.
    assert assert_atomic_under_faults(lambda: services.complete_run(run), writes_only=True) >= 2


# --- the caller's transaction ------------------------------------------------------------------


class Rollback(Exception):
    pass


def test_callers_writes_and_events_roll_back_together() -> None:
    run = RunFactory.create()
    before = snapshot()
    with pytest.raises(Rollback), transaction.atomic():
        ProjectFactory.create(key="mine")
        services.append_events(run, [Event("project.created", {"key": "mine"})])
        services.create_run("inner", run_id="inner", events=[Event("x")])
        raise Rollback
    assert snapshot() == before


def test_callers_writes_and_events_commit_together() -> None:
    run = RunFactory.create()
    with transaction.atomic():
        ProjectFactory.create(key="mine")
        services.append_events(run, [Event("project.created", {"key": "mine"})])
        services.create_run("inner", run_id="inner")
    assert Project.objects.filter(key="mine").exists()
    assert [e.type for e in services.list_events(run)] == ["run.started", "project.created"]
    assert Run.objects.filter(pk="inner").exists()


def test_a_fault_inside_the_callers_transaction_rolls_back_the_callers_writes() -> None:
    run = RunFactory.create()
    before = snapshot()
    with pytest.raises(InjectedFault), transaction.atomic():
        ProjectFactory.create(key="mine")
        # From here: SAVEPOINT, then the events' insert (on SQLite after UPDATE ... RETURNING
        # last_seq; on PostgreSQL that UPDATE is a CTE of the insert).
        insert = 1 + APPEND_WRITES
        with failing_statement(insert) as counter:
            services.append_events(run, [Event("a"), Event("b")])
    expected = 'INSERT INTO "runs_app_runevent"' if APPEND_WRITES == 2 else "WITH r AS (UPDATE"
    assert counter.statements[insert - 1].startswith(expected)
    assert snapshot() == before
    assert RunEvent.objects.filter(run=run).count() == 1
    assert connection.in_atomic_block is False
