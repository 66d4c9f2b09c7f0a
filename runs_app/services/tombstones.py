"""Purging old tombstones of a soft-deleting model: ``purge_tombstones``.

A soft cleanup keeps the rows it removes, tombstoned. After a retention (``TOMBSTONE_RETENTION``
or an explicit ``older_than``) they may go for good: deleted in batches, each batch one short
transaction with its ``<sync_name>.purged`` audit events (every column of every purged row, as
a cleanup's ``removed`` events), appended to the run whose cleanup tombstoned the rows, and the
``rows_purged`` count on that run's ledger line.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from django.db import transaction
from django.db.models import F, Model
from django.utils import timezone

from ..conf import runs_settings
from ..db import column, connection_for_write, db_alias, is_postgresql, table
from ..exceptions import InvalidInput
from ..models import Run, RunModelState
from ..tracing import traced
from ..tracking import SyncSpec, tracked_spec
from .cleanup import split_removed
from .cleanup_batches import sqlite_record
from .events import insert_encoded_events
from .validation import EncodedEvent, validate_duration, validate_positive_int


@dataclass(frozen=True)
class PurgeResult:
    """``purged``: tombstoned rows deleted (for a dry run: that would be); ``unattributed``:
    expired tombstones whose run was deleted since, left in place (their audit has no run to
    go to: delete them yourself if you must); ``cutoff``: tombstones set before it expired."""

    model: str
    dry_run: bool
    purged: int
    unattributed: int
    cutoff: datetime.datetime


@traced("purge_tombstones")
def purge_tombstones(
    model: type[Model],
    older_than: float | datetime.timedelta | None = None,
    *,
    dry_run: bool = False,
    batch_size: int | None = None,
) -> PurgeResult:
    """Delete the rows of the soft-deleting ``model`` tombstoned more than ``older_than``
    (seconds or a timedelta; default the ``TOMBSTONE_RETENTION`` setting) ago.

    Batches of ``batch_size`` (default ``CLEANUP_BATCH_SIZE``) rows of one tombstoning run, each
    one transaction: the DELETE, its ``<sync_name>.purged`` events on that run and its ledger
    line's ``rows_purged``. The DELETE states the tombstone again, so a row a flush revived
    meanwhile is never purged. A purge cut off half-way leaves whole batches done; run it
    again for the rest. ``dry_run=True`` counts and writes nothing.

    Raises ``InvalidInput``: not a soft-deleting tracked model, a bad ``older_than`` or
    ``batch_size``, or no retention given nor configured.
    """
    spec = tracked_spec(model)
    if not spec.soft:
        raise InvalidInput(
            "model",
            f"{spec.label} does not soft-delete (sync_cleanup is 'delete'): it has no tombstones",
        )
    if older_than is None:
        older_than = runs_settings.TOMBSTONE_RETENTION
        if older_than is None:
            raise InvalidInput(
                "older_than",
                "no retention: pass older_than, or set RUNS_APP['TOMBSTONE_RETENTION'] (seconds)",
            )
    cutoff = timezone.now() - validate_duration("older_than", older_than)
    size = validate_positive_int("batch_size", batch_size, runs_settings.CLEANUP_BATCH_SIZE)
    # Any: the tombstone fields are SoftDeleteTrackedModel's, which django-stubs cannot see
    # through a type[Model].
    rows: Any = spec.model._base_manager.using(db_alias())
    expired = rows.filter(deleted_at__lt=cutoff)
    unattributed = expired.filter(deleted_by_run__isnull=True).count()
    if dry_run:
        return PurgeResult(spec.label, True, expired.count() - unattributed, unattributed, cutoff)
    runs = list(
        expired.exclude(deleted_by_run__isnull=True)
        .order_by()
        .values_list("deleted_by_run_id", flat=True)
        .distinct()
    )
    purged = 0
    for run_id in sorted(runs):
        while count := _purge_batch(spec, run_id, cutoff, size):
            purged += count
    return PurgeResult(spec.label, False, purged, unattributed, cutoff)


def _purge_batch(spec: SyncSpec, run_id: str, cutoff: datetime.datetime, size: int) -> int:
    alias = db_alias()
    connection = connection_for_write()
    quote = connection.ops.quote_name
    rows = table(spec.model)
    pk = quote(column(spec.model._meta.pk))
    keys = ", ".join(quote(column(field)) for field in spec.key)
    # Stated in the DELETE itself, not only in the pick: PostgreSQL re-checks it on a row a
    # concurrent flush revived, so that row stays.
    expired = (
        f"{quote('deleted_by_run_id')} = %s AND {quote('deleted_at')} IS NOT NULL "
        f"AND {quote('deleted_at')} < %s"
    )
    at = connection.ops.adapt_datetimefield_value(cutoff)
    record = f"row_to_json({rows})::text" if is_postgresql() else sqlite_record(spec, quote)
    with transaction.atomic(using=alias):
        with connection.cursor() as cursor:
            cursor.execute(
                f"DELETE FROM {rows} WHERE {expired} AND {pk} IN "
                f"(SELECT {pk} FROM {rows} WHERE {expired} ORDER BY {pk} LIMIT %s) "
                f"RETURNING {keys}, {record}",
                [run_id, at, run_id, at, size],
            )
            deleted: list[Any] = cursor.fetchall()
        if not deleted:
            return 0
        scope = _scope_of(spec, run_id)
        width = len(spec.key)
        records = [row[width] for row in sorted(deleted, key=lambda row: tuple(row[:width]))]
        event = f"{spec.event_prefix}.purged"
        insert_encoded_events(
            run_id,
            [EncodedEvent(event, text) for text in split_removed(scope, spec.label, records)],
            allow_closed=True,
        )
        RunModelState.objects.using(alias).filter(run_id=run_id, model=spec.label).update(
            rows_purged=F("rows_purged") + len(deleted)
        )
    return len(deleted)


def _scope_of(spec: SyncSpec, run_id: str) -> str:
    return Run.objects.using(db_alias()).values_list("scope", flat=True).get(pk=run_id)
