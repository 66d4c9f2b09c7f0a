"""The read-only admin: pages, the run list's columns, the run page's banner and buttons,
escaping, filters, permissions, styles, translations and the query count of the lists.

The actions are in test_admin_actions.py, the browser's view (widths, screenshots) in
test_browser.py. States are made with the factories' traits (tests/factories.py).
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from django.contrib.staticfiles import finders
from django.db import connection
from django.templatetags.static import static
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from django.utils.functional import Promise

from runs_app import services
from runs_app.admin.base import STYLESHEET
from runs_app.admin.delivery import DELIVERY_FIELDS
from runs_app.admin.outbox import RunOutboxAdmin
from runs_app.admin.run import TIMELINE_EVENTS, RunAdmin
from runs_app.exceptions import CleanupRefused
from runs_app.models import Project, Run, RunEvent, RunOutbox, RunState
from runs_app.testing import RunsOutbox
from runs_app.tracking_admin import RUN_STAMPS, NotSeenByLatestRunFilter, TrackedModelAdminMixin
from tests.factories import AdminStory, ProjectFactory, RunFactory
from tests.helpers import snapshot
from tests.scenarios import ESCAPED_SCRIPT, SCRIPT, make_staff

pytestmark = pytest.mark.django_db

MODELS = ["run", "runstate", "runoutbox", "runevent", "project"]


def changelist(model: str) -> str:
    return reverse(f"admin:runs_app_{model}_changelist")


def change(model: str, pk: Any) -> str:
    return reverse(f"admin:runs_app_{model}_change", args=[pk])


@pytest.fixture
def story(admin_story: AdminStory) -> AdminStory:
    return admin_story


@pytest.fixture
def viewer(client: Client) -> Client:
    """Staff with the view permission of every runs_app model, and nothing else."""
    client.force_login(make_staff("viewer", *(f"view_{model}" for model in MODELS)))
    return client


def pks(story: AdminStory) -> dict[str, list[Any]]:
    runs = [story.active, story.completed, story.failed_flush, story.blocked, story.big]
    return {
        "run": [run.pk for run in runs],
        "runstate": [run.pk for run in runs],
        "runoutbox": [run.pk for run in runs],
        "runevent": list(
            RunEvent.objects.filter(run__in=runs, seq__lte=3).values_list("pk", flat=True)
        ),
        "project": list(Project.objects.values_list("pk", flat=True)),
    }


def test_every_list_and_page_renders_for_a_viewer(viewer: Client, story: AdminStory) -> None:
    for model, keys in pks(story).items():
        response = viewer.get(changelist(model))
        assert response.status_code == 200, model
        assert keys, model
        for pk in keys:
            page = viewer.get(change(model, pk))
            assert page.status_code == 200, (model, pk)
            # View-only: the form has no editable field and no save button.
            assert page.context["adminform"].form.fields == {}
            assert b'name="_save"' not in page.content


def test_run_list_shows_the_facts_of_every_run(viewer: Client, story: AdminStory) -> None:
    response = viewer.get(changelist("run"))
    rows = {row.pk: row for row in response.context["cl"].result_list}
    assert list(rows) == [
        "run-big",
        "run-blocked",
        "run-failed-flush",
        "run-completed",
        "run-active",
    ]
    big = rows["run-big"]
    assert (big.delivered_up_to, big.pending_events, big.last_seq) == (0, 1000, 1000)
    assert big.oldest_pending_at is not None
    blocked = rows["run-blocked"]
    assert (blocked.delivered_up_to, blocked.pending_events) == (0, 2)
    html = response.content.decode()
    assert "1000 pending for" in html
    assert 'title="flush_failed">cleanup refused</span>' in html  # the reason as tooltip


def test_run_list_shows_the_columns_that_matter(viewer: Client, story: AdminStory) -> None:
    response = viewer.get(changelist("run"))
    assert response.context["cl"].list_display == [
        "id",
        "scope",
        "status_summary",
        "started",
        "run_duration",
        "delivery",
    ]
    headers = [header["text"] for header in response.context["result_headers"]]
    assert headers == ["id", "scope", "status", "started", "duration", "delivery"]


def cells(html: str, run_id: str, column: str) -> str:
    """The HTML of one cell of the run list: the ``column`` of the run ``run_id``."""
    row = html[html.index(f">{run_id}</a>") :]
    row = row[: row.index("</tr>")]
    cell = row[row.index(f'class="field-{column}"') :]
    return cell[: cell.index("</td>")]


def test_blocked_is_a_red_badge_on_blocked_runs_only(viewer: Client, story: AdminStory) -> None:
    html = viewer.get(changelist("run")).content.decode()
    blocked = '<span class="runs-badge runs-badge--bad">blocked</span>'
    assert html.count(blocked) == 1
    assert blocked in cells(html, "run-blocked", "delivery")
    for run_id in ["run-big", "run-failed-flush", "run-completed", "run-active"]:
        assert "runs-badge" not in cells(html, run_id, "delivery"), run_id
    # Red badges say what went wrong, and only where something did.
    assert "runs-badge--bad" not in cells(html, "run-completed", "status_summary")
    failed = cells(html, "run-failed-flush", "status_summary")
    assert failed.count("runs-badge--bad") == 3  # failed, flush failed, cleanup refused
    assert "runs-badge--ok" in cells(html, "run-completed", "status_summary")
    assert 'alt="True"' not in html and 'alt="False"' not in html  # no more ticks and crosses


def test_times_show_seconds_and_the_time_zone(viewer: Client, story: AdminStory) -> None:
    started = RunState.objects.get(pk="run-active").started_at
    expected = started.strftime("%Y-%m-%d %H:%M:%S") + " UTC"
    html = viewer.get(changelist("run")).content.decode()
    cell = cells(html, "run-active", "started")
    assert f'<time class="runs-time" datetime="{started.isoformat()}">{expected}</time>' in cell
    page = viewer.get(change("run", "run-active")).content.decode()
    assert f">{expected}</time>" in page
    with timezone.override("Europe/Paris"):
        local = timezone.localtime(started)
        html = viewer.get(changelist("run")).content.decode()
    zone = local.tzname()
    assert zone is not None
    assert local.strftime("%Y-%m-%d %H:%M:%S ") + zone in cells(html, "run-active", "started")


def test_run_list_counts_delivery_after_progress(viewer: Client, story: AdminStory) -> None:
    # The relay delivered 400 of big's 1000 events: delivered up to 400, 600 pending.
    RunEvent.objects.filter(run=story.big, seq__lte=400).update(published_at=story.big.created_at)
    RunOutbox.objects.filter(run=story.big).update(next_seq=401)
    RunEvent.objects.filter(run=story.big, seq=401).update(created_at=story.big.created_at)
    response = viewer.get(changelist("run") + "?q=run-big")
    (big,) = response.context["cl"].result_list
    assert (big.delivered_up_to, big.pending_events) == (400, 600)
    assert big.oldest_pending_at == story.big.created_at


def test_run_page_tells_the_whole_story(viewer: Client, story: AdminStory) -> None:
    html = viewer.get(change("run", story.failed_flush.pk)).content.decode()
    for text in [
        "Flush ledger",
        "Cleanup ledger",
        "Delivery (outbox)",
        "flush_failed",
        "The run&#x27;s flush failed: deleting unseen projects could lose data.",
        "flush_failed: source timed out",  # the run's error, from the fail-safe completion
        "run.failed",  # in the timeline
        "run.started",
    ]:
        assert text in html, text

    html = viewer.get(change("run", story.completed.pk)).content.decode()
    assert "Flush sessions" in html and "succeeded" in html

    html = viewer.get(change("run", story.blocked.pk)).content.decode()
    assert "Blocked since" in html
    assert "broker down" in html
    assert "Next attempt" in html

    html = viewer.get(change("run", story.big.pk)).content.decode()
    assert "held by relay-host:4242 until" in html


def banners(client: Client, run: Run) -> dict[str, str]:
    """The run page's banners, by id, as text."""
    response = client.get(change("run", run.pk))
    assert response.status_code == 200
    return {
        banner.id: f"{banner.title} | {banner.detail} | {banner.advice}"
        for banner in response.context["banners"]
    }


