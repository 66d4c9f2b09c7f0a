"""A tracked model's admin: the "not seen by the scope's latest completed run" predicate
(``TrackedQuerySet``), the mixin users add to their model's admin (run links, the filter,
read-only stamps, query counts) and the per-model lines of the run page.

Rows and ledger lines are made with the factories, as the flush and completion leave them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import django
import pytest
from django.contrib import admin
from django.contrib.admin.utils import display_for_value
from django.db import connection
from django.test import Client, RequestFactory
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils.html import escape

from runs_app import services
from runs_app.exceptions import FlushFailed
from runs_app.models import CleanupStatus, FlushStatus, Project, Run
from runs_app.tracking import TrackedQuerySet
from runs_app.tracking_admin import NotSeenByLatestRunFilter, TrackedModelAdminMixin
from tests.factories import ProjectFactory, RunFactory, RunModelStateFactory
from tests.scenarios import ESCAPED_SCRIPT, SCRIPT, make_staff
from tests.tracked_app.models import Device, Site

pytestmark = pytest.mark.django_db

PROJECT = "runs_app.project"
NumQueries = Callable[[int], AbstractContextManager[Any]]


def projects() -> TrackedQuerySet[Project]:
    return TrackedQuerySet(Project)


def keys(queryset: Any) -> set[str]:
    return set(queryset.values_list("key", flat=True))


def completed(scope: str, run_id: str, *keys: str) -> Run:
    """A completed run of ``scope`` whose flush of projects succeeded and saw ``keys`` (rows
    made or re-stamped: their ``last_seen_run`` is this run)."""
    run = RunFactory.create(scope=scope, id=run_id)
    RunModelStateFactory.create(run=run, model=PROJECT, flushed=True)
    see(run, *keys)
    services.complete_run(run)
    return run


def see(run: Run, *keys: str) -> None:
    for key in keys:
        updated = Project.objects.filter(scope=run.scope, key=key).update(last_seen_run=run)
        if not updated:
            ProjectFactory.create(scope=run.scope, key=key, last_seen_run=run)


def url(name: str, *args: Any) -> str:
    return reverse(f"admin:runs_app_{name}", args=args)


def run_url(run_id: str) -> str:
    return url("run_change", run_id)


@pytest.fixture
def viewer(client: Client) -> Client:
    client.force_login(make_staff("viewer", "view_project", "view_run"))
    return client


@dataclasses.dataclass
class Scopes:
    seen: set[str]
    not_seen: set[str]


@pytest.fixture
def scopes() -> Scopes:
    """Two scopes with runs in every state, and a scope no completed run ever flushed."""
    # alpha: a1 then a2 completed (a2 the latest to flush projects); a3 failed; a4 completed
    # but only refused a cleanup of projects (a ledger line that is not a flush) and flushed
    # another model; a5 active, the newest.
    completed("alpha", "a1", "a-old", "a-refreshed")
    completed("alpha", "a2", "a-seen", "a-refreshed")
    a3 = RunFactory.create(scope="alpha", id="a3")
    RunModelStateFactory.create(run=a3, model=PROJECT, flush_failed=True)
    see(a3, "a-by-failed")
    services.fail_run(a3, "flush_failed", reason="flush_failed")
    a4 = RunFactory.create(scope="alpha", id="a4")
    services.complete_run(a4)
    RunModelStateFactory.create(run=a4, model=PROJECT, cleanup_refused=True)
    RunModelStateFactory.create(run=a4, model="example_project.repository", flushed=True)
    a5 = RunFactory.create(scope="alpha", id="a5")
    RunModelStateFactory.create(run=a5, model=PROJECT, flushed=True)
    see(a5, "a-by-active")
    ProjectFactory.create(scope="alpha", key="a-null", last_seen_run=None)

    # beta: b1 then b2 completed; a row of beta stamped by alpha's latest run (a scope
    # mismatch no flush makes, but a hand edit could) is not seen by beta's latest.
    completed("beta", "b1", "b-old")
    completed("beta", "b2", "b-seen")
    ProjectFactory.create(
        scope="beta", key="b-stamped-by-alpha", last_seen_run=Run.objects.get(pk="a2")
    )

    # gamma: flushed only by an active run: no completed run vouches for any row.
    g1 = RunFactory.create(scope="gamma", id="g1")
    RunModelStateFactory.create(run=g1, model=PROJECT, flushed=True)
    see(g1, "g-by-active")
    ProjectFactory.create(scope="gamma", key="g-null", last_seen_run=None)
    return Scopes(
        seen={"a-seen", "a-refreshed", "b-seen"},
        not_seen={
            "a-old",
            "a-by-failed",
            "a-by-active",
            "a-null",
            "b-old",
            "b-stamped-by-alpha",
            "g-by-active",
            "g-null",
        },
    )


# ---------------------------------------------------------------------------------------------
# The predicate


def test_not_seen_by_latest_run_splits_the_rows(scopes: Scopes) -> None:
    assert keys(projects().not_seen_by_latest_run()) == scopes.not_seen
    assert keys(projects().seen_by_latest_run()) == scopes.seen
    assert keys(Project.objects.all()) == scopes.seen | scopes.not_seen
    # Chains with other filters, both ways round.
    assert keys(projects().filter(scope="beta").not_seen_by_latest_run()) == {
        "b-old",
        "b-stamped-by-alpha",
    }
    assert keys(projects().not_seen_by_latest_run().filter(scope="gamma")) == {
        "g-by-active",
        "g-null",
    }


def test_the_active_run_completing_becomes_the_latest(scopes: Scopes) -> None:
    services.complete_run("a5")
    assert keys(projects().filter(scope="alpha").seen_by_latest_run()) == {"a-by-active"}
    # The other scopes did not move.
    assert keys(projects().exclude(scope="alpha").seen_by_latest_run()) == {"b-seen"}

    completed("alpha", "a6", "a-old")
    assert keys(projects().filter(scope="alpha").seen_by_latest_run()) == {"a-old"}


def test_a_scope_no_completed_run_flushed_has_every_row_not_seen() -> None:
    ProjectFactory.create(scope="new", key="never-stamped")
    run = RunFactory.create(scope="new", id="n1")
    services.complete_run(run)  # completed, but flushed nothing: no ledger line
    ProjectFactory.create(scope="new", key="stamped", last_seen_run=run)
    assert keys(projects().not_seen_by_latest_run()) == {"never-stamped", "stamped"}
    assert not projects().seen_by_latest_run().exists()


def test_a_deleted_run_leaves_its_rows_not_seen(scopes: Scopes) -> None:
    Run.objects.filter(pk="b2").delete()  # SET_NULL: b-seen's stamp is gone
    assert Project.objects.get(key="b-seen").last_seen_run_id is None
    assert keys(projects().filter(scope="beta").seen_by_latest_run()) == {"b-old"}


def flush_run(scope: str, run_id: str, model: Any, rows: list[dict[str, Any]]) -> Run:
    """A run of ``scope`` flushing ``rows`` of ``model`` through a flush session, completed."""
    run = services.create_run(scope, run_id=run_id)
    with services.flush(run, model) as session:
        session.write(rows)
    return services.complete_run(run)


def sites(*ids: int) -> list[dict[str, Any]]:
    return [{"id": site_id, "name": f"site {site_id}"} for site_id in ids]


def site_ids(queryset: Any) -> set[int]:
    return set(queryset.values_list("id", flat=True))


def test_a_whole_table_model_compares_with_the_latest_run_of_any_scope() -> None:
    """sync_scope = None (Site): the newest completed run that flushed the model, whatever the
    run's scope; runs that flushed other models do not count."""
    flush_run("east", "e1", Site, sites(1, 2, 3))
    flush_run("west", "w1", Site, sites(2, 3))
    assert site_ids(TrackedQuerySet(Site).seen_by_latest_run()) == {2, 3}
    assert site_ids(TrackedQuerySet(Site).not_seen_by_latest_run()) == {1}
    flush_run("east", "e2", Project, [{"key": "p", "name": "p"}])  # another model: no move
    assert site_ids(TrackedQuerySet(Site).seen_by_latest_run()) == {2, 3}
    flush_run("east", "e3", Site, sites(3))
    assert site_ids(TrackedQuerySet(Site).seen_by_latest_run()) == {3}


