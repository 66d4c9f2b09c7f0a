"""complete_run's confirmation of flushed projects, and track_run."""

from __future__ import annotations

import pytest

from runs_app import services
from runs_app.exceptions import FlushFailed, RunInProgress
from runs_app.models import FlushStatus, Project, RunEvent, RunState, RunStatus
from tests.helpers import assert_atomic_under_faults, keys, project_rows, snapshot, synced_run

pytestmark = pytest.mark.django_db


def test_completion_confirms_exactly_the_projects_the_run_saw() -> None:
    first = synced_run("s", keys(0, 10))
    other_scope = synced_run("t", keys(0, 3))
    run = services.create_run("s")
    services.flush_projects(run, project_rows(keys(4, 8), "v2"))

    closed = services.complete_run(run)

    assert closed.state.status == RunStatus.COMPLETED
    assert closed.state.rows_confirmed == 4
    confirmed = dict(Project.objects.filter(scope="s").values_list("key", "last_confirmed_run"))
    assert confirmed == {key: run.pk if key in keys(4, 8) else first.pk for key in keys(0, 10)}
    assert set(Project.objects.filter(scope="t").values_list("last_confirmed_run", flat=True)) == {
        other_scope.pk
    }
    event = RunEvent.objects.get(run=run, type="run.completed")
    assert event.payload == {
        "flush_status": "succeeded",
        "rows_seen": 4,
        "rows_created": 0,
        "rows_updated": 4,
        "rows_confirmed": 4,
    }
    assert RunState.objects.get(run=run).rows_confirmed == 4


def test_a_failed_flush_confirms_nothing() -> None:
    synced_run("s", keys(0, 5))
    run = services.create_run("s")
    with pytest.raises(FlushFailed):
        services.flush_projects(run, [*project_rows(keys(0, 2)), {"key": "x"}], batch_size=2)

    closed = services.complete_run(run)

    assert closed.state.status == RunStatus.FAILED
    assert closed.state.rows_confirmed == 0
    assert not Project.objects.filter(last_confirmed_run=run).exists()
    assert RunEvent.objects.get(run=run, type="run.failed").payload["reason"] == "flush_failed"


def test_a_run_that_never_flushed_completes_and_confirms_nothing() -> None:
    synced_run("s", keys(0, 5))
    run = services.create_run("s")
    closed = services.complete_run(run)
    assert (closed.state.status, closed.state.rows_confirmed) == (RunStatus.COMPLETED, 0)


def test_complete_run_is_atomic_under_faults() -> None:
    synced_run("s", keys(0, 5))
    run = services.create_run("s")
    services.flush_projects(run, project_rows(keys(0, 5)))

    statements = assert_atomic_under_faults(lambda: services.complete_run(run))

    assert statements >= 4  # lock, confirm, state, event
    assert Project.objects.filter(last_confirmed_run=run).count() == 5


def test_track_run_completes_on_normal_exit() -> None:
    with services.track_run("s", run_id="job-1", metadata={"job": "x"}) as run:
        services.flush_projects(run, project_rows(keys(0, 3)))
        assert services.get_run(run.pk).state.status == RunStatus.ACTIVE
    state = services.get_run("job-1").state
    assert (state.status, state.rows_confirmed) == (RunStatus.COMPLETED, 3)
    assert services.get_run("job-1").metadata == {"job": "x"}


def test_track_run_fails_the_run_and_reraises() -> None:
    with pytest.raises(KeyError), services.track_run("s", run_id="job-1"):
        raise KeyError("boom")
    state = services.get_run("job-1").state
    assert state.status == RunStatus.FAILED
    assert state.error == "KeyError: 'boom'"


def test_track_run_is_fail_safe_when_the_job_swallows_a_failed_flush() -> None:
    with services.track_run("s", run_id="job-1") as run, pytest.raises(FlushFailed):
        services.flush_projects(run, [{"key": None}])
    state = services.get_run("job-1").state
    assert (state.status, state.flush_status) == (RunStatus.FAILED, FlushStatus.FAILED)


def test_track_run_leaves_a_run_the_block_closed() -> None:
    with services.track_run("s", run_id="job-1") as run:
        services.fail_run(run, "given up")
    state = services.get_run("job-1").state
    assert (state.status, state.error) == (RunStatus.FAILED, "given up")


def test_track_run_refuses_a_busy_scope_and_writes_nothing() -> None:
    services.create_run("s")
    before = snapshot()
    with pytest.raises(RunInProgress), services.track_run("s"):
        pytest.fail("the block must not run")  # pragma: no cover
    assert snapshot() == before
