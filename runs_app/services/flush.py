"""Flushing projects: upserting what a run saw, in flush sessions whose ledger says whether the
whole source was read.

A flush session (``with services.flush(run) as flush: flush.write(page)``) is the only way rows
reach the table. The run's ledger (``RunState.flush_status``) is ``in_progress`` from the moment
a session opens (committed before any row is read) and becomes ``succeeded`` only when every
session of the run has left its block normally. Whatever escapes the block, whatever write
failed (even if the caller caught the error), and a batch that the caller's own transaction
rolled back, each leave the flush ``failed``; a process that dies leaves ``in_progress``. Both
make ``complete_run`` fail the run and cleanup refuse, so a run that did not see its whole
source never deletes anything.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from types import TracebackType
from typing import Any, NamedTuple

from django.db import transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import F, Model
from django.utils import timezone

from ..conf import runs_settings
from ..db import connection_for_write, db_alias, is_postgresql, table
from ..exceptions import FlushEnded, FlushFailed, FlushInTransaction, InvalidInput, RunClosed
from ..models import (
    PROJECT_KEY_MAX_LENGTH,
    PROJECT_NAME_MAX_LENGTH,
    FlushSessionStatus,
    FlushStatus,
    Project,
    Run,
    RunFlushSession,
    RunState,
    RunStatus,
)
from .cleanup import RECORD_OVERHEAD, removal_record_budget, removal_record_size
from .events import insert_events
from .runs import lock_active_state, lock_state
from .validation import (
    PreparedEvent,
    encode_json_object,
    encode_json_string,
    internal_error_text,
    run_id_of,
    validate_text,
)

logger = logging.getLogger(__name__)

PROJECT_FIELDS = frozenset({"key", "name", "data"})


@dataclass(frozen=True)
class FlushResult:
    """What a flush wrote. ``seen`` is ``created + updated``: rows upserted (a key repeated
    inside one batch counts once; repeated across batches, once per batch)."""

    seen: int = 0
    created: int = 0
    updated: int = 0

    def __add__(self, other: FlushResult) -> FlushResult:
        return FlushResult(
            self.seen + other.seen, self.created + other.created, self.updated + other.updated
        )


class ProjectRow(NamedTuple):
    """A validated project, ready to upsert; ``data`` is its compact JSON text. (A tuple: one is
    built per input row, and a tuple builds several times faster than a frozen dataclass.)"""

    key: str
    name: str
    data: str


def flush(
    run: Run | str, model: type[Model] | None = None, *, batch_size: int | None = None
) -> FlushSession:
    """A flush session of ``run`` for ``model`` (``Project``, the default and, in this release,
    the only model), to use as a context manager::

        with services.flush(run) as flush:
            for page in source_pages():     # a source failing here fails the flush
                flush.write(page)           # -> FlushResult of this write

    Validates its arguments at once (``InvalidInput``; nothing written); the session opens when
    the block is entered. See :class:`FlushSession` for the transactions and the guarantees.
    """
    run_id = run_id_of(run)
    if model is not None and model is not Project:
        name = getattr(model, "__name__", repr(model))
        raise InvalidInput(
            "model", f"{name} cannot be flushed: this release flushes runs_app.Project only"
        )
    return FlushSession(run_id, _batch_size(batch_size))


def flush_projects(
    run: Run | str, projects: Iterable[Mapping[str, Any]], *, batch_size: int | None = None
) -> FlushResult:
    """The one-shot form: one flush session around one iterable. ``projects`` (mappings
    ``{"key": str, "name": str, "data": dict}``) may be any iterable, even a generator of
    millions of rows: it is read lazily, ``batch_size`` (default ``FLUSH_BATCH_SIZE``) rows at a
    time. Returns the counts.

    One call is the run's whole flush: a second call (or session) on the run raises
    ``FlushEnded`` and writes nothing. For a source read page by page, use the session form,
    :func:`flush`.

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
        ``RunClosed``, nothing written) and that its flush neither failed (``FlushFailed``) nor
        ended (``FlushEnded``: the ledger becomes ``failed``), then records the session and
        sets ``flush_status = in_progress``. Committed before any row is read.
      * **write(rows)**: one short transaction per batch of ``batch_size`` rows, opened only
        after the batch was read and validated: lock the run, check it is active and its flush
        not failed, one upsert statement (keys sorted; a key repeated in the batch keeps its
        last value), the ledger's and the session's counts and the heartbeat, a
        ``projects.flushed`` event. A constant number of statements per batch. Inside the
        caller's ``atomic()`` the batches are savepoints of it.
      * **close** (the block exits normally): one transaction: checks that every batch this
        session wrote is still there (a batch rolled back by the caller's transaction fails
        the session), marks it succeeded and, when no other session of the run is open, sets
        ``flush_status = succeeded`` with a ``flush.succeeded`` event.

    Failure is sticky: an exception escaping the block, or a ``write`` that raised (even if the
    caller caught it and went on), records ``flush_status = failed`` with the error (event
    ``flush.failed``) in a transaction of its own, after the caller's transactions are gone,
    and raises ``FlushFailed`` chained to the cause. Later writes raise ``FlushFailed`` at once.
    ``KeyboardInterrupt`` and other ``BaseException`` are recorded too, then re-raised as they
    are; if the process dies, ``in_progress`` stays, which counts as failed.

    Several sessions of one run may be open at once (two workers sharing a run): each is
    counted, and the run's flush succeeds only when all of them closed cleanly; completing the
    run while one is still open fails it. A completed or failed run is never written to: its
    ledger is left as it is and ``RunClosed`` is raised.
    """

    def __init__(self, run_id: str, batch_size: int) -> None:
        self.run_id = run_id
        self.batch_size = batch_size
        self.id: int | None = None  # the FlushSession row, once open
        self._scope = ""  # the run's, once open
        self.result = FlushResult()
        self._batches = 0
        self._failure: str | None = None
        self._closed = False

    @property
    def _session_id(self) -> int:
        if self.id is None:
            raise RuntimeError("the flush session is not open")
        return self.id

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

    def write(self, rows: Iterable[Mapping[str, Any]]) -> FlushResult:
        """Upsert ``rows`` (any iterable of project mappings, read lazily, ``batch_size`` at a
        time) and return what this call wrote. Raises ``FlushFailed`` (chained to the cause:
        bad input, the iterable raising, a database error; the session is failed for good),
        ``RunClosed`` (the run was closed meanwhile, e.g. reaped as stale)."""
        if self.id is None or self._closed:
            raise RuntimeError("write() is only allowed inside the session's `with` block")
        if self._failure is not None:
            raise FlushFailed(self.run_id, f"this flush session failed already ({self._failure})")
        try:
            return self._write_all(iter(rows))
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

    def _write_all(self, rows: Iterator[Mapping[str, Any]]) -> FlushResult:
        total = FlushResult()
        budget = removal_record_budget(self._scope)
        payload_limit = runs_settings.MAX_PAYLOAD_BYTES  # once: a settings lookup per row shows
        index = 0  # position in this call's input, for error messages
        while True:
            # The batch is read and validated before its transaction opens: no input is read
            # while a transaction is open.
            batch: dict[str, ProjectRow] = {}
            read = 0
            for value in islice(rows, self.batch_size):
                row = validate_project(value, index, budget, payload_limit)
                batch[row.key] = row  # a key repeated in the batch: the last one wins
                index += 1
                read += 1
            if batch:
                # Sorted by code point, the order cleanup locks rows in too.
                written = self._write_batch(sorted(batch.values(), key=lambda r: r.key))
                total += written
                self.result += written
            if read < self.batch_size:
                return total

    def _write_batch(self, rows: list[ProjectRow]) -> FlushResult:
        now = timezone.now()
        alias = db_alias()
        with transaction.atomic(using=alias):
            state = lock_active_state(self.run_id)
            _check_not_failed(state)
            created, updated = _upsert(state.scope, self.run_id, rows, now)
            seen = created + updated
            RunState.objects.using(alias).filter(run_id=self.run_id).update(
                rows_seen=F("rows_seen") + seen,
                rows_created=F("rows_created") + created,
                rows_updated=F("rows_updated") + updated,
                heartbeat_at=now,
            )
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
                "seen": seen,
                "created": created,
                "updated": updated,
                "first_key": rows[0].key,
                "last_key": rows[-1].key,
            }
            insert_events(self.run_id, [PreparedEvent("projects.flushed", payload)])
        self._batches += 1
        return FlushResult(seen, created, updated)

    # -- open, close, fail ----------------------------------------------------------------------

    def _open(self) -> None:
        connection = connection_for_write()
        if _in_transaction(connection):
            raise FlushInTransaction(self.run_id)
        alias = db_alias()
        ended = False
        with transaction.atomic(using=alias, durable=True):
            state = lock_active_state(self.run_id)
            _check_not_failed(state)
            if state.flush_status == FlushStatus.SUCCEEDED:
                ended = True
                _fail_flush(state, "a flush was started after the run's flush had ended", None)
            else:
                now = timezone.now()
                self.id = (
                    RunFlushSession.objects.using(alias)
                    .create(run_id=self.run_id, opened_at=now)
                    .pk
                )
                RunState.objects.using(alias).filter(run_id=self.run_id).update(
                    flush_status=FlushStatus.IN_PROGRESS, heartbeat_at=now
                )
                self._scope = state.scope
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
                others = (
                    RunFlushSession.objects.using(alias)
                    .filter(run_id=self.run_id, status=FlushSessionStatus.OPEN)
                    .exists()
                )
                ledger: dict[str, Any] = {"heartbeat_at": now}
                if not others:
                    ledger.update(flush_status=FlushStatus.SUCCEEDED, flushed_at=now)
                RunState.objects.using(alias).filter(run_id=self.run_id).update(**ledger)
                payload = {
                    "session": self.id,
                    "seen": session.rows_seen,
                    "created": session.rows_created,
                    "updated": session.rows_updated,
                    "flush_status": FlushStatus.IN_PROGRESS if others else FlushStatus.SUCCEEDED,
                }
                insert_events(self.run_id, [PreparedEvent("flush.succeeded", payload)])
        return failure

    def _record_failure(self, error: str) -> None:
        """``failed`` on the session and the ledger, with a ``flush.failed`` event, in a
        transaction of its own; idempotent; never on a closed run. If this write fails too, the
        status stays ``in_progress``, which counts as failed as well."""
        try:
            with transaction.atomic(using=db_alias()):
                state = lock_state(self.run_id)
                if state.status == RunStatus.ACTIVE:
                    _fail_flush(state, error, self.id)
        except Exception:
            logger.exception("could not record the failed flush of run %s", self.run_id)


def _in_transaction(connection: BaseDatabaseWrapper) -> bool:
    """True inside a transaction of the caller's (an ``atomic()`` block, or autocommit off).
    The blocks a test case wraps each test in do not count, as for ``atomic(durable=True)``."""
    blocks = connection.atomic_blocks
    if blocks:
        return not getattr(blocks[-1], "_from_testcase", False)
    return not connection.get_autocommit()


def _fail_flush(state: RunState, error: str, session_id: int | None) -> None:
    """Mark the session (if any) and the run's flush failed, with a ``flush.failed`` event.
    Call inside a transaction with the run locked (``lock_state``) and the run active. Writes
    nothing when both say failed already (the first error is kept)."""
    alias = db_alias()
    now = timezone.now()
    session_failed = 0
    if session_id is not None:
        session_failed = (
            RunFlushSession.objects.using(alias)
            .filter(pk=session_id, status=FlushSessionStatus.OPEN)
            .update(status=FlushSessionStatus.FAILED, error=error, closed_at=now)
        )
    if state.flush_status == FlushStatus.FAILED and not session_failed:
        return
    if state.flush_status != FlushStatus.FAILED:
        RunState.objects.using(alias).filter(run_id=state.run_id).update(
            flush_status=FlushStatus.FAILED, flush_error=error, heartbeat_at=now
        )
    payload = {"session": session_id, "error": error}
    insert_events(state.run_id, [PreparedEvent("flush.failed", payload)])


def _batch_size(batch_size: int | None) -> int:
    size = runs_settings.FLUSH_BATCH_SIZE if batch_size is None else batch_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise InvalidInput("batch_size", f"must be a positive integer, not {size!r}", limit=">= 1")
    return size


def _check_not_failed(state: RunState) -> None:
    if state.flush_status == FlushStatus.FAILED:
        raise FlushFailed(
            state.run_id, f"its flush failed already ({state.flush_error or 'failed'})"
        )


def validate_project(
    value: Any, index: int, budget: int, payload_limit: int | None = None
) -> ProjectRow:
    """Check one input project; ``InvalidInput`` names ``projects[index].field`` and the limit.

    ``budget``: ``removal_record_budget(scope)``. Besides its own limits, a project must fit in a
    ``projects.removed`` event, so that removing it can always be audited. ``payload_limit``:
    ``MAX_PAYLOAD_BYTES`` if the caller read it already.
    """
    field = f"projects[{index}]"
    if type(value) is not dict and not isinstance(value, Mapping):
        raise InvalidInput(
            field, f"must be a mapping with key, name and data, not {type(value).__name__}"
        )
    if not PROJECT_FIELDS.issuperset(value):
        unknown = sorted(str(name) for name in value if name not in PROJECT_FIELDS)
        raise InvalidInput(
            field, f"has unknown field(s) {', '.join(unknown)}; a project has key, name and data"
        )
    key = _required_text(value, field, "key", PROJECT_KEY_MAX_LENGTH)
    name = _required_text(value, field, "name", PROJECT_NAME_MAX_LENGTH)
    data = value.get("data")
    data_text = encode_json_object(
        f"{field}.data", {} if data is None else data, limit=payload_limit
    )
    # Cheap bound first (a character takes at most 6 bytes escaped in a JSON string, 4 in
    # UTF-8): the exact size costs two more JSON encodings, worth it only near the limit.
    bound = RECORD_OVERHEAD + 6 * (len(key) + len(name)) + 4 * len(data_text)
    if bound > budget:
        size = removal_record_size(key, name, data_text)
        if size > budget:
            limit = runs_settings.MAX_PAYLOAD_BYTES
            raise InvalidInput(
                f"{field}.data",
                f"with its key and name makes a projects.removed audit record of {size} bytes, "
                f"too big for one event: the limit is {limit} (RUNS_APP['MAX_PAYLOAD_BYTES'])",
                limit=limit,
            )
    return ProjectRow(key, name, data_text)


def _required_text(value: Mapping[str, Any], field: str, name: str, max_length: int) -> str:
    if name not in value:
        raise InvalidInput(f"{field}.{name}", "is missing", limit=max_length)
    return validate_text(f"{field}.{name}", value[name], max_length)


def _upsert(scope: str, run_id: str, rows: list[ProjectRow], now: datetime) -> tuple[int, int]:
    """Upsert ``rows`` (distinct keys, sorted); return ``(created, updated)`` as the database
    counted them. Raw SQL: the ORM's ``bulk_create(update_conflicts=True)`` cannot report which
    rows were inserted and which updated."""
    if is_postgresql():
        return _upsert_postgresql(scope, run_id, rows, now)
    return _upsert_sqlite(scope, run_id, rows, now)


# The columns set on conflict: what the source says, and who saw it last. created_at and
# last_confirmed_run are left alone (confirmation is complete_run's business).
_ON_CONFLICT = (
    "ON CONFLICT (scope, key) DO UPDATE SET name = excluded.name, data = excluded.data, "
    "last_seen_run_id = excluded.last_seen_run_id, updated_at = excluded.updated_at"
)


def _upsert_postgresql(
    scope: str, run_id: str, rows: list[ProjectRow], now: datetime
) -> tuple[int, int]:
    # One statement for the whole batch, its rows sent as one JSON array [[key, name, data],
    # ...] and unnested server-side: close to COPY speed, yet visible to execute_wrapper (fault
    # injection) and CaptureQueriesContext, unlike cursor.copy(). One JSON text rather than
    # unnest(%s::text[], ...): psycopg quotes array elements one by one in Python, while the
    # JSON array is built by joining texts we already hold.
    # xmax = 0 holds for a freshly inserted row version only, so it tells inserts from updates.
    sql = (
        f"WITH up AS (INSERT INTO {table(Project)} "
        "(scope, key, name, data, last_seen_run_id, created_at, updated_at) "
        "SELECT %s, r ->> 0, r ->> 1, r -> 2, %s, %s, %s FROM jsonb_array_elements(%s::jsonb) r "
        f"{_ON_CONFLICT} RETURNING (xmax = 0) AS inserted) "
        "SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM up"
    )
    batch = (
        "["
        + ",".join(
            f"[{encode_json_string(r.key)},{encode_json_string(r.name)},{r.data}]" for r in rows
        )
        + "]"
    )
    with connection_for_write().cursor() as cursor:
        cursor.execute(sql, [scope, run_id, now, now, batch])
        created, updated = cursor.fetchone()
    return int(created), int(updated)


def _sqlite_max_variables() -> int:
    connection = connection_for_write()
    connection.ensure_connection()
    return int(connection.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))


def _upsert_sqlite(
    scope: str, run_id: str, rows: list[ProjectRow], now: datetime
) -> tuple[int, int]:
    # SQLite cannot tell an insert from an update in RETURNING, so count the batch's existing
    # keys first. Exact: this write transaction holds SQLite's write lock (IMMEDIATE mode), so no
    # other writer can add or remove one of these keys in between. Chunked under the bound
    # variable limit; all chunks stay in this transaction.
    connection = connection_for_write()
    max_vars = _sqlite_max_variables()
    stamp = connection.ops.adapt_datetimefield_value(now)
    project = table(Project)
    existing = 0
    with connection.cursor() as cursor:
        per_count = max_vars - 1
        for start in range(0, len(rows), per_count):
            chunk = rows[start : start + per_count]
            marks = ", ".join(["%s"] * len(chunk))
            cursor.execute(
                f"SELECT count(*) FROM {project} WHERE scope = %s AND key IN ({marks})",
                [scope, *(row.key for row in chunk)],
            )
            existing += int(cursor.fetchone()[0])
        # Three variables per row; scope, run and timestamps bound once per statement.
        per_insert = (max_vars - 4) // 3
        for start in range(0, len(rows), per_insert):
            chunk = rows[start : start + per_insert]
            values = ", ".join(["(%s, %s, %s)"] * len(chunk))
            params: list[Any] = [scope, run_id, stamp, stamp]
            for row in chunk:
                params.extend((row.key, row.name, row.data))
            # "WHERE true": SQLite's parser needs it between a SELECT and ON CONFLICT.
            cursor.execute(
                f"INSERT INTO {project} "
                "(scope, key, name, data, last_seen_run_id, created_at, updated_at) "
                "SELECT %s, column1, column2, column3, %s, %s, %s "
                f"FROM (VALUES {values}) WHERE true {_ON_CONFLICT}",
                params,
            )
    return len(rows) - existing, existing
