"""The admin's actions go through the services, ask before what cannot be undone, are written to
the admin log, and name the operator in the events they write. Also the operator services'
``actor`` argument itself.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.messages import get_messages
from django.http import HttpResponse
from django.test import Client
from django.urls import reverse

from runs_app import services
from runs_app.exceptions import InvalidInput
from runs_app.models import Run, RunEvent, RunOutbox, RunState
from runs_app.services.validation import ACTOR_MAX_LENGTH
from runs_app.testing import RunsOutbox
from tests import scenarios
from tests.factories import RunFactory
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
    """Blocked at its first event (run.started), a ``<script>`` in a payload and the error."""
    run = RunFactory(scope=scope, id=run_id, blocked=True)
    services.append_events(
        run,
        [
            {"type": "project.seen", "payload": {"name": SCRIPT}},
            {"type": "project.seen", "payload": {"name": "second"}},
        ],
    )
    return run


def history(run: Run) -> list[tuple[str, str]]:
    """The run's admin log (its History page), oldest first: (username, message)."""
    entries = LogEntry.objects.filter(object_id=run.pk, action_flag=CHANGE).order_by("pk")
    assert all(entry.content_type.model_class() is Run for entry in entries)
    return [(entry.user.get_username(), entry.get_change_message()) for entry in entries]


def last_event(run: Run) -> RunEvent:
    event = RunEvent.objects.filter(run=run).order_by("-seq").first()
    assert event is not None
    return event


# ---------------------------------------------------------------------------------------------
# Retry delivery now


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
    delivered = runs_outbox.drain()
    assert [(message.seq, message.type) for message in delivered] == [
        (1, "run.started"),
        (2, "project.seen"),
        (3, "project.seen"),
        (4, "outbox.retried"),
    ]
    assert delivered[-1].payload == {"actor": "admin"}
    assert history(run) == [("admin", "Retried delivery now.")]


# ---------------------------------------------------------------------------------------------
# Skip blocked event


def test_skip_blocked_event_asks_for_confirmation_first(admin_client: Client) -> None:
    run = blocked_run()
    before = snapshot()

    response = run_action(admin_client, RUNS, "skip_blocked_event", run.pk)

    assert response.status_code == 200
    assert response.templates[0].name == "admin/runs_app/skip_blocked_event_confirmation.html"
    assert response.templates[1].name == "admin/runs_app/confirmation.html"
    html = response.content.decode()
    assert "Yes, skip these events" in html
    assert "run.started" in html  # the head event (seq 1) is what would be skipped
    assert "broker down " + ESCAPED_SCRIPT in html
    assert SCRIPT not in html
    assert 'name="_selected_action" value="run-blocked"' in html
    assert 'name="action" value="skip_blocked_event"' in html
    assert snapshot() == before
    assert history(run) == []


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
    assert delivered[-1].payload["actor"] == "admin"
    assert delivered[-1].payload["seq"] == 1
    assert history(run) == [("admin", "Skipped the blocked event: seq 1 (run.started).")]


def test_skip_leaves_runs_that_are_not_blocked_alone(admin_client: Client) -> None:
    run = RunFactory(scope="alpha", id="run-fine")
    before = snapshot()

    response = run_action(admin_client, RUNS, "skip_blocked_event", run.pk, confirm=True)

    assert texts(response) == [("warning", "Not blocked, nothing skipped: run-fine.")]
    assert snapshot() == before
    assert history(run) == []


def test_skip_of_a_mixed_selection_confirms_only_the_blocked_runs(admin_client: Client) -> None:
    blocked = blocked_run()
    fine = RunFactory(scope="alpha", id="run-fine")

    response = run_action(admin_client, RUNS, "skip_blocked_event", blocked.pk, fine.pk)
    html = response.content.decode()
    assert "Not blocked, left alone: run-fine." in html
    assert 'value="run-fine"' not in html  # not carried to the confirmation's post
    assert texts(response) == []

    response = run_action(admin_client, RUNS, "skip_blocked_event", blocked.pk, confirm=True)
    assert texts(response) == [("success", "Skipped the blocked event for 1 run(s): run-blocked.")]
    assert RunOutbox.objects.get(pk=fine.pk).next_seq == 1


