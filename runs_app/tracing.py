"""OpenTelemetry spans around publishes (extra ``otel``: ``pip install runs_app[otel]``).

Without ``opentelemetry-api`` installed every function here is a no-op that costs one cached
lookup. With the API but no SDK configured, spans are non-recording and carry no context, so no
``traceparent`` is added to messages either: the trace context travels only when a tracer
provider (the operator's SDK set-up) gives the publish a real span.

This module touches no model and no database.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from .publishers import Message

TRACER_NAME = "runs_app"

#: The W3C trace context headers, which are also the CloudEvents distributed-tracing extension
#: attributes (``traceparent``, ``tracestate``).
TRACE_CONTEXT_KEYS = ("traceparent", "tracestate")


@functools.cache
def _otel() -> tuple[ModuleType, ModuleType] | None:
    """``(opentelemetry.trace, opentelemetry.propagate)``, or None when the API is absent."""
    try:
        from opentelemetry import propagate, trace
    except ImportError:
        return None
    return trace, propagate


def enabled() -> bool:
    """True when ``opentelemetry-api`` can be imported."""
    return _otel() is not None


def current_trace_context() -> dict[str, str]:
    """The caller's current span as W3C trace context headers (``traceparent``, and
    ``tracestate`` when there is one), for a run to keep (``Run.trace_context``) so that its
    messages carry it; ``{}`` when OpenTelemetry is absent or there is no valid current span."""
    otel = _otel()
    if otel is None:
        return {}
    trace, propagate = otel
    if not trace.get_current_span().get_span_context().is_valid:
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return {key: value for key, value in carrier.items() if key in TRACE_CONTEXT_KEYS}


@contextmanager
def publish_span(
    messages: Sequence[Message], *, system: str, destination_template: str | None = None
) -> Iterator[dict[str, str]]:
    """A PRODUCER span named ``runs_app publish`` around one ``publish()`` call of one run's
    messages: a child of the run's trace context when the run has one (the job that created
    it), linked to the caller's current span (the relay's), else a child of the caller's span.

    Yields the span's trace context as W3C headers (``{"traceparent": ..., "tracestate": ...}``,
    only the keys the propagator wrote), for the publisher to put in every message; ``{}`` when
    OpenTelemetry is absent or the span carries no valid context. An exception raised inside is
    recorded on the span (status ERROR) and propagates.
    """
    otel = _otel()
    if otel is None or not messages:
        yield {}
        return
    trace, propagate = otel
    first, last = messages[0], messages[-1]
    attributes: dict[str, Any] = {
        "messaging.system": system,
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.batch.message_count": len(messages),
        "runs_app.run_id": first.run_id,
        "runs_app.scope": first.scope,
        "runs_app.seq.first": first.seq,
        "runs_app.seq.last": last.seq,
    }
    if destination_template is not None:
        # The template, not the subject: one span covers messages of several subjects.
        attributes["messaging.destination.template"] = destination_template
    tracer = trace.get_tracer(TRACER_NAME)
    parent = None
    links = []
    if first.trace_context:
        parent = propagate.extract(dict(first.trace_context))
        relay_span = trace.get_current_span().get_span_context()
        if relay_span.is_valid:
            links.append(trace.Link(relay_span))
    # record_exception / set_status_on_exception: the span says why the publish failed.
    with tracer.start_as_current_span(
        "runs_app publish",
        context=parent,
        kind=trace.SpanKind.PRODUCER,
        attributes=attributes,
        links=links,
    ) as span:
        carrier: dict[str, str] = {}
        if span.get_span_context().is_valid:
            propagate.inject(carrier)
        yield {key: value for key, value in carrier.items() if key in TRACE_CONTEXT_KEYS}
