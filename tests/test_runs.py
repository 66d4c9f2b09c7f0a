"""The run services: what each one writes, returns and refuses."""

from __future__ import annotations

import datetime
import re
import uuid

import pytest
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from runs_app import services
from runs_app.exceptions import RunAlreadyExists, RunClosed, RunInProgress
from runs_app.models import (
    FlushStatus,
    Project,
    Run,
    RunEvent,
    RunOutbox,
    RunState,
    RunStatus,
)
from runs_app.services import Event
from tests.factories import ProjectFactory, RunFactory
from tests.helpers import StatementCounter, snapshot

pytestmark = pytest.mark.django_db


def events_of(run: Run | str) -> list[tuple[int, str, dict[str, object]]]:
    return [(event.seq, event.type, event.payload) for event in services.list_events(run)]


def state_of(run: Run | str) -> RunState:
    return RunState.objects.get(run_id=run.pk if isinstance(run, Run) else run)


# --- create_run --------------------------------------------------------------------------------


def test_create_run_writes_run_state_outbox_and_events() -> None:
    run = services.create_run(
        "sync",
        run_id="r1",
        metadata={"source": "api"},
        events=[{"type": "a", "payload": {"n": 1}}, Event("b"), {"type": "c"}],
    )
    run = Run.objects.get(pk="r1")
    assert (run.scope, run.metadata, run.last_seq) == ("sync", {"source": "api"}, 4)
    state = state_of(run)
    assert state.status == RunStatus.ACTIVE
    assert state.scope == "sync"
    assert state.flush_status == FlushStatus.NOT_STARTED
    assert state.finished_at is None
    assert state.error == ""
    outbox = RunOutbox.objects.get(run=run)
    assert outbox.next_seq == 1
    assert outbox.attempts == 0
    assert outbox.lease_token is None
    assert events_of(run) == [
        (1, "run.started", {"source": "api"}),
        (2, "a", {"n": 1}),
        (3, "b", {}),
        (4, "c", {}),
    ]
    assert all(event.published_at is None for event in RunEvent.objects.filter(run=run))


def test_create_run_returns_the_run_with_state_and_outbox() -> None:
    run = services.create_run("sync")
    with CaptureQueriesContext(connection) as queries:
        assert run.state.status == RunStatus.ACTIVE
        assert run.outbox.next_seq == 1
    assert len(queries) == 0


def test_create_run_defaults() -> None:
    run = services.create_run()
    assert re.fullmatch(r"[0-9a-f]{32}", run.id)
    assert uuid.UUID(run.id).version == 4
    assert run.scope == "default"
    assert run.metadata == {}
    assert events_of(run) == [(1, "run.started", {})]
    other = services.create_run("other")
    assert other.id != run.id


def test_create_run_with_an_existing_id_changes_nothing() -> None:
    services.create_run("a", run_id="dup", events=[Event("x")])
    services.fail_run("dup")
    before = snapshot()
    for scope in ("a", "b"):
        with pytest.raises(RunAlreadyExists) as info:
            services.create_run(scope, run_id="dup", metadata={"new": 1}, events=[Event("y")])
        assert info.value.run_id == "dup"
    assert snapshot() == before


def test_create_run_in_a_busy_scope_changes_nothing() -> None:
    first = services.create_run("busy", run_id="first")
    before = snapshot()
    with pytest.raises(RunInProgress) as info:
        services.create_run("busy", run_id="second", events=[Event("x")])
    assert (info.value.scope, info.value.active_run_id) == ("busy", "first")
    with pytest.raises(RunInProgress):
        services.create_run("busy")
    assert snapshot() == before
    # Once the active run is closed, the scope is free again.
    services.complete_run(first)
    assert services.create_run("busy", run_id="second").state.status == RunStatus.ACTIVE


def test_scopes_are_independent() -> None:
    services.create_run("a", run_id="in-a")
    services.create_run("b", run_id="in-b")
    assert set(RunState.objects.filter(status="active").values_list("run_id", "scope")) == {
        ("in-a", "a"),
        ("in-b", "b"),
    }


