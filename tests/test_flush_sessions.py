"""Fault injection on every write path of a flush session: open, write (each batch), close, and
the recording of a failure; and the one-shot ``flush_projects``. The k-th statement fails, for
every k: no partial batch, no ledger that disagrees with its session or its events, and a flush
that did not end cleanly never lets its run complete (or its cleanup run)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from runs_app import services
from runs_app.exceptions import CleanupRefused, FlushFailed
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
from runs_app.services.flush import FlushSession
from tests.helpers import InjectedFault, caused_by_fault, failing_statement

pytestmark = pytest.mark.django_db(transaction=True)

BATCH = 100
MAX_K = 200


class SourceError(Exception):
    pass


def rows(start: int, stop: int, version: str = "v1") -> list[dict[str, Any]]:
    return [
        {"key": f"k{index:04d}", "name": f"Name {index}", "data": {"v": version}}
        for index in range(start, stop)
    ]


@dataclass
class Context:
    run: Run
    session: FlushSession = field(init=False)
    flush: FlushSession = field(init=False)
    written: int = 0  # rows committed before the faulty action


def run_snapshot(run: Run) -> tuple[Any, ...]:
    """Everything a flush of ``run`` may write."""
    state = RunState.objects.get(run_id=run.pk)
    return (
        state.status,
        state.flush_status,
        state.flush_error,
        state.rows_seen,
        state.rows_created,
        state.rows_updated,
        Run.objects.get(pk=run.pk).last_seq,
        Run.objects.get(pk=run.pk).closed,
        list(
            RunEvent.objects.filter(run=run).order_by("seq").values_list("seq", "type", "payload")
        ),
        list(
            RunFlushSession.objects.filter(run=run)
            .order_by("id")
            .values_list("id", "status", "batches", "rows_seen")
        ),
        sorted(Project.objects.filter(last_seen_run=run).values_list("key", "name")),
    )


def assert_consistent(run: Run) -> None:
    """The ledger, the sessions, the events and the rows tell one story, batch by batch."""
    state = RunState.objects.get(run_id=run.pk)
    stamped = Project.objects.filter(last_seen_run=run).count()
    flushed = RunEvent.objects.filter(run=run, type="projects.flushed")
    by_events = sum(event.payload["seen"] for event in flushed)
    sessions = RunFlushSession.objects.filter(run=run)
    assert state.rows_seen == stamped == by_events == sum(s.rows_seen for s in sessions)
    assert sum(s.batches for s in sessions) == flushed.count()
    assert stamped % BATCH == 0 or stamped == state.rows_seen  # whole batches only
    # Events: seqs without gaps, and the Run's counter agrees.
    seqs = list(RunEvent.objects.filter(run=run).order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1))
    assert Run.objects.get(pk=run.pk).last_seq == len(seqs)
    failed_events = RunEvent.objects.filter(run=run, type="flush.failed").count()
    if state.flush_status == FlushStatus.FAILED:
        assert failed_events >= 1
        assert state.flush_error
    if any(s.status == FlushSessionStatus.FAILED for s in sessions):
        assert state.flush_status == FlushStatus.FAILED
    if state.flush_status == FlushStatus.SUCCEEDED:
        assert all(s.status == FlushSessionStatus.SUCCEEDED for s in sessions)
        assert RunEvent.objects.filter(run=run, type="flush.succeeded").exists()


def assert_never_completes(run: Run) -> None:
    assert services.complete_run(run).state.status == RunStatus.FAILED
    with pytest.raises(CleanupRefused):
        services.safe_cleanup_old_projects(run, force=True)


def inject_every_k(
    prepare: Callable[[int], Context],
    action: Callable[[Context], Any],
    check: Callable[[Context, BaseException | None, bool], None],
    *,
    swallowed: bool = False,
) -> int:
    """For k = 1, 2, ...: a fresh context (its own scope), ``action`` with its k-th statement
    failing, then ``check(context, raised, faulted)``. Returns the statements of the action.
    ``swallowed``: a fault may be logged instead of raised (the recording of a failure is)."""
    for k in range(1, MAX_K + 1):
        context = prepare(k)
        raised: BaseException | None = None
        with failing_statement(k) as counter:
            try:
                action(context)
            except BaseException as exc:
                raised = exc
        faulted = counter.count >= k
        if raised is not None and not isinstance(raised, FlushFailed | InjectedFault):
            raise raised
        if faulted and not swallowed:
            assert raised is not None and caused_by_fault(raised), (k, raised)
        assert_consistent(context.run)
        check(context, raised, faulted)
        if not faulted:
            assert k > 1, "the action executed no statement"
            return k - 1
    raise AssertionError(f"still faulting after {MAX_K} statements")


def new_run(k: int, tag: str) -> Context:
    return Context(services.create_run(f"{tag}-{k}"))


def opened(k: int, tag: str, written: int = BATCH) -> Context:
    context = new_run(k, tag)
    context.session = services.flush(context.run, batch_size=BATCH)
    context.flush = context.session.__enter__()
    if written:
        context.flush.write(rows(0, written))
    context.written = written
    return context


# -- open ---------------------------------------------------------------------------------------


def test_open_under_faults() -> None:
    before: dict[str, Any] = {}

    def prepare(k: int) -> Context:
        context = new_run(k, "open")
        context.session = services.flush(context.run, batch_size=BATCH)
        before["snapshot"] = run_snapshot(context.run)
        return context

    def action(context: Context) -> None:
        context.flush = context.session.__enter__()

    def check(context: Context, raised: BaseException | None, faulted: bool) -> None:
        if faulted:
            assert run_snapshot(context.run) == before["snapshot"]
            assert RunState.objects.get(run=context.run).flush_status == FlushStatus.NOT_STARTED
            return
        assert RunState.objects.get(run=context.run).flush_status == FlushStatus.IN_PROGRESS
        assert_never_completes(context.run)  # open, never closed

    assert inject_every_k(prepare, action, check) >= 3


def test_open_of_an_ended_flush_under_faults() -> None:
    """A second flush on a run whose flush ended: fails the ledger, or (fault) writes nothing."""
    before: dict[str, Any] = {}

    def prepare(k: int) -> Context:
        context = new_run(k, "ended")
        services.flush_projects(context.run, rows(0, 50))
        context.session = services.flush(context.run, batch_size=BATCH)
        before["snapshot"] = run_snapshot(context.run)
        return context

    def action(context: Context) -> None:
        with context.session as flush:
            flush.write(rows(50, 60))

    def check(context: Context, raised: BaseException | None, faulted: bool) -> None:
        assert raised is not None
        if faulted:
            assert run_snapshot(context.run) == before["snapshot"]
            return
        assert RunState.objects.get(run=context.run).flush_status == FlushStatus.FAILED
        assert Project.objects.filter(last_seen_run=context.run).count() == 50
        assert_never_completes(context.run)

    inject_every_k(prepare, action, check)


# -- write --------------------------------------------------------------------------------------


def test_write_batches_under_faults() -> None:
    def prepare(k: int) -> Context:
        return opened(k, "write")

    def action(context: Context) -> None:
        context.flush.write(rows(BATCH, BATCH + 250))

    def check(context: Context, raised: BaseException | None, faulted: bool) -> None:
        state = RunState.objects.get(run=context.run)
        if faulted:
            assert isinstance(raised, FlushFailed)
            assert state.flush_status == FlushStatus.FAILED
            assert state.rows_seen in {100, 200, 300}  # whole batches only, never 350
            # The session is failed for good: a later write raises at once, the exit too.
            with pytest.raises(FlushFailed):
                context.flush.write(rows(900, 901))
            with pytest.raises(FlushFailed):
                context.session.__exit__(None, None, None)
            assert not Project.objects.filter(key="k0900").exists()
            assert_consistent(context.run)
            assert_never_completes(context.run)
            return
        assert state.rows_seen == 350
        context.session.__exit__(None, None, None)
        assert services.complete_run(context.run).state.status == RunStatus.COMPLETED

    assert inject_every_k(prepare, action, check) >= 3 * 3


def test_write_of_a_bad_row_under_faults() -> None:
    """A write failing on its input (row 150) records the failure; a fault anywhere in the good
    batch before it or in the recording leaves whole batches and a run that cannot complete."""

    def prepare(k: int) -> Context:
        return opened(k, "badrow", written=0)

    def action(context: Context) -> None:
        context.flush.write([*rows(0, 150), {"key": "", "name": "x"}])

    def check(context: Context, raised: BaseException | None, faulted: bool) -> None:
        assert isinstance(raised, FlushFailed)
        state = RunState.objects.get(run=context.run)
        assert state.rows_seen in {0, 100}
        assert state.flush_status in {FlushStatus.FAILED, FlushStatus.IN_PROGRESS}
        with pytest.raises(FlushFailed):
            context.session.__exit__(None, None, None)
        assert RunState.objects.get(run=context.run).flush_status == FlushStatus.FAILED
        assert_consistent(context.run)
        assert_never_completes(context.run)

    inject_every_k(prepare, action, check, swallowed=True)


# -- close --------------------------------------------------------------------------------------


def test_close_under_faults() -> None:
    before: dict[str, Any] = {}

    def prepare(k: int) -> Context:
        context = opened(k, "close")
        before["snapshot"] = run_snapshot(context.run)
        return context

    def action(context: Context) -> None:
        context.session.__exit__(None, None, None)

    def check(context: Context, raised: BaseException | None, faulted: bool) -> None:
        state = RunState.objects.get(run=context.run)
        if faulted:
            # The close is one transaction: all of it or nothing; the flush never ended. The
            # session then records itself failed (unless that write fails too: in_progress).
            assert isinstance(raised, FlushFailed), raised
            assert state.flush_status in (FlushStatus.FAILED, FlushStatus.IN_PROGRESS)
            assert not RunEvent.objects.filter(run=context.run, type="flush.succeeded").exists()
            if state.flush_status == FlushStatus.IN_PROGRESS:
                assert run_snapshot(context.run) == before["snapshot"]
            assert_never_completes(context.run)
            return
        assert state.flush_status == FlushStatus.SUCCEEDED
        assert services.complete_run(context.run).state.status == RunStatus.COMPLETED

    assert inject_every_k(prepare, action, check) >= 3


def test_close_of_one_of_two_sessions_under_faults() -> None:
    def prepare(k: int) -> Context:
        context = opened(k, "close2")
        other = services.flush(context.run, batch_size=BATCH)
        with other as flush:
            flush.write(rows(500, 550))
        return context

    def action(context: Context) -> None:
        context.session.__exit__(None, None, None)

    def check(context: Context, raised: BaseException | None, faulted: bool) -> None:
        state = RunState.objects.get(run=context.run)
        if faulted:
            assert state.flush_status in (FlushStatus.FAILED, FlushStatus.IN_PROGRESS)
            assert_never_completes(context.run)
            return
        assert state.flush_status == FlushStatus.SUCCEEDED
        assert services.complete_run(context.run).state.status == RunStatus.COMPLETED
        assert Project.objects.filter(last_seen_run=context.run).count() == 150

    inject_every_k(prepare, action, check)


# -- recording a failure ------------------------------------------------------------------------


def test_recording_a_failure_under_faults() -> None:
    before: dict[str, Any] = {}

    def prepare(k: int) -> Context:
        context = opened(k, "record")
        before["snapshot"] = run_snapshot(context.run)
        return context

    def action(context: Context) -> None:
        try:
            raise SourceError("page 2 could not be fetched")
        except SourceError as exc:
            context.session.__exit__(SourceError, exc, exc.__traceback__)

    def check(context: Context, raised: BaseException | None, faulted: bool) -> None:
        # The job always learns that its flush failed, chained to the source's error.
        assert isinstance(raised, FlushFailed)
        assert isinstance(raised.__cause__, SourceError)
        state = RunState.objects.get(run=context.run)
        if faulted:
            # Recording failed as a whole: the ledger still says in_progress (counts as failed).
            assert run_snapshot(context.run) == before["snapshot"]
        else:
            assert state.flush_status == FlushStatus.FAILED
            session = RunFlushSession.objects.get(run=context.run)
            assert session.status == FlushSessionStatus.FAILED
            assert "SourceError" in session.error
        assert_never_completes(context.run)

    # A fault in the recording is not raised (the caller gets FlushFailed): count statements.
    for k in range(1, MAX_K + 1):
        context = prepare(k)
        raised: BaseException | None = None
        with failing_statement(k) as counter:
            try:
                action(context)
            except FlushFailed as exc:
                raised = exc
        faulted = counter.count >= k
        assert_consistent(context.run)
        check(context, raised, faulted)
        if not faulted:
            assert k > 1
            return
    raise AssertionError("still faulting")


def test_recording_an_interrupt_under_faults() -> None:
    for k in range(1, MAX_K + 1):
        context = opened(k, "interrupt")
        with failing_statement(k) as counter, pytest.raises(KeyboardInterrupt):
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as exc:
                context.session.__exit__(KeyboardInterrupt, exc, exc.__traceback__)
                raise
        assert_consistent(context.run)
        state = RunState.objects.get(run=context.run)
        assert state.flush_status in {FlushStatus.FAILED, FlushStatus.IN_PROGRESS}
        assert_never_completes(context.run)
        if counter.count < k:
            assert state.flush_status == FlushStatus.FAILED
            return
    raise AssertionError("still faulting")


# -- the one-shot form --------------------------------------------------------------------------


def test_flush_projects_under_faults() -> None:
    def prepare(k: int) -> Context:
        return new_run(k, "oneshot")

    def action(context: Context) -> None:
        services.flush_projects(context.run, rows(0, 250), batch_size=BATCH)

    def check(context: Context, raised: BaseException | None, faulted: bool) -> None:
        state = RunState.objects.get(run=context.run)
        if faulted:
            assert state.rows_seen in {0, 100, 200, 250}  # 250: the close failed
            if state.flush_status == FlushStatus.NOT_STARTED:
                # The open itself failed: nothing written; completing leaves cleanup refusing.
                assert state.rows_seen == 0
                assert services.complete_run(context.run).state.status == RunStatus.COMPLETED
                with pytest.raises(CleanupRefused) as caught:
                    services.safe_cleanup_old_projects(context.run, force=True)
                assert caught.value.reason == "not_flushed"
                return
            assert_never_completes(context.run)
            return
        assert state.rows_seen == 250
        assert state.flush_status == FlushStatus.SUCCEEDED
        assert services.complete_run(context.run).state.status == RunStatus.COMPLETED

    assert inject_every_k(prepare, action, check) >= 10


def test_a_failed_flush_in_a_seeded_scope_deletes_nothing_whatever_the_fault() -> None:
    """End to end: a scope of 300 rows, a second run flushing 250 of them with the k-th statement
    failing; the job catches everything and completes; cleanup deletes nothing unless the flush
    really ended."""
    for k in range(1, MAX_K + 1):
        scope = f"e2e-{k}"
        first = services.create_run(scope)
        services.flush_projects(first, rows(0, 300), batch_size=BATCH)
        services.complete_run(first)
        run = services.create_run(scope)
        with failing_statement(k) as counter, contextlib.suppress(FlushFailed, InjectedFault):
            services.flush_projects(run, rows(0, 250), batch_size=BATCH)
        faulted = counter.count >= k
        services.complete_run(run)
        with contextlib.suppress(CleanupRefused):
            services.safe_cleanup_old_projects(run)
        remaining = Project.objects.filter(scope=scope).count()
        if faulted:
            assert remaining == 300, k
        else:
            assert remaining == 250
            return
    raise AssertionError("still faulting")
