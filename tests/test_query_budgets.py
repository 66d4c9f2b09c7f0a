"""Query budgets of the hot paths: counts of statements, never timings.

A bulk path costs a constant number of statements per batch whatever the batch holds: a flush per
batch of projects, ``append_events`` per call whatever the number of events, the relay per
claim/publish/ack cycle whatever the number of events in it. A regression to a statement per row
shows up here as a count that grows with the rows. (The speed itself is measured by bench/run.py.)

The APIs come from the data-management and relay branches; they are imported inside the tests so
that a missing one fails its own tests only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from runs_app import services
from runs_app.exceptions import RunClosed
from runs_app.models import Project, Run, RunEvent
from tests.helpers import assert_atomic_under_faults


def statements(action: Callable[[], Any]) -> tuple[int, list[str]]:
    """How many statements ``action`` sends to the database, and which."""
    with CaptureQueriesContext(connection) as captured:
        action()
    return len(captured.captured_queries), [query["sql"] for query in captured.captured_queries]


def projects(start: int, count: int) -> Iterator[dict[str, Any]]:
    for index in range(start, start + count):
        yield {"key": f"p{index:05d}", "name": f"Project {index}", "data": {"n": index}}


class RecordingPublisher:
    """Keeps what it is given, so the test can check the work was really done."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    def publish(self, messages: Sequence[Any]) -> None:
        self.batches.append(list(messages))

    @property
    def count(self) -> int:
        return sum(len(batch) for batch in self.batches)


# --- flush_projects ----------------------------------------------------------------------------


def flush_statements(scope: str, rows: int, batch_size: int, *, start: int = 0) -> int:
    from runs_app.services import flush_projects

    run = services.create_run(scope)
    count, _ = statements(lambda: flush_projects(run, projects(start, rows), batch_size=batch_size))
    assert Project.objects.filter(scope=scope, last_seen_run=run).count() == rows
    return count


@pytest.mark.django_db(transaction=True)
def test_flush_costs_a_constant_number_of_statements_per_batch() -> None:
    one, three, five = (
        flush_statements(f"batches-{n}", rows=10 * n, batch_size=10) for n in (1, 3, 5)
    )
    per_batch = (three - one) // 2
    assert per_batch > 0
    assert three - one == five - three == 2 * per_batch, (one, three, five)
    # The fixed part (opening the session, closing it) is small, and so is each batch.
    # (The model's ledger line is written when the session opens and when it closes.)
    assert one - per_batch <= 18, f"fixed part of a flush: {one - per_batch} statements"
    assert per_batch <= 10, f"{per_batch} statements per batch"


@pytest.mark.django_db(transaction=True)
def test_flush_batch_cost_does_not_grow_with_its_rows() -> None:
    small = flush_statements("rows-10", rows=10, batch_size=10)
    large = flush_statements("rows-200", rows=200, batch_size=200)
    assert small == large


@pytest.mark.django_db(transaction=True)
def test_flush_update_pass_costs_what_an_insert_pass_costs() -> None:
    scope = "update-pass"
    inserted = flush_statements(scope, rows=30, batch_size=10)
    services.complete_run(Run.objects.get(scope=scope))
    # Second run: 20 of its 30 keys exist (updates), 10 are new.
    mixed = flush_statements(scope, rows=30, batch_size=10, start=10)
    assert mixed == inserted
    assert Project.objects.filter(scope=scope).count() == 40


# --- append_events -----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_append_events_costs_the_same_for_1_or_many_events() -> None:
    # SQLite caps a statement at 999 variables, so Django splits a bulk insert of events there
    # every 142 rows (7 columns): up to that size the count is the same on both databases.
    sizes = (1, 10, 100) + ((1000,) if connection.vendor == "postgresql" else ())
    run = services.create_run("append-budget")
    counts = {}
    for n in sizes:
        events = [{"type": "budget.event", "payload": {"i": i}} for i in range(n)]
        counts[n], _ = statements(partial(services.append_events, run, events))
    assert len(set(counts.values())) == 1, counts
    assert counts[1] <= 4, f"append_events: {counts[1]} statements"
    assert RunEvent.objects.filter(run=run).count() == 1 + sum(sizes)


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_an_append_outside_a_transaction_is_one_statement_and_all_or_nothing() -> None:
    """In autocommit the append is its one statement: no BEGIN, no COMMIT round trip. Failing
    it writes nothing; a closed run still gets RunClosed and nothing."""
    run = services.create_run("append-alone")
    count, sql = statements(partial(services.append_events, run, [{"type": "a"}]))
    assert (count, sql[0].split()[0]) == (1, "WITH"), sql
    # Its one statement failed: no table changed; then it runs to the end.
    assert assert_atomic_under_faults(lambda: services.append_events(run, [{"type": "b"}])) == 1
    assert Run.objects.get(pk=run.pk).last_seq == 3  # run.started, a, b
    services.complete_run(run)
    with pytest.raises(RunClosed):
        services.append_events(run, [{"type": "late"}])
    assert [event.type for event in services.list_events(run)] == [
        "run.started",
        "a",
        "b",
        "run.completed",
    ]


# --- drain_outbox_once -------------------------------------------------------------------------


def seed(prefix: str, runs: int, events_per_run: int) -> list[Run]:
    """Runs with ``events_per_run`` pending events each (``run.started`` included)."""
    created = []
    for index in range(runs):
        run = services.create_run(f"{prefix}-{index}")
        extra = [{"type": "budget.event", "payload": {"i": i}} for i in range(events_per_run - 1)]
        if extra:
            services.append_events(run, extra)
        created.append(run)
    return created


def drain_statements(batch_size: int) -> tuple[int, RecordingPublisher]:
    from runs_app.relay import drain_outbox_once

    publisher = RecordingPublisher()
    count, _ = statements(lambda: drain_outbox_once(publisher=publisher, batch_size=batch_size))
    return count, publisher


@pytest.mark.django_db(transaction=True)
def test_a_drain_cycle_costs_the_same_for_few_or_many_events() -> None:
    seed("few", runs=2, events_per_run=2)
    few, few_published = drain_statements(batch_size=100)
    assert few_published.count == 4

    seed("many", runs=2, events_per_run=60)
    many, many_published = drain_statements(batch_size=100)
    assert many_published.count == 120
    assert [len(batch) for batch in many_published.batches] == [60, 60]
    assert many == few


@pytest.mark.django_db(transaction=True)
def test_a_drain_cycle_costs_the_same_for_one_or_many_runs() -> None:
    counts = []
    for runs in (1, 2, 3):
        seed(f"runs{runs}", runs=runs, events_per_run=5)
        count, published = drain_statements(batch_size=100)
        assert published.count == 5 * runs
        counts.append(count)
    # One read and one acknowledgement for the whole claim: nothing grows with the runs.
    assert counts[0] == counts[1] == counts[2], counts
    assert counts[0] <= 10, f"{counts[0]} statements per claim/publish/ack cycle"


@pytest.mark.django_db(transaction=True)
def test_a_full_batch_leaves_the_rest_for_the_next_cycle_at_the_same_cost() -> None:
    seed("batched", runs=1, events_per_run=25)
    first, first_published = drain_statements(batch_size=10)
    second, second_published = drain_statements(batch_size=10)
    assert first_published.count == second_published.count == 10
    assert first == second
    third, third_published = drain_statements(batch_size=10)
    idle, idle_published = drain_statements(batch_size=10)
    assert third_published.count == 5
    assert third == first
    assert idle_published.count == 0
    assert idle < first  # nothing to claim: the claim alone