@pytest.mark.parametrize("method", ["seen_by_latest_run", "not_seen_by_latest_run"])
def test_the_predicate_is_part_of_one_statement(
    method: str, django_assert_num_queries: NumQueries
) -> None:
    def rows_of(scope: str, count: int) -> None:
        completed(scope, f"{scope}-1", *(f"{scope}-{n}" for n in range(count)))
        completed(scope, f"{scope}-2", *(f"{scope}-{n}" for n in range(0, count, 2)))

    rows_of("small", 3)
    with django_assert_num_queries(1):
        few = list(getattr(projects(), method)())
    for scope in range(5):
        rows_of(f"big{scope}", 40)
    with django_assert_num_queries(1):
        many = list(getattr(projects(), method)())
    assert len(many) > 10 * len(few)


class SourceDown(Exception):
    pass


def flushed_run(scope: str, run_id: str, *pages: list[str], fail_after: int | None = None) -> Run:
    """A run that flushes projects page by page through a flush session, then completes (the
    fail-safe completion fails it when the source failed after ``fail_after`` pages)."""
    run = services.create_run(scope, run_id=run_id)
    try:
        with services.flush(run, Project, batch_size=2) as session:
            for index, page in enumerate(pages):
                if index == fail_after:
                    raise SourceDown("the source went away between two pages")
                session.write([{"key": key, "name": f"Project {key}"} for key in page])
    except FlushFailed as exc:
        assert isinstance(exc.__cause__, SourceDown) and fail_after is not None
    return services.complete_run(run)


