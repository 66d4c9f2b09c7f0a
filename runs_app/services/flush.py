"""Flushing tracked models: upserting what a run saw, in flush sessions whose ledger says whether
the whole source was read.

A flush session (``with services.flush(run, Model) as flush: flush.write(page)``) is the only
way rows reach a tracked model's table. The run's ledger (``RunState.flush_status``, and the
model's line of it, ``RunModelState``) is ``in_progress`` from the moment a session opens
(committed before any row is read) and becomes ``succeeded`` only when every session of the
run (of the model) has left its block normally. Whatever escapes the block, whatever write
failed (even if the caller caught the error), and a batch that the caller's own transaction
rolled back, each leave the flush ``failed``; a process that dies leaves ``in_progress``. Both
make ``complete_run`` fail the run and cleanup refuse, so a run that did not see its whole
source never deletes anything.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import chain, islice
from types import TracebackType
from typing import Any

from django.db import transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import F, Model
from django.utils import timezone

from ..conf import runs_settings
from ..db import connection_for_write, db_alias, is_postgresql, table
from ..exceptions import FlushEnded, FlushFailed, FlushInTransaction, InvalidInput, RunClosed
from ..models import (
    FlushMode,
    FlushSessionStatus,
    FlushStatus,
    Project,
    Run,
    RunFlushSession,
    RunModelState,
    RunState,
    RunStatus,
)
from ..tracing import traced
from ..tracking import SyncSpec, json_key, tracked_spec
from .events import insert_events
from .rows import PreparedRow, RowSchema
from .runs import LockedLedger, lock_active_ledger, lock_active_state, lock_state
from .source_state import SourceState, encode_cursor, source_state
from .upsert import upsert
from .validation import PreparedEvent, internal_error_text, run_id_of

logger = logging.getLogger(__name__)

# ``write(rows)`` without a cursor (None cannot say it: a cursor is never null).
_NO_CURSOR: Any = object()
# The end of a write's rows, when reading one ahead.
_NO_ROW: Any = object()


@dataclass(frozen=True)
class FlushResult:
    """What a flush wrote. ``seen`` is ``created + updated``: rows upserted (a key repeated
    inside one batch counts once; repeated across batches, once per batch)."""

    seen: int = 0
    created: int = 0
    updated: int = 0
    revived: int = 0  # of the updated rows, tombstoned ones revived (soft-deleting models)

    def __add__(self, other: FlushResult) -> FlushResult:
        return FlushResult(
            self.seen + other.seen,
            self.created + other.created,
            self.updated + other.updated,
            self.revived + other.revived,
        )


def flush(
    run: Run | str,
    model: type[Model] | None = None,
    *,
    batch_size: int | None = None,
    incremental: bool = False,
) -> FlushSession:
    """A flush session of ``run`` for the tracked model ``model`` (default ``Project``), to use
    as a context manager::

        with services.flush(run, Repository) as flush:
            for page in source_pages():     # a source failing here fails the flush
                flush.write(page)           # -> FlushResult of this write

    ``incremental=True``: the run reads only what changed since the last completed run::

        with services.flush(run, Repository, incremental=True) as flush:
            for page in source.changed_since(flush.cursor):   # None on the first run
                flush.write(page.rows, cursor=page.next_cursor)

    ``flush.cursor`` is the cursor of the newest completed run of the scope that set one
    (:mod:`runs_app.services.source_state`); ``write(rows, cursor=...)`` stores this run's, in
    the transaction of the write's last batch. The run is marked incremental for the model, so
    ``safe_cleanup`` refuses it (``incremental_run``): it cannot tell which rows are gone. A
    full flush may set a cursor too, for the incremental runs after it.

    Validates its arguments at once (``InvalidInput``; nothing written); the session opens when
    the block is entered. See :class:`FlushSession` for the transactions and the guarantees.
    """
    run_id = run_id_of(run)
    spec = tracked_spec(Project if model is None else model)
    if not isinstance(incremental, bool):
        raise InvalidInput("incremental", f"must be True or False, not {incremental!r}")
    return FlushSession(run_id, spec, _batch_size(batch_size), incremental=incremental)


@traced("flush_projects")
def flush_projects(
    run: Run | str, projects: Iterable[Mapping[str, Any]], *, batch_size: int | None = None
) -> FlushResult:
    """The one-shot form: one flush session around one iterable. ``projects`` (mappings
    ``{"key": str, "name": str, "data": dict}``) may be any iterable, even a generator of
    millions of rows: it is read lazily, ``batch_size`` (default ``FLUSH_BATCH_SIZE``) rows at a
    time. Returns the counts.

    One call is the run's whole flush of projects: a second call (or session of ``Project``)
    on the run raises ``FlushEnded`` and writes nothing. For a source read page by page, use
    the session form, :func:`flush`.

    Raises ``InvalidInput`` (a malformed ``run`` or ``batch_size``; nothing written),
    ``FlushInTransaction``, ``RunClosed`` (the run is completed or failed; nothing written, its
    ledger untouched), otherwise ``FlushFailed`` (chained to the cause; ``FlushEnded`` is one).
    """
    with flush(run, batch_size=batch_size) as session:
        session.write(projects)
    return session.result


class FlushSession:
    """One worker's flush of a run. Use it as a context manager (see :func:`flush`).

    Transactions:
      * **open** (entering the block): one transaction, which must not be nested in the
        caller's (``FlushInTransaction`` otherwise): locks the run, checks it is active (else
        ``RunClosed``, nothing written), that its flush has not failed (``FlushFailed``) and
        that its flush of this model has not ended (``FlushEnded``: the ledger becomes
        ``failed``), then records the session and sets ``flush_status = in_progress`` on the
        run's ledger and the model's line. Committed before any row is read.
      * **write(rows)**: one short transaction per batch of ``batch_size`` rows, opened only
        after the batch was read and validated: lock the run, check it is active and its flush
        not failed, one upsert statement (keys sorted; a key repeated in the batch keeps its
        last value), the counts of the ledger, the model's line and the session, the
        heartbeat, a ``<sync_name>.flushed`` event. A constant number of statements per
        batch. Inside the caller's ``atomic()`` the batches are savepoints of it.
      * **close** (the block exits normally): one transaction: checks that every batch this
        session wrote is still there (a batch rolled back by the caller's transaction fails
        the session), marks it succeeded and, when no other session of the model (of the run)
        is open, sets the model's (the run's) ``flush_status = succeeded``, with a
        ``flush.succeeded`` event.

    Failure is sticky: an exception escaping the block, or a ``write`` that raised (even if the
    caller caught it and went on), records ``flush_status = failed`` with the error (event
    ``flush.failed``) in a transaction of its own, after the caller's transactions are gone,
    and raises ``FlushFailed`` chained to the cause. Later writes raise ``FlushFailed`` at once.
    ``KeyboardInterrupt`` and other ``BaseException`` are recorded too, then re-raised as they
    are; if the process dies, ``in_progress`` stays, which counts as failed.

    Several sessions of one run may be open at once (two workers sharing a run, or flushing
    two models): each is counted, and the run's flush succeeds only when all of them closed
    cleanly; completing the run while one is still open fails it. Once every session of a model
    closed cleanly, that model's flush has ended: a new session of it raises ``FlushEnded``
    (a source read twice is a job bug; several workers must open their sessions before the
    first one closes). Other models may still be flushed. A completed or failed run is never
    written to: its ledger is left as it is and ``RunClosed`` is raised.
    """

    def __init__(
        self, run_id: str, spec: SyncSpec, batch_size: int, *, incremental: bool = False
    ) -> None:
        self.run_id = run_id
        self.spec = spec
        self.batch_size = batch_size
        self.incremental = incremental
        self._start: SourceState | None = None  # read when the session opens
        self._schema: RowSchema | None = None  # built when the session opens (needs the scope)
        self.id: int | None = None  # the FlushSession row, once open
        self.result = FlushResult()
        self._batches = 0
        self._failure: str | None = None
        self._closed = False

    @property
    def _session_id(self) -> int:
        if self.id is None:
            raise RuntimeError("the flush session is not open")
        return self.id

    @property
    def cursor(self) -> Any:
        """Where this run starts reading its source: the cursor of the newest completed run of
        the scope that set one for the model (None when none did), as it was when the session
        opened. Only for an incremental session: a full one reads the whole source."""
        return self._start_state().cursor

    @property
    def cursor_run(self) -> str | None:
        """The id of the run whose cursor :attr:`cursor` is (None when there is none)."""
        return self._start_state().run_id

    def _start_state(self) -> SourceState:
        if not self.incremental:
            raise RuntimeError(
                "the cursor is for incremental sessions: open it with "
                f"services.flush(run, {self.spec.model.__name__}, incremental=True), which "
                "also marks the run incremental so that its cleanup never removes rows it did "
                "not read"
            )
        if self._start is None:
            raise RuntimeError("the cursor is read when the session opens: use it in its block")
        return self._start

    # -- context manager ----------------------------------------------------------------------

    def __enter__(self) -> FlushSession:
        if self.id is not None or self._closed:
            raise RuntimeError("a flush session is entered once")
        self._open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._closed = True
        if exc is None:
            self._close()
            return
        if isinstance(exc, RunClosed) and exc.run_id == self.run_id:
            return  # a closed run's ledger is never touched
        if isinstance(exc, FlushFailed) and self._failure is not None:
            self._record_failure(self._failure)  # again: the caller may have rolled it back
            return
        message = internal_error_text(f"{type(exc).__name__}: {exc}")
        self._failure = self._failure or message
        self._record_failure(self._failure)
        if isinstance(exc, Exception):
            raise FlushFailed(self.run_id, message) from exc
        # KeyboardInterrupt, SystemExit...: recorded, then left to propagate unchanged.

    # -- writing ------------------------------------------------------------------------------

    def write(
        self, rows: Iterable[Mapping[str, Any] | Model], *, cursor: Any = _NO_CURSOR
    ) -> FlushResult:
        """Upsert ``rows`` (any iterable of mappings or model instances, see
        :mod:`runs_app.services.rows`; read lazily, ``batch_size`` at a time) and return what
        this call wrote.

        ``cursor``: where the source stands once these rows are written (any JSON value but
        null, at most ``CURSOR_MAX_BYTES``): stored on the run's line of the model in the
        transaction of this call's last batch (a transaction of its own when ``rows`` is
        empty), so it is never ahead of the rows committed. The last cursor written wins. It
        becomes the scope's source state when the run completes.

        Raises ``InvalidInput`` naming ``cursor`` (not JSON, null, too large) before anything
        is read or written, the session still usable; ``FlushFailed`` (chained to the cause:
        bad input, the iterable raising, a database error; the session is failed for good);
        ``RunClosed`` (the run was closed meanwhile, e.g. reaped as stale)."""
        if self.id is None or self._closed:
            raise RuntimeError("write() is only allowed inside the session's `with` block")
        if self._failure is not None:
            raise FlushFailed(self.run_id, f"this flush session failed already ({self._failure})")
        cursor_text = None if cursor is _NO_CURSOR else encode_cursor(cursor)
        try:
            return self._write_all(iter(rows), cursor_text)
        except RunClosed:
            self._failure = "the run was closed during the flush"
            raise
        except FlushFailed as exc:
            self._failure = str(exc)
            self._record_failure(self._failure)
            raise
        except Exception as exc:
            self._failure = internal_error_text(f"{type(exc).__name__}: {exc}")
            self._record_failure(self._failure)
            raise FlushFailed(self.run_id, self._failure) from exc
        except BaseException as exc:
            self._failure = internal_error_text(f"{type(exc).__name__}: {exc}")
            raise

    def _write_all(self, rows: Iterator[Any], cursor: str | None) -> FlushResult:
        schema = self._schema
        if schema is None:
            raise RuntimeError("the flush session is not open")
        total = FlushResult()
        index = 0  # position in this call's input, for error messages
        ahead: Any = _NO_ROW  # a row read to learn whether the batch before it was the last
        while True:
            # The batch is read and checked before its transaction opens: no input is read
            # while a transaction is open.
            batch: dict[tuple[Any, ...], PreparedRow] = {}
            read = 0
            source = rows if ahead is _NO_ROW else chain((ahead,), rows)
            for value in islice(source, self.batch_size):
                row = schema.prepare(value, index)
                batch[row.key] = row  # a key repeated in the batch: the last one wins
                index += 1
                read += 1
            last = read < self.batch_size
            if not last and cursor is not None:
                # The cursor goes with the write's last batch: look one row ahead to know
                # whether this full batch is it (rather than a transaction of its own after it).
                ahead = next(rows, _NO_ROW)
                last = ahead is _NO_ROW
            if batch or (last and cursor is not None):
                # Sorted by key (text by code point), the order cleanup locks rows in too.
                written = self._write_batch(
                    [batch[key] for key in sorted(batch)], cursor if last else None
                )
                total += written
                self.result += written
            if last:
                return total

    @traced("flush.batch")
    def _write_batch(self, rows: list[PreparedRow], cursor: str | None = None) -> FlushResult:
        """One batch's transaction (``rows`` may be empty when it carries only the cursor)."""
        assert self._schema is not None
        now = timezone.now()
        alias = db_alias()
        with transaction.atomic(using=alias):
            state = lock_active_ledger(self.run_id)
            _check_not_failed(state)
            created = updated = revived = 0
            if rows:
                created, updated, revived = upsert(
                    self._schema, state.scope, self.run_id, rows, now
                )
            seen = created + updated
            if is_postgresql():
                counted = _count_batch_postgresql(
                    self.run_id, self.spec.label, self._session_id, created, updated, now, revived
                )
            else:
                counts = {
                    "rows_seen": F("rows_seen") + seen,
                    "rows_created": F("rows_created") + created,
                    "rows_updated": F("rows_updated") + updated,
                }
                RunState.objects.using(alias).filter(run_id=self.run_id).update(
                    **counts, heartbeat_at=now
                )
                self._model_state().update(**counts, rows_revived=F("rows_revived") + revived)
                counted = (
                    RunFlushSession.objects.using(alias)
                    .filter(pk=self._session_id, status=FlushSessionStatus.OPEN)
                    .update(
                        batches=F("batches") + 1,
                        rows_seen=F("rows_seen") + seen,
                        rows_created=F("rows_created") + created,
                        rows_updated=F("rows_updated") + updated,
                    )
                )
            if not counted:
                raise FlushFailed(self.run_id, "this flush session was failed meanwhile")
            payload: dict[str, Any] = {
                "session": self.id,
                "model": self.spec.label,
                "seen": seen,
                "created": created,
                "updated": updated,
                "first_key": json_key(rows[0].key) if rows else None,
                "last_key": json_key(rows[-1].key) if rows else None,
            }
            if self.spec.soft:
                payload["revived"] = revived
            if cursor is not None:
                value = json.loads(cursor)
                self._model_state().update(cursor=value, cursor_at=now)
                payload["cursor"] = value
            event = f"{self.spec.event_prefix}.flushed"
            insert_events(self.run_id, [PreparedEvent(event, payload)])
        self._batches += 1
        return FlushResult(seen, created, updated, revived)

    # -- open, close, fail ----------------------------------------------------------------------

    @traced("flush.open")
    def _open(self) -> None:
        connection = connection_for_write()
        if _in_transaction(connection):
            raise FlushInTransaction(self.run_id)
        alias = db_alias()
        ended = False
        with transaction.atomic(using=alias, durable=True):
            state = lock_active_state(self.run_id)
            _check_not_failed(state)
            # No get_or_create (and its savepoint): every writer of the line holds the run's
            # lock, taken above, so nobody can insert it in between.
            model_state = self._model_state().first()
            if self.incremental:
                self._start = source_state(
                    state.scope, self.spec.model, before_ordinal=state.run.ordinal
                )
            mode = FlushMode.INCREMENTAL if self.incremental else FlushMode.FULL
            if model_state is not None and model_state.flush_status == FlushStatus.SUCCEEDED:
                ended = True
                _fail_flush(
                    state,
                    f"a flush of {self.spec.label} was started after the run's flush of it had "
                    "ended",
                    None,
                    self.spec.label,
                )
            else:
                now = timezone.now()
                self.id = (
                    RunFlushSession.objects.using(alias)
                    .create(run_id=self.run_id, model=self.spec.label, opened_at=now)
                    .pk
                )
                RunState.objects.using(alias).filter(run_id=self.run_id).update(
                    flush_status=FlushStatus.IN_PROGRESS, heartbeat_at=now
                )
                if model_state is None:
                    RunModelState.objects.using(alias).create(
                        run_id=self.run_id,
                        model=self.spec.label,
                        flush_status=FlushStatus.IN_PROGRESS,
                        flush_mode=mode,
                    )
                else:
                    # One incremental session makes the run's read of the model incremental
                    # (never the other way round: that would let its cleanup run).
                    line: dict[str, Any] = {}
                    if model_state.flush_status != FlushStatus.IN_PROGRESS:
                        line["flush_status"] = FlushStatus.IN_PROGRESS
                    if self.incremental and model_state.flush_mode != FlushMode.INCREMENTAL:
                        line["flush_mode"] = FlushMode.INCREMENTAL
                    if line:
                        self._model_state().update(**line)
                self._schema = RowSchema(self.spec, state.scope, self.run_id)
        if ended:
            self._closed = True
            raise FlushEnded(self.run_id)

    def _close(self) -> None:
        if self._failure is not None:
            self._record_failure(self._failure)
            raise FlushFailed(self.run_id, f"a write of this session failed ({self._failure})")
        try:
            failure = self._close_transaction()
        except RunClosed:
            raise
        except Exception as exc:
            # A database error while closing: nothing of the close committed; record the
            # failure (the session must never read as open-but-fine) and say so.
            self._failure = internal_error_text(f"closing failed: {type(exc).__name__}: {exc}")
            self._record_failure(self._failure)
            raise FlushFailed(self.run_id, self._failure) from exc
        if failure is not None:
            self._failure = failure
            self._record_failure(failure)
            raise FlushFailed(self.run_id, failure)

    @traced("flush.close")
    def _close_transaction(self) -> str | None:
        """The close's one transaction; returns why the session failed, or None."""
        alias = db_alias()
        failure: str | None = None
        with transaction.atomic(using=alias):
            state = lock_active_state(self.run_id)
            session = RunFlushSession.objects.using(alias).get(pk=self._session_id)
            if session.status != FlushSessionStatus.OPEN:
                failure = session.error or f"this flush session is {session.status}"
            elif session.batches != self._batches:
                failure = (
                    f"{self._batches - session.batches} of the {self._batches} batch(es) this "
                    "session wrote were rolled back (by the caller's transaction?)"
                )
            elif state.flush_status == FlushStatus.FAILED:
                failure = f"the run's flush failed in another session ({state.flush_error})"
            else:
                now = timezone.now()
                session.status = FlushSessionStatus.SUCCEEDED
                session.closed_at = now
                session.save(using=alias, update_fields=["status", "closed_at"])
                still_open = set(
                    RunFlushSession.objects.using(alias)
                    .filter(run_id=self.run_id, status=FlushSessionStatus.OPEN)
                    .values_list("model", flat=True)
                    .distinct()
                )
                others = bool(still_open)
                ledger: dict[str, Any] = {"heartbeat_at": now}
                if not others:
                    ledger.update(flush_status=FlushStatus.SUCCEEDED, flushed_at=now)
                RunState.objects.using(alias).filter(run_id=self.run_id).update(**ledger)
                if self.spec.label not in still_open:
                    self._model_state().update(flush_status=FlushStatus.SUCCEEDED)
                payload = {
                    "session": self.id,
                    "model": self.spec.label,
                    "seen": session.rows_seen,
                    "created": session.rows_created,
                    "updated": session.rows_updated,
                    "flush_status": FlushStatus.IN_PROGRESS if others else FlushStatus.SUCCEEDED,
                }
                insert_events(self.run_id, [PreparedEvent("flush.succeeded", payload)])
        return failure

    @traced("flush.fail")
    def _record_failure(self, error: str) -> None:
        """``failed`` on the session and the ledger, with a ``flush.failed`` event, in a
        transaction of its own; idempotent; never on a closed run. If this write fails too, the
        status stays ``in_progress``, which counts as failed as well."""
        try:
            with transaction.atomic(using=db_alias()):
                state = lock_state(self.run_id)
                if state.status == RunStatus.ACTIVE:
                    _fail_flush(state, error, self.id, self.spec.label)
        except Exception:
            logger.exception("could not record the failed flush of run %s", self.run_id)

    def _model_state(self) -> Any:
        """This session's (run, model) ledger line, as a queryset to update."""
        return RunModelState.objects.using(db_alias()).filter(
            run_id=self.run_id, model=self.spec.label
        )


