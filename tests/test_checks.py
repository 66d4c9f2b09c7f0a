"""System checks (one test per id), lazy settings, the app config and migrations."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.apps import apps
from django.conf import settings
from django.core import checks
from django.core.management import call_command
from django.db import models
from django.db.utils import ConnectionHandler
from django.test import override_settings

from runs_app import checks as runs_checks
from runs_app.apps import RunsAppConfig
from runs_app.conf import DEFAULTS, SETTINGS, RunsAppSettings, Setting, runs_settings
from runs_app.models import Project, RunEvent

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def runs_app_messages(**runs_app: Any) -> list[checks.CheckMessage]:
    """The runs_app settings messages for ``RUNS_APP = runs_app``."""
    with override_settings(RUNS_APP=runs_app):
        return list(runs_checks.check_settings())


def ids(messages: list[checks.CheckMessage]) -> list[str | None]:
    return [message.id for message in messages]


def assert_one(messages: list[checks.CheckMessage], check_id: str) -> checks.CheckMessage:
    assert ids(messages) == [check_id], [str(m) for m in messages]
    message = messages[0]
    assert message.hint, f"{check_id} has no hint"
    return message


# key -> (its check id, invalid values, a valid value other than the default)
SETTING_CASES: dict[str, tuple[str, list[Any], Any]] = {
    "MAX_PAYLOAD_BYTES": ("runs_app.E003", [0, -1, 1.5, "1000", True, None], 1024),
    "FLUSH_BATCH_SIZE": ("runs_app.E004", [0, -5, 10.0, "10", False], 1),
    "CLEANUP_BATCH_SIZE": ("runs_app.E005", [0, 2.5, "x", True], 50),
    "CLEANUP_MAX_DELETE_FRACTION": (
        "runs_app.E006",
        [0, -0.1, 1.01, float("nan"), float("inf"), "0.5", True],
        1,
    ),
    "CLEANUP_MAX_DELETE_COUNT": ("runs_app.E007", [-1, 1.5, "10", True], 0),
    "RUN_STALE_AFTER": ("runs_app.E008", [0, -1, float("inf"), "3600", None, 1e300], 0.5),
    "PUBLISHER": ("runs_app.E009", ["", "NoDots", ".relative.Path", 42, None], "my.Publisher"),
    "PUBLISHER_OPTIONS": ("runs_app.E010", [None, [], "x=1", {1: "a"}], {"url": "x"}),
    "DRAIN_BATCH_SIZE": ("runs_app.E011", [0, -1, 1.0, True], 500),
    "CLEANUP_GRACE_RUNS": ("runs_app.E023", [0, -1, 1.5, True, "2", 1001], 3),
    "TOMBSTONE_RETENTION": ("runs_app.E024", [0, -1, float("nan"), "30d", 1e300], 86400),
    "DRAIN_MAX_BYTES": ("runs_app.E022", [0, -1, 1.5, "32MiB", True, None], 1),
    "LEASE_SECONDS": ("runs_app.E012", [0, -1, float("nan"), "60", 1e300], 0.25),
    "MAX_ATTEMPTS": ("runs_app.E013", [0, 2.0, "3", True], 1),
    "RETRY_BASE_SECONDS": ("runs_app.E014", [0, -1, float("inf"), "1", 1e300], 0.5),
    "RETRY_MAX_SECONDS": ("runs_app.E015", [0, -1, float("nan"), "600", 1e300], 5000),
    "POLL_INTERVAL": ("runs_app.E016", [0, -0.5, float("inf"), None, 1e300], 5),
    "NOTIFY": ("runs_app.E017", [1, 0, "yes", None], False),
    "NOTIFY_CHANNEL": (
        "runs_app.E018",
        ["", "1starts_with_digit", "has-dash", "has space", "x" * 64, None],
        "my_channel_" + "x" * 52,
    ),
}


def all_check_ids() -> list[str]:
    """Every id runs_app's checks report, each once per problem it stands for."""
    every_id = [setting.check_id for setting in SETTINGS.values()]
    every_id += [relation.check_id for relation in runs_checks.RELATIONS]
    every_id += ["runs_app.E001", "runs_app.E002", "runs_app.E020", "runs_app.E021"]
    return [*every_id, "runs_app.E040", "runs_app.E041", "runs_app.W001"]


