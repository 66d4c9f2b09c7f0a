"""Undoing one run's cleanup of a tracked model: ``restore_cleanup``.

A deleting model's rows come back from the cleanup's own audit, the ``<sync_name>.removed``
events, which hold every column of every removed row: the same primary keys and values. A
soft-deleting model's rows never left: their tombstone is cleared (and a row purged since is
inserted back from the audit, like a deleted one).

Raw SQL, one INSERT (and for a soft model one UPDATE) per audit event, each bounded by the
event's size (``MAX_PAYLOAD_BYTES``): the rows travel from the event's stored JSON to the table
inside the database (``jsonb_populate_recordset`` / ``json_each``), never through Python.
``ON CONFLICT DO NOTHING`` is what keeps a row re-created since (by a later flush, with new
values) from being overwritten: it is reported as a conflict instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import IntegrityError, models, transaction
from django.db.models import Model
from django.utils import timezone

from ..db import column, connection_for_write, db_alias, is_postgresql, table
from ..exceptions import RestoreRefused
from ..models import (
    CleanupMode,
    CleanupStatus,
    Run,
    RunEvent,
    RunModelState,
    RunState,
    RunStatus,
)
from ..tracing import traced
from ..tracking import TOMBSTONE, SyncSpec, json_key, tracked_spec
from .cleanup import SAMPLE_SIZE, split_removed
from .cleanup_batches import sqlite_record
from .events import insert_encoded_events, insert_events
from .runs import RUN_CREATION_LOCK_KEY, lock_state
from .validation import (
    EncodedEvent,
    PreparedEvent,
    internal_error_text,
    run_id_of,
    validate_text,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestoreResult:
    """What ``restore_cleanup`` put back (for a dry run: would put back).

    ``restored``: rows back (inserted again, or their tombstone cleared); ``sample_keys``: the
    first of their keys. ``conflicts``: rows of the audit not put back because a row with the
    same primary key or sync key exists again (a later flush re-created or revived it), or
    because a foreign key of theirs points at a row that no longer exists;
    ``conflict_keys``: the first of their keys. ``missing``: rows the ledger says the cleanup
    removed but no audit event holds any more (pruned from the outbox): they cannot come back.
    ``already_restored``: the run's cleanup was restored before (nothing done now; then
    ``restored_by``/``restored_at`` say by whom and when).
    """

    model: str
    mode: str
    dry_run: bool
    restored: int
    sample_keys: tuple[Any, ...]
    conflicts: int
    conflict_keys: tuple[Any, ...]
    missing: int = 0
    already_restored: bool = False
    restored_by: str = ""
    restored_at: Any = None


class _DryRun(Exception):
    """Rolls a dry run's restore back: the preview is the real restore, undone."""


@traced("restore_cleanup")
def restore_cleanup(
    run: Run | str, model: type[Model], *, dry_run: bool = False, restored_by: str = ""
) -> RestoreResult:
    """Put back exactly the rows that ``run``'s cleanup of the tracked ``model`` removed.

    Deleted rows are inserted again from the cleanup's ``<sync_name>.removed`` audit events,
    with their primary keys and every column as removed (run stamps pointing at a run deleted
    since become NULL); tombstoned rows (the cleanup ran in ``soft`` mode) get their tombstone
    cleared. A row whose primary key or sync key exists again is not overwritten: it is
    counted in ``conflicts`` and the rest is restored. The restored rows keep their
    ``last_seen_run``: the next run's cleanup removes them again if its source still lacks
    them (fix the source first).

    One transaction (inside the caller's ``atomic()``, a savepoint of it): the rows, a
    ``<sync_name>.restored`` event per audit event (the rows as they are back), a
    ``cleanup.restored`` event (counts, conflicts, who), and the ledgers: ``cleanup_status =
    restored`` with ``rows_restored``, ``restore_conflicts``, ``restored_by``, ``restored_at``
    on the model's line. A ``restored`` cleanup is never run again for that run
    (``safe_cleanup`` refuses with ``cleanup_restored``).

    Idempotent: restoring again does nothing and returns ``already_restored=True``.
    ``dry_run=True`` returns exactly what a restore would do now, and writes nothing (it is the
    restore, rolled back).

    Raises ``InvalidInput`` (not a tracked model, a bad ``restored_by``), ``RunNotFound``,
    ``RestoreRefused``: ``cleanup_not_run`` (no cleanup of the model by this run),
    ``cleanup_refused`` (it was refused and removed nothing), ``audit_missing`` (rows were
    deleted but every audit event holding them was pruned). Nothing is written then.
    """
    spec = tracked_spec(model)
    run_id = run_id_of(run)
    if restored_by:
        restored_by = validate_text("restored_by", restored_by, 150)
    alias = db_alias()
    result: RestoreResult | None = None
    try:
        with transaction.atomic(using=alias):
            result = _restore(run_id, spec, restored_by, dry_run)
            if dry_run and not result.already_restored:
                raise _DryRun
    except _DryRun:
        pass
    except IntegrityError as exc:
        # The audit holds the rows as the table was when they were removed: a column added
        # since without a default (or a constraint added since) can refuse them. Nothing was
        # restored: the transaction is rolled back whole.
        raise RestoreRefused(
            "rows_unrestorable",
            f"the audited rows of {spec.label} no longer fit its table "
            f"({internal_error_text(str(exc)).strip()}); nothing was restored. Give the new "
            "column a database default (db_default) or restore the rows by hand from the "
            f"{spec.event_prefix}.removed events",
        ) from exc
    assert result is not None
    return result


