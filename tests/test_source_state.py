"""Incremental source state: a job resumes from the cursor of the last *completed* run.

The cursor is set with the rows it belongs to (the transaction of the write's last batch), read
when an incremental session opens, and becomes the scope's state only by the run completing: a
failed run's cursor is never a starting point. An incremental run's cleanup is refused; full
runs clean up, and only full runs count towards the grace period.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.db import transaction
from django.test import override_settings

from runs_app import services
from runs_app.exceptions import CleanupRefused, FlushFailed, InvalidInput
from runs_app.models import FlushMode, Project, RunEvent, RunModelState, RunStatus
from runs_app.services.source_state import CURSOR_MAX_BYTES
from tests.helpers import (
    StatementCounter,
    check_under_faults,
    keys,
    project_rows,
    snapshot,
    stored,
    synced_run,
)
from tests.tracked_app.models import Device

pytestmark = pytest.mark.django_db

# A source of changes: (version, key) in the order the source hands them out. The cursor is the
# version of the last change read.
CHANGES = [(version, f"p{version:03d}") for version in range(1, 31)]


def changes_since(cursor: int | None, *, fail_after: int | None = None) -> Iterator[list[Any]]:
    """Pages of 5 changes after ``cursor``; with ``fail_after``, the source dies once that many
    pages were handed out."""
    pending = [change for change in CHANGES if cursor is None or change[0] > cursor]
    for page, start in enumerate(range(0, len(pending), 5)):
        if fail_after is not None and page == fail_after:
            raise TimeoutError("source timed out")
        yield pending[start : start + 5]


def incremental_sync(scope: str, *, fail_after: int | None = None) -> tuple[Any, Any]:
    """The job as a user writes it: read the changes since the cursor, page by page, each
    page's rows written with the cursor it brings the source to. Returns (run, start cursor)."""
    run = services.create_run(scope)
    start: Any = None
    try:
        with services.flush(run, incremental=True, batch_size=2) as flush:
            start = flush.cursor
            for page in changes_since(start, fail_after=fail_after):
                rows = [{"key": key, "name": f"v{version}"} for version, key in page]
                flush.write(rows, cursor=page[-1][0])
    except FlushFailed:
        return services.complete_run(run), start  # the job "completes" anyway: failed
    return services.complete_run(run), start


def test_an_incremental_job_resumes_from_the_last_completed_runs_cursor_after_a_failed_run() -> (
    None
):
    # Only 10 changes exist on the first run.
    del CHANGES[10:]
    try:
        first, start = incremental_sync("crm")
        assert (first.state.status, start) == (RunStatus.COMPLETED, None)
        assert services.source_state("crm", Project).cursor == 10
        CHANGES.extend((version, f"p{version:03d}") for version in range(11, 31))

        # The second run reads 2 pages (changes 11-20, cursor 20 committed with them), then the
        # source dies: the run fails, and its cursor is not the scope's state.
        second, start = incremental_sync("crm", fail_after=2)
        assert (second.state.status, start) == (RunStatus.FAILED, 10)
        line = RunModelState.objects.get(run=second)
        assert (line.cursor, line.flush_mode) == (20, FlushMode.INCREMENTAL)
        state = services.source_state("crm", Project)
        assert (state.cursor, state.run_id) == (10, first.pk)

        # The third run starts from the first run's cursor, so changes 11-20 are read again:
        # nothing is skipped.
        third, start = incremental_sync("crm")
        assert (third.state.status, start) == (RunStatus.COMPLETED, 10)
        assert services.source_state("crm", Project).cursor == 30
        assert sorted(stored("crm")) == [key for _, key in CHANGES]
        assert {row[2] for key, row in stored("crm").items() if key > "p010"} == {third.pk}
        assert RunModelState.objects.get(run=third).rows_seen == 20
    finally:
        CHANGES[:] = [(version, f"p{version:03d}") for version in range(1, 31)]


