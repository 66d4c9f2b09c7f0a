"""Counters of the publishing process: messages published, failed publishes and publish latency,
labelled by relay, on Prometheus (extra ``prometheus``) and OpenTelemetry (extra ``otel``).

They live in the relay's process, so they are registered where that process's exporter finds
them: ``prometheus_client``'s default registry (``prometheus_client.start_http_server``, a push
gateway, django-prometheus) and the global OpenTelemetry meter ``runs_app``. The facts read from
the database, which any process can serve, are in :mod:`runs_app.metrics`.

:class:`runs_app.nats_publisher.NatsPublisher` records itself; :class:`InstrumentedPublisher`
adds the counters and a span to any other publisher. Without the extras everything here is a
no-op. This module touches no model and no database.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

from . import tracing
from .publishers import Message, Publisher, close_publisher, load_publisher

PUBLISH_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@functools.cache
def prometheus_module() -> ModuleType | None:
    """``prometheus_client`` (extra ``prometheus``), or None when it is not installed: the one
    optional import of it, shared with :mod:`runs_app.metrics`."""
    try:
        import prometheus_client
        import prometheus_client.core  # the custom collectors' metric families
    except ImportError:
        return None
    return prometheus_client


@functools.cache
def otel_metrics_module() -> ModuleType | None:
    """``opentelemetry.metrics`` (extra ``otel``), or None when it is not installed."""
    try:
        from opentelemetry import metrics
    except ImportError:
        return None
    return metrics


@functools.cache
def _instruments() -> tuple[Any, Any]:
    """(Prometheus instruments or None, OpenTelemetry instruments or None), made once per
    process (a registry refuses a second metric of the same name)."""
    prometheus = None
    client = prometheus_module()
    if client is not None:
        prometheus = (
            client.Counter(
                "runs_app_published_messages",
                "Messages a publisher delivered (acknowledged by the broker).",
                ["relay"],
            ),
            client.Counter(
                "runs_app_publish_failures",
                "publish() calls that raised (their events stay pending).",
                ["relay"],
            ),
            client.Histogram(
                "runs_app_publish_duration_seconds",
                "Duration of one publish() call (one run's batch), failed ones included.",
                ["relay"],
                buckets=PUBLISH_SECONDS_BUCKETS,
            ),
        )
    otel = None
    api = otel_metrics_module()
    if api is not None:
        meter = api.get_meter("runs_app")
        otel = (
            meter.create_counter("runs_app.published_messages", unit="{message}"),
            meter.create_counter("runs_app.publish.failures", unit="{call}"),
            meter.create_histogram("runs_app.publish.duration", unit="s"),
        )
    return prometheus, otel


def record_publish(relay: str, *, messages: int, seconds: float, failed: bool) -> None:
    """Count one ``publish()`` call of ``relay``: its duration, and either ``messages``
    delivered or one failure. A no-op without either extra."""
    prometheus, otel = _instruments()
    if prometheus is not None:
        published, failures, duration = prometheus
        duration.labels(relay).observe(seconds)
        if failed:
            failures.labels(relay).inc()
        else:
            published.labels(relay).inc(messages)
    if otel is not None:
        published, failures, duration = otel
        attributes = {"relay": relay}
        duration.record(seconds, attributes)
        if failed:
            failures.add(1, attributes)
        else:
            published.add(messages, attributes)


def default_relay_name() -> str:
    return f"runs_app-relay-{os.uname().nodename}-{os.getpid()}"


class InstrumentedPublisher:
    """Wraps another publisher: a ``runs_app publish`` span around each ``publish()`` and the
    publish counters, labelled ``relay``. Configure it in place of the publisher::

        "PUBLISHER": "runs_app.publish_metrics.InstrumentedPublisher",
        "PUBLISHER_OPTIONS": {
            "publisher": "runs_app.publishers.KombuPublisher",
            "options": {"url": "amqp://..."},
        },

    Options: ``publisher`` (dotted path), ``options`` (its keyword arguments), ``relay`` (the
    label; default ``runs_app-relay-<host>-<pid>``), ``system`` (the span's
    ``messaging.system``; default the wrapped class's name). The wrapped publisher is built
    here, so bad options fail the system check as they would unwrapped. The trace context is
    not put into the messages (the wrapped publisher builds them); ``NatsPublisher`` does that
    itself and needs no wrapper.
    """

    def __init__(
        self,
        publisher: str,
        options: Mapping[str, Any] | None = None,
        relay: str | None = None,
        system: str | None = None,
    ) -> None:
        if relay is not None and (not isinstance(relay, str) or not relay):
            raise ValueError(f"relay must be a non-empty string, not {relay!r}")
        self.inner: Publisher = load_publisher(publisher, {} if options is None else options)
        self.relay = relay or default_relay_name()
        self.system = system or type(self.inner).__name__

    def publish(self, messages: Sequence[Message]) -> None:
        started = time.perf_counter()
        try:
            with tracing.publish_span(messages, system=self.system):
                self.inner.publish(messages)
        except BaseException:
            record_publish(
                self.relay, messages=0, seconds=time.perf_counter() - started, failed=True
            )
            raise
        record_publish(
            self.relay,
            messages=len(messages),
            seconds=time.perf_counter() - started,
            failed=False,
        )

    def close(self) -> None:
        close_publisher(self.inner)
