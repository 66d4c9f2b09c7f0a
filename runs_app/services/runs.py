"""The run lifecycle: create, ensure, complete, fail, heartbeat, reap stale runs, read.

Every function here is one ``transaction.atomic`` block that nests inside the caller's
transaction: a caller can write its own rows and create a run (or append events) in one
``atomic()``, and everything commits or rolls back together. The transactions are short: a few
single-row statements, one set-based UPDATE and one bulk insert, no I/O outside the database.
(``fail_stale_runs`` is one such transaction per stale run; ``track_run`` composes the others.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from django.apps import apps
from django.db import IntegrityError, transaction
from django.db.models import Max
from django.utils import timezone

from .. import tracing
from ..conf import runs_settings
from ..db import connection_for_write, db_alias, is_postgresql, table
from ..exceptions import RunAlreadyExists, RunClosed, RunInProgress, RunNotFound
from ..models import (
    FlushSessionStatus,
    FlushStatus,
    Run,
    RunFlushSession,
    RunModelState,
    RunOutbox,
    RunState,
    RunStatus,
)
from ..notify import notify_outbox
from ..tracing import describe_run, traced
from ..tracking import is_tracked, sync_spec
from .events import ensure_run_accepts_events, insert_event_rows, insert_events
from .validation import (
    PreparedEvent,
    error_text,
    internal_error_text,
    new_run_id,
    prepare_events,
    run_id_of,
    validate_actor,
    validate_duration,
    validate_json_object,
    validate_run_id,
    validate_scope,
)

# First key of the transaction-level advisory lock that serialises run creation *per scope* on
# PostgreSQL (the second key is the scope's hash), so the "scope free? stale run to reap?" checks
# and the inserts happen as one step, while creations in two scopes never wait on each other
# (two scopes whose hashes collide merely share a lock). The ordinal comes from a sequence
# (migration 0002), which needs no lock; a run id taken by a racing creator in another scope is
# caught by the primary key.
RUN_CREATION_LOCK_KEY = 0x72756E73  # "runs"
ORDINAL_SEQUENCE = "runs_app_run_ordinal_seq"

logger = logging.getLogger(__name__)


@traced("create_run")
def create_run(
    scope: str = "default",
    *,
    run_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    events: Iterable[Any] = (),
) -> Run:
    """Create a run with its state (active), its outbox (``next_seq=1``), a ``run.started``
    event (seq 1) and ``events`` (seq 2, 3, ...), all in one transaction.

    Raises ``RunAlreadyExists`` (the id is taken), ``RunInProgress`` (the scope has an active
    run), ``InvalidInput``/``InvalidEvent``; in every case nothing is written.
    """
    scope = validate_scope(scope)
    run_id = new_run_id() if run_id is None else validate_run_id(run_id)
    metadata_dict = validate_metadata(metadata)
    prepared = prepare_events(events)
    return _create(run_id, scope, metadata_dict, prepared)


@traced("ensure_run")
def ensure_run(
    run_id: str, *, scope: str = "default", metadata: Mapping[str, Any] | None = None
) -> tuple[Run, bool]:
    """Return ``(run, created)``: the run with this id, created as ``create_run`` would if absent.

    Idempotent and safe under races: of two callers racing on one id, one creates and the other
    gets ``created=False``. The same id in another scope raises ``RunAlreadyExists``.
    """
    run_id = validate_run_id(run_id)
    scope = validate_scope(scope)
    metadata_dict = validate_metadata(metadata)
    existing = _existing_in_scope(run_id, scope)
    if existing is not None:
        return existing, False
    try:
        return _create(run_id, scope, metadata_dict, []), True
    except RunAlreadyExists:
        # Lost a race: the winner's run is committed now (creation is serialised).
        existing = _existing_in_scope(run_id, scope)
        if existing is None:
            raise
        return existing, False


def validate_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    return validate_json_object("metadata", {} if metadata is None else metadata)


def _existing_in_scope(run_id: str, scope: str) -> Run | None:
    run = Run.objects.using(db_alias()).filter(pk=run_id).first()
    if run is not None and run.scope != scope:
        raise RunAlreadyExists(
            run_id, f"Run {run_id!r} exists in scope {run.scope!r}, not in {scope!r}."
        )
    return run


def _create(run_id: str, scope: str, metadata: dict[str, Any], events: list[PreparedEvent]) -> Run:
    try:
        with transaction.atomic(using=db_alias()):
            return _insert_run(run_id, scope, metadata, events)
    except IntegrityError:
        # Only reachable when something bypassed the creation lock (another writer, or SQLite
        # without IMMEDIATE transactions): report the conflict the constraints caught.
        _raise_if_taken(run_id, scope)
        raise


def _insert_run(
    run_id: str, scope: str, metadata: dict[str, Any], events: list[PreparedEvent]
) -> Run:
    alias = db_alias()
    # Reap first, inside this transaction and under the scope's creation lock: a crashed process
    # must not block its scope forever, and no other creator can slip in between the reap and
    # the insert.
    ordinal = _lock_scope_for_creation(scope)
    _reap_stale_in_scope(scope)
    _raise_if_taken(run_id, scope)
    if ordinal is None:
        # SQLite: this transaction holds the database's write lock, so max + 1 is safe.
        ordinal = (Run.objects.using(alias).aggregate(top=Max("ordinal"))["top"] or 0) + 1
    now = timezone.now()
    # run.started carries the metadata as its payload (the scope travels in every message's
    # envelope), so it fits MAX_PAYLOAD_BYTES exactly when the metadata does.
    all_events = [PreparedEvent("run.started", metadata), *events]
    run = Run.objects.using(alias).create(
        id=run_id,
        scope=scope,
        metadata=metadata,
        last_seq=len(all_events),
        ordinal=ordinal,
        created_at=now,
        # The job's span, if it runs in one: the run's messages carry it to their consumers.
        trace_context=tracing.current_trace_context(),
    )
    run.state = RunState.objects.using(alias).create(
        run=run, scope=scope, started_at=now, heartbeat_at=now
    )
    run.outbox = RunOutbox.objects.using(alias).create(run=run)
    insert_event_rows(run_id, 1, all_events, now)
    notify_outbox()  # wakes the listening relays at commit (runs_app.notify)
    return run


def _lock_scope_for_creation(scope: str) -> int | None:
    """PostgreSQL: take the scope's creation lock and draw the next ordinal, in one statement.

    The ordinal is drawn after the lock is granted (the select list is evaluated in order), so
    two creators of one scope get increasing ordinals in the order they create. Returns None on
    SQLite, whose IMMEDIATE transactions serialise every writer already."""
    if not is_postgresql():
        return None
    with connection_for_write().cursor() as cursor:
        cursor.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(%s)), nextval(%s)",
            [RUN_CREATION_LOCK_KEY, scope, ORDINAL_SEQUENCE],
        )
        return int(cursor.fetchone()[1])


def _raise_if_taken(run_id: str, scope: str) -> None:
    alias = db_alias()
    if Run.objects.using(alias).filter(pk=run_id).exists():
        raise RunAlreadyExists(run_id)
    active = (
        RunState.objects.using(alias)
        .filter(scope=scope, status=RunStatus.ACTIVE)
        .values_list("run_id", flat=True)
        .first()
    )
    if active is not None:
        raise RunInProgress(scope, active)


def lock_state(run_id: str) -> RunState:
    """The run's state (with its run attached), the run row locked until the end of the
    transaction.

    The one lock order of every writer of a run: its ``Run`` row first, the row
    ``append_events`` locks with its ``UPDATE``. So an append and a completion of one run
    serialise on one row, and the closing transaction's ``closed`` flag is what the waiting
    append sees. ``FOR NO KEY UPDATE``: rows referencing the run (events, projects of other
    transactions) can still be inserted meanwhile.

    Two statements on PostgreSQL: the lock, then the state read by a statement of its own, so
    its snapshot is taken after the lock was granted. (Locked in one joined SELECT, a caller
    that waited for the lock would get the run row as the other transaction committed it but
    the state row as it was before: a run closed meanwhile would still look active.) SQLite
    needs no row lock: its IMMEDIATE transactions hold the database's write lock.
    """
    alias = db_alias()
    if is_postgresql():
        locked = (
            Run.objects.using(alias)
            .select_for_update(no_key=True)
            .filter(pk=run_id)
            .values_list("pk", flat=True)
        )
        if not list(locked):
            raise RunNotFound(run_id)
    try:
        state = RunState.objects.using(alias).select_related("run").get(run_id=run_id)
    except RunState.DoesNotExist:
        raise RunNotFound(run_id) from None
    state.run.state = state
    return state


class LockedLedger(NamedTuple):
    """The few columns of a locked run's state a hot path needs (see ``lock_active_ledger``)."""

    run_id: str
    scope: str
    flush_status: str
    flush_error: str


