"""Stale runs: fail_stale_runs, reaping in create_run, and the zombie that must not write."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.test import override_settings
from django.utils import timezone

from runs_app import services
from runs_app.exceptions import (
    InvalidInput,
    RunAlreadyExists,
    RunClosed,
    RunInProgress,
)
from runs_app.models import Run, RunEvent, RunState, RunStatus
from tests.helpers import assert_atomic_under_faults, keys, project_rows, stored, synced_run

pytestmark = pytest.mark.django_db


def age(run: Run, seconds: float) -> None:
    """Pretend the run's process last sent a heartbeat ``seconds`` ago."""
    RunState.objects.filter(run=run).update(
        heartbeat_at=timezone.now() - timedelta(seconds=seconds)
    )


def status(run: Run) -> str:
    return RunState.objects.get(run=run).status


def test_fail_stale_runs_fails_only_runs_without_a_recent_heartbeat() -> None:
    stale, fresh, done = (services.create_run(scope) for scope in ("a", "b", "c"))
    services.complete_run(done)
    age(stale, 3601)
    age(fresh, 3500)
    age(done, 99999)

    assert services.fail_stale_runs() == 1

    assert (status(stale), status(fresh), status(done)) == ("failed", "active", "completed")
    event = RunEvent.objects.get(run=stale, type="run.failed")
    assert event.payload["reason"] == "stale"
    assert event.payload["error"].startswith("stale: no heartbeat since ")
    assert services.fail_stale_runs() == 0


def test_a_heartbeat_keeps_a_run_alive() -> None:
    run = services.create_run("a")
    age(run, 7200)
    services.heartbeat(run)
    assert services.fail_stale_runs() == 0
    assert status(run) == "active"


@pytest.mark.parametrize("older_than", [60, 60.0, timedelta(minutes=1)])
def test_older_than_takes_seconds_or_a_timedelta(older_than: Any) -> None:
    run = services.create_run("a")
    age(run, 61)
    assert services.fail_stale_runs(older_than) == 1


@override_settings(RUNS_APP={"RUN_STALE_AFTER": 10})
def test_the_default_threshold_is_a_setting() -> None:
    run = services.create_run("a")
    age(run, 11)
    assert services.fail_stale_runs() == 1


@pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf"), "60", True, timedelta(0)])
def test_bad_older_than_is_refused(bad: Any) -> None:
    with pytest.raises(InvalidInput) as caught:
        services.fail_stale_runs(bad)
    assert caught.value.field == "older_than"


def test_fail_stale_runs_is_atomic_under_faults() -> None:
    run = services.create_run("a")
    age(run, 7200)
    assert assert_atomic_under_faults(services.fail_stale_runs) >= 3
    assert status(run) == "failed"


def test_create_run_reaps_a_stale_run_of_its_scope_only() -> None:
    crashed = services.create_run("a")
    elsewhere = services.create_run("b")
    age(crashed, 7200)
    age(elsewhere, 7200)

    new = services.create_run("a")

    assert (status(crashed), status(new), status(elsewhere)) == ("failed", "active", "active")
    assert RunEvent.objects.get(run=crashed, type="run.failed").payload["reason"] == "stale"


def test_create_run_still_refuses_a_live_run() -> None:
    services.create_run("a")
    with pytest.raises(RunInProgress):
        services.create_run("a")


def test_reaping_in_create_run_is_atomic_under_faults() -> None:
    crashed = services.create_run("a")
    age(crashed, 7200)
    assert assert_atomic_under_faults(lambda: services.create_run("a", run_id="new")) >= 5
    assert (status(crashed), RunState.objects.get(run_id="new").status) == ("failed", "active")


def test_a_failed_creation_rolls_the_reaping_back() -> None:
    crashed = services.create_run("a", run_id="taken")
    age(crashed, 7200)
    with pytest.raises(RunAlreadyExists):
        services.create_run("a", run_id="taken")
    assert status(crashed) == "active"


def test_the_zombie_writes_nothing_and_the_new_run_keeps_what_it_saw() -> None:
    """Run A's process hangs mid-flush, A is reaped as stale, run B starts and finishes; then A's
    process wakes up. Its next batch must raise (the run is closed) and write nothing, and B's
    cleanup must keep every row B saw."""
    synced_run("s", keys(0, 20), "v0")
    run_a = services.create_run("s")
    run_b: dict[str, Run] = {}

    def a_source() -> Iterator[dict[str, Any]]:
        yield from project_rows(keys(0, 5), "A")  # batch 1: committed
        # A hangs here. It is reaped; B runs a whole cycle.
        age(run_a, 7200)
        b = services.create_run("s")
        services.flush_projects(b, project_rows(keys(0, 15), "B"))
        services.complete_run(b)
        run_b["run"] = b
        yield from project_rows(keys(15, 20), "A")  # batch 2: A's process wakes up
        yield from project_rows(keys(100, 105), "A")

    with pytest.raises(RunClosed):
        services.flush_projects(run_a, a_source(), batch_size=5)

    assert status(run_a) == RunStatus.FAILED
    b = run_b["run"]
    rows = stored("s")
    assert not any(seen_by == run_a.pk for _, _, seen_by in rows.values())
    assert not set(keys(100, 105)) & set(rows)
    assert all(rows[key][1:] == ({"v": "B"}, b.pk) for key in keys(0, 15))

    # A's process carries on regardless: every later call refuses too.
    with pytest.raises(RunClosed):
        services.flush_projects(run_a, project_rows(keys(0, 20), "A"))

    result = services.safe_cleanup_old_projects(b)
    assert result.removed == 5  # p015-p019, last seen by the old run only
    assert stored("s") == {key: (f"Name {key}", {"v": "B"}, b.pk) for key in keys(0, 15)}
