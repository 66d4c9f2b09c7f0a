"""Deleting a cleanup plan's rows in bounded batches, with plans that statistics cannot spoil.

Each batch is one short transaction (see ``cleanup.safe_cleanup`` for what it writes besides
the DELETE). This module only says *which* rows a batch deletes and how, per
vendor. Raw SQL: the ORM's ``delete()`` can neither return the deleted rows nor say LATERAL.

PostgreSQL, three single-table statements per batch, each bounded by the batch:

1. **pick** up to ``CLEANUP_BATCH_SIZE`` row ids: a LATERAL probe of the ``last_seen_run``
   index per older run of the scope (``LIMIT`` inside and outside), walking a window of the
   older runs from a cursor kept between batches, so no batch re-reads what an earlier one
   exhausted and none sorts the scope's whole deletable set;
2. **lock** those rows in key order (text by code point: ``COLLATE "C"``), the order the flush
   writes in, so a cleanup and a flush never deadlock;
3. **delete** the locked rows, ``RETURNING`` each as JSON (``row_to_json``) for the audit.

Lock and delete state the allow-list of older runs again: PostgreSQL re-evaluates it on the row
version it finally locks, so a row that a newer run re-stamped meanwhile is never deleted.

The statements join nothing the planner could join the wrong way (ids travel as arrays, the
LATERAL is a nested loop by construction), and the batch transaction turns sequential and
bitmap scans off for itself (``set_config(..., is_local => true)``, put back when the batch is
a savepoint of a caller's transaction): on a freshly migrated database without statistics the
planner believed the table tiny and chose nested loops over full scans (a batch of 1,000 rows
took 19 s in a scope of 60,000); after ``ANALYZE`` it chose sequential scans that restart at
the table's start, through the dead rows of the batches before. With index scans only, every
statement costs its batch, whatever the statistics say.

SQLite (its writers are serialised; its planner has no such statistics-driven turns): one
``DELETE ... WHERE pk IN (SELECT ... LIMIT n) RETURNING``, each row as ``json_object(...)``.

A soft-deleting model's batch is the same walk with an ``UPDATE`` that sets the tombstone in
place of the ``DELETE``; every statement then also says ``deleted_at IS NULL``, so a batch never
picks a row an earlier batch (or an earlier cleanup) tombstoned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from django.conf import settings
from django.db import models

from ..db import column, connection_for_write, db_alias, is_postgresql, table
from ..models import Run
from ..tracking import SyncSpec

#: How many older runs one pick probes at most (their ids travel as one array parameter).
RUN_WINDOW = 500

# Index scans only, for the batch's own transaction.
_PLANNER_SETTINGS = ("enable_seqscan", "enable_bitmapscan")


class Tombstone(NamedTuple):
    """What a soft cleanup's batch writes on each row instead of deleting it."""

    run_id: str
    at: datetime
    reason: str


@dataclass
class BatchCursor:
    """Where the next batch's pick starts among the scope's older runs (PostgreSQL)."""

    spec: SyncSpec
    scope: str
    older_runs: list[str]  # ids of the scope's runs older than the cleaning run, oldest first
    start: int = 0  # runs before it have no deletable row left
    done: bool = False

    @classmethod
    def for_plan(cls, spec: SyncSpec, scope: str, ordinal: int) -> BatchCursor:
        runs = list(
            Run.objects.using(db_alias())
            .filter(scope=scope, ordinal__lt=ordinal)
            .order_by("ordinal")
            .values_list("id", flat=True)
        )
        return cls(spec, scope, runs, done=not runs)


def delete_batch(
    cursor_state: BatchCursor | None,
    spec: SyncSpec,
    scope: str,
    ordinal: int,
    size: int,
    tombstone: Tombstone | None = None,
) -> list[tuple[tuple[Any, ...], str]]:
    """Remove the next batch of at most ``size`` rows last seen by a run of ``scope`` older than
    ``ordinal``: delete them, or set ``tombstone`` on them (soft-deleting models). Return its
    rows as ``(key, record)``: the key's values and the row's columns (after the tombstone) as a
    JSON text. An empty list means nothing is left. Call inside the batch's transaction.
    ``cursor_state``: the PostgreSQL walk (``BatchCursor.for_plan``), None on SQLite."""
    if cursor_state is None:
        return _delete_batch_sqlite(spec, scope, ordinal, size, tombstone)
    with _index_scans_only():
        while not cursor_state.done:
            rows = _delete_batch_postgresql(cursor_state, size, tombstone)
            if rows is not None:
                return rows
    return []


