"""NatsPublisher against the machine's real NATS server with JetStream (127.0.0.1:4222).

Every test uses its own stream and subject prefix (deleted afterwards) and never stops the
server. Not PostgreSQL-only, except the relay killed mid-batch: these run in the SQLite and the
PostgreSQL pass alike, and fail (never skip) when the server is down.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from runs_app import checks, relay, services
from runs_app.exceptions import InvalidInput, PublisherError
from runs_app.models import Run, RunEvent, RunOutbox, RunState, RunStatus
from runs_app.nats_publisher import NatsPublisher, NatsPublishError
from runs_app.publishers import load_publisher, rfc3339
from tests.nats_helpers import NATS_URL, JetStreamAdmin, Stored
from tests.relay_helpers import (
    ROOT,
    Relay,
    assert_cursor_invariant,
    database_url,
    relay_env,
    seed_runs,
    start_relay,
    stop_all,
    wait_until,
)
from tests.test_kombu_publisher import closed_port

pytestmark = pytest.mark.django_db

NATS = "runs_app.nats_publisher.NatsPublisher"


@pytest.fixture
def stream() -> Iterator[JetStreamAdmin]:
    admin = JetStreamAdmin()
    admin.create()
    yield admin
    admin.delete()


@pytest.fixture
def make_publisher(stream: JetStreamAdmin) -> Iterator[Any]:  # a factory, all closed afterwards
    built: list[NatsPublisher] = []

    def make(**options: Any) -> NatsPublisher:
        publisher = NatsPublisher(
            **{"servers": NATS_URL, "subject": stream.subject, "connect_timeout": 3, **options}
        )
        built.append(publisher)
        return publisher

    yield make
    for publisher in built:
        publisher.close()


def make_run(events: int, scope: str = "billing", run_id: str | None = None) -> Run:
    """A run with ``events`` events after ``run.started``; an active run of the same scope is
    completed first (one active run per scope)."""
    active = RunState.objects.filter(scope=scope, status=RunStatus.ACTIVE).first()
    if active is not None:
        services.complete_run(active.run_id)
    return services.create_run(
        scope,
        run_id=run_id or f"nats-{uuid.uuid4().hex[:8]}",
        events=[{"type": "invoice.sent", "payload": {"n": n, "text": "é"}} for n in range(events)],
    )


def events_of(run: Run) -> list[RunEvent]:
    return list(RunEvent.objects.filter(run=run).order_by("seq"))


def pending(run: Run) -> int:
    return RunEvent.objects.filter(run=run, published_at__isnull=True).count()


def per_run(stored: list[Stored]) -> dict[str, list[int]]:
    seqs: dict[str, list[int]] = defaultdict(list)
    for message in stored:
        run_id, seq = message.run_seq
        seqs[run_id].append(seq)
    return dict(seqs)


# --- delivery --------------------------------------------------------------------------------


@pytest.mark.parametrize("body", ["cloudevent", "payload"])
def test_a_consumer_reads_every_message_of_a_drained_run_in_order(
    body: str, stream: JetStreamAdmin, make_publisher: Any
) -> None:
    run = make_run(events=6)
    services.complete_run(run)
    publisher = make_publisher(body=body, stream=stream.name)

    result = relay.drain_outbox_for_run(run, publisher=publisher, batch_size=3)

    events = events_of(run)
    assert result.published == len(events) == 8
    stored = stream.read(len(events))
    assert len(stored) == len(events)
    for got, event in zip(stored, events, strict=True):
        assert got.subject == f"{stream.prefix}.billing.{run.id}.{event.type}"
        assert got.headers == {
            "Nats-Msg-Id": f"{run.id}:{event.seq}",
            "Runs-App-Run-Id": run.id,
            "Runs-App-Seq": str(event.seq),
            "Runs-App-Scope": "billing",
            "Runs-App-Type": event.type,
            "Nats-Expected-Stream": stream.name,  # the stream option, kept by the server
        }
        if body == "payload":
            assert got.body == event.payload
        else:
            assert got.body == {
                "specversion": "1.0",
                "id": f"{run.id}:{event.seq}",
                "source": "/runs_app/billing",
                "type": event.type,
                "subject": run.id,
                "time": rfc3339(event.created_at),
                "datacontenttype": "application/json",
                "data": event.payload,
            }
    assert pending(run) == 0


def test_a_batch_published_again_is_absorbed_by_the_duplicate_window(
    stream: JetStreamAdmin, make_publisher: Any
) -> None:
    run = make_run(events=4)
    messages = relay.read_pending(run.id, 1, 10)
    publisher = make_publisher()
    publisher.publish(messages[:3])
    # What a relay does after dying mid-batch: the whole batch again, from the cursor.
    publisher.publish(messages)
    publisher.publish(messages)

    assert stream.count() == len(messages) == 5
    assert [got.run_seq[1] for got in stream.read(5)] == [1, 2, 3, 4, 5]


def test_one_connection_and_one_event_loop_serve_every_publish_until_closed(
    stream: JetStreamAdmin, make_publisher: Any
) -> None:
    run = make_run(events=4)
    publisher = make_publisher()
    relay.drain_outbox_once(publisher=publisher, batch_size=2, run_id=run.id)
    loop, client = publisher._loop, publisher._client
    assert loop is not None and client is not None and client.is_connected
    relay.drain_outbox_for_run(run, publisher=publisher, batch_size=2)
    assert publisher._loop is loop and publisher._client is client
    assert [got.run_seq[1] for got in stream.read(5)] == [1, 2, 3, 4, 5]

    publisher.close()
    assert loop.is_closed() and client.is_closed
    assert publisher._loop is None and publisher._client is None
    publisher.close()  # twice is fine
    # A closed publisher publishes again on a new loop and connection.
    again = make_run(events=0)
    assert relay.drain_outbox_for_run(again, publisher=publisher).published == 1
    assert publisher._loop is not None and publisher._loop is not loop


def test_a_connection_closed_under_the_publisher_is_made_afresh(
    stream: JetStreamAdmin, make_publisher: Any
) -> None:
    run = make_run(events=2)
    publisher = make_publisher()
    relay.drain_outbox_once(publisher=publisher, batch_size=1, run_id=run.id)
    first = publisher._client
    publisher._run(first.close())  # as after the server dropped it (no reconnect in the client)
    assert first.is_closed

    relay.drain_outbox_for_run(run, publisher=publisher)

    assert publisher._client is not first and publisher._client.is_connected
    assert [got.run_seq[1] for got in stream.read(3)] == [1, 2, 3]


def test_publishing_from_a_thread_with_a_running_loop_is_refused_clearly(
    make_publisher: Any,
) -> None:
    run = make_run(events=0)
    messages = relay.read_pending(run.id, 1, 10)
    publisher = make_publisher()

    async def inside() -> None:
        publisher.publish(messages)

    with pytest.raises(RuntimeError, match="from a thread that is not running another loop"):
        asyncio.run(inside())
    assert pending(run) == 1


# --- failures --------------------------------------------------------------------------------


def test_an_unreachable_server_keeps_the_events_pending_until_it_answers(
    stream: JetStreamAdmin, make_publisher: Any
) -> None:
    run = make_run(events=2)
    down = make_publisher(servers=f"nats://127.0.0.1:{closed_port()}")

    result = relay.drain_outbox_once(publisher=down, run_id=run.id)

    assert result.failed_runs == (run.id,) and result.published == 0
    outbox = RunOutbox.objects.get(run=run)
    assert outbox.attempts == 1 and outbox.next_seq == 1
    assert "NatsPublishError: NATS unreachable: cannot connect to nats://127.0.0.1:" in (
        outbox.last_error
    )
    assert pending(run) == 3 and stream.count() == 0

    services.retry_outbox(run)
    assert relay.drain_outbox_once(publisher=make_publisher(), run_id=run.id).published == 3
    assert [got.run_seq[1] for got in stream.read(3)] == [1, 2, 3]


def test_a_missing_stream_keeps_the_events_pending_until_it_exists(
    stream: JetStreamAdmin, make_publisher: Any
) -> None:
    run = make_run(events=1)
    elsewhere = f"nostream{uuid.uuid4().hex[:8]}.{{run_id}}.{{type}}"
    publisher = make_publisher(subject=elsewhere)

    with pytest.raises(NatsPublishError) as raised:
        publisher.publish(relay.read_pending(run.id, 1, 10))
    assert raised.value.reason == "no_stream"
    assert "no JetStream stream captures subject 'nostream" in str(raised.value)

    result = relay.drain_outbox_once(publisher=publisher, run_id=run.id)
    assert result.failed_runs == (run.id,)
    assert "no JetStream stream captures" in RunOutbox.objects.get(run=run).last_error
    assert pending(run) == 2

    # The stream appears: the retry publishes everything, in order.
    services.retry_outbox(run)
    fixed = make_publisher()
    assert relay.drain_outbox_once(publisher=fixed, run_id=run.id).published == 2
    assert [got.run_seq[1] for got in stream.read(2)] == [1, 2]


def test_a_subject_captured_by_another_stream_is_refused(
    stream: JetStreamAdmin, make_publisher: Any
) -> None:
    run = make_run(events=0)
    publisher = make_publisher(stream="SOME_OTHER_STREAM")
    with pytest.raises(NatsPublishError) as raised:
        publisher.publish(relay.read_pending(run.id, 1, 10))
    assert raised.value.reason == "wrong_stream"
    assert "expected stream 'SOME_OTHER_STREAM'" in str(raised.value)


@pytest.mark.parametrize(
    ("scope", "run_id", "field", "needle"),
    [
        ("a.b", None, "scope", "contains '.'"),
        ("a b", None, "scope", "whitespace"),
        ("a*", None, "scope", "contains '*'"),
        ("billing", "r>1", "run_id", "contains '>'"),
    ],
)
def test_a_value_that_is_not_a_subject_token_fails_before_anything_is_sent(
    scope: str,
    run_id: str | None,
    field: str,
    needle: str,
    stream: JetStreamAdmin,
    make_publisher: Any,
) -> None:
    good = make_run(events=0, scope="good")
    bad = make_run(events=1, scope=scope, run_id=run_id)
    publisher = make_publisher()

    with pytest.raises(InvalidInput) as raised:
        publisher.publish(relay.read_pending(bad.id, 1, 10))
    assert raised.value.field == field and needle in str(raised.value)
    assert raised.value.limit == "one NATS subject token"

    relay.drain_outbox_once(publisher=publisher)
    assert pending(bad) == 2 and pending(good) == 0
    assert RunOutbox.objects.get(run=bad).last_error.startswith(f"InvalidInput: {field}: ")
    assert stream.count() == 1  # the good run's run.started only


def test_an_event_type_with_dots_spans_several_tokens(
    stream: JetStreamAdmin, make_publisher: Any
) -> None:
    run = make_run(events=0)
    services.append_events(run, [{"type": "a.b.c"}])
    publisher = make_publisher()
    relay.drain_outbox_for_run(run, publisher=publisher)
    assert [got.subject for got in stream.read(2)] == [
        f"{stream.prefix}.billing.{run.id}.run.started",
        f"{stream.prefix}.billing.{run.id}.a.b.c",
    ]
    services.append_events(run, [{"type": "a..b"}])
    with pytest.raises(InvalidInput, match="type: is empty"):
        publisher.publish(relay.read_pending(run.id, 1, 10))


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"servers": ""}, "servers must be"),
        ({"servers": []}, "servers must be"),
        ({"servers": [3]}, "servers must be"),
        ({"subject": 3}, "subject must be"),
        ({"subject": "a.{nope}"}, "unknown field {nope}"),
        ({"subject": "a.{seq:>4}"}, "takes no format spec"),
        ({"subject": "a..{seq}"}, "is not a NATS subject template"),
        ({"subject": "a.*.{seq}"}, "contains '*'"),
        ({"subject": "a b.{seq}"}, "whitespace"),
        ({"stream": "a.b"}, "stream: 'a.b' contains '.'"),
        ({"stream": "a/b"}, "path separator"),
        ({"body": "xml"}, "body must be"),
        ({"connect_timeout": 0}, "connect_timeout"),
        ({"publish_timeout": True}, "publish_timeout"),
        ({"name": "a b"}, "name must be"),
        ({"credentials": "/nonexistent.creds"}, "credentials"),
        ({"nope": 1}, "unexpected keyword argument 'nope'"),
    ],
)
def test_bad_options_are_refused_when_built(options: dict[str, Any], needle: str) -> None:
    with pytest.raises(PublisherError) as raised:
        load_publisher(NATS, options)
    assert needle in str(raised.value)
    with override_settings(RUNS_APP={"PUBLISHER": NATS, "PUBLISHER_OPTIONS": options}):
        assert [message.id for message in checks.check_publisher(None)] == ["runs_app.E021"]


def test_good_options_build_without_connecting_or_making_a_loop() -> None:
    url = f"nats://127.0.0.1:{closed_port()}"
    publisher = load_publisher(NATS, {"servers": [url], "subject": "x.{scope}", "stream": "S"})
    assert isinstance(publisher, NatsPublisher)
    assert publisher._loop is None and publisher._client is None
    with override_settings(RUNS_APP={"PUBLISHER": NATS, "PUBLISHER_OPTIONS": {"servers": url}}):
        assert checks.check_publisher(None) == []
    publisher.close()


def test_a_missing_nats_py_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nats", None)  # what `import nats` sees when absent
    with pytest.raises(PublisherError) as raised:
        load_publisher(NATS, {})
    assert "pip install runs_app[nats]" in str(raised.value)


@pytest.mark.django_db(transaction=True)  # the subprocess's job writes to the test database
def test_importing_runs_app_never_needs_nats_prometheus_or_opentelemetry() -> None:
    code = (
        "import sys\n"
        "for name in ('nats', 'prometheus_client', 'opentelemetry'): sys.modules[name] = None\n"
        "import django; django.setup()\n"
        "import runs_app.nats_publisher, runs_app.publish_metrics, runs_app.metrics\n"
        "from runs_app import tracing, publish_metrics, services\n"
        "assert not tracing.enabled()\n"
        "publish_metrics.record_publish('r', messages=1, seconds=0.1, failed=False)\n"
        # The service spans cost nothing: the functions are not even wrapped.
        "assert not hasattr(services.create_run, '__wrapped__')\n"
        "assert not hasattr(services.FlushSession._write_batch, '__wrapped__')\n"
        "for _ in range(2):\n"
        "    with services.track_run('no-otel') as run:\n"
        "        services.append_events(run, [{'type': 'no-otel.seen'}])\n"
        "        services.flush_projects(run, [{'key': 'k', 'name': 'n', 'data': {}}])\n"
        "    services.safe_cleanup_old_projects(run)\n"
        "print('ok', run.id)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={
            **dict(__import__("os").environ),
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "DATABASE_URL": database_url(),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    word, run_id = done.stdout.split()
    assert word == "ok"
    run = Run.objects.select_related("state").get(pk=run_id)
    assert (run.scope, run.state.status, run.state.cleanup_status) == (
        "no-otel",
        "completed",
        "done",
    )
    assert list(RunEvent.objects.filter(run=run, type="no-otel.seen").values_list("seq", flat=True))


# --- traces and publish counters ---------------------------------------------------------------


def test_a_span_around_each_publish_and_its_context_in_every_message(
    stream: JetStreamAdmin, make_publisher: Any, spans: InMemorySpanExporter
) -> None:
    run = make_run(events=1)
    spans.clear()  # create_run's span (tests/test_service_spans.py)
    publisher = make_publisher()
    tracer = trace.get_tracer("the caller")
    with tracer.start_as_current_span("sync job") as caller:
        relay.drain_outbox_for_run(run, publisher=publisher)

    publish, _job = spans.get_finished_spans()
    assert publish.name == "runs_app publish" and publish.kind == trace.SpanKind.PRODUCER
    assert publish.parent is not None
    assert publish.parent.span_id == caller.get_span_context().span_id
    assert publish.attributes is not None
    assert dict(publish.attributes) == {
        "messaging.system": "nats",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.batch.message_count": 2,
        "messaging.destination.template": stream.subject,
        "runs_app.run_id": run.id,
        "runs_app.scope": "billing",
        "runs_app.seq.first": 1,
        "runs_app.seq.last": 2,
    }
    context = publish.get_span_context()
    assert context is not None
    flags = int(context.trace_flags)
    traceparent = f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}"
    for got in stream.read(2):
        assert got.body["traceparent"] == traceparent  # the CloudEvents extension attribute
        assert got.headers["traceparent"] == traceparent


def test_a_failed_publish_is_recorded_on_its_span(
    make_publisher: Any, spans: InMemorySpanExporter
) -> None:
    run = make_run(events=0)
    spans.clear()  # create_run's span (tests/test_service_spans.py)
    publisher = make_publisher(servers=f"nats://127.0.0.1:{closed_port()}")
    relay.drain_outbox_once(publisher=publisher, run_id=run.id)
    (publish,) = spans.get_finished_spans()
    assert publish.status.status_code == trace.StatusCode.ERROR
    assert [event.name for event in publish.events] == ["exception"]


def test_without_a_tracer_provider_no_trace_context_is_added(
    stream: JetStreamAdmin, make_publisher: Any
) -> None:
    run = make_run(events=0)
    relay.drain_outbox_for_run(run, publisher=make_publisher())
    (got,) = stream.read(1)
    assert "traceparent" not in got.body and "traceparent" not in got.headers


def test_publish_counters_per_relay(stream: JetStreamAdmin, make_publisher: Any) -> None:
    name = f"relay-{uuid.uuid4().hex[:8]}"

    def sample(metric: str) -> float:
        return REGISTRY.get_sample_value(metric, {"relay": name}) or 0.0

    run = make_run(events=2)
    relay.drain_outbox_for_run(run, publisher=make_publisher(name=name), batch_size=2)
    assert sample("runs_app_published_messages_total") == 3
    assert sample("runs_app_publish_duration_seconds_count") == 2
    assert sample("runs_app_publish_failures_total") == 0

    down = make_publisher(name=name, servers=f"nats://127.0.0.1:{closed_port()}")
    relay.drain_outbox_once(publisher=down, run_id=make_run(events=0).id)
    assert sample("runs_app_publish_failures_total") == 1
    assert sample("runs_app_published_messages_total") == 3
    assert sample("runs_app_publish_duration_seconds_count") == 3


# --- a real relay, killed mid-batch ------------------------------------------------------------


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_a_relay_killed_mid_batch_feeds_the_stream_every_event_once_in_order(
    stream: JetStreamAdmin, tmp_path: Path
) -> None:
    runs, events = 12, 8
    ids = seed_runs(runs, events, prefix="nk")
    env = relay_env(
        tmp_path,
        DJANGO_SETTINGS_MODULE="tests.nats_relay_settings",
        NATS_TEST_SUBJECT=stream.subject,
        NATS_TEST_STREAM=stream.name,
        NATS_TEST_DELAY="0.01",
        RELAY_TEST_BATCH_SIZE="6",
        RELAY_TEST_LEASE_SECONDS="1",
    )
    first = start_relay(tmp_path, "--interval", "0.05", env=env)
    relays: list[Relay] = [first]
    try:
        # Kill once the stream holds messages the database has not acknowledged yet.
        wait_until(
            lambda: stream.count() >= 8 and stream.count() > published_count() + 2,
            60,
            "the relay to be mid-batch",
        )
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(30)
        in_stream, acknowledged = stream.count(), published_count()
        assert in_stream > acknowledged, (in_stream, acknowledged)
        assert acknowledged < runs * events

        second = start_relay(tmp_path, "--interval", "0.05", env=env)
        relays.append(second)
        wait_until(lambda: published_count() == runs * events, 60, "every event to be published")
        assert second.stop(signal.SIGTERM) == 0, second.output()
    finally:
        stop_all(relays)

    stored = stream.read(runs * events)
    # Every event once (the re-sent ones were absorbed by Nats-Msg-Id), each run in seq order.
    assert stream.count() == len(stored) == runs * events
    assert per_run(stored) == {run_id: list(range(1, events + 1)) for run_id in ids}
    assert not RunOutbox.objects.filter(lease_token__isnull=False).exists()
    assert_cursor_invariant()


def published_count() -> int:
    return RunEvent.objects.filter(published_at__isnull=False).count()
