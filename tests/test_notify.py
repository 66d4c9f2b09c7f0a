"""Wake-up by NOTIFY: what notifies (and what does not), and the looping relay LISTENing.

The relay tests run ``manage.py drain_outbox --interval 30`` as a real subprocess with the
recording publisher: with a 30 s poll, only a notification (or the one poll after the listener
reconnects) can publish an event within the few seconds they allow.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.db import connection, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from runs_app import notify, services
from runs_app.conf import runs_settings
from runs_app.models import RunEvent
from runs_app.relay import listener
from tests.relay_helpers import (
    Relay,
    read_deliveries,
    relay_env,
    start_relay,
    stop_all,
    wait_until,
)

CHANNEL = "runs_app_outbox"  # the default NOTIFY_CHANNEL
WOKEN = "woken by a notification"


class Rollback(Exception):
    pass


def append_rolled_back(run_id: str) -> None:
    with pytest.raises(Rollback), transaction.atomic():
        services.append_events(run_id, [{"type": "ghost", "payload": {}}])
        raise Rollback


# --- off where it should be off ----------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("setting", [True, False])
def test_notify_is_a_no_op_on_sqlite_and_with_notify_false(setting: bool) -> None:
    run = services.create_run("a")
    with override_settings(RUNS_APP={"NOTIFY": setting}):
        expected_on = setting and connection.vendor == "postgresql"
        assert notify.notify_enabled() is expected_on
        waiter = listener.OutboxListener.for_relay()
        assert (waiter is not None) is expected_on
        if waiter is not None:
            assert waiter.connected
            waiter.close()
        with CaptureQueriesContext(connection) as captured:
            notify.notify_outbox()
            services.append_events(run, [{"type": "e", "payload": {}}])
            services.create_run("b")
        notifying = [query["sql"] for query in captured if "pg_notify" in query["sql"]]
        if expected_on:
            # One per transaction: folded into the append's UPDATE ... RETURNING (the counter
            # CTE of its one statement).
            assert len(notifying) == 3, notifying
            assert any(sql.startswith("WITH r AS (UPDATE") for sql in notifying)
            assert notify.returning_clause() == (", pg_notify(%s, '')", [CHANNEL])
        else:
            assert notifying == []
            assert notify.returning_clause() == ("", [])
    assert len(services.list_events(run)) == 2


# --- what notifies, on PostgreSQL ---------------------------------------------------------------


def pg_connect(**extra: Any) -> psycopg.Connection[Any]:
    """A connection of its own to the test database (not one of Django's)."""
    settings = connection.settings_dict
    return psycopg.connect(
        dbname=settings["NAME"],
        user=settings.get("USER") or None,
        password=settings.get("PASSWORD") or None,
        host=settings.get("HOST") or "127.0.0.1",
        port=settings.get("PORT") or 5432,
        autocommit=True,
        **extra,
    )


@pytest.fixture
def listening() -> Iterator[psycopg.Connection[Any]]:
    listener = pg_connect()
    listener.execute(f"LISTEN {CHANNEL}")
    yield listener
    listener.close()


def payloads_until_sentinel(listener: psycopg.Connection[Any]) -> list[str]:
    """Send a 'sentinel' notification, committed last, and return the payloads received before
    it: PostgreSQL delivers notifications in commit order, so that is everything sent so far."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, 'sentinel')", [CHANNEL])
    received: list[str] = []
    for notification in listener.notifies(timeout=10):
        if notification.payload == "sentinel":
            return received
        received.append(notification.payload)
    raise AssertionError(f"no sentinel within 10 s; received {received}")


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_commits_notify_once_each_and_rollbacks_not_at_all(
    listening: psycopg.Connection[Any],
) -> None:
    run = services.create_run("a")  # 1
    with transaction.atomic():  # 2: three appends, one notification
        for n in range(3):
            services.append_events(run, [{"type": "e", "payload": {"n": n}}])
    append_rolled_back(run.id)  # none
    with pytest.raises(Rollback), transaction.atomic():
        services.create_run("b")  # none either
        raise Rollback
    services.retry_outbox(run)  # 3
    services.complete_run(run)  # 4: run.completed
    assert payloads_until_sentinel(listening) == ["", "", "", ""]
    assert not RunEvent.objects.filter(type="ghost").exists()


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_notify_channel_setting_is_used(listening: psycopg.Connection[Any]) -> None:
    other = pg_connect()
    other.execute("LISTEN runs_app_other")
    try:
        with override_settings(RUNS_APP={"NOTIFY_CHANNEL": "runs_app_other"}):
            services.create_run("a")
        assert [n.channel for n in other.notifies(timeout=10, stop_after=1)] == ["runs_app_other"]
        assert payloads_until_sentinel(listening) == []
    finally:
        other.close()


# --- the looping relay -------------------------------------------------------------------------


def listener_backends() -> list[int]:
    """Backend pids of relay listeners on the test database that have run their LISTEN."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = %s AND query LIKE 'LISTEN%%'",
            [listener.APPLICATION_NAME],
        )
        return [row[0] for row in cursor.fetchall()]


