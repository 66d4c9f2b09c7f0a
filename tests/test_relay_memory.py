"""Bounded memory: a claim's read stops at ``DRAIN_MAX_BYTES`` of payload (at least one event),
whatever the batch size and the payload sizes. Asserted through what each read returns."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest
from django.test import override_settings

from runs_app import relay, services
from runs_app.relay import drain
from runs_app.relay.read import Read, read_batches
from runs_app.testing import MemoryPublisher
from tests.relay_helpers import assert_cursor_invariant, pending_count

pytestmark = pytest.mark.django_db

BLOB = 20_000
BUDGET = 100_000


def payload_bytes(payload: Mapping[str, Any]) -> int:
    """The compact JSON text (SQLite stores it; PostgreSQL's jsonb text adds a space after each
    colon and comma)."""
    return len(json.dumps(payload, separators=(",", ":")).encode())


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Read]:
    seen: list[Read] = []
    real = read_batches

    def spy(*args: Any, **kwargs: Any) -> Read:
        read = real(*args, **kwargs)
        seen.append(read)
        return read

    monkeypatch.setattr(drain, "read_batches", spy)
    return seen


@override_settings(RUNS_APP={"DRAIN_MAX_BYTES": BUDGET})
def test_each_read_stays_within_the_byte_budget(reads: list[Read]) -> None:
    runs, events = 100, 3
    big = {"blob": "x" * BLOB}
    for index in range(runs):
        services.create_run(
            f"r{index:03d}",
            run_id=f"r{index:03d}",
            events=[{"type": "big", "payload": big}] * events,
        )
    publisher = MemoryPublisher()

    relay.drain_until_idle(publisher=publisher, batch_size=100)

    assert pending_count() == 0
    assert len(publisher.messages) == runs * (events + 1)
    per_event = payload_bytes(big)
    for read in reads:
        messages = [m for batch in read.batches.values() for m in batch]
        compact = sum(payload_bytes(m.payload) for m in messages)
        assert compact <= read.payload_bytes <= compact + 2 * len(messages)
        assert read.payload_bytes <= BUDGET  # no single event is larger than the budget
        assert sum(1 for m in messages if m.payload == big) <= BUDGET // per_event  # 4
    # Without the budget one read would hold 100 runs x 3 events (about 6 MB).
    assert max(read.payload_bytes for read in reads) > BUDGET - per_event
    assert len([read for read in reads if read.batches]) >= runs * events * per_event // BUDGET
    # Each run in seq order, once.
    per_run: dict[str, list[int]] = {}
    for message in publisher.messages:
        per_run.setdefault(message.run_id, []).append(message.seq)
    assert all(seqs == [1, 2, 3, 4] for seqs in per_run.values())
    assert_cursor_invariant()


@override_settings(RUNS_APP={"DRAIN_MAX_BYTES": BUDGET})
def test_the_runs_the_budget_left_unread_come_first_in_the_next_claim(reads: list[Read]) -> None:
    big = {"blob": "x" * BLOB}
    for name in ("a", "b", "c", "d", "e", "f", "g"):
        services.create_run(name, run_id=name, events=[{"type": "big", "payload": big}])
    publisher = MemoryPublisher()
    relay.drain_outbox_once(publisher=publisher)
    first = sorted(reads[-1].batches)
    assert reads[-1].cut and first == ["a", "b", "c", "d", "e"]  # "e": only run.started
    relay.drain_outbox_once(publisher=publisher)
    assert sorted(reads[-1].batches) == ["e", "f", "g"]  # from "e" on, first


@override_settings(RUNS_APP={"DRAIN_MAX_BYTES": 1000})
def test_an_event_larger_than_the_budget_still_moves(reads: list[Read]) -> None:
    run = services.create_run("a", run_id="a")
    services.append_events(run, [{"type": "huge", "payload": {"blob": "y" * 5000}}] * 2)
    publisher = MemoryPublisher()

    relay.drain_until_idle(publisher=publisher)

    assert [m.seq for m in publisher.messages] == [1, 2, 3]
    # run.started fits; each huge event then travels alone (over the budget, but one event).
    assert [len(batch) for read in reads for batch in read.batches.values()] == [1, 1, 1]
    assert reads[1].payload_bytes > 1000
    assert_cursor_invariant()


@override_settings(RUNS_APP={"DRAIN_MAX_BYTES": 1000})
def test_drain_outbox_for_run_goes_on_after_a_read_cut_by_the_budget() -> None:
    run = services.create_run("a", run_id="a")
    services.append_events(run, [{"type": "huge", "payload": {"blob": "y" * 600}}] * 3)
    publisher = MemoryPublisher()
    result = relay.drain_outbox_for_run(run, publisher=publisher)
    assert result.published == 4 and [m.seq for m in publisher.messages] == [1, 2, 3, 4]


def test_the_cut_at_the_budget_is_exact_at_each_boundary() -> None:
    # PostgreSQL sends the row that crosses the budget without its payload, as the marker of a
    # cut, and sends nothing after it; SQLite stops reading there. Same answers on both.
    run = services.create_run("a", run_id="a")
    services.append_events(run, [{"type": "e", "payload": {"n": "z" * n}} for n in (10, 20)])
    services.create_run("b", run_id="b")  # run.started only
    size = [read_batches([("a", seq)], 1, 10**9).payload_bytes for seq in (1, 2, 3)]
    everything = sum(size)

    def read(budget: int) -> tuple[list[int], int, bool]:
        result = read_batches([("a", 1)], 100, budget)
        seqs = [m.seq for m in result.batches.get("a", [])]
        return seqs, result.payload_bytes, result.cut

    assert read(everything) == ([1, 2, 3], everything, False)  # exactly full: no cut
    assert read(everything - 1) == ([1, 2], size[0] + size[1], True)
    assert read(size[0] + size[1]) == ([1, 2], size[0] + size[1], True)
    assert read(size[0]) == ([1], size[0], True)
    assert read(1) == ([1], size[0], True)  # the first event always, alone over the budget
    # A last event alone over the budget: nothing after it, so no cut.
    assert read_batches([("a", 3)], 100, 1).cut is False
    assert read_batches([("b", 1)], 100, 1).cut is False
    # Across runs, in claim order (run id): the run after the cut is not read at all.
    both = read_batches([("b", 1), ("a", 1)], 100, everything - 1)
    assert {run_id: [m.seq for m in batch] for run_id, batch in both.batches.items()} == {
        "a": [1, 2]
    }
    assert both.cut and both.payload_bytes == size[0] + size[1]
