"""Helpers for the relay tests: seeding many runs fast, relay subprocesses, reading deliveries."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from django.db import connection
from django.db.models import Max
from django.utils import timezone

from runs_app.db import table
from runs_app.models import Run, RunEvent, RunOutbox, RunState, RunStatus

ROOT = Path(__file__).resolve().parent.parent


def wait_until(condition: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)  # polling interval of the wait, not a synchronisation by itself


def seed_runs(count: int, events: int, prefix: str = "seed") -> list[str]:
    """``count`` closed runs with ``events`` pending events each (seq 1..events), in bulk
    statements (PostgreSQL: the events with one INSERT ... SELECT generate_series)."""
    ids = [f"{prefix}-{index:05d}" for index in range(count)]
    start = (Run.objects.aggregate(top=Max("ordinal"))["top"] or 0) + 1
    now = timezone.now()
    Run.objects.bulk_create(
        Run(
            id=run_id,
            scope=run_id,
            last_seq=events,
            ordinal=start + index,
            closed=True,
            created_at=now,
        )
        for index, run_id in enumerate(ids)
    )
    if connection.vendor == "postgresql":
        # create_run draws ordinals from this sequence: move it past the ones used here.
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT setval('runs_app_run_ordinal_seq', "
                f"(SELECT max(ordinal) FROM {table(Run)}))"
            )
    RunState.objects.bulk_create(
        RunState(run_id=run_id, scope=run_id, status=RunStatus.COMPLETED, finished_at=now)
        for run_id in ids
    )
    RunOutbox.objects.bulk_create(RunOutbox(run_id=run_id) for run_id in ids)
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {table(RunEvent)} (run_id, seq, type, payload, created_at)"
                " SELECT r.id, s, 'seeded', jsonb_build_object('n', s), now()"
                f" FROM {table(Run)} r CROSS JOIN generate_series(1, %s) s"
                " WHERE r.id = ANY(%s)",
                [events, ids],
            )
    else:
        RunEvent.objects.bulk_create(
            (
                RunEvent(run_id=run_id, seq=seq, type="seeded", payload={"n": seq}, created_at=now)
                for run_id in ids
                for seq in range(1, events + 1)
            ),
            batch_size=500,
        )
    return ids


def pending_count() -> int:
    return RunEvent.objects.pending().count()


def assert_cursor_invariant() -> None:
    """Events below ``next_seq`` are published or skipped; events from ``next_seq`` on are not."""
    next_seq = dict(RunOutbox.objects.values_list("run_id", "next_seq"))
    for run_id, seq, published_at, skipped_at in RunEvent.objects.values_list(
        "run_id", "seq", "published_at", "skipped_at"
    ):
        done = published_at is not None or skipped_at is not None
        assert done == (seq < next_seq[run_id]), (run_id, seq, next_seq[run_id], published_at)


# --- subprocesses ---------------------------------------------------------------------------


def database_url() -> str:
    """The URL of the database the tests use right now (the TEST database)."""
    settings = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{settings['NAME']}"
    user = quote(settings.get("USER") or "")
    password = f":{quote(settings['PASSWORD'])}" if settings.get("PASSWORD") else ""
    host = settings.get("HOST") or "127.0.0.1"
    port = settings.get("PORT") or 5432
    return f"postgres://{user}{password}@{host}:{port}/{settings['NAME']}"


def relay_env(directory: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url(),
        DJANGO_SETTINGS_MODULE="tests.relay_settings",
        RELAY_TEST_DIR=str(directory),
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def manage(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``python manage.py ARGS`` to the end (settings from ``env``, default the project's)."""
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env if env is not None else {**os.environ, "DATABASE_URL": database_url()},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class Relay:
    """A ``drain_outbox`` subprocess; its output goes to files (a pipe could fill and block)."""

    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(f"relay {self.pid} ignored {sig!r}:\n{self.output()}") from None


def start_relay(directory: Path, *args: str, env: dict[str, str]) -> Relay:
    log = directory / f"relay-{time.monotonic_ns()}.out"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "drain_outbox", *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Relay(process, log)