def test_through_the_services_flush_completion_and_cleanup(viewer: Client) -> None:
    """The ledger lines and stamps written by the real flush, completion and cleanup."""
    flushed_run("live", "live-1", ["k1", "k2"], ["k3", "k4"])
    assert keys(projects().seen_by_latest_run()) == {"k1", "k2", "k3", "k4"}
    flushed_run("live", "live-2", ["k1", "k2"], ["k3"])
    assert keys(projects().not_seen_by_latest_run()) == {"k4"}
    result = services.safe_cleanup("live-2", Project)
    assert result.removed == 1
    # A run whose source failed between two pages: failed, k1 and k2 stamped by it.
    failed = flushed_run("live", "live-3", ["k1", "k2"], ["k3"], fail_after=1)
    assert failed.state.status == "failed"
    assert keys(projects().seen_by_latest_run()) == {"k3"}
    assert keys(projects().not_seen_by_latest_run()) == {"k1", "k2"}
    assert listed(viewer, "?not_seen_by_latest_run=yes") == {"k1", "k2"}

    html = viewer.get(run_url("live-2")).content.decode()
    line = html[html.index("<td>runs_app.project</td>") :]
    line = re.sub(r"<[^>]+>", "|", line[: line.index("</tr>")])
    cells = [cell for cell in line.split("|") if cell.strip()]
    assert cells[:9] == ["runs_app.project", "succeeded", "full", "3", "0", "3", "3", "1", "done"]
    html = viewer.get(run_url("live-3")).content.decode()
    assert "<td>runs_app.project</td>" in html and ">failed</span>" in html


# ---------------------------------------------------------------------------------------------
# runs_app's own ProjectAdmin: the mixin on a read-only admin


def project_list(client: Client, query: str = "") -> Any:
    response = client.get(url("project_changelist") + query)
    assert response.status_code == 200, query
    return response


def listed(client: Client, query: str = "") -> set[str]:
    return {row.key for row in project_list(client, query).context["cl"].result_list}


def test_the_filter_lists_rows_not_seen_and_seen(viewer: Client, scopes: Scopes) -> None:
    html = project_list(viewer).content.decode()
    assert "By not seen by the scope&#x27;s latest completed run" in html
    assert "?not_seen_by_latest_run=yes" in html
    assert listed(viewer, "?not_seen_by_latest_run=yes") == scopes.not_seen
    assert listed(viewer, "?not_seen_by_latest_run=no") == scopes.seen
    assert listed(viewer, "?not_seen_by_latest_run=yes&scope=beta") == {
        "b-old",
        "b-stamped-by-alpha",
    }
    assert listed(viewer, "?not_seen_by_latest_run=no&q=b-") == {"b-seen"}


