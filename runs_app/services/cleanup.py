"""Safe cleanup: deleting the rows of a tracked model that a completed run did not see, behind
guards, with an audit.

A run's view of its source is only trusted when the ledger says so: the run completed and its
flush succeeded. Cleanup reads that ledger (it never re-derives it), refuses when a guard says
the view may be incomplete or the deletion suspicious, and otherwise deletes in batches whose
``<sync_name>.removed`` events carry every removed row (every column, as JSON), so the outbox
holds a restorable audit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import F, Model
from django.utils import timezone

from ..conf import runs_settings
from ..db import db_alias
from ..exceptions import CleanupRefusalReason, CleanupRefused, RunNotFound
from ..models import (
    CleanupStatus,
    FlushStatus,
    Project,
    Run,
    RunModelState,
    RunState,
    RunStatus,
)
from ..tracking import SyncSpec, json_key, tracked_spec
from .cleanup_batches import BatchCursor, batch_cursor, delete_batch
from .events import insert_encoded_events, insert_events
from .runs import lock_state
from .validation import (
    EncodedEvent,
    PreparedEvent,
    encode_json,
    encode_json_string,
    internal_error_text,
    run_id_of,
)

logger = logging.getLogger(__name__)

#: How many keys of the rows to delete a plan shows.
SAMPLE_SIZE = 10

#: The guards ``force=True`` overrides; the others protect against an incomplete view.
FORCEABLE: frozenset[CleanupRefusalReason] = frozenset({"empty_run", "too_many_deletions"})


@dataclass(frozen=True)
class CleanupResult:
    """What a cleanup did (or, for a dry run, would do).

    ``planned``: rows the plan found to delete; ``removed``: rows deleted (0 for a dry run);
    ``sample_keys``: the first keys of the plan, in key order (a value per row for a one-field
    key, a tuple for a key of several fields); ``forced``: ``force=True``
    overrode a guard (``empty_run`` or ``too_many_deletions``); ``refusal``: for a dry run, the
    reason a real cleanup would refuse, else None; ``refusal_message``: its human message.
    """

    dry_run: bool
    planned: int
    removed: int
    sample_keys: tuple[Any, ...]
    forced: bool
    refusal: CleanupRefusalReason | None
    refusal_message: str = ""
    model: str = "runs_app.project"


@dataclass(frozen=True)
class Refusal:
    reason: CleanupRefusalReason
    message: str


@dataclass(frozen=True)
class Plan:
    spec: SyncSpec
    run_id: str
    scope: str
    ordinal: int
    total: int  # the scope's rows of the model
    planned: int  # of which last seen by an older run of the scope
    sample_keys: tuple[Any, ...]
    refusal: Refusal | None  # the first guard that applies, in precedence order
    # A forced cleanup of this run was cut off half-way: a rerun finishes it as forced.
    resumes_forced: bool = False


def safe_cleanup_old_projects(
    run: Run | str, *, dry_run: bool = False, force: bool = False
) -> CleanupResult:
    """``safe_cleanup(run, Project, ...)``: the form of the built-in model."""
    return safe_cleanup(run, Project, dry_run=dry_run, force=force)


def safe_cleanup(
    run: Run | str, model: type[Model], *, dry_run: bool = False, force: bool = False
) -> CleanupResult:
    """Delete the rows of the tracked ``model`` in the run's scope that this run did not see:
    rows whose ``last_seen_run`` is an older run of the scope (by ``Run.ordinal``, never by
    clock). For a model whose whole table is one scope (``sync_scope = None``), the rows last
    seen by an older run of the run's scope.

    Refuses with ``CleanupRefused(reason, message)`` and deletes nothing when, in this order:
    ``flush_failed`` (the run's flush failed or never finished, for any model),
    ``run_not_completed`` (active or failed), ``not_flushed`` (the run completed without
    flushing this model), ``superseded`` (a newer active or completed run of the scope exists),
    ``empty_run`` (the run flushed 0 rows of the model while the scope has some),
    ``too_many_deletions`` (more than ``CLEANUP_MAX_DELETE_FRACTION`` of the scope's rows or
    more than ``CLEANUP_MAX_DELETE_COUNT`` rows). While deleting, ``rows_referenced``: a batch
    met a row another table still references (the DELETE is SQL: ``on_delete`` of referencing
    models does not run); that batch is rolled back, earlier ones stay. ``force=True``
    overrides ``empty_run`` and ``too_many_deletions`` only,
    and the ledger records that it did (``cleanup_forced``). A refusal is recorded on the
    ledgers (the model's line and the run's summary: ``cleanup_status = refused``, reason,
    message, time) with a ``cleanup.refused`` event, in one short transaction; nothing else is
    written.

    ``dry_run=True`` writes nothing and never raises ``CleanupRefused``: it returns the plan with
    ``refusal`` set to what a real cleanup would refuse with.

    Deletion: batches of ``CLEANUP_BATCH_SIZE`` rows, each one short transaction holding the
    DELETE, the ``<sync_name>.removed`` events carrying the deleted rows (``{"scope", "model",
    "rows": [every column of each row]}``, split so each payload stays within
    ``MAX_PAYLOAD_BYTES``) and the ``rows_removed`` counts: a row is never gone without its
    audit. The DELETE itself re-states the predicate as an allow-list of the scope's older runs
    (never "not this run"), so a row that a newer run re-stamped after the plan was made is
    never deleted. A final transaction (the DELETE that finds nothing left) records
    ``cleanup_status = done``. Run twice, the second cleanup removes nothing.

    Rows whose ``last_seen_run`` is NULL (their run row was deleted, so nobody can tell when
    they were last seen) are never deleted; they count in the scope's total.

    Called inside the caller's ``atomic()``, these transactions are savepoints of it.
    Raises ``InvalidInput`` (not a tracked model), ``RunNotFound``, ``CleanupRefused``.
    """
    spec = tracked_spec(model)
    plan = make_plan(run_id_of(run), spec)
    refusal = plan.refusal
    forced = False
    if refusal is not None and (force or plan.resumes_forced) and refusal.reason in FORCEABLE:
        refusal, forced = None, True
    if dry_run:
        return CleanupResult(
            True,
            plan.planned,
            0,
            plan.sample_keys,
            forced,
            refusal.reason if refusal else None,
            refusal.message if refusal else "",
            spec.label,
        )
    if refusal is not None:
        _record_refusal(plan, refusal)
        raise CleanupRefused(refusal.reason, refusal.message)
    removed = _delete_in_batches(plan, forced)
    return CleanupResult(
        False, plan.planned, removed, plan.sample_keys, forced, None, "", spec.label
    )


def make_plan(run_id: str, spec: SyncSpec) -> Plan:
    """Read the ledgers and count; writes nothing. The guards' verdict is advisory for races:
    the DELETE's own predicate is what keeps newer rows safe."""
    alias = db_alias()
    try:
        state = RunState.objects.using(alias).select_related("run").get(run_id=run_id)
    except RunState.DoesNotExist:
        raise RunNotFound(run_id) from None
    run = state.run
    line = RunModelState.objects.using(alias).filter(run_id=run_id, model=spec.label).first()
    rows = scope_rows(spec, run.scope)
    older = Run.objects.using(alias).filter(scope=run.scope, ordinal__lt=run.ordinal).values("id")
    deletable = rows.filter(last_seen_run__in=older)
    total = rows.count()
    planned = deletable.count()
    keys = [field.name for field in spec.key]
    sample = tuple(
        json_key(tuple(values))
        for values in deletable.order_by(*keys).values_list(*keys)[:SAMPLE_SIZE]
    )
    refusal = _guard(spec, state, line, run, total, planned)
    resumes_forced = (
        line is not None
        and line.cleanup_status == CleanupStatus.IN_PROGRESS
        and line.cleanup_forced
    )
    return Plan(
        spec, run_id, run.scope, run.ordinal, total, planned, sample, refusal, resumes_forced
    )


def scope_rows(spec: SyncSpec, scope: str) -> Any:
    """The rows of the model in ``scope`` (the whole table for a model without a scope field),
    through the base manager: a project's default manager may hide rows."""
    rows = spec.model._base_manager.using(db_alias()).all()
    if spec.scope is not None:
        rows = rows.filter(**{spec.scope.name: scope})
    return rows


def rows_noun(spec: SyncSpec) -> str:
    """How messages call the model's rows: its ``sync_name`` ("projects") or its label."""
    return spec.model.sync_name or f"rows of {spec.label}"


def _guard(
    spec: SyncSpec,
    state: RunState,
    line: RunModelState | None,
    run: Run,
    total: int,
    planned: int,
) -> Refusal | None:
    """The first guard that refuses, in the precedence of ``CLEANUP_REFUSAL_REASONS``."""
    name = f"run {run.pk!r}"
    noun = rows_noun(spec)
    if state.flush_status == FlushStatus.FAILED:
        return Refusal(
            "flush_failed",
            f"the flush of {name} failed ({state.flush_error or 'no error recorded'}); its view "
            f"of the source is incomplete, so {noun} it did not see may still exist",
        )
    if state.flush_status == FlushStatus.IN_PROGRESS:
        return Refusal(
            "flush_failed",
            f"the flush of {name} never finished (flush_status in_progress); its view of the "
            "source is incomplete",
        )
    if state.status != RunStatus.COMPLETED:
        return Refusal(
            "run_not_completed", f"{name} is {state.status}; only a completed run may clean up"
        )
    if line is None or line.flush_status == FlushStatus.NOT_STARTED:
        return Refusal(
            "not_flushed",
            f"{name} completed without flushing {spec.label} (flush_status not_started); it "
            "saw nothing of it, so it cannot tell what is gone",
        )
    newer = (
        Run.objects.using(db_alias())
        .filter(
            scope=run.scope,
            ordinal__gt=run.ordinal,
            state__status__in=[RunStatus.ACTIVE, RunStatus.COMPLETED],
        )
        .order_by("-ordinal")
        .values_list("id", "state__status")
        .first()
    )
    if newer is not None:
        return Refusal(
            "superseded",
            f"a newer run of scope {run.scope!r} exists ({newer[0]!r}, {newer[1]}); "
            "clean up with the newest run",
        )
    if line.rows_seen == 0 and total > 0:
        return Refusal(
            "empty_run",
            f"{name} flushed 0 {noun} but scope {run.scope!r} has {total}; an empty source "
            "looks like a broken source (force=True / --force deletes anyway)",
        )
    fraction = runs_settings.CLEANUP_MAX_DELETE_FRACTION
    max_count = runs_settings.CLEANUP_MAX_DELETE_COUNT
    if planned > fraction * total:
        return Refusal(
            "too_many_deletions",
            f"would delete {planned} of {total} {noun} of scope {run.scope!r} "
            f"({planned / total:.0%}), more than CLEANUP_MAX_DELETE_FRACTION ({fraction:g}) "
            "(force=True / --force deletes anyway)",
        )
    if max_count is not None and planned > max_count:
        return Refusal(
            "too_many_deletions",
            f"would delete {planned} {noun} of scope {run.scope!r}, more than "
            f"CLEANUP_MAX_DELETE_COUNT ({max_count}) (force=True / --force deletes anyway)",
        )
    return None


def _record_refusal(plan: Plan, refusal: Refusal) -> None:
    """One short transaction: the ledger's refusal and its ``cleanup.refused`` event."""
    with transaction.atomic(using=db_alias()):
        lock_state(plan.run_id)  # the run row first, the lock order of every writer of a run
        outcome = {
            "cleanup_status": CleanupStatus.REFUSED,
            "cleanup_reason": refusal.reason,
            "cleanup_message": refusal.message,
            "cleanup_at": timezone.now(),
        }
        RunState.objects.using(db_alias()).filter(run_id=plan.run_id).update(**outcome)
        RunModelState.objects.using(db_alias()).update_or_create(
            run_id=plan.run_id, model=plan.spec.label, defaults=outcome
        )
        payload = {
            "model": plan.spec.label,
            "reason": refusal.reason,
            "message": refusal.message,
            "planned": plan.planned,
            "total": plan.total,
        }
        insert_events(plan.run_id, [PreparedEvent("cleanup.refused", payload)], allow_closed=True)


def _delete_in_batches(plan: Plan, forced: bool) -> int:
    walk = batch_cursor(plan.spec, plan.scope, plan.ordinal)
    removed = 0
    while True:
        try:
            count = _delete_batch(plan, forced, walk)
        except IntegrityError as exc:
            # The DELETE is SQL, so a referencing model's on_delete never runs: a row still
            # referenced fails its batch (rolled back whole). Say so on the ledger, as a refusal.
            refusal = Refusal(
                "rows_referenced",
                f"a batch of {rows_noun(plan.spec)} to delete holds a row that another table "
                f"still references ({internal_error_text(str(exc)).strip()}); that batch was "
                f"rolled back, {removed} row(s) were removed before it. Remove or re-point the "
                "references, then clean up again",
            )
            _record_refusal(plan, refusal)
            raise CleanupRefused(refusal.reason, refusal.message) from exc
        if not count:
            return removed
        removed += count


def _delete_batch(plan: Plan, forced: bool, walk: BatchCursor | None) -> int:
    """One short transaction: delete up to ``CLEANUP_BATCH_SIZE`` rows, append their audit
    events and count them on the ledgers (``cleanup_status = in_progress`` until the end, so a
    cleanup cut off half-way never reads as not run); when nothing is left, mark the cleanup
    done instead."""
    alias = db_alias()
    with transaction.atomic(using=alias):
        deleted = delete_batch(walk, plan.spec, plan.scope, plan.ordinal)
        ledger = RunState.objects.using(alias).filter(run_id=plan.run_id)
        line = RunModelState.objects.using(alias).filter(run_id=plan.run_id, model=plan.spec.label)
        now = timezone.now()
        if not deleted:
            outcome: dict[str, Any] = {
                "cleanup_status": CleanupStatus.DONE,
                "cleanup_reason": "",
                "cleanup_message": "",
                "cleanup_forced": forced,
                "cleanup_at": now,
            }
            ledger.update(**outcome)
            line.update(**outcome)
            return 0
        # The audit is built from the texts the database returned, never decoded: each row's
        # record is its columns as a JSON object, in key order.
        records = [record for _, record in sorted(deleted, key=lambda row: row[0])]
        event = f"{plan.spec.event_prefix}.removed"
        events = [
            EncodedEvent(event, text)
            for text in split_removed(plan.scope, plan.spec.label, records)
        ]
        insert_encoded_events(plan.run_id, events, allow_closed=True)
        progress: dict[str, Any] = {
            "rows_removed": F("rows_removed") + len(deleted),
            "cleanup_status": CleanupStatus.IN_PROGRESS,
            "cleanup_reason": "",
            "cleanup_message": "",
            "cleanup_forced": forced,
            "cleanup_at": now,
        }
        ledger.update(**progress)
        line.update(**progress)
    return len(deleted)


def json_size(value: Any) -> int:
    """Bytes of compact UTF-8 JSON: the rule ``MAX_PAYLOAD_BYTES`` is measured by."""
    return len(encode_json(value).encode("utf-8"))


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def split_removed(scope: str, model: str, records: Sequence[str]) -> list[str]:
    """Pack removed rows' records (JSON texts), in order, into as few
    ``{"scope", "model", "rows"}`` payloads (JSON texts) as fit within ``MAX_PAYLOAD_BYTES``
    each. A row
    too big to fit even alone (possible only if the limit was lowered after it was stored)
    still gets an event of its own: the audit is never dropped."""
    limit = runs_settings.MAX_PAYLOAD_BYTES
    head = f'{{"scope":{encode_json_string(scope)},"model":{encode_json_string(model)},"rows":['
    base = _utf8_size(head) + 2  # and "]}"
    payloads: list[str] = []
    current: list[str] = []
    size = base
    for record in records:
        record_size = _utf8_size(record)
        added = record_size + (1 if current else 0)  # the comma between rows
        if current and size + added > limit:
            payloads.append(head + ",".join(current) + "]}")
            current, size, added = [], base, record_size
        if base + record_size > limit:
            logger.warning(
                "removed %s record in scope %s is %d bytes, over MAX_PAYLOAD_BYTES (%d)",
                model,
                scope,
                base + record_size,
                limit,
            )
        current.append(record)
        size += added
    if current:
        payloads.append(head + ",".join(current) + "]}")
    return payloads
