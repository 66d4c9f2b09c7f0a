"""Flushing projects: upserting what a run saw, batch by batch, with a ledger that says whether
the flush finished.

The ledger (``RunState.flush_status``) is what keeps cleanup safe: it only becomes
``succeeded`` in the same transaction as the last batch of a call that read its whole input, so
a run whose scan or upsert failed half-way can never be taken for a run that saw everything.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from ..conf import runs_settings
from ..db import connection_for_write, db_alias, is_postgresql, table
from ..exceptions import FlushFailed, InvalidInput, RunClosed
from ..models import (
    PROJECT_KEY_MAX_LENGTH,
    PROJECT_NAME_MAX_LENGTH,
    FlushStatus,
    Project,
    Run,
    RunState,
    RunStatus,
)
from .cleanup import RECORD_OVERHEAD, removal_record_budget, removal_record_size
from .events import insert_events
from .runs import lock_state
from .validation import (
    PreparedEvent,
    encode_json_object,
    encode_json_string,
    error_text,
    run_id_of,
    validate_text,
)

logger = logging.getLogger(__name__)

PROJECT_FIELDS = frozenset({"key", "name", "data"})


@dataclass(frozen=True)
class FlushResult:
    """What one ``flush_projects`` call wrote. ``seen`` is ``created + updated``: rows upserted
    (a key repeated inside one batch counts once; repeated across batches, once per batch)."""

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


class _AlreadyFailed(Exception):
    """Internal: the ledger says ``failed`` already (sticky); nothing to record again."""

    def __init__(self, error: str) -> None:
        self.error = error
        super().__init__(error)


def flush_projects(
    run: Run | str, projects: Iterable[Mapping[str, Any]], *, batch_size: int | None = None
) -> FlushResult:
    """Upsert ``projects`` (mappings ``{"key": str, "name": str, "data": dict}``) into the run's
    scope, stamped ``last_seen_run = run``, and return the counts. May be called many times per
    run (one call per page); ``projects`` may be any iterable, even a generator of millions of
    rows: it is read lazily, ``batch_size`` (default ``FLUSH_BATCH_SIZE``) rows at a time, one
    row ahead.

    Transactions:
      1. ``flush_status`` becomes ``in_progress`` in its own short transaction, committed before
         the input is read, so a process dying mid-flush leaves ``in_progress`` behind, which
         ``complete_run`` and cleanup treat as a failed flush.
      2. One short transaction per batch, opened only after the batch was read and validated (no
         input is read inside it): lock the run's state row, check the run is still active,
         upsert the batch (one statement; keys repeated in the batch: last one wins; rows sorted
         by key so concurrent writers lock rows in the same order), add the counts to the ledger
         and refresh the heartbeat (one UPDATE), append a ``projects.flushed`` event. The last
         batch's transaction also sets ``flush_status = succeeded`` (an empty input is one such
         transaction with no upsert). A constant number of statements per batch.
    Called inside the caller's ``atomic()``, these transactions are savepoints of it: they commit
    with the caller's transaction (and roll back with it, ledger included).

    On any exception (bad input, the source raising, a run closed meanwhile -- e.g. reaped as
    stale -- a database error) the batch in hand is rolled back, ``flush_status`` becomes
    ``failed`` with the error in a new short transaction, and ``FlushFailed`` is raised, chained
    to the cause. Batches committed before stay (they are idempotent upserts; the run will not
    complete, so cleanup never acts on them). ``failed`` is sticky: later calls raise
    ``FlushFailed`` at once and write nothing. If recording the failure fails too, the status
    stays ``in_progress``, which counts as failed as well. (``KeyboardInterrupt`` and other
    ``BaseException`` are not converted: the batch rolls back and the status stays
    ``in_progress``.)

    Raises ``InvalidInput`` (a malformed ``run`` or ``batch_size``; nothing written), otherwise
    only ``FlushFailed``.
    """
    run_id = run_id_of(run)
    size = _batch_size(batch_size)
    try:
        scope = _start(run_id)
        return _flush_batches(run_id, scope, iter(projects), size)
    except _AlreadyFailed as exc:
        raise FlushFailed(run_id, f"its flush failed already ({exc.error})") from None
    except Exception as exc:
        _record_failure(run_id, exc)
        raise FlushFailed(run_id, str(exc) or type(exc).__name__) from exc


def _batch_size(batch_size: int | None) -> int:
    size = runs_settings.FLUSH_BATCH_SIZE if batch_size is None else batch_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise InvalidInput("batch_size", f"must be a positive integer, not {size!r}", limit=">= 1")
    return size


def _start(run_id: str) -> str:
    """Transaction 1: mark the flush in progress; return the run's scope."""
    with transaction.atomic(using=db_alias()):
        state = lock_state(run_id)
        _check_writable(state)
        if state.flush_status != FlushStatus.IN_PROGRESS:
            state.flush_status = FlushStatus.IN_PROGRESS
            state.save(using=db_alias(), update_fields=["flush_status"])
        return state.scope