def test_the_filter_shows_its_counts(viewer: Client, scopes: Scopes) -> None:
    html = project_list(viewer, "?_facets=True&scope=alpha").content.decode()
    alpha_not_seen = len({key for key in scopes.not_seen if key.startswith("a-")})
    assert f'not_seen_by_latest_run=yes&amp;scope=alpha">Yes ({alpha_not_seen})</a>' in html
    assert 'not_seen_by_latest_run=no&amp;scope=alpha">No (2)</a>' in html  # a-seen, a-refreshed


def test_the_stamps_are_links_to_the_runs(viewer: Client, scopes: Scopes) -> None:
    a2 = Run.objects.get(pk="a2")
    response = project_list(viewer, "?q=a-seen")
    html = response.content.decode()
    started = f'<span class="quiet">({display_for_value(a2.created_at, "-")})</span>'
    link = f'<a href="{run_url("a2")}">a2</a> {started}'
    assert f'<td class="field-last_seen_run_link">{link}</td>' in html
    assert f'<td class="field-last_confirmed_run_link">{link}</td>' in html
    assert ">Last seen</a>" in html and ">Last confirmed</a>" in html
    (row,) = response.context["cl"].result_list
    assert (row.last_seen_run, row.last_confirmed_run) == (a2, a2)

    # Seen only by a run that failed: never confirmed.
    html = project_list(viewer, "?q=a-by-failed").content.decode()
    assert f'<a href="{run_url("a3")}">a3</a>' in html
    assert re.search(r'class="field-last_confirmed_run_link">-<', html)
    html = project_list(viewer, "?q=a-null").content.decode()
    assert re.search(r'class="field-last_seen_run_link">-<', html)


def test_the_list_sorts_by_when_runs_were_created(viewer: Client, scopes: Scopes) -> None:
    columns = project_list(viewer).context["cl"].list_display
    by_seen = f"?scope=alpha&o={columns.index('last_seen_run_link')}"
    rows = project_list(viewer, by_seen).context["cl"].result_list
    stamped = [row.last_seen_run.pk for row in rows if row.last_seen_run is not None]
    assert stamped == ["a1", "a2", "a2", "a3", "a5"]


@pytest.mark.parametrize("query", ["", "?not_seen_by_latest_run=yes", "?_facets=True"])
def test_the_list_costs_the_same_queries_for_3_rows_or_60(
    admin_client: Client, django_assert_num_queries: NumQueries, query: str
) -> None:
    def page() -> int:
        with CaptureQueriesContext(connection) as captured:
            project_list(admin_client, query)
        return len(captured)

    completed("s", "s1", "k0", "k1")
    completed("s", "s2", "k0")
    ProjectFactory.create(scope="s", key="k-null")
    few = page()
    for index in range(20):
        completed(f"s{index}", f"s{index}-1", "k0", "k1")
        completed(f"s{index}", f"s{index}-2", "k0")
        ProjectFactory.create(scope=f"s{index}", key="k-null")
    with django_assert_num_queries(few):
        response = project_list(admin_client, query)
    assert len(response.context["cl"].result_list) >= 40


def test_the_project_page_shows_the_stamps_as_links(viewer: Client, scopes: Scopes) -> None:
    project = Project.objects.get(key="a-seen")
    response = viewer.get(url("project_change", project.pk))
    assert response.status_code == 200
    assert response.context["adminform"].form.fields == {}
    html = response.content.decode()
    assert html.count(f'<a href="{run_url("a2")}">a2</a>') == 2
    for label in ["Last seen:", "Last confirmed:", "Created at:", "Updated at:"]:
        assert label in html


def test_the_project_admin_stays_read_only(admin_client: Client, scopes: Scopes) -> None:
    project = Project.objects.get(key="a-seen")
    assert admin_client.post(url("project_change", project.pk), {"name": "x"}).status_code == 403
    assert admin_client.get(url("project_add")).status_code == 403
    assert Project.objects.get(pk=project.pk).name == project.name