def test_ordinal_is_strictly_increasing() -> None:
    runs = []
    for index in range(5):
        run = services.create_run(f"s{index % 2}")
        services.complete_run(run)
        runs.append(run)
    run, _ = services.ensure_run("ensured", scope="s0")
    runs.append(run)
    ordinals = [Run.objects.get(pk=run.pk).ordinal for run in runs]
    assert ordinals == sorted(ordinals)
    assert len(set(ordinals)) == len(ordinals)
    assert list(Run.objects.values_list("pk", flat=True)) == [run.pk for run in reversed(runs)]


# --- ensure_run --------------------------------------------------------------------------------


def test_ensure_run_creates_like_create_run() -> None:
    run, created = services.ensure_run("e1", scope="s", metadata={"k": "v"})
    assert created is True
    assert (run.id, run.scope, run.metadata, run.last_seq) == ("e1", "s", {"k": "v"}, 1)
    assert state_of(run).status == RunStatus.ACTIVE
    assert RunOutbox.objects.get(run=run).next_seq == 1
    assert events_of(run) == [(1, "run.started", {"k": "v"})]


def test_ensure_run_returns_the_existing_run_and_writes_nothing() -> None:
    first, _ = services.ensure_run("e1", scope="s")
    services.append_events(first, [Event("x")])
    before = snapshot()
    counter = StatementCounter(writes_only=True)
    with connection.execute_wrapper(counter):
        # Metadata of a later call is ignored: the run exists already.
        again, created = services.ensure_run("e1", scope="s", metadata={"other": 1})
    assert created is False
    assert again == first
    assert again.metadata == {}
    assert counter.statements == []
    assert snapshot() == before


def test_ensure_run_of_a_closed_run_returns_it() -> None:
    run, _ = services.ensure_run("e1", scope="s")
    services.complete_run(run)
    before = snapshot()
    assert services.ensure_run("e1", scope="s") == (run, False)
    assert snapshot() == before


def test_ensure_run_in_another_scope_raises() -> None:
    services.ensure_run("e1", scope="s")
    before = snapshot()
    with pytest.raises(RunAlreadyExists, match="scope 's'"):
        services.ensure_run("e1", scope="t")
    assert snapshot() == before


def test_ensure_run_in_a_busy_scope_raises() -> None:
    services.create_run("s", run_id="active")
    before = snapshot()
    with pytest.raises(RunInProgress):
        services.ensure_run("e2", scope="s")
    assert snapshot() == before


# --- append_events -----------------------------------------------------------------------------


def test_append_events_allocates_contiguous_seqs() -> None:
    run = RunFactory.create()
    first = services.append_events(run, [Event("a", {"i": 1}), {"type": "b", "payload": {"i": 2}}])
    second = services.append_events(run.id, [{"type": "c"}])
    third = services.append_events(run, (Event(f"d{i}") for i in range(3)))
    assert [(e.seq, e.type) for e in first] == [(2, "a"), (3, "b")]
    assert [(e.seq, e.type) for e in second] == [(4, "c")]
    assert [e.seq for e in third] == [5, 6, 7]
    assert all(e.pk is not None for e in first + second + third)
    assert [seq for seq, _, _ in events_of(run)] == list(range(1, 8))
    assert Run.objects.get(pk=run.pk).last_seq == 7


def test_appended_events_are_returned_as_stored() -> None:
    # They are built from the INSERT's RETURNING, not fetched again: each must be its row.
    run = RunFactory.create()
    events = [Event(f"t{i}", {"i": i, "s": "é\\u0000"}) for i in range(50)]
    returned = services.append_events(run, events)
    stored = RunEvent.objects.filter(run=run, seq__gt=1).order_by("seq")
    fields = ("pk", "run_id", "seq", "type", "payload", "created_at", "published_at")
    assert [tuple(getattr(e, f) for f in fields) for e in returned] == [
        tuple(getattr(e, f) for f in fields) for e in stored
    ]
    assert all(not e._state.adding for e in returned)


def test_append_no_events_writes_nothing() -> None:
    run = RunFactory.create()
    before = snapshot()
    assert services.append_events(run, []) == []
    assert snapshot() == before


