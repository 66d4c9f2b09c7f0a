"""The job shapes of issue 10, written as a new user would write them, on SQLite and PostgreSQL.

Each scenario seeds a scope with 1,000 projects (a first run flushing pages of 100 through one
session, completed and cleaned up), then runs the attacked job, and ends with the run failed (or
the right cleanup refusal) and not one project lost. A positive control shows that cleanup does
delete what is really gone, so "nothing lost" is not vacuous.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import suppress
from datetime import timedelta
from typing import Any

import pytest
from django.db import transaction

from runs_app import services
from runs_app.exceptions import (
    CleanupRefused,
    FlushEnded,
    FlushFailed,
    FlushInTransaction,
    InvalidInput,
    RunClosed,
    RunsError,
)
from runs_app.models import (
    FlushSessionStatus,
    FlushStatus,
    Project,
    Run,
    RunEvent,
    RunFlushSession,
    RunState,
    RunStatus,
)
from tests.helpers import snapshot

pytestmark = pytest.mark.django_db(transaction=True)

logger = logging.getLogger(__name__)

SCOPE = "crm"
TOTAL = 1000
PAGE = 100


class SourceError(Exception):
    """The external API failing."""


class OwnError(Exception):
    """The job's own error, raised inside its own atomic()."""


def page_rows(page: int, version: str = "v2", total: int = TOTAL) -> list[dict[str, Any]]:
    start = page * PAGE
    return [
        {"key": f"p{index:04d}", "name": f"Project {index}", "data": {"v": version}}
        for index in range(start, min(start + PAGE, total))
    ]


def source(fail_at: int | None = None, total: int = TOTAL) -> Iterator[list[dict[str, Any]]]:
    """Pages of the source; fetching page ``fail_at`` raises SourceError."""
    pages = (total + PAGE - 1) // PAGE
    for page in range(pages):
        if page == fail_at:
            raise SourceError(f"API timed out fetching page {page}")
        yield page_rows(page, total=total)


def seed() -> Run:
    """A first run that saw all 1,000 projects, completed."""
    run = services.create_run(SCOPE)
    with services.flush(run, batch_size=PAGE) as flush:
        for page in source():
            flush.write(page)
    run = services.complete_run(run)
    assert run.state.status == RunStatus.COMPLETED
    assert Project.objects.filter(scope=SCOPE).count() == TOTAL
    return run


def all_keys() -> set[str]:
    return set(Project.objects.filter(scope=SCOPE).values_list("key", flat=True))


def expected_keys(total: int = TOTAL) -> set[str]:
    return {f"p{index:04d}" for index in range(total)}


def state(run: Run | str) -> RunState:
    return RunState.objects.get(run_id=getattr(run, "pk", run))


def assert_failed_and_nothing_lost(run: Run, reason: str = "flush_failed") -> None:
    """Whatever the job did, the run is failed, cleanup refuses, and every project is kept."""
    current = state(run)
    if current.status == RunStatus.ACTIVE:
        services.complete_run(run)  # what the job does at the end, whatever happened
        current = state(run)
    assert current.status == RunStatus.FAILED, (current.status, current.flush_status)
    assert not RunEvent.objects.filter(run_id=run.pk, type="run.completed").exists()
    with pytest.raises(CleanupRefused) as caught:
        services.safe_cleanup_old_projects(run)
    assert caught.value.reason == reason
    with pytest.raises(CleanupRefused):
        services.safe_cleanup_old_projects(run, force=True)  # force cannot override this guard
    assert all_keys() == expected_keys()
    assert not RunEvent.objects.filter(type="projects.removed").exists()


# -- positive control ---------------------------------------------------------------------------


def test_control_a_whole_source_completes_and_cleanup_removes_only_what_is_gone() -> None:
    seed()
    run = services.create_run(SCOPE)
    with services.flush(run, batch_size=PAGE) as flush:
        for page in source(total=950):
            flush.write(page)
    assert services.complete_run(run).state.status == RunStatus.COMPLETED
    result = services.safe_cleanup_old_projects(run)
    assert result.removed == 50
    assert all_keys() == expected_keys(950)
    assert state(run).cleanup_status == "done"


# -- shape 1: the source failing between pages --------------------------------------------------