# ---------------------------------------------------------------------------------------------
# The mixin on a project's own models, in an editable admin (tests/tracking_admin_site.py)

OWN_DEVICES = "/tracked-admin/tracked_app/device/"
OWN_SITES = "/tracked-admin/tracked_app/site/"
UIDS = [uuid.UUID(int=n) for n in range(8)]


def devices(*numbers: int, site: int | None = 1) -> list[dict[str, Any]]:
    return [{"uid": UIDS[n], "name": f"device {n}", "site": site} for n in numbers]


@pytest.fixture
def fleet() -> dict[str, set[uuid.UUID]]:
    """Devices of two tenants flushed by real runs; tenant "acme"'s latest run missed 2 and 3."""
    flush_run("any", "sites-1", Site, sites(1, 2))
    flush_run("acme", "acme-1", Device, devices(0, 1, 2, 3))
    flush_run("acme", "acme-2", Device, devices(0, 1, site=2))
    flush_run("initech", "initech-1", Device, devices(0, 4))
    return {
        "seen": {UIDS[0], UIDS[1], UIDS[4]},
        "not_seen": {UIDS[2], UIDS[3]},
    }


def uids(response: Any) -> set[uuid.UUID]:
    return {row.uid for row in response.context["cl"].result_list}


@pytest.mark.urls("tests.tracking_admin_site")
def test_a_projects_admin_gains_columns_filter_and_read_only_stamps(
    admin_client: Client, fleet: dict[str, set[uuid.UUID]]
) -> None:
    from tests.tracking_admin_site import site

    model_admin = site.get_model_admin(Device)
    request = admin_client.get(OWN_DEVICES).wsgi_request
    assert model_admin.get_list_display(request) == [
        "uid",
        "tenant",
        "name",
        "site",
        "last_seen_run_link",
        "last_confirmed_run_link",
    ]
    filters = model_admin.get_list_filter(request)
    assert filters == ["tenant", NotSeenByLatestRunFilter]
    assert model_admin.get_list_select_related(request) == [
        "site",
        "last_seen_run",
        "last_confirmed_run",
    ]
    stamps = ["last_seen_run", "last_confirmed_run", "created_at", "updated_at"]
    links = ["last_seen_run_link", "last_confirmed_run_link"]
    assert model_admin.get_readonly_fields(request) == [*stamps, *links]
    own = ["tenant", "uid", "name", "site", "port", "online", "price", "seen_on", "attrs", "kind"]
    assert model_admin.get_fields(request) == [
        *own,
        "note",
        "token",
        *links,
        "created_at",
        "updated_at",
    ]

    response = admin_client.get(OWN_DEVICES + "?not_seen_by_latest_run=yes")
    assert uids(response) == fleet["not_seen"]
    assert "By not seen by the scope&#x27;s latest completed run" in response.content.decode()
    response = admin_client.get(OWN_DEVICES + "?not_seen_by_latest_run=no&tenant=initech")
    assert uids(response) == {UIDS[0], UIDS[4]}
    html = response.content.decode()
    assert f'<a href="{run_url("initech-1")}">initech-1</a>' in html  # runs_app's admin


@pytest.mark.urls("tests.tracking_admin_site")
def test_a_whole_table_models_admin_says_latest_completed_run(admin_client: Client) -> None:
    flush_run("east", "e1", Site, sites(1, 2))
    flush_run("west", "w1", Site, sites(2))
    response = admin_client.get(OWN_SITES + "?not_seen_by_latest_run=yes")
    assert [row.pk for row in response.context["cl"].result_list] == [1]
    html = response.content.decode()
    assert "By not seen by the latest completed run" in html
    assert f'<a href="{run_url("w1")}">w1</a>' in admin_client.get(OWN_SITES).content.decode()


