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
from ..exceptions import CleanupRefusalReason, CleanupRefused, InvalidInput, RunNotFound
from ..models import (
    CleanupMode,
    CleanupStatus,
    FlushMode,
    FlushStatus,
    Project,
    Run,
    RunEvent,
    RunModelState,
    RunState,
    RunStatus,
)
from ..tracing import traced
from ..tracking import SyncSpec, json_key, tracked_spec
from .cleanup_batches import BatchCursor, Tombstone, batch_cursor, delete_batch
from .events import insert_encoded_events, insert_events
from .runs import lock_state
from .validation import (
    EncodedEvent,
    PreparedEvent,
    encode_json,
    encode_json_string,
    internal_error_text,
    run_id_of,
    validate_positive_int,
    validate_text,
)

logger = logging.getLogger(__name__)

#: How many keys of the rows to delete a plan shows.
SAMPLE_SIZE = 10

#: The guards ``force=True`` overrides; the others protect against an incomplete view.
FORCEABLE: frozenset[CleanupRefusalReason] = frozenset({"empty_run", "too_many_deletions"})

#: Refusals whose plan is recorded for an operator to approve (``approve=N``).
WITHHELD: frozenset[CleanupRefusalReason] = FORCEABLE | {"approval_exceeded"}


@dataclass(frozen=True)
class CleanupResult:
    """What a cleanup did (or, for a dry run, would do).

    ``planned``: rows the plan found to delete; ``removed``: rows deleted, or tombstoned for a
    soft-deleting model (0 for a dry run);
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
    #: Rows not seen by this run but kept for their grace period (seen by one of the last
    #: ``grace_runs`` completed runs of the scope that flushed the model).
    waiting: int = 0
    #: "delete" or "soft" (tombstones set instead of deleting).
    mode: str = CleanupMode.DELETE
    #: Who approved this withheld cleanup (``approve=``), else "".
    approved_by: str = ""


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
    total: int  # the scope's (live) rows of the model
    planned: int  # of which last seen by a run of the scope older than the grace cutoff
    sample_keys: tuple[Any, ...]
    refusal: Refusal | None  # the first guard that applies, in precedence order
    # A forced cleanup of this run was cut off half-way: a rerun finishes it as forced.
    resumes_forced: bool = False
    # Rows last seen by a run older than this one's but inside the grace period.
    waiting: int = 0
    # Rows last seen by a run of the scope with an ordinal below it are removed.
    cutoff: int = 0
    # An approved cleanup cut off half-way: who approved it and how many rows it may still
    # remove (a rerun finishes it under that approval).
    resumes_approval: tuple[str, int] | None = None
    # The model's ledger line as the plan found it (None: the run never touched the model).
    line: RunModelState | None = None


def safe_cleanup_old_projects(
    run: Run | str, *, dry_run: bool = False, force: bool = False
) -> CleanupResult:
    """``safe_cleanup(run, Project, ...)``: the form of the built-in model."""
    return safe_cleanup(run, Project, dry_run=dry_run, force=force)


@traced("safe_cleanup")
def safe_cleanup(
    run: Run | str,
    model: type[Model],
    *,
    dry_run: bool = False,
    force: bool = False,
    approve: int | None = None,
    approved_by: str = "",
) -> CleanupResult:
    """Remove the rows of the tracked ``model`` in the run's scope that this run did not see:
    rows whose ``last_seen_run`` is an older run of the scope (by ``Run.ordinal``, never by
    clock). For a model whose whole table is one scope (``sync_scope = None``), the rows last
    seen by an older run of the run's scope. A deleting model's rows are deleted; a
    soft-deleting model's (``sync_cleanup = "soft"``) get their tombstone (``deleted_at``,
    ``deleted_by_run``, ``deleted_reason``) and stay.

    **Grace period** (``sync_grace_runs``, default the ``CLEANUP_GRACE_RUNS`` setting, 1): only
    rows that the last N completed runs of the scope that flushed the model all missed are
    removed, that is rows last seen by a run older than the N-th newest of those runs (this run
    being the first). Fewer than N such runs: nothing is removed. The others are ``waiting``.

    Refuses with ``CleanupRefused(reason, message)`` and removes nothing when, in this order:
    ``flush_failed`` (the run's flush failed or never finished, for any model),
    ``run_not_completed`` (active or failed), ``not_flushed`` (the run completed without
    flushing this model), ``incremental_run`` (the run read the model incrementally,
    ``flush(..., incremental=True)``: rows it did not read were not looked at, not found gone;
    not forceable), ``cleanup_restored`` (this run's cleanup of the model was undone by
    ``restore_cleanup``: doing it again would redo what an operator undid),
    ``superseded`` (a newer active or completed run of the scope exists),
    ``empty_run`` (the run flushed 0 rows of the model while the scope has some),
    ``too_many_deletions`` (more than ``CLEANUP_MAX_DELETE_FRACTION`` of the scope's rows or
    more than ``CLEANUP_MAX_DELETE_COUNT`` rows). While deleting, ``rows_referenced``: a batch
    met a row another table still references (the DELETE is SQL: ``on_delete`` of referencing
    models does not run); that batch is rolled back, earlier ones stay.

    **Withheld deletions**: a refusal for ``empty_run`` or ``too_many_deletions`` records its
    plan on the model's ledger line (``withheld_count``, ``withheld_keys``: the count and the
    first keys). ``approve=N, approved_by="who"`` approves it: the plan is made and the guards
    checked again; the withheld guards are overridden when the plan holds at most N rows, and
    at most N rows are removed; a plan that grew past N is refused (``approval_exceeded``, with
    the new count, recorded as the new withheld plan); a run with no withheld plan is refused
    (``nothing_withheld``, nothing written). The approval (who, how many, when) is recorded on
    the ledger line and in a ``cleanup.approved`` event. ``force=True`` overrides
    ``empty_run`` and ``too_many_deletions`` without a count, for scripts, and the ledger
    records that it did (``cleanup_forced``). A refusal is recorded on the ledgers (the
    model's line and the run's summary: ``cleanup_status = refused``, reason, message, time)
    with a ``cleanup.refused`` event, in one short transaction; nothing else is written.

    ``dry_run=True`` writes nothing and never raises ``CleanupRefused``: it returns the plan with
    ``refusal`` set to what a real cleanup would refuse with, and ``waiting``.

    Removal: batches of ``CLEANUP_BATCH_SIZE`` rows, each one short transaction holding the
    DELETE (or UPDATE), the ``<sync_name>.removed`` events carrying the removed rows
    (``{"scope", "model", "rows": [every column of each row]}``, plus ``"mode": "soft"`` for
    tombstones; split so each payload stays within ``MAX_PAYLOAD_BYTES``) and the
    ``rows_removed`` counts: a row is never gone without its audit. The statement itself
    re-states the predicate as an allow-list of the scope's older runs (never "not this run"),
    so a row that a newer run re-stamped after the plan was made is never removed. A final
    transaction (the batch that finds nothing left) records ``cleanup_status = done``. Run
    twice, the second cleanup removes nothing.

    Rows whose ``last_seen_run`` is NULL (their run row was deleted, so nobody can tell when
    they were last seen) are never removed; they count in the scope's total.

    Called inside the caller's ``atomic()``, these transactions are savepoints of it.
    Raises ``InvalidInput`` (not a tracked model, a bad ``approve`` or ``approved_by``),
    ``RunNotFound``, ``CleanupRefused``.
    """
    spec = tracked_spec(model)
    run_id = run_id_of(run)
    if approve is not None:
        approve = validate_positive_int("approve", approve, None)
        approved_by = validate_text("approved_by", approved_by, 150)
        if force:
            raise InvalidInput("force", "approve a withheld plan or force, not both")
    plan = make_plan(run_id, spec)
    refusal = plan.refusal
    forced = False
    approval: tuple[str, int] | None = plan.resumes_approval
    if approve is not None:
        refusal, approval = _approve(plan, approve, approved_by, dry_run)
    elif refusal is not None and (force or plan.resumes_forced) and refusal.reason in FORCEABLE:
        refusal, forced = None, True
    elif refusal is not None and approval is not None and refusal.reason in FORCEABLE:
        refusal = None  # the rest of an approved cleanup cut off half-way
    elif refusal is None and plan.resumes_forced:
        # The rest of a forced cleanup cut off half-way may be under the guards: it is still
        # that forced cleanup, and its ledger must keep saying so.
        forced = True
    mode = CleanupMode.SOFT if spec.soft else CleanupMode.DELETE
    who = approval[0] if approval else ""
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
            plan.waiting,
            mode,
            who,
        )
    if refusal is not None:
        _record_refusal(plan, refusal)
        raise CleanupRefused(refusal.reason, refusal.message)
    if approve is not None:
        _record_approval(plan, approve, approved_by)
    removed = _delete_in_batches(plan, forced, approval)
    return CleanupResult(
        False,
        plan.planned,
        removed,
        plan.sample_keys,
        forced,
        None,
        "",
        spec.label,
        plan.waiting,
        mode,
        who,
    )


def _approve(
    plan: Plan, approve: int, approved_by: str, dry_run: bool
) -> tuple[Refusal | None, tuple[str, int] | None]:
    """The refusal an approval of ``approve`` rows meets (None: go ahead), and the approval."""
    line = plan.line
    withheld = (
        line is not None
        and line.cleanup_status == CleanupStatus.REFUSED
        and line.cleanup_reason in (*FORCEABLE, "approval_exceeded")
        and line.withheld_count is not None
    )
    if not withheld:
        reason = f"{line.cleanup_status}" if line is not None else "not run"
        if line is not None and line.cleanup_reason:
            reason += f" ({line.cleanup_reason})"
        if plan.resumes_approval is not None:
            reason += (
                f", approved by {plan.resumes_approval[0]} and cut off: clean up again without "
                "approve to finish it within that approval"
            )
        refusal = Refusal(
            "nothing_withheld",
            f"run {plan.run_id!r} has no withheld cleanup of {plan.spec.label} to approve "
            f"(its cleanup is {reason}); only a cleanup refused for empty_run or "
            "too_many_deletions can be approved",
        )
        if dry_run:
            return refusal, None
        raise CleanupRefused(refusal.reason, refusal.message)  # nothing written
    if plan.refusal is not None and plan.refusal.reason not in FORCEABLE:
        return plan.refusal, None
    if plan.planned > approve:
        return (
            Refusal(
                "approval_exceeded",
                f"the plan now removes {plan.planned} {rows_noun(plan.spec)}, more than the "
                f"{approve} approved (the source shrank further since the plan was shown); "
                f"review the new plan and approve {plan.planned} to remove them",
            ),
            None,
        )
    return None, (approved_by, approve)


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
    rows = live_rows(spec, run.scope)
    cutoff = grace_cutoff(spec, run)
    runs = Run.objects.using(alias).filter(scope=run.scope)
    deletable = rows.filter(last_seen_run__in=runs.filter(ordinal__lt=cutoff).values("id"))
    total = rows.count()
    planned = deletable.count()
    waiting = 0
    if cutoff < run.ordinal:
        waiting = rows.filter(
            last_seen_run__in=runs.filter(ordinal__gte=cutoff, ordinal__lt=run.ordinal).values("id")
        ).count()
    keys = [field.name for field in spec.key]
    sample = tuple(
        json_key(tuple(values))
        for values in deletable.order_by(*keys).values_list(*keys)[:SAMPLE_SIZE]
    )
    refusal = _guard(spec, state, line, run, total, planned)
    in_progress = line is not None and line.cleanup_status == CleanupStatus.IN_PROGRESS
    resumes_forced = in_progress and line is not None and line.cleanup_forced
    resumes_approval = None
    if in_progress and line is not None and line.approved_count is not None:
        since = line.rows_removed - _removed_before_approval(run_id, spec)
        resumes_approval = (line.approved_by, max(0, line.approved_count - since))
    return Plan(
        spec,
        run_id,
        run.scope,
        run.ordinal,
        total,
        planned,
        sample,
        refusal,
        resumes_forced,
        waiting,
        cutoff,
        resumes_approval,
        line,
    )


def _removed_before_approval(run_id: str, spec: SyncSpec) -> int:
    """Rows the run's cleanup of the model had removed when it was approved (cut off, then
    withheld on its rerun), as its ``cleanup.approved`` event says. Pruned from the outbox
    since: 0, so the rest of the approval is counted smaller, never larger."""
    payload = (
        RunEvent.objects.using(db_alias())
        .filter(run_id=run_id, type="cleanup.approved", payload__model=spec.label)
        .order_by("-seq")
        .values_list("payload", flat=True)
        .first()
    )
    before = payload.get("removed_before") if isinstance(payload, dict) else None
    return before if isinstance(before, int) and not isinstance(before, bool) else 0


def grace_runs(spec: SyncSpec) -> int:
    """N of the model's grace period: ``sync_grace_runs``, else ``CLEANUP_GRACE_RUNS``."""
    return spec.grace_runs if spec.grace_runs is not None else runs_settings.CLEANUP_GRACE_RUNS