def test_shape1_source_failing_between_pages_then_complete_run() -> None:
    seed()
    run = services.create_run(SCOPE)
    try:
        with services.flush(run) as flush:
            for page in source(fail_at=7):
                flush.write(page)
    except FlushFailed as exc:
        assert isinstance(exc.__cause__, SourceError)
        logger.info("sync failed: %s", exc)
    assert state(run).flush_status == FlushStatus.FAILED
    services.complete_run(run)  # the job "completes" anyway
    assert_failed_and_nothing_lost(run)
    # The first seven pages were written by run 2, the rest still carry run 1's stamp.
    assert Project.objects.filter(scope=SCOPE, last_seen_run=run).count() == 700


def test_shape1_with_track_run() -> None:
    seed()
    with services.track_run(SCOPE) as run:
        try:
            with services.flush(run) as flush:
                for page in source(fail_at=7):
                    flush.write(page)
        except FlushFailed:
            logger.info("sync failed")
    assert_failed_and_nothing_lost(run)


def test_old_style_per_page_flush_projects_fails_the_run() -> None:
    seed()
    run = services.create_run(SCOPE)
    pages = list(source())
    services.flush_projects(run, pages[0])
    before_events = RunEvent.objects.filter(run=run).count()
    with pytest.raises(FlushEnded) as caught:
        services.flush_projects(run, pages[1])
    assert "services.flush(run)" in str(caught.value)
    # Nothing of page 2 was written: still run 1's rows.
    assert not Project.objects.filter(scope=SCOPE, key="p0100", last_seen_run=run).exists()
    assert RunFlushSession.objects.filter(run=run).count() == 1
    assert state(run).flush_status == FlushStatus.FAILED
    assert RunEvent.objects.filter(run=run).count() == before_events + 1  # flush.failed only
    # A third call (and a session) is refused too, and writes nothing.
    with pytest.raises(FlushFailed):
        services.flush_projects(run, pages[2])
    with pytest.raises(FlushFailed), services.flush(run) as flush:
        flush.write(pages[3])
    assert not Project.objects.filter(scope=SCOPE, key="p0300", last_seen_run=run).exists()
    assert_failed_and_nothing_lost(run)


# -- shape 2: failures inside the caller's own atomic() ----------------------------------------


def test_shape2_flush_failure_inside_callers_atomic_caught_outside() -> None:
    seed()
    run = services.create_run(SCOPE)
    failures = 0
    with pytest.raises(FlushFailed), services.flush(run) as flush:
        for number, page in enumerate(source()):
            if number == 3:
                page = [*page[:50], {"key": "", "name": "broken"}, *page[50:]]
            try:
                with transaction.atomic():
                    flush.write(page)
            except FlushFailed:
                failures += 1  # logged, the job goes on with the next page
    assert failures == 7  # page 3 and, sticky, every later page
    assert state(run).flush_status == FlushStatus.FAILED
    assert_failed_and_nothing_lost(run)


def test_shape2_flush_failure_inside_callers_atomic_then_complete_inside_the_block() -> None:
    seed()
    run = services.create_run(SCOPE)
    with pytest.raises(FlushFailed), services.flush(run) as flush:
        for number, page in enumerate(source()):
            if number == 3:
                page = [{"key": "x", "name": "y", "data": {"bad": float("nan")}}]
            try:
                with transaction.atomic():
                    flush.write(page)
            except FlushFailed:
                break
        # The failure mark was rolled back with the caller's atomic(); completing now must
        # still fail the run.
        assert services.complete_run(run).state.status == RunStatus.FAILED
    assert_failed_and_nothing_lost(run)


def test_shape2_callers_own_error_rolls_a_written_page_back() -> None:
    seed()
    run = services.create_run(SCOPE)
    with pytest.raises(FlushFailed) as caught, services.flush(run) as flush:
        for number, page in enumerate(source()):
            try:
                with transaction.atomic():
                    flush.write(page)
                    if number == 4:
                        raise OwnError("writing the job's own rows failed")
            except OwnError:
                logger.info("page %d skipped", number)
    assert "rolled back" in str(caught.value)
    assert Project.objects.filter(scope=SCOPE, last_seen_run=run).count() == 900
    assert_failed_and_nothing_lost(run)


# -- shape 3: two workers sharing one run (sequentially interleaved) ---------------------------


