"""The run page's reversible-cleanup actions: Restore cleanup (its confirmation page lists what
will come back) and Approve withheld cleanup (for the size its confirmation page shows), through
the services, logged, with the operator named."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.admin.models import CHANGE, LogEntry
from django.test import Client
from django.urls import reverse

from runs_app import services
from runs_app.exceptions import CleanupRefused
from runs_app.models import CleanupStatus, Project, Run, RunEvent, RunModelState
from tests.helpers import keys, snapshot, stored, synced_run

pytestmark = pytest.mark.django_db(transaction=True)

RUNS = reverse("admin:runs_app_run_changelist")


def run_url(run: Run) -> str:
    return reverse("admin:runs_app_run_change", args=[run.pk])


def button_url(run: Run, slug: str) -> str:
    return reverse(f"admin:runs_app_run_{slug.replace('-', '_')}", args=[run.pk])


def history(run: Run) -> list[str]:
    entries = LogEntry.objects.filter(object_id=run.pk, action_flag=CHANGE).order_by("pk")
    return [entry.get_change_message() for entry in entries]


def cleaned_run() -> Run:
    synced_run("s", keys(0, 10))
    run = synced_run("s", keys(0, 7))
    services.safe_cleanup_old_projects(run)
    return run


def withheld_run() -> Run:
    synced_run("s", keys(0, 10))
    run = synced_run("s", keys(0, 3))
    with pytest.raises(CleanupRefused):
        services.safe_cleanup_old_projects(run)
    return run


def test_restore_shows_what_will_come_back_then_puts_it_back(admin_client: Client) -> None:
    run = cleaned_run()
    page = admin_client.get(run_url(run)).content.decode()
    assert 'id="runs-restore-cleanup"' in page
    assert 'id="runs-approve-withheld-cleanup"' not in page
    before = snapshot()

    confirm = admin_client.post(button_url(run, "restore-cleanup"))

    assert confirm.status_code == 200
    html = confirm.content.decode()
    assert "Yes, put the rows back" in html and "p007, p008, p009" in html
    assert snapshot() == before  # the preview is the restore rolled back

    admin_client.post(button_url(run, "restore-cleanup"), {"post": "yes"}, follow=True)

    assert sorted(stored("s")) == keys(0, 10)
    line = RunModelState.objects.get(run=run)
    assert (line.cleanup_status, line.rows_restored, line.restored_by) == (
        CleanupStatus.RESTORED,
        3,
        "admin",
    )
    assert history(run) == ["Restored the cleanup: runs_app.project: 3 row(s) back, 0 conflict(s)."]
    assert 'id="runs-restore-cleanup"' not in admin_client.get(run_url(run)).content.decode()


def test_a_restore_button_refuses_a_get(admin_client: Client) -> None:
    run = cleaned_run()
    assert admin_client.get(button_url(run, "restore-cleanup")).status_code == 405
    assert RunModelState.objects.get(run=run).cleanup_status == CleanupStatus.DONE


def test_approve_shows_the_withheld_plan_and_approves_that_size(admin_client: Client) -> None:
    run = withheld_run()
    page = admin_client.get(run_url(run)).content.decode()
    assert 'id="runs-approve-withheld-cleanup"' in page
    assert "The plan is withheld" in page and "withheld: 7 to approve" in page

    confirm = admin_client.post(button_url(run, "approve-withheld-cleanup"))

    html = confirm.content.decode()
    assert "Yes, remove at most the rows shown" in html
    assert f'name="approve:{run.pk}:runs_app.project" value="7"' in html
    assert Project.objects.count() == 10

    admin_client.post(
        button_url(run, "approve-withheld-cleanup"),
        {"post": "yes", f"approve:{run.pk}:runs_app.project": "7"},
        follow=True,
    )

    assert sorted(stored("s")) == keys(0, 3)
    line = RunModelState.objects.get(run=run)
    assert (line.approved_by, line.approved_count, line.cleanup_status) == ("admin", 7, "done")
    assert RunEvent.objects.get(run=run, type="cleanup.approved").payload["approved_by"] == "admin"
    assert history(run) == [
        "Approved the withheld cleanup: runs_app.project: 7 row(s) removed of 7 approved."
    ]


@pytest.mark.parametrize("posted", [{}, {"approve:{run}:runs_app.project": "5"}])
def test_an_approval_is_of_the_count_shown_never_more(
    admin_client: Client, posted: dict[str, Any]
) -> None:
    run = withheld_run()
    data = {"post": "yes", **{key.format(run=run.pk): value for key, value in posted.items()}}

    response = admin_client.post(button_url(run, "approve-withheld-cleanup"), data, follow=True)

    assert Project.objects.count() == 10
    message = " ".join(str(m) for m in response.context["messages"])
    assert ("approval_exceeded" in message) if posted else ("count shown" in message)
    assert history(run) == []