def _tombstone_sql(quote: Callable[[str], str]) -> str:
    return ", ".join(
        f"{quote(name)} = %s" for name in ("deleted_at", "deleted_by_run_id", "deleted_reason")
    )


def _delete_batch_postgresql(
    walk: BatchCursor, size: int, tombstone: Tombstone | None
) -> list[tuple[tuple[Any, ...], str]] | None:
    """One pick, lock and delete; None when the batch deleted nothing but rows may be left: the
    window had nothing left (the walk moved on), or every picked row was re-stamped by a newer
    run meanwhile (it no longer matches the pick)."""
    window = walk.older_runs[walk.start : walk.start + RUN_WINDOW]
    connection = connection_for_write()
    spec = walk.spec
    quote = connection.ops.quote_name
    rows = table(spec.model)
    pk = quote(column(spec.model._meta.pk))
    pk_array = f"%s::{spec.model._meta.pk.cast_db_type(connection)}[]"
    # A row the project moved to another scope keeps its run stamp: the scope is stated too.
    in_scope, scoped = "", []
    if spec.scope is not None:
        in_scope, scoped = f" AND {quote(column(spec.scope))} = %s", [walk.scope]
    if tombstone is not None:
        in_scope += f" AND {quote('deleted_at')} IS NULL"
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT p.{pk}, o.n FROM unnest(%s::text[]) WITH ORDINALITY AS o(run_id, n) "
            f"CROSS JOIN LATERAL (SELECT {pk} FROM {rows} WHERE last_seen_run_id = o.run_id"
            f"{in_scope} LIMIT %s) p LIMIT %s",
            [window, *scoped, size, size],
        )
        picked = cursor.fetchall()
        if not picked:
            walk.start += len(window)
            walk.done = walk.start >= len(walk.older_runs)
            return None
        # The runs before the first one a row came from are exhausted. (Not the last one: the
        # probes' output order is not promised, and re-probing an exhausted run costs little.)
        walk.start += min(int(n) for _, n in picked) - 1
        ids = [row_id for row_id, _ in picked]
        cursor.execute(
            f"SELECT {pk} FROM {rows} WHERE {pk} = ANY({pk_array}) "
            f"AND last_seen_run_id = ANY(%s::text[]){in_scope} "
            f"ORDER BY {_key_order(spec, quote)} FOR UPDATE",
            [ids, window, *scoped],
        )
        locked = [row_id for (row_id,) in cursor.fetchall()]
        if not locked:
            return None
        keys = ", ".join(f"d.{quote(column(field))}" for field in spec.key)
        where = f"WHERE {pk} = ANY({pk_array}) AND last_seen_run_id = ANY(%s::text[]){in_scope}"
        returning = f"RETURNING {keys}, row_to_json(d)::text"
        if tombstone is None:
            cursor.execute(
                f"DELETE FROM {rows} AS d {where} {returning}", [locked, window, *scoped]
            )
        else:
            cursor.execute(
                f"UPDATE {rows} AS d SET {_tombstone_sql(quote)} {where} {returning}",
                [tombstone.at, tombstone.run_id, tombstone.reason, locked, window, *scoped],
            )
        count = len(spec.key)
        return [(tuple(row[:count]), row[count]) for row in cursor.fetchall()]


def _key_order(spec: SyncSpec, quote: Any) -> str:
    """``ORDER BY`` of the key: text by code point, as the flush sorts its batches."""
    return ", ".join(
        quote(column(field))
        + (' COLLATE "C"' if isinstance(field, models.CharField | models.TextField) else "")
        for field in spec.key
    )


@contextmanager
def _index_scans_only() -> Iterator[None]:
    """Sequential and bitmap scans off for the statements inside, then back to what they were
    (SET LOCAL outlives a released savepoint: it must not change the plans of a caller's
    own statements when the batch is a savepoint of the caller's transaction)."""
    connection = connection_for_write()
    columns = ", ".join(
        f"current_setting('{name}'), set_config('{name}', 'off', true)"
        for name in _PLANNER_SETTINGS
    )
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {columns}")
        row = cursor.fetchone()
    previous = [row[2 * index] for index in range(len(_PLANNER_SETTINGS))]
    yield
    # Put back even at the end of a top-level transaction (one statement a batch): cheaper than
    # telling every way a caller can hold a transaction open. An exception needs nothing: the
    # rollback of the batch's transaction or savepoint undoes SET LOCAL.
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT " + ", ".join(f"set_config('{name}', %s, true)" for name in _PLANNER_SETTINGS),
            previous,
        )