def delivered_seqs(directory: Path, run_id: str) -> list[int]:
    return [d.seq for d in read_deliveries(directory) if d.run_id == run_id]


def start_listening_relay(directory: Path) -> Relay:
    env = relay_env(directory, RUNS_APP_LOG_LEVEL="DEBUG")
    relay = start_relay(directory, "--interval", "30", "-v", "2", env=env)
    wait_until(listener_backends, 60, "the relay to LISTEN")
    return relay


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_relay_wakes_on_commit_and_not_on_rollback(tmp_path: Path) -> None:
    run = services.create_run("a")
    relay = start_listening_relay(tmp_path)
    try:
        wait_until(lambda: delivered_seqs(tmp_path, run.id) == [1], 30, "the first pass")

        append_rolled_back(run.id)
        # Nothing may happen: PostgreSQL never sends a rolled-back NOTIFY. No wait proves that;
        # the count of wake-ups after the committed append below does (one, not two).

        committed_at = time.monotonic_ns()
        services.append_events(run, [{"type": "e", "payload": {}}])
        wait_until(lambda: delivered_seqs(tmp_path, run.id) == [1, 2], 5, "the wake-up")
        latency = read_deliveries(tmp_path)[-1].at_ns - committed_at
        assert latency < 5e9  # the interval is 30 s: a notification woke it
        assert relay.output().count(WOKEN) == 1

        stopping = time.monotonic()
        assert relay.stop(signal.SIGTERM) == 0, relay.output()
        assert time.monotonic() - stopping < 10  # mid-wait on the socket, not 30 s later
    finally:
        stop_all([relay])
    wait_until(lambda: not listener_backends(), 30, "the listener connection to close")
    assert not RunEvent.objects.filter(type="ghost").exists()


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_relay_listens_again_after_losing_its_connection(tmp_path: Path) -> None:
    run = services.create_run("a")
    relay = start_listening_relay(tmp_path)
    try:
        wait_until(lambda: delivered_seqs(tmp_path, run.id) == [1], 30, "the first pass")
        (first,) = listener_backends()
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [first])
        # Committed while nobody may be listening: the relay's poll right after it reconnects
        # (or the new LISTEN) publishes it, not the 30 s interval.
        services.append_events(run, [{"type": "e", "payload": {}}])
        wait_until(lambda: delivered_seqs(tmp_path, run.id) == [1, 2], 5, "the catch-up")
        (second,) = wait_until(
            lambda: [pid for pid in listener_backends() if pid != first], 10, "a new LISTEN"
        )
        services.append_events(run, [{"type": "e", "payload": {}}])
        wait_until(lambda: delivered_seqs(tmp_path, run.id) == [1, 2, 3], 5, "the wake-up")
        assert "LISTEN connection lost" in relay.output()

        stopping = time.monotonic()
        assert relay.stop(signal.SIGINT) == 0, relay.output()
        assert time.monotonic() - stopping < 10
    finally:
        stop_all([relay])
    assert second != first
    wait_until(lambda: not listener_backends(), 30, "the listener connection to close")


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_relay_with_notify_off_does_not_listen(tmp_path: Path) -> None:
    env = relay_env(tmp_path, RELAY_TEST_NOTIFY="0")
    relay = start_relay(tmp_path, "--interval", "0.05", "-v", "2", env=env)
    try:
        run = services.create_run("a")
        wait_until(lambda: delivered_seqs(tmp_path, run.id) == [1], 30, "the poll")
        assert listener_backends() == []
        assert relay.stop() == 0, relay.output()
    finally:
        stop_all([relay])
    assert runs_settings.NOTIFY is True  # the subprocess had its own settings