def stop_all(relays: Iterable[Relay]) -> None:
    """Cleanup for a test's relays (kill -9 whatever is still running)."""
    for relay in relays:
        if relay.process.poll() is None:
            relay.process.kill()
            relay.process.wait(10)


# --- deliveries recorded by tests/recording_publisher.py ---------------------------------------


@dataclass(frozen=True)
class Delivery:
    at_ns: int
    pid: int
    run_id: str
    seq: int


def read_deliveries(directory: Path) -> list[Delivery]:
    """Every recorded delivery of every process, on one timeline."""
    deliveries = []
    for path in directory.glob("deliveries-*.log"):
        pid = int(path.stem.split("-")[1])
        for line in path.read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if parts and parts[0] == "M":
                deliveries.append(Delivery(int(parts[1]), pid, parts[2], int(parts[3])))
    return sorted(deliveries, key=lambda delivery: delivery.at_ns)


def mid_batch(directory: Path, pid: int) -> bool:
    """True when process ``pid`` has published some, but at least two fewer than all, messages
    of its current batch (so a kill now lands mid-batch)."""
    path = directory / f"deliveries-{pid}.log"
    if not path.exists():
        return False
    lines = path.read_text(encoding="utf-8").splitlines()
    starts = [index for index, line in enumerate(lines) if line.startswith("B ")]
    if not starts:
        return False
    size = int(lines[starts[-1]].split()[1])
    done = sum(1 for line in lines[starts[-1] + 1 :] if line.startswith("M "))
    return 1 <= done <= size - 2


def killed_mid_batch(directory: Path, pid: int) -> bool:
    """After a kill: the file of ``pid`` ends inside a batch."""
    path = directory / f"deliveries-{pid}.log"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    starts = [index for index, line in enumerate(lines) if line.startswith("B ")]
    if not starts:
        return False
    size = int(lines[starts[-1]].split()[1])
    return len(lines) - starts[-1] - 1 < size


def by_run(deliveries: Iterable[Delivery]) -> dict[str, list[Delivery]]:
    grouped: dict[str, list[Delivery]] = defaultdict(list)
    for delivery in deliveries:
        grouped[delivery.run_id].append(delivery)
    return grouped


def assert_exactly_once_in_order(deliveries: list[Delivery], expected: dict[str, int]) -> None:
    """Each run's seqs 1..last delivered exactly once, in seq order on the merged timeline."""
    grouped = by_run(deliveries)
    assert set(grouped) == set(expected)
    for run_id, last in expected.items():
        seqs = [delivery.seq for delivery in grouped[run_id]]
        assert seqs == list(range(1, last + 1)), (run_id, seqs)


def assert_at_least_once_in_order(
    deliveries: list[Delivery], expected: dict[str, int], killed: set[int], batch_size: int
) -> int:
    """Nothing lost, per-run order kept, duplicates only from killed batches.

    Per run, on the merged timeline, each delivery is the next seq or a restart at an earlier
    seq (a batch delivered again from ``next_seq``), never a jump forward; every delivery that is
    superseded by a later one of the same seq comes from a killed process, in the last batch it
    published for that run. Returns the number of duplicate deliveries.
    """
    grouped = by_run(deliveries)
    assert set(grouped) == set(expected)
    duplicates = 0
    for run_id, last in expected.items():
        runs = grouped[run_id]
        seqs = [delivery.seq for delivery in runs]
        assert seqs[0] == 1, (run_id, seqs)
        for previous, current in itertools.pairwise(seqs):
            assert current == previous + 1 or current <= previous, (run_id, seqs)
        assert max(seqs) == last, (run_id, seqs)
        final_index = {delivery.seq: index for index, delivery in enumerate(runs)}
        for index, delivery in enumerate(runs):
            if final_index[delivery.seq] == index:
                continue
            duplicates += 1
            assert delivery.pid in killed, (run_id, delivery, "duplicate from a live relay")
            later_same_pid = [d for d in runs[index + 1 :] if d.pid == delivery.pid]
            assert len(later_same_pid) < batch_size, (run_id, delivery, "not its last batch")
    return duplicates
