"""KombuPublisher against the machine's real RabbitMQ (127.0.0.1:5672) and Redis (127.0.0.1:6379).

Every test uses its own exchange and queue (deleted afterwards) and never stops the servers;
a broker-side drop closes only the test publisher's own connection. Not PostgreSQL-only: these
run in the SQLite and the PostgreSQL pass alike.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.test import override_settings
from kombu import Connection, Consumer, Exchange, Queue

from runs_app import checks, relay, services
from runs_app.exceptions import PublisherError
from runs_app.models import Run, RunEvent, RunOutbox
from runs_app.publishers import KombuPublisher, load_publisher, rfc3339
from tests.relay_helpers import ROOT

pytestmark = pytest.mark.django_db

BROKERS = {
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//",
    "redis": "redis://127.0.0.1:6379/0",
}
KOMBU = "runs_app.publishers.KombuPublisher"


@dataclass(frozen=True)
class Received:
    body: Any
    message_id: str
    headers: dict[str, Any]
    routing_key: str
    delivery_mode: int | None
    content_type: str | None


class BoundQueue:
    """A durable queue bound to a test exchange (declared like the publisher declares it)."""

    def __init__(self, url: str, exchange: str, binding: str = "#") -> None:
        self.connection = Connection(url, connect_timeout=5)
        self.exchange = Exchange(exchange, type="topic", durable=True)
        self.queue = Queue(
            f"{exchange}.q", exchange=self.exchange, routing_key=binding, durable=True
        )
        self.channel = self.connection.channel()
        self.queue(self.channel).declare()
        self.received: list[Received] = []

    def _on_message(self, body: Any, message: Any) -> None:
        self.received.append(
            Received(
                body,
                message.properties.get("message_id"),
                dict(message.headers),
                message.delivery_info.get("routing_key"),
                message.properties.get("delivery_mode"),
                message.content_type,
            )
        )
        message.ack()

    def receive(self, count: int, timeout: float = 20) -> list[Received]:
        """Everything received so far, once at least ``count`` messages are; fails after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with Consumer(
            self.channel, queues=[self.queue], callbacks=[self._on_message], accept=["json"]
        ):
            while len(self.received) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"received {len(self.received)} of {count} messages")
                try:
                    self.connection.drain_events(timeout=min(remaining, 1.0))
                except TimeoutError:
                    continue
        return self.received

    def delete(self) -> None:
        try:
            channel = self.connection.channel()
            self.queue(channel).delete()
            self.exchange(channel).delete()
        finally:
            self.connection.close()


