"""runs_app on a database of its own: every statement follows the routers.

Each direction gets two fresh databases: ``default`` (auth, sessions, the admin's log) and
``runs`` (runs_app and the tracked models, migrated there only), with reads of the routed models
on ``replica`` (a second connection to ``runs``). The commands and scenarios run in guarded
subprocesses (:mod:`tests.multidb_manage`): a statement about runs_app's tables, or a
``pg_notify``, on ``default`` fails loudly, and so do a write on ``replica`` and a read there
inside a transaction on ``runs``; every refusal is also written to a file that each test checks
is empty.

Directions: SQLite + SQLite (two files) in every pass; SQLite + PostgreSQL and PostgreSQL +
SQLite need a PostgreSQL server (marked ``postgresql``): they create and drop throwaway
databases ``test_multidb_<pid>_<n>`` on the suite's server.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from django.core import checks
from django.db import connection
from django.db.utils import ConnectionHandler
from django.test import override_settings

from runs_app import checks as runs_checks

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 180
_names = itertools.count()


# --- databases --------------------------------------------------------------------------------


def _server() -> dict[str, Any]:
    """Connection parameters of the suite's PostgreSQL server (the pass runs on it)."""
    settings = connection.settings_dict
    return {
        "host": settings.get("HOST") or "127.0.0.1",
        "port": int(settings.get("PORT") or 5432),
        "user": settings.get("USER") or "",
        "password": settings.get("PASSWORD") or "",
    }


def _postgresql_url(name: str) -> str:
    server = _server()
    password = f":{quote(server['password'])}" if server["password"] else ""
    return f"postgres://{quote(server['user'])}{password}@{server['host']}:{server['port']}/{name}"


