"""The trace context of a run travels with its messages (CloudEvents distributed tracing).

A job that creates its run inside an OpenTelemetry span stores that span's W3C context on the run
(``Run.trace_context``); the relay reads it with the events, every message carries it
(``Message.trace_context``, and ``traceparent`` in ``as_cloudevent()``), and a publish span is a
child of the job's span (linked to the relay's own), so a consumer's trace joins the job's.
"""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from runs_app import relay, services
from runs_app.models import Run
from runs_app.publish_metrics import InstrumentedPublisher
from runs_app.testing import MemoryPublisher

pytestmark = pytest.mark.django_db


def traceparent_of(span: trace.Span) -> str:
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def test_a_run_created_in_a_span_carries_its_context_in_every_message(
    spans: InMemorySpanExporter,
) -> None:
    tracer = trace.get_tracer("job")
    with tracer.start_as_current_span("nightly sync") as job:
        run = services.create_run("crm", events=[{"type": "a"}, {"type": "b"}])
        expected = traceparent_of(job)
    assert Run.objects.get(pk=run.pk).trace_context == {"traceparent": expected}
    services.append_events(run, [{"type": "c"}])  # outside the span: the run's context still

    publisher = MemoryPublisher()
    relay.drain_outbox_for_run(run, publisher=publisher)

    assert [message.seq for message in publisher.messages] == [1, 2, 3, 4]
    assert {message.trace_context["traceparent"] for message in publisher.messages} == {expected}
    envelope = publisher.messages[0].as_cloudevent()
    assert envelope["traceparent"] == expected
    assert envelope["id"] == f"{run.pk}:1"  # the envelope's own attributes are untouched


def test_without_a_span_nothing_is_stored_or_sent(spans: InMemorySpanExporter) -> None:
    run = services.create_run("crm", events=[{"type": "a"}])
    assert Run.objects.get(pk=run.pk).trace_context == {}
    publisher = MemoryPublisher()
    relay.drain_outbox_for_run(run, publisher=publisher)
    assert [message.trace_context for message in publisher.messages] == [{}, {}]
    assert "traceparent" not in publisher.messages[0].as_cloudevent()


def test_the_publish_span_is_a_child_of_the_job_and_linked_to_the_relay(
    spans: InMemorySpanExporter,
) -> None:
    tracer = trace.get_tracer("job")
    with tracer.start_as_current_span("nightly sync") as job:
        run = services.create_run("crm", events=[{"type": "a"}])
    job_context = job.get_span_context()
    publisher = InstrumentedPublisher("runs_app.testing.MemoryPublisher", relay="r1")
    with tracer.start_as_current_span("relay pass") as relay_span:
        relay.drain_outbox_for_run(run, publisher=publisher)
    (publish,) = [span for span in spans.get_finished_spans() if span.name == "runs_app publish"]
    assert publish.context is not None and publish.parent is not None
    assert publish.context.trace_id == job_context.trace_id
    assert publish.parent.span_id == job_context.span_id
    assert [link.context.span_id for link in publish.links] == [
        relay_span.get_span_context().span_id
    ]


def test_a_stored_context_that_is_not_trace_headers_is_not_sent() -> None:
    run = services.create_run("crm")
    # An operator's edit, or a row written by hand: only the W3C keys ever leave.
    Run.objects.filter(pk=run.pk).update(
        trace_context={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01", "secret": "x"}
    )
    publisher = MemoryPublisher()
    relay.drain_outbox_for_run(run, publisher=publisher)
    assert set(publisher.messages[0].trace_context) == {"traceparent"}
