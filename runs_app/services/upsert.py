"""The flush's upsert: one batch of checked rows of a tracked model, written by one statement.

Raw SQL: the ORM's ``bulk_create(update_conflicts=True)`` cannot report which rows were
inserted and which updated. Conflicts are resolved on the key (with the scope field), the model's
unique constraint (checked by ``runs_app.E031``). An update sets the fields the source owns and
the stamps ``last_seen_run`` and ``updated_at``; ``created_at``, ``last_confirmed_run`` (the
business of completion) and the project's own fields are left alone.
"""

from __future__ import annotations

import json
import operator
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from datetime import date, datetime, time, timedelta
from typing import Any

from django.db import models
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field

from ..db import column, connection_for_write, is_postgresql, table
from .rows import PreparedRow, RowSchema
from .validation import encode_json_string


def upsert(
    schema: RowSchema, scope: str, run_id: str, rows: Sequence[PreparedRow], now: datetime
) -> tuple[int, int, int]:
    """Upsert ``rows`` (distinct keys, sorted); return ``(created, updated, revived)`` as the
    database counted them (``revived``: updated rows of a soft-deleting model whose tombstone
    was cleared). Call inside the batch's transaction."""
    statement = _statement(schema)
    if is_postgresql():
        return statement.run_postgresql(scope, run_id, rows, now)
    return statement.run_sqlite(scope, run_id, rows, now)


#: A soft-deleting model's tombstone columns as a revived row has them.
_CLEARED_TOMBSTONE = (
    ("deleted_at", "NULL"),
    ("deleted_by_run_id", "NULL"),
    ("deleted_reason", "''"),
)

_statements: dict[tuple[type[models.Model], str], UpsertStatement] = {}


def _statement(schema: RowSchema) -> UpsertStatement:
    connection = connection_for_write()
    cache_key = (schema.model, connection.alias)
    statement = _statements.get(cache_key)
    if statement is None or statement.schema.columns != schema.columns:
        statement = _statements[cache_key] = UpsertStatement(schema, connection)
    return statement