def grace_cutoff(spec: SyncSpec, run: Run) -> int:
    """The ordinal below which a row's ``last_seen_run`` makes it removable: that of the N-th
    newest completed run of the scope, up to ``run``, whose full flush of the model succeeded
    (``run`` is the first). With fewer such runs, 0: nothing is removable yet. Incremental runs
    do not count: not reading a row is no sign that it is gone. Ordinals are what the runs
    already store: no per-row miss counter to keep in step."""
    n = grace_runs(spec)
    if n == 1:
        return run.ordinal
    nth = (
        RunModelState.objects.using(db_alias())
        .filter(
            model=spec.label,
            flush_status=FlushStatus.SUCCEEDED,
            flush_mode=FlushMode.FULL,
            run__scope=run.scope,
            run__ordinal__lte=run.ordinal,
            run__state__status=RunStatus.COMPLETED,
        )
        .order_by("-run__ordinal")
        .values_list("run__ordinal", flat=True)[n - 1 : n]
    )
    found = list(nth)
    return int(found[0]) if found else 0


def live_rows(spec: SyncSpec, scope: str) -> Any:
    """The scope's rows a cleanup may count and remove: every row, but a tombstoned one of a
    soft-deleting model (already removed)."""
    rows = scope_rows(spec, scope)
    return rows.filter(deleted_at__isnull=True) if spec.soft else rows


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
    if line.flush_mode == FlushMode.INCREMENTAL:
        return Refusal(
            "incremental_run",
            f"{name} read {spec.label} incrementally (only what changed since the last "
            f"completed run's cursor), so {noun} it did not see may still exist; cleanup is "
            "for a run that reads the whole source (a full flush)",
        )
    if line.cleanup_status == CleanupStatus.RESTORED:
        return Refusal(
            "cleanup_restored",
            f"the cleanup of {spec.label} by {name} was undone by restore_cleanup "
            f"({line.restored_by or 'someone'}, {line.restored_at:%Y-%m-%d %H:%M:%S %Z}); it is "
            "not done again: the next run's cleanup decides afresh",
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
            f"looks like a broken source; the plan is withheld: approve it for {planned} "
            f"(approve={planned} / --approve {planned}) once checked",
        )
    fraction = runs_settings.CLEANUP_MAX_DELETE_FRACTION
    max_count = runs_settings.CLEANUP_MAX_DELETE_COUNT
    if planned > fraction * total:
        return Refusal(
            "too_many_deletions",
            f"would delete {planned} of {total} {noun} of scope {run.scope!r} "
            f"({planned / total:.0%}), more than CLEANUP_MAX_DELETE_FRACTION ({fraction:g})"
            f"; the plan is withheld: approve it for {planned} (approve={planned} / "
            f"--approve {planned}) once checked",
        )
    if max_count is not None and planned > max_count:
        return Refusal(
            "too_many_deletions",
            f"would delete {planned} {noun} of scope {run.scope!r}, more than "
            f"CLEANUP_MAX_DELETE_COUNT ({max_count}); the plan is withheld: approve it for "
            f"{planned} (approve={planned} / --approve {planned}) once checked",
        )
    return None


