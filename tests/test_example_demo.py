"""The README's main job (``manage.py demo``) on the test database."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command

from example_project.management.commands.sync_repositories import SCOPE
from example_project.models import Owner, Repository
from runs_app.models import (
    CleanupStatus,
    FlushMode,
    FlushStatus,
    Project,
    RunEvent,
    RunModelState,
    RunState,
    RunStatus,
)


@pytest.mark.django_db(transaction=True)
def test_demo_shows_every_guarantee() -> None:
    out = StringIO()
    call_command("demo", stdout=out, stderr=StringIO())

    states = list(RunState.objects.order_by("run__ordinal"))
    assert [(state.scope, state.status) for state in states] == [
        ("example", RunStatus.COMPLETED),
        ("example", RunStatus.COMPLETED),
        ("example", RunStatus.FAILED),
        (SCOPE, RunStatus.COMPLETED),
        (SCOPE, RunStatus.FAILED),
        (SCOPE, RunStatus.COMPLETED),
        (SCOPE, RunStatus.COMPLETED),
        (SCOPE, RunStatus.FAILED),
        (SCOPE, RunStatus.COMPLETED),
    ]
    assert states[1].rows_removed == 5
    assert (states[2].cleanup_status, states[2].cleanup_reason) == (
        CleanupStatus.REFUSED,
        "flush_failed",
    )
    assert Project.objects.filter(scope="example").count() == 495

    # The project's own models: a failing source refused per model, a drop removed exactly 5.
    failed = {line.model: line for line in RunModelState.objects.filter(run=states[4].run)}
    assert {
        model: (line.flush_status, line.cleanup_status, line.cleanup_reason)
        for model, line in failed.items()
    } == {
        "example_project.owner": (
            FlushStatus.SUCCEEDED,
            CleanupStatus.REFUSED,
            "flush_failed",
        ),
        "example_project.repository": (FlushStatus.FAILED, CleanupStatus.REFUSED, "flush_failed"),
    }
    dropped = RunModelState.objects.get(run=states[5].run, model="example_project.repository")
    # Then undone (step 7): restored, every row back.
    assert (dropped.cleanup_status, dropped.rows_removed, dropped.rows_restored) == (
        CleanupStatus.RESTORED,
        5,
        5,
    )
    # A mass deletion withheld, then approved for the 200 rows shown (step 8).
    approved = RunModelState.objects.get(run=states[6].run, model="example_project.repository")
    assert (approved.cleanup_status, approved.rows_removed, approved.approved_count) == (
        CleanupStatus.DONE,
        200,
        200,
    )
    assert approved.approved_by == "demo"
    assert Repository.objects.filter(last_seen_run=states[6].run).count() == 100

    # Step 9: incremental reads. The failing one wrote a page with its cursor; the next one
    # started from step 8's cursor, not that one, and read exactly the other 200.
    ids = sorted(Repository.objects.values_list("github_id", flat=True))
    assert approved.cursor == ids[99]
    failing = RunModelState.objects.get(run=states[7].run, model="example_project.repository")
    assert (failing.flush_mode, failing.flush_status, failing.cursor) == (
        FlushMode.INCREMENTAL,
        FlushStatus.FAILED,
        ids[199],
    )
    resumed = RunModelState.objects.get(run=states[8].run, model="example_project.repository")
    assert (resumed.flush_mode, resumed.rows_created, resumed.rows_updated, resumed.cursor) == (
        FlushMode.INCREMENTAL,
        100,
        100,
        ids[-1],
    )
    assert (resumed.cleanup_status, resumed.cleanup_reason) == (
        CleanupStatus.REFUSED,
        "incremental_run",
    )
    read = Repository.objects.filter(last_seen_run=states[8].run)
    assert sorted(read.values_list("github_id", flat=True)) == ids[100:]
    assert (Owner.objects.count(), Repository.objects.count()) == (36, 300)

    assert not RunEvent.objects.pending().exists()
    text = out.getvalue()
    assert "nothing was lost" in text
    assert "   Before: 36 owner(s), 300 repositories.\n" in text
    assert "   After:  36 owner(s), 300 repositories: not one row lost.\n" in text
    assert "   -> removed exactly the 5 dropped repositories (github ids " in text
    assert "Restored 5 row(s) of run " in text
    assert "every restored row has its primary key and values back" in text
    assert "removed 200 row(s) of example_project.repository. Approved by demo." in text
    starting = f"resuming after repository id {ids[99]}, from run {states[6].run_id}\n"
    assert text.count(starting) == 2  # both incremental runs, the failed run's cursor unused
    assert (
        f"   -> run {states[7].run_id} failed after writing 100 repositories; its cursor "
        f"(repository id {ids[199]}) is not a starting point.\n"
    ) in text
    assert (
        f"   -> resumed after repository id {ids[99]} (run {states[6].run_id}'s cursor, not the "
        f"failed run's {ids[199]}): read exactly the 200 repositories after it (100 updated: "
        "those the failed run had written; 100 created)"
    ) in text
    assert "\n10. Deliver the events (drain_outbox --once)\n" in text
    assert " 0 pending." in text


@pytest.mark.django_db(transaction=True)
def test_demo_runs_again_on_a_database_it_filled() -> None:
    call_command("demo", stdout=StringIO(), stderr=StringIO())
    out = StringIO()
    call_command("demo", stdout=out, stderr=StringIO())
    assert "removed exactly the 5 dropped repositories" in out.getvalue()
    assert "read exactly the 200 repositories after it" in out.getvalue()
    assert (Owner.objects.count(), Repository.objects.count()) == (36, 300)
