"""Appending events to a run: contiguous seqs under a row lock, one bulk insert."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from django.db import transaction
from django.utils import timezone

from ..db import connection_for_write, db_alias, is_postgresql, table
from ..exceptions import RunClosed, RunNotFound
from ..models import Run, RunEvent, RunState, RunStatus
from ..notify import returning_clause
from ..tracing import traced
from .validation import (
    EncodedEvent,
    PreparedEvent,
    encode_json_string,
    prepare_events,
    run_id_of,
)


@traced("append_events")
def append_events(run: Run | str, events: Iterable[Any]) -> list[RunEvent]:
    """Append events to an active run and return them with their seqs.

    One transaction (nested in the caller's, if any; on PostgreSQL outside one, a single
    statement in autocommit): a single ``UPDATE ... RETURNING`` bumps the
    run's ``last_seq`` by the number of events and locks the run row until commit, then one
    INSERT writes the events, whatever their number. Concurrent appenders to one run therefore get
    contiguous seqs that commit in seq order, so a reader of ``seq >= next_seq`` never skips a row.

    Raises ``InvalidEvent`` (nothing written), ``RunNotFound``, ``RunClosed`` for a completed or
    failed run.
    """
    run_id = run_id_of(run)
    prepared = prepare_events(events)
    if prepared and is_postgresql() and connection_for_write().get_autocommit():
        # Outside any transaction the append is one statement on PostgreSQL (append_rows),
        # atomic by itself: sent in autocommit it commits alone, without the BEGIN and COMMIT
        # round trips of an atomic block (about a fifth of a one-event append on loopback).
        return insert_events(run_id, prepared)
    with transaction.atomic(using=db_alias()):
        return insert_events(run_id, prepared)


def insert_events(
    run_id: str,
    events: Sequence[PreparedEvent],
    *,
    allow_closed: bool = False,
    close: bool = False,
) -> list[RunEvent]:
    """Allocate seqs and insert validated events. Call inside a transaction.

    ``allow_closed`` is for the app's own lifecycle and audit events (``run.completed``,
    ``cleanup.refused``...), which are appended to runs that callers may no longer write to.
    ``close`` marks the run closed in the same statement (``run.completed`` / ``run.failed``).
    """
    if not events:
        ensure_run_accepts_events(run_id, allow_closed=allow_closed)
        return []
    now = timezone.now()
    ids = append_rows(run_id, events, now, allow_closed=allow_closed, close=close)
    alias = db_alias()
    rows = []
    for (seq, event_id), event in zip(sorted(ids), events, strict=True):
        row = RunEvent(
            id=event_id,
            run_id=run_id,
            seq=seq,
            type=event.type,
            payload=event.payload,
            created_at=now,
        )
        row._state.adding = False  # as bulk_create leaves its objects: saved, in this database
        row._state.db = alias
        rows.append(row)
    return rows


def insert_encoded_events(
    run_id: str, events: Sequence[EncodedEvent], *, allow_closed: bool = False
) -> None:
    """``insert_events`` for events already encoded as JSON text (the app's own audit events):
    seqs reserved and rows inserted, no ``RunEvent`` built. Call inside a transaction."""
    if events:
        append_rows(run_id, events, timezone.now(), allow_closed=allow_closed)


def append_rows(
    run_id: str,
    events: Sequence[PreparedEvent] | Sequence[EncodedEvent],
    now: datetime,
    *,
    allow_closed: bool,
    close: bool = False,
) -> list[tuple[int, int]]:
    """Reserve seqs for ``events`` (``reserve_seqs``) and insert them; return their
    ``(seq, id)``. Call inside a transaction.

    PostgreSQL: one statement, the counter's ``UPDATE ... RETURNING`` as a data-modifying CTE
    feeding the ``INSERT`` (an append costs one round trip; ``append_events`` sends it alone in
    autocommit when its caller has no transaction, where it is atomic by itself). The
    UPDATE keeps all its guarantees inside the CTE: it locks the run row, re-checks
    ``NOT closed`` on the row version a closing transaction committed, and NOTIFYs. No row
    comes back when it matched no run; the caller then learns why (``RunClosed`` /
    ``RunNotFound``). SQLite (no DML in a CTE): the two statements.
    """
    if not is_postgresql():
        last_seq = reserve_seqs(run_id, len(events), allow_closed=allow_closed, close=close)
        return insert_event_rows(run_id, last_seq - len(events) + 1, events, now)
    count = len(events)
    counter_sql, counter_params = _counter_update(run_id, count, allow_closed, close)
    sql = (
        f"WITH r AS ({counter_sql})"
        f" INSERT INTO {table(RunEvent)} (run_id, seq, type, payload, created_at)"
        " SELECT %s, r.last_seq - %s + e.i, e.j ->> 0, e.j -> 1, %s"
        " FROM r, jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS e(j, i)"
        " RETURNING seq, id"
    )
    params = [*counter_params, run_id, count, now, _events_json(events)]
    with connection_for_write().cursor() as cursor:
        cursor.execute(sql, params)
        rows = [(int(seq), int(event_id)) for seq, event_id in cursor.fetchall()]
    if not rows:
        ensure_run_accepts_events(run_id, allow_closed=allow_closed)
        raise RunNotFound(run_id)  # a run row without its state: not a run the app knows
    return rows


def _events_json(events: Sequence[PreparedEvent] | Sequence[EncodedEvent]) -> str:
    """The events as one JSON array ``[[type, payload], ...]``, built from the texts
    validation produced (never re-encoded)."""
    return (
        "["
        + ",".join(f"[{encode_json_string(event.type)},{event.payload_text()}]" for event in events)
        + "]"
    )


def insert_event_rows(
    run_id: str,
    first_seq: int,
    events: Sequence[PreparedEvent] | Sequence[EncodedEvent],
    now: datetime,
) -> list[tuple[int, int]]:
    """Insert the events with seqs ``first_seq, first_seq + 1, ...``; return their ``(seq, id)``.
    The caller reserved the seqs (``reserve_seqs``, or a new run's ``last_seq``).

    One statement whatever the number of events, its rows sent as one JSON array ``[[type,
    payload], ...]`` built from the texts validation produced, and unnested by the database.
    Raw SQL: the ORM's ``bulk_create`` would re-encode every payload and prepare every field of
    every row in Python (and split the insert on SQLite's variable limit). RETURNING order is not
    guaranteed: the ids come with their seqs.
    """
    batch = _events_json(events)
    columns = f"INSERT INTO {table(RunEvent)} (run_id, seq, type, payload, created_at) "
    if is_postgresql():
        sql = (
            columns + "SELECT %s, %s + e.i - 1, e.r ->> 0, e.r -> 1, %s "
            "FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS e(r, i) RETURNING seq, id"
        )
        params: list[Any] = [run_id, first_seq, now, batch]
    else:
        # json_each's key is the element's index; json_extract gives an object as its JSON text.
        sql = (
            columns + "SELECT %s, %s + e.key, json_extract(e.value, '$[0]'), "
            "json_extract(e.value, '$[1]'), %s FROM json_each(%s) AS e RETURNING seq, id"
        )
        connection = connection_for_write()
        params = [run_id, first_seq, connection.ops.adapt_datetimefield_value(now), batch]
    with connection_for_write().cursor() as cursor:
        cursor.execute(sql, params)
        return [(int(seq), int(event_id)) for seq, event_id in cursor.fetchall()]


def reserve_seqs(run_id: str, count: int, *, allow_closed: bool, close: bool = False) -> int:
    """Bump ``Run.last_seq`` by ``count`` and return the new value; locks the run row.

    Raw SQL because the ORM cannot return the updated counter from the UPDATE itself
    (``F("last_seq") + count`` would need a second query, racing other appenders).

    Unless ``allow_closed``, the UPDATE only matches an open run (``closed = false``). The flag
    is a column of the row being updated, not a subquery: an append that waited for the lock of
    a transaction closing the run re-checks its WHERE on the row version that transaction
    committed (PostgreSQL's READ COMMITTED re-evaluation), so it refuses instead of appending
    after ``run.completed`` / ``run.failed``. ``close=True`` sets the flag in the same statement
    (the closing event's own append).

    The same statement wakes the listening relays at commit (``pg_notify`` as an extra RETURNING
    column, see :mod:`runs_app.notify`): no extra round trip per append.
    """
    with connection_for_write().cursor() as cursor:
        cursor.execute(*_counter_update(run_id, count, allow_closed, close))
        row = cursor.fetchone()
    if row is None:
        ensure_run_accepts_events(run_id, allow_closed=allow_closed)
        raise RunNotFound(run_id)  # a run row without its state: not a run the app knows
    return int(row[0])


def _counter_update(
    run_id: str, count: int, allow_closed: bool, close: bool
) -> tuple[str, list[Any]]:
    """The counter's ``UPDATE ... RETURNING last_seq`` (see ``reserve_seqs``), alone on SQLite
    or as the CTE of an append on PostgreSQL."""
    closing = ", closed = true" if close else ""
    where = "" if allow_closed else " AND NOT closed"
    notify_sql, notify_params = returning_clause()
    sql = (
        f"UPDATE {table(Run)} SET last_seq = last_seq + %s{closing} WHERE id = %s{where}"
        f" RETURNING last_seq{notify_sql}"
    )
    return sql, [count, run_id, *notify_params]


def ensure_run_accepts_events(run_id: str, *, allow_closed: bool) -> None:
    """Raise RunNotFound or RunClosed, as the run's state says."""
    status = (
        RunState.objects.using(db_alias())
        .filter(run_id=run_id)
        .values_list("status", flat=True)
        .first()
    )
    if status is None:
        raise RunNotFound(run_id)
    if status != RunStatus.ACTIVE and not allow_closed:
        raise RunClosed(run_id, status)


def list_events(run: Run | str, after_seq: int = 0) -> list[RunEvent]:
    """The run's events with ``seq > after_seq`` in seq order. Raises ``RunNotFound``."""
    run_id = run_id_of(run)
    events = list(
        RunEvent.objects.using(db_alias()).filter(run_id=run_id, seq__gt=after_seq).order_by("seq")
    )
    if not events and not Run.objects.using(db_alias()).filter(pk=run_id).exists():
        raise RunNotFound(run_id)
    return events