def lock_active_ledger(run_id: str) -> LockedLedger:
    """``lock_active_state`` for a path taken once per batch (the flush's): the same lock, in
    the same two statements for the same reason, and the same ``RunNotFound`` / ``RunClosed``,
    but the state's columns read by plain SQL, without compiling two ORM queries and building
    two model instances each time."""
    with connection_for_write().cursor() as cursor:
        if is_postgresql():
            cursor.execute(f"SELECT id FROM {table(Run)} WHERE id = %s FOR NO KEY UPDATE", [run_id])
            if cursor.fetchone() is None:
                raise RunNotFound(run_id)
        cursor.execute(
            f"SELECT status, scope, flush_status, flush_error FROM {table(RunState)} "
            "WHERE run_id = %s",
            [run_id],
        )
        row = cursor.fetchone()
    if row is None:
        raise RunNotFound(run_id)
    status, scope, flush_status, flush_error = row
    if status != RunStatus.ACTIVE:
        raise RunClosed(run_id, status)
    return LockedLedger(run_id, scope, flush_status, flush_error)


def lock_active_state(run_id: str) -> RunState:
    state = lock_state(run_id)
    if state.status != RunStatus.ACTIVE:
        raise RunClosed(run_id, state.status)
    return state


def close_run(
    state: RunState,
    status: RunStatus,
    event_type: str,
    payload: dict[str, Any],
    error: str = "",
    *,
    extra_fields: Sequence[str] = (),
) -> Run:
    """Write the final status and its event. Call inside a transaction with the state locked.

    ``extra_fields``: other fields of ``state`` the caller changed, saved in the same UPDATE.
    """
    now = timezone.now()
    state.status = status
    state.error = error
    state.finished_at = now
    state.heartbeat_at = now
    state.save(
        using=db_alias(),
        update_fields=["status", "error", "finished_at", "heartbeat_at", *extra_fields],
    )
    insert_events(state.run_id, [PreparedEvent(event_type, payload)], allow_closed=True, close=True)
    state.run.closed = True
    return state.run


