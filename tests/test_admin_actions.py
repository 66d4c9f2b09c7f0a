"""The admin's actions go through the services and their effects are visible."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.messages import get_messages
from django.http import HttpResponse
from django.test import Client
from django.urls import reverse

from runs_app import services
from runs_app.models import Run, RunEvent, RunOutbox, RunState
from runs_app.testing import RunsOutbox
from tests import scenarios
from tests.helpers import snapshot
from tests.scenarios import ESCAPED_SCRIPT, SCRIPT, make_staff

pytestmark = pytest.mark.django_db

RUNS = reverse("admin:runs_app_run_changelist")
OUTBOXES = reverse("admin:runs_app_runoutbox_changelist")


def texts(response: HttpResponse) -> list[tuple[str, str]]:
    return [(message.level_tag, message.message) for message in get_messages(response.wsgi_request)]


def run_action(
    client: Client, url: str, action: str, *run_ids: str, confirm: bool = False
) -> HttpResponse:
    data: dict[str, Any] = {"action": action, "_selected_action": list(run_ids)}
    if confirm:
        data["post"] = "yes"
    return client.post(url, data, follow=True)


def blocked_run(run_id: str = "run-blocked", scope: str = "delta") -> Run:
    run = services.create_run(
        scope,
        run_id=run_id,
        events=[
            {"type": "project.seen", "payload": {"name": SCRIPT}},
            {"type": "project.seen", "payload": {"name": "second"}},
        ],
    )
    scenarios.block_outbox(run)
    return run


@pytest.mark.parametrize("url", [RUNS, OUTBOXES])
def test_retry_delivery_now_makes_a_blocked_run_claimable(
    admin_client: Client, runs_outbox: RunsOutbox, url: str
) -> None:
    run = blocked_run()
    assert runs_outbox.drain() == []  # blocked: the relay leaves it alone

    response = run_action(admin_client, url, "retry_delivery", run.pk)

    assert ("success", "Delivery retried now for 1 run(s): run-blocked.") in texts(response)
    outbox = RunOutbox.objects.get(pk=run.pk)
    assert (outbox.blocked_at, outbox.attempts, outbox.next_attempt_at) == (None, 0, None)
    assert [message.seq for message in runs_outbox.drain()] == [1, 2, 3]


def test_skip_blocked_event_asks_for_confirmation_first(admin_client: Client) -> None:
    run = blocked_run()
    before = snapshot()

    response = run_action(admin_client, RUNS, "skip_blocked_event", run.pk)

    assert response.status_code == 200
    assert response.templates[0].name == "admin/runs_app/skip_blocked_event_confirmation.html"
    html = response.content.decode()
    assert "Yes, skip these events" in html
    assert "run.started" in html  # the head event (seq 1) is what would be skipped
    assert "broker down " + ESCAPED_SCRIPT in html
    assert SCRIPT not in html
    assert 'name="_selected_action" value="run-blocked"' in html
    assert snapshot() == before


@pytest.mark.parametrize("url", [RUNS, OUTBOXES])
def test_skip_blocked_event_skips_the_head_and_records_it(
    admin_client: Client, runs_outbox: RunsOutbox, url: str
) -> None:
    run = blocked_run()

    response = run_action(admin_client, url, "skip_blocked_event", run.pk, confirm=True)

    assert ("success", "Skipped the blocked event for 1 run(s): run-blocked.") in texts(response)
    head = RunEvent.objects.get(run=run, seq=1)
    assert head.skipped_at is not None and head.published_at is None
    outbox = RunOutbox.objects.get(pk=run.pk)
    assert outbox.next_seq == 2 and outbox.blocked_at is None
    delivered = runs_outbox.drain()
    assert [(message.seq, message.type) for message in delivered] == [
        (2, "project.seen"),
        (3, "project.seen"),
        (4, "outbox.skipped"),
    ]


def test_skip_leaves_runs_that_are_not_blocked_alone(admin_client: Client) -> None:
    run = scenarios.active_run("alpha", "run-fine")
    before = snapshot()

    response = run_action(admin_client, RUNS, "skip_blocked_event", run.pk, confirm=True)

    assert texts(response) == [("warning", "Not blocked, nothing skipped: run-fine.")]
    assert snapshot() == before


def test_mark_failed_fails_active_runs_through_the_service(admin_client: Client) -> None:
    active = scenarios.active_run("alpha", "run-active")
    done = scenarios.completed_run("beta", "run-done")
    done_state = RunState.objects.get(pk=done.pk)

    response = run_action(admin_client, RUNS, "mark_failed", active.pk, done.pk)

    assert texts(response) == [
        ("warning", "Not active, left as they are: run-done."),
        ("success", "Marked failed for 1 run(s): run-active."),
    ]
    state = RunState.objects.get(pk=active.pk)
    assert state.status == "failed"
    assert state.error == "Marked failed in the admin by admin."
    last = RunEvent.objects.filter(run=active).order_by("-seq").first()
    assert last is not None and last.type == "run.failed"
    assert last.payload == {"reason": "marked_failed", "error": state.error}
    assert RunState.objects.get(pk=done.pk).status == done_state.status == "completed"


def test_run_page_buttons_run_the_same_actions(
    admin_client: Client, runs_outbox: RunsOutbox
) -> None:
    run = blocked_run()
    page = reverse("admin:runs_app_run_change", args=[run.pk])
    html = admin_client.get(page).content.decode()
    for button in ["runs-retry-delivery", "runs-skip-blocked-event", "runs-mark-failed"]:
        assert button in html

    retry = reverse("admin:runs_app_run_retry_delivery", args=[run.pk])
    assert admin_client.get(retry).status_code == 405
    response = admin_client.post(retry)
    assert response.status_code == 302 and response["Location"] == page
    assert RunOutbox.objects.get(pk=run.pk).blocked_at is None

    scenarios.block_outbox(run)
    skip = reverse("admin:runs_app_run_skip_blocked_event", args=[run.pk])
    confirmation = admin_client.post(skip)
    assert "Yes, skip these events" in confirmation.content.decode()
    assert RunOutbox.objects.get(pk=run.pk).next_seq == 1
    response = admin_client.post(skip, {"post": "yes"}, follow=True)
    assert ("success", "Skipped the blocked event for 1 run(s): run-blocked.") in texts(response)
    assert RunOutbox.objects.get(pk=run.pk).next_seq == 2

    fail = reverse("admin:runs_app_run_mark_failed", args=[run.pk])
    response = admin_client.post(fail, follow=True)
    assert ("success", "Marked failed for 1 run(s): run-blocked.") in texts(response)
    assert RunState.objects.get(pk=run.pk).status == "failed"
    assert "runs-mark-failed" not in admin_client.get(page).content.decode()

    missing = reverse("admin:runs_app_run_retry_delivery", args=["no-such-run"])
    assert admin_client.post(missing).status_code == 404


def test_actions_need_the_change_permission(client: Client) -> None:
    run = blocked_run()
    client.force_login(make_staff("operator", "view_run", "change_run"))
    response = run_action(client, RUNS, "retry_delivery", run.pk)
    assert ("success", "Delivery retried now for 1 run(s): run-blocked.") in texts(response)

    scenarios.block_outbox(run)
    client.force_login(make_staff("looker", "view_run", "view_runoutbox"))
    for url in [RUNS, OUTBOXES]:
        response = run_action(client, url, "retry_delivery", run.pk)
        assert response.status_code == 200
        assert response.context["action_form"] is None  # no action offered
        assert texts(response) == []  # and the forged one ignored
    assert RunOutbox.objects.get(pk=run.pk).blocked_at is not None


def test_skip_of_a_mixed_selection_confirms_only_the_blocked_runs(admin_client: Client) -> None:
    blocked = blocked_run()
    fine = scenarios.active_run("alpha", "run-fine")

    response = run_action(admin_client, RUNS, "skip_blocked_event", blocked.pk, fine.pk)
    html = response.content.decode()
    assert "Not blocked, left alone: run-fine." in html
    assert 'value="run-fine"' not in html  # not carried to the confirmation's post
    assert texts(response) == []

    response = run_action(admin_client, RUNS, "skip_blocked_event", blocked.pk, confirm=True)
    assert texts(response) == [("success", "Skipped the blocked event for 1 run(s): run-blocked.")]
    assert RunOutbox.objects.get(pk=fine.pk).next_seq == 1