def test_append_events_keeps_runs_apart() -> None:
    one, two = RunFactory.create(), RunFactory.create()
    services.append_events(one, [Event("a")])
    services.append_events(two, [Event("b"), Event("c")])
    services.append_events(one, [Event("d")])
    assert [(s, t) for s, t, _ in events_of(one)] == [(1, "run.started"), (2, "a"), (3, "d")]
    assert [(s, t) for s, t, _ in events_of(two)] == [(1, "run.started"), (2, "b"), (3, "c")]


@pytest.mark.parametrize("close", ["complete", "fail"])
def test_append_to_a_closed_run_raises(close: str) -> None:
    run = RunFactory.create()
    if close == "complete":
        services.complete_run(run)
    else:
        services.fail_run(run, "boom")
    before = snapshot()
    for events in ([Event("late")], []):
        with pytest.raises(RunClosed) as info:
            services.append_events(run, events)
        assert info.value.status == ("completed" if close == "complete" else "failed")
    assert snapshot() == before


# --- complete_run / fail_run -------------------------------------------------------------------


def test_complete_run_without_flush_completes_with_counts() -> None:
    run = RunFactory.create()
    state = state_of(run)
    state.rows_seen, state.rows_created = 5, 3
    state.save()
    returned = services.complete_run(run.id)
    assert returned.pk == run.pk
    assert returned.state.status == RunStatus.COMPLETED
    state = state_of(run)
    assert state.status == RunStatus.COMPLETED
    assert state.error == ""
    assert state.finished_at is not None
    assert events_of(run)[-1] == (
        2,
        "run.completed",
        {
            "flush_status": "not_started",
            "rows_seen": 5,
            "rows_created": 3,
            "rows_updated": 0,
            "rows_confirmed": 0,
        },
    )


def test_complete_run_after_a_successful_flush() -> None:
    run = RunFactory.create()
    RunState.objects.filter(run=run).update(flush_status=FlushStatus.SUCCEEDED, rows_seen=2)
    services.complete_run(run)
    assert state_of(run).status == RunStatus.COMPLETED
    assert events_of(run)[-1][1:] == (
        "run.completed",
        {
            "flush_status": "succeeded",
            "rows_seen": 2,
            "rows_created": 0,
            "rows_updated": 0,
            "rows_confirmed": 0,
        },
    )


@pytest.mark.parametrize(
    ("flush_status", "flush_error", "reason", "error"),
    [
        (FlushStatus.FAILED, "API down", "flush_failed", "flush_failed: API down"),
        (FlushStatus.FAILED, "", "flush_failed", "flush_failed"),
        (FlushStatus.IN_PROGRESS, "", "flush_unfinished", "flush_unfinished"),
    ],
)
def test_complete_run_is_fail_safe(
    flush_status: str, flush_error: str, reason: str, error: str
) -> None:
    run = RunFactory.create()
    state = state_of(run)
    state.flush_status = flush_status
    state.flush_error = flush_error
    state.save()
    returned = services.complete_run(run)
    assert returned.state.status == RunStatus.FAILED
    state = state_of(run)
    assert (state.status, state.error) == (RunStatus.FAILED, error)
    assert state.finished_at is not None
    assert events_of(run)[-1] == (2, "run.failed", {"reason": reason, "error": error})
    assert RunEvent.objects.filter(run=run, type="run.completed").count() == 0


@pytest.mark.parametrize("close", ["complete", "fail"])
def test_closing_a_closed_run_raises(close: str) -> None:
    run = RunFactory.create()
    services.complete_run(run) if close == "complete" else services.fail_run(run)
    before = snapshot()
    with pytest.raises(RunClosed):
        services.complete_run(run)
    with pytest.raises(RunClosed):
        services.fail_run(run, "again")
    assert snapshot() == before


def test_fail_run_records_the_error() -> None:
    run = RunFactory.create()
    returned = services.fail_run(run, "it broke\x00 badly")
    assert returned.state.status == RunStatus.FAILED
    state = state_of(run)
    assert (state.status, state.error) == (RunStatus.FAILED, "it broke badly")
    assert state.finished_at is not None
    assert events_of(run)[-1] == (2, "run.failed", {"reason": "error", "error": "it broke badly"})


