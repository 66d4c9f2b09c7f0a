"""The relay with real concurrent connections (PostgreSQL): threads in this process, and real
``drain_outbox`` processes, several at once, killed with -9 mid-batch."""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from django.db import connection, transaction

from runs_app import relay, services
from runs_app.models import RunEvent, RunOutbox
from runs_app.publishers import Message
from tests.helpers import run_in_threads
from tests.relay_helpers import (
    Relay,
    assert_at_least_once_in_order,
    assert_cursor_invariant,
    assert_exactly_once_in_order,
    killed_mid_batch,
    mid_batch,
    pending_count,
    read_deliveries,
    relay_env,
    seed_runs,
    start_relay,
    stop_all,
    wait_until,
)

pytestmark = [pytest.mark.postgresql, pytest.mark.django_db(transaction=True)]


class SharedTimeline:
    """A publisher shared by threads: one list, in the order publishes happened."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[Message] = []

    def publish(self, messages: Sequence[Message]) -> None:
        with self.lock:
            self.messages.extend(messages)


def test_appenders_never_wait_for_a_relay_and_relays_skip_each_others_runs() -> None:
    services.create_run("a", run_id="a")
    services.create_run("b", run_id="b")
    locked = threading.Event()
    release = threading.Event()

    def relay_mid_claim(index: int) -> None:
        # As a relay inside its claim transaction: the outbox row of "a" is locked.
        with transaction.atomic():
            list(RunOutbox.objects.select_for_update(of=("self",)).filter(run_id="a"))
            locked.set()
            assert release.wait(30)

    holder = threading.Thread(target=lambda: run_in_threads(relay_mid_claim, 1))
    holder.start()
    try:
        assert locked.wait(30)
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '2s'")  # waiting would fail, not hang
        try:
            services.append_events("a", [{"type": "written"}])
            services.complete_run("a")
            publisher = SharedTimeline()
            result = relay.drain_outbox_once(publisher=publisher)
        finally:
            with connection.cursor() as cursor:
                cursor.execute("RESET lock_timeout")
        assert result.runs_touched == 1  # "b"; "a" is skipped, not waited for
        assert {m.run_id for m in publisher.messages} == {"b"}
    finally:
        release.set()
        holder.join(30)
    assert relay.drain_outbox_once(publisher=publisher).published == 3
    assert [m.type for m in publisher.messages if m.run_id == "a"] == [
        "run.started",
        "written",
        "run.completed",
    ]


def test_concurrent_relays_in_threads_deliver_each_event_once_in_order() -> None:
    ids = seed_runs(40, 5, prefix="t")
    publisher = SharedTimeline()

    def drain(index: int) -> relay.DrainResult:
        return relay.drain_until_idle(publisher=publisher, batch_size=3)

    results = run_in_threads(drain, 4)

    assert sum(result.published for result in results) == 200
    seqs: dict[str, list[int]] = {}
    for message in publisher.messages:
        seqs.setdefault(message.run_id, []).append(message.seq)
    assert seqs == {run_id: [1, 2, 3, 4, 5] for run_id in ids}
    assert pending_count() == 0
    assert not RunOutbox.objects.filter(lease_token__isnull=False).exists()
    assert_cursor_invariant()


def test_four_relay_processes_deliver_every_event_exactly_once(tmp_path: Path) -> None:
    ids = seed_runs(1000, 20, prefix="p")
    env = relay_env(tmp_path)
    relays = [start_relay(tmp_path, "--once", "--batch-size", "25", env=env) for _ in range(4)]
    try:
        for process in relays:
            assert process.process.wait(300) == 0, process.output()
    finally:
        stop_all(relays)

    deliveries = read_deliveries(tmp_path)
    assert_exactly_once_in_order(deliveries, {run_id: 20 for run_id in ids})
    assert len({delivery.pid for delivery in deliveries}) >= 2  # they really shared the work
    assert pending_count() == 0
    assert not RunOutbox.objects.filter(lease_token__isnull=False).exists()
    assert_cursor_invariant()


def test_relays_killed_mid_batch_lose_nothing_and_keep_order(tmp_path: Path) -> None:
    batch = 4
    ids = seed_runs(100, 10, prefix="k")
    env = relay_env(
        tmp_path,
        RELAY_TEST_DELAY="0.01",
        RELAY_TEST_BATCH_SIZE=str(batch),
        RELAY_TEST_LEASE_SECONDS="1.5",
    )
    args = ("--interval", "0.05")
    live: list[Relay] = [start_relay(tmp_path, *args, env=env) for _ in range(3)]
    everyone = list(live)
    killed: set[int] = set()
    try:
        for _ in range(5):
            progress = len(read_deliveries(tmp_path))

            def progressed(since: int = progress) -> bool:
                return len(read_deliveries(tmp_path)) >= since + 30

            wait_until(
                progressed,
                60,
                "progress since the last kill",
            )
            victim = wait_until(
                lambda: next((r for r in live if mid_batch(tmp_path, r.pid)), None),
                60,
                "a relay in the middle of a batch",
            )
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait(30)
            killed.add(victim.pid)
            live.remove(victim)
            replacement = start_relay(tmp_path, *args, env=env)
            live.append(replacement)
            everyone.append(replacement)
        wait_until(lambda: pending_count() == 0, 120, "every event to be published")
        for process in live:
            assert process.stop(signal.SIGTERM) == 0, process.output()
    finally:
        stop_all(everyone)

    deliveries = read_deliveries(tmp_path)
    duplicates = assert_at_least_once_in_order(
        deliveries, {run_id: 10 for run_id in ids}, killed, batch
    )
    assert sum(killed_mid_batch(tmp_path, pid) for pid in killed) >= 1
    # At most the claim in hand of each kill: up to `batch` runs published, none acknowledged
    # (one acknowledgement per claim), each with up to `batch` events.
    assert duplicates <= len(killed) * batch * batch
    assert not RunOutbox.objects.filter(lease_token__isnull=False).exists()
    assert RunEvent.objects.filter(published_at__isnull=True).count() == 0
    assert_cursor_invariant()