def test_a_blocked_run_page_says_what_is_wrong_and_what_to_do(
    viewer: Client, story: AdminStory
) -> None:
    shown = banners(viewer, story.blocked)
    assert list(shown) == ["runs-banner-blocked"]
    text = shown["runs-banner-blocked"]
    assert text.startswith("Delivery is blocked at event seq 1 (run.started).")
    assert f"broker down {SCRIPT}" in text  # escaped by the template
    assert "Retry delivery now" in text and "Skip blocked event" in text
    html = viewer.get(change("run", story.blocked.pk)).content.decode()
    banner = html[html.index('id="runs-banner-blocked"') :]
    assert banner.index("runs-banner") < html.index("Delivery (outbox)")  # at the top
    assert f"broker down {ESCAPED_SCRIPT}" in banner and SCRIPT not in html


def test_a_gap_is_named_in_the_banner(viewer: Client) -> None:
    run = RunFactory.create(scope="gaps", id="run-gap", events=3, blocked=True)
    RunEvent.objects.filter(run=run, seq=1).delete()
    assert banners(viewer, run)["runs-banner-blocked"].startswith(
        "Delivery is blocked at event seq 1, which is missing (a gap)."
    )


def test_a_failed_run_page_says_why(viewer: Client, story: AdminStory) -> None:
    shown = banners(viewer, story.failed_flush)
    assert list(shown) == ["runs-banner-failed", "runs-banner-cleanup-refused"]
    assert shown["runs-banner-failed"].startswith(
        f"This run failed (flush_failed). | flush_failed: source timed out {SCRIPT}"
    )
    assert "start a new run of the scope gamma" in shown["runs-banner-failed"]
    assert shown["runs-banner-cleanup-refused"].startswith(
        "Cleanup refused (flush_failed). | The run's flush failed"
    )
    crashed = RunFactory.create(scope="crashes", id="run-crashed", failed=True)
    assert banners(viewer, crashed)["runs-banner-failed"].startswith(
        f"This run failed (error). | job crashed {SCRIPT}"
    )


