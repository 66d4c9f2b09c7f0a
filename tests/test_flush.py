"""flush_projects: upsert counts, ledger, events, failure handling, bounded memory, query counts."""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from runs_app import services
from runs_app.exceptions import (
    CleanupRefused,
    FlushEnded,
    FlushFailed,
    FlushInTransaction,
    InvalidInput,
    RunClosed,
    RunNotFound,
)
from runs_app.models import FlushStatus, Project, RunEvent, RunState, RunStatus
from tests.helpers import (
    InjectedFault,
    caused_by_fault,
    check_under_faults,
    keys,
    project_rows,
    snapshot,
    stored,
    synced_run,
)

pytestmark = pytest.mark.django_db


def state_of(run: Any) -> RunState:
    return RunState.objects.get(run_id=getattr(run, "pk", run))


def flushed_events(run: Any) -> list[dict[str, Any]]:
    run_id = getattr(run, "pk", run)
    events = RunEvent.objects.filter(run_id=run_id, type="projects.flushed").order_by("seq")
    return [event.payload for event in events]


def test_flush_creates_then_updates_and_stamps_the_run() -> None:
    first = synced_run("s", keys(0, 10), "v1")
    run = services.create_run("s")

    result = services.flush_projects(run, project_rows(keys(5, 15), "v2"), batch_size=4)

    assert result == services.FlushResult(seen=10, created=5, updated=5)
    rows = stored("s")
    assert {key: rows[key] for key in keys(0, 5)} == {
        key: (f"Name {key}", {"v": "v1"}, first.pk) for key in keys(0, 5)
    }
    assert {key: rows[key] for key in keys(5, 15)} == {
        key: (f"Name {key}", {"v": "v2"}, run.pk) for key in keys(5, 15)
    }
    state = state_of(run)
    assert (state.flush_status, state.rows_seen, state.rows_created, state.rows_updated) == (
        FlushStatus.SUCCEEDED,
        10,
        5,
        5,
    )
    assert state.flushed_at is not None
    events = flushed_events(run)
    assert [(e["seen"], e["created"], e["updated"]) for e in events] == [
        (4, 0, 4),
        (4, 3, 1),
        (2, 2, 0),
    ]
    assert (events[0]["first_key"], events[-1]["last_key"]) == ("p005", "p014")
    closed = RunEvent.objects.get(run_id=run.pk, type="flush.succeeded").payload
    assert (closed["seen"], closed["created"], closed["flush_status"]) == (10, 5, "succeeded")
    # created_at survives an update; last_confirmed_run is complete_run's business.
    updated = Project.objects.get(scope="s", key="p005")
    assert updated.created_at < updated.updated_at
    assert updated.last_confirmed_run_id == first.pk


def test_keys_repeated_in_a_batch_last_one_wins_and_rows_are_sorted() -> None:
    run = services.create_run("s")
    rows = [
        {"key": "b", "name": "first b", "data": {"n": 1}},
        {"key": "a", "name": "a", "data": {}},
        {"key": "b", "name": "last b", "data": {"n": 2}},
    ]

    result = services.flush_projects(run, rows)

    assert result == services.FlushResult(seen=2, created=2, updated=0)
    assert stored("s")["b"] == ("last b", {"n": 2}, run.pk)
    assert (flushed_events(run)[0]["first_key"], flushed_events(run)[0]["last_key"]) == ("a", "b")


def test_data_may_be_omitted() -> None:
    run = services.create_run("s")
    services.flush_projects(
        run, [{"key": "a", "name": "A"}, {"key": "b", "name": "B", "data": None}]
    )
    assert stored("s") == {"a": ("A", {}, run.pk), "b": ("B", {}, run.pk)}


