"""runs_app.testing: what users get to test their code (MemoryPublisher, memory_outbox, the
runs_outbox pytest fixture, RunsOutboxMixin for django.test.TestCase), with and without pytest."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from django.core.management import call_command
from django.test import TestCase, override_settings

from runs_app import services
from runs_app.conf import runs_settings
from runs_app.models import RunEvent, RunOutbox
from runs_app.testing import (
    INSTALLED_PUBLISHER,
    MemoryPublisher,
    RunsOutbox,
    RunsOutboxMixin,
    memory_outbox,
)
from tests.relay_helpers import ROOT


def test_plugin_is_registered_as_an_entry_point() -> None:
    plugins = {entry.name: entry.value for entry in entry_points(group="pytest11")}
    assert plugins.get("runs_app") == "runs_app.testing"


@pytest.mark.parametrize("module", ["runs_app.testing", "runs_app.pytest_plugin"])
def test_importing_the_plugin_touches_no_model_and_no_database(module: str) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        import {module}
        from django.conf import settings
        assert not settings.configured, "settings were configured"
        loaded = sorted(name for name in sys.modules if name.startswith("runs_app"))
        assert "runs_app.models" not in loaded and "runs_app.relay" not in loaded, loaded
        print("ok")
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "DJANGO_SETTINGS_MODULE"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr


@pytest.mark.django_db
def test_runs_outbox_drains_on_demand(runs_outbox: RunsOutbox) -> None:
    run = services.create_run("sync", run_id="r1")
    services.append_events(run, [{"type": "project.seen", "payload": {"key": "a"}}])
    assert runs_outbox.messages == []  # nothing drains in the background

    messages = runs_outbox.drain()

    assert [(m.id, m.type) for m in messages] == [
        ("r1:1", "run.started"),
        ("r1:2", "project.seen"),
    ]
    assert runs_outbox.drain() == []
    services.complete_run(run)
    services.create_run("other", run_id="r2")
    assert [m.id for m in runs_outbox.drain(run_id="r1")] == ["r1:3"]
    assert [m.id for m in runs_outbox.messages] == ["r1:1", "r1:2", "r1:3"]
    # The fixture's publisher is the configured one: the command publishes to it too.
    call_command("drain_outbox", "--once", verbosity=0)
    assert [m.id for m in runs_outbox.messages][-1] == "r2:1"


@pytest.mark.django_db
def test_runs_outbox_can_fail(runs_outbox: RunsOutbox) -> None:
    services.create_run("sync", run_id="r1")
    runs_outbox.publisher.fail_with = ConnectionError("broker down")
    assert runs_outbox.drain() == []
    assert RunOutbox.objects.get(run_id="r1").last_error == "ConnectionError: broker down"
    runs_outbox.publisher.fail_with = None
    services.retry_outbox("r1")
    assert [m.id for m in runs_outbox.drain()] == ["r1:1"]
    assert not RunEvent.objects.filter(published_at__isnull=True).exists()


USER_TEST = """
import pytest
from django.db import transaction

from runs_app import services
from runs_app.models import RunEvent


@pytest.mark.django_db
def test_events_are_published_in_order(runs_outbox):
    run = services.create_run("sync")
    services.append_events(run, [{"type": "project.seen", "payload": {"key": "a"}}])
    assert RunEvent.objects.filter(published_at__isnull=True).count() == 2

    messages = runs_outbox.drain()

    assert [m.type for m in messages] == ["run.started", "project.seen"]
    assert messages[1].as_cloudevent()["data"] == {"key": "a"}
    assert runs_outbox.drain() == []


@pytest.mark.django_db(transaction=True)
def test_only_this_tests_events(runs_outbox):
    with transaction.atomic():
        services.create_run("other")
    assert [m.type for m in runs_outbox.drain()] == ["run.started"]
