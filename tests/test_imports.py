"""Every module and command of runs_app imports on its own, first, in a project that has only
runs_app installed (no admin autodiscovery importing the services ahead of them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

MINIMAL_PROJECT = """
import django
from django.conf import settings

settings.configure(
    INSTALLED_APPS=["runs_app"],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
)
django.setup()
"""

MODULES = [
    "runs_app.db",
    "runs_app.notify",
    "runs_app.relay",
    "runs_app.relay.claim",
    "runs_app.relay.drain",
    "runs_app.relay.lease",
    "runs_app.relay.listener",
    "runs_app.relay.loop",
    "runs_app.relay.read",
    "runs_app.inspection",
    "runs_app.metrics",
    "runs_app.nats_publisher",
    "runs_app.publish_metrics",
    "runs_app.publishers",
    "runs_app.services",
    "runs_app.services.outbox",
    "runs_app.testing",
    "runs_app.tracing",
    "runs_app.views",
]
COMMANDS = [
    "cleanup_old_projects",
    "drain_outbox",
    "fail_stale_runs",
    "prune_outbox",
    "runs_metrics",
    "runs_status",
]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", MINIMAL_PROJECT + code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_first(module: str) -> None:
    done = run_python(f"import {module}\n")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_command_loads_first(command: str) -> None:
    done = run_python(
        "from django.core.management import load_command_class\n"
        f"command = load_command_class('runs_app', {command!r})\n"
        f"command.create_parser('manage.py', {command!r}).format_help()\n"
    )
    assert done.returncode == 0, done.stderr
