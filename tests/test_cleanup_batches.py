"""Cleanup batches are bounded whatever the planner does, and an interrupted cleanup is resumable.

Rows per DELETE are counted, never timed: every batch statement is captured with
``connection.execute_wrapper`` (PostgreSQL also reports its ``rowcount``), and every batch's
``projects.removed`` audit is checked against what disappeared.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.test import override_settings

from runs_app import services
from runs_app.db import table
from runs_app.models import CleanupStatus, Project, Run, RunEvent, RunState
from tests.helpers import InjectedFault, run_in_threads
from tests.relay_helpers import ROOT, database_url, manage, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

BATCH = 100
SCOPE = "batches"


@dataclass
class Deletes:
    """The cleanup's batch DELETE statements, with the rows each removed (PostgreSQL)."""

    fail_at: int | None = None
    before: Callable[[int], None] | None = None  # called before the n-th DELETE runs
    rowcounts: list[int] = field(default_factory=list)

    def __call__(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        if f"DELETE FROM {table(Project)}" not in sql:
            return execute(sql, params, many, context)
        number = len(self.rowcounts) + 1
        if self.before is not None:
            self.before(number)
        if number == self.fail_at:
            self.rowcounts.append(-1)
            raise InjectedFault(f"injected fault at cleanup batch {number}")
        result = execute(sql, params, many, context)
        self.rowcounts.append(context["cursor"].rowcount)
        return result


@contextmanager
def capturing(deletes: Deletes) -> Iterator[Deletes]:
    with connection.execute_wrapper(deletes):
        yield deletes


def seed(total: int, seen: int) -> Run:
    """A scope of ``total`` projects (run 1), and a completed run 2 that saw the first
    ``seen`` of them: ``total - seen`` deletable rows."""
    first = services.create_run(SCOPE)
    services.flush_projects(
        first, ({"key": f"k{i:05d}", "name": f"N{i}", "data": {"i": i}} for i in range(total))
    )
    services.complete_run(first)
    run = services.create_run(SCOPE)
    services.flush_projects(
        run, ({"key": f"k{i:05d}", "name": f"N{i}", "data": {"i": i}} for i in range(seen))
    )
    return services.complete_run(run)


def removed_batches(run: Run) -> list[list[str]]:
    events = RunEvent.objects.filter(run=run, type="projects.removed").order_by("seq")
    return [[row["key"] for row in event.payload["rows"]] for event in events]


def assert_bounded(deletes: Deletes, run: Run, removed: int, now: int | None = None) -> None:
    """``removed``: rows the run's cleanups removed in all; ``now``: of which by ``deletes``."""
    batches = removed_batches(run)
    # One audit event per batch (small rows), each at most BATCH rows.
    assert all(len(batch) <= BATCH for batch in batches), [len(b) for b in batches]
    assert sum(len(batch) for batch in batches) == removed
    assert len(batches) == -(-removed // BATCH)
    if connection.vendor == "postgresql":
        counts = [count for count in deletes.rowcounts if count >= 0]
        assert counts and max(counts) <= BATCH, counts
        assert sum(counts) == (removed if now is None else now)


def statistics() -> tuple[float, int, Any]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.reltuples, (SELECT count(*) FROM pg_statistic s WHERE s.starelid = c.oid), "
            "(SELECT coalesce(last_analyze, last_autoanalyze) FROM pg_stat_user_tables t "
            "WHERE t.relid = c.oid) FROM pg_class c WHERE c.oid = %s::regclass",
            [table(Project).strip('"')],
        )
        reltuples, stats, analyzed = cursor.fetchone()
    return float(reltuples), int(stats), analyzed


@pytest.mark.postgresql
@override_settings(RUNS_APP={"CLEANUP_BATCH_SIZE": BATCH})
def test_batches_are_bounded_on_a_database_without_statistics() -> None:
    reltuples, stats, analyzed = statistics()
    assert (stats, analyzed) == (0, None), "the projects table has statistics already"
    assert reltuples <= 0  # never analyzed (-1) or empty
    run = seed(5000, 2600)
    assert statistics()[1:] == (0, None)  # still none: autovacuum did not analyze meanwhile
    with capturing(Deletes()) as deletes:
        result = services.safe_cleanup_old_projects(run)
    assert result.removed == 2400
    assert_bounded(deletes, run, 2400)
    # 24 full batches; the walk of the older runs knows when nothing is left (no empty DELETE).
    assert len(deletes.rowcounts) == 24
    assert Project.objects.filter(scope=SCOPE).count() == 2600


@pytest.mark.postgresql
@override_settings(RUNS_APP={"CLEANUP_BATCH_SIZE": BATCH})
def test_batches_are_bounded_after_analyze() -> None:
    run = seed(5000, 2600)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    assert statistics()[1] > 0
    with capturing(Deletes()) as deletes:
        services.safe_cleanup_old_projects(run)
    assert_bounded(deletes, run, 2400)


@override_settings(RUNS_APP={"CLEANUP_BATCH_SIZE": BATCH})
def test_batches_are_bounded() -> None:
    run = seed(3000, 1600)
    with capturing(Deletes()) as deletes:
        assert services.safe_cleanup_old_projects(run).removed == 1400
    assert_bounded(deletes, run, 1400)


@override_settings(RUNS_APP={"CLEANUP_BATCH_SIZE": BATCH})
@pytest.mark.parametrize("fail_at", [1, 2, 7, 14])
def test_an_interrupted_cleanup_reads_in_progress_and_a_rerun_finishes_it(fail_at: int) -> None:
    run = seed(3000, 1600)
    with capturing(Deletes(fail_at=fail_at)), pytest.raises(InjectedFault):
        services.safe_cleanup_old_projects(run)
    state = RunState.objects.get(run=run)
    done = (fail_at - 1) * BATCH
    assert state.rows_removed == done
    assert Project.objects.filter(scope=SCOPE).count() == 3000 - done
    assert sum(len(b) for b in removed_batches(run)) == done  # every removed row audited
    if done:
        assert state.cleanup_status == CleanupStatus.IN_PROGRESS
    else:
        assert state.cleanup_status == CleanupStatus.NOT_RUN
    # The rerun finishes it.
    with capturing(Deletes()) as deletes:
        result = services.safe_cleanup_old_projects(run)
    assert result.removed == 1400 - done
    state = RunState.objects.get(run=run)
    assert (state.cleanup_status, state.rows_removed) == (CleanupStatus.DONE, 1400)
    keys = [key for batch in removed_batches(run) for key in batch]
    assert sorted(keys) == [f"k{i:05d}" for i in range(1600, 3000)]  # complete, no duplicate
    assert_bounded(deletes, run, 1400, now=1400 - done)
    assert set(Project.objects.filter(scope=SCOPE).values_list("key", flat=True)) == {
        f"k{i:05d}" for i in range(1600)
    }


@override_settings(RUNS_APP={"CLEANUP_BATCH_SIZE": BATCH, "CLEANUP_MAX_DELETE_FRACTION": 0.9})
def test_an_interrupted_forced_cleanup_resumes_forced() -> None:
    run = seed(3000, 0)
    with capturing(Deletes(fail_at=3)), pytest.raises(InjectedFault):
        services.safe_cleanup_old_projects(run, force=True)
    state = RunState.objects.get(run=run)
    assert (state.cleanup_status, state.rows_removed, state.cleanup_forced) == (
        CleanupStatus.IN_PROGRESS,
        200,
        True,
    )
    result = services.safe_cleanup_old_projects(run)
    assert result.forced and result.removed == 2800
    assert not Project.objects.filter(scope=SCOPE).exists()


@override_settings(RUNS_APP={"CLEANUP_BATCH_SIZE": BATCH})
def test_rows_restamped_by_a_newer_run_during_cleanup_are_kept() -> None:
    run = seed(3000, 1600)
    newer: dict[str, Any] = {}
    restamped = [f"k{i:05d}" for i in range(1600, 3000, 7)]

    def before(number: int) -> None:
        if number == 4:
            # A newer run's flush re-stamps rows of the deletable set between two batches.
            newer["run"] = services.create_run(SCOPE)
            Project.objects.filter(scope=SCOPE, key__in=restamped).update(
                last_seen_run=newer["run"]
            )

    with capturing(Deletes(before=before)):
        result = services.safe_cleanup_old_projects(run)
    remaining = set(Project.objects.filter(scope=SCOPE).values_list("key", flat=True))
    deleted_before = {key for batch in removed_batches(run)[:3] for key in batch}
    assert remaining >= set(restamped) - deleted_before
    assert all(
        Project.objects.filter(key=key, last_seen_run=newer["run"]).exists()
        for key in set(restamped) - deleted_before
    )
    audited = [key for batch in removed_batches(run) for key in batch]
    assert len(audited) == result.removed == len(set(audited))
    assert not set(audited) & (set(restamped) - deleted_before)


@pytest.mark.postgresql
@override_settings(RUNS_APP={"CLEANUP_BATCH_SIZE": BATCH})
def test_two_cleanups_of_one_run_at_once_remove_each_row_once() -> None:
    run = seed(3000, 1600)

    def cleanup(_: int) -> int:
        return services.safe_cleanup_old_projects(run).removed

    removed = run_in_threads(cleanup, 2)
    assert sum(removed) == 1400
    keys = [key for batch in removed_batches(run) for key in batch]
    assert sorted(keys) == [f"k{i:05d}" for i in range(1600, 3000)]  # each row audited once
    assert all(len(batch) <= BATCH for batch in removed_batches(run))
    state = RunState.objects.get(run=run)
    assert (state.cleanup_status, state.rows_removed) == (CleanupStatus.DONE, 1400)
    assert Project.objects.filter(scope=SCOPE).count() == 1600


@pytest.mark.postgresql
def test_a_cleanup_process_killed_mid_way_reads_in_progress_and_a_rerun_finishes_it(
    tmp_path: Path,
) -> None:
    """A real ``cleanup_old_projects`` process killed with -9 between two batches (whatever it
    was doing): the run's ledger says in progress, every row gone has its audit, and running
    the command again finishes the job with each row audited once."""
    total = 60_000
    first = services.create_run(SCOPE)
    services.flush_projects(first, [])
    services.complete_run(first)
    run = services.create_run(SCOPE)
    services.flush_projects(run, [])
    run = services.complete_run(run)
    with connection.cursor() as cursor:  # set-based seed: every row last seen by run 1
        cursor.execute(
            f"INSERT INTO {table(Project)} (scope, key, name, data, last_seen_run_id, "
            "created_at, updated_at) SELECT %s, 'k' || lpad(i::text, 6, '0'), 'n', "
            "'{}'::jsonb, %s, now(), now() FROM generate_series(1, %s) i",
            [SCOPE, first.pk, total],
        )
    env = {**os.environ, "DATABASE_URL": database_url(), "PYTHONPATH": str(ROOT)}
    log = tmp_path / "cleanup.out"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "cleanup_old_projects", "--run", run.pk, "--force"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: RunState.objects.get(run=run).rows_removed > 0,
            timeout=60,
            what="the first batch",
        )
        process.kill()
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)

    state = RunState.objects.get(run=run)
    gone = total - Project.objects.filter(scope=SCOPE).count()
    assert 0 < state.rows_removed == gone < total, (state.rows_removed, gone, log.read_text())
    assert state.cleanup_status == CleanupStatus.IN_PROGRESS
    assert sum(len(batch) for batch in removed_batches(run)) == gone

    result = manage("cleanup_old_projects", "--run", run.pk, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr  # resumes forced
    state = RunState.objects.get(run=run)
    assert (state.cleanup_status, state.rows_removed) == (CleanupStatus.DONE, total)
    assert not Project.objects.filter(scope=SCOPE).exists()
    audited = [key for batch in removed_batches(run) for key in batch]
    assert len(audited) == len(set(audited)) == total