def _delete_batch_sqlite(
    spec: SyncSpec, scope: str, ordinal: int, size: int, tombstone: Tombstone | None
) -> list[tuple[tuple[Any, ...], str]]:
    connection = connection_for_write()
    quote = connection.ops.quote_name
    rows, run = table(spec.model), table(Run)
    pk = quote(column(spec.model._meta.pk))
    older = f"last_seen_run_id IN (SELECT id FROM {run} WHERE scope = %s AND ordinal < %s)"
    params: list[Any] = [scope, ordinal]
    if spec.scope is not None:
        older = f"{quote(column(spec.scope))} = %s AND {older}"
        params.insert(0, scope)
    if tombstone is not None:
        older = f"{quote('deleted_at')} IS NULL AND {older}"
    keys = ", ".join(quote(column(field)) for field in spec.key)
    record = sqlite_record(spec, quote)
    picked = f"WHERE {pk} IN (SELECT {pk} FROM {rows} WHERE {older} LIMIT %s)"
    with connection.cursor() as cursor:
        if tombstone is None:
            cursor.execute(
                f"DELETE FROM {rows} {picked} RETURNING {keys}, {record}", [*params, size]
            )
        else:
            at = connection.ops.adapt_datetimefield_value(tombstone.at)
            cursor.execute(
                f"UPDATE {rows} SET {_tombstone_sql(quote)} {picked} RETURNING {keys}, {record}",
                [at, tombstone.run_id, tombstone.reason, *params, size],
            )
        count = len(spec.key)
        return [(tuple(row[:count]), row[count]) for row in cursor.fetchall()]


def sqlite_record(spec: SyncSpec, quote: Callable[[str], str]) -> str:
    """A row's audit record on SQLite: every column, as ``json_object(...)`` of the row the
    statement (a DELETE's, an UPDATE's or an INSERT's RETURNING) reads. Registers the SQL
    function it may use on the write connection (the statement runs on it next)."""
    if any(isinstance(field, models.FloatField) for field in spec.model._meta.concrete_fields):
        connection = connection_for_write()
        connection.ensure_connection()
        connection.connection.create_function("runs_app_real", 1, _real_json, deterministic=True)
    return (
        "json_object("
        + ", ".join(
            f"'{column(field)}', {_sqlite_json_value(field, quote)}"
            for field in spec.model._meta.concrete_fields
        )
        + ")"
    )


def _sqlite_json_value(field: Any, quote: Callable[[str], str]) -> str:
    """A column as the audit record holds it, as PostgreSQL's ``row_to_json`` writes it: JSON as
    JSON (not a string of it), a boolean as true/false (SQLite stores 0/1), bytes as ``\\x`` and
    their hex digits, a datetime in ISO 8601 with its UTC offset (SQLite stores ``YYYY-MM-DD
    HH:MM:SS.ffffff`` in UTC when ``USE_TZ``)."""
    name = quote(column(field))
    if isinstance(field, models.JSONField):
        return f"json({name})"
    if isinstance(field, models.BooleanField):
        return f"json(CASE WHEN {name} THEN 'true' WHEN NOT {name} THEN 'false' END)"
    if isinstance(field, models.FloatField):
        # json_object writes a REAL with 15 significant digits (0.1 + 0.2 as 0.3): Python's
        # repr is the shortest text that reads back as the same double, as row_to_json writes.
        return f"json(runs_app_real({name}))"
    if isinstance(field, models.BinaryField):
        # JSON cannot hold a BLOB: hex text, as row_to_json writes a bytea ("\\x..."). typeof,
        # not IS NULL: in a DELETE's RETURNING, SQLite 3.40 answers IS NULL false for a NULL.
        return f"CASE typeof({name}) WHEN 'null' THEN NULL ELSE '\\x' || lower(hex({name})) END"
    if isinstance(field, models.DateTimeField) and settings.USE_TZ:
        return f"replace({name}, ' ', 'T') || '+00:00'"
    return name


def batch_cursor(spec: SyncSpec, scope: str, ordinal: int) -> BatchCursor | None:
    """The walk a cleanup's batches share: a ``BatchCursor`` on PostgreSQL, None on SQLite."""
    return BatchCursor.for_plan(spec, scope, ordinal) if is_postgresql() else None


def _real_json(value: float | int | None) -> str | None:
    """A REAL as a JSON number that reads back as the same double (a finite one: the flush
    refuses the others)."""
    return None if value is None else repr(float(value))