def _check_writable(state: RunState) -> None:
    if state.flush_status == FlushStatus.FAILED:
        raise _AlreadyFailed(state.flush_error or "flush_status is failed")
    if state.status != RunStatus.ACTIVE:
        raise RunClosed(state.run_id, state.status)


def _flush_batches(
    run_id: str, scope: str, projects: Iterator[Mapping[str, Any]], size: int
) -> FlushResult:
    total = FlushResult()
    budget = removal_record_budget(scope)
    payload_limit = runs_settings.MAX_PAYLOAD_BYTES  # read once: a settings lookup per row shows
    index = 0  # position in the input, for error messages
    nothing = object()
    ahead: Any = next(projects, nothing)
    while True:
        batch: dict[str, ProjectRow] = {}
        read = 0
        while ahead is not nothing and read < size:
            row = validate_project(ahead, index, budget, payload_limit)
            batch[row.key] = row  # a key repeated in the batch: the last one wins
            read += 1
            index += 1
            ahead = next(projects, nothing)
        last = ahead is nothing
        # Sorted by code point, the order cleanup locks rows in too (see cleanup._delete_statement).
        total += _write_batch(run_id, sorted(batch.values(), key=lambda r: r.key), last=last)
        if last:
            return total


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


def _write_batch(run_id: str, rows: list[ProjectRow], *, last: bool) -> FlushResult:
    """Transaction 2 (one per batch): see ``flush_projects``."""
    now = timezone.now()
    with transaction.atomic(using=db_alias()):
        state = lock_state(run_id)
        _check_writable(state)
        created, updated = _upsert(state.scope, run_id, rows, now) if rows else (0, 0)
        seen = created + updated
        ledger: dict[str, Any] = {
            "rows_seen": F("rows_seen") + seen,
            "rows_created": F("rows_created") + created,
            "rows_updated": F("rows_updated") + updated,
            "heartbeat_at": now,
            "flush_status": FlushStatus.SUCCEEDED if last else FlushStatus.IN_PROGRESS,
        }
        if last:
            ledger["flushed_at"] = now
        RunState.objects.using(db_alias()).filter(run_id=run_id).update(**ledger)
        payload: dict[str, Any] = {"seen": seen, "created": created, "updated": updated}
        if rows:
            payload.update(first_key=rows[0].key, last_key=rows[-1].key)
        payload["flush_status"] = FlushStatus.SUCCEEDED if last else FlushStatus.IN_PROGRESS
        insert_events(run_id, [PreparedEvent("projects.flushed", payload)])
    return FlushResult(seen, created, updated)


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


def _record_failure(run_id: str, cause: BaseException) -> None:
    """After a failed call: ``flush_status = failed`` with the error, in its own transaction.

    Unconditional (even on a closed run): a flush that failed must never read as succeeded. If
    this write fails as well, the status stays ``in_progress``, which counts as failed too.
    """
    message = error_text(f"{type(cause).__name__}: {cause}")
    try:
        with transaction.atomic(using=db_alias()):
            RunState.objects.using(db_alias()).filter(run_id=run_id).update(
                flush_status=FlushStatus.FAILED, flush_error=message
            )
    except Exception:
        logger.exception("could not record the failed flush of run %s", run_id)