def test_several_writes_of_one_session_add_up() -> None:
    run = services.create_run("s")
    with services.flush(run) as session:
        first = session.write(project_rows(keys(0, 3)))
        assert state_of(run).flush_status == FlushStatus.IN_PROGRESS
        second = session.write(project_rows(keys(2, 6)))

    assert (first, second) == (services.FlushResult(3, 3, 0), services.FlushResult(4, 3, 1))
    assert session.result == services.FlushResult(7, 6, 1)
    state = state_of(run)
    assert (state.rows_seen, state.rows_created, state.rows_updated) == (7, 6, 1)
    assert state.flush_status == FlushStatus.SUCCEEDED


def test_a_second_flush_projects_call_is_refused_and_fails_the_flush() -> None:
    run = services.create_run("s")
    services.flush_projects(run, project_rows(keys(0, 3)))
    before = snapshot()

    with pytest.raises(FlushEnded, match=r"services\.flush\(run\) as flush"):
        services.flush_projects(run, project_rows(keys(3, 6)))

    assert stored("s").keys() == set(keys(0, 3))  # no row written
    state = state_of(run)
    assert state.flush_status == FlushStatus.FAILED
    assert snapshot()["Project"] == before["Project"]
    assert services.complete_run(run).state.status == RunStatus.FAILED


def test_an_empty_iterable_is_a_successful_flush_of_nothing() -> None:
    run = services.create_run("s")

    assert services.flush_projects(run, iter(())) == services.FlushResult(0, 0, 0)

    state = state_of(run)
    assert state.flush_status == FlushStatus.SUCCEEDED and state.flushed_at is not None
    assert flushed_events(run) == []
    closed = RunEvent.objects.get(run_id=run.pk, type="flush.succeeded").payload
    assert (closed["seen"], closed["flush_status"]) == (0, "succeeded")
    assert not Project.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_status_is_in_progress_and_committed_while_the_source_is_read() -> None:
    run = services.create_run("s")
    observed: list[tuple[str, bool]] = []

    def source() -> Iterator[dict[str, Any]]:
        yield from project_rows(keys(0, 2))
        # Read between batches, outside any transaction: what another process would see.
        observed.append((state_of(run).flush_status, connection.in_atomic_block))
        yield from project_rows(keys(2, 4))

    services.flush_projects(run, source(), batch_size=2)

    assert observed == [(FlushStatus.IN_PROGRESS, False)]


def test_the_source_failing_mid_scan_fails_the_flush_and_keeps_committed_batches() -> None:
    run = services.create_run("s")

    def source() -> Iterator[dict[str, Any]]:
        yield from project_rows(keys(0, 5))
        raise ConnectionError("source went away")

    with pytest.raises(FlushFailed) as caught:
        services.flush_projects(run, source(), batch_size=3)

    assert isinstance(caught.value.__cause__, ConnectionError)
    assert caught.value.run_id == run.pk
    # Batch 1 (p000-p002) committed; the batch in hand (p003, p004) was never written.
    assert sorted(stored("s")) == keys(0, 3)
    state = state_of(run)
    assert state.flush_status == FlushStatus.FAILED
    assert state.flush_error == "ConnectionError: source went away"
    assert (state.rows_seen, state.rows_created) == (3, 3)
    # Fail-safe completion: the run ends failed and confirms nothing.
    assert services.complete_run(run).state.status == RunStatus.FAILED
    assert not Project.objects.filter(last_confirmed_run=run).exists()


def test_failed_is_sticky() -> None:
    run = services.create_run("s")
    with pytest.raises(FlushFailed):
        services.flush_projects(run, [{"key": 1}])
    before = snapshot()

    with pytest.raises(FlushFailed) as caught:
        services.flush_projects(run, project_rows(keys(0, 3)))

    assert "failed already" in str(caught.value)
    assert caught.value.__cause__ is None
    assert snapshot() == before
    assert state_of(run).flush_error.startswith("InvalidInput: projects[0].key")