def _count_batch_postgresql(
    run_id: str, model: str, session_id: int, created: int, updated: int, now: Any, revived: int
) -> int:
    """A batch's counts on the run's ledger, the model's line and the session, in one statement
    (the run and model ledgers as data-modifying CTEs, which PostgreSQL runs to completion
    whatever the main statement reads): one round trip and no ORM query to compile per batch,
    rather than three. Returns 1 if the session was still open (and counted), else 0."""
    counts = (
        "rows_seen = rows_seen + %(seen)s, rows_created = rows_created + %(created)s, "
        "rows_updated = rows_updated + %(updated)s"
    )
    sql = (
        f"WITH s AS (UPDATE {table(RunState)} SET {counts}, heartbeat_at = %(now)s "
        "WHERE run_id = %(run)s RETURNING 1), "
        f"m AS (UPDATE {table(RunModelState)} SET {counts}, "
        "rows_revived = rows_revived + %(revived)s "
        "WHERE run_id = %(run)s AND model = %(model)s RETURNING 1) "
        f"UPDATE {table(RunFlushSession)} SET batches = batches + 1, {counts} "
        "WHERE id = %(session)s AND status = %(open)s"
    )
    params = {
        "seen": created + updated,
        "created": created,
        "updated": updated,
        "revived": revived,
        "now": now,
        "run": run_id,
        "model": model,
        "session": session_id,
        "open": FlushSessionStatus.OPEN.value,
    }
    with connection_for_write().cursor() as cursor:
        cursor.execute(sql, params)
        return int(cursor.rowcount)