@traced("complete_run")
def complete_run(run: Run | str) -> Run:
    """Close an active run, fail-safe across the models it flushed: a run whose flush failed or
    never finished, for any model (a flush session still open: another worker still flushing,
    or a process that died), is marked ``failed`` (event ``run.failed``), never ``completed``,
    and confirms nothing. Otherwise ``completed``: for every model the run flushed,
    ``last_confirmed_run`` becomes this run on each row whose ``last_seen_run`` is this run; the
    ledgers record those counts (``rows_confirmed``, per model and in total) and the
    ``run.completed`` event carries the ledger counts.

    One transaction with the run locked: the status, the confirmations and the event commit
    together or not at all. Short: one set-based UPDATE per model flushed, no other I/O.

    Raises ``RunNotFound``, ``RunClosed`` (already completed or failed).
    """
    run_id = run_id_of(run)
    with transaction.atomic(using=db_alias()):
        state = lock_active_state(run_id)
        models = list(RunModelState.objects.using(db_alias()).filter(run_id=run_id))
        failed = [line.model for line in models if line.flush_status == FlushStatus.FAILED]
        if state.flush_status == FlushStatus.FAILED or failed:
            error = f"flush_failed: {state.flush_error}" if state.flush_error else "flush_failed"
            return fail_locked(state, error, "flush_failed")
        unfinished = [line.model for line in models if line.flush_status == FlushStatus.IN_PROGRESS]
        if state.flush_status == FlushStatus.IN_PROGRESS or unfinished:
            # A session still open: another worker still flushing, or a process that died.
            # Either way this run has not seen its whole source.
            open_sessions = (
                RunFlushSession.objects.using(db_alias())
                .filter(run_id=run_id, status=FlushSessionStatus.OPEN)
                .count()
            )
            error = "flush_unfinished"
            if open_sessions:
                error += (
                    f": {open_sessions} flush session(s) still open "
                    "(a worker still flushing, or one that died)"
                )
            return fail_locked(state, error, "flush_unfinished")
        unknown = [line.model for line in models if not _tracked_label(line.model)]
        if unknown:
            # The project no longer has the model (or it is no longer tracked): its rows cannot
            # be confirmed, so the run cannot complete.
            error = f"unknown_model: {', '.join(unknown)} is not a tracked model of the project"
            return fail_locked(state, error, "unknown_model")
        confirmed = 0
        for line in models:
            if line.flush_status != FlushStatus.SUCCEEDED:
                continue
            line.rows_confirmed = _confirm_rows(state, line.model)
            line.save(using=db_alias(), update_fields=["rows_confirmed"])
            confirmed += line.rows_confirmed
        state.rows_confirmed = confirmed
        return close_run(
            state,
            RunStatus.COMPLETED,
            "run.completed",
            ledger_counts(state),
            extra_fields=["rows_confirmed"],
        )


