"""Upgrading a database filled by an earlier release: 0001 to 0002 (every row kept, closed runs
flagged closed, and on PostgreSQL new ordinals above every existing one), and 0002 to 0003
(every row kept, each run that flushed gets its runs_app.project ledger line), 0004 and 0005
(every line kept: delete-mode cleanups, full reads without a cursor), 0006 (the event table's
index on the run alone dropped, and back on the way down; every row kept).

Standard MigrationExecutor use: migrate back to 0001, fill through the historical models as the
previous release wrote its rows, migrate forward. The database is left fully migrated.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.apps.registry import Apps
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

from runs_app import services
from runs_app.exceptions import RunClosed
from runs_app.models import Project, Run, RunEvent, RunModelState, RunOutbox, RunState, RunStatus

pytestmark = pytest.mark.django_db(transaction=True)

OLD = [("runs_app", "0001_initial")]
NEW = [("runs_app", "0002_flush_sessions")]

# id, scope, ordinal, status, flush_status
RUNS = [
    ("old-done", "crm", 7, "completed", "succeeded"),
    ("old-failed", "crm", 30, "failed", "failed"),
    ("old-newest", "crm", 412, "completed", "succeeded"),
    ("old-active", "erp", 900, "active", "not_started"),
    ("old-active-flushed", "hr", 55, "active", "succeeded"),
]


def migrate(targets: list[tuple[str, str]]) -> Apps:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)
    return executor.loader.project_state(targets).apps


@pytest.fixture
def old_database() -> Iterator[Apps]:
    apps = migrate(OLD)
    try:
        yield apps
    finally:
        # Leave the database at the latest migration, whatever happened.
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())


def fill(apps: Apps) -> dict[str, Any]:
    """Rows as the previous release wrote them."""
    OldRun = apps.get_model("runs_app", "Run")
    OldState = apps.get_model("runs_app", "RunState")
    OldOutbox = apps.get_model("runs_app", "RunOutbox")
    OldEvent = apps.get_model("runs_app", "RunEvent")
    OldProject = apps.get_model("runs_app", "Project")
    now = timezone.now()
    for run_id, scope, ordinal, status, flush_status in RUNS:
        closing = {"completed": ["run.completed"], "failed": ["run.failed"]}.get(status, [])
        types = ["run.started", "projects.flushed", *closing]
        run = OldRun.objects.create(
            id=run_id,
            scope=scope,
            ordinal=ordinal,
            last_seq=len(types),
            metadata={"v": 1},
            created_at=now - timedelta(days=1),
        )
        OldState.objects.create(
            run=run,
            scope=scope,
            status=status,
            flush_status=flush_status,
            rows_seen=3,
            finished_at=None if status == "active" else now,
            heartbeat_at=now,
        )
        OldOutbox.objects.create(run=run, next_seq=2)
        for seq, event_type in enumerate(types, start=1):
            OldEvent.objects.create(run=run, seq=seq, type=event_type, payload={"seq": seq})
    for index in range(30):
        OldProject.objects.create(
            scope="crm",
            key=f"k{index:03d}",
            name=f"Name {index}",
            data={"i": index, "text": "é\u2603"},
            last_seen_run_id="old-newest" if index < 20 else "old-done",
            last_confirmed_run_id="old-newest" if index < 20 else "old-done",
        )
    return snapshot_values(apps)


def snapshot_values(apps: Apps | None = None) -> dict[str, Any]:
    def model(name: str) -> Any:
        return apps.get_model("runs_app", name) if apps else globals()[name]

    columns = {
        "Run": ["id", "scope", "ordinal", "last_seq", "metadata", "created_at"],
        "RunState": [
            "run_id",
            "scope",
            "status",
            "flush_status",
            "rows_seen",
            "finished_at",
            "cleanup_status",
        ],
        "RunOutbox": ["run_id", "next_seq", "attempts"],
        "RunEvent": ["run_id", "seq", "type", "payload", "created_at", "published_at"],
        "Project": ["scope", "key", "name", "data", "last_seen_run_id", "last_confirmed_run_id"],
    }
    return {
        name: sorted(model(name).objects.values_list(*fields), key=repr)
        for name, fields in columns.items()
    }


def test_upgrade_keeps_every_row_and_flags_closed_runs(old_database: Apps) -> None:
    before = fill(old_database)
    migrate(NEW)
    assert snapshot_values() == before
    closed = dict(Run.objects.values_list("id", "closed"))
    assert closed == {
        "old-done": True,
        "old-failed": True,
        "old-newest": True,
        "old-active": False,
        "old-active-flushed": False,
    }


def test_after_upgrade_new_runs_get_larger_ordinals_and_old_runs_behave(
    old_database: Apps,
) -> None:
    fill(old_database)
    migrate(NEW)
    migrate(latest())
    top = max(ordinal for *_, ordinal, _, _ in RUNS)
    fresh = services.create_run("new-scope")
    assert fresh.ordinal > top
    assert services.create_run("other-scope").ordinal > fresh.ordinal
    # A closed run of the previous release stays closed.
    with pytest.raises(RunClosed):
        services.append_events("old-done", [services.Event("late", {})])
    with pytest.raises(RunClosed):
        services.flush_projects("old-failed", [{"key": "k000", "name": "x"}])
    # An active run of the previous release can still flush through a session and complete.
    with services.flush("old-active") as flush:
        flush.write([{"key": "e1", "name": "E1"}])
    assert services.complete_run("old-active").state.status == RunStatus.COMPLETED
    # Cleanup of the newest old run works on the upgraded rows and audits them.
    result = services.safe_cleanup_old_projects("old-newest")
    assert result.removed == 10
    assert Project.objects.filter(scope="crm").count() == 20
    # A new run in an old scope sorts after the old runs.
    newer = services.create_run("crm")
    assert newer.ordinal > top
    assert services.latest_run("crm") == newer


def latest() -> list[tuple[str, str]]:
    """The leaf migrations: what the services of this release write through."""
    loader = MigrationExecutor(connection).loader
    return list(loader.graph.leaf_nodes())


def test_upgrade_of_an_empty_database_starts_ordinals_at_one(old_database: Apps) -> None:
    migrate(latest())
    assert services.create_run("first").ordinal == 1


def test_upgrade_then_downgrade_then_upgrade_again(old_database: Apps) -> None:
    before = fill(old_database)
    migrate(NEW)
    migrate(OLD)
    migrate(latest())
    assert snapshot_values() == before
    assert services.create_run("again").ordinal > 900
    assert RunState.objects.count() == len(RUNS) + 1
    assert RunOutbox.objects.count() == RunEvent.objects.filter(type="run.started").count()


TRACKED = [("runs_app", "0003_tracked_models")]
REVERSIBLE = [("runs_app", "0004_reversible_cleanup")]
SOURCE_STATE = [("runs_app", "0005_source_state_and_trace_context")]


def test_upgrade_to_tracked_models_gives_each_flushed_run_its_project_line(
    old_database: Apps,
) -> None:
    fill(old_database)
    previous = migrate(NEW)  # the database of the previous release (flush sessions)
    PreviousState = previous.get_model("runs_app", "RunState")
    PreviousState.objects.filter(run_id="old-newest").update(
        cleanup_status="done", rows_removed=4, rows_confirmed=3
    )
    before = snapshot_values()
    tracked = migrate(TRACKED)
    assert snapshot_values() == before  # every row kept, as it was
    Line = tracked.get_model("runs_app", "RunModelState")
    lines = {
        line.run_id: (line.model, line.flush_status, line.rows_seen, line.rows_confirmed)
        for line in Line.objects.all()
    }
    assert lines == {
        "old-done": ("runs_app.project", "succeeded", 3, 0),
        "old-failed": ("runs_app.project", "failed", 3, 0),
        "old-newest": ("runs_app.project", "succeeded", 3, 3),
        "old-active-flushed": ("runs_app.project", "succeeded", 3, 0),
    }
    newest = Line.objects.get(run_id="old-newest")
    assert (newest.cleanup_status, newest.rows_removed) == ("done", 4)
    # Reversible cleanup (0004): every line kept, a delete-mode cleanup, nothing restored yet.
    reversible = migrate(REVERSIBLE)
    assert snapshot_values() == before
    upgraded = reversible.get_model("runs_app", "RunModelState").objects.get(run_id="old-newest")
    assert (upgraded.cleanup_status, upgraded.rows_removed, upgraded.cleanup_mode) == (
        "done",
        4,
        "delete",
    )
    assert (upgraded.rows_restored, upgraded.withheld_count, upgraded.rows_revived) == (0, None, 0)
    assert RunModelState.objects.count() == 4
    # Source state (0005): every line read its source in full and set no cursor; no run has a
    # trace context.
    migrate(SOURCE_STATE)
    assert snapshot_values() == before
    assert set(RunModelState.objects.values_list("flush_mode", "cursor", "cursor_at")) == {
        ("full", None, None)
    }
    assert [run.trace_context for run in Run.objects.all()] == [{}] * len(RUNS)
    # The upgraded ledger drives per-model cleanup and completion as the new release writes them.
    migrate(latest())
    assert services.safe_cleanup("old-newest", Project).removed == 10
    with services.flush("old-active") as flush:
        flush.write([{"key": "e1", "name": "E1"}])
    assert services.complete_run("old-active").state.status == RunStatus.COMPLETED
    assert RunModelState.objects.get(run_id="old-active").rows_confirmed == 1


RUN_SEQ_COVERS_RUN = [("runs_app", "0006_event_run_index_covered_by_run_seq")]


def event_indexes() -> dict[str, list[str]]:
    """The event table's indexes (no constraints): name -> columns."""
    with connection.cursor() as cursor:
        found = connection.introspection.get_constraints(cursor, RunEvent._meta.db_table)
    return {
        name: info["columns"]
        for name, info in found.items()
        if info["index"] and not info["primary_key"]
    }


