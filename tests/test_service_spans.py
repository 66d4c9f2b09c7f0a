"""An OpenTelemetry span around each service call (runs_app.tracing.traced): names, attributes,
nesting under the caller's span, failures recorded and re-raised unchanged. The spans come from
an SDK tracer provider installed per test (the ``spans`` fixture of conftest.py). Without
opentelemetry at all: tests/test_nats_publisher.py, test_importing_runs_app_never_needs_...
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from runs_app import services
from runs_app.exceptions import InvalidInput, RunClosed
from runs_app.models import Project, Run

pytestmark = pytest.mark.django_db

PROJECT = "runs_app.project"  # as the ledgers name it (RunModelState.model)


def rows(*keys: str) -> list[dict[str, Any]]:
    return [{"key": key, "name": f"name of {key}", "data": {"secret": key}} for key in keys]


def by_name(spans: Sequence[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    named: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        named.setdefault(span.name, []).append(span)
    return named


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def function(name: str) -> dict[str, str]:
    return {"code.function.name": f"runs_app.services.{name}"}


def test_a_job_is_a_tree_of_service_spans_under_the_callers_span(
    spans: InMemorySpanExporter,
) -> None:
    first = services.create_run("crm")
    services.flush_projects(first, rows("a", "b", "c"))
    services.complete_run(first)
    spans.clear()

    with trace.get_tracer("the caller").start_as_current_span("sync job") as job:
        run = services.create_run("crm")
        with services.flush(run, Project, batch_size=1) as session:
            session.write(rows("a", "b"))
        services.complete_run(run.id)
        result = services.safe_cleanup(run, Project)
    assert result.removed == 1  # the job did its work: c is gone

    finished = spans.get_finished_spans()
    assert [span.name for span in finished] == [
        "runs_app create_run",
        "runs_app flush.open",
        "runs_app flush.batch",
        "runs_app flush.batch",
        "runs_app flush.close",
        "runs_app complete_run",
        "runs_app safe_cleanup",
        "sync job",
    ]
    context = job.get_span_context()
    for span in finished[:-1]:
        assert span.kind == SpanKind.INTERNAL
        assert span.parent is not None and span.parent.span_id == context.span_id, span.name
        assert span.context is not None and span.context.trace_id == context.trace_id
        assert span.status.status_code == StatusCode.UNSET, span.name
        assert span.instrumentation_scope is not None
        assert span.instrumentation_scope.name == "runs_app"

    named = by_name(finished)
    ids = {"runs_app.run_id": run.id}
    # Exactly these keys: nothing of the rows (keys, names, data) nor of the event payloads.
    assert attributes(named["runs_app create_run"][0]) == {
        **function("runs.create_run"),
        **ids,
        "runs_app.scope": "crm",  # from the run it returned
    }
    session_attributes = {**ids, "runs_app.model": PROJECT}
    assert attributes(named["runs_app flush.open"][0]) == {
        **function("flush.FlushSession._open"),
        **session_attributes,
    }
    for batch in named["runs_app flush.batch"]:
        assert attributes(batch) == {
            **function("flush.FlushSession._write_batch"),
            **session_attributes,
        }
    assert attributes(named["runs_app flush.close"][0]) == {
        **function("flush.FlushSession._close_transaction"),
        **session_attributes,
    }
    # complete_run was given the id only: the scope comes from the run it returned.
    assert attributes(named["runs_app complete_run"][0]) == {
        **function("runs.complete_run"),
        **ids,
        "runs_app.scope": "crm",
    }
    assert attributes(named["runs_app safe_cleanup"][0]) == {
        **function("cleanup.safe_cleanup"),
        **ids,
        "runs_app.scope": "crm",
        "runs_app.model": PROJECT,
    }


def test_track_run_holds_the_jobs_spans_and_a_failed_job_is_an_error(
    spans: InMemorySpanExporter,
) -> None:
    with services.track_run("crm") as run:
        services.append_events(run, [{"type": "crm.seen", "payload": {"secret": 1}}])
        services.heartbeat(run.id)
    error = ValueError("the source is down")
    with pytest.raises(ValueError) as raised, services.track_run("crm") as failing:
        raise error
    assert raised.value is error  # unchanged, through the traced generator

    finished = spans.get_finished_spans()
    assert [span.name for span in finished] == [
        "runs_app create_run",
        "runs_app append_events",
        "runs_app heartbeat",
        "runs_app complete_run",
        "runs_app track_run",
        "runs_app create_run",
        "runs_app fail_run",
        "runs_app track_run",
    ]
    job, failed_job = finished[4], finished[7]
    for child in finished[:4]:
        assert child.parent is not None and job.context is not None
        assert child.parent.span_id == job.context.span_id
    for child in finished[5:7]:
        assert child.parent is not None and failed_job.context is not None
        assert child.parent.span_id == failed_job.context.span_id
    assert job.parent is None  # no caller's span: track_run is the root
    assert attributes(job) == {
        **function("runs.track_run"),
        "runs_app.run_id": run.id,
        "runs_app.scope": "crm",
    }
    assert attributes(finished[1]) == {
        **function("events.append_events"),
        "runs_app.run_id": run.id,
        "runs_app.scope": "crm",
    }
    assert job.status.status_code == StatusCode.UNSET

    assert failed_job.status.status_code == StatusCode.ERROR
    assert failed_job.status.description == "ValueError: the source is down"
    assert attributes(failed_job)["error.type"] == "builtins.ValueError"
    assert attributes(failed_job)["runs_app.run_id"] == failing.id
    (event,) = failed_job.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert event.attributes["exception.type"] == "ValueError"


def test_a_failing_call_records_an_error_span_and_raises_the_same_exception(
    spans: InMemorySpanExporter,
) -> None:
    run = services.create_run("crm")
    services.complete_run(run)
    spans.clear()

    with pytest.raises(RunClosed) as closed:
        services.complete_run(run)
    error = RuntimeError("the caller's iterable broke")

    def events() -> Iterator[dict[str, Any]]:
        raise error
        yield {}

    with pytest.raises(RuntimeError) as raised:
        services.append_events(run.id, events())
    assert raised.value is error

    complete, append = spans.get_finished_spans()
    assert complete.status.status_code == StatusCode.ERROR
    assert complete.status.description == f"RunClosed: {closed.value}"
    assert attributes(complete) == {
        **function("runs.complete_run"),
        "runs_app.run_id": run.id,
        "runs_app.scope": "crm",
        "error.type": "runs_app.exceptions.RunClosed",
    }
    assert [event.name for event in complete.events] == ["exception"]
    assert append.status.status_code == StatusCode.ERROR
    assert attributes(append)["error.type"] == "builtins.RuntimeError"
    assert attributes(append)["runs_app.run_id"] == run.id


def test_a_bad_argument_is_not_copied_into_the_span(spans: InMemorySpanExporter) -> None:
    too_long = "x" * 1000
    with pytest.raises(InvalidInput):
        services.heartbeat(too_long)
    (span,) = spans.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert attributes(span) == {
        **function("runs.heartbeat"),
        "error.type": "runs_app.exceptions.InvalidInput",
    }


def test_the_outbox_and_maintenance_calls_have_spans(spans: InMemorySpanExporter) -> None:
    run = services.create_run("crm")
    spans.clear()
    services.retry_outbox(run, actor="ops")
    assert services.prune_outbox(3600) == 0
    assert services.fail_stale_runs() == 0
    assert [span.name for span in spans.get_finished_spans()] == [
        "runs_app retry_outbox",
        "runs_app prune_outbox",
        "runs_app fail_stale_runs",
    ]


def test_without_an_sdk_the_spans_record_nothing_and_the_calls_work() -> None:
    # The API alone (no tracer provider set): the wrapper runs, its spans are non-recording.
    assert hasattr(services.create_run, "__wrapped__")
    with trace.get_tracer("the caller").start_as_current_span("sync job") as job:
        assert not job.is_recording()
        run = services.create_run("crm")
        services.flush_projects(run, rows("a"))
        assert services.complete_run(run).state.status == "completed"


def test_a_run_keeps_its_callers_trace_context_not_create_runs(
    spans: InMemorySpanExporter,
) -> None:
    # Run.trace_context (tests/test_trace_context.py) is the span create_run was called in: the
    # job's, or track_run's when the job is a track_run block; never create_run's own span.
    with trace.get_tracer("the caller").start_as_current_span("sync job") as job:
        direct = services.create_run("crm")
        services.complete_run(direct)
    with services.track_run("crm") as tracked:
        pass
    named = by_name(spans.get_finished_spans())
    (track,) = named["runs_app track_run"]
    assert track.context is not None

    def span_id(run_id: str) -> int:
        traceparent = Run.objects.get(pk=run_id).trace_context["traceparent"]
        return int(traceparent.split("-")[2], 16)

    assert span_id(direct.id) == job.get_span_context().span_id
    assert span_id(tracked.id) == track.context.span_id