@pytest.mark.urls("tests.tracking_admin_site")
@pytest.mark.parametrize("query", ["", "?not_seen_by_latest_run=yes", "?_facets=True"])
def test_a_projects_list_costs_the_same_queries_for_4_rows_or_40(
    admin_client: Client, django_assert_num_queries: NumQueries, query: str
) -> None:
    """The rows' own foreign key (site) and both run stamps come with the rows."""

    def page() -> Any:
        response = admin_client.get(OWN_DEVICES + query)
        assert response.status_code == 200
        return response

    flush_run("any", "sites-1", Site, sites(1, 2))
    flush_run("t0", "t0-1", Device, devices(0, 1, 2, 3))
    with CaptureQueriesContext(connection) as few:
        page()
    for tenant in range(1, 10):
        flush_run(f"t{tenant}", f"t{tenant}-1", Device, devices(0, 1, 2, 3, site=2))
        flush_run(f"t{tenant}", f"t{tenant}-2", Device, devices(0, 1))
    with django_assert_num_queries(len(few)):
        response = page()
    assert len(response.context["cl"].result_list) >= (40 if not query else 18)


@pytest.mark.urls("tests.tracking_admin_site")
def test_a_projects_admin_edits_its_fields_never_the_stamps(
    admin_client: Client, fleet: dict[str, set[uuid.UUID]]
) -> None:
    device = Device.objects.get(tenant="acme", uid=UIDS[0])
    change_url = f"{OWN_DEVICES}{device.pk}/change/"
    page = admin_client.get(change_url)
    assert page.status_code == 200
    # Every field of the model is editable but the stamps.
    assert list(page.context["adminform"].form.fields) == [
        "tenant",
        "uid",
        "name",
        "site",
        "port",
        "online",
        "price",
        "seen_on",
        "attrs",
        "kind",
        "note",
        "token",
    ]
    assert page.content.decode().count(f'<a href="{run_url("acme-2")}">acme-2</a>') == 2

    response = admin_client.post(
        change_url,
        {
            "tenant": "acme",
            "uid": str(UIDS[0]),
            "name": "device 0",
            "site": "2",
            "port": "0",
            "attrs": "{}",
            "kind": "phone",
            "note": "in the basement",
            "token": str(device.token),
            "last_seen_run": "acme-1",
            "last_confirmed_run": "",
            "created_at_0": "2000-01-01",
            "created_at_1": "00:00:00",
        },
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    after = Device.objects.get(pk=device.pk)
    assert (after.note, after.site_id) == ("in the basement", 2)
    assert (after.last_seen_run_id, after.last_confirmed_run_id) == ("acme-2", "acme-2")
    assert after.created_at == device.created_at


@pytest.mark.urls("tests.tracking_admin_site_alone")
def test_without_runs_app_admin_the_stamps_are_plain_run_ids(
    admin_client: Client, fleet: dict[str, set[uuid.UUID]]
) -> None:
    html = admin_client.get(OWN_DEVICES + "?tenant=initech").content.decode()
    assert '<td class="field-last_seen_run_link">initech-1 <span class="quiet">' in html
    assert "/runs_app/run/" not in html


@pytest.mark.parametrize(
    ("declared", "expected"),
    [
        (False, ["last_seen_run", "last_confirmed_run"]),
        (True, ["last_seen_run", "last_confirmed_run"]),  # Project has no non-null foreign key
        (("last_seen_run", "owner"), ["last_seen_run", "owner", "last_confirmed_run"]),
    ],
)
def test_the_stamps_join_the_declared_list_select_related(
    declared: Any, expected: list[str]
) -> None:
    base: Any = admin.ModelAdmin
    # Django 6.1 deprecates list_select_related = True (it warns when the class is declared);
    # the mixin still honours it.
    deprecated = declared is True and django.VERSION >= (6, 1)
    warns = pytest.warns(Warning, match="list_select_related") if deprecated else nullcontext()
    with warns:
        model_admin_class = type(
            "DeclaredAdmin", (TrackedModelAdminMixin, base), {"list_select_related": declared}
        )
        model_admin = model_admin_class(Project, admin.AdminSite(name="declared"))
        selected = model_admin.get_list_select_related(RequestFactory().get("/"))
    assert selected == expected


# ---------------------------------------------------------------------------------------------
# The run page: one line per model under the run-level ledger


# The cursor as the run page shows it: its JSON, cut to 80 characters, escaped.
CURSOR_SHOWN_TEXT = (
    # Keys sorted: PostgreSQL's jsonb stores shorter keys first, the page shows them sorted.
    json.dumps({"after": SCRIPT, "page": "x" * 100}, separators=(",", ":"))[:79] + "\u2026"
)


def test_the_run_page_shows_one_line_per_model(viewer: Client) -> None:
    run = RunFactory.create(scope="lines", id="lines-1")
    RunModelStateFactory.create(
        run=run, model=PROJECT, flushed=True, rows_created=1200, rows_updated=34, cleaned=True
    )
    RunModelStateFactory.create(
        run=run,
        model="example_project.repository",
        flush_failed=True,
        rows_seen=7,
        rows_created=7,
        cleanup_refused=True,
        cleanup_message=f"refused {SCRIPT}",
        flush_mode="incremental",
        cursor={"page": "x" * 100, "after": SCRIPT},
    )
    response = viewer.get(run_url(run.pk))
    assert response.status_code == 200
    html = response.content.decode()
    assert "Per model" in html
    table = html[html.index('class="runs-table runs-model-lines"') :]
    table = table[: table.index("</table>")]
    rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)
    cells = [re.findall(r"<t[hd]>(.*?)</t[hd]>", row, re.S) for row in rows]
    text = [[re.sub(r"<[^>]+>", "", cell) for cell in row] for row in cells]
    assert text[0] == [
        "model",
        "flush",
        "source read, cursor",
        "seen",
        "created",
        "updated",
        "confirmed",
        "removed",
        "cleanup",
        "cleanup message",
        "cleanup at",
        "grace, approval, undo",
    ]
    project, repository = text[1:]
    assert project[:9] == [PROJECT, "succeeded", "full", "1234", "1200", "34", "0", "1", "done"]
    assert project[9] == "-"
    assert repository[:9] == [
        "example_project.repository",
        "failed",
        escape("incremental, cursor " + CURSOR_SHOWN_TEXT),
        "7",
        "7",
        "0",
        "0",
        "0",
        "refused: flush_failed",
    ]
    assert repository[9] == f"refused {ESCAPED_SCRIPT}"
    assert SCRIPT not in html