def test_an_incremental_runs_refused_cleanup_is_no_problem(viewer: Client) -> None:
    run = services.create_run("feed")
    with services.flush(run, incremental=True) as flush:
        flush.write([{"key": "k1", "name": "K1"}], cursor=1)
    services.complete_run(run)
    with pytest.raises(CleanupRefused):
        services.safe_cleanup_old_projects(run)
    assert banners(viewer, run) == {}
    html = viewer.get(changelist("run")).content.decode()
    row = html[html.index(f">{run.pk}<") :]
    row = row[: row.index("</tr>")]
    assert "runs-badge--bad" not in row and "cleanup refused" not in row
    page = viewer.get(change("run", run.pk)).content.decode()
    assert "refused: incremental_run" in page and "incremental, cursor 1" in page


def test_a_healthy_run_page_has_no_banner(viewer: Client, story: AdminStory) -> None:
    for run in [story.active, story.completed, story.big]:
        assert banners(viewer, run) == {}, run.pk
        assert "runs-banner" not in viewer.get(change("run", run.pk)).content.decode()


def buttons(client: Client, run: Run) -> list[str]:
    response = client.get(change("run", run.pk))
    assert response.status_code == 200
    return [button["id"] for button in response.context["buttons"]]


def test_the_run_page_shows_only_the_buttons_that_apply(
    admin_client: Client, runs_outbox: RunsOutbox
) -> None:
    retry, skip, fail = "runs-retry-delivery", "runs-skip-blocked-event", "runs-mark-failed"
    active = RunFactory.create(scope="a", id="run-a")  # run.started not yet delivered
    blocked = RunFactory.create(scope="b", id="run-b", blocked=True)
    done = RunFactory.create(scope="c", id="run-c", completed=True)
    failed = RunFactory.create(scope="d", id="run-d", failed=True)
    assert buttons(admin_client, active) == [retry, fail]
    assert buttons(admin_client, blocked) == [retry, skip, fail]
    assert buttons(admin_client, done) == [retry]
    assert buttons(admin_client, failed) == [retry]

    runs_outbox.drain()  # everything delivered but the blocked run
    assert buttons(admin_client, active) == [fail]
    assert buttons(admin_client, done) == []
    assert buttons(admin_client, failed) == []
    html = admin_client.get(change("run", done.pk)).content.decode()
    assert "runs-tool" not in html and "All events" in html


def test_every_page_uses_the_stylesheet_and_no_inline_style(
    admin_client: Client, story: AdminStory
) -> None:
    stylesheet = finders.find(STYLESHEET)
    assert stylesheet is not None
    css = Path(stylesheet).read_text()
    for rule in [".runs-badge--bad", ".runs-time", ".runs-banner", "button.runs-tool"]:
        assert rule in css, rule
    link = f'<link href="{static(STYLESHEET)}" media="all" rel="stylesheet">'
    for model, keys in pks(story).items():
        for url in [changelist(model), change(model, keys[0])]:
            html = admin_client.get(url).content.decode()
            assert link in html, url
            assert "<style" not in html and "runs-badge--" not in _inline_styles(html), url
    html = admin_client.get(change("run", story.failed_flush.pk)).content.decode()
    assert ' style="' not in _runs_markup(html)