def _tracked_label(label: str) -> bool:
    try:
        return is_tracked(apps.get_model(label))
    except (LookupError, ValueError):
        return False


def _confirm_rows(state: RunState, label: str) -> int:
    """Stamp ``last_confirmed_run`` on the rows of model ``label`` this run saw; return how many.

    Part of completing a run (the confirmation means "seen by a run that completed with a
    successful flush"), so it lives here rather than in the flush module. The scope filter is
    redundant with ``last_seen_run`` but lets a (scope, last_seen_run) index serve the UPDATE.
    """
    model = apps.get_model(label)
    spec = sync_spec(model)
    rows = model._base_manager.using(db_alias()).filter(last_seen_run_id=state.run_id)
    if spec.scope is not None:
        rows = rows.filter(**{spec.scope.name: state.scope})
    return int(rows.update(last_confirmed_run_id=state.run_id))


def ledger_counts(state: RunState) -> dict[str, Any]:
    return {
        "flush_status": state.flush_status,
        "rows_seen": state.rows_seen,
        "rows_created": state.rows_created,
        "rows_updated": state.rows_updated,
        "rows_confirmed": state.rows_confirmed,
    }


@traced("fail_run")
def fail_run(
    run: Run | str, error: str = "", *, reason: str = "error", actor: str | None = None
) -> Run:
    """Mark an active run failed with ``error`` (event ``run.failed``). One transaction.

    ``actor``: who asked (an operator's name, e.g. the admin user's username), added to the
    ``run.failed`` payload as ``"actor"`` when given.

    Raises ``RunNotFound``, ``RunClosed``, ``InvalidInput`` (``error``, ``actor``).
    """
    run_id = run_id_of(run)
    error = error_text(error)
    actor = validate_actor(actor)
    with transaction.atomic(using=db_alias()):
        return fail_locked(lock_active_state(run_id), error, reason, actor=actor)


def fail_locked(state: RunState, error: str, reason: str, *, actor: str | None = None) -> Run:
    """The one way a run becomes failed (``fail_run``, fail-safe completion, stale reaping).
    Call inside a transaction with the state locked."""
    payload = {"reason": reason, "error": error}
    if actor is not None:
        payload["actor"] = actor
    return close_run(state, RunStatus.FAILED, "run.failed", payload, error)