def _restore(run_id: str, spec: SyncSpec, restored_by: str, dry_run: bool) -> RestoreResult:
    state = lock_state(run_id)  # serialises two restores of one run, and cleanups of it
    line = RunModelState.objects.using(db_alias()).filter(run_id=run_id, model=spec.label).first()
    mode = line.cleanup_mode if line is not None else CleanupMode.DELETE
    status = line.cleanup_status if line is not None else CleanupStatus.NOT_RUN
    name = f"run {run_id!r}"
    if line is None or status == CleanupStatus.NOT_RUN:
        raise RestoreRefused(
            "cleanup_not_run", f"{name} never cleaned up {spec.label}: there is nothing to restore"
        )
    if status == CleanupStatus.RESTORED:
        return RestoreResult(
            spec.label,
            mode,
            dry_run,
            0,
            (),
            0,
            (),
            already_restored=True,
            restored_by=line.restored_by,
            restored_at=line.restored_at,
        )
    if status == CleanupStatus.REFUSED and line.rows_removed == 0:
        raise RestoreRefused(
            "cleanup_refused",
            f"the cleanup of {spec.label} by {name} was refused ({line.cleanup_reason}) and "
            "removed nothing: there is nothing to restore",
        )
    soft = mode == CleanupMode.SOFT
    _hold_off_flushes(spec, state.run.scope)
    walk = _Restorer(spec, run_id, state.run.scope, soft)
    for event_id, model, count in walk.audit_events(f"{spec.event_prefix}.removed"):
        walk.restore_event(event_id, model, count)
    if soft:
        walk.clear_remaining_tombstones()  # rows whose audit event was pruned
    # A tombstone cleared without its audit event is a row back, not one missing.
    missing = max(0, line.rows_removed - walk.audited - walk.unaudited)
    if not soft and walk.audited == 0 and line.rows_removed > 0:
        raise RestoreRefused(
            "audit_missing",
            f"the cleanup of {spec.label} by {name} removed {line.rows_removed} row(s), but "
            f"no {spec.event_prefix}.removed event holds them any more (pruned from the "
            "outbox): they cannot be restored",
        )
    now = timezone.now()
    outcome = {"cleanup_status": CleanupStatus.RESTORED, "cleanup_at": now}
    RunState.objects.using(db_alias()).filter(run_id=run_id).update(**outcome)
    RunModelState.objects.using(db_alias()).filter(pk=line.pk).update(
        **outcome,
        rows_restored=walk.restored,
        restore_conflicts=walk.conflicts,
        restored_by=restored_by,
        restored_at=now,
    )
    payload = {
        "model": spec.label,
        "mode": mode,
        "restored": walk.restored,
        "conflicts": walk.conflicts,
        "conflict_keys": list(walk.conflict_keys),
        "missing": missing,
        "restored_by": restored_by,
    }
    insert_events(run_id, [PreparedEvent("cleanup.restored", payload)], allow_closed=True)
    if missing:
        logger.warning(
            "restore of run %s, %s: %d removed row(s) have no audit event any more",
            run_id,
            spec.label,
            missing,
        )
    return RestoreResult(
        spec.label,
        mode,
        dry_run,
        walk.restored,
        tuple(walk.sample_keys),
        walk.conflicts,
        tuple(walk.conflict_keys),
        missing,
        restored_by=restored_by,
        restored_at=now,
    )