def _inline_styles(html: str) -> str:
    return " ".join(re.findall(r'style="([^"]*)"', html))


def _runs_markup(html: str) -> str:
    """The markup runs_app adds to a page (its classes start with runs-)."""
    return " ".join(re.findall(r"<[^>]*runs-[^>]*>", html))


def test_the_strings_are_marked_for_translation() -> None:
    # Any: the options are read off the classes; django-stubs declares them per instance.
    model_admins: list[Any] = [RunAdmin, RunOutboxAdmin]
    for model_admin in model_admins:
        for name in [*model_admin.list_display, *DELIVERY_FIELDS]:
            column = getattr(model_admin, name, None)
            if column is not None and callable(column):
                assert isinstance(column.short_description, Promise), name
        for action in model_admin.actions:
            assert isinstance(getattr(model_admin, action).short_description, Promise), action
    for button in RunAdmin.buttons:
        assert isinstance(button.label, Promise), button.action
    assert isinstance(NotSeenByLatestRunFilter.title, Promise)
    for column in RUN_STAMPS.values():
        assert isinstance(getattr(TrackedModelAdminMixin, column).short_description, Promise)


def test_script_in_a_payload_or_an_error_shows_as_text(viewer: Client, story: AdminStory) -> None:
    pages = [
        change("run", story.failed_flush.pk),  # error, flush error
        change("run", story.blocked.pk),  # payload in the timeline, delivery error
        changelist("runoutbox"),  # delivery error in the list
        change("runoutbox", story.blocked.pk),
        change("runstate", story.failed_flush.pk),
        changelist("runevent") + "?q=run-blocked",
        change("runevent", RunEvent.objects.get(run=story.blocked, seq=2).pk),
        changelist("project"),
        change("project", Project.objects.get().pk),
    ]
    for url in pages:
        html = viewer.get(url).content.decode()
        assert SCRIPT not in html, url
        assert "alert(&#x27;x&#x27;)" in html, url
    timeline = viewer.get(change("run", story.blocked.pk)).content.decode()
    assert "&quot;name&quot;: &quot;&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&quot;" in (
        timeline
    )


def test_run_page_shows_the_newest_200_events_and_links_to_all(
    viewer: Client, story: AdminStory
) -> None:
    response = viewer.get(change("run", story.big.pk))
    seqs = [item["event"].seq for item in response.context["timeline"]]
    assert seqs == list(range(1000, 1000 - TIMELINE_EVENTS, -1))
    events_url = changelist("runevent") + "?run__exact=run-big"
    assert events_url in response.content.decode()

    listed = viewer.get(events_url)
    assert listed.status_code == 200
    cl = listed.context["cl"]
    assert cl.result_count == 1000
    assert {event.run_id for event in cl.result_list} == {"run-big"}


def test_run_list_filters_search_and_order(viewer: Client, story: AdminStory) -> None:
    def ids(query: str) -> list[str]:
        response = viewer.get(changelist("run") + query)
        assert response.status_code == 200, query
        return [run.pk for run in response.context["cl"].result_list]

    assert ids("?state__status__exact=failed") == ["run-failed-flush"]
    assert ids("?state__status__exact=active") == ["run-blocked", "run-active"]
    assert ids("?state__flush_status__exact=failed") == ["run-failed-flush"]
    assert ids("?cleanup_refused=yes") == ["run-failed-flush"]
    assert "run-failed-flush" not in ids("?cleanup_refused=no")
    assert ids("?outbox_blocked=yes") == ["run-blocked"]
    assert len(ids("?outbox_blocked=no")) == 4
    assert ids("?scope=gamma") == ["run-failed-flush"]
    today = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)
    window = {
        "state__started_at__gte": str(today),
        "state__started_at__lt": str(today + timedelta(days=1)),
    }
    assert len(ids("?" + urlencode(window))) == 5
    assert ids("?cleanup_refused=yes&_facets=True") == ["run-failed-flush"]  # "show counts"
    assert ids("?q=run-comp") == ["run-completed"]
    assert ids("?q=epsilon") == ["run-big"]
    assert ids("?o=1") == sorted(ids(""), key=lambda pk: Run.objects.get(pk=pk).scope)