def test_fail_run_cuts_a_long_error() -> None:
    run = RunFactory.create()
    services.fail_run(run, "e" * 20_000)
    assert len(state_of(run).error) == 10_000


def test_closing_frees_the_scope() -> None:
    run = services.create_run("s")
    services.fail_run(run)
    assert services.create_run("s").state.status == RunStatus.ACTIVE


# --- heartbeat, get_run, list_events -----------------------------------------------------------


def test_heartbeat_updates_heartbeat_at() -> None:
    run = RunFactory.create()
    old = timezone.now() - datetime.timedelta(hours=1)
    RunState.objects.filter(run=run).update(heartbeat_at=old)
    before = timezone.now()
    assert services.heartbeat(run) is None  # None is its contract
    assert state_of(run).heartbeat_at >= before
    services.heartbeat(run.id)


def test_heartbeat_on_a_closed_run_raises() -> None:
    run = RunFactory.create()
    services.complete_run(run)
    before = snapshot()
    with pytest.raises(RunClosed):
        services.heartbeat(run)
    assert snapshot() == before


def test_get_run() -> None:
    created = RunFactory.create(metadata={"a": 1})
    with CaptureQueriesContext(connection) as queries:
        run = services.get_run(created.id)
        assert run == created
        assert run.metadata == {"a": 1}
        assert run.state.status == RunStatus.ACTIVE
        assert run.outbox.next_seq == 1
    assert len(queries) == 1  # state and outbox come with the run


def test_list_events_after_seq() -> None:
    run = RunFactory.create()
    services.append_events(run, [Event(f"e{i}") for i in range(2, 6)])
    assert [e.seq for e in services.list_events(run)] == [1, 2, 3, 4, 5]
    assert [e.seq for e in services.list_events(run, after_seq=3)] == [4, 5]
    assert [e.type for e in services.list_events(run.id, after_seq=4)] == ["e5"]
    assert services.list_events(run, after_seq=5) == []
    assert services.list_events(run, after_seq=99) == []


# --- the model ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flush_status", "expected"),
    [
        (FlushStatus.NOT_STARTED, None),
        (FlushStatus.IN_PROGRESS, False),
        (FlushStatus.FAILED, False),
        (FlushStatus.SUCCEEDED, True),
    ],
)
def test_flush_succeeded(flush_status: str, expected: bool | None) -> None:
    assert RunState(flush_status=flush_status).flush_succeeded is expected


def test_deleting_a_run_never_deletes_projects() -> None:
    old, new = RunFactory.create(scope="p"), None
    services.complete_run(old)
    new = RunFactory.create(scope="p")
    seen_by_old = ProjectFactory.create_batch(3, scope="p", last_seen_run=old)
    confirmed_by_old = ProjectFactory.create(scope="p", last_seen_run=new, last_confirmed_run=old)
    Run.objects.filter(pk=old.pk).delete()
    assert Project.objects.count() == 4
    for project in seen_by_old:
        project.refresh_from_db()
        assert project.last_seen_run_id is None
    confirmed_by_old.refresh_from_db()
    assert confirmed_by_old.last_seen_run_id == new.pk
    assert confirmed_by_old.last_confirmed_run_id is None
    # The run's own rows go with it.
    assert not RunState.objects.filter(run_id=old.pk).exists()
    assert not RunOutbox.objects.filter(run_id=old.pk).exists()
    assert not RunEvent.objects.filter(run_id=old.pk).exists()


def test_one_active_run_per_scope_is_enforced_by_the_database() -> None:
    services.create_run("s", run_id="active")
    intruder = Run.objects.create(id="intruder", scope="s", ordinal=1000)
    with pytest.raises(IntegrityError), transaction.atomic():
        RunState.objects.create(run=intruder, scope="s", status=RunStatus.ACTIVE)
    # The constraint is partial: closed runs of the scope are not counted.
    RunState.objects.create(run=intruder, scope="s", status=RunStatus.COMPLETED)
    other = Run.objects.create(id="other-scope", scope="t", ordinal=1001)
    RunState.objects.create(run=other, scope="t", status=RunStatus.ACTIVE)
    assert RunState.objects.filter(status=RunStatus.ACTIVE).count() == 2
