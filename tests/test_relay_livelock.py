"""No livelock when a publish outlasts the lease (PostgreSQL, real relay processes): the relay
keeps the leases it holds alive while it publishes, so with two relays, ``LEASE_SECONDS=1`` and
a 1.5 s publish every run advances and each event is delivered at most twice (once, unless a
lease is lost; see docs/relay.md, the delivery bound)."""

from __future__ import annotations

import signal
import threading
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import cast

import pytest
from django.db import connection

from runs_app.models import RunOutbox
from runs_app.testing import MemoryPublisher
from tests.helpers import InjectedFault
from tests.relay_helpers import (
    assert_cursor_invariant,
    by_run,
    pending_count,
    read_deliveries,
    relay_env,
    seed_runs,
    start_relay,
    stop_all,
    wait_until,
)

pytestmark = [pytest.mark.postgresql, pytest.mark.django_db(transaction=True)]


def test_two_relays_with_a_publish_longer_than_the_lease_deliver_every_run(
    tmp_path: Path,
) -> None:
    runs, events = 4, 20
    ids = seed_runs(runs, events, prefix="slow")
    env = relay_env(
        tmp_path,
        RELAY_TEST_LEASE_SECONDS="1",
        RELAY_TEST_DELAY=str(1.5 / events),  # one run's batch: 1.5 s, longer than the lease
        RELAY_TEST_BATCH_SIZE="100",
    )
    relays = [start_relay(tmp_path, "--interval", "0.05", env=env) for _ in range(2)]
    try:
        wait_until(lambda: pending_count() == 0, 60, "every run to be delivered")
        for relay in relays:
            assert relay.stop(signal.SIGTERM) == 0, relay.output()
    finally:
        stop_all(relays)

    deliveries = read_deliveries(tmp_path)
    grouped = by_run(deliveries)
    assert set(grouped) == set(ids)
    times = Counter((delivery.run_id, delivery.seq) for delivery in deliveries)
    assert set(times) == {(run_id, seq) for run_id in ids for seq in range(1, events + 1)}
    assert max(times.values()) <= 2, times.most_common(3)
    for run_id, run_deliveries in grouped.items():  # each relay's deliveries in seq order
        for pid in {delivery.pid for delivery in run_deliveries}:
            seqs = [d.seq for d in run_deliveries if d.pid == pid]
            assert seqs == sorted(seqs), (run_id, pid, seqs)
    assert not RunOutbox.objects.filter(lease_token__isnull=False).exists()
    assert_cursor_invariant()


def lease_untils() -> dict[str, datetime]:
    """run id -> lease_until of every outbox; each must hold a lease."""
    untils = dict(RunOutbox.objects.values_list("run_id", "lease_until"))
    assert None not in untils.values(), untils
    return cast("dict[str, datetime]", untils)


def test_the_lease_keeper_renews_reports_a_taken_lease_and_survives_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import uuid

    from django.test import override_settings

    from runs_app import relay, services
    from runs_app.relay import lease

    for name in ("a", "b"):
        services.create_run(name, run_id=name)
    with override_settings(RUNS_APP={"LEASE_SECONDS": 0.3}):
        claim = relay.claim_runs(10)
        first = lease_untils()
        real = lease.renew_leases
        calls: list[int] = []

        def flaky(token: uuid.UUID, run_ids: list[str]) -> set[str]:
            calls.append(1)
            if len(calls) == 1:
                raise InjectedFault("injected fault in a renewal")
            return real(token, run_ids)

        monkeypatch.setattr(lease, "renew_leases", flaky)
        keeper = lease.LeaseKeeper.start(claim)
        assert keeper is not None
        try:
            wait_until(
                lambda: all(until > first[run_id] for run_id, until in lease_untils().items()),
                30,
                "both leases renewed after a failed renewal",
            )
            RunOutbox.objects.filter(run_id="b").update(lease_token=uuid.uuid4())
            wait_until(lambda: keeper.lost("b"), 30, "the keeper to see b taken over")
            assert not keeper.lost("a")
        finally:
            keeper.stop()
        assert len(calls) >= 3
        lease.release_leases(claim, ["a"])


def keeper_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "runs_app lease keeper"]


def backends() -> int:
    """Client connections to the test database (not autovacuum workers, which show there too)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND backend_type = 'client backend'"
        )
        return int(cursor.fetchone()[0])


def test_one_keeper_thread_serves_every_pass_and_closes_its_connection_when_they_end() -> None:
    from django.test import override_settings

    from runs_app import relay, services
    from runs_app.relay import lease

    for name in ("a", "b"):
        services.create_run(name, run_id=name)
    before = backends()
    with override_settings(RUNS_APP={"LEASE_SECONDS": 0.3}):
        first, second = relay.claim_runs(1), relay.claim_runs(1)
        assert [r.run_id for r in first.runs + second.runs] == ["a", "b"]
        set_at = lease_untils()
        keepers = [lease.LeaseKeeper.start(first), lease.LeaseKeeper.start(second)]
        try:
            assert len(keeper_threads()) == 1  # both claims, one thread
            wait_until(
                lambda: all(until > set_at[run_id] for run_id, until in lease_untils().items()),
                30,
                "both claims' leases renewed",
            )
            assert backends() == before + 1  # the keeper thread's own connection
        finally:
            for keeper in keepers:
                assert keeper is not None
                keeper.stop()
        # Closed by the keeper thread when the last pass left, before stop() returned; the
        # server's backend then exits on its own time: wait for it to leave the list.
        assert not lease._keeper_thread._connected
        wait_until(lambda: backends() == before, 30, "the keeper's backend to exit")
        (thread,) = keeper_threads()  # idle between passes, not ended
        lease.release_leases(first, ["a"])
        lease.release_leases(second, ["b"])
        assert relay.drain_outbox_once(publisher=MemoryPublisher()).runs_touched == 2
        assert keeper_threads() == [thread]  # the next pass used the same thread
        lease.stop_lease_keeper()
        thread.join(10)
        assert not thread.is_alive()
    assert backends() == before