def _record_refusal(plan: Plan, refusal: Refusal) -> None:
    """One short transaction: the ledger's refusal and its ``cleanup.refused`` event."""
    with transaction.atomic(using=db_alias()):
        lock_state(plan.run_id)  # the run row first, the lock order of every writer of a run
        outcome: dict[str, Any] = {
            "cleanup_status": CleanupStatus.REFUSED,
            "cleanup_reason": refusal.reason,
            "cleanup_message": refusal.message,
            "cleanup_at": timezone.now(),
        }
        RunState.objects.using(db_alias()).filter(run_id=plan.run_id).update(**outcome)
        # A plan refused for its size is withheld for an operator to approve; any other
        # refusal leaves nothing to approve.
        withheld = refusal.reason in WITHHELD
        RunModelState.objects.using(db_alias()).update_or_create(
            run_id=plan.run_id,
            model=plan.spec.label,
            defaults={
                **outcome,
                "withheld_count": plan.planned if withheld else None,
                "withheld_keys": list(plan.sample_keys) if withheld else [],
            },
        )
        payload = {
            "model": plan.spec.label,
            "reason": refusal.reason,
            "message": refusal.message,
            "planned": plan.planned,
            "total": plan.total,
        }
        insert_events(plan.run_id, [PreparedEvent("cleanup.refused", payload)], allow_closed=True)


