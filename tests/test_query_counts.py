"""Hot paths are bulk statements: the number of queries does not grow with the number of events."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from runs_app import services
from runs_app.services import Event
from tests.factories import RunFactory

pytestmark = pytest.mark.django_db


def queries_of(action: Callable[[], Any]) -> list[str]:
    with CaptureQueriesContext(connection) as captured:
        action()
    return [query["sql"] for query in captured.captured_queries]


def events(count: int) -> list[Event]:
    return [Event("e", {"i": i, "text": "x" * 50}) for i in range(count)]


def test_append_events_uses_a_constant_number_of_queries() -> None:
    run = RunFactory.create()
    counts = {
        n: len(queries_of(partial(services.append_events, run, events(n)))) for n in (1, 10, 100)
    }
    assert counts[1] == counts[10] == counts[100], counts
    # Inside the test's transaction: savepoint, UPDATE ... RETURNING, bulk insert, release.
    assert counts[1] <= 4, counts
    assert len(services.list_events(run)) == 1 + 1 + 10 + 100


def test_create_run_uses_a_constant_number_of_queries() -> None:
    without = queries_of(lambda: services.create_run("a"))
    with_events = queries_of(lambda: services.create_run("b", events=events(50)))
    assert len(without) == len(with_events), (without, with_events)
    assert sum(sql.startswith('INSERT INTO "runs_app_runevent"') for sql in with_events) == 1
