"""runs_app's side of each benchmark, through its public API only.

An operation that is not in this checkout (its branch not merged yet) is ``None`` here, and the
benchmark prints "n/a" for it instead of failing.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterable
from typing import Any

from django.db import connection
from django.test.utils import CaptureQueriesContext

from runs_app import services
from runs_app.models import Run

from .publishers import NoopPublisher


def find(*candidates: tuple[str, str]) -> Callable[..., Any] | None:
    """The first ``module.name`` that exists, or None. A module that exists but fails to import
    is an error, not an absence."""
    for module_name, attribute in candidates:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                continue
            raise
        found: Callable[..., Any] | None = getattr(module, attribute, None)
        if callable(found):
            return found
    return None


def flush_projects() -> Callable[..., Any] | None:
    return find(
        ("runs_app.services", "flush_projects"), ("runs_app.services.flush", "flush_projects")
    )


def safe_cleanup_old_projects() -> Callable[..., Any] | None:
    return find(
        ("runs_app.services", "safe_cleanup_old_projects"),
        ("runs_app.services.cleanup", "safe_cleanup_old_projects"),
    )


def drain_outbox_once() -> Callable[..., Any] | None:
    return find(("runs_app.relay", "drain_outbox_once"), ("runs_app.services", "drain_outbox_once"))


def confirms_on_complete() -> bool:
    """``complete_run`` confirms projects from the data-management branch on, which also brings
    ``flush_projects``; before it, completing confirms nothing and there is nothing to measure."""
    return flush_projects() is not None


def has_drain_command() -> bool:
    return importlib.util.find_spec("runs_app.management.commands.drain_outbox") is not None


def append_notifies(run: Run) -> bool:
    """Whether ``append_events`` wakes relays with ``pg_notify`` (the broker issue). The raw
    appender does the same when it does, so both sides pay for the same work."""
    with CaptureQueriesContext(connection) as queries:
        services.append_events(run, [{"type": "bench.probe", "payload": {}}])
    return any("notify" in query["sql"].lower() for query in queries.captured_queries)


def drain_all(drain_once: Callable[..., Any], publisher: Any = None) -> int:
    """Passes of ``drain_outbox_once`` until one publishes nothing; returns the events published."""
    publisher = publisher if publisher is not None else NoopPublisher()
    total = 0
    while True:
        result = drain_once(publisher=publisher)
        published = result.published
        count = published if isinstance(published, int) else len(published)
        if not count:
            return total
        total += count


def append_each(run: Run, events: Iterable[dict[str, Any]]) -> int:
    """One ``append_events`` call (one transaction) per event; returns the last seq."""
    seq = 0
    for event in events:
        seq = services.append_events(run, [event])[0].seq
    return seq