def test_every_setting_has_a_case_and_its_own_check_id() -> None:
    assert set(SETTING_CASES) == set(SETTINGS) == set(DEFAULTS)
    assert {key: case[0] for key, case in SETTING_CASES.items()} == {
        key: setting.check_id for key, setting in SETTINGS.items()
    }
    every_id = all_check_ids()
    assert len(set(every_id)) == len(every_id), "a check id is used for two problems"
    # The module docstring lists every id, with what it means.
    doc = runs_checks.__doc__ or ""
    assert all(check_id.removeprefix("runs_app.") in doc for check_id in every_id)


def test_every_setting_and_check_id_is_documented() -> None:
    """The settings reference (README or docs/) has a row per key and names every id."""
    pages = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
    text = "\n".join(page.read_text(encoding="utf-8") for page in pages if page.exists())
    assert [key for key in SETTINGS if f"| `{key}` |" not in text] == []
    assert [check_id for check_id in all_check_ids() if f"`{check_id}`" not in text] == []


def test_the_table_is_the_typed_settings_class() -> None:
    """Each ``Setting`` is an attribute of RunsAppSettings named after its key, with a valid
    default and a type that mypy sees on ``runs_settings`` (checked by ``mypy`` itself)."""
    for key, setting in SETTINGS.items():
        assert getattr(RunsAppSettings, key) is setting and setting.key == key
        assert setting.is_valid(setting.default), key
        assert getattr(runs_settings, key) == setting.default
        assert setting.expected and setting.check_id.startswith("runs_app.E")
    assert list(SETTINGS)[:2] == ["MAX_PAYLOAD_BYTES", "FLUSH_BATCH_SIZE"]  # declaration order


def test_a_setting_names_itself_after_its_attribute() -> None:
    """Setting names itself from the attribute it is assigned to (``__set_name__``)."""

    class Extra:
        SOME_KEY = Setting[int](3, check_id="x.E1", is_valid=bool, expected="anything")

    assert Extra.SOME_KEY.key == "SOME_KEY"
    assert Extra().SOME_KEY == 3
    with override_settings(RUNS_APP={"SOME_KEY": 4}):
        assert Extra().SOME_KEY == 4


@pytest.mark.parametrize(
    ("key", "check_id", "value"),
    [
        pytest.param(key, check_id, value, id=f"{check_id}-{key}-{value!r}")
        for key, (check_id, bad, _) in SETTING_CASES.items()
        for value in bad
    ],
)
def test_invalid_setting_value(key: str, check_id: str, value: Any) -> None:
    message = assert_one(runs_app_messages(**{key: value}), check_id)
    assert message.level == checks.ERROR
    assert key in message.msg


@pytest.mark.parametrize(("key", "case"), SETTING_CASES.items(), ids=list(SETTING_CASES))
def test_valid_setting_value(key: str, case: tuple[str, list[Any], Any]) -> None:
    assert runs_app_messages(**{key: case[2]}) == []
    assert runs_app_messages(**{key: DEFAULTS[key]}) == []


def test_e001_runs_app_not_a_dict() -> None:
    value: object
    for value in (None, [], "MAX_PAYLOAD_BYTES=1", 1):
        with override_settings(RUNS_APP=value):
            message = assert_one(list(runs_checks.check_settings()), "runs_app.E001")
        assert type(value).__name__ in message.msg


def test_e002_unknown_key() -> None:
    message = assert_one(runs_app_messages(MAX_PAYLOAD=1, flush_batch_size=5), "runs_app.E002")
    assert "MAX_PAYLOAD" in message.msg
    assert "flush_batch_size" in message.msg
    assert "MAX_PAYLOAD_BYTES" in (message.hint or "")


