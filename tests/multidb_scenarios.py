"""What the multi-database tests do inside a guarded process (see :mod:`tests.multidb_manage`):
``python -m tests.multidb_scenarios <name> [scope]`` runs one scenario through runs_app's
public API and prints its facts as one JSON line, for ``tests/test_databases.py`` to assert on.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

SCENARIOS: dict[str, Callable[[str], dict[str, Any]]] = {}


def scenario(function: Callable[[str], dict[str, Any]]) -> Callable[[str], dict[str, Any]]:
    SCENARIOS[function.__name__] = function
    return function


def _projects(count: int) -> list[dict[str, Any]]:
    return [{"key": f"p{n}", "name": f"Project {n}", "data": {"n": n}} for n in range(count)]


@scenario
def lifecycle(scope: str) -> dict[str, Any]:
    """Two runs of ``scope``: flush projects, sites and (soft-deleting) assets, complete, then
    the second run (which no longer sees 2 projects, 1 site, 1 asset) cleans up; the sites'
    cleanup is restored, tombstones looked up for purging; events, heartbeat, a failed run."""
    from runs_app import services
    from runs_app.models import Project, RunState
    from tests.tracked_app.models import Asset, Site

    def assets(count: int) -> list[dict[str, Any]]:
        return [{"code": f"a{n}", "name": f"asset {n}"} for n in range(count)]

    first = services.create_run(scope, metadata={"source": "multidb"})
    services.heartbeat(first)
    services.append_events(first, [services.Event("custom.noted", {"n": 1})])
    services.flush_projects(first, _projects(10))
    with services.flush(first, Site) as session:
        session.write([{"id": n, "name": f"site {n}"} for n in range(3)])
    with services.flush(first, Asset) as session:
        session.write(assets(4))
    services.complete_run(first)

    second, _ = services.ensure_run(f"{scope}-second", scope=scope)
    services.flush_projects(second, _projects(8))
    with services.flush(second, Site) as session:
        session.write([{"id": n, "name": f"site {n}"} for n in range(2)])
    with services.flush(second, Asset) as session:
        session.write(assets(3))
    services.complete_run(second)
    projects = services.safe_cleanup_old_projects(second)
    sites = services.safe_cleanup(second, Site)
    tombstoned = services.safe_cleanup(second, Asset).removed
    purgeable = services.purge_tombstones(Asset, older_than=3600, dry_run=True).purged
    restored = services.restore_cleanup(second, Site).restored

    failed = services.create_run(f"{scope}-failing")
    services.fail_run(failed, "the source went away")

    state = RunState.objects.get(run_id=second.pk)
    return {
        "projects_removed": projects.removed,
        "sites_removed": sites.removed,
        "projects_left": Project.objects.filter(scope=scope).count(),
        "assets_tombstoned": tombstoned,
        "assets_purgeable": purgeable,  # tombstoned just now: none is an hour old
        "sites_restored": restored,
        "sites_left": Site.objects.count(),
        "second_status": state.status,
        "second_rows_removed": state.rows_removed,
        "failed_status": services.get_run(failed.pk).state.status,
        "events_of_first": [event.type for event in services.list_events(first)],
    }


@scenario
def tables(scope: str) -> dict[str, Any]:
    """The tables of runs_app and the tracked models on each alias."""
    from django.db import connections

    return {
        alias: sorted(
            name
            for name in connections[alias].introspection.table_names()
            if name.startswith(("runs_app_", "tracked_app_", "example_project_"))
        )
        for alias in ("default", "runs")
    }


@scenario
def events(scope: str) -> dict[str, Any]:
    """A completed run of ``scope`` with events to deliver."""
    from runs_app import services

    run = services.create_run(scope)
    services.append_events(run, [services.Event("custom.noted", {"n": n}) for n in range(5)])
    services.complete_run(run)
    return {"run_id": run.pk}


@scenario
def transactions(scope: str) -> dict[str, Any]:
    """What "nests inside your transaction" means across databases (docs/databases.md): an
    ``atomic()`` on default does not hold runs_app's writes back; one on runs_app's does."""
    from django.db import router, transaction

    from runs_app import services
    from runs_app.models import Run

    class Abort(Exception):
        pass

    facts: dict[str, Any] = {}
    for name, using in (("on_default", "default"), ("on_runs", router.db_for_write(Run))):
        try:
            with transaction.atomic(using=using):
                services.create_run(f"{scope}-{name}", run_id=f"{scope}-{name}")
                raise Abort
        except Abort:
            pass
        facts[f"kept_{name}"] = Run.objects.filter(pk=f"{scope}-{name}").exists()
    return facts


@scenario
def outbox(scope: str) -> dict[str, Any]:
    """Delivery facts of ``scope``'s runs, read the way an operator reads them."""
    from runs_app.models import RunEvent, RunOutbox

    runs_events = RunEvent.objects.filter(run__scope=scope)
    return {
        "events": runs_events.count(),
        "published": runs_events.filter(published_at__isnull=False).count(),
        "pending": runs_events.pending().count(),
        "leases": RunOutbox.objects.filter(run__scope=scope, lease_token__isnull=False).count(),
    }