def test_shape3_two_workers_first_completes_while_second_is_flushing() -> None:
    seed()
    run_a, created_a = services.ensure_run("nightly-1", scope=SCOPE)
    run_b, created_b = services.ensure_run("nightly-1", scope=SCOPE)
    assert (created_a, created_b) == (True, False)
    pages = list(source())
    with pytest.raises(RunClosed), services.flush(run_b) as flush_b:
        flush_b.write(pages[5])
        with services.flush(run_a) as flush_a:
            for page in pages[:5]:
                flush_a.write(page)
        # Worker A is done: it completes the run and cleans up.
        assert services.complete_run(run_a).state.status == RunStatus.FAILED
        with pytest.raises(CleanupRefused):
            services.safe_cleanup_old_projects(run_a)
        # Worker B goes on with its half.
        flush_b.write(pages[6])
    assert_failed_and_nothing_lost(run_a)
    assert RunFlushSession.objects.filter(run=run_a, status=FlushSessionStatus.OPEN).count() <= 1


def test_shape3_two_workers_both_close_then_complete() -> None:
    seed()
    run, _ = services.ensure_run("nightly-2", scope=SCOPE)
    pages = list(source(total=990))
    with services.flush(run) as flush_b:
        with services.flush(run) as flush_a:
            for page in pages[:5]:
                flush_a.write(page)
        assert state(run).flush_status == FlushStatus.IN_PROGRESS  # B is still open
        for page in pages[5:]:
            flush_b.write(page)
    assert state(run).flush_status == FlushStatus.SUCCEEDED
    assert services.complete_run(run).state.status == RunStatus.COMPLETED
    assert services.safe_cleanup_old_projects(run).removed == 10
    assert all_keys() == expected_keys(990)


def test_shape3_second_session_failing_fails_the_run() -> None:
    seed()
    run, _ = services.ensure_run("nightly-3", scope=SCOPE)
    pages = list(source())
    with pytest.raises(FlushFailed), services.flush(run) as flush_b:
        with services.flush(run) as flush_a:
            for page in pages[:5]:
                flush_a.write(page)
        flush_b.write(pages[5])
        raise SourceError("worker B's source died")
    assert_failed_and_nothing_lost(run)


# -- shape 4: a stray late flush on a closed run -----------------------------------------------


def ledger(run: Run) -> tuple[Any, ...]:
    current = state(run)
    return (
        current.status,
        current.flush_status,
        current.flush_error,
        current.rows_seen,
        current.rows_created,
        current.rows_updated,
        current.rows_confirmed,
        current.heartbeat_at,
        current.cleanup_status,
        list(RunEvent.objects.filter(run=run).order_by("seq").values_list("seq", "type")),
        list(RunFlushSession.objects.filter(run=run).order_by("id").values_list("id", "status")),
        Run.objects.get(pk=run.pk).last_seq,
    )


def test_shape4_stray_late_writes_on_a_completed_run() -> None:
    seed()
    run = services.create_run(SCOPE)
    with services.flush(run) as flush:
        for page in source(total=980):
            flush.write(page)
    services.complete_run(run)
    before = ledger(run)
    projects_before = sorted(Project.objects.values_list("key", "last_seen_run_id", "name"))
    late = page_rows(9, version="late")
    with pytest.raises(RunClosed):
        services.flush_projects(run, late)
    with pytest.raises(RunClosed), services.flush(run) as flush:
        flush.write(late)
    with pytest.raises(RunClosed):
        services.append_events(run, [services.Event("late.event", {})])
    with pytest.raises(RunClosed):
        services.fail_run(run, "late failure")
    with pytest.raises(RunClosed):
        services.complete_run(run)
    assert ledger(run) == before
    assert sorted(Project.objects.values_list("key", "last_seen_run_id", "name")) == (
        projects_before
    )
    # Its cleanup still works.
    assert services.safe_cleanup_old_projects(run).removed == 20
    assert all_keys() == expected_keys(980)


def test_shape4_stray_late_writes_on_a_failed_run() -> None:
    seed()
    run = services.create_run(SCOPE)
    services.fail_run(run, "job crashed")
    before = ledger(run)
    with pytest.raises(RunClosed):
        services.flush_projects(run, page_rows(0))
    with pytest.raises(RunClosed), services.flush(run) as flush:
        flush.write(page_rows(0))
    assert ledger(run) == before
    assert_failed_and_nothing_lost(run, reason="run_not_completed")