def _hold_off_flushes(spec: SyncSpec, scope: str) -> None:
    """PostgreSQL: keep the flushes that may write the rows being restored waiting until the
    restore commits: the scope's run creation lock, then every active run of the scope (of
    every scope, for a model without a scope field) in id order, the lock a flush batch takes
    first. Without it, a restore inserting one audit event after another and a flush batch
    writing its keys in key order could each wait for rows the other wrote: "deadlock
    detected", and PostgreSQL failed the flush, whose run then failed."""
    if not is_postgresql():
        return  # SQLite's writers are serialised already
    scoped = " AND s.scope = %s" if spec.scope is not None else ""
    with connection_for_write().cursor() as cursor:
        cursor.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", [RUN_CREATION_LOCK_KEY, scope]
        )
        cursor.execute(
            f"SELECT r.id FROM {table(Run)} r JOIN {table(RunState)} s ON s.run_id = r.id "
            f"WHERE s.status = %s{scoped} ORDER BY r.id FOR NO KEY UPDATE OF r",
            [RunStatus.ACTIVE, *([scope] if spec.scope is not None else [])],
        )


class _Restorer:
    """The statements of one restore, and its running counts."""

    def __init__(self, spec: SyncSpec, run_id: str, scope: str, soft: bool) -> None:
        self.spec = spec
        self.run_id = run_id
        self.scope = scope
        self.soft = soft
        self.connection = connection_for_write()
        self.quote = self.connection.ops.quote_name
        self.pk = spec.model._meta.pk
        self.audited = 0  # rows found in the audit events
        self.unaudited = 0  # tombstones cleared whose audit event was pruned
        self.restored = 0
        self.conflicts = 0
        self.sample_keys: list[Any] = []
        self.conflict_keys: list[Any] = []
        self.restored_pks: set[str] = set()
        self.postgresql = is_postgresql()

    # -- per audit event ------------------------------------------------------------------------

    def restore_event(self, event_id: int, model: Any, count: int) -> None:
        if model != self.spec.label or not count:
            return  # another model's audit under the same sync_name (renamed since): not ours
        self.audited += count
        pk_column = column(self.pk)
        back: list[tuple[Any, ...]] = []
        records: list[dict[str, Any]] | None = None
        if self.soft:
            records = self._records(event_id)
            back += self._untombstone([row.get(pk_column) for row in records])
        back += self._insert(event_id)
        returned_pks = {str(row[0]) for row in back}
        self.restored_pks |= returned_pks
        self._count(back)
        if len(back) == count:
            return  # every row of the event is back: no conflict to name
        for row in records if records is not None else self._records(event_id):
            if str(row.get(pk_column)) not in self.restored_pks:
                self.conflicts += 1
                if len(self.conflict_keys) < SAMPLE_SIZE:
                    self.conflict_keys.append(
                        self._key(tuple(row.get(column(field)) for field in self.spec.key))
                    )

    def audit_events(self, event_type: str) -> list[tuple[int, Any, int]]:
        """The run's ``event_type`` events in seq order, as (id, payload's ``model``, how many
        rows (JSON objects) it holds), read in the database in one query: the rows themselves
        (up to ``MAX_PAYLOAD_BYTES`` an event) come to Python only when they are needed (a soft
        restore's keys, a conflict's keys)."""
        events = table(RunEvent)
        if self.postgresql:
            head = (
                "payload ->> 'model', CASE WHEN jsonb_typeof(payload -> 'rows') = 'array'"
                " THEN (SELECT count(*) FROM jsonb_array_elements(payload -> 'rows') r"
                " WHERE jsonb_typeof(r) = 'object') ELSE 0 END"
            )
        else:
            head = (
                "json_extract(payload, '$.model'), CASE json_type(payload, '$.rows')"
                " WHEN 'array' THEN (SELECT count(*) FROM json_each(payload, '$.rows')"
                " WHERE type = 'object') ELSE 0 END"
            )
        with self.connection.cursor() as cursor:
            cursor.execute(
                f"SELECT id, {head} FROM {events} WHERE run_id = %s AND type = %s ORDER BY seq",
                [self.run_id, event_type],
            )
            return [(int(row[0]), row[1], int(row[2])) for row in cursor.fetchall()]

    def _records(self, event_id: int) -> list[dict[str, Any]]:
        payload = (
            RunEvent.objects.using(db_alias()).values_list("payload", flat=True).get(pk=event_id)
        )
        return [row for row in payload.get("rows", ()) if isinstance(row, dict)]

    def _key(self, values: tuple[Any, ...]) -> Any:
        """A key as plans show it, whatever form the database or the audit gave its values in
        (SQLite stores a UUID as 32 hex digits)."""
        return json_key(
            tuple(
                field.to_python(value) for field, value in zip(self.spec.key, values, strict=True)
            )
        )

    def clear_remaining_tombstones(self) -> None:
        back = self._untombstone(None)
        self.unaudited += len(back)
        self._count(back)

    def _count(self, back: list[tuple[Any, ...]]) -> None:
        if not back:
            return
        width = len(self.spec.key)
        back.sort(key=lambda row: tuple(str(value) for value in row[1 : 1 + width]))
        self.restored += len(back)
        for row in back[: max(0, SAMPLE_SIZE - len(self.sample_keys))]:
            self.sample_keys.append(self._key(tuple(row[1 : 1 + width])))
        records = [row[1 + width] for row in back]
        event = f"{self.spec.event_prefix}.restored"
        insert_encoded_events(
            self.run_id,
            [
                EncodedEvent(event, text)
                for text in split_removed(self.scope, self.spec.label, records)
            ],
            allow_closed=True,
        )

    # -- statements -----------------------------------------------------------------------------

    def _returning(self, alias: str) -> str:
        quote = self.quote
        keys = ", ".join(f"{alias}{quote(column(field))}" for field in self.spec.key)
        if self.postgresql:
            record = f"row_to_json({alias.rstrip('.')})::text"
        else:
            record = sqlite_record(self.spec, quote)
        return f"RETURNING {alias}{quote(column(self.pk))}, {keys}, {record}"

    def _untombstone(self, pks: list[Any] | None) -> list[tuple[Any, ...]]:
        """Clear the tombstones this run's cleanup set: on the rows ``pks`` (those of one audit
        event), or on every row still carrying it (``pks`` None)."""
        quote = self.quote
        pk = quote(column(self.pk))
        cleared = (
            ", ".join(
                f"{quote(name)} = {value}"
                for name, value in (("deleted_at", "NULL"), ("deleted_by_run_id", "NULL"))
            )
            + f", {quote('deleted_reason')} = ''"
        )
        where = f"{quote('deleted_by_run_id')} = %s AND {quote('deleted_at')} IS NOT NULL"
        params: list[Any] = [self.run_id]
        if pks is not None:
            if self.postgresql:
                where += f" AND {pk} = ANY(%s::{self.pk.cast_db_type(self.connection)}[])"
                params.append([str(value) for value in pks])
            else:
                where += f" AND {pk} IN (SELECT value FROM json_each(%s))"
                params.append(_json_list(pks))
        alias = "x." if self.postgresql else ""
        target = f"{table(self.spec.model)} AS x" if self.postgresql else table(self.spec.model)
        with self.connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {target} SET {cleared} WHERE {where} {self._returning(alias)}", params
            )
            return [tuple(row) for row in cursor.fetchall()]

    def _insert(self, event_id: int) -> list[tuple[Any, ...]]:
        """Insert the rows of one audit event that are not there; ON CONFLICT DO NOTHING keeps
        any row that exists again (by primary key or sync key)."""
        quote = self.quote
        fields = list(self.spec.model._meta.concrete_fields)
        columns = ", ".join(quote(column(field)) for field in fields)
        events = table(RunEvent)
        if self.postgresql:
            source = (
                f"{events} e CROSS JOIN LATERAL jsonb_populate_recordset("
                f"NULL::{table(self.spec.model)}, e.payload -> 'rows') r"
            )
            # The stamps' runs joined, not one subquery per row each (twice the cost of the
            # statement); the run's primary key matches at most once.
            for stamp in _RUN_STAMPS:
                source += (
                    f" LEFT JOIN {table(Run)} {_stamp_alias(stamp)}"
                    f" ON {_stamp_alias(stamp)}.id = r.{quote(stamp + '_id')}"
                )
            values = [self._pg_value(field) for field in fields]
            target, alias = f"{table(self.spec.model)} AS x", "x."
        else:
            source = f"{events} e, json_each(e.payload, '$.rows') j"
            values = [self._sqlite_value(field) for field in fields]
            target, alias = table(self.spec.model), ""
        conditions = ["e.id = %s"] + [self._reference_exists(field) for field in fields]
        with self.connection.cursor() as cursor, _sqlite_unhex(self.connection):
            cursor.execute(
                f"INSERT INTO {target} ({columns}) SELECT {', '.join(values)} FROM {source} "
                f"WHERE {' AND '.join(c for c in conditions if c)} "
                f"ON CONFLICT DO NOTHING {self._returning(alias)}",
                [event_id],
            )
            return [tuple(row) for row in cursor.fetchall()]

    def _value(self, field: models.Field[Any, Any]) -> str:
        """The column's value in the audit record, as SQL."""
        name = column(field)
        if self.postgresql:
            return f"r.{self.quote(name)}"
        quoted = name.replace('"', '""')
        return f"json_extract(j.value, '$.\"{quoted}\"')"

    def _pg_value(self, field: models.Field[Any, Any]) -> str:
        return self._restored_value(field, self._value(field))

    def _sqlite_value(self, field: models.Field[Any, Any]) -> str:
        raw = self._value(field)
        name = column(field).replace('"', '""')
        if isinstance(field, models.JSONField):
            # json_extract unwraps a JSON string; the column stores JSON text.
            raw = (
                f"CASE json_type(j.value, '$.\"{name}\"') WHEN 'null' THEN NULL "
                f"ELSE j.value -> '$.\"{name}\"' END"
            )
        elif isinstance(field, models.BinaryField):
            raw = f"runs_app_unhex({raw})"  # the audit holds bytes as "\\x" and hex digits
        elif isinstance(field, models.DateTimeField) and settings.USE_TZ:
            # The audit writes "YYYY-MM-DDTHH:MM:SS.ffffff+00:00"; SQLite stores it UTC, spaced.
            raw = f"replace(substr({raw}, 1, length({raw}) - 6), 'T', ' ')"
        return self._restored_value(field, raw)

    def _restored_value(self, field: models.Field[Any, Any], raw: str) -> str:
        if self.soft and field.name in TOMBSTONE:
            return "''" if field.name == "deleted_reason" else "NULL"
        if field.name in _RUN_STAMPS:
            # A stamp's run may have been deleted since: the row comes back unstamped there.
            if self.postgresql:
                return f"{_stamp_alias(field.name)}.id"  # LEFT JOINed by _insert
            return f"(SELECT id FROM {table(Run)} WHERE id = {raw})"
        return raw

    def _reference_exists(self, field: models.Field[Any, Any]) -> str:
        """A row whose foreign key points at a row deleted since cannot come back."""
        if not isinstance(field, models.ForeignKey) or field.name in (
            "last_seen_run",
            "last_confirmed_run",
            "deleted_by_run",
        ):
            return ""
        raw = self._value(field)
        target = field.target_field
        return (
            f"({raw} IS NULL OR EXISTS (SELECT 1 FROM {table(field.related_model)} t "
            f"WHERE t.{self.quote(column(target))} = {raw}))"
        )


#: The run stamps a restored row keeps only while their run still exists.
_RUN_STAMPS = ("last_seen_run", "last_confirmed_run")


def _stamp_alias(stamp: str) -> str:
    return f"run_{stamp}"


def _json_list(values: list[Any]) -> str:
    return json.dumps(values)


@contextmanager
def _sqlite_unhex(connection: Any) -> Iterator[None]:
    """SQLite 3.40 has no ``unhex``: a deterministic function of our own, registered on the
    connection for the statement (bytes of a BinaryField come back from the audit's hex)."""
    if connection.vendor == "sqlite":
        connection.ensure_connection()
        connection.connection.create_function("runs_app_unhex", 1, _unhex, deterministic=True)
    yield


def _unhex(text: str | None) -> bytes | None:
    if text is None:
        return None
    return bytes.fromhex(text[2:] if text.startswith("\\x") else text)