@scenario
def prune(scope: str) -> dict[str, Any]:
    """``prune_outbox`` of everything published (all scopes)."""
    from runs_app import services

    return {"pruned": services.prune_outbox(older_than=0)}


@scenario
def listen(scope: str) -> dict[str, Any]:
    """The relay's LISTEN connection, and whether a run created here wakes it."""
    from runs_app import services
    from runs_app.relay.listener import OutboxListener

    listener = OutboxListener.for_relay()
    if listener is None:
        return {"listener": None}
    try:
        services.create_run(scope)  # commits: its NOTIFY is delivered now
        woken = listener.wait(threading.Event(), timeout=10.0)
        return {"listener": listener.alias, "connected": listener.connected, "woken": woken}
    finally:
        listener.close()


@scenario
def admin(scope: str) -> dict[str, Any]:
    """The admin's pages of a run of ``scope`` and of the tracked models, as a superuser."""
    from django.contrib.auth.models import User
    from django.test import Client

    from runs_app import services

    run = services.create_run(scope)
    services.flush_projects(run, _projects(3))
    services.complete_run(run)
    user, _ = User.objects.get_or_create(
        username="multidb", defaults={"is_staff": True, "is_superuser": True}
    )
    client = Client()
    client.force_login(user)
    pages: dict[str, Any] = {}
    for name, url in (
        # Each list filtered to this scope: the other tests' runs are theirs to show.
        ("runs", f"/admin/runs_app/run/?scope={scope}"),
        ("run", f"/admin/runs_app/run/{run.pk}/change/"),
        ("states", f"/admin/runs_app/runstate/?scope={scope}"),
        ("outboxes", f"/admin/runs_app/runoutbox/?q={run.pk}"),
        ("events", f"/admin/runs_app/runevent/?run__id__exact={run.pk}"),
        ("projects", f"/admin/runs_app/project/?scope={scope}"),
        ("repositories", "/admin/example_project/repository/?not_seen_by_latest_run=yes"),
    ):
        response = client.get(url)
        pages[name] = {"status": response.status_code, "shows_run": run.pk in response.text}
    # A button of the run page: the action's writes go through the services.
    active = services.create_run(f"{scope}-active")
    button = client.post(f"/admin/runs_app/run/{active.pk}/mark-failed/", {"post": "yes"})
    return {
        "run_id": run.pk,
        "pages": pages,
        "button": button.status_code,
        "marked": services.get_run(active.pk).state.status,
    }


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.multidb_settings")
    from tests.multidb_manage import install_guard

    install_guard()
    import django

    django.setup()
    name, scope = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "multidb"
    print(json.dumps(SCENARIOS[name](scope), default=str))


if __name__ == "__main__":
    main()