class UpsertStatement:
    """The SQL of one model's upsert on one connection, built once."""

    def __init__(self, schema: RowSchema, connection: BaseDatabaseWrapper) -> None:
        self.schema = schema
        spec = schema.spec
        quote = connection.ops.quote_name
        self.table = table(spec.model)
        self.value_columns = [quote(column(field)) for field in schema.columns]
        stamps = [quote("last_seen_run_id"), quote("created_at"), quote("updated_at")]
        self.scope_column = quote(column(spec.scope)) if spec.scope is not None else None
        self.insert_columns = (
            self.value_columns + ([self.scope_column] if self.scope_column else []) + stamps
        )
        self.key_columns = [quote(column(field)) for field in spec.key]
        conflict = self.key_columns + ([self.scope_column] if self.scope_column else [])
        updated = [quote(column(field)) for field in spec.owned if field not in spec.key]
        updated += [quote("last_seen_run_id"), quote("updated_at")]
        assignments = [f"{column} = excluded.{column}" for column in updated]
        self.soft = spec.soft
        if spec.soft:
            # A row the source lists again is alive again: its tombstone goes. The revive
            # statement (below) has cleared and counted it already, under the row's lock; this
            # covers a tombstone set between the two statements.
            assignments += [f"{quote(name)} = {value}" for name, value in _CLEARED_TOMBSTONE]
        self.on_conflict = f"ON CONFLICT ({', '.join(conflict)}) DO UPDATE SET " + ", ".join(
            assignments
        )
        self.revive = (
            f"UPDATE {self.table} SET "
            + ", ".join(f"{quote(name)} = {value}" for name, value in _CLEARED_TOMBSTONE)
            + " WHERE "
            + (f"{self.scope_column} = %s AND " if self.scope_column else "")
            + f"{quote('deleted_at')} IS NOT NULL AND ({', '.join(self.key_columns)}) IN "
        )
        self.encoders = [
            _nullable(_json_encoder(field, connection), field) for field in schema.columns
        ]
        self.preppers = [_sqlite_prepper(field, connection) for field in schema.columns]
        self.has_binary = any(isinstance(f, models.BinaryField) for f in schema.columns)
        self.selects = [
            _pg_select(field, index, connection) for index, field in enumerate(schema.columns)
        ]

    # -- PostgreSQL -----------------------------------------------------------------------------

    def run_postgresql(
        self, scope: str, run_id: str, rows: Sequence[PreparedRow], now: datetime
    ) -> tuple[int, int, int]:
        # One statement for the whole batch, its rows sent as one JSON array of arrays and
        # unnested server-side: close to COPY speed, yet visible to execute_wrapper (fault
        # injection) and CaptureQueriesContext, unlike cursor.copy(). One JSON text rather than
        # an array parameter per column: psycopg quotes array elements one by one in Python,
        # while the JSON text is joined from values encoded by C code.
        # xmax = 0 holds for a freshly inserted row version only: it tells inserts from updates.
        constants = (["%s"] if self.scope_column else []) + ["%s", "%s", "%s"]
        sql = (
            f"WITH up AS (INSERT INTO {self.table} ({', '.join(self.insert_columns)}) "
            f"SELECT {', '.join(self.selects + constants)} "
            f"FROM jsonb_array_elements(%s::jsonb) r {self.on_conflict} "
            "RETURNING (xmax = 0) AS inserted) "
            "SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM up"
        )
        # Each value's encoder called from C (map): only a nullable column's checks for None
        # (the row checks leave None in no other column).
        encoders = self.encoders
        batch = (
            "["
            + ",".join(
                ["[" + ",".join(map(operator.call, encoders, row.values)) + "]" for row in rows]
            )
            + "]"
        )
        params: list[Any] = [scope] if self.scope_column else []
        params += [run_id, now, now, batch]
        revived = 0
        with connection_for_write().cursor() as cursor:
            if self.soft:
                keys = ", ".join(self.selects[: len(self.key_columns)])
                cursor.execute(
                    f"{self.revive}(SELECT {keys} FROM jsonb_array_elements(%s::jsonb) r)",
                    [*params[: len(params) - 4], batch],  # the scope, if any, and the batch
                )
                revived = cursor.rowcount
            cursor.execute(sql, params)
            created, updated = cursor.fetchone()
        return int(created), int(updated), revived

    # -- SQLite ---------------------------------------------------------------------------------

    def run_sqlite(
        self, scope: str, run_id: str, rows: Sequence[PreparedRow], now: datetime
    ) -> tuple[int, int, int]:
        # As on PostgreSQL, the batch travels as one JSON array of arrays (the values bound as
        # SQLite stores them), unnested by json_each: one INSERT whatever the batch's size, never
        # split by the bound-variable limit. SQLite cannot tell an insert from an update in
        # RETURNING, so the batch's existing keys are counted first, from the same JSON text.
        # Exact: this write transaction holds SQLite's write lock (IMMEDIATE mode), so no other
        # writer can add or remove one of these keys in between.
        if self.has_binary:
            return self._run_sqlite_values(scope, run_id, rows, now)
        connection = connection_for_write()
        stamp = connection.ops.adapt_datetimefield_value(now)
        preppers = self.preppers
        batch = _encode_sqlite_batch(
            [
                [prep(value) for prep, value in zip(preppers, row.values, strict=True)]
                for row in rows
            ]
        )
        scoped = [scope] if self.scope_column else []
        scope_filter = f"{self.scope_column} = %s AND " if self.scope_column else ""
        keys = ", ".join(f"json_extract(value, '$[{i}]')" for i in range(len(self.key_columns)))
        picked = ", ".join(f"json_extract(value, '$[{i}]')" for i in range(len(self.value_columns)))
        constants = ", ".join(["%s"] * (len(scoped) + 3))
        revived = 0
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT count(*) FROM {self.table} WHERE {scope_filter}"
                f"({', '.join(self.key_columns)}) IN (SELECT {keys} FROM json_each(%s))",
                [*scoped, batch],
            )
            existing = int(cursor.fetchone()[0])
            if self.soft:
                cursor.execute(f"{self.revive}(SELECT {keys} FROM json_each(%s))", [*scoped, batch])
                revived = cursor.rowcount
            # "WHERE true": SQLite's parser needs it between a SELECT and ON CONFLICT.
            cursor.execute(
                f"INSERT INTO {self.table} ({', '.join(self.insert_columns)}) "
                f"SELECT {picked}, {constants} FROM json_each(%s) WHERE true {self.on_conflict}",
                [*scoped, run_id, stamp, stamp, batch],
            )
        return len(rows) - existing, existing, revived

    def _run_sqlite_values(
        self, scope: str, run_id: str, rows: Sequence[PreparedRow], now: datetime
    ) -> tuple[int, int, int]:
        """A model with a BinaryField: JSON cannot carry its bytes, so the values are bound as
        parameters, chunked under the bound-variable limit (several INSERTs for a large batch,
        all in the batch's transaction)."""
        connection = connection_for_write()
        connection.ensure_connection()
        max_vars = int(connection.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))
        stamp = connection.ops.adapt_datetimefield_value(now)
        preppers = self.preppers
        prepared = [
            [prep(value) for prep, value in zip(preppers, row.values, strict=True)] for row in rows
        ]
        key_count = len(self.key_columns)
        scoped = [scope] if self.scope_column else []
        existing = revived = 0
        with connection.cursor() as cursor:
            per_count = (max_vars - 1) // key_count
            for start in range(0, len(prepared), per_count):
                chunk = prepared[start : start + per_count]
                if key_count == 1:
                    where = f"{self.key_columns[0]} IN ({', '.join(['%s'] * len(chunk))})"
                else:
                    row_marks = "(" + ", ".join(["%s"] * key_count) + ")"
                    where = (
                        f"({', '.join(self.key_columns)}) IN "
                        f"(VALUES {', '.join([row_marks] * len(chunk))})"
                    )
                scope_filter = f"{self.scope_column} = %s AND " if self.scope_column else ""
                cursor.execute(
                    f"SELECT count(*) FROM {self.table} WHERE {scope_filter}{where}",
                    scoped + [value for values in chunk for value in values[:key_count]],
                )
                existing += int(cursor.fetchone()[0])
                if self.soft:
                    listed = where.split(" IN ", 1)[1]  # "(%s, ...)" or "(VALUES (...), ...)"
                    cursor.execute(
                        f"{self.revive}{listed}",
                        scoped + [value for values in chunk for value in values[:key_count]],
                    )
                    revived += cursor.rowcount
            width = len(self.value_columns)
            constants = len(scoped) + 3
            per_insert = max(1, (max_vars - constants) // width)
            row_marks = "(" + ", ".join(["%s"] * width) + ")"
            picked = ", ".join(f"column{i + 1}" for i in range(width))
            for start in range(0, len(prepared), per_insert):
                chunk = prepared[start : start + per_insert]
                params: list[Any] = [*scoped, run_id, stamp, stamp]
                for values in chunk:
                    params.extend(values)
                # "WHERE true": SQLite's parser needs it between a SELECT and ON CONFLICT.
                cursor.execute(
                    f"INSERT INTO {self.table} ({', '.join(self.insert_columns)}) "
                    f"SELECT {picked}, {', '.join(['%s'] * constants)} "
                    f"FROM (VALUES {', '.join([row_marks] * len(chunk))}) WHERE true "
                    f"{self.on_conflict}",
                    params,
                )
        return len(rows) - existing, existing, revived


def _pg_select(field: Field[Any, Any], index: int, connection: BaseDatabaseWrapper) -> str:
    """How the upsert reads column ``index`` of a row of the JSON batch ``r``."""
    if isinstance(field, models.JSONField):
        # The value is embedded as JSON; JSON null is SQL NULL for a nullable field.
        return f"NULLIF(r -> {index}, 'null'::jsonb)" if field.null else f"r -> {index}"
    if isinstance(field, models.CharField | models.TextField):
        # No cast: assigning text to a varchar column checks the length, a cast would truncate.
        return f"r ->> {index}"
    return f"(r ->> {index})::{field.cast_db_type(connection)}"


def _pg_text(value: Any) -> str:
    """A value of a non-text field as PostgreSQL reads it from text."""
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return f"{value // timedelta(microseconds=1)} microseconds"
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    return str(value)  # a UUID, a Decimal, a number


def _nullable(encode: Callable[[Any], str], field: Field[Any, Any]) -> Callable[[Any], str]:
    """``encode``, writing ``null`` for a None when the column is nullable."""
    if not field.null:
        return encode

    def encode_or_null(value: Any) -> str:
        return "null" if value is None else encode(value)

    return encode_or_null


def _json_encoder(field: Field[Any, Any], connection: BaseDatabaseWrapper) -> Callable[[Any], str]:
    """How a checked value of ``field`` is written into the JSON batch (never None: the caller
    writes ``null``)."""
    if isinstance(field, models.JSONField):
        return str  # already its compact JSON text
    if isinstance(field, models.CharField | models.TextField):
        return encode_json_string
    if isinstance(field, models.BooleanField):
        return lambda value: "true" if value else "false"
    if isinstance(field, models.IntegerField):
        return str
    if isinstance(field, models.ForeignKey) and isinstance(field.target_field, models.IntegerField):
        return str
    if isinstance(field, models.BinaryField):
        # Not get_db_prep_save: on PostgreSQL it wraps the bytes in psycopg's Binary adapter,
        # whose text is "Binary(b'...')", not the bytes.
        return lambda value: encode_json_string(_pg_text(bytes(value)))

    def encode(value: Any) -> str:
        return encode_json_string(_pg_text(field.get_db_prep_save(value, connection)))

    # The common types written as get_db_prep_save would leave them on PostgreSQL, without its
    # per-value calls (to_python again, the naive-datetime check, the backend's adaptation): an
    # aware datetime's ISO text and a UUID's hex need no JSON escaping. Anything else: encode().
    if isinstance(field, models.DateTimeField):

        def encode_datetime(value: Any) -> str:
            if type(value) is datetime and value.tzinfo is not None:
                return '"' + value.isoformat() + '"'
            return encode(value)

        return encode_datetime
    if isinstance(field, models.UUIDField):

        def encode_uuid(value: Any) -> str:
            if type(value) is uuid.UUID:
                return '"' + value.hex + '"'
            return encode(value)

        return encode_uuid
    return encode


def _encode_sqlite_batch(values: list[list[Any]]) -> str:
    """The JSON text of a batch's values as SQLite stores them (text, numbers, booleans as
    true/false, which json_extract reads as 1/0); a Decimal as its text."""
    return json.dumps(values, ensure_ascii=False, separators=(",", ":"), default=str)


def _sqlite_prepper(
    field: Field[Any, Any], connection: BaseDatabaseWrapper
) -> Callable[[Any], Any]:
    """How a checked value of ``field`` is bound on SQLite."""
    if isinstance(field, models.JSONField | models.CharField | models.TextField):
        return _identity  # text, or the JSON's compact text
    return lambda value: None if value is None else field.get_db_prep_save(value, connection)


def _identity(value: Any) -> Any:
    return value