def event_foreign_keys() -> list[list[str]]:
    with connection.cursor() as cursor:
        found = connection.introspection.get_constraints(cursor, RunEvent._meta.db_table)
    return [info["columns"] for info in found.values() if info["foreign_key"]]


def test_0006_drops_only_the_run_index_and_keeps_every_row_and_the_foreign_key(
    old_database: Apps,
) -> None:
    before = fill(old_database)
    migrate(SOURCE_STATE)
    on_run_alone = [name for name, columns in event_indexes().items() if columns == ["run_id"]]
    # 0001 created it (PostgreSQL: and its varchar_pattern_ops copy, on the same column).
    assert len(on_run_alone) == (2 if connection.vendor == "postgresql" else 1)
    foreign_keys = event_foreign_keys()

    migrate(RUN_SEQ_COVERS_RUN)
    assert snapshot_values() == before
    assert not [name for name, columns in event_indexes().items() if columns == ["run_id"]]
    assert event_indexes()["runs_app_event_pending"] == ["run_id", "seq"]  # the relay's
    with connection.cursor() as cursor:
        unique = connection.introspection.get_constraints(cursor, RunEvent._meta.db_table)
    assert unique["runs_app_event_run_seq"]["columns"] == ["run_id", "seq"]  # serves the run
    assert event_foreign_keys() == foreign_keys  # still there

    migrate(SOURCE_STATE)  # reversible: the index (and its copy) come back
    assert sorted(n for n, c in event_indexes().items() if c == ["run_id"]) == sorted(on_run_alone)
    assert snapshot_values() == before