BAD_ROWS = [
    pytest.param({"name": "no key"}, "projects[4].key", id="missing-key"),
    pytest.param({"key": 7, "name": "n"}, "projects[4].key", id="non-string-key"),
    pytest.param({"key": "k" * 256, "name": "n"}, "projects[4].key", id="long-key"),
    pytest.param({"key": "", "name": "n"}, "projects[4].key", id="empty-key"),
    pytest.param({"key": "z", "name": "n" * 256}, "projects[4].name", id="long-name"),
    pytest.param({"key": "z"}, "projects[4].name", id="missing-name"),
    pytest.param({"key": "z", "name": "n", "data": {"s": {1, 2}}}, "projects[4].data", id="set"),
    pytest.param({"key": "z", "name": "n", "data": {"x": math.nan}}, "projects[4].data", id="nan"),
    pytest.param({"key": "z", "name": "n", "data": [1, 2]}, "projects[4].data", id="list-data"),
    pytest.param({"key": "z", "name": "n", "data": {1: "x"}}, "projects[4].data", id="int-key"),
    pytest.param({"key": "z", "name": "n", "colour": "red"}, "projects[4]", id="unknown-field"),
    pytest.param(("z", "n"), "projects[4]", id="not-a-mapping"),
]


@pytest.mark.parametrize(("bad", "field"), BAD_ROWS)
def test_bad_input_fails_the_flush_and_writes_nothing_of_its_batch(bad: Any, field: str) -> None:
    run = services.create_run("s")
    rows: list[Any] = [*project_rows(keys(0, 4)), bad, *project_rows(keys(5, 6))]

    with pytest.raises(FlushFailed) as caught:
        services.flush_projects(run, rows, batch_size=3)

    cause = caught.value.__cause__
    assert isinstance(cause, InvalidInput)
    assert cause.field == field
    # Batch 1 committed; batch 2 (p003 and the bad row) not written at all.
    assert sorted(stored("s")) == keys(0, 3)
    state = state_of(run)
    assert state.flush_status == FlushStatus.FAILED
    assert state.rows_seen == 3
    assert field in state.flush_error
    assert len(flushed_events(run)) == 1


@override_settings(RUNS_APP={"MAX_PAYLOAD_BYTES": 200})
def test_data_whose_removal_audit_could_not_fit_is_refused() -> None:
    run = services.create_run("s")
    data = {"text": "x" * 150}  # 163 bytes: within the limit, but not with key, name, envelope

    with pytest.raises(FlushFailed) as caught:
        services.flush_projects(run, [{"key": "k" * 20, "name": "n" * 20, "data": data}])

    cause = caught.value.__cause__
    assert isinstance(cause, InvalidInput) and cause.field == "projects[0].data"
    assert cause.limit == 200
    assert "projects.removed" in str(cause)
    assert not Project.objects.exists()


def test_bad_batch_size_is_refused_before_anything() -> None:
    run = services.create_run("s")
    before = snapshot()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidInput) as caught:
            services.flush_projects(run, [], batch_size=bad)  # type: ignore[arg-type]  # 1.5, True: on purpose
        assert caught.value.field == "batch_size"
    assert snapshot() == before


def test_a_closed_run_cannot_flush_and_its_ledger_is_untouched() -> None:
    run = synced_run("s", keys(0, 2))
    before = snapshot()

    with pytest.raises(RunClosed):
        services.flush_projects(run, project_rows(keys(0, 5), "v2"))
    with pytest.raises(RunClosed), services.flush(run) as session:
        session.write(project_rows(keys(0, 5), "v2"))

    # Nothing written, not even to the ledger: the completed run's cleanup still trusts it.
    assert snapshot() == before
    assert state_of(run).flush_status == FlushStatus.SUCCEEDED


def test_an_unknown_run_raises_run_not_found() -> None:
    with pytest.raises(RunNotFound):
        services.flush_projects("nope", project_rows(keys(0, 1)))
    assert not Project.objects.exists()


def test_a_session_opened_inside_the_callers_atomic_is_refused() -> None:
    run = services.create_run("s")
    before = snapshot()

    with transaction.atomic(), pytest.raises(FlushInTransaction):
        services.flush_projects(run, project_rows(keys(0, 5)))

    assert snapshot() == before


