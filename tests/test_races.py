"""Races of issue 10 on PostgreSQL, with real worker processes (``python -c`` running Django).

Synchronisation is by marker files in the test's temporary directory, every wait bounded: no
sleep stands in for a condition.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from contextlib import suppress
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import OperationalError, connection, connections, transaction
from django.utils import timezone

from runs_app import services
from runs_app.exceptions import CleanupRefused, RunInProgress
from runs_app.models import Project, RunEvent, RunFlushSession, RunState, RunStatus
from tests.helpers import finish_worker
from tests.relay_helpers import ROOT, database_url, wait_until

pytestmark = [pytest.mark.postgresql, pytest.mark.django_db(transaction=True)]

TOTAL = 1000
PAGE = 100

# The worker: ``python -c WORKER ROLE JSON``. Prints one JSON line with its outcome.
WORKER = r"""
import json, os, sys, time
from pathlib import Path
import django
django.setup()
from runs_app import services
from runs_app.exceptions import CleanupRefused, RunClosed, RunsError

role, args = sys.argv[1], json.loads(sys.argv[2])
directory = Path(args.get("dir", "."))
out = {"role": role}

def wait_for(name, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not (directory / name).exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {name}")
        time.sleep(0.01)

def mark(name):
    (directory / name).write_text("1")

def pages(start, stop):
    for page_start in range(start, stop, 100):
        yield [
            {"key": f"p{i:04d}", "name": f"Project {i}", "data": {"v": "v2"}}
            for i in range(page_start, min(page_start + 100, stop))
        ]

def complete_and_clean(run):
    out["status"] = services.complete_run(run).state.status
    try:
        out["removed"] = services.safe_cleanup_old_projects(run).removed
    except CleanupRefused as exc:
        out["refused"] = exc.reason

if role == "flusher":
    # Opens a session on the shared run, then flushes [start, stop) page by page.
    run, _ = services.ensure_run(args["run_id"], scope=args["scope"])
    name = args["name"]
    try:
        with services.flush(run) as flush:
            mark(f"{name}-open")
            for other in args.get("barrier", []):
                wait_for(f"{other}-open")
            for number, page in enumerate(pages(args["start"], args["stop"])):
                if number == 1 and args.get("pause"):
                    mark(f"{name}-paused")
                    wait_for(f"{name}-go")
                flush.write(page)
        out["flush"] = "closed"
    except RunClosed:
        out["flush"] = "run_closed"
    except RunsError as exc:
        out["flush"] = type(exc).__name__
    if args.get("complete"):
        try:
            complete_and_clean(run)
        except RunClosed:
            out["status"] = "already_closed"
elif role in ("hold", "op"):
    # "hold": close the run inside a transaction left open until the file "go" exists.
    # "op": close it at once (and wait for the lock of a "hold" worker, if any).
    from django.db import transaction
    def close():
        if args["op"] == "reap":
            return services.fail_stale_runs(0.5)
        if args["op"] == "open":
            with services.flush(args["run_id"]):
                pass
            return "opened"
        if args["op"] == "fail":
            return services.fail_run(args["run_id"], f"{role} failed it").state.status
        return services.complete_run(args["run_id"]).state.status
    try:
        if role == "hold":
            with transaction.atomic():
                out["status"] = close()
                mark("held")
                wait_for("go")
        else:
            out["status"] = close()
    except RunClosed:
        out["status"] = "run_closed"
elif role == "appender":
    # For each run in turn: append until the run is closed (bounded).
    counts = []
    for run_id in args["run_ids"]:
        appended = 0
        for index in range(args["max_appends"]):
            try:
                services.append_events(run_id, [services.Event("tick", {"i": index})])
            except RunClosed:
                break
            appended += 1
            if appended == 3:
                mark(f"{run_id}-started")
        counts.append(appended)
    out["counts"] = counts
elif role == "closer":
    for number, run_id in enumerate(args["run_ids"]):
        wait_for(f"{run_id}-started")
        if number % 2:
            services.fail_run(run_id, "closed by the race test")
        else:
            services.complete_run(run_id)
print(json.dumps(out))
"""


def start_worker(role: str, directory: Path, **args: Any) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "DJANGO_SETTINGS_MODULE": "example_project.settings",
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, role, json.dumps({"dir": str(directory), **args})],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    return finish_worker(process, timeout)


def waiting_on_a_lock() -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()"
        )
        return bool(cursor.fetchone()[0])


def seed(scope: str) -> None:
    run = services.create_run(scope)
    services.flush_projects(
        run,
        ({"key": f"p{i:04d}", "name": f"Project {i}", "data": {"v": "v1"}} for i in range(TOTAL)),
    )
    services.complete_run(run)


def keys(scope: str) -> set[str]:
    return set(Project.objects.filter(scope=scope).values_list("key", flat=True))


def expected(stop: int) -> set[str]:
    return {f"p{i:04d}" for i in range(stop)}


def test_two_processes_each_flushing_half_complete_only_when_both_closed(tmp_path: Path) -> None:
    scope = "shared"
    seed(scope)
    services.ensure_run("shared-1", scope=scope)
    common = {"run_id": "shared-1", "scope": scope}
    a = start_worker("flusher", tmp_path, name="a", start=0, stop=500, barrier=["b"], **common)
    b = start_worker("flusher", tmp_path, name="b", start=500, stop=980, barrier=["a"], **common)
    results = [finish(a), finish(b)]
    assert [r["flush"] for r in results] == ["closed", "closed"]
    state = RunState.objects.get(run_id="shared-1")
    assert state.flush_status == "succeeded"
    assert state.rows_seen == 980
    assert services.complete_run("shared-1").state.status == RunStatus.COMPLETED
    assert services.safe_cleanup_old_projects("shared-1").removed == 20
    assert keys(scope) == expected(980)


def test_first_worker_completing_early_fails_the_run_and_deletes_nothing(tmp_path: Path) -> None:
    scope = "early"
    seed(scope)
    services.ensure_run("early-1", scope=scope)
    common = {"run_id": "early-1", "scope": scope}
    b = start_worker("flusher", tmp_path, name="b", start=500, stop=1000, pause=True, **common)
    wait_until(lambda: (tmp_path / "b-paused").exists(), what="worker b mid-flush")
    a = start_worker("flusher", tmp_path, name="a", start=0, stop=500, complete=True, **common)
    result_a = finish(a)
    assert result_a["flush"] == "closed"
    assert result_a["status"] == RunStatus.FAILED
    assert result_a["refused"] == "flush_failed"
    (tmp_path / "b-go").write_text("1")
    assert finish(b)["flush"] == "run_closed"
    assert keys(scope) == expected(TOTAL)
    assert not RunEvent.objects.filter(type="projects.removed").exists()
    # B's later pages were never written.
    assert Project.objects.filter(scope=scope, last_seen_run_id="early-1").count() == 600


def test_racing_workers_that_each_complete_never_lose_a_project(tmp_path: Path) -> None:
    """Both workers open, then flush and complete as fast as they can, over several rounds:
    whoever completes first, the run is completed only if both had closed, and cleanup removes
    exactly the 20 projects gone from the source, or nothing."""
    outcomes = set()
    for round_ in range(4):
        scope = f"race-{round_}"
        seed(scope)
        run_id = f"race-{round_}-run"
        services.ensure_run(run_id, scope=scope)
        directory = tmp_path / str(round_)
        directory.mkdir()
        common = {"run_id": run_id, "scope": scope, "complete": True}
        a = start_worker("flusher", directory, name="a", start=0, stop=500, barrier=["b"], **common)
        b = start_worker(
            "flusher", directory, name="b", start=500, stop=980, barrier=["a"], **common
        )
        results = [finish(a), finish(b)]
        status = RunState.objects.get(run_id=run_id).status
        outcomes.add(status)
        if status == RunStatus.COMPLETED:
            assert keys(scope) in (expected(980), expected(TOTAL))
            assert all(r["flush"] == "closed" for r in results)
        else:
            assert keys(scope) == expected(TOTAL), results
    assert outcomes <= {RunStatus.COMPLETED, RunStatus.FAILED}


def test_append_events_never_lands_after_the_closing_event(tmp_path: Path) -> None:
    rounds = 20
    run_ids = [services.create_run(f"append-{n}").pk for n in range(rounds)]
    appender = start_worker("appender", tmp_path, run_ids=run_ids, max_appends=5000)
    closer = start_worker("closer", tmp_path, run_ids=run_ids)
    finish(closer, timeout=300)
    counts = finish(appender, timeout=300)["counts"]
    assert all(3 <= count < 5000 for count in counts), counts
    for run_id in run_ids:
        events = list(RunEvent.objects.filter(run_id=run_id).order_by("seq"))
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert events[-1].type in {"run.completed", "run.failed"}, (run_id, events[-1].type)
        assert sum(e.type in {"run.completed", "run.failed"} for e in events) == 1


def test_create_run_in_another_scope_does_not_wait_for_an_open_creation(
    django_db_blocker: Any,
) -> None:
    created = threading.Event()
    release = threading.Event()
    errors: list[BaseException] = []

    def holder() -> None:
        try:
            with transaction.atomic():
                services.create_run("scope-y", run_id="held")
                created.set()
                assert release.wait(30), "never released"
        except BaseException as exc:
            errors.append(exc)
            created.set()
        finally:
            connections.close_all()

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert created.wait(30)
        assert not errors
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '2s'")
        try:
            # Another scope: at once, although scope-y's creation has not committed.
            run = services.create_run("scope-x")
            assert run.state.status == RunStatus.ACTIVE
            # Control: the same scope does wait on the open creation (lock timeout).
            with connection.cursor() as cursor:
                cursor.execute("SET lock_timeout = '300ms'")
            with pytest.raises(OperationalError, match="lock timeout"):
                services.create_run("scope-y", run_id="second")
        finally:
            with connection.cursor() as cursor:
                cursor.execute("SET lock_timeout = 0")
    finally:
        release.set()
        thread.join(30)
    assert not thread.is_alive()
    assert not errors, errors
    with pytest.raises(RunInProgress):
        services.create_run("scope-y")
    assert services.latest_run("scope-x") is not None
    held = services.get_run("held")
    assert held.ordinal < services.create_run("scope-z").ordinal


@pytest.mark.parametrize(("first", "second"), [("fail", "complete"), ("complete", "fail")])
def test_closing_a_run_that_another_process_is_closing(
    tmp_path: Path, first: str, second: str
) -> None:
    seed("closing")
    run = services.create_run("closing")
    services.flush_projects(run, [{"key": "p0000", "name": "Project 0"}])
    holder = start_worker("hold", tmp_path, op=first, run_id=run.pk)
    wait_until(lambda: (tmp_path / "held").exists(), what="the first closer holding its lock")
    closer = start_worker("op", tmp_path, op=second, run_id=run.pk)
    wait_until(waiting_on_a_lock, what="the second closer waiting for the run's lock")
    (tmp_path / "go").write_text("1")
    assert finish(holder)["status"] in {RunStatus.FAILED, RunStatus.COMPLETED}
    second_status = finish(closer)["status"]
    closing = list(
        RunEvent.objects.filter(run=run, type__in=["run.completed", "run.failed"]).values_list(
            "type", flat=True
        )
    )
    assert (second_status, len(closing)) == ("run_closed", 1), (second_status, closing)


def test_a_write_waiting_for_a_closing_run_writes_nothing(tmp_path: Path) -> None:
    scope = "late-write"
    seed(scope)
    services.ensure_run("late-1", scope=scope)
    common = {"run_id": "late-1", "scope": scope}
    b = start_worker("flusher", tmp_path, name="b", start=0, stop=300, pause=True, **common)
    wait_until(lambda: (tmp_path / "b-paused").exists(), what="worker b mid-flush")
    holder = start_worker("hold", tmp_path, op="fail", run_id="late-1")
    wait_until(lambda: (tmp_path / "held").exists(), what="the closer holding its lock")
    (tmp_path / "b-go").write_text("1")
    wait_until(waiting_on_a_lock, what="worker b's next batch waiting for the run's lock")
    (tmp_path / "go").write_text("1")
    assert finish(holder)["status"] == RunStatus.FAILED
    result = finish(b)
    # Only page 0 was written before the run was failed; nothing after it.
    stamped = Project.objects.filter(scope=scope, last_seen_run_id="late-1").count()
    after = RunEvent.objects.filter(
        run_id="late-1", seq__gt=RunEvent.objects.get(run_id="late-1", type="run.failed").seq
    )
    assert (result["flush"], stamped, list(after.values_list("type", flat=True))) == (
        "run_closed",
        100,
        [],
    )


def test_a_run_failed_by_one_worker_is_not_completed_by_the_other(tmp_path: Path) -> None:
    """Shape 3 with the stale read: worker B's source fails before its session opens, so B
    fails the shared run; worker A, whose half flushed cleanly, completes at the same moment.
    The run must stay failed and cleanup delete nothing; instead A completes it over B's
    run.failed and its cleanup deletes B's half (500 of 1,000: within the 0.5 fraction guard)."""
    scope = "b-failed"
    seed(scope)
    services.ensure_run("bf-1", scope=scope)
    a = start_worker("flusher", tmp_path, name="a", start=0, stop=500, run_id="bf-1", scope=scope)
    assert finish(a)["flush"] == "closed"
    holder = start_worker("hold", tmp_path, op="fail", run_id="bf-1")
    wait_until(lambda: (tmp_path / "held").exists(), what="worker b failing the run")
    closer = start_worker("op", tmp_path, op="complete", run_id="bf-1")
    wait_until(waiting_on_a_lock, what="worker a's complete_run waiting for the run's lock")
    (tmp_path / "go").write_text("1")
    assert finish(holder)["status"] == RunStatus.FAILED
    completed = finish(closer)["status"]
    removed = 0
    with suppress(CleanupRefused):
        removed = services.safe_cleanup_old_projects("bf-1").removed
    assert (completed, removed, len(keys(scope))) == ("run_closed", 0, TOTAL)


def test_a_session_opening_while_the_run_completes_leaves_its_ledger_alone(
    tmp_path: Path,
) -> None:
    """Shape 4 under a race: a stray session opens while a run that never flushed is being
    completed. It must raise RunClosed and leave the closed run's ledger as it is; instead its
    open, having read the run as active, records an open session and sets flush_status =
    in_progress on the completed run (the open writes no event, so the closed flag never
    stops it), and the run's cleanup now answers flush_failed instead of not_flushed."""
    scope = "stray"
    seed(scope)
    run = services.create_run(scope)
    holder = start_worker("hold", tmp_path, op="complete", run_id=run.pk)
    wait_until(lambda: (tmp_path / "held").exists(), what="the completion holding its lock")
    stray = start_worker("op", tmp_path, op="open", run_id=run.pk)
    wait_until(waiting_on_a_lock, what="the stray session waiting for the run's lock")
    (tmp_path / "go").write_text("1")
    assert finish(holder)["status"] == RunStatus.COMPLETED
    outcome = finish(stray)["status"]
    state = RunState.objects.get(run=run)
    sessions = RunFlushSession.objects.filter(run=run).count()
    assert (outcome, state.flush_status, sessions) == ("run_closed", "not_started", 0)


def test_a_session_opening_on_an_ended_flush_while_the_run_completes(tmp_path: Path) -> None:
    """The same race on a run whose flush ended: the open's flush.failed event meets the closed
    flag, so nothing is written and the good run's cleanup still works."""
    scope = "stray-ended"
    seed(scope)
    run = services.create_run(scope)
    services.flush_projects(
        run, ({"key": f"p{i:04d}", "name": f"Project {i}"} for i in range(TOTAL - 10))
    )
    holder = start_worker("hold", tmp_path, op="complete", run_id=run.pk)
    wait_until(lambda: (tmp_path / "held").exists(), what="the completion holding its lock")
    stray = start_worker("op", tmp_path, op="open", run_id=run.pk)
    wait_until(waiting_on_a_lock, what="the stray session waiting for the run's lock")
    (tmp_path / "go").write_text("1")
    assert finish(holder)["status"] == RunStatus.COMPLETED
    assert finish(stray)["status"] == "run_closed"
    state = RunState.objects.get(run=run)
    assert (state.flush_status, RunFlushSession.objects.filter(run=run).count()) == (
        "succeeded",
        1,
    )
    assert services.safe_cleanup_old_projects(run).removed == 10


def test_reaping_a_run_that_is_being_completed(tmp_path: Path) -> None:
    """fail_stale_runs reads the run as stale before the lock, then waits for a completion in
    flight: it must leave the completed run alone; instead it fails it again (status failed,
    run.completed then run.failed), so the good run's cleanup refuses."""
    scope = "reap"
    seed(scope)
    run = services.create_run(scope)
    services.flush_projects(run, [{"key": f"p{i:04d}", "name": "x"} for i in range(TOTAL)])
    RunState.objects.filter(run=run).update(heartbeat_at=timezone.now() - timedelta(hours=1))
    holder = start_worker("hold", tmp_path, op="complete", run_id=run.pk)
    wait_until(lambda: (tmp_path / "held").exists(), what="the completion holding its lock")
    reaper = start_worker("op", tmp_path, op="reap", run_id=run.pk)
    wait_until(waiting_on_a_lock, what="the reaper waiting for the run's lock")
    (tmp_path / "go").write_text("1")
    assert finish(holder)["status"] == RunStatus.COMPLETED
    reaped = finish(reaper)["status"]
    closing = list(
        RunEvent.objects.filter(run=run, type__in=["run.completed", "run.failed"]).values_list(
            "type", flat=True
        )
    )
    status = RunState.objects.get(run=run).status
    assert (reaped, status, closing) == (0, RunStatus.COMPLETED, ["run.completed"])
