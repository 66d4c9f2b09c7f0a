"""Metrics for operators, on Prometheus (extra ``prometheus``) and OpenTelemetry (extra ``otel``).

Two kinds, kept apart because they live in different processes:

- **Facts read from the database** (:func:`snapshot`): pending events, the oldest pending
  event's age, blocked runs, held leases, stale runs, runs by status per scope, rows flushed and
  removed per scope, cleanup refusals by reason. Any process can serve them, however the relay
  runs (a cron-style ``drain_outbox --once`` has no process to scrape): the ``runs_metrics``
  command and the :func:`runs_app.views.metrics` view render them in Prometheus' text format
  (:func:`prometheus_text`), and :func:`register_otel_gauges` observes them for an OpenTelemetry
  SDK. Each render reads them afresh, in a fixed number of queries whatever the history.
- **Counters of the publishing process**: :mod:`runs_app.publish_metrics`.

Without the extras installed nothing here costs more than one cached failed import.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db.models import Count, Sum
from django.utils import timezone

from . import inspection
from .db import db_alias_for_read
from .models import RunState
from .publish_metrics import otel_metrics_module, prometheus_module
from .statuses import CleanupStatus

#: The ledger counts summed per scope, as the ``kind`` label of ``runs_app_rows_total``.
ROW_KINDS = ("seen", "created", "updated", "confirmed", "removed")


def import_prometheus() -> Any:
    """``prometheus_client``; ``ImportError`` naming the extra to install when it is absent."""
    client = prometheus_module()
    if client is None:
        raise ImportError("needs prometheus-client: pip install runs_app[prometheus]")
    return client


# ---------------------------------------------------------------------------------------------
# Facts read from the database.


@dataclass(frozen=True)
class Snapshot:
    """What the database says now. Counts are over every run still stored."""

    checked_at: datetime
    health: inspection.Health
    #: (scope, status) -> number of runs
    runs_by_status: dict[tuple[str, str], int]
    #: (scope, kind) -> rows, kind in ``ROW_KINDS``
    rows: dict[tuple[str, str], int]
    #: (scope, reason) -> number of runs whose cleanup was refused for that reason
    cleanup_refusals: dict[tuple[str, str], int]


def snapshot(now: datetime | None = None) -> Snapshot:
    """Read the facts: ``inspection.health()`` plus three grouped queries over the run ledgers
    (no query per run or per scope). Read-only, no transaction of its own, on
    ``db_alias_for_read()`` like ``health()`` (a replica, if the routers say so)."""
    now = timezone.now() if now is None else now
    states = RunState.objects.using(db_alias_for_read())
    by_status = {
        (row["scope"], row["status"]): row["n"]
        for row in states.values("scope", "status").annotate(n=Count("pk")).order_by()
    }
    rows: dict[tuple[str, str], int] = {}
    sums = states.values("scope").annotate(
        seen=Sum("rows_seen"),
        created=Sum("rows_created"),
        updated=Sum("rows_updated"),
        confirmed=Sum("rows_confirmed"),
        removed=Sum("rows_removed"),
    )
    for row in sums.order_by():
        for kind in ROW_KINDS:
            rows[(row["scope"], kind)] = int(row[kind] or 0)  # type: ignore[literal-required]
    refusals = {
        (row["scope"], row["cleanup_reason"]): row["n"]
        for row in states.filter(cleanup_status=CleanupStatus.REFUSED)
        .values("scope", "cleanup_reason")
        .annotate(n=Count("pk"))
        .order_by()
    }
    return Snapshot(now, inspection.health(None, now), by_status, rows, refusals)


def _families(facts: Snapshot) -> Iterator[Any]:
    """The snapshot as ``prometheus_client`` metric families."""
    client = import_prometheus()
    gauge = client.core.GaugeMetricFamily
    counter = client.core.CounterMetricFamily
    outbox = facts.health.outbox
    for name, documentation, value in (
        ("runs_app_outbox_pending_events", "Events not yet published.", outbox.pending_events),
        (
            "runs_app_outbox_runs_with_pending",
            "Runs with at least one pending event.",
            outbox.runs_with_pending,
        ),
        (
            "runs_app_outbox_oldest_pending_age_seconds",
            "Age of the oldest pending event (0 when nothing is pending).",
            outbox.oldest_pending_age_seconds or 0.0,
        ),
        (
            "runs_app_outbox_blocked_runs",
            "Runs whose outbox is blocked (MAX_ATTEMPTS reached or a gap): an operator acts.",
            outbox.blocked_runs,
        ),
        ("runs_app_outbox_held_leases", "Runs leased by a relay right now.", outbox.held_leases),
        (
            "runs_app_stale_runs",
            "Active runs without a heartbeat for RUN_STALE_AFTER.",
            facts.health.stale_runs,
        ),
    ):
        yield gauge(name, documentation, value=value)

    runs = gauge("runs_app_runs", "Runs by scope and status.", labels=["scope", "status"])
    for (scope, status), count in sorted(facts.runs_by_status.items()):
        runs.add_metric([scope, status], count)
    yield runs

    rows = counter(
        "runs_app_rows",
        "Rows of the run ledgers summed per scope: seen, created, updated and confirmed by "
        "flushes, removed by cleanups.",
        labels=["scope", "kind"],
    )
    for (scope, kind), count in sorted(facts.rows.items()):
        rows.add_metric([scope, kind], count)
    yield rows

    refusals = counter(
        "runs_app_cleanup_refusals",
        "Runs whose cleanup was refused, by reason.",
        labels=["scope", "reason"],
    )
    for (scope, reason), count in sorted(facts.cleanup_refusals.items()):
        refusals.add_metric([scope, reason], count)
    yield refusals

    latest = gauge(
        "runs_app_latest_run_started_timestamp_seconds",
        "Start of the latest run of each scope (Unix time), labelled with its status.",
        labels=["scope", "status"],
    )
    for item in facts.health.scopes:
        latest.add_metric([item.scope, item.status], item.started_at.timestamp())
    yield latest


class RunsCollector:
    """A ``prometheus_client`` collector that reads :func:`snapshot` at every scrape."""

    def describe(self) -> list[Any]:
        # Registration must not query the database (a registry calls collect() otherwise).
        return []

    def collect(self) -> Iterator[Any]:
        yield from _families(snapshot())


def prometheus_text() -> tuple[bytes, str]:
    """The database facts in Prometheus' text exposition format, and its content type. Label
    values (scopes, reasons) are escaped by ``prometheus_client``.

    Raises ``ImportError`` naming the extra when ``prometheus-client`` is not installed."""
    client = import_prometheus()
    registry = client.CollectorRegistry(auto_describe=False)
    registry.register(RunsCollector())
    return client.generate_latest(registry), client.CONTENT_TYPE_LATEST


# ---------------------------------------------------------------------------------------------
# OpenTelemetry: the same facts as observable gauges.

_otel_lock = threading.Lock()
_otel_registered: set[int] = set()


def register_otel_gauges(cache_seconds: float = 1.0, meter_provider: Any = None) -> bool:
    """Observe the database facts on the OpenTelemetry meter ``runs_app`` of ``meter_provider``
    (default: the global one), once per provider and process; the instruments' callbacks share
    one :func:`snapshot` per ``cache_seconds`` (a collection calls every callback in turn).
    Returns False when ``opentelemetry-api`` is absent.

    The callbacks run where the SDK collects (its reader's thread), which opens its own
    database connection.
    """
    api = otel_metrics_module()
    if api is None:
        return False
    with _otel_lock:
        if id(meter_provider) in _otel_registered:
            return True
        _otel_registered.add(id(meter_provider))
    cache: dict[str, Any] = {}

    def facts() -> Snapshot:
        with _otel_lock:
            if cache.get("until", 0.0) < time.monotonic():
                cache["facts"] = snapshot()
                cache["until"] = time.monotonic() + cache_seconds
            value: Snapshot = cache["facts"]
            return value

    def outbox(field: str) -> Any:
        def callback(options: Any) -> list[Any]:
            value = getattr(facts().health.outbox, field)
            return [api.Observation(value or 0)]

        return callback

    def runs(options: Any) -> list[Any]:
        return [
            api.Observation(count, {"scope": scope, "status": status})
            for (scope, status), count in facts().runs_by_status.items()
        ]

    def rows(options: Any) -> list[Any]:
        return [
            api.Observation(count, {"scope": scope, "kind": kind})
            for (scope, kind), count in facts().rows.items()
        ]

    def refusals(options: Any) -> list[Any]:
        return [
            api.Observation(count, {"scope": scope, "reason": reason})
            for (scope, reason), count in facts().cleanup_refusals.items()
        ]

    meter = api.get_meter("runs_app", meter_provider=meter_provider)
    for name, field, unit in (
        ("runs_app.outbox.pending_events", "pending_events", "{event}"),
        ("runs_app.outbox.oldest_pending_age", "oldest_pending_age_seconds", "s"),
        ("runs_app.outbox.blocked_runs", "blocked_runs", "{run}"),
        ("runs_app.outbox.held_leases", "held_leases", "{run}"),
    ):
        meter.create_observable_gauge(name, callbacks=[outbox(field)], unit=unit)
    meter.create_observable_gauge("runs_app.runs", callbacks=[runs], unit="{run}")
    meter.create_observable_counter("runs_app.rows", callbacks=[rows], unit="{row}")
    meter.create_observable_counter("runs_app.cleanup.refusals", callbacks=[refusals], unit="{run}")
    return True