def test_e030_retry_max_below_retry_base() -> None:
    message = assert_one(
        runs_app_messages(RETRY_BASE_SECONDS=10, RETRY_MAX_SECONDS=5), "runs_app.E025"
    )
    assert "RETRY_BASE_SECONDS" in message.msg and "RETRY_MAX_SECONDS" in message.msg
    # Against the default base (1.0) too; equal is fine.
    assert_one(runs_app_messages(RETRY_MAX_SECONDS=0.5), "runs_app.E025")
    assert_one(runs_app_messages(RETRY_BASE_SECONDS=601), "runs_app.E025")  # default ceiling
    assert runs_app_messages(RETRY_BASE_SECONDS=7, RETRY_MAX_SECONDS=7) == []


def test_e030_is_not_reported_over_an_invalid_setting() -> None:
    """An invalid value has its own id (E014/E015); the relation is not checked on top."""
    assert_one(runs_app_messages(RETRY_BASE_SECONDS=10, RETRY_MAX_SECONDS=-5), "runs_app.E015")
    assert_one(runs_app_messages(RETRY_BASE_SECONDS="10", RETRY_MAX_SECONDS=5), "runs_app.E014")


def test_every_problem_is_listed_at_once() -> None:
    messages = runs_app_messages(UNKNOWN=1, MAX_PAYLOAD_BYTES=0, NOTIFY="no")
    assert sorted(ids(messages)) == ["runs_app.E002", "runs_app.E003", "runs_app.E017"]  # type: ignore[type-var]
    assert all(message.hint for message in messages)


def sqlite_connection(**options: Any) -> ConnectionHandler:
    """A real (unopened) SQLite connection handler, whatever the suite's own database is."""
    return ConnectionHandler(
        {
            "default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": ":memory:",
                "OPTIONS": options,
            }
        }
    )


def test_w001_sqlite_without_immediate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runs_checks, "connections", sqlite_connection())
    message = assert_one(list(runs_checks.check_database()), "runs_app.W001")
    assert message.level == checks.WARNING
    assert "IMMEDIATE" in (message.hint or "")

    monkeypatch.setattr(runs_checks, "connections", sqlite_connection(transaction_mode="DEFERRED"))
    assert_one(list(runs_checks.check_database()), "runs_app.W001")

    monkeypatch.setattr(runs_checks, "connections", sqlite_connection(transaction_mode="IMMEDIATE"))
    assert runs_checks.check_database() == []


def test_e020_sqlite_too_old(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runs_checks, "connections", sqlite_connection(transaction_mode="IMMEDIATE"))
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.34.1")
    message = assert_one(list(runs_checks.check_database()), "runs_app.E020")
    assert message.level == checks.ERROR
    assert "3.34.1" in message.msg
    assert "3.35" in (message.hint or "")

    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 35, 0))
    assert runs_checks.check_database() == []


def test_default_configuration_has_no_runs_app_messages() -> None:
    messages = checks.run_checks(include_deployment_checks=False)
    assert [m for m in messages if (m.id or "").startswith("runs_app.")] == []
    # The suite's own database is configured as the README says: nothing to warn about.
    assert runs_checks.check_database() == []


def test_manage_py_check_is_clean() -> None:
    out = StringIO()
    call_command("check", stdout=out, stderr=out)
    assert "System check identified no issues" in out.getvalue()


def test_manage_py_check_reports_runs_app_errors() -> None:
    from django.core.management.base import SystemCheckError

    with (
        override_settings(RUNS_APP={"MAX_ATTEMPTS": 0}),
        pytest.raises(SystemCheckError, match=r"runs_app\.E013"),
    ):
        call_command("check", stdout=StringIO(), stderr=StringIO())


# --- conf: lazy, re-read on every access ----------------------------------------------------


def test_settings_default_when_absent() -> None:
    with override_settings():
        del settings.RUNS_APP
        assert runs_settings.MAX_PAYLOAD_BYTES == 262144
        assert runs_checks.check_settings() == []


