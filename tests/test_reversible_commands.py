"""The commands of reversible cleanup, as an operator runs them: ``cleanup_old_projects
--approve N``, ``restore_cleanup``, ``purge_tombstones``: output, exit codes, what they leave."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from runs_app import services
from runs_app.models import CleanupStatus, Project, RunEvent, RunModelState
from tests.helpers import keys, stored, synced_run
from tests.test_data_commands import command_error, manage, run_command
from tests.test_reversible_cleanup import sync
from tests.tracked_app.models import Asset, Site

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_wrong_cleanup_undone_with_one_command() -> None:
    synced_run("s", keys(0, 10))
    run = synced_run("s", keys(0, 6))
    run_command("cleanup_old_projects", "--run", run.pk)
    assert sorted(stored("s")) == keys(0, 6)

    out, _ = run_command("restore_cleanup", "--run", run.pk, "--by", "alice")

    assert out == (
        f"Restored 4 row(s) of run {run.pk} (scope 's'), runs_app.project "
        "(first keys: p006, p007, p008, p009).\n"
    )
    assert sorted(stored("s")) == keys(0, 10)
    assert RunModelState.objects.get(run=run).restored_by == "alice"
    again, _ = run_command("restore_cleanup", "--run", run.pk)
    assert again.startswith(f"Nothing to do: the cleanup of run {run.pk} (scope 's')")


def test_restore_dry_run_lists_and_writes_nothing() -> None:
    synced_run("s", keys(0, 10))
    run = synced_run("s", keys(0, 8))
    run_command("cleanup_old_projects", "--run", run.pk)
    out, _ = run_command("restore_cleanup", "--run", run.pk, "--dry-run")
    assert out.startswith("Dry run: would restore 2 row(s)") and "p008, p009" in out
    assert sorted(stored("s")) == keys(0, 8)


def test_a_refused_mass_deletion_shows_its_plan_and_is_approved_for_that_size() -> None:
    synced_run("s", keys(0, 10))
    run = synced_run("s", keys(0, 3))

    refused = command_error("cleanup_old_projects", "--run", run.pk)

    assert refused.returncode == 1
    assert f"--run {run.pk} --model runs_app.project --approve 7" in str(refused)
    assert "first keys: p003, p004" in str(refused)

    out, _ = run_command("cleanup_old_projects", "--run", run.pk, "--approve", "7", "--by", "bob")

    assert out == f"Cleanup of run {run.pk} (scope 's'): removed 7 project(s). Approved by bob.\n"
    assert sorted(stored("s")) == keys(0, 3)


def test_an_approval_below_the_plan_is_refused_with_the_new_count() -> None:
    synced_run("s", keys(0, 10))
    run = synced_run("s", keys(0, 3))
    command_error("cleanup_old_projects", "--run", run.pk)

    refused = command_error("cleanup_old_projects", "--run", run.pk, "--approve", "5")

    assert refused.returncode == 1
    assert "approval_exceeded" in str(refused) and "removes 7" in str(refused)
    assert Project.objects.count() == 10


@pytest.mark.parametrize("value", ["-3", "0", "2.5", "many"])
def test_approve_with_a_bad_count_exits_2_with_a_message(value: str) -> None:
    synced_run("s", keys(0, 10))
    run = synced_run("s", keys(0, 3))
    events = RunEvent.objects.count()

    result = manage("cleanup_old_projects", "--run", run.pk, f"--approve={value}")

    assert result.returncode == 2, result.stderr
    assert "--approve" in result.stderr and "Traceback" not in result.stderr
    assert RunEvent.objects.count() == events


def test_restore_of_a_cleanup_that_never_ran_exits_1() -> None:
    run = synced_run("s", keys(0, 3))
    error = command_error("restore_cleanup", "--run", run.pk)
    assert error.returncode == 1 and "cleanup_not_run" in str(error)
    unknown = command_error("restore_cleanup", "--run", "nope")
    assert unknown.returncode == 2


def test_purge_tombstones_deletes_old_tombstones_with_their_audit() -> None:
    Site.objects.create(id=7, name="Paris")
    sync(Asset, "acme", range(10))
    run = sync(Asset, "acme", range(8))
    services.safe_cleanup(run, Asset)
    Asset.objects.filter(code="a009").update(deleted_at=timezone.now() - timedelta(days=40))

    dry, _ = run_command(
        "purge_tombstones", "--model", "tracked_app.Asset", "--older-than", "86400", "--dry-run"
    )
    out, _ = run_command(
        "purge_tombstones", "--model", "tracked_app.Asset", "--older-than", "86400"
    )

    assert dry.startswith("Dry run: would purge 1 tombstoned row(s) of tracked_app.asset")
    assert out.startswith("Purged 1 tombstoned row(s) of tracked_app.asset")
    assert not Asset.objects.filter(code="a009").exists()
    assert Asset.objects.tombstoned().count() == 1  # a008: tombstoned just now
    purged = RunEvent.objects.get(run=run, type="assets.purged")
    assert [row["code"] for row in purged.payload["rows"]] == ["a009"]
    line = RunModelState.objects.get(run=run, model="tracked_app.asset")
    assert (line.rows_purged, line.cleanup_status) == (1, CleanupStatus.DONE)


def test_purge_without_a_retention_or_of_a_deleting_model_exits_2() -> None:
    no_retention = command_error("purge_tombstones", "--model", "tracked_app.Asset")
    deleting = command_error(
        "purge_tombstones", "--model", "tracked_app.Device", "--older-than", "60"
    )
    assert no_retention.returncode == 2 and "TOMBSTONE_RETENTION" in str(no_retention)
    assert deleting.returncode == 2 and "does not soft-delete" in str(deleting)