def test_skipping_a_gap_is_logged_as_such(admin_client: Client) -> None:
    run = RunFactory(scope="gaps", id="run-gap", events=3, blocked=True)
    RunEvent.objects.filter(run=run, seq=1).delete()
    response = run_action(admin_client, RUNS, "skip_blocked_event", run.pk)
    assert "run-gap: broker down" in response.content.decode()  # listed among the gaps
    run_action(admin_client, RUNS, "skip_blocked_event", run.pk, confirm=True)
    assert RunOutbox.objects.get(pk=run.pk).next_seq == 2
    assert history(run) == [("admin", "Skipped the gap blocking delivery.")]
    assert last_event(run).payload["actor"] == "admin"


# ---------------------------------------------------------------------------------------------
# Mark failed


def test_mark_failed_asks_for_confirmation_first(admin_client: Client) -> None:
    active = RunFactory(scope="alpha", id="run-active")
    done = RunFactory(scope="beta", id="run-done", completed=True)
    before = snapshot()

    response = run_action(admin_client, RUNS, "mark_failed", active.pk, done.pk)

    assert response.templates[0].name == "admin/runs_app/mark_failed_confirmation.html"
    html = response.content.decode()
    assert "Yes, mark them failed" in html
    table = html[html.index('id="runs-fail-runs"') :]
    table = table[: table.index("</table>")]
    assert "run-active" in table and "run-done" not in table
    assert "Not active, left as they are: run-done." in html
    assert 'name="_selected_action" value="run-active"' in html
    assert 'value="run-done"' not in html
    assert texts(response) == []
    assert snapshot() == before


def test_mark_failed_fails_active_runs_through_the_service(admin_client: Client) -> None:
    active = RunFactory(scope="alpha", id="run-active")
    done = RunFactory(scope="beta", id="run-done", completed=True)

    response = run_action(admin_client, RUNS, "mark_failed", active.pk, done.pk, confirm=True)

    assert texts(response) == [
        ("warning", "Not active, left as they are: run-done."),
        ("success", "Marked failed for 1 run(s): run-active."),
    ]
    state = RunState.objects.get(pk=active.pk)
    assert state.status == "failed"
    assert state.error == "Marked failed in the admin by admin."
    event = last_event(active)
    assert event.type == "run.failed"
    assert event.payload == {"reason": "marked_failed", "error": state.error, "actor": "admin"}
    assert RunState.objects.get(pk=done.pk).status == "completed"
    assert history(active) == [("admin", "Marked failed.")]
    assert history(done) == []


# ---------------------------------------------------------------------------------------------
# The run page's buttons, the History page, permissions


def test_run_page_buttons_run_the_same_actions(
    admin_client: Client, runs_outbox: RunsOutbox
) -> None:
    run = blocked_run()
    page = reverse("admin:runs_app_run_change", args=[run.pk])

    retry = reverse("admin:runs_app_run_retry_delivery", args=[run.pk])
    assert admin_client.get(retry).status_code == 405  # nothing is done on a GET
    assert RunOutbox.objects.get(pk=run.pk).blocked_at is not None
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
    assert admin_client.get(fail).status_code == 405
    confirmation = admin_client.post(fail)
    assert "Yes, mark them failed" in confirmation.content.decode()
    assert RunState.objects.get(pk=run.pk).status == "active"
    response = admin_client.post(fail, {"post": "yes"}, follow=True)
    assert response.redirect_chain == [(page, 302)]
    assert ("success", "Marked failed for 1 run(s): run-blocked.") in texts(response)
    assert RunState.objects.get(pk=run.pk).status == "failed"
    assert "runs-mark-failed" not in admin_client.get(page).content.decode()

    missing = reverse("admin:runs_app_run_retry_delivery", args=["no-such-run"])
    assert admin_client.post(missing).status_code == 404