@contextmanager
def _postgresql_database() -> Iterator[str]:
    """A throwaway database on the suite's server, dropped afterwards: its URL."""
    import psycopg

    server = _server()
    name = f"test_multidb_{os.getpid()}_{next(_names)}"
    with psycopg.connect(dbname="postgres", autocommit=True, **server) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _postgresql_url(name)
    finally:
        with psycopg.connect(dbname="postgres", autocommit=True, **server) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class MultiDb:
    """Two databases, runs_app routed to the second; commands and scenarios run against them."""

    directory: Path
    env: dict[str, str]
    runs_vendor: str

    @property
    def violations(self) -> list[dict[str, str]]:
        path = Path(self.env["MULTIDB_VIOLATIONS"])
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def manage(self, *args: str, settings: str | None = None) -> subprocess.CompletedProcess[str]:
        """``manage.py ARGS`` with the guard (settings: the multi-database test settings)."""
        env = dict(self.env)
        if settings is not None:
            env["DJANGO_SETTINGS_MODULE"] = settings
        return subprocess.run(
            [sys.executable, "-m", "tests.multidb_manage", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )

    def ok(self, *args: str, settings: str | None = None) -> str:
        """``manage`` that must succeed without a stray statement; its output."""
        done = self.manage(*args, settings=settings)
        assert done.returncode == 0, (args, done.stdout[-3000:], done.stderr[-3000:])
        assert self.violations == []
        return done.stdout

    def scenario(self, name: str, scope: str) -> dict[str, Any]:
        """A scenario of :mod:`tests.multidb_scenarios`: its facts."""
        done = subprocess.run(
            [sys.executable, "-m", "tests.multidb_scenarios", name, scope],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert done.returncode == 0, (name, done.stdout[-3000:], done.stderr[-3000:])
        assert self.violations == []
        facts: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return facts


@contextmanager
def _multidb(default: str, runs: str, directory: Path) -> Iterator[MultiDb]:
    """Fresh ``default`` and ``runs`` databases of these vendors, not migrated yet."""
    with (
        _database(default, directory / "default.sqlite3") as default_url,
        _database(runs, directory / "runs.sqlite3") as runs_url,
    ):
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.multidb_settings",
            "DATABASE_URL": default_url,
            "RUNS_APP_DATABASE_URL": runs_url,
            "MULTIDB_VIOLATIONS": str(directory / "violations.jsonl"),
            "PYTHONPATH": str(ROOT),
        }
        env.pop("TEST_DATABASE_NAME", None)
        yield MultiDb(directory, env, runs)


@contextmanager
def _database(vendor: str, path: Path) -> Iterator[str]:
    if vendor == "sqlite":
        yield f"sqlite:///{path}"
    else:
        with _postgresql_database() as url:
            yield url


DIRECTIONS = [
    pytest.param(("sqlite", "sqlite"), id="sqlite+sqlite"),
    pytest.param(("sqlite", "postgresql"), id="sqlite+postgresql", marks=pytest.mark.postgresql),
    pytest.param(("postgresql", "sqlite"), id="postgresql+sqlite", marks=pytest.mark.postgresql),
]


@pytest.fixture(scope="module", params=DIRECTIONS)
def multidb(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Migrated databases of one direction (``default`` + ``runs``), shared by the module's
    tests; each test works in scopes of its own."""
    default, runs = request.param
    with _multidb(default, runs, tmp_path_factory.mktemp(f"{default}-{runs}")) as databases:
        databases.ok("migrate", "--noinput", "-v0")
        databases.ok("migrate", "--database=runs", "--noinput", "-v0")
        yield databases


# --- the services, the relay, the commands, the admin -----------------------------------------


def test_runs_app_tables_live_on_the_runs_database_only(multidb: MultiDb) -> None:
    out = multidb.ok("check")
    assert "no issues" in out
    tables = multidb.scenario("tables", "-")
    assert tables["default"] == []
    assert {"runs_app_run", "runs_app_runevent", "tracked_app_site"} <= set(tables["runs"])


def test_create_flush_complete_cleanup(multidb: MultiDb) -> None:
    facts = multidb.scenario("lifecycle", "lifecycle")
    assert facts["projects_removed"] == 2
    assert facts["sites_removed"] == 1
    assert facts["projects_left"] == 8
    assert (facts["assets_tombstoned"], facts["assets_purgeable"]) == (1, 0)
    assert (facts["sites_restored"], facts["sites_left"]) == (1, 3)
    assert (facts["second_status"], facts["second_rows_removed"]) == ("completed", 4)
    assert facts["failed_status"] == "failed"
    assert facts["events_of_first"][:2] == ["run.started", "custom.noted"]
    assert facts["events_of_first"][-1] == "run.completed"


def test_runs_app_nests_only_in_a_transaction_on_its_own_database(multidb: MultiDb) -> None:
    facts = multidb.scenario("transactions", "tx")
    # Rolled back on default: runs_app's run was committed on "runs" already.
    assert facts["kept_on_default"] is True
    # Rolled back on runs_app's database: its transaction was a savepoint of the caller's.
    assert facts["kept_on_runs"] is False


def test_drain_outbox_once_delivers_and_prune_deletes(multidb: MultiDb) -> None:
    multidb.scenario("events", "relay")
    before = multidb.scenario("outbox", "relay")
    assert before["pending"] == before["events"] == 7  # started, 5 noted, completed

    out = multidb.ok("drain_outbox", "--once")
    assert "0 failed publish(es)" in out

    after = multidb.scenario("outbox", "relay")
    assert (after["published"], after["pending"], after["leases"]) == (7, 0, 0)
    assert multidb.scenario("prune", "relay")["pruned"] >= 7


def test_relay_listens_on_the_runs_database(multidb: MultiDb) -> None:
    facts = multidb.scenario("listen", "listen")
    if multidb.runs_vendor == "postgresql":
        # Woken by the NOTIFY of a run created on "runs": both ends are on that database.
        assert facts == {"listener": "runs", "connected": True, "woken": True}
    else:
        assert facts == {"listener": None}  # NOTIFY is PostgreSQL's: the relay only polls


def test_runs_status_reads_the_runs_database(multidb: MultiDb) -> None:
    multidb.scenario("events", "status")
    report = json.loads(multidb.ok("runs_status", "--json", "--scope", "status"))
    assert [scope["scope"] for scope in report["scopes"]] == ["status"]
    assert report["scopes"][0]["status"] == "completed"


def test_runs_metrics_reads_the_runs_database(multidb: MultiDb) -> None:
    multidb.scenario("events", "metrics")
    text = multidb.ok("runs_metrics")
    assert 'runs_app_runs{scope="metrics",status="completed"} 1.0' in text


def test_admin_pages_follow_the_routers(multidb: MultiDb) -> None:
    facts = multidb.scenario("admin", "admin")
    pages = facts["pages"]
    assert {name: page["status"] for name, page in pages.items()} == dict.fromkeys(pages, 200)
    for name in ("runs", "run", "states", "outboxes", "events", "projects"):
        assert pages[name]["shows_run"], name
    assert (facts["button"], facts["marked"]) == (302, "failed")


def test_example_project_runs_demo_and_relay_on_a_second_database(
    multidb: MultiDb, tmp_path: Path
) -> None:
    """The example project as shipped (its settings and router, RUNS_APP_DATABASE_URL), on
    fresh databases of this direction: migrate both, the demo, then the relay."""
    default, runs = multidb.env["DATABASE_URL"], multidb.runs_vendor
    vendor = "sqlite" if default.startswith("sqlite") else "postgresql"
    with _multidb(vendor, runs, tmp_path) as example:
        settings = "example_project.settings"
        example.ok("migrate", "--noinput", "-v0", settings=settings)
        example.ok("migrate", "--database=runs", "--noinput", "-v0", settings=settings)
        out = example.ok("demo", settings=settings)
        assert "nothing was lost" in out
        assert "-> removed exactly the 5 dropped repositories" in out
        assert " 0 pending." in out
        again = example.ok("drain_outbox", "--once", settings=settings)
        assert "0 message(s) published" in again


# --- the routing checks (in this process: they only ask the routers) --------------------------


class _Router:
    """Sends the models of ``labels`` (``app_label.ModelName``, or an app label) elsewhere."""

    labels: frozenset[str] = frozenset()

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        meta = model._meta
        if meta.app_label in self.labels or f"{meta.app_label}.{model.__name__}" in self.labels:
            return "elsewhere"
        return None


class TrackedElsewhere(_Router):
    labels = frozenset({"tracked_app.Site"})


class RunsAppSplit(_Router):
    labels = frozenset({"runs_app.RunEvent"})


class EverythingElsewhere(_Router):
    labels = frozenset({"runs_app", "tracked_app", "example_project"})


def _routing_messages() -> list[checks.CheckMessage]:
    return list(runs_checks.check_database_routing())


def test_e041_tracked_model_routed_away_from_runs_app() -> None:
    with override_settings(DATABASE_ROUTERS=[f"{__name__}.TrackedElsewhere"]):
        messages = _routing_messages()
    assert [(m.id, m.obj.__name__) for m in messages] == [("runs_app.E041", "Site")]
    assert "'elsewhere'" in messages[0].msg and "'default'" in messages[0].msg
    assert "foreign keys to runs_app.Run" in (messages[0].hint or "")


def test_e040_runs_app_models_split_across_databases() -> None:
    with override_settings(DATABASE_ROUTERS=[f"{__name__}.RunsAppSplit"]):
        messages = _routing_messages()
    assert [(m.id, m.obj.__name__) for m in messages] == [("runs_app.E040", "RunEvent")]
    assert "'runs_app'" in (messages[0].hint or "")


def test_routing_everything_together_elsewhere_is_clean() -> None:
    with override_settings(DATABASE_ROUTERS=[f"{__name__}.EverythingElsewhere"]):
        assert _routing_messages() == []
    assert _routing_messages() == []  # and without routers


class RunsAppOnRuns(_Router):
    labels = frozenset({"runs_app", "tracked_app", "example_project"})

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        return "runs" if super().db_for_write(model) else None


def test_w001_names_the_runs_app_database(monkeypatch: pytest.MonkeyPatch) -> None:
    handler = ConnectionHandler(
        {
            "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
            "runs": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
        }
    )
    monkeypatch.setattr(runs_checks, "connections", handler)
    with override_settings(DATABASE_ROUTERS=[f"{__name__}.RunsAppOnRuns"]):
        messages = list(runs_checks.check_database())
    assert [m.id for m in messages] == ["runs_app.W001"]
    assert "'runs'" in messages[0].msg
    assert 'DATABASES["runs"]["OPTIONS"]' in (messages[0].hint or "")
    assert runs_checks.check_database_routing in checks.registry.registry.get_checks()