def test_override_settings_takes_effect_immediately() -> None:
    assert runs_settings.FLUSH_BATCH_SIZE == 1000
    with override_settings(RUNS_APP={"FLUSH_BATCH_SIZE": 7}):
        assert runs_settings.FLUSH_BATCH_SIZE == 7
        # Keys not given keep their defaults.
        assert runs_settings.NOTIFY_CHANNEL == "runs_app_outbox"
        with override_settings(RUNS_APP={"FLUSH_BATCH_SIZE": 8}):
            assert runs_settings.FLUSH_BATCH_SIZE == 8
        assert runs_settings.FLUSH_BATCH_SIZE == 7
    assert runs_settings.FLUSH_BATCH_SIZE == 1000


def test_unknown_setting_attribute() -> None:
    with pytest.raises(AttributeError, match="NO_SUCH_SETTING"):
        _ = runs_settings.NO_SUCH_SETTING  # type: ignore[attr-defined]  # missing on purpose


# --- app config ---------------------------------------------------------------------------------


def test_default_auto_field_is_pinned() -> None:
    assert RunsAppConfig.default_auto_field == "django.db.models.BigAutoField"
    assert apps.get_app_config("runs_app").default_auto_field == RunsAppConfig.default_auto_field
    # The example project's own default is AutoField, yet the app's models use BigAutoField:
    # the app config wins over the host project's setting.
    assert settings.DEFAULT_AUTO_FIELD == "django.db.models.AutoField"
    for model in (RunEvent, Project):
        assert type(model._meta.pk) is models.BigAutoField


@pytest.mark.django_db
@pytest.mark.parametrize(
    "auto_field",
    [None, "django.db.models.AutoField", "django.db.models.BigAutoField"],
)
def test_makemigrations_reports_no_changes(auto_field: str | None) -> None:
    out = StringIO()
    overrides = {} if auto_field is None else {"DEFAULT_AUTO_FIELD": auto_field}
    with override_settings(**overrides):
        # Exits with status 1 (SystemExit) if a migration is missing.
        call_command("makemigrations", "runs_app", check=True, dry_run=True, stdout=out)
    assert "No changes detected" in out.getvalue()


def run_python(code: str, tmp_path: Path, settings_module: str) -> str:
    """Run ``code`` in a fresh interpreter (so model classes are built from scratch)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(PROJECT_ROOT)]),
        "DJANGO_SETTINGS_MODULE": settings_module,
        # A throwaway database: makemigrations reads the migration history of the real one.
        "DATABASE_URL": f"sqlite:///{tmp_path / 'scratch.sqlite3'}",
    }
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize("auto_field", ["AutoField", "BigAutoField", "SmallAutoField"])
def test_host_default_auto_field_never_makes_migrations(tmp_path: Path, auto_field: str) -> None:
    """A host project with any DEFAULT_AUTO_FIELD, models built fresh in a new process."""
    (tmp_path / "host_settings.py").write_text(
        "from example_project.settings import *  # noqa: F403\n"
        f'DEFAULT_AUTO_FIELD = "django.db.models.{auto_field}"\n'
    )
    out = run_python(
        """
        import django
        from django.core.management import call_command
        django.setup()
        call_command("makemigrations", "runs_app", check=True, dry_run=True)
        """,
        tmp_path,
        "host_settings",
    )
    assert "No changes detected" in out


def test_ready_starts_no_thread_and_opens_no_connection(tmp_path: Path) -> None:
    out = run_python(
        """
        import threading
        import django
        before = {thread.ident for thread in threading.enumerate()}
        django.setup()
        from django.core.checks.registry import registry
        from django.db import connections
        from runs_app import checks
        assert checks.check_settings in registry.get_checks()  # ready() ran
        after = {thread.ident for thread in threading.enumerate()}
        print("new threads:", len(after - before))
        print("open connections:", sum(c.connection is not None for c in connections.all()))
        """,
        tmp_path,
        "example_project.settings",
    )
    assert "new threads: 0" in out
    assert "open connections: 0" in out


def test_ready_registers_the_checks() -> None:
    # Sequence[object]: the registry types its items as a protocol the plain functions are not.
    registered: Sequence[object] = checks.registry.registry.get_checks()
    assert runs_checks.check_settings in registered
    assert runs_checks.check_database in registered
