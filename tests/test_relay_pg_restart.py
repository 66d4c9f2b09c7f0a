"""A looping relay survives a restart of the PostgreSQL server.

The test starts a throwaway PostgreSQL cluster of its own (``initdb`` into a temporary directory,
a free port on 127.0.0.1) and restarts that one: the machine's shared server, which other test
runs and benchmarks use at the same time, is never touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.relay_helpers import manage, relay_env, start_relay, stop_all, wait_until

pytestmark = pytest.mark.postgresql


@dataclass
class Cluster:
    """A private PostgreSQL cluster: its data directory, port and ``pg_ctl``."""

    bindir: Path
    data: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def conninfo(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def pg_ctl(self, *args: str, timeout: float = 120) -> None:
        run_as_postgres(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", *args],
            timeout=timeout,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.pg_ctl("-o", options, "-l", str(self.data / "server.log"), "start")

    def restart(self) -> None:
        # -l again: without it the new server would keep pg_ctl's output pipe open.
        self.pg_ctl("-m", "fast", "-l", str(self.data / "server.log"), "restart")

    def accepts_connections(self) -> bool:
        try:
            with psycopg.connect(
                self.url.replace("postgres://", "postgresql://"), connect_timeout=2
            ):
                return True
        except psycopg.OperationalError:
            return False

    def scalar(self, sql: str) -> int:
        with psycopg.connect(self.conninfo) as conn:
            row = conn.execute(sql).fetchone()
        assert row is not None
        return int(row[0])


def run_as_postgres(command: list[str], *, timeout: float) -> None:
    """initdb and pg_ctl refuse to run as root: as root, run them as the postgres user."""
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    subprocess.run(command, check=True, capture_output=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def postgresql_bindir() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    assert candidates, "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin"
    return candidates[-1].parent


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    # Not pytest's tmp_path: its parent is private to root, and the server runs as postgres.
    base = Path(tempfile.mkdtemp(prefix="runs-app-pg-"))
    base.chmod(0o755)
    data = base / "data"
    data.mkdir(mode=0o700)
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    bindir = postgresql_bindir()
    run_as_postgres(
        [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync"],
        timeout=120,
    )
    private = Cluster(bindir, data, free_port())
    private.start()
    try:
        yield private
    finally:
        try:
            private.pg_ctl("-m", "immediate", "stop", timeout=60)
        finally:
            shutil.rmtree(base, ignore_errors=True)


PENDING = "SELECT count(*) FROM runs_app_runevent WHERE published_at IS NULL AND skipped_at IS NULL"


def test_a_looping_relay_survives_a_postgresql_restart(tmp_path: Path, cluster: Cluster) -> None:
    env = relay_env(tmp_path, RELAY_TEST_POLL_INTERVAL="0.05", DATABASE_URL=cluster.url)

    def in_cluster(code: str) -> None:
        result = manage("shell", "-c", code, env=env, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr

    migrated = manage("migrate", "-v", "0", env=env, timeout=300)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    relay = start_relay(tmp_path, "-v", "2", env=env)
    try:
        in_cluster("from tests.relay_helpers import seed_runs; seed_runs(20, 5, prefix='before')")
        wait_until(lambda: cluster.scalar(PENDING) == 0, 60, "the first events to be published")

        cluster.restart()
        wait_until(cluster.accepts_connections, 120, "PostgreSQL to accept connections again")

        in_cluster("from tests.relay_helpers import seed_runs; seed_runs(20, 5, prefix='after')")
        wait_until(lambda: cluster.scalar(PENDING) == 0, 120, "events written after the restart")
        assert relay.stop(signal.SIGTERM) == 0, relay.output()
    finally:
        stop_all([relay])
    assert "database unavailable" in relay.output()
    assert "drain_outbox: 200 message(s) published" in relay.output()
    in_cluster("from tests.relay_helpers import assert_cursor_invariant; assert_cursor_invariant()")
