"""safe_cleanup_old_projects: the incident, the guards and their precedence, force, dry run,
batches with their audit events, faults, and a concurrent newer run (PostgreSQL)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import connection, connections, transaction
from django.test import override_settings

from runs_app import services
from runs_app.exceptions import CLEANUP_REFUSAL_REASONS, CleanupRefused, FlushFailed, RunNotFound
from runs_app.models import CleanupStatus, Project, Run, RunEvent, RunState
from runs_app.services.cleanup import json_size
from tests.helpers import (
    assert_atomic_under_faults,
    check_under_faults,
    keys,
    project_rows,
    snapshot,
    stored,
    synced_run,
    wait_until,
)

pytestmark = pytest.mark.django_db


def removed_rows(run: Any) -> list[dict[str, Any]]:
    """The key, name and data of the rows the run's cleanup removed (its audit records carry
    every column; see test_tracked_models for the rest)."""
    run_id = getattr(run, "pk", run)
    events = RunEvent.objects.filter(run_id=run_id, type="projects.removed").order_by("seq")
    return [
        {name: row[name] for name in ("key", "name", "data")}
        for event in events
        for row in event.payload["rows"]
    ]


def refuse(run: Any, **kwargs: Any) -> CleanupRefused:
    with pytest.raises(CleanupRefused) as caught:
        services.safe_cleanup_old_projects(run, **kwargs)
    return caught.value


def test_the_incident_end_to_end() -> None:
    # Run 1 sees 100 projects.
    run1 = synced_run("crm", keys(0, 100), "v1")
    original = stored("crm")

    # Run 2's flush fails in the middle (the source dies after 40 projects).
    def failing_source() -> Iterator[dict[str, Any]]:
        yield from project_rows(keys(0, 40), "v2")
        raise TimeoutError("source timed out")

    run2 = services.create_run("crm")
    with pytest.raises(FlushFailed):
        services.flush_projects(run2, failing_source(), batch_size=25)
    # The job "completes" anyway: the run ends failed, and cleanup refuses.
    assert services.complete_run(run2).state.status == "failed"
    refusal = refuse(run2)
    assert refusal.reason == "flush_failed"
    assert "source timed out" in refusal.message
    rows = stored("crm")
    assert sorted(rows) == keys(0, 100)
    assert {key: (name, data) for key, (name, data, _) in rows.items()} == {
        key: (name, {"v": "v2"} if key < "p025" else data)
        for key, (name, data, _) in original.items()
    }

    # Run 3 sees 95: cleanup removes exactly the other 5, and the audit carries them.
    run3 = synced_run("crm", keys(5, 100), "v3")
    result = services.safe_cleanup_old_projects(run3)

    assert (result.planned, result.removed, result.refusal) == (5, 5, None)
    assert sorted(stored("crm")) == keys(5, 100)
    assert removed_rows(run3) == [
        {"key": key, "name": f"Name {key}", "data": {"v": "v2"}} for key in keys(0, 5)
    ]
    state = RunState.objects.get(run=run3)
    assert (state.cleanup_status, state.rows_removed, state.cleanup_forced) == (
        CleanupStatus.DONE,
        5,
        False,
    )
    assert state.cleanup_at is not None
    assert run1.pk != run3.pk


def _flush_failed() -> Run:
    synced_run("s", keys(0, 10))
    run = services.create_run("s")
    with pytest.raises(FlushFailed):
        services.flush_projects(run, [{"key": "bad"}])
    return services.complete_run(run)


def _flush_unfinished() -> Run:
    synced_run("s", keys(0, 10))
    run = services.create_run("s")
    RunState.objects.filter(run=run).update(flush_status="in_progress")  # a process died
    return run


def _active() -> Run:
    synced_run("s", keys(0, 10))
    run = services.create_run("s")
    services.flush_projects(run, project_rows(keys(0, 8)))
    return run


def _failed() -> Run:
    synced_run("s", keys(0, 10))
    run = services.create_run("s")
    services.flush_projects(run, project_rows(keys(0, 8)))
    return services.fail_run(run, "job crashed")


def _not_flushed() -> Run:
    synced_run("s", keys(0, 10))
    return services.complete_run(services.create_run("s"))


def _incremental() -> Run:
    synced_run("s", keys(0, 10))
    run = services.create_run("s")
    with services.flush(run, incremental=True) as flush:
        flush.write(project_rows(keys(0, 2)), cursor="2026-12-01")
    return services.complete_run(run)


def _incremental_and_superseded() -> Run:
    run = _incremental()
    services.create_run("s")  # newer, active
    return run


def _superseded() -> Run:
    synced_run("s", keys(0, 10))
    run = synced_run("s", keys(0, 8))
    services.create_run("s")  # newer, active
    return run


def _superseded_by_completed() -> Run:
    synced_run("s", keys(0, 10))
    run = synced_run("s", keys(0, 8))
    synced_run("s", keys(0, 9))
    return run


def _empty() -> Run:
    synced_run("s", keys(0, 10))
    return synced_run("s", [])


def _too_many() -> Run:
    synced_run("s", keys(0, 10))
    return synced_run("s", keys(0, 4))  # would delete 6 of 10 > 50 %


REFUSALS: list[tuple[str, Callable[[], Run]]] = [
    ("flush_failed", _flush_failed),
    ("flush_failed", _flush_unfinished),
    ("run_not_completed", _active),
    ("run_not_completed", _failed),
    ("not_flushed", _not_flushed),
    ("incremental_run", _incremental),
    ("superseded", _superseded),
    ("superseded", _superseded_by_completed),
    ("empty_run", _empty),
    ("too_many_deletions", _too_many),
]


@pytest.mark.parametrize(
    ("reason", "make_run"), REFUSALS, ids=[make.__name__.strip("_") for _, make in REFUSALS]
)
def test_each_refusal_deletes_nothing_and_is_recorded(
    reason: str, make_run: Callable[[], Run]
) -> None:
    run = make_run()
    projects_before = snapshot()["Project"]
    events_before = RunEvent.objects.count()

    refusal = refuse(run)

    assert refusal.reason == reason
    assert refusal.message
    assert snapshot()["Project"] == projects_before
    state = RunState.objects.get(run=run)
    assert (state.cleanup_status, state.cleanup_reason, state.cleanup_message) == (
        CleanupStatus.REFUSED,
        reason,
        refusal.message,
    )
    assert state.cleanup_at is not None and state.rows_removed == 0
    assert RunEvent.objects.count() == events_before + 1
    event = RunEvent.objects.filter(run=run).order_by("-seq").first()
    assert event is not None and event.type == "cleanup.refused"
    assert (event.payload["reason"], event.payload["message"]) == (reason, refusal.message)


def test_every_reason_is_tested() -> None:
    # cleanup_restored: tests/test_reversible_cleanup.py (a restored run's ledger keeps counts).
    tested_elsewhere = {"cleanup_restored"}
    assert {reason for reason, _ in REFUSALS} | tested_elsewhere == set(CLEANUP_REFUSAL_REASONS)


def test_a_newer_failed_run_does_not_supersede() -> None:
    synced_run("s", keys(0, 10))
    run = synced_run("s", keys(0, 8))
    services.fail_run(services.create_run("s"), "crashed")
    assert services.safe_cleanup_old_projects(run).removed == 2


# Each setup meets the named guard and every later one; the earlier guard must win.
PRECEDENCE: list[tuple[str, Callable[[], Run]]] = [
    ("flush_failed", lambda: _flush_failed_while_active()),
    ("run_not_completed", lambda: services.create_run("s")),
    ("not_flushed", lambda: _not_flushed_and_superseded()),
    ("incremental_run", _incremental_and_superseded),
    ("superseded", lambda: _empty_and_superseded()),
    ("empty_run", _empty),  # an empty run also deletes 100 %
]


def _flush_failed_while_active() -> Run:
    run = services.create_run("s")
    with pytest.raises(FlushFailed):
        services.flush_projects(run, [{"key": "bad"}])
    return run


def _not_flushed_and_superseded() -> Run:
    run = _not_flushed()
    services.create_run("s")
    return run


def _empty_and_superseded() -> Run:
    run = _empty()
    services.create_run("s")
    return run


@pytest.mark.parametrize(("reason", "make_run"), PRECEDENCE, ids=[r for r, _ in PRECEDENCE])
def test_guards_apply_in_precedence_order(reason: str, make_run: Callable[[], Run]) -> None:
    assert refuse(make_run()).reason == reason


@pytest.mark.parametrize("make_run", [_flush_failed, _active, _not_flushed, _superseded])
def test_force_does_not_override_the_safety_guards(make_run: Callable[[], Run]) -> None:
    run = make_run()
    before = snapshot()["Project"]
    refuse(run, force=True)
    assert snapshot()["Project"] == before


def test_force_overrides_empty_run_and_is_recorded() -> None:
    run = _empty()

    result = services.safe_cleanup_old_projects(run, force=True)

    assert (result.removed, result.forced) == (10, True)
    assert not Project.objects.filter(scope="s").exists()
    state = RunState.objects.get(run=run)
    assert (state.cleanup_status, state.cleanup_forced, state.rows_removed) == ("done", True, 10)


def test_force_overrides_too_many_deletions() -> None:
    run = _too_many()
    result = services.safe_cleanup_old_projects(run, force=True)
    assert (result.planned, result.removed, result.forced) == (6, 6, True)
    assert sorted(stored("s")) == keys(0, 4)


def test_force_without_a_guard_to_override_is_not_recorded_as_forced() -> None:
    synced_run("s", keys(0, 10))
    run = synced_run("s", keys(0, 9))
    result = services.safe_cleanup_old_projects(run, force=True)
    assert (result.removed, result.forced) == (1, False)
    assert RunState.objects.get(run=run).cleanup_forced is False


@override_settings(RUNS_APP={"CLEANUP_MAX_DELETE_COUNT": 2})
def test_too_many_deletions_by_count() -> None:
    synced_run("s", keys(0, 10))
    run = synced_run("s", keys(0, 7))  # 3 of 10: under the fraction, over the count
    refusal = refuse(run)
    assert refusal.reason == "too_many_deletions"
    assert "CLEANUP_MAX_DELETE_COUNT (2)" in refusal.message


@override_settings(RUNS_APP={"CLEANUP_MAX_DELETE_FRACTION": 1.0})
def test_the_fraction_is_a_setting() -> None:
    run = _too_many()
    assert services.safe_cleanup_old_projects(run).removed == 6


def test_dry_run_writes_nothing_and_returns_the_plan() -> None:
    synced_run("s", keys(0, 20))
    run = synced_run("s", keys(3, 20))
    before = snapshot()

    result = services.safe_cleanup_old_projects(run, dry_run=True)

    assert snapshot() == before
    assert result == services.CleanupResult(True, 3, 0, ("p000", "p001", "p002"), False, None)


def test_dry_run_reports_a_refusal_without_raising_or_writing() -> None:
    run = _too_many()
    before = snapshot()

    result = services.safe_cleanup_old_projects(run, dry_run=True)

    assert snapshot() == before
    assert (result.refusal, result.planned, result.removed) == ("too_many_deletions", 6, 0)
    assert "6 of 10" in result.refusal_message
    assert result.sample_keys == tuple(keys(4, 10))
    forced = services.safe_cleanup_old_projects(run, dry_run=True, force=True)
    assert (forced.refusal, forced.forced) == (None, True)
    assert snapshot() == before


def test_sample_keys_are_capped() -> None:
    synced_run("s", keys(0, 40))
    run = synced_run("s", keys(15, 40))
    result = services.safe_cleanup_old_projects(run, dry_run=True)
    assert result.sample_keys == tuple(keys(0, 10))
    assert result.planned == 15


def test_a_second_cleanup_removes_nothing() -> None:
    synced_run("s", keys(0, 10))
    run = synced_run("s", keys(0, 8))
    assert services.safe_cleanup_old_projects(run).removed == 2
    events = RunEvent.objects.count()

    second = services.safe_cleanup_old_projects(run)

    assert (second.planned, second.removed) == (0, 0)
    assert RunEvent.objects.count() == events
    assert RunState.objects.get(run=run).rows_removed == 2


def test_scopes_are_isolated() -> None:
    synced_run("a", keys(0, 10))
    synced_run("b", keys(0, 10))
    run = synced_run("a", keys(0, 6))
    b_before = stored("b")

    assert services.safe_cleanup_old_projects(run).removed == 4

    assert stored("b") == b_before
    assert sorted(stored("a")) == keys(0, 6)


def test_projects_whose_run_row_is_gone_are_kept() -> None:
    old = synced_run("s", keys(0, 10))
    run = synced_run("s", keys(0, 8))
    old.delete()  # last_seen_run of p008, p009 becomes NULL

    result = services.safe_cleanup_old_projects(run)

    assert (result.planned, result.removed) == (0, 0)
    assert sorted(stored("s")) == keys(0, 10)


def test_projects_seen_by_the_run_itself_or_a_newer_run_are_never_planned() -> None:
    synced_run("s", keys(0, 10))
    run = synced_run("s", keys(0, 5))
    # A newer run re-stamps p005-p007 and fails: it does not supersede, and its rows are kept.
    newer = services.create_run("s")
    services.flush_projects(newer, project_rows(keys(5, 8)))
    services.fail_run(newer, "crashed")

    result = services.safe_cleanup_old_projects(run)

    assert result.removed == 2
    assert sorted(stored("s")) == keys(0, 8)


@override_settings(RUNS_APP={"MAX_PAYLOAD_BYTES": 1000, "CLEANUP_BATCH_SIZE": 7})
def test_removed_rows_are_split_into_events_within_the_payload_limit() -> None:
    rows = [{"key": key, "name": f"Name {key}", "data": {"text": "é" * 60}} for key in keys(0, 30)]
    old = services.create_run("s")
    services.flush_projects(old, rows)
    services.complete_run(old)
    run = synced_run("s", keys(20, 30))

    result = services.safe_cleanup_old_projects(run, force=True)

    assert result.removed == 20
    events = list(RunEvent.objects.filter(run=run, type="projects.removed").order_by("seq"))
    assert len(events) > 3  # several per batch of 7: 7 rows do not fit in 1000 bytes
    assert all(json_size(event.payload) <= 1000 for event in events)
    assert all(event.payload["scope"] == "s" for event in events)
    assert removed_rows(run) == rows[:20]


def test_unknown_run() -> None:
    with pytest.raises(RunNotFound):
        services.safe_cleanup_old_projects("nope")


def test_recording_a_refusal_is_atomic_under_faults() -> None:
    run = _too_many()

    def attempt() -> None:
        with pytest.raises(CleanupRefused):
            services.safe_cleanup_old_projects(run)

    assert assert_atomic_under_faults(attempt) >= 3


@pytest.mark.django_db(transaction=True)
@override_settings(RUNS_APP={"CLEANUP_BATCH_SIZE": 4})
def test_faults_never_leave_a_deleted_row_without_its_audit() -> None:
    def setup() -> tuple[str, dict[str, Any]]:
        synced_run("s", keys(0, 20), "v0")
        run = synced_run("s", keys(0, 10), "v1")
        return str(run.pk), stored("s")

    def action(context: tuple[str, dict[str, Any]]) -> None:
        services.safe_cleanup_old_projects(context[0])

    def check(context: tuple[str, dict[str, Any]], faulted: bool) -> None:
        run_id, before = context
        now = stored("s")
        gone = sorted(set(before) - set(now))
        audit = removed_rows(run_id)
        assert [row["key"] for row in audit] == gone
        assert all((row["name"], row["data"]) == before[row["key"]][:2] for row in audit)
        assert len(gone) in (0, 4, 8, 10)  # whole batches only
        state = RunState.objects.get(run_id=run_id)
        assert state.rows_removed == len(gone)
        assert (state.cleanup_status == CleanupStatus.DONE) == (not faulted)
        # Whatever happened, running it again finishes the job, each row audited once.
        services.safe_cleanup_old_projects(run_id)
        assert sorted(stored("s")) == keys(0, 10)
        assert [row["key"] for row in removed_rows(run_id)] == keys(10, 20)

    assert check_under_faults(setup, action, check) >= 3 * 3


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_a_newer_runs_fresh_rows_survive_an_older_runs_cleanup() -> None:
    """Run 1's cleanup is planned, then its batch waits on a row lock; meanwhile run 2 (newer)
    starts and re-stamps some of the rows the batch picked. Those must survive: the lock and the
    DELETE state an allow-list of runs older than run 1, re-checked on the row version they
    finally see."""
    synced_run("s", keys(0, 20), "v0")
    run1 = synced_run("s", keys(0, 10), "v1")  # would delete p010-p019
    holding, release = threading.Event(), threading.Event()
    newer: dict[str, str] = {}
    results: list[Any] = []

    def cleanup() -> None:
        try:
            results.append(services.safe_cleanup_old_projects(run1))
        except BaseException as exc:  # pragma: no cover - reported below
            results.append(exc)
        finally:
            connections.close_all()

    def newer_run() -> None:
        try:
            run2 = services.create_run("s")
            newer["id"] = run2.pk
            with services.flush(run2) as session, transaction.atomic():
                session.write(project_rows(keys(11, 15), "v2"))
                holding.set()
                assert release.wait(10), "never released"
            services.complete_run(run2)
        finally:
            connections.close_all()

    def waiting_on_a_row_lock(count: int) -> Callable[[], bool]:
        def check() -> bool:
            with connection.cursor() as cursor:
                # Polled inside a transaction: drop its cached statistics snapshot first.
                cursor.execute("SELECT pg_stat_clear_snapshot()")
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query LIKE '%%FOR UPDATE%%' "
                    "AND query LIKE 'SELECT \"id\" FROM %%runs_app_project%%'"
                )
                return int(cursor.fetchone()[0]) >= count

        return check

    cleaner = threading.Thread(target=cleanup)
    flusher = threading.Thread(target=newer_run)
    with transaction.atomic():
        # Hold p010, the first row of the cleanup's batch in key order: the cleanup plans (no
        # newer run yet), picks its batch and waits here before locking anything.
        Project.objects.select_for_update().get(scope="s", key="p010")
        cleaner.start()
        wait_until(waiting_on_a_row_lock(1))
        flusher.start()  # run 2 starts now and re-stamps p011-p014, uncommitted
        assert holding.wait(10)
    # p010 is free: the cleanup locks it, then waits for run 2's rows.
    wait_until(waiting_on_a_row_lock(1))
    release.set()
    flusher.join(10)
    cleaner.join(10)
    assert not flusher.is_alive() and not cleaner.is_alive()

    (result,) = results
    assert isinstance(result, services.CleanupResult), result
    assert (result.planned, result.removed) == (10, 6)
    rows = stored("s")
    assert sorted(rows) == keys(0, 10) + keys(11, 15)
    assert all(rows[key][1:] == ({"v": "v2"}, newer["id"]) for key in keys(11, 15))
    assert [row["key"] for row in removed_rows(run1)] == ["p010", *keys(15, 20)]