@contextmanager
@traced("track_run")
def track_run(
    scope: str = "default",
    *,
    run_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Iterator[Run]:
    """Run a job inside a run: ``with track_run("crm") as run: flush_projects(run, ...)``.

    Creates the run (as ``create_run``), yields it, and on a normal exit completes it with
    ``complete_run`` (so a failed or unfinished flush still ends as ``failed``: catching
    ``FlushFailed`` inside the block does not make the run complete). On an exception it marks
    the run failed with the exception's text and re-raises the exception. If the block closed the
    run itself (or it was reaped as stale meanwhile), the exit leaves it as it is. Each step is
    its own transaction; the block runs between them, outside any transaction of this function.
    """
    run = create_run(scope, run_id=run_id, metadata=metadata)
    describe_run(run)  # on track_run's span, which began before the run existed
    try:
        yield run
    except BaseException as exc:
        try:
            fail_run(run, internal_error_text(f"{type(exc).__name__}: {exc}"))
        except RunClosed:
            pass  # the block closed it, or it was reaped: leave it as it is
        except Exception:
            # The job's own exception matters more; the run stays active until it is reaped.
            logger.exception("track_run: could not mark run %s failed", run.pk)
        raise
    with suppress(RunClosed):
        complete_run(run)


def stale_cutoff(older_than: float | timedelta | None = None) -> datetime:
    """The heartbeat time before which an active run counts as stale."""
    if older_than is None:
        older_than = runs_settings.RUN_STALE_AFTER
    return timezone.now() - validate_duration("older_than", older_than)


@traced("fail_stale_runs")
def fail_stale_runs(older_than: float | timedelta | None = None) -> int:
    """Mark failed every active run whose heartbeat is older than ``older_than`` (seconds or a
    timedelta; default ``RUN_STALE_AFTER``), with a ``run.failed`` event of reason ``stale``.
    Returns how many runs it failed.

    One short transaction per stale run, with its state row locked and the staleness checked
    again under the lock: a run that sent a heartbeat meanwhile is left alone, and a flush batch
    of the run in flight finishes (or not) before the run is failed, never half-way.
    """
    cutoff = stale_cutoff(older_than)
    candidates = list(
        RunState.objects.using(db_alias())
        .filter(status=RunStatus.ACTIVE, heartbeat_at__lt=cutoff)
        .order_by("heartbeat_at")
        .values_list("run_id", flat=True)
    )
    failed = 0
    for run_id in candidates:
        try:
            with transaction.atomic(using=db_alias()):
                failed += _fail_if_stale(lock_state(run_id), cutoff)
        except RunNotFound:
            continue  # deleted since the candidates were read: nothing left to reap
    return failed


def _reap_stale_in_scope(scope: str) -> None:
    """Fail the scope's active run if it is stale. Call inside a transaction."""
    cutoff = stale_cutoff()
    stale = (
        RunState.objects.using(db_alias())
        .filter(scope=scope, status=RunStatus.ACTIVE, heartbeat_at__lt=cutoff)
        .values_list("run_id", flat=True)
        .first()
    )
    if stale is not None:
        _fail_if_stale(lock_state(stale), cutoff)


def _fail_if_stale(state: RunState, cutoff: datetime) -> int:
    if state.status != RunStatus.ACTIVE or state.heartbeat_at >= cutoff:
        return 0
    error = f"stale: no heartbeat since {state.heartbeat_at.isoformat()}"
    fail_locked(state, error, "stale")
    return 1


@traced("heartbeat")
def heartbeat(run: Run | str) -> None:
    """Record that the run's process is alive (so it is not reaped as stale).

    Raises ``RunNotFound``, ``RunClosed``.
    """
    run_id = run_id_of(run)
    updated = (
        RunState.objects.using(db_alias())
        .filter(run_id=run_id, status=RunStatus.ACTIVE)
        .update(heartbeat_at=timezone.now())
    )
    if not updated:
        ensure_run_accepts_events(run_id, allow_closed=False)


def latest_run(scope: str) -> Run | None:
    """The scope's newest run by creation order, whatever its status; None if it has none."""
    scope = validate_scope(scope)
    return (
        Run.objects.using(db_alias())
        .select_related("state", "outbox")
        .filter(scope=scope)
        .order_by("-ordinal")
        .first()
    )


def get_run(run_id: str) -> Run:
    """The run with its state and outbox. Raises ``RunNotFound``."""
    run_id = validate_run_id(run_id)
    try:
        return Run.objects.using(db_alias()).select_related("state", "outbox").get(pk=run_id)
    except Run.DoesNotExist:
        raise RunNotFound(run_id) from None
