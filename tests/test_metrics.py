"""Metrics: the Prometheus scrape endpoint and ``runs_metrics`` read from the database, the
OpenTelemetry gauges, and the publish counters and span of ``InstrumentedPublisher``."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, cast

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client, override_settings
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from runs_app import metrics, relay, services
from runs_app.conf import user_settings
from runs_app.exceptions import CleanupRefused, PublisherError
from runs_app.models import Project, RunOutbox
from runs_app.publish_metrics import InstrumentedPublisher
from runs_app.publishers import load_publisher
from runs_app.testing import MemoryPublisher, RunsOutbox
from tests.relay_helpers import ROOT

pytestmark = pytest.mark.django_db

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@override_settings(ROOT_URLCONF="tests.metrics_urls")
def scrape() -> Samples:
    response = Client().get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    return parse(response.content.decode("utf-8"))


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_a_scrape_during_a_sync_shows_the_gauges_move(runs_outbox: RunsOutbox) -> None:
    before = scrape()
    assert value(before, "runs_app_outbox_pending_events") == 0
    assert value(before, "runs_app_outbox_oldest_pending_age_seconds") == 0
    assert value(before, "runs_app_runs", scope="repos", status="active") is None

    # The sync starts: its run is active and its events are pending.
    run = services.create_run("repos", run_id="sync-1", events=[{"type": "page.read"}] * 2)
    started = scrape()
    assert value(started, "runs_app_outbox_pending_events") == 3
    assert value(started, "runs_app_outbox_runs_with_pending") == 1
    assert (value(started, "runs_app_outbox_oldest_pending_age_seconds") or 0) >= 0
    assert value(started, "runs_app_runs", scope="repos", status="active") == 1
    assert value(
        started, "runs_app_latest_run_started_timestamp_seconds", scope="repos", status="active"
    ) == pytest.approx(run.state.started_at.timestamp())

    # A relay holds the run's lease while it publishes.
    claim = relay.claim_runs(10)
    assert value(scrape(), "runs_app_outbox_held_leases") == 1
    relay.release_leases(claim, [claimed.run_id for claimed in claim.runs])
    assert value(scrape(), "runs_app_outbox_held_leases") == 0

    # Rows flushed; a cleanup too early is refused.
    services.flush_projects(run, [{"key": f"k{n}", "name": f"p{n}", "data": {}} for n in range(3)])
    with pytest.raises(CleanupRefused):
        services.safe_cleanup(run, Project)
    flushed = scrape()
    assert value(flushed, "runs_app_rows_total", scope="repos", kind="seen") == 3
    assert value(flushed, "runs_app_rows_total", scope="repos", kind="created") == 3
    assert (
        value(flushed, "runs_app_cleanup_refusals_total", scope="repos", reason="run_not_completed")
        == 1
    )

    # The run completes and the relay delivers everything.
    services.complete_run(run)
    assert value(scrape(), "runs_app_outbox_pending_events") > 3  # type: ignore[operator]
    runs_outbox.drain()
    done = scrape()
    assert value(done, "runs_app_outbox_pending_events") == 0
    assert value(done, "runs_app_outbox_oldest_pending_age_seconds") == 0
    assert value(done, "runs_app_runs", scope="repos", status="active") is None
    assert value(done, "runs_app_runs", scope="repos", status="completed") == 1
    assert value(done, "runs_app_rows_total", scope="repos", kind="confirmed") == 3


def test_a_blocked_run_shows(runs_outbox: RunsOutbox) -> None:
    services.create_run("jobs", run_id="doomed")
    runs_outbox.publisher.fail_with = RuntimeError("broker down")
    with override_settings(RUNS_APP={**user_settings(), "MAX_ATTEMPTS": 1}):
        relay.drain_outbox_once(publisher=runs_outbox.publisher)
        assert RunOutbox.objects.get(run_id="doomed").blocked_at is not None
        assert value(scrape(), "runs_app_outbox_blocked_runs") == 1


def test_label_values_from_user_strings_are_escaped() -> None:
    scope = 'odd "scope" \\ with } and, commas'
    services.create_run(scope)
    text = io.StringIO()
    call_command("runs_metrics", stdout=text)
    assert 'scope="odd \\"scope\\" \\\\ with } and, commas"' in text.getvalue()
    assert value(parse(text.getvalue()), "runs_app_runs", scope=scope, status="active") == 1


@override_settings(ROOT_URLCONF="tests.metrics_urls")
def test_the_endpoint_only_reads() -> None:
    assert Client().post("/metrics").status_code == 405
    assert Client().head("/metrics").status_code == 200


def test_the_endpoint_and_the_command_say_the_same_in_a_fixed_number_of_queries(
    django_assert_max_num_queries: Any,
) -> None:
    for n in range(3):
        services.create_run(f"scope-{n}", events=[{"type": "x"}])
    with django_assert_max_num_queries(10):
        metrics.prometheus_text()
    for n in range(3, 30):
        services.create_run(f"scope-{n}", events=[{"type": "x"}])
    with django_assert_max_num_queries(10):
        metrics.prometheus_text()
    out = io.StringIO()
    call_command("runs_metrics", stdout=out)
    command = parse(out.getvalue())
    with override_settings(ROOT_URLCONF="tests.metrics_urls"):
        endpoint = parse(Client().get("/metrics").content.decode())
    age = ("runs_app_outbox_oldest_pending_age_seconds", ())
    assert command.pop(age) >= 0 and endpoint.pop(age) >= 0  # both read the clock
    assert command == endpoint
    assert value(command, "runs_app_runs", scope="scope-29", status="active") == 1


def test_the_command_writes_a_file_for_a_textfile_collector(tmp_path: Path) -> None:
    services.create_run("repos")
    target = tmp_path / "runs_app.prom"
    call_command("runs_metrics", "--output", str(target))
    assert value(parse(target.read_text()), "runs_app_runs", scope="repos", status="active") == 1
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert [path.name for path in tmp_path.iterdir()] == ["runs_app.prom"]  # no leftovers

    for bad, message in (
        (str(tmp_path / "missing" / "x.prom"), "--output: directory .* does not exist"),
        (str(tmp_path), "--output: .* is a directory"),
    ):
        with pytest.raises(CommandError, match=message) as raised:
            call_command("runs_metrics", "--output", bad)
        assert raised.value.returncode == 2


@pytest.mark.django_db(transaction=True)
def test_without_prometheus_client_the_command_and_the_view_say_which_extra() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "import django; django.setup()\n"
        "from django.core.management import call_command\n"
        "from django.test import Client, override_settings\n"
        "with override_settings(ROOT_URLCONF='tests.metrics_urls', ALLOWED_HOSTS=['*']):\n"
        "    response = Client().get('/metrics')\n"
        "print(response.status_code, response.content.decode().strip())\n"
        "call_command('runs_metrics')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.startswith(
        "501 needs prometheus-client: pip install runs_app[prometheus]"
    ), done.stderr
    assert done.returncode == 1
    assert "CommandError: needs prometheus-client: pip install runs_app[prometheus]" in (
        done.stderr
    )


def test_opentelemetry_gauges_observe_the_same_facts() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    assert metrics.register_otel_gauges(cache_seconds=0, meter_provider=provider)
    assert metrics.register_otel_gauges(meter_provider=provider)  # once per provider

    def observed() -> dict[tuple[str, tuple[tuple[str, Any], ...]], Any]:
        data = reader.get_metrics_data()
        assert data is not None
        return {
            (metric.name, tuple(sorted((point.attributes or {}).items()))): cast(
                "NumberDataPoint", point
            ).value
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            for point in metric.data.data_points
        }

    services.create_run("repos", events=[{"type": "x"}])
    first = observed()
    assert first[("runs_app.outbox.pending_events", ())] == 2
    assert first[("runs_app.runs", (("scope", "repos"), ("status", "active")))] == 1
    relay.drain_outbox_once(publisher=MemoryPublisher())
    assert observed()[("runs_app.outbox.pending_events", ())] == 0
    provider.shutdown()


# --- InstrumentedPublisher --------------------------------------------------------------------


def test_instrumented_publisher_counts_and_traces_any_publisher(
    spans: InMemorySpanExporter,
) -> None:
    name = f"relay-{uuid.uuid4().hex[:8]}"
    publisher = load_publisher(
        "runs_app.publish_metrics.InstrumentedPublisher",
        {
            "publisher": "runs_app.publishers.LoggingPublisher",
            "options": {"level": "DEBUG"},
            "relay": name,
        },
    )
    assert isinstance(publisher, InstrumentedPublisher)
    run = services.create_run("repos", events=[{"type": "x"}])
    spans.clear()  # create_run's span (tests/test_service_spans.py)
    relay.drain_outbox_for_run(run, publisher=publisher)

    def sample(metric: str) -> float | None:
        return REGISTRY.get_sample_value(metric, {"relay": name})

    assert sample("runs_app_published_messages_total") == 2
    assert sample("runs_app_publish_duration_seconds_count") == 1
    (span,) = spans.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["messaging.system"] == "LoggingPublisher"
    assert span.attributes["messaging.batch.message_count"] == 2

    failing = InstrumentedPublisher("runs_app.testing.MemoryPublisher", relay=name)
    assert isinstance(failing.inner, MemoryPublisher)
    failing.inner.fail_with = RuntimeError("down")
    with pytest.raises(RuntimeError, match="down"):
        failing.publish(relay.read_pending(run.id, 1, 10))
    assert sample("runs_app_publish_failures_total") == 1


def test_instrumented_publisher_refuses_what_its_publisher_refuses() -> None:
    with pytest.raises(PublisherError, match="level"):
        load_publisher(
            "runs_app.publish_metrics.InstrumentedPublisher",
            {"publisher": "runs_app.publishers.LoggingPublisher", "options": {"level": "LOUD"}},
        )
    with pytest.raises(PublisherError, match="relay must be"):
        load_publisher(
            "runs_app.publish_metrics.InstrumentedPublisher",
            {"publisher": "runs_app.publishers.LoggingPublisher", "relay": ""},
        )