def test_shape4_run_closed_while_a_session_is_open() -> None:
    seed()
    run = services.create_run(SCOPE)
    with pytest.raises(RunClosed), services.flush(run) as flush:
        flush.write(page_rows(0))
        services.fail_run(run, "reaped by an operator")
        flush.write(page_rows(1))
    assert not Project.objects.filter(scope=SCOPE, key="p0100", last_seen_run=run).exists()
    assert_failed_and_nothing_lost(run, reason="flush_failed")


# -- shape 5: an empty source flushed page by page ---------------------------------------------


def test_shape5_empty_source_session_without_writes() -> None:
    seed()
    run = services.create_run(SCOPE)
    with services.flush(run) as flush:
        for page in source(total=0):
            flush.write(page)
    current = state(run)
    assert (current.flush_status, current.rows_seen) == (FlushStatus.SUCCEEDED, 0)
    assert services.complete_run(run).state.status == RunStatus.COMPLETED
    with pytest.raises(CleanupRefused) as caught:
        services.safe_cleanup_old_projects(run)
    assert caught.value.reason == "empty_run"
    assert all_keys() == expected_keys()
    result = services.safe_cleanup_old_projects(run, force=True)
    assert result.forced and result.removed == TOTAL
    assert state(run).cleanup_forced


def test_shape5_empty_pages_written() -> None:
    seed()
    run = services.create_run(SCOPE)
    with services.flush(run) as flush:
        for _ in range(3):
            assert flush.write([]) == services.FlushResult()
    services.complete_run(run)
    with pytest.raises(CleanupRefused) as caught:
        services.safe_cleanup_old_projects(run)
    assert caught.value.reason == "empty_run"
    assert all_keys() == expected_keys()


def test_shape5_empty_one_shot_flush() -> None:
    seed()
    run = services.create_run(SCOPE)
    services.flush_projects(run, iter(()))
    services.complete_run(run)
    with pytest.raises(CleanupRefused) as caught:
        services.safe_cleanup_old_projects(run)
    assert caught.value.reason == "empty_run"


# -- misuse of the session ---------------------------------------------------------------------


def test_session_opened_inside_callers_atomic_writes_nothing() -> None:
    seed()
    run = services.create_run(SCOPE)
    before = ledger(run)
    with transaction.atomic():
        with pytest.raises(FlushInTransaction), services.flush(run) as flush:
            flush.write(page_rows(0))
        with pytest.raises(FlushInTransaction):
            services.flush_projects(run, page_rows(0))
    assert ledger(run) == before
    assert not Project.objects.filter(last_seen_run=run).exists()
    assert not RunFlushSession.objects.filter(run=run).exists()


def test_session_opened_with_autocommit_off_writes_nothing() -> None:
    seed()
    run = services.create_run(SCOPE)
    before = ledger(run)
    transaction.set_autocommit(False)
    try:
        with pytest.raises(FlushInTransaction), services.flush(run) as flush:
            flush.write(page_rows(0))
    finally:
        transaction.rollback()
        transaction.set_autocommit(True)
    assert ledger(run) == before


def test_a_write_that_raised_then_was_caught_fails_the_session_at_exit() -> None:
    seed()
    run = services.create_run(SCOPE)
    with pytest.raises(FlushFailed), services.flush(run) as flush:
        flush.write(page_rows(0))
        with suppress(FlushFailed):  # "a bad row, skip it"
            flush.write([{"key": "p0100", "name": "\ud800"}])
        for page in range(1, 10):
            with suppress(FlushFailed):
                flush.write(page_rows(page))
    assert state(run).flush_status == FlushStatus.FAILED
    assert RunFlushSession.objects.get(run=run).status == FlushSessionStatus.FAILED
    assert_failed_and_nothing_lost(run)


def test_a_source_raising_inside_write_caught_inside_the_block() -> None:
    seed()
    run = services.create_run(SCOPE)

    def rows() -> Iterator[dict[str, Any]]:
        yield from page_rows(0)
        raise SourceError("cursor lost")

    with pytest.raises(FlushFailed), services.flush(run) as flush:
        try:
            flush.write(rows())
        except FlushFailed as exc:
            assert isinstance(exc.__cause__, SourceError)
    assert_failed_and_nothing_lost(run)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_interrupt_inside_the_block_is_recorded_and_re_raised(
    interrupt: type[BaseException],
) -> None:
    seed()
    run = services.create_run(SCOPE)
    with pytest.raises(interrupt), services.flush(run) as flush:
        flush.write(page_rows(0))
        raise interrupt()
    assert state(run).flush_status == FlushStatus.FAILED
    assert RunFlushSession.objects.get(run=run).status == FlushSessionStatus.FAILED
    assert_failed_and_nothing_lost(run)


