"""Concurrency with real threads, each on its own database connection.

PostgreSQL: the full races. SQLite (IMMEDIATE transactions on a file database): light versions,
where writers queue on the database lock.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db import transaction

from runs_app import services
from runs_app.exceptions import RunAlreadyExists, RunInProgress
from runs_app.models import Run, RunEvent, RunState, RunStatus
from runs_app.services import Event
from tests.factories import RunFactory
from tests.helpers import run_in_threads

pytestmark = pytest.mark.django_db(transaction=True)


class Rollback(Exception):
    pass


def append_race(threads: int, rounds: int) -> None:
    """``threads`` appenders, ``rounds`` appends each of 1..3 events; every third append is rolled
    back on purpose after it got its seqs. Committed seqs must be exactly 1..n."""
    run = RunFactory.create()

    def appender(thread: int) -> list[tuple[str, list[int]]]:
        committed: list[tuple[str, list[int]]] = []
        for round_ in range(rounds):
            size = 1 + (thread + round_) % 3
            tag = f"{thread}-{round_}"
            events = [Event("race", {"tag": tag, "i": i}) for i in range(size)]
            if (thread + round_) % 3 == 0:
                with pytest.raises(Rollback), transaction.atomic():
                    appended = services.append_events(run.id, events)
                    assert len(appended) == size
                    raise Rollback
            else:
                appended = services.append_events(run.id, events)
                committed.append((tag, [event.seq for event in appended]))
        return committed

    results = run_in_threads(appender, threads)
    committed = {tag: seqs for result in results for tag, seqs in result}
    total = sum(len(seqs) for seqs in committed.values())
    assert total > 0
    assert any((t + r) % 3 == 0 for t in range(threads) for r in range(rounds))

    events = list(RunEvent.objects.filter(run=run).order_by("seq"))
    assert [event.seq for event in events] == list(range(1, total + 2))  # no gap, no duplicate
    assert Run.objects.get(pk=run.pk).last_seq == total + 1
    # Each append got a contiguous block of seqs, and exactly the committed events are stored.
    for seqs in committed.values():
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    stored: dict[str, list[int]] = {}
    for event in events[1:]:
        stored.setdefault(event.payload["tag"], []).append(event.seq)
    assert stored == committed


@pytest.mark.postgresql
def test_eight_appenders_get_seqs_without_gaps_postgresql() -> None:
    append_race(threads=8, rounds=6)


def test_four_appenders_get_seqs_without_gaps_sqlite() -> None:
    append_race(threads=4, rounds=3)


def ensure_race(threads: int) -> None:
    def ensurer(_: int) -> tuple[str, bool]:
        run, created = services.ensure_run("contested", scope="race", metadata={"by": _})
        return run.id, created

    results = run_in_threads(ensurer, threads)
    assert {run_id for run_id, _ in results} == {"contested"}
    assert sum(created for _, created in results) == 1
    assert Run.objects.count() == 1
    assert RunEvent.objects.filter(run_id="contested").count() == 1  # one run.started
    assert RunState.objects.get(run_id="contested").status == RunStatus.ACTIVE


@pytest.mark.postgresql
def test_racing_ensure_run_creates_once_postgresql() -> None:
    ensure_race(threads=8)


def test_racing_ensure_run_creates_once_sqlite() -> None:
    ensure_race(threads=4)


def create_race(threads: int) -> None:
    def creator(index: int) -> str:
        try:
            services.create_run("one-scope", run_id=f"run-{index}", events=[Event("x")])
        except RunInProgress as exc:
            assert exc.active_run_id.startswith("run-")
            return "in_progress"
        return "created"

    results = run_in_threads(creator, threads)
    assert sorted(results) == ["created"] + ["in_progress"] * (threads - 1)
    winner = Run.objects.get()
    assert winner.id == f"run-{results.index('created')}"
    assert winner.last_seq == 2
    assert RunEvent.objects.count() == 2
    assert RunState.objects.filter(status=RunStatus.ACTIVE).count() == 1


@pytest.mark.postgresql
def test_racing_create_run_in_one_scope_postgresql() -> None:
    create_race(threads=8)


def test_racing_create_run_in_one_scope_sqlite() -> None:
    create_race(threads=4)


@pytest.mark.postgresql
def test_racing_create_run_with_one_id_postgresql() -> None:
    def creator(index: int) -> Any:
        try:
            return services.create_run(f"scope-{index}", run_id="same-id").scope
        except RunAlreadyExists:
            return None

    results = run_in_threads(creator, 8)
    assert sum(result is not None for result in results) == 1
    assert Run.objects.get().scope in results
