"""The README's main job (``manage.py demo``) on the test database."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command

from example_project.management.commands.sync_repositories import SCOPE
from example_project.models import Owner, Repository
from runs_app.models import (
    CleanupStatus,
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
    assert (Owner.objects.count(), Repository.objects.count()) == (36, 100)

    assert not RunEvent.objects.pending().exists()
    text = out.getvalue()
    assert "nothing was lost" in text
    assert "   Before: 36 owner(s), 300 repositories.\n" in text
    assert "   After:  36 owner(s), 300 repositories: not one row lost.\n" in text
    assert "   -> removed exactly the 5 dropped repositories (github ids " in text
    assert "Restored 5 row(s) of run " in text
    assert "every restored row has its primary key and values back" in text
    assert "removed 200 row(s) of example_project.repository. Approved by demo." in text


@pytest.mark.django_db(transaction=True)
def test_demo_runs_again_on_a_database_it_filled() -> None:
    call_command("demo", stdout=StringIO(), stderr=StringIO())
    out = StringIO()
    call_command("demo", stdout=out, stderr=StringIO())
    assert "removed exactly the 5 dropped repositories" in out.getvalue()
    assert (Owner.objects.count(), Repository.objects.count()) == (36, 100)