def test_a_write_rolled_back_by_the_callers_atomic_fails_the_session() -> None:
    run = services.create_run("s")

    with pytest.raises(FlushFailed, match="rolled back"), services.flush(run) as session:
        session.write(project_rows(keys(0, 2)))
        with pytest.raises(ZeroDivisionError), transaction.atomic():
            session.write(project_rows(keys(2, 5)))
            1 / 0  # noqa: B018  the caller's own error after the write

    assert sorted(stored("s")) == keys(0, 2)
    state = state_of(run)
    assert (state.flush_status, state.rows_seen) == (FlushStatus.FAILED, 2)
    assert services.complete_run(run).state.status == RunStatus.FAILED


def test_a_failed_write_caught_inside_the_callers_atomic_still_fails_the_run() -> None:
    run = services.create_run("s")

    failed_at_exit = pytest.raises(FlushFailed, match="a write of this session failed")
    with failed_at_exit, services.flush(run) as session:
        with transaction.atomic():
            with pytest.raises(FlushFailed):
                session.write([*project_rows(keys(0, 2)), {"key": None}])
            # The failed batch rolled back to its savepoint; the caller's transaction goes on.
            Project.objects.create(scope="other", key="mine", name="mine")
        with pytest.raises(FlushFailed, match="failed already"):
            session.write(project_rows(keys(5, 6)))

    assert not stored("s")
    assert state_of(run).flush_status == FlushStatus.FAILED
    assert Project.objects.filter(scope="other").exists()
    assert services.complete_run(run).state.status == RunStatus.FAILED


@pytest.mark.django_db(transaction=True)
def test_if_recording_the_failure_fails_the_status_stays_in_progress() -> None:
    run = services.create_run("s")

    def fail_the_failure_record(execute: Any, sql: str, params: Any, many: bool, ctx: Any) -> Any:
        if sql.startswith("UPDATE") and "flush_error" in sql:
            raise InjectedFault("cannot record the failure")
        return execute(sql, params, many, ctx)

    def source() -> Iterator[dict[str, Any]]:
        yield from project_rows(keys(0, 1))
        raise ConnectionError("source went away")

    with connection.execute_wrapper(fail_the_failure_record), pytest.raises(FlushFailed) as caught:
        services.flush_projects(run, source())

    assert isinstance(caught.value.__cause__, ConnectionError)
    assert state_of(run).flush_status == FlushStatus.IN_PROGRESS
    closed = services.complete_run(run)
    assert closed.state.status == RunStatus.FAILED
    assert closed.state.error.startswith("flush_unfinished: 1 flush session(s) still open")


@pytest.mark.django_db(transaction=True)
def test_faults_never_leave_a_partial_batch_and_a_failed_flush_never_completes() -> None:
    scope = "faults"

    def setup() -> str:
        synced_run(scope, keys(0, 15), "v0")
        return str(services.create_run(scope).pk)

    def action(run_id: str) -> None:
        # Three batches: p005-p009 and p010-p014 update, p015-p019 create.
        services.flush_projects(run_id, project_rows(keys(5, 20), "v1"), batch_size=5)

    def check(run_id: str, faulted: bool) -> None:
        state = state_of(run_id)
        events = [
            e.payload for e in RunEvent.objects.filter(run_id=run_id, type="projects.flushed")
        ]
        rows = stored(scope)
        mine = sorted(key for key, (_, _, seen_by) in rows.items() if seen_by == run_id)
        # Whole batches only, each with its ledger counts and its event.
        assert mine == keys(5, 5 + 5 * len(events))
        assert state.rows_seen == sum(e["seen"] for e in events) == len(mine)
        assert state.rows_created == sum(e["created"] for e in events)
        assert state.rows_updated == sum(e["updated"] for e in events)
        assert all(rows[key][1] == {"v": "v1"} for key in mine)
        assert all(rows[key][1] == {"v": "v0"} for key in rows if key not in mine)
        assert set(rows) <= set(keys(0, 20))
        if faulted and state.flush_status == FlushStatus.NOT_STARTED:
            # The fault hit the session's opening transaction: nothing of the flush exists, and
            # a run completed anyway has no flush that cleanup could trust.
            assert not mine
            services.complete_run(run_id)
            with pytest.raises(CleanupRefused) as refused:
                services.safe_cleanup_old_projects(run_id)
            assert refused.value.reason == "not_flushed"
        elif faulted:
            assert state.flush_status in (FlushStatus.FAILED, FlushStatus.IN_PROGRESS)
            assert services.complete_run(run_id).state.status == RunStatus.FAILED
            assert not Project.objects.filter(last_confirmed_run_id=run_id).exists()
        else:
            assert state.flush_status == FlushStatus.SUCCEEDED and len(mine) == 15

    statements = check_under_faults(setup, action, check)
    assert statements >= 3 * 4