@pytest.fixture(params=sorted(BROKERS))
def broker(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def exchange() -> str:
    return f"runs_app_test_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def queue(broker: str, exchange: str) -> Iterator[BoundQueue]:
    bound = BoundQueue(BROKERS[broker], exchange)
    yield bound
    bound.delete()


@pytest.fixture
def connection_name(exchange: str) -> str:
    return f"{exchange}-publisher"


@pytest.fixture
def make_publisher(
    broker: str, exchange: str, connection_name: str
) -> Iterator[Any]:  # a factory of publishers, all closed after the test
    built: list[KombuPublisher] = []

    def make(**options: Any) -> KombuPublisher:
        options = {
            "url": BROKERS[broker],
            "exchange": exchange,
            "connection_name": connection_name,
            "connect_timeout": 3,
            **options,
        }
        publisher = KombuPublisher(**options)
        built.append(publisher)
        return publisher

    yield make
    for publisher in built:
        publisher.close()


def make_run(events: int) -> Run:
    return services.create_run(
        "billing",
        run_id=f"kombu-{uuid.uuid4().hex[:8]}",
        metadata={"source": "test"},
        events=[{"type": "invoice.sent", "payload": {"n": n, "text": "é"}} for n in range(events)],
    )


def events_of(run: Run) -> list[RunEvent]:
    return list(RunEvent.objects.filter(run=run).order_by("seq"))


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def assert_at_least_once_in_order(seqs: list[int], last: int) -> None:
    """Every seq 1..last received; each message is the next seq or a restart at an earlier
    one (a batch published again), never a jump forward."""
    assert seqs[0] == 1, seqs
    for previous, current in itertools.pairwise(seqs):
        assert current == previous + 1 or current <= previous, seqs
    assert set(seqs) == set(range(1, last + 1)), seqs


# --- delivery --------------------------------------------------------------------------------


@pytest.mark.parametrize("body", ["cloudevent", "payload"])
def test_consumer_receives_every_message_of_a_drained_run_in_order(
    body: str, queue: BoundQueue, make_publisher: Any
) -> None:
    run = make_run(events=6)
    services.complete_run(run)
    publisher = make_publisher(body=body, routing_key="{scope}.{type}")

    result = relay.drain_outbox_for_run(run, publisher=publisher, batch_size=3)

    events = events_of(run)
    assert [event.type for event in events][-1] == "run.completed"
    assert result.published == len(events) == 8
    received = queue.receive(len(events))
    assert len(received) == len(events)
    for got, event in zip(received, events, strict=True):
        assert got.message_id == f"{run.id}:{event.seq}"
        assert got.headers == {
            "run_id": run.id,
            "seq": event.seq,
            "scope": "billing",
            "type": event.type,
        }
        assert got.routing_key == f"billing.{event.type}"
        assert got.delivery_mode == 2
        assert got.content_type == "application/json"
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
    assert not RunEvent.objects.filter(run=run, published_at__isnull=True).exists()


def test_one_connection_serves_every_publish_until_closed(
    queue: BoundQueue, make_publisher: Any
) -> None:
    run = make_run(events=4)
    publisher = make_publisher()
    relay.drain_outbox_once(publisher=publisher, batch_size=2, run_id=run.id)
    first = publisher._connection
    assert first is not None and first.connected
    relay.drain_outbox_for_run(run, publisher=publisher, batch_size=2)
    assert publisher._connection is first
    assert [got.headers["seq"] for got in queue.receive(5)] == [1, 2, 3, 4, 5]
    publisher.close()
    assert publisher._connection is None and not first.connected
    publisher.close()  # twice is fine


# --- failures --------------------------------------------------------------------------------


def test_closed_port_raises_and_events_stay_pending_until_the_url_works(
    broker: str, queue: BoundQueue, make_publisher: Any
) -> None:
    run = make_run(events=3)
    broken_url = BROKERS[broker].replace(
        ":5672/" if broker == "rabbitmq" else ":6379/", f":{closed_port()}/"
    )
    broken = make_publisher(url=broken_url)

    result = relay.drain_outbox_once(publisher=broken, run_id=run.id)

    assert result.failed_runs == (run.id,) and result.published == 0
    outbox = RunOutbox.objects.get(run=run)
    assert outbox.attempts == 1 and outbox.next_seq == 1
    assert "refused" in outbox.last_error.lower()
    assert RunEvent.objects.filter(run=run, published_at__isnull=True).count() == 4

    services.retry_outbox(run)
    working = make_publisher()
    assert relay.drain_outbox_once(publisher=working, run_id=run.id).published == 4
    assert [got.message_id for got in queue.receive(4)] == [
        f"{run.id}:{seq}" for seq in (1, 2, 3, 4)
    ]
    assert RunOutbox.objects.get(run=run).next_seq == 5


def drop_connection(broker: str, connection_name: str) -> int:
    """Close the publisher's connection(s) on the broker side; return how many were closed."""
    if broker == "rabbitmq":
        listing = subprocess.run(
            [
                "rabbitmqctl",
                "-q",
                "--no-table-headers",
                "list_connections",
                "pid",
                "client_properties",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        pids = [
            line.split("\t")[0] for line in listing.splitlines() if f'"{connection_name}"' in line
        ]
        for pid in pids:
            subprocess.run(
                ["rabbitmqctl", "-q", "close_connection", pid, "runs_app test: broker-side drop"],
                check=True,
                capture_output=True,
                timeout=60,
            )
        return len(pids)
    import redis

    client = redis.Redis.from_url(BROKERS["redis"])
    try:
        ids = [entry["id"] for entry in client.client_list() if entry["name"] == connection_name]
        for client_id in ids:
            client.client_kill_filter(_id=client_id)
        return len(ids)
    finally:
        client.close()


def test_broker_side_connection_drop_loses_nothing(
    broker: str, queue: BoundQueue, make_publisher: Any, connection_name: str
) -> None:
    run = make_run(events=5)  # seqs 1..6
    publisher = make_publisher()
    assert relay.drain_outbox_once(publisher=publisher, batch_size=2, run_id=run.id).published == 2

    assert drop_connection(broker, connection_name) >= 1
    # The next publish raises (RabbitMQ: CONNECTION_FORCED; the events stay pending and back
    # off) or reconnects by itself (redis-py retries a dropped socket); either way nothing is lost.
    after_drop = relay.drain_outbox_once(publisher=publisher, batch_size=2, run_id=run.id)
    assert after_drop.failed_runs in ((), (run.id,))
    if broker == "rabbitmq":
        assert after_drop.failed_runs == (run.id,)
        assert RunOutbox.objects.get(run=run).attempts == 1
    relay.drain_outbox_for_run(run, publisher=publisher, batch_size=2)

    assert RunOutbox.objects.get(run=run).next_seq == 7
    seqs = [got.headers["seq"] for got in queue.receive(6)]
    assert_at_least_once_in_order(seqs, 6)
    assert drop_connection(broker, connection_name) >= 1  # reconnected under the same name


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({}, "url"),
        ({"url": ""}, "url must be a non-empty string"),
        ({"url": "nope://x"}, "nope"),
        ({"url": BROKERS["redis"], "exchange": ""}, "exchange must be"),
        ({"url": BROKERS["redis"], "exchange_type": "x"}, "exchange_type"),
        ({"url": BROKERS["redis"], "routing_key": "{missing}"}, "routing_key"),
        ({"url": BROKERS["redis"], "routing_key": 3}, "routing_key"),
        ({"url": BROKERS["redis"], "body": "xml"}, "body"),
        ({"url": BROKERS["redis"], "serializer": "nope"}, "serializer"),
        ({"url": BROKERS["redis"], "connect_timeout": 0}, "connect_timeout"),
        ({"url": BROKERS["redis"], "publish_timeout": True}, "publish_timeout"),
        ({"url": BROKERS["redis"], "connection_name": "a b"}, "connection_name"),
    ],
)
def test_bad_options_are_refused_when_built(options: dict[str, Any], needle: str) -> None:
    with pytest.raises(PublisherError) as raised:
        load_publisher(KOMBU, options)
    assert needle in str(raised.value)
    with override_settings(RUNS_APP={"PUBLISHER": KOMBU, "PUBLISHER_OPTIONS": options}):
        assert [message.id for message in checks.check_publisher(None)] == ["runs_app.E021"]


def test_good_options_build_without_connecting() -> None:
    # A closed port: building (what the system check does) must not touch the broker.
    url = f"amqp://guest:guest@127.0.0.1:{closed_port()}//"
    publisher = load_publisher(KOMBU, {"url": url, "routing_key": "{scope}.{run_id}.{seq}"})
    assert isinstance(publisher, KombuPublisher)
    assert publisher.transport_options["confirm_publish"] is True
    assert publisher._connection is None
    publisher.close()


def test_a_missing_kombu_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kombu", None)  # what `import kombu` sees when absent
    with pytest.raises(PublisherError) as raised:
        load_publisher(KOMBU, {"url": BROKERS["rabbitmq"]})
    assert "pip install runs_app[kombu]" in str(raised.value)
    with override_settings(
        RUNS_APP={"PUBLISHER": KOMBU, "PUBLISHER_OPTIONS": {"url": BROKERS["rabbitmq"]}}
    ):
        (error,) = checks.check_publisher(None)
    assert error.id == "runs_app.E021" and "pip install runs_app[kombu]" in error.msg


def test_importing_the_publishers_never_needs_kombu() -> None:
    code = (
        "import sys; sys.modules['kombu'] = None; import runs_app.publishers as p; "
        "assert 'KombuPublisher' in dir(p); print('ok')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