def test_interrupt_raised_by_the_source_inside_write() -> None:
    seed()
    run = services.create_run(SCOPE)

    def rows() -> Iterator[dict[str, Any]]:
        yield from page_rows(0)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), services.flush(run, batch_size=30) as flush:
        flush.write(rows())
    assert state(run).flush_status == FlushStatus.FAILED
    assert_failed_and_nothing_lost(run)


def test_a_session_left_open_by_a_dead_process_fails_completion() -> None:
    seed()
    run = services.create_run(SCOPE)
    session = services.flush(run)
    flush = session.__enter__()  # the process dies inside the block: __exit__ never runs
    flush.write(page_rows(0))
    assert state(run).flush_status == FlushStatus.IN_PROGRESS
    assert_failed_and_nothing_lost(run)
    assert state(run).error.startswith("flush_unfinished")


def test_a_session_object_is_entered_once() -> None:
    seed()
    run = services.create_run(SCOPE)
    session = services.flush(run)
    with session as flush:
        flush.write(page_rows(0))
    with pytest.raises(RuntimeError), session:
        pass
    with pytest.raises(RuntimeError):
        flush.write(page_rows(1))
    assert not Project.objects.filter(key="p0100", last_seen_run=run).exists()


# -- bad input ---------------------------------------------------------------------------------

LONE = "\ud800"


def everything() -> tuple[Any, ...]:
    return (snapshot(), sorted(RunFlushSession.objects.values_list("id", "status", "batches")))


def assert_invalid(field: str, call: Callable[[], Any]) -> InvalidInput:
    """``call`` raises InvalidInput naming ``field`` (directly, or as the cause of the
    FlushFailed a flush raises), and writes nothing."""
    before = everything()
    with pytest.raises((InvalidInput, FlushFailed)) as caught:
        call()
    error = caught.value
    if isinstance(error, FlushFailed):
        assert isinstance(error.__cause__, InvalidInput), repr(error.__cause__)
        error = error.__cause__
    assert isinstance(error, InvalidInput)
    assert error.field == field, (error.field, field)
    assert "surrogate" in str(error) or "limit" in str(error) or str(error)
    if not isinstance(caught.value, FlushFailed):
        assert everything() == before
    return error


def test_lone_surrogates_are_invalid_input_naming_the_field() -> None:
    run = services.create_run("bad-input")
    assert_invalid("scope", lambda: services.create_run(f"s{LONE}"))
    assert_invalid("scope", lambda: services.ensure_run("r-1", scope=LONE))
    assert_invalid("run_id", lambda: services.create_run("ok", run_id=f"r{LONE}"))
    assert_invalid("run_id", lambda: services.ensure_run(LONE, scope="ok"))
    assert_invalid("run", lambda: services.flush(LONE))  # the parameter is named run
    assert_invalid("run", lambda: services.complete_run(LONE))
    assert_invalid("error", lambda: services.fail_run(run, f"boom {LONE}"))
    assert_invalid(
        "events[0].type", lambda: services.append_events(run, [services.Event(f"t{LONE}", {})])
    )
    assert_invalid(
        "events[0].type",
        lambda: services.create_run("other", events=[services.Event(LONE, {})]),
    )
    assert state(run).status == RunStatus.ACTIVE
    assert Run.objects.count() == 1


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"key": f"k{LONE}", "name": "n"}, "projects[0].key"),
        ({"key": "k", "name": f"n{LONE}"}, "projects[0].name"),
    ],
)
def test_lone_surrogates_in_a_project_fail_the_flush_and_write_nothing(
    row: dict[str, Any], field: str
) -> None:
    seed()
    run = services.create_run(SCOPE)
    before = sorted(Project.objects.values_list("key", "last_seen_run_id"))
    assert_invalid(field, lambda: services.flush_projects(run, [row]))
    assert sorted(Project.objects.values_list("key", "last_seen_run_id")) == before
    assert state(run).flush_status == FlushStatus.FAILED
    assert_failed_and_nothing_lost(run)


