"""Fair claims: a run with new events is served within a few passes, whatever the backlog of
other runs (the relay's claims rotate through the runs with pending events)."""

from __future__ import annotations

import math

import pytest

from runs_app import relay, services
from runs_app.testing import MemoryPublisher
from tests.relay_helpers import assert_cursor_invariant, pending_count, seed_runs

pytestmark = pytest.mark.django_db


def test_new_events_do_not_wait_behind_a_standing_backlog_of_lower_runs() -> None:
    batch, backlog_runs, backlog_events = 10, 30, 50
    late = [f"z{index}" for index in range(5)]  # the highest run ids
    for run_id in late:
        services.create_run(run_id, run_id=run_id)
    publisher = MemoryPublisher()
    relay.drain_until_idle(publisher=publisher, batch_size=batch)  # the late runs were served
    backlog = seed_runs(backlog_runs, backlog_events, prefix="a")  # lower ids than every "z"
    for _ in range(4):  # a standing backlog, part-way through
        relay.drain_outbox_once(publisher=publisher, batch_size=batch)
    for run_id in late:
        services.append_events(run_id, [{"type": "late"}])

    def late_delivered() -> int:
        return sum(1 for message in publisher.messages if message.type == "late")

    passes = 0
    while late_delivered() < len(late):
        passes += 1
        assert passes <= 100, "never delivered"
        relay.drain_outbox_once(publisher=publisher, batch_size=batch)

    # One sweep of the runs with pending events at most (35 runs, 10 per pass), not the time
    # it takes to drain the backlog (30 runs x 50 events, 10 runs x 10 events per pass: 15).
    assert passes <= math.ceil((backlog_runs + len(late)) / batch)
    assert pending_count() > backlog_runs * backlog_events / 2  # the backlog is still there
    delivered = {m.run_id for m in publisher.messages if m.type == "late"}
    assert delivered == set(late)
    relay.drain_until_idle(publisher=publisher, batch_size=batch)
    assert pending_count() == 0
    per_run: dict[str, list[int]] = {}
    for message in publisher.messages:
        per_run.setdefault(message.run_id, []).append(message.seq)
    assert all(seqs == list(range(1, len(seqs) + 1)) for seqs in per_run.values())
    assert set(per_run) == set(backlog) | set(late)
    assert_cursor_invariant()


def test_the_rotation_wraps_around_and_a_short_claim_ends_the_sweep() -> None:
    for run_id in ("a", "b", "c"):
        services.create_run(run_id, run_id=run_id)
    claim = relay.claim_runs(2)
    assert [run.run_id for run in claim.runs] == ["a", "b"]
    relay.release_leases(claim, ["a", "b"])
    claim = relay.claim_runs(2)
    assert [run.run_id for run in claim.runs] == ["c"]  # after "b"; short: the sweep ends
    relay.release_leases(claim, ["c"])
    assert [run.run_id for run in relay.claim_runs(2).runs] == ["a", "b"]