def _flush_queries(scope: str, batches: int) -> int:
    run = services.create_run(scope)
    with CaptureQueriesContext(connection) as queries:
        services.flush_projects(run, project_rows(keys(0, 5 * batches)), batch_size=5)
    return len(queries.captured_queries)


def test_queries_per_batch_are_constant() -> None:
    one, two, three = (_flush_queries(f"q{n}", n) for n in (1, 2, 3))
    per_batch = two - one
    # savepoint, lock, upsert (two on SQLite), run ledger, model ledger, session, event seq,
    # event, release
    assert 0 < per_batch <= 10
    assert three - one == 2 * per_batch


def test_statements_do_not_grow_with_the_batch_size() -> None:
    run = services.create_run("small")
    with CaptureQueriesContext(connection) as small:
        services.flush_projects(run, project_rows(keys(0, 2)), batch_size=1000)
    run = services.create_run("big")
    with CaptureQueriesContext(connection) as big:
        services.flush_projects(run, project_rows(keys(0, 900)), batch_size=1000)
    assert len(big.captured_queries) == len(small.captured_queries)


@pytest.mark.django_db(transaction=True)
def test_a_200k_generator_flushes_in_bounded_memory() -> None:
    # transaction=True: each batch commits, as in production, instead of one 20 s transaction.
    run = services.create_run("big")
    total = 200_000

    def source() -> Iterator[dict[str, Any]]:
        for index in range(total):
            yield {"key": f"k{index:07d}", "name": "n", "data": {"i": index}}

    tracemalloc.start()
    try:
        result = services.flush_projects(run, source(), batch_size=5000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert result == services.FlushResult(total, total, 0)
    assert Project.objects.filter(scope="big").count() == total
    # 200k rows held at once would be far above this; one batch of 5000 is a few MB.
    assert peak < 50 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"


def test_faults_injected_as_an_exception_type_are_recognised() -> None:
    # The helper must not mistake an ordinary error for an injected fault.
    assert not caused_by_fault(ValueError("x"))
    try:
        try:
            raise InjectedFault("f")
        except InjectedFault as fault:
            raise FlushFailed("r", "m") from fault
    except FlushFailed as wrapped:
        assert caused_by_fault(wrapped)


def test_a_batch_over_sqlites_variable_limit_is_still_one_upsert() -> None:
    """The batch travels as one JSON parameter on both vendors: SQLite's bound-variable limit
    (here 100, for 250 rows of 3 values) does not split it."""
    synced_run("s", keys(0, 100), "v0")
    run = services.create_run("s")
    connection.ensure_connection()
    raw: Any = connection.connection
    if connection.vendor == "sqlite":
        import sqlite3

        previous = raw.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 100)
    try:
        with CaptureQueriesContext(connection) as queries:
            result = services.flush_projects(run, project_rows(keys(50, 300), "v1"))
    finally:
        if connection.vendor == "sqlite":
            raw.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, previous)

    assert result == services.FlushResult(250, 200, 50)
    assert Project.objects.filter(scope="s", last_seen_run=run).count() == 250
    if connection.vendor == "sqlite":
        inserts = [q for q in queries.captured_queries if q["sql"].startswith("INSERT INTO")]
        assert len([q for q in inserts if "ON CONFLICT" in q["sql"]]) == 1
