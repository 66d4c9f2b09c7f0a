"""runs_app's side of each benchmark, through its public API only."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.db import connection
from django.test.utils import CaptureQueriesContext

from runs_app import relay, services
from runs_app.models import Run

from .publishers import NoopPublisher


def append_notifies(run: Run) -> bool:
    """Whether ``append_events`` wakes relays with ``pg_notify`` (the broker issue). The raw
    appender does the same when it does, so both sides pay for the same work."""
    with CaptureQueriesContext(connection) as queries:
        services.append_events(run, [{"type": "bench.probe", "payload": {}}])
    return any("notify" in query["sql"].lower() for query in queries.captured_queries)


def drain_pass(publisher: Any) -> int:
    """One relay pass (``drain_outbox_once``); returns the events it published. The one place
    bench/ calls the relay: a rename of the services API is a one-line change here."""
    return relay.drain_outbox_once(publisher=publisher).published


def drain_all(publisher: Any = None) -> int:
    """Passes of ``drain_outbox_once`` until one publishes nothing; returns the events published."""
    publisher = publisher if publisher is not None else NoopPublisher()
    total = 0
    while published := drain_pass(publisher):
        total += published
    return total


def append_each(run: Run, events: Iterable[dict[str, Any]]) -> int:
    """One ``append_events`` call (one transaction) per event; returns the last seq."""
    seq = 0
    for event in events:
        seq = services.append_events(run, [event])[0].seq
    return seq
