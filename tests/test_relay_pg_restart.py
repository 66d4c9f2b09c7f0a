"""A looping relay survives a restart of the PostgreSQL server.

This restarts the machine's cluster (``pg_ctlcluster ... restart``): every other connection to
the server is cut too. It is in its own module so it is easy to run alone (or deselect).
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from django.db import OperationalError, connection

from tests.relay_helpers import (
    assert_cursor_invariant,
    pending_count,
    relay_env,
    seed_runs,
    start_relay,
    stop_all,
    wait_until,
)

pytestmark = [pytest.mark.postgresql, pytest.mark.django_db(transaction=True)]


def restart_postgresql() -> None:
    versions = sorted(path.name for path in Path("/etc/postgresql").iterdir())
    assert versions, "no PostgreSQL cluster configured under /etc/postgresql"
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "restart"],
        check=True,
        capture_output=True,
        timeout=120,
    )


def database_is_back() -> bool:
    connection.close()
    try:
        connection.ensure_connection()
    except OperationalError:
        return False
    return True


def test_a_looping_relay_survives_a_postgresql_restart(tmp_path: Path) -> None:
    env = relay_env(tmp_path, RELAY_TEST_POLL_INTERVAL="0.05")
    relay = start_relay(tmp_path, "-v", "2", env=env)
    try:
        seed_runs(20, 5, prefix="before")
        wait_until(lambda: pending_count() == 0, 60, "the first events to be published")

        restart_postgresql()
        wait_until(database_is_back, 120, "PostgreSQL to accept connections again")

        seed_runs(20, 5, prefix="after")
        wait_until(lambda: pending_count() == 0, 120, "events written after the restart")
        assert relay.stop(signal.SIGTERM) == 0, relay.output()
    finally:
        stop_all([relay])
    assert "database unavailable" in relay.output()
    assert "drain_outbox: 200 message(s) published" in relay.output()
    assert_cursor_invariant()