def test_the_history_page_says_who_did_what(client: Client) -> None:
    run = blocked_run()
    client.force_login(make_staff("night-operator", "view_run", "change_run"))
    run_action(client, RUNS, "retry_delivery", run.pk)
    run_action(client, RUNS, "mark_failed", run.pk, confirm=True)

    html = client.get(reverse("admin:runs_app_run_history", args=[run.pk])).content.decode()
    assert html.count("night-operator") >= 2
    assert "Retried delivery now." in html and "Marked failed." in html
    assert history(run) == [
        ("night-operator", "Retried delivery now."),
        ("night-operator", "Marked failed."),
    ]
    assert last_event(run).payload["actor"] == "night-operator"


def test_a_failing_service_is_reported_and_not_logged(admin_client: Client) -> None:
    run = RunFactory(scope="alpha", id="run-gone")
    RunOutbox.objects.filter(pk=run.pk).delete()
    response = run_action(admin_client, RUNS, "retry_delivery", run.pk)
    assert texts(response) == [("error", "Run run-gone: No run with id 'run-gone'.")]
    assert history(run) == []


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
    page = client.get(reverse("admin:runs_app_run_change", args=[run.pk]))
    assert page.context["buttons"] == []
    assert (
        client.post(reverse("admin:runs_app_run_skip_blocked_event", args=[run.pk])).status_code
        == 403
    )


# ---------------------------------------------------------------------------------------------
# The services' actor argument


def test_without_an_actor_the_services_write_what_they_always_wrote(
    runs_outbox: RunsOutbox,
) -> None:
    run = RunFactory(scope="plain", id="run-plain", blocked=True)
    services.retry_outbox(run)
    assert Run.objects.get(pk=run.pk).last_seq == 1  # no event for a plain retry
    scenarios.block_outbox(run)
    services.skip_outbox_event(run)
    assert "actor" not in last_event(run).payload
    other = RunFactory(scope="plain-2", id="run-plain-2")
    services.fail_run(other, "boom")
    assert last_event(other).payload == {"reason": "error", "error": "boom"}


def test_the_services_name_their_actor() -> None:
    run = RunFactory(scope="named", id="run-named", blocked=True)
    services.retry_outbox(run, actor="ops@example.com")
    assert (last_event(run).type, last_event(run).payload) == (
        "outbox.retried",
        {"actor": "ops@example.com"},
    )
    scenarios.block_outbox(run)
    services.skip_outbox_event(run, actor="ops@example.com")
    assert last_event(run).payload["actor"] == "ops@example.com"
    services.fail_run(run, "given up", actor="ops@example.com")
    assert last_event(run).payload == {
        "reason": "error",
        "error": "given up",
        "actor": "ops@example.com",
    }


@pytest.mark.parametrize(
    ("actor", "message"),
    [
        ("", "must not be empty"),
        ("x" * (ACTOR_MAX_LENGTH + 1), f"is {ACTOR_MAX_LENGTH + 1} characters; the limit is 150"),
        ("ops\nroot", "must not contain control characters"),
        ("ops\x00", "contains a NUL character"),
        (42, "must be a string, not int"),
    ],
)
def test_a_bad_actor_is_refused_before_anything_is_written(actor: Any, message: str) -> None:
    run = RunFactory(scope="bad", id="run-bad", blocked=True)
    before = snapshot()
    for call in [
        lambda: services.retry_outbox(run, actor=actor),
        lambda: services.skip_outbox_event(run, actor=actor),
        lambda: services.fail_run(run, "x", actor=actor),
    ]:
        with pytest.raises(InvalidInput) as raised:
            call()
        assert raised.value.field == "actor"
        assert message in str(raised.value)
    assert snapshot() == before