"""


def test_a_user_project_gets_the_fixture_from_the_entry_point(tmp_path: Path) -> None:
    (tmp_path / "test_user.py").write_text(USER_TEST, encoding="utf-8")
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="example_project.settings",
        PYTHONPATH=str(ROOT),
        # Its own SQLite files: never the database this suite (or another helper) is using.
        DATABASE_URL=f"sqlite:///{tmp_path / 'user.sqlite3'}",
        TEST_DATABASE_NAME=str(tmp_path / "test_user.sqlite3"),
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout


# --- without pytest: memory_outbox() and RunsOutboxMixin ----------------------------------------


@pytest.mark.django_db
def test_memory_outbox_installs_the_publisher_for_the_block_only() -> None:
    before = runs_settings.PUBLISHER
    with override_settings(RUNS_APP={"DRAIN_BATCH_SIZE": 7}):
        with memory_outbox() as outbox:
            assert runs_settings.PUBLISHER == INSTALLED_PUBLISHER
            options = runs_settings.PUBLISHER_OPTIONS
            assert options == {"instance": outbox.publisher}
            assert runs_settings.DRAIN_BATCH_SIZE == 7  # the other settings as they were
            services.create_run("sync", run_id="r1")
            assert [m.id for m in outbox.drain()] == ["r1:1"]
        assert runs_settings.DRAIN_BATCH_SIZE == 7
        after = runs_settings.PUBLISHER
        assert after == before


class RunsOutboxMixinTests(RunsOutboxMixin, TestCase):
    """A unittest-style Django test case, as a project without pytest writes one (pytest-django
    runs it here; ``manage.py test`` runs it the same way, see the next test)."""

    def test_drains_on_demand(self) -> None:
        run = services.create_run("sync", run_id="r1")
        services.append_events(run, [{"type": "project.seen", "payload": {"key": "a"}}])
        self.assertEqual(self.runs_outbox.messages, [])  # nothing drains in the background

        messages = self.runs_outbox.drain()

        self.assertEqual(
            [(m.id, m.type) for m in messages], [("r1:1", "run.started"), ("r1:2", "project.seen")]
        )
        self.assertEqual(self.runs_outbox.drain(), [])
        services.create_run("other", run_id="r2")
        call_command("drain_outbox", "--once", verbosity=0)  # the configured publisher is ours
        self.assertEqual([m.id for m in self.runs_outbox.messages][-1], "r2:1")

    def test_can_fail(self) -> None:
        services.create_run("sync", run_id="r1")
        self.runs_outbox.publisher.fail_with = ConnectionError("broker down")
        self.assertEqual(self.runs_outbox.drain(), [])
        self.assertEqual(
            RunOutbox.objects.get(run_id="r1").last_error, "ConnectionError: broker down"
        )

    def test_each_test_gets_a_fresh_outbox(self) -> None:
        self.assertIsInstance(self.runs_outbox.publisher, MemoryPublisher)
        self.assertEqual(self.runs_outbox.messages, [])
        self.assertEqual(runs_settings.PUBLISHER_OPTIONS, {"instance": self.runs_outbox.publisher})


WITHOUT_PYTEST = """
import sys
import unittest

sys.modules["pytest"] = None  # import pytest raises ImportError, as where it is not installed

from runs_app.testing import MemoryPublisher, RunsOutboxMixin, memory_outbox

try:
    import runs_app.pytest_plugin
except ImportError:
    pass
else:
    raise AssertionError("pytest was importable")

import django

django.setup()

from django.test import TestCase, override_settings
from django.test.runner import DiscoverRunner

from runs_app import services


class SyncTests(RunsOutboxMixin, TestCase):
    def test_drain(self):
        services.create_run("sync", run_id="r1")
        self.assertEqual([m.id for m in self.runs_outbox.drain()], ["r1:1"])
        self.assertIsInstance(self.runs_outbox.publisher, MemoryPublisher)


runner = DiscoverRunner(verbosity=0)
runner.setup_test_environment()
databases = runner.setup_databases()
result = unittest.TextTestRunner(verbosity=0).run(
    unittest.defaultTestLoader.loadTestsFromTestCase(SyncTests)
)
runner.teardown_databases(databases)
runner.teardown_test_environment()
print("ran", result.testsRun, "failures", len(result.failures), "errors", len(result.errors))
"""


def test_testing_helpers_work_without_pytest(tmp_path: Path) -> None:
    """A project that tests with ``manage.py test`` and has no pytest installed imports
    MemoryPublisher and RunsOutboxMixin, and a TestCase using the mixin passes."""
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="example_project.settings",
        PYTHONPATH=str(ROOT),
        # Its own SQLite files: never the database this suite (or another helper) is using.
        DATABASE_URL=f"sqlite:///{tmp_path / 'user.sqlite3'}",
        TEST_DATABASE_NAME=str(tmp_path / "test_user.sqlite3"),
    )
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_PYTEST],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "ran 1 failures 0 errors 0", done.stdout + done.stderr
