"""The read model of runs: per-run delivery facts and per-scope health, for the admin and
``runs_status``.

Read-only, no transaction of its own: every fact is computed by the database in a fixed number of
queries, whatever the number of runs (annotations and correlated subqueries, never a query per
run), so the admin's run list and the health command stay cheap on a large history.

Delivery facts of a run (the outbox cursor ``next_seq`` says where the relay is):

- ``last_seq``: the seq of the run's newest event;
- delivered up to ``next_seq - 1`` (published or skipped);
- pending events: ``last_seq - next_seq + 1``;
- lag: the age of the oldest pending event (None when nothing is pending).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db.models import (
    BigIntegerField,
    Count,
    ExpressionWrapper,
    F,
    Max,
    Min,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
)
from django.utils import timezone

from .conf import runs_settings
from .db import db_alias_for_read
from .models import Run, RunEvent, RunModelState, RunOutbox, RunState, RunStatus


def _pending_events(run_ref: str, next_seq_ref: str) -> QuerySet[RunEvent]:
    # Pending (the partial index runs_app_event_pending) and at or above the run's cursor.
    return RunEvent.objects.pending().filter(
        run_id=OuterRef(run_ref), seq__gte=OuterRef(next_seq_ref)
    )


def _oldest_pending_at(run_ref: str, next_seq_ref: str) -> Subquery:
    return Subquery(_pending_events(run_ref, next_seq_ref).order_by("seq").values("created_at")[:1])


def runs_with_delivery(queryset: QuerySet[Run]) -> QuerySet[Run]:
    """Runs with their state and outbox joined and the delivery facts annotated:
    ``delivered_up_to``, ``pending_events`` and ``oldest_pending_at``."""
    return queryset.select_related("state", "outbox").annotate(
        delivered_up_to=ExpressionWrapper(
            F("outbox__next_seq") - 1, output_field=BigIntegerField()
        ),
        pending_events=ExpressionWrapper(
            F("last_seq") - F("outbox__next_seq") + 1, output_field=BigIntegerField()
        ),
        oldest_pending_at=_oldest_pending_at("pk", "outbox__next_seq"),
    )


def outboxes_with_delivery(queryset: QuerySet[RunOutbox]) -> QuerySet[RunOutbox]:
    """Outboxes with their run joined and the same delivery facts as ``runs_with_delivery``."""
    return queryset.select_related("run").annotate(
        delivered_up_to=ExpressionWrapper(F("next_seq") - 1, output_field=BigIntegerField()),
        pending_events=ExpressionWrapper(
            F("run__last_seq") - F("next_seq") + 1, output_field=BigIntegerField()
        ),
        oldest_pending_at=_oldest_pending_at("run_id", "next_seq"),
    )


def age_seconds(since: datetime | None, now: datetime | None = None) -> float | None:
    """Seconds elapsed since ``since`` (never negative), or None when there is no ``since``."""
    if since is None:
        return None
    now = timezone.now() if now is None else now
    return max(0.0, (now - since).total_seconds())


def format_seconds(seconds: float | None) -> str:
    """``"42s"``, ``"3m 05s"``, ``"2h 03m"``, ``"4d 07h"``; an empty string for None."""
    if seconds is None:
        return ""
    whole = int(seconds)
    if whole < 60:
        return f"{seconds:.0f}s" if seconds >= 1 or seconds == 0 else f"{seconds:.1f}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def is_stale(state: RunState, now: datetime | None = None) -> bool:
    """An active run whose heartbeat is older than ``RUN_STALE_AFTER`` seconds."""
    now = timezone.now() if now is None else now
    return state.status == RunStatus.ACTIVE and state.heartbeat_at < now - timedelta(
        seconds=float(runs_settings.RUN_STALE_AFTER)
    )


# ---------------------------------------------------------------------------------------------
# Health: the facts of ``runs_status``.


@dataclass(frozen=True)
class ModelHealth:
    """One model's line of a run's ledger (``RunModelState``)."""

    model: str
    flush_status: str
    rows_seen: int
    rows_created: int
    rows_updated: int
    rows_confirmed: int
    rows_removed: int
    cleanup_status: str
    cleanup_reason: str
    #: "full" or "incremental" (``flush(..., incremental=True)``), and the cursor the run set.
    flush_mode: str
    cursor: Any


@dataclass(frozen=True)
class ScopeHealth:
    """The latest run of one scope, its ledger (the summary) and its per-model lines."""

    scope: str
    run_id: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    age_seconds: float
    stale: bool
    flush_status: str
    rows_seen: int
    rows_created: int
    rows_updated: int
    rows_removed: int
    cleanup_status: str
    cleanup_reason: str
    runs: int
    #: When the scope's latest *completed* run finished (None: no run of the scope completed).
    last_completed_at: datetime | None
    last_completed_age_seconds: float | None
    models: list[ModelHealth]


@dataclass(frozen=True)
class OutboxHealth:
    """Delivery over all runs (of one scope, with ``--scope``)."""

    pending_events: int
    runs_with_pending: int
    oldest_pending_age_seconds: float | None
    blocked_runs: int
    held_leases: int


@dataclass(frozen=True)
class Health:
    checked_at: datetime
    scopes: list[ScopeHealth]
    outbox: OutboxHealth
    stale_runs: int

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = _jsonable(asdict(self))
        return data


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    return value


def health(scope: str | None = None, now: datetime | None = None) -> Health:
    """Per-scope latest runs with their per-model lines, and outbox totals, in six queries
    whatever the number of runs and models. Read on ``db_alias_for_read()`` (a replica, if the
    routers send runs_app's reads to one): a report, which may lag behind the writes."""
    now = timezone.now() if now is None else now
    alias = db_alias_for_read()
    runs = Run.objects.using(alias)
    if scope is not None:
        runs = runs.filter(scope=scope)

    # Latest run of each scope: the highest ordinal (creation order, not clocks).
    per_scope = runs.values("scope").annotate(top=Max("ordinal"), runs=Count("pk"))
    # The same grouped query, with the freshness of each scope (read here, not in the subquery
    # below, which needs only ``top``).
    summaries = {
        row["scope"]: row
        for row in per_scope.annotate(
            last_completed_at=Max("state__finished_at", filter=Q(state__status=RunStatus.COMPLETED))
        )
    }
    latest = list(
        runs.filter(ordinal__in=per_scope.values("top")).select_related("state").order_by("scope")
    )
    lines: dict[str, list[ModelHealth]] = {run.pk: [] for run in latest}
    for line in RunModelState.objects.using(alias).filter(run__in=latest).order_by("model"):
        lines[line.run_id].append(
            ModelHealth(
                model=line.model,
                flush_status=line.flush_status,
                rows_seen=line.rows_seen,
                rows_created=line.rows_created,
                rows_updated=line.rows_updated,
                rows_confirmed=line.rows_confirmed,
                rows_removed=line.rows_removed,
                cleanup_status=line.cleanup_status,
                cleanup_reason=line.cleanup_reason,
                flush_mode=line.flush_mode,
                cursor=line.cursor,
            )
        )
    scopes = [
        ScopeHealth(
            scope=run.scope,
            run_id=run.pk,
            status=run.state.status,
            started_at=run.state.started_at,
            finished_at=run.state.finished_at,
            age_seconds=age_seconds(run.state.started_at, now) or 0.0,
            stale=is_stale(run.state, now),
            flush_status=run.state.flush_status,
            rows_seen=run.state.rows_seen,
            rows_created=run.state.rows_created,
            rows_updated=run.state.rows_updated,
            rows_removed=run.state.rows_removed,
            cleanup_status=run.state.cleanup_status,
            cleanup_reason=run.state.cleanup_reason,
            runs=summaries[run.scope]["runs"],
            last_completed_at=summaries[run.scope]["last_completed_at"],
            last_completed_age_seconds=age_seconds(summaries[run.scope]["last_completed_at"], now),
            models=lines[run.pk],
        )
        for run in latest
    ]

    outboxes = RunOutbox.objects.using(alias)
    pending = RunEvent.objects.using(alias).pending().filter(seq__gte=F("run__outbox__next_seq"))
    states = RunState.objects.using(alias)
    if scope is not None:
        outboxes = outboxes.filter(run__scope=scope)
        pending = pending.filter(run__scope=scope)
        states = states.filter(scope=scope)

    totals = outboxes.aggregate(
        pending=Sum(F("run__last_seq") - F("next_seq") + 1, output_field=BigIntegerField()),
        runs_with_pending=Count("pk", filter=Q(next_seq__lte=F("run__last_seq"))),
        blocked=Count("pk", filter=Q(blocked_at__isnull=False)),
        leases=Count("pk", filter=Q(lease_until__gt=now)),
    )
    oldest = pending.aggregate(oldest=Min("created_at"))["oldest"]
    stale_before = now - timedelta(seconds=float(runs_settings.RUN_STALE_AFTER))
    stale_runs = states.filter(status=RunStatus.ACTIVE, heartbeat_at__lt=stale_before).count()

    return Health(
        checked_at=now,
        scopes=scopes,
        outbox=OutboxHealth(
            pending_events=int(totals["pending"] or 0),
            runs_with_pending=totals["runs_with_pending"],
            oldest_pending_age_seconds=age_seconds(oldest, now),
            blocked_runs=totals["blocked"],
            held_leases=totals["leases"],
        ),
        stale_runs=stale_runs,
    )