def test_outbox_and_event_filters(viewer: Client, story: AdminStory) -> None:
    response = viewer.get(changelist("runoutbox") + "?outbox_blocked=yes")
    assert [outbox.pk for outbox in response.context["cl"].result_list] == ["run-blocked"]
    response = viewer.get(changelist("runevent") + "?delivery=pending&q=run-blocked")
    assert sorted(event.seq for event in response.context["cl"].result_list) == [1, 2]


@pytest.mark.parametrize("model", MODELS)
def test_list_query_count_does_not_grow_with_the_number_of_runs(
    admin_client: Client, model: str
) -> None:
    traits: list[dict[str, Any]] = [
        {},
        {"completed": True, "cleaned": True},
        {"flush_failed": True},
        {"blocked": True, "leased": True, "events": 2},
    ]

    def make_runs(first: int, last: int) -> None:
        for index in range(first, last):
            run = RunFactory.create(scope=f"s{index}", id=f"r{index}", **traits[index % 4])
            ProjectFactory.create(scope=f"s{index}", last_seen_run=run)

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            response = admin_client.get(changelist(model))
        assert response.status_code == 200
        return len(captured)

    make_runs(0, 3)
    few = queries()
    make_runs(3, 30)
    many = queries()
    assert len(admin_client.get(changelist(model)).context["cl"].result_list) >= 30
    assert many == few, (few, many)


def test_anonymous_users_are_sent_to_login(client: Client, story: AdminStory) -> None:
    for model in MODELS:
        response = client.get(changelist(model))
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("admin:login"))
    response = client.get(change("run", story.active.pk))
    assert response.status_code == 302 and "/login/" in response["Location"]
    before = RunState.objects.get(pk=story.active.pk).status
    response = client.post(reverse("admin:runs_app_run_mark_failed", args=[story.active.pk]))
    assert response.status_code == 302 and "/login/" in response["Location"]
    assert RunState.objects.get(pk=story.active.pk).status == before


def test_staff_without_view_permission_see_nothing_of_the_app(
    client: Client, story: AdminStory
) -> None:
    client.force_login(make_staff("intern"))
    index = client.get(reverse("admin:index"))
    assert index.status_code == 200
    assert "runs_app" not in index.content.decode().lower()
    assert client.get(reverse("admin:app_list", args=["runs_app"])).status_code == 404
    for model in MODELS:
        assert client.get(changelist(model)).status_code == 403, model
    assert client.get(change("run", story.active.pk)).status_code == 403
    response = client.post(reverse("admin:runs_app_run_mark_failed", args=[story.active.pk]))
    assert response.status_code == 403
    assert RunState.objects.get(pk=story.active.pk).status == "active"


def test_viewers_see_the_app_in_the_index(viewer: Client) -> None:
    html = viewer.get(reverse("admin:index")).content.decode()
    for model in MODELS:
        assert changelist(model) in html


@pytest.mark.parametrize("model", MODELS)
def test_add_change_and_delete_are_refused_even_to_a_superuser(
    admin_client: Client, story: AdminStory, model: str
) -> None:
    pk = pks(story)[model][0]
    before = snapshot()
    assert admin_client.get(reverse(f"admin:runs_app_{model}_add")).status_code == 403
    assert admin_client.post(reverse(f"admin:runs_app_{model}_add"), {}).status_code == 403
    assert admin_client.post(change(model, pk), {"scope": "hacked"}).status_code == 403
    delete = reverse(f"admin:runs_app_{model}_delete", args=[pk])
    assert admin_client.get(delete).status_code == 403
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    response = admin_client.post(
        changelist(model), {"action": "delete_selected", "_selected_action": [pk], "post": "yes"}
    )
    assert response.status_code in (200, 302)
    actions = admin_client.get(changelist(model)).context["cl"].model_admin.get_actions
    assert "delete_selected" not in actions(response.wsgi_request)
    assert snapshot() == before


def test_view_only_staff_get_no_action(viewer: Client, story: AdminStory) -> None:
    response = viewer.get(changelist("run"))
    assert response.context["action_form"] is None
    html = viewer.get(change("run", story.active.pk)).content.decode()
    assert "runs-mark-failed" not in html
    assert "runs-retry-delivery" not in html
    # Forging the POST does nothing either.
    response = viewer.post(
        changelist("run"), {"action": "mark_failed", "_selected_action": [story.active.pk]}
    )
    assert RunState.objects.get(pk=story.active.pk).status == "active"
    response = viewer.post(reverse("admin:runs_app_run_mark_failed", args=[story.active.pk]))
    assert response.status_code == 403
    assert RunState.objects.get(pk=story.active.pk).status == "active"