def _record_approval(plan: Plan, approve: int, approved_by: str) -> None:
    """One short transaction: who approved how many rows, on the model's ledger line, with a
    ``cleanup.approved`` event; the cleanup is ``in_progress`` under that approval from here (a
    rerun after a cut-off finishes it within what was approved)."""
    alias = db_alias()
    with transaction.atomic(using=alias):
        lock_state(plan.run_id)
        line = RunModelState.objects.using(alias).filter(run_id=plan.run_id, model=plan.spec.label)
        # Rows removed before the approval (a cleanup cut off, then withheld on its rerun)
        # stay counted: the ledger counts every row the run's cleanup removed, and the
        # approval's budget is counted from here (``removed_before`` in its event).
        removed_before = line.values_list("rows_removed", flat=True).get()
        now = timezone.now()
        approval = {
            "cleanup_status": CleanupStatus.IN_PROGRESS,
            "cleanup_reason": "",
            "cleanup_message": "",
            "cleanup_forced": False,
            "cleanup_at": now,
        }
        RunState.objects.using(alias).filter(run_id=plan.run_id).update(**approval)
        line.update(**approval, approved_by=approved_by, approved_count=approve, approved_at=now)
        payload = {
            "model": plan.spec.label,
            "approved_by": approved_by,
            "approved_count": approve,
            "planned": plan.planned,
            "total": plan.total,
            "sample_keys": list(plan.sample_keys),
            "removed_before": removed_before,
        }
        insert_events(plan.run_id, [PreparedEvent("cleanup.approved", payload)], allow_closed=True)