def test_the_cursor_is_committed_with_the_last_batch_of_its_write() -> None:
    run = services.create_run("s")
    with services.flush(run, incremental=True, batch_size=2) as flush:
        flush.write(project_rows(keys(0, 5)), cursor={"page": 1})
        events = list(RunEvent.objects.filter(run=run, type="projects.flushed").order_by("seq"))
        assert [event.payload.get("cursor") for event in events] == [None, None, {"page": 1}]
        assert RunModelState.objects.get(run=run).cursor == {"page": 1}
        # An empty page that moves the cursor: a transaction of its own, counted as a batch.
        flush.write([], cursor={"page": 2})
    line = RunModelState.objects.get(run=run)
    assert (line.cursor, line.rows_seen, line.cursor_at is not None) == ({"page": 2}, 5, True)
    last = RunEvent.objects.filter(run=run, type="projects.flushed").order_by("-seq").first()
    assert last is not None and last.payload["seen"] == 0 and last.payload["cursor"] == {"page": 2}
    assert services.complete_run(run).state.status == RunStatus.COMPLETED


def test_a_cursor_adds_one_statement_to_the_last_batch_only() -> None:
    run = services.create_run("s")
    with services.flush(run, batch_size=10) as flush:
        flush.write(project_rows(keys(0, 10)))  # warm up (schema, first batch)
        plain = StatementCounter()
        with transaction.get_connection().execute_wrapper(plain):
            flush.write(project_rows(keys(10, 30)))
        with_cursor = StatementCounter()
        with transaction.get_connection().execute_wrapper(with_cursor):
            flush.write(project_rows(keys(30, 50)), cursor="x")
    assert with_cursor.count == plain.count + 1


def test_a_rolled_back_batch_takes_its_cursor_with_it() -> None:
    synced = services.create_run("s")
    with services.flush(synced, incremental=True) as flush:
        flush.write(project_rows(keys(0, 2)), cursor=1)
    services.complete_run(synced)
    run = services.create_run("s")
    with (
        pytest.raises(FlushFailed, match="rolled back"),
        services.flush(run, incremental=True) as flush,
        transaction.atomic(),
    ):
        flush.write(project_rows(keys(2, 4)), cursor=2)
        transaction.set_rollback(True)
    assert RunModelState.objects.get(run=run).cursor is None
    assert services.complete_run(run).state.status == RunStatus.FAILED
    assert services.source_state("s", Project).cursor == 1


def test_the_starting_cursor_is_read_when_the_session_opens_and_per_model() -> None:
    run = services.create_run("t1")
    with services.flush(run, incremental=True) as flush:
        flush.write(project_rows(keys(0, 1)), cursor="projects-1")
    with services.flush(run, Device, incremental=True) as flush:
        assert flush.cursor is None
        flush.write([{"uid": "7" * 32, "name": "d"}], cursor="devices-1")
    services.complete_run(run)
    run2 = services.create_run("t1")
    # A second worker of the same run starts from the same committed state, not from what the
    # first one wrote meanwhile.
    with (
        services.flush(run2, incremental=True) as first,
        services.flush(run2, incremental=True) as second,
    ):
        first.write(project_rows(keys(1, 2)), cursor="projects-2")
        assert (second.cursor, second.cursor_run) == ("projects-1", run.pk)
    with services.flush(run2, Device, incremental=True) as devices:
        assert devices.cursor == "devices-1"
    services.complete_run(run2)
    assert services.source_state("t1", Project).cursor == "projects-2"
    assert services.source_state("t1", Device).cursor == "devices-1"  # run2 set none
    assert services.source_state("other", Project).cursor is None


def test_a_full_session_has_no_cursor_to_read_but_may_set_one() -> None:
    run = services.create_run("s")
    with services.flush(run) as flush:
        with pytest.raises(RuntimeError, match="incremental=True"):
            _ = flush.cursor
        flush.write(project_rows(keys(0, 3)), cursor="after-full")
    services.complete_run(run)
    assert RunModelState.objects.get(run=run).flush_mode == FlushMode.FULL
    assert services.safe_cleanup_old_projects(run).refusal is None
    run2 = services.create_run("s")
    with services.flush(run2, incremental=True) as flush:
        assert flush.cursor == "after-full"
        flush.write([])