def test_a_run_without_model_lines_says_so(viewer: Client) -> None:
    run = RunFactory.create(scope="lines", id="lines-0")
    response = viewer.get(run_url(run.pk))
    assert response.status_code == 200
    assert "runs-model-lines" not in response.content.decode()
    assert response.context["adminform"].form.fields == {}


def test_the_run_page_costs_the_same_queries_for_1_model_or_8(
    admin_client: Client, django_assert_num_queries: NumQueries
) -> None:
    def page(run: Run) -> int:
        with CaptureQueriesContext(connection) as captured:
            response = admin_client.get(run_url(run.pk))
        assert response.status_code == 200
        return len(captured)

    one = RunFactory.create(scope="q1", id="q1")
    RunModelStateFactory.create(run=one, model=PROJECT, flushed=True)
    few = page(one)
    eight = RunFactory.create(scope="q8", id="q8")
    for index in range(8):
        RunModelStateFactory.create(
            run=eight, model=f"app.model{index}", flushed=True, cleaned=True
        )
    with django_assert_num_queries(few):
        response = admin_client.get(run_url(eight.pk))
    assert response.content.decode().count("app.model") == 8


def test_flush_and_cleanup_statuses_are_the_ledgers(viewer: Client) -> None:
    """Every status the ledger line can hold renders (badge colours exist for each)."""
    run = RunFactory.create(scope="all", id="all-1")
    statuses = list(itertools.zip_longest(FlushStatus, CleanupStatus))
    for index, (flush, cleanup) in enumerate(statuses):
        RunModelStateFactory.create(
            run=run,
            model=f"app.m{index}",
            flush_status=flush or FlushStatus.SUCCEEDED,
            cleanup_status=cleanup or CleanupStatus.DONE,
        )
    html = viewer.get(run_url(run.pk)).content.decode()
    for flush in FlushStatus:
        assert f">{flush.label}</span>" in html
    for cleanup in CleanupStatus:
        assert f">{cleanup.label}</span>" in html
    assert 'runs-badge--quiet">not run</span>' in html