def _delete_in_batches(plan: Plan, forced: bool, approval: tuple[str, int] | None) -> int:
    walk = batch_cursor(plan.spec, plan.scope, plan.cutoff)
    removed = 0
    # An approval bounds what may go: never more rows than the operator saw and approved.
    budget = approval[1] if approval is not None else None
    while True:
        size = runs_settings.CLEANUP_BATCH_SIZE
        if budget is not None:
            size = min(size, budget - removed)
        try:
            count = _delete_batch(plan, forced, walk, size, approved=approval is not None)
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


def _delete_batch(
    plan: Plan, forced: bool, walk: BatchCursor | None, size: int, *, approved: bool
) -> int:
    """One short transaction: remove up to ``size`` rows, append their audit events and count
    them on the ledgers (``cleanup_status = in_progress`` until the end, so a cleanup cut off
    half-way never reads as not run); when nothing is left (or ``size`` is 0: an approval's
    budget is spent), mark the cleanup done instead."""
    alias = db_alias()
    spec = plan.spec
    with transaction.atomic(using=alias):
        now = timezone.now()
        tombstone = None
        if spec.soft:
            reason = "forced" if forced else "approved" if approved else "not_seen"
            tombstone = Tombstone(plan.run_id, now, reason)
        deleted = delete_batch(walk, spec, plan.scope, plan.cutoff, size, tombstone) if size else []
        ledger = RunState.objects.using(alias).filter(run_id=plan.run_id)
        line = RunModelState.objects.using(alias).filter(run_id=plan.run_id, model=spec.label)
        mode = CleanupMode.SOFT if spec.soft else CleanupMode.DELETE
        if not deleted:
            outcome: dict[str, Any] = {
                "cleanup_status": CleanupStatus.DONE,
                "cleanup_reason": "",
                "cleanup_message": "",
                "cleanup_forced": forced,
                "cleanup_at": now,
            }
            ledger.update(**outcome)
            line.update(
                **outcome, cleanup_mode=mode, rows_waiting=plan.waiting, withheld_count=None
            )
            return 0
        # The audit is built from the texts the database returned, never decoded: each row's
        # record is its columns as a JSON object, in key order.
        records = [record for _, record in sorted(deleted, key=lambda row: row[0])]
        event = f"{spec.event_prefix}.removed"
        events = [
            EncodedEvent(event, text)
            for text in split_removed(plan.scope, spec.label, records, soft=spec.soft)
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
        line.update(**progress, cleanup_mode=mode)
    return len(deleted)


def json_size(value: Any) -> int:
    """Bytes of compact UTF-8 JSON: the rule ``MAX_PAYLOAD_BYTES`` is measured by."""
    return len(encode_json(value).encode("utf-8"))


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def split_removed(
    scope: str, model: str, records: Sequence[str], *, soft: bool = False, extra: str = ""
) -> list[str]:
    """Pack removed rows' records (JSON texts), in order, into as few
    ``{"scope", "model", "rows"}`` payloads (JSON texts) as fit within ``MAX_PAYLOAD_BYTES``
    each (``"mode": "soft"`` too for tombstoned rows; ``extra``: more members, as JSON text
    ``"key":value,...`` with a trailing comma). A row
    too big to fit even alone (possible only if the limit was lowered after it was stored)
    still gets an event of its own: the audit is never dropped."""
    limit = runs_settings.MAX_PAYLOAD_BYTES
    mode = '"mode":"soft",' if soft else ""
    head = (
        f'{{"scope":{encode_json_string(scope)},"model":{encode_json_string(model)},'
        f'{mode}{extra}"rows":['
    )
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
