"""Attacks on the incremental source state (issue 15): the job shapes most likely to put a cursor
ahead of the rows committed, to make a failed, active or cut-off run's cursor a starting point,
or to let an incremental run clean up.

In process (SQLite and PostgreSQL): a source raising on the look-ahead row, pages of exactly
``batch_size`` rows, empty writes, savepoints and the caller's transaction, a run reaped between
two writes, several sessions of one run, odd and bad cursor values, cleanup's force / approve /
dry run of an incremental run, an operator deleting runs. With worker processes (PostgreSQL): two
workers of one run (one fails), ``complete_run`` racing a batch or a close, ``fail_stale_runs``
reaping a run mid-batch; and the plan of the cursor read on a database without statistics.

Orders are enforced with marker files and ``pg_stat_activity`` (as in ``test_reversible_races``),
never with sleeps.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.db import connection, transaction
from django.test import override_settings
from django.utils import timezone

from runs_app import services
from runs_app.db import table
from runs_app.exceptions import (
    CleanupRefused,
    FlushFailed,
    FlushInTransaction,
    InvalidInput,
    RunClosed,
)
from runs_app.models import (
    FlushMode,
    Project,
    Run,
    RunEvent,
    RunFlushSession,
    RunModelState,
    RunState,
    RunStatus,
)
from runs_app.services.source_state import CURSOR_MAX_BYTES
from runs_app.services.validation import JSON_MAX_DEPTH
from tests.helpers import (
    WORKER_PRELUDE,
    StatementCounter,
    Workers,
    finish_worker,
    keys,
    project_rows,
    snapshot,
    stored,
    synced_run,
    waiting_on_a_lock,
)
from tests.relay_helpers import wait_until
from tests.tracked_app.models import Device

pytestmark = pytest.mark.django_db


def completed_with_cursor(scope: str, cursor: Any, rows: list[str] | None = None) -> Run:
    """A completed incremental run of ``scope`` that wrote ``rows`` with ``cursor``."""
    run = services.create_run(scope)
    with services.flush(run, incremental=True) as flush:
        flush.write(project_rows(rows or []), cursor=cursor)
    done = services.complete_run(run)
    assert done.state.status == RunStatus.COMPLETED
    return done


def line(run: Run | str, model: str = "runs_app.project") -> RunModelState:
    return RunModelState.objects.get(run_id=getattr(run, "pk", run), model=model)


def flushed_cursors(run: Run | str) -> list[Any]:
    """The cursor of each ``projects.flushed`` event of the run, in order (None: none)."""
    events = RunEvent.objects.filter(run_id=getattr(run, "pk", run), type="projects.flushed")
    return [event.payload.get("cursor") for event in events.order_by("seq")]


# -- the look-ahead and batch boundaries --------------------------------------------------------


def rows_then_raise(count: int) -> Iterator[dict[str, Any]]:
    yield from project_rows(keys(0, count))
    raise TimeoutError("source died while the flush read one row ahead")


@pytest.mark.parametrize("before_failure", [2, 4])
def test_a_source_raising_on_the_look_ahead_row_commits_no_batch_with_the_cursor(
    before_failure: int,
) -> None:
    """batch_size 2: the source hands out 2 (or 4) rows, then raises when the flush reads one row
    ahead to learn whether the full batch before it is the write's last. That batch must not
    have been committed, least of all with the cursor."""
    start = completed_with_cursor("s", "c0")
    run = services.create_run("s")
    with (
        pytest.raises(FlushFailed, match="TimeoutError"),
        services.flush(run, incremental=True, batch_size=2) as flush,
    ):
        flush.write(rows_then_raise(before_failure), cursor="c1")
    # 4 rows: the first batch was committed (the look-ahead row came), without the cursor; the
    # second was read, then the look-ahead raised: not committed.
    committed = keys(0, before_failure - 2)
    assert sorted(Project.objects.filter(last_seen_run=run).values_list("key", flat=True)) == (
        committed
    )
    assert flushed_cursors(run) == [None] * len(committed[::2])
    assert line(run).cursor is None
    assert services.complete_run(run).state.status == RunStatus.FAILED
    assert services.source_state("s", Project).run_id == start.pk


@pytest.mark.parametrize("with_cursor", [True, False])
def test_a_multiple_of_batch_size_needs_no_extra_batch_for_the_cursor(with_cursor: bool) -> None:
    """6 rows, batch_size 3: two batches either way; the cursor rides on the second (the look-ahead
    found the end), not on an empty third transaction."""
    run = services.create_run("s")
    extra = {"cursor": 6} if with_cursor else {}
    with services.flush(run, incremental=True, batch_size=3) as flush:
        result = flush.write((row for row in project_rows(keys(0, 6))), **extra)
        assert result.seen == 6
    session = RunFlushSession.objects.get(run=run)
    assert session.batches == 2
    assert flushed_cursors(run) == [None, 6 if with_cursor else None]
    assert line(run).cursor == (6 if with_cursor else None)
    assert services.complete_run(run).state.status == RunStatus.COMPLETED


def test_empty_writes_with_and_without_a_cursor() -> None:
    completed_with_cursor("s", "c0")
    run = services.create_run("s")
    with services.flush(run, incremental=True, batch_size=3) as flush:
        counter = StatementCounter()
        with connection.execute_wrapper(counter):
            assert flush.write([]).seen == 0
            assert flush.write(iter(())).seen == 0
        assert counter.count == 0  # nothing to write, no transaction
        assert flush.write([], cursor="c1").seen == 0  # a transaction of its own
        # Three full batches, then an empty page moving the cursor on.
        flush.write(project_rows(keys(0, 3)), cursor="c2")
        flush.write([], cursor="c3")
    assert RunFlushSession.objects.get(run=run).batches == 3
    assert flushed_cursors(run) == ["c1", "c2", "c3"]
    assert line(run).cursor == "c3"
    services.complete_run(run)
    assert services.source_state("s", Project).cursor == "c3"


# -- the caller's transactions ------------------------------------------------------------------


def test_a_callers_transaction_around_the_whole_session_is_refused_before_anything() -> None:
    completed_with_cursor("s", "c0")
    run = services.create_run("s")
    before = snapshot()
    with (
        pytest.raises(FlushInTransaction),
        transaction.atomic(),
        services.flush(run, incremental=True) as flush,
    ):
        flush.write(project_rows(keys(0, 2)), cursor="c1")
    assert snapshot() == before
    assert services.source_state("s", Project).cursor == "c0"


def test_a_savepoint_rolled_back_around_a_cursor_only_write_fails_the_session() -> None:
    """Rows and a first cursor committed; the page that only moves the cursor on is rolled back
    by the caller's savepoint: the line keeps the first cursor, the session fails at close (a
    batch it wrote is gone), the run fails, and neither cursor becomes the state."""
    completed_with_cursor("s", "c0")
    run = services.create_run("s")
    with (
        pytest.raises(FlushFailed, match="rolled back"),
        services.flush(run, incremental=True) as flush,
    ):
        flush.write(project_rows(keys(0, 2)), cursor="c1")
        with transaction.atomic():
            flush.write([], cursor="c2")
            assert line(run).cursor == "c2"
            transaction.set_rollback(True)
        assert line(run).cursor == "c1"
        # Writing the page again does not make up for it: the count of batches still differs.
        flush.write([], cursor="c2")
    assert services.complete_run(run).state.status == RunStatus.FAILED
    assert services.source_state("s", Project).cursor == "c0"


# -- runs closed under a session -----------------------------------------------------------------


def test_a_run_reaped_between_two_writes_never_makes_its_cursor_the_state() -> None:
    completed_with_cursor("s", "c0")
    run = services.create_run("s")
    with (
        pytest.raises(RunClosed),
        services.flush(run, incremental=True, batch_size=2) as flush,
    ):
        flush.write(project_rows(keys(0, 2)), cursor="c1")
        RunState.objects.filter(run=run).update(heartbeat_at=timezone.now() - dt.timedelta(hours=2))
        assert services.fail_stale_runs(older_than=3600) == 1
        flush.write(project_rows(keys(2, 4)), cursor="c2")
    assert line(run).cursor == "c1"  # committed with its rows, before the reaping
    assert Project.objects.filter(last_seen_run=run).count() == 2
    state = services.source_state("s", Project)
    assert state.cursor == "c0"
    # The next run starts from c0, not from the reaped run's c1.
    nxt = services.create_run("s")
    with services.flush(nxt, incremental=True) as flush:
        assert (flush.cursor, flush.cursor_run) == ("c0", state.run_id)
        flush.write([], cursor="c1")
    services.complete_run(nxt)


def test_with_several_sessions_the_last_cursor_written_is_the_runs() -> None:
    """Two sessions of one run (two workers of one source) each set a cursor: one line holds one
    cursor, the last written, whatever it means. A job splitting one source across workers must
    set the cursor from one of them (or a value covering both): runs_app cannot compare them."""
    run = services.create_run("s")
    with (
        services.flush(run, incremental=True) as first,
        services.flush(run, incremental=True) as second,
    ):
        first.write(project_rows(keys(0, 2)), cursor={"shard": "a", "at": 10})
        second.write(project_rows(keys(2, 4)), cursor={"shard": "b", "at": 5})
    services.complete_run(run)
    assert services.source_state("s", Project).cursor == {"shard": "b", "at": 5}


# -- cursor values ------------------------------------------------------------------------------


def nested(depth: int) -> Any:
    """A list nested ``depth`` deep around 0 (``[[0]]`` is 2)."""
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


ODD_CURSORS = {
    "unicode": "änderung/📦/\u2028/\\u0000 as text",
    "unicode-keys": {"überall": {"日本": [1, "\U0001d518"]}, "": ""},
    "huge-int": 10**4000,
    "negative-int": -(2**70),
    "float": 0.30000000000000004,
    "false": False,
    "zero": 0,
    "empty-string": "",
    "empty-list": [],
    "empty-object": {},
    "tuple": (1, "a"),
    "deepest": nested(JSON_MAX_DEPTH - 1),
    "exactly-the-limit": "é" * ((CURSOR_MAX_BYTES - 2) // 2),
}


@pytest.mark.parametrize("cursor", ODD_CURSORS.values(), ids=ODD_CURSORS.keys())
def test_odd_but_valid_cursors_come_back_as_they_were_written(cursor: Any) -> None:
    expected = json.loads(json.dumps(cursor))  # a tuple comes back as a list
    run = completed_with_cursor("s", cursor, keys(0, 1))
    assert line(run).cursor == expected
    assert flushed_cursors(run) == [expected]
    state = services.source_state("s", Project)
    assert (state.cursor, state.run_id) == (expected, run.pk)
    nxt = services.create_run("s")
    with services.flush(nxt, incremental=True) as flush:
        assert flush.cursor == expected


class Opaque:
    pass


BAD_CURSORS = {
    "int-key": ({1: "a"}, "non-string key", None),
    "none-key": ({"ok": {None: 1}}, "non-string key", None),
    "tuple-key": ({("a", "b"): 1}, "non-string key", None),
    "lone-surrogate": ("\ud800", "not valid Unicode", None),
    "lone-surrogate-in-key": ({"k\udfff": 1}, "not valid Unicode", None),
    "nul-in-key": ({"a\x00": 1}, "NUL", "no NUL"),
    "minus-infinity": ([float("-inf")], "-inf", None),
    "too-many-digits": (10**5000, "cannot be written as JSON", None),
    "too-deep": (nested(JSON_MAX_DEPTH), f"deeper than {JSON_MAX_DEPTH}", JSON_MAX_DEPTH),
    "datetime": (dt.datetime(2026, 1, 1, tzinfo=dt.UTC), "datetime", None),
    "decimal": (Decimal("1.5"), "Decimal", None),
    "bytes": (b"token", "bytes", None),
    "object": (Opaque(), "Opaque", None),
    "one-byte-over": (
        "é" * ((CURSOR_MAX_BYTES - 2) // 2) + "x",
        "CURSOR_MAX_BYTES",
        CURSOR_MAX_BYTES,
    ),
}


@pytest.mark.parametrize(
    ("cursor", "needle", "limit"), BAD_CURSORS.values(), ids=BAD_CURSORS.keys()
)
def test_bad_cursors_are_refused_naming_the_cursor_with_nothing_written(
    cursor: Any, needle: str, limit: Any
) -> None:
    run = services.create_run("s")
    with services.flush(run, incremental=True, batch_size=2) as flush:
        before = snapshot()
        rows_read = []

        def source() -> Iterator[dict[str, Any]]:
            for row in project_rows(keys(0, 3)):
                rows_read.append(row)
                yield row

        with pytest.raises(InvalidInput) as refused:
            flush.write(source(), cursor=cursor)
        assert (refused.value.field, refused.value.limit) == ("cursor", limit)
        assert needle in str(refused.value)
        assert rows_read == []  # refused before the source was read
        assert snapshot() == before
        flush.write(project_rows(keys(0, 3)), cursor="ok")  # the session is still usable
    assert services.complete_run(run).state.status == RunStatus.COMPLETED
    assert services.source_state("s", Project).cursor == "ok"


# -- cleanup of incremental runs ----------------------------------------------------------------


def incremental_run_missing_rows() -> Run:
    """Scope "s": p000-p009 from a full run, then a completed incremental run that read one
    change (p000): a full run would have removed p001-p009."""
    synced_run("s", keys(0, 10))
    return completed_with_cursor("s", "c1", keys(0, 1))


@override_settings(RUNS_APP={"CLEANUP_MAX_DELETE_FRACTION": 1.0})
def test_an_incremental_runs_cleanup_cannot_be_forced_approved_or_dry_run_past() -> None:
    run = incremental_run_missing_rows()
    preview = services.safe_cleanup(run, Project, dry_run=True)
    assert (preview.dry_run, preview.refusal, preview.removed) == (True, "incremental_run", 0)
    assert "incrementally" in preview.refusal_message
    for attempt in ({"force": True}, {"approve": 9, "approved_by": "ops"}, {}):
        with pytest.raises(CleanupRefused) as refused:
            services.safe_cleanup(run, Project, **attempt)
        assert refused.value.reason in ("incremental_run", "nothing_withheld"), attempt
    assert (line(run).cleanup_reason, line(run).withheld_count) == ("incremental_run", None)
    assert sorted(stored("s")) == keys(0, 10)
    # The command's --force goes the same way.
    with pytest.raises(CleanupRefused) as refused:
        services.safe_cleanup_old_projects(run, force=True)
    assert refused.value.reason == "incremental_run"
    assert sorted(stored("s")) == keys(0, 10)


def test_a_run_incremental_for_one_model_still_cleans_up_the_model_it_read_in_full() -> None:
    device = {"uid": "1" * 32, "name": "d1"}
    first = services.create_run("s")
    with services.flush(first, Device) as flush:
        flush.write([device, {"uid": "2" * 32, "name": "d2"}])
    with services.flush(first, incremental=True) as flush:
        flush.write(project_rows(keys(0, 4)), cursor=1)
    services.complete_run(first)
    run = services.create_run("s")
    with services.flush(run, Device) as flush:  # full: device 2 is gone
        flush.write([device])
    with services.flush(run, incremental=True) as flush:  # incremental: p001-p003 not read
        flush.write(project_rows(keys(0, 1)), cursor=2)
    services.complete_run(run)
    with override_settings(RUNS_APP={"CLEANUP_MAX_DELETE_FRACTION": 1.0}):
        assert services.safe_cleanup(run, Device).removed == 1
        with pytest.raises(CleanupRefused) as refused:
            services.safe_cleanup(run, Project, force=True)
    assert refused.value.reason == "incremental_run"
    assert sorted(stored("s")) == keys(0, 4)


# -- operators -----------------------------------------------------------------------------------


def test_deleting_the_run_that_holds_the_state_falls_back_to_an_older_cursor() -> None:
    """An operator deletes (ORM, cascading) the completed run whose cursor is the state: the
    state is the previous completed run's cursor, older, so the next run reads more, never
    less; with no completed run left, None (read everything)."""
    oldest = completed_with_cursor("s", 1)
    newest = completed_with_cursor("s", 2)
    assert services.source_state("s", Project).run_id == newest.pk
    Run.objects.filter(pk=newest.pk).delete()
    assert (services.source_state("s", Project).cursor, oldest.pk) == (1, oldest.pk)
    Run.objects.filter(pk=oldest.pk).delete()
    assert services.source_state("s", Project).cursor is None


def test_the_line_is_the_only_record_of_an_incremental_read() -> None:
    """``flush_mode`` on the run's line of the model is what cleanup trusts: an operator setting
    it to incremental makes a full run's cleanup refuse (the safe direction; the other one,
    incremental -> full, would let the run remove rows it never read, and nothing else keeps
    the fact: the admin shows these lines read-only)."""
    synced_run("s", keys(0, 10))
    run = synced_run("s", keys(0, 5))
    RunModelState.objects.filter(run=run).update(flush_mode=FlushMode.INCREMENTAL)
    with pytest.raises(CleanupRefused) as refused:
        services.safe_cleanup_old_projects(run, force=True)
    assert refused.value.reason == "incremental_run"
    assert len(stored("s")) == 10


# -- worker processes (PostgreSQL) ----------------------------------------------------------------

WORKER = (
    WORKER_PRELUDE
    + r"""