def _in_transaction(connection: BaseDatabaseWrapper) -> bool:
    """True inside a transaction of the caller's (an ``atomic()`` block, or autocommit off).
    The blocks a test case wraps each test in do not count, as for ``atomic(durable=True)``."""
    blocks = connection.atomic_blocks
    if blocks:
        return not getattr(blocks[-1], "_from_testcase", False)
    return not connection.get_autocommit()


def _fail_flush(state: RunState, error: str, session_id: int | None, model: str) -> None:
    """Mark the session (if any), the model's and the run's flush failed, with a
    ``flush.failed`` event. Call inside a transaction with the run locked (``lock_state``) and
    the run active. Writes nothing when all say failed already (the first error is kept)."""
    alias = db_alias()
    now = timezone.now()
    session_failed = 0
    if session_id is not None:
        session_failed = (
            RunFlushSession.objects.using(alias)
            .filter(pk=session_id, status=FlushSessionStatus.OPEN)
            .update(status=FlushSessionStatus.FAILED, error=error, closed_at=now)
        )
    model_failed = (
        RunModelState.objects.using(alias)
        .filter(run_id=state.run_id, model=model)
        .exclude(flush_status=FlushStatus.FAILED)
        .update(flush_status=FlushStatus.FAILED)
    )
    if state.flush_status == FlushStatus.FAILED and not session_failed and not model_failed:
        return
    if state.flush_status != FlushStatus.FAILED:
        RunState.objects.using(alias).filter(run_id=state.run_id).update(
            flush_status=FlushStatus.FAILED, flush_error=error, heartbeat_at=now
        )
    payload = {"session": session_id, "model": model, "error": error}
    insert_events(state.run_id, [PreparedEvent("flush.failed", payload)])


def _batch_size(batch_size: int | None) -> int:
    size = runs_settings.FLUSH_BATCH_SIZE if batch_size is None else batch_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise InvalidInput("batch_size", f"must be a positive integer, not {size!r}", limit=">= 1")
    return size


def _check_not_failed(state: RunState | LockedLedger) -> None:
    if state.flush_status == FlushStatus.FAILED:
        raise FlushFailed(
            state.run_id, f"its flush failed already ({state.flush_error or 'failed'})"
        )