def test_a_lone_surrogate_mid_page_writes_nothing_of_its_batch() -> None:
    seed()
    run = services.create_run(SCOPE)
    page = page_rows(0)
    page[50] = {"key": "p0050", "name": LONE}
    with pytest.raises(FlushFailed), services.flush(run, batch_size=PAGE) as flush:
        flush.write(page_rows(1))
        error = assert_invalid("projects[50].name", lambda: flush.write(page))
        assert "surrogate" in str(error)
    assert not Project.objects.filter(scope=SCOPE, key="p0000", last_seen_run=run).exists()
    assert_failed_and_nothing_lost(run)


def test_a_source_error_text_with_a_lone_surrogate_is_recorded() -> None:
    seed()
    run = services.create_run(SCOPE)
    with pytest.raises(FlushFailed), services.flush(run) as flush:
        flush.write(page_rows(0))
        raise SourceError(f"upstream said {LONE}")
    current = state(run)
    assert current.flush_status == FlushStatus.FAILED
    assert "\\ud800" in current.flush_error
    assert_failed_and_nothing_lost(run)


def test_track_run_with_a_lone_surrogate_in_the_jobs_error() -> None:
    with pytest.raises(SourceError), services.track_run("tracked") as run:
        raise SourceError(LONE)
    assert state(run).status == RunStatus.FAILED


@pytest.mark.parametrize(
    "duration",
    [
        1e300,
        timedelta.max,
        float("inf"),
        pytest.param(10**400, id="10**400"),
    ],
)
def test_overflowing_durations_are_invalid_input(duration: Any) -> None:
    from runs_app.relay import prune_outbox

    run = services.create_run("durations")
    before = everything()
    for call in (services.fail_stale_runs, prune_outbox, services.prune_outbox):
        with pytest.raises(InvalidInput) as caught:
            call(duration)
        assert caught.value.field == "older_than"
    assert everything() == before
    assert state(run).status == RunStatus.ACTIVE


@pytest.mark.parametrize(
    "value",
    [
        "1e300",
        "1e309",
        "inf",
        "nan",
        "99999999999999999999",
    ],
)
@pytest.mark.parametrize("command", ["fail_stale_runs", "prune_outbox"])
def test_commands_refuse_overflowing_durations_with_exit_2(command: str, value: str) -> None:
    from tests.relay_helpers import manage

    result = manage(command, "--older-than", value, timeout=60)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert "--older-than" in result.stderr or value in result.stderr, result.stderr


@pytest.mark.parametrize(
    "value",
    [
        1e300,
        float("inf"),
        timedelta.max,
        pytest.param(10**400, id="10**400"),
    ],
)
def test_run_stale_after_overflowing_fails_its_check(value: Any) -> None:
    from django.test import override_settings

    from runs_app import checks as runs_checks

    with override_settings(RUNS_APP={"RUN_STALE_AFTER": value}):
        messages = list(runs_checks.check_settings())
    assert [message.id for message in messages] == ["runs_app.E008"], messages
    assert messages[0].hint


def test_a_run_closed_error_about_another_run_escaping_the_block_fails_the_flush() -> None:
    seed()
    old = services.latest_run(SCOPE)
    assert old is not None
    run = services.create_run(SCOPE)
    with pytest.raises(FlushFailed), services.flush(run) as flush:
        flush.write(page_rows(0))
        services.append_events(old, [services.Event("job.note", {})])  # old run: closed
    assert state(run).flush_status == FlushStatus.FAILED
    assert RunFlushSession.objects.get(run=run).status == FlushSessionStatus.FAILED


def test_a_run_closed_error_about_another_run_still_never_completes() -> None:
    seed()
    old = services.latest_run(SCOPE)
    assert old is not None
    run = services.create_run(SCOPE)
    with pytest.raises(RunsError), services.flush(run) as flush:
        flush.write(page_rows(0))
        services.append_events(old, [services.Event("job.note", {})])
    assert_failed_and_nothing_lost(run)


def test_only_projects_can_be_flushed() -> None:
    run = services.create_run(SCOPE)
    with services.flush(run, Project) as flush:
        flush.write(page_rows(0))
    with pytest.raises(InvalidInput) as caught:
        services.flush(run, Run)
    assert caught.value.field == "model"
    assert_invalid("batch_size", lambda: services.flush(run, batch_size=0))