def test_one_incremental_session_makes_the_run_incremental() -> None:
    synced_run("s", keys(0, 10))
    run = services.create_run("s")
    with services.flush(run) as full, services.flush(run, incremental=True) as incremental:
        full.write(project_rows(keys(0, 2)))
        incremental.write(project_rows(keys(2, 4)))
    services.complete_run(run)
    assert RunModelState.objects.get(run=run).flush_mode == FlushMode.INCREMENTAL
    with pytest.raises(CleanupRefused) as refused:
        services.safe_cleanup_old_projects(run, force=True)
    assert refused.value.reason == "incremental_run"
    assert "incrementally" in str(refused.value)
    assert sorted(stored("s")) == keys(0, 10)


@override_settings(RUNS_APP={"CLEANUP_GRACE_RUNS": 2})
def test_only_full_runs_count_towards_the_grace_period() -> None:
    synced_run("s", keys(0, 10))  # full: every key
    run = services.create_run("s")
    with services.flush(run, incremental=True) as flush:
        flush.write(project_rows(keys(0, 1)), cursor=1)  # one change
    services.complete_run(run)
    # The full run after it misses p009 once: with a grace of 2 full runs, p009 waits (counted
    # with the incremental run, the cutoff would have let it go).
    full = synced_run("s", keys(0, 9))
    result = services.safe_cleanup_old_projects(full)
    assert (result.removed, result.waiting) == (0, 1)
    assert "p009" in stored("s")


@pytest.mark.parametrize(
    ("cursor", "needle", "limit"),
    [
        (None, "is None", None),
        (float("nan"), "nan", None),
        ({1, 2}, "set", None),
        (object(), "object", None),
        ({"k": "\x00"}, "NUL", "no NUL"),
        ("x" * CURSOR_MAX_BYTES, "CURSOR_MAX_BYTES", CURSOR_MAX_BYTES),
    ],
    ids=["none", "nan", "set", "object", "nul", "too-large"],
)
def test_a_bad_cursor_is_refused_naming_it_and_nothing_is_written(
    cursor: Any, needle: str, limit: Any
) -> None:
    run = services.create_run("s")
    with services.flush(run, incremental=True) as flush:
        before = snapshot()
        with pytest.raises(InvalidInput) as refused:
            flush.write(project_rows(keys(0, 3)), cursor=cursor)
        assert (refused.value.field, refused.value.limit) == ("cursor", limit)
        assert needle in str(refused.value)
        assert snapshot() == before
        # The session is still usable: the refused call read and wrote nothing.
        flush.write(project_rows(keys(0, 3)), cursor="ok")
    assert services.complete_run(run).state.status == RunStatus.COMPLETED


def test_incremental_must_be_a_bool() -> None:
    with pytest.raises(InvalidInput) as refused:
        services.flush("r", incremental="yes")  # type: ignore[arg-type]
    assert refused.value.field == "incremental"


@pytest.mark.django_db(transaction=True)
def test_a_fault_anywhere_never_leaves_a_cursor_without_its_rows() -> None:
    def setup() -> str:
        run = services.create_run("s")
        return str(run.pk)

    def action(run_id: str) -> None:
        with services.flush(run_id, incremental=True, batch_size=2) as flush:
            flush.write(project_rows(keys(0, 3)), cursor=3)
            flush.write([], cursor=4)

    def check(run_id: str, faulted: bool) -> None:
        line = RunModelState.objects.filter(run_id=run_id).first()
        cursor = line.cursor if line is not None else None
        rows = Project.objects.filter(last_seen_run_id=run_id).count()
        # The cursor is never ahead of the rows committed: 3 needs all 3 rows, 4 came after.
        assert cursor in (None, 3, 4)
        if cursor is not None:
            assert rows == 3
        if not faulted:
            assert (cursor, rows) == (4, 3)

    assert check_under_faults(setup, action, check) > 5


@override_settings(RUNS_APP={"MAX_PAYLOAD_BYTES": 4096})
def test_the_cursor_limit_follows_a_smaller_payload_limit() -> None:
    run = services.create_run("s")
    with services.flush(run, incremental=True) as flush:
        flush.write([], cursor="x" * 2046)  # 2,048 bytes of JSON: half the payload limit
        with pytest.raises(InvalidInput) as refused:
            flush.write([], cursor="x" * 2047)
    assert (refused.value.field, refused.value.limit) == ("cursor", 2048)
    assert "MAX_PAYLOAD_BYTES" in str(refused.value)