from django.db import connection
from runs_app import services
from runs_app.exceptions import FlushFailed, RunClosed

def hold_after(starts, contains):
    # Holds the transaction open (its locks taken) after the first statement that starts with
    # `starts` and contains `contains`, until the marker "<name>-go".
    held = []
    def wrapper(execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        if not held and sql.startswith(starts) and contains in sql:
            held.append(sql)
            mark(f"{args['name']}-held")
            wait_for(f"{args['name']}-go")
        return result
    return wrapper

NO_HOLD = lambda execute, sql, params, many, context: execute(sql, params, many, context)

if role == "writer":
    # One incremental session of run_id: waits for "<name>-write", writes `keys` with `cursor`
    # (held mid-batch after the cursor's UPDATE with "hold": "batch"), marks "<name>-written",
    # waits for "<name>-leave", then leaves its block normally or, with "fail", by raising.
    batch = hold_after('UPDATE "runs_app_runmodelstate" SET "cursor"', "")
    # The close's UPDATE of its session (a failure's says "error" too; a batch's starts "WITH").
    close = hold_after('UPDATE "runs_app_runflushsession" SET "status"', '"closed_at"')
    try:
        with connection.execute_wrapper(close if args.get("hold") == "close" else NO_HOLD):
            with services.flush(args["run_id"], incremental=True) as flush:
                out["start"] = flush.cursor
                mark(f"{args['name']}-opened")
                wait_for(f"{args['name']}-write")
                rows = [{"key": key, "name": key} for key in args["keys"]]
                with connection.execute_wrapper(batch if args.get("hold") == "batch" else NO_HOLD):
                    flush.write(rows, cursor=args["cursor"])
                mark(f"{args['name']}-written")
                wait_for(f"{args['name']}-leave")
                if args.get("fail"):
                    raise RuntimeError("worker failed after writing its page")
        out["outcome"] = "ok"
    except FlushFailed as exc:
        out["outcome"] = "FlushFailed"
        out["error"] = str(exc)
    except RunClosed:
        out["outcome"] = "RunClosed"

elif role == "complete":
    out["status"] = services.complete_run(args["run_id"]).state.status

elif role == "reap":
    out["reaped"] = services.fail_stale_runs(older_than=0.001)

print(json.dumps(out))
"""
)

WORKERS = Workers(WORKER)


@pytest.fixture
def workers() -> Iterator[Workers]:
    yield WORKERS
    WORKERS.kill_leftovers()


def finish(process: subprocess.Popen[str]) -> dict[str, Any]:
    return finish_worker(process, 120)


def marker(directory: Path, name: str) -> None:
    wait_until(lambda: (directory / name).exists(), 90, name)


def go(directory: Path, name: str) -> None:
    (directory / name).write_text("1")


RUN_LOCK = "FOR NO KEY UPDATE"


def open_writer(
    workers: Workers, directory: Path, name: str, run_id: str, cursor: Any, **args: Any
) -> subprocess.Popen[str]:
    """A writer worker whose session is open (its start cursor read)."""
    process = workers.start("writer", directory, name=name, run_id=run_id, cursor=cursor, **args)
    marker(directory, f"{name}-opened")
    return process


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_two_workers_of_one_run_one_failing_neither_cursor_becomes_the_state(
    tmp_path: Path, workers: Workers
) -> None:
    start = completed_with_cursor("w", "c0", keys(0, 2))
    run = services.create_run("w")
    a = open_writer(workers, tmp_path, "a", run.pk, "a1", keys=keys(10, 13))
    b = open_writer(workers, tmp_path, "b", run.pk, "b1", keys=keys(20, 23), fail=True)
    for name in ("a", "b"):
        go(tmp_path, f"{name}-write")
        marker(tmp_path, f"{name}-written")
    assert line(run).cursor == "b1"  # the last written, committed with b's rows
    go(tmp_path, "b-leave")
    failed = finish(b)
    go(tmp_path, "a-leave")
    closed = finish(a)
    assert (failed["outcome"], failed["start"], closed["start"]) == ("FlushFailed", "c0", "c0")
    assert closed["outcome"] == "FlushFailed" and "another session" in closed["error"]
    assert services.complete_run(run).state.status == RunStatus.FAILED
    state = services.source_state("w", Project)
    assert (state.cursor, state.run_id) == ("c0", start.pk)


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("hold", ["batch", "close"])
def test_complete_run_waiting_on_a_batch_or_a_close_sees_what_it_committed(
    tmp_path: Path, workers: Workers, hold: str
) -> None:
    """The writer holds its batch's transaction (after the cursor's UPDATE) or its close's open;
    ``complete_run`` in another process waits on the run's lock, then sees that transaction
    committed. A batch: the session is still open, so the run fails and the cursor, committed
    with its rows, is not the state. The close: the flush succeeded before completion, so the
    run completes and its cursor is the state."""
    completed_with_cursor("w", "c0")
    run = services.create_run("w")
    writer = open_writer(workers, tmp_path, "w", run.pk, "w1", keys=keys(0, 3), hold=hold)
    go(tmp_path, "w-write")
    if hold == "close":
        marker(tmp_path, "w-written")
        go(tmp_path, "w-leave")
    marker(tmp_path, "w-held")
    completer = workers.start("complete", tmp_path, run_id=run.pk)
    wait_until(lambda: waiting_on_a_lock(RUN_LOCK), 60, "complete_run waiting")
    go(tmp_path, "w-go")
    completed = finish(completer)
    if hold == "batch":
        marker(tmp_path, "w-written")
        go(tmp_path, "w-leave")
    written = finish(writer)
    assert Project.objects.filter(last_seen_run=run).count() == 3
    assert line(run).cursor == "w1"
    if hold == "batch":
        assert (completed["status"], written["outcome"]) == (RunStatus.FAILED, "RunClosed")
        assert services.source_state("w", Project).cursor == "c0"
    else:
        assert (completed["status"], written["outcome"]) == (RunStatus.COMPLETED, "ok")
        assert services.source_state("w", Project).cursor == "w1"


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_complete_run_before_the_write_leaves_no_cursor(tmp_path: Path, workers: Workers) -> None:
    completed_with_cursor("w", "c0")
    run = services.create_run("w")
    writer = open_writer(workers, tmp_path, "w", run.pk, "w1", keys=keys(0, 3))
    assert services.complete_run(run).state.status == RunStatus.FAILED  # a session is open
    go(tmp_path, "w-write")
    assert finish(writer)["outcome"] == "RunClosed"
    assert line(run).cursor is None
    assert not Project.objects.filter(last_seen_run=run).exists()
    assert services.source_state("w", Project).cursor == "c0"


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_a_run_reaped_as_stale_mid_batch_never_makes_its_cursor_the_state(
    tmp_path: Path, workers: Workers
) -> None:
    """The reaper read the run as stale, then waits on the batch holding the run's lock; the
    batch (cursor included) commits, the reaper fails the run: the cursor stays on the failed
    run's line, never the state; the worker's next step finds the run closed."""
    start = completed_with_cursor("w", "c0")
    run = services.create_run("w")
    writer = open_writer(workers, tmp_path, "w", run.pk, "w1", keys=keys(0, 3), hold="batch")
    RunState.objects.filter(run=run).update(heartbeat_at=timezone.now() - dt.timedelta(hours=1))
    go(tmp_path, "w-write")
    marker(tmp_path, "w-held")
    reaper = workers.start("reap", tmp_path)
    wait_until(lambda: waiting_on_a_lock(RUN_LOCK), 60, "the reaper waiting")
    go(tmp_path, "w-go")
    assert finish(reaper)["reaped"] == 1
    marker(tmp_path, "w-written")
    go(tmp_path, "w-leave")
    assert finish(writer)["outcome"] == "RunClosed"
    assert RunState.objects.get(run=run).status == RunStatus.FAILED
    assert line(run).cursor == "w1"
    state = services.source_state("w", Project)
    assert (state.cursor, state.run_id) == ("c0", start.pk)


# -- the plan of the cursor read (PostgreSQL) ------------------------------------------------------


def many_completed_runs(count: int, scope: str) -> None:
    """``count`` completed runs of ``scope``, each with a full line of runs_app.project setting a
    cursor (its ordinal): inserted by SQL, with no ANALYZE since, like a freshly migrated (or
    restored) database."""
    line_defaults = (
        "'succeeded', 0, 0, 0, 0, 'not_run', '', '', 0, false, 'delete', 0, 0, '[]', '', 0, 0, "
        "'', 0, 'full'"
    )
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table(Run)} (id, scope, metadata, last_seq, ordinal, closed, "
            "created_at, trace_context) SELECT 'bulk-' || g, %s, '{}', 0, 1000000 + g, true, "
            "now(), '{}' FROM generate_series(1, %s) g",
            [scope, count],
        )
        cursor.execute(
            f"INSERT INTO {table(RunState)} (run_id, scope, status, error, started_at, "
            "heartbeat_at, flush_error, flush_status, rows_seen, rows_created, rows_updated, "
            "rows_confirmed, cleanup_status, cleanup_reason, cleanup_message, rows_removed, "
            "cleanup_forced) SELECT 'bulk-' || g, %s, 'completed', '', now(), now(), '', "
            "'succeeded', 0, 0, 0, 0, 'not_run', '', '', 0, false FROM generate_series(1, %s) g",
            [scope, count],
        )
        cursor.execute(
            f"INSERT INTO {table(RunModelState)} (run_id, model, flush_status, rows_seen, "
            "rows_created, rows_updated, rows_confirmed, cleanup_status, cleanup_reason, "
            "cleanup_message, rows_removed, cleanup_forced, cleanup_mode, rows_revived, "
            "rows_waiting, withheld_keys, approved_by, rows_restored, restore_conflicts, "
            "restored_by, rows_purged, flush_mode, cursor, cursor_at) SELECT 'bulk-' || g, "
            f"'runs_app.project', {line_defaults}, to_jsonb(g), now() "
            "FROM generate_series(1, %s) g",
            [count],
        )


def lines_probed(plan: dict[str, Any]) -> int:
    """Rows of runs_app_runmodelstate the executed plan read (every loop of every node)."""
    rows = 0
    if plan.get("Relation Name") == "runs_app_runmodelstate":
        rows += int(plan["Actual Rows"] * plan["Actual Loops"])
        rows += int(plan.get("Rows Removed by Filter", 0) * plan["Actual Loops"])
    return rows + sum(lines_probed(child) for child in plan.get("Plans", []))


@pytest.mark.postgresql
def test_the_cursor_read_does_not_probe_every_run_of_the_scope_without_statistics() -> None:
    many_completed_runs(20_000, "big")
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        state = services.source_state("big", Project, before_ordinal=2_000_000)
    assert state.cursor == 20_000
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + queries.captured_queries[-1]["sql"])
        plan = cursor.fetchone()[0][0]["Plan"]
    assert lines_probed(plan) <= 100, json.dumps(plan, indent=1)[:4000]


# -- source_state's own arguments -----------------------------------------------------------------


@pytest.mark.parametrize("before", ["7", True, 0, -1, 1.5], ids=repr)
def test_a_bad_before_ordinal_is_refused_naming_it(before: Any) -> None:
    completed_with_cursor("s", "c0")
    with pytest.raises(InvalidInput) as refused:
        services.source_state("s", Project, before_ordinal=before)
    assert (refused.value.field, refused.value.limit) == ("before_ordinal", 1)


def test_before_ordinal_beyond_any_ordinal_sees_every_completed_run() -> None:
    run = completed_with_cursor("s", "c0")
    assert services.source_state("s", Project, before_ordinal=run.ordinal).cursor is None
    assert services.source_state("s", Project, before_ordinal=run.ordinal + 1).cursor == "c0"
    assert services.source_state("s", Project, before_ordinal=10**30).cursor == "c0"
