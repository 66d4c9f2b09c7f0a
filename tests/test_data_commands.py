"""The data-management commands (cleanup_old_projects, fail_stale_runs) and the main job
(sync_projects): output, exit codes, and what they leave in the database."""

from __future__ import annotations

import os
import subprocess
import sys
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from example_project.management.commands.sync_projects import SAMPLE_SOURCE
from runs_app import services
from runs_app.management.commands import fail_stale_runs
from runs_app.models import Project, RunEvent, RunState
from tests.helpers import keys, shell_parser, snapshot, stored, synced_run
from tests.test_stale import age
from tests.tracked_app.models import Membership

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parent.parent


def run_command(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def command_error(*args: str) -> CommandError:
    with pytest.raises(CommandError) as caught:
        run_command(*args)
    return caught.value


# cleanup_old_projects


def test_cleanup_by_run() -> None:
    synced_run("s", keys(0, 10))
    run = synced_run("s", keys(0, 8))
    out, _ = run_command("cleanup_old_projects", "--run", run.pk)
    assert out == f"Cleanup of run {run.pk} (scope 's'): removed 2 project(s).\n"
    assert sorted(stored("s")) == keys(0, 8)


def test_cleanup_of_another_tracked_model() -> None:
    def members(logins: str) -> Any:
        run = services.create_run("org")
        with services.flush(run, Membership) as flush:
            flush.write({"repo_id": 1, "login": login, "role": "r"} for login in logins)
        return services.complete_run(run)

    members("abcdef")
    run = members("abcde")
    out, _ = run_command(
        "cleanup_old_projects", "--run", run.pk, "--model", "tracked_app.Membership", "--dry-run"
    )
    assert out == (
        f"Dry run for run {run.pk} (scope 'org'): 1 row(s) of tracked_app.membership to remove "
        "(first keys: [1, 'f']).\n"
    )
    out, _ = run_command(
        "cleanup_old_projects", "--scope", "org", "--model", "tracked_app.membership"
    )
    assert "removed 1 row(s) of tracked_app.membership" in out
    assert sorted(Membership.objects.values_list("login", flat=True)) == list("abcde")


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("tracked_app.nope", "is not a model of the project"),
        ("runs_app.RunState", "is not a tracked model"),
        ("nodot", "is not a model of the project"),
    ],
)
def test_model_must_be_a_tracked_model(model: str, message: str) -> None:
    synced_run("s", keys(0, 10))
    before = snapshot()
    error = command_error("cleanup_old_projects", "--scope", "s", "--model", model)
    assert "argument --model" in str(error) and message in str(error)
    assert snapshot() == before


def test_cleanup_by_scope_takes_the_latest_run_whatever_its_status() -> None:
    synced_run("s", keys(0, 10))
    synced_run("s", keys(0, 8))
    latest = services.create_run("s")
    before = snapshot()["Project"]

    error = command_error("cleanup_old_projects", "--scope", "s")

    assert error.returncode == 1
    assert str(error).startswith("cleanup refused: run_not_completed: ")
    assert latest.pk in str(error)
    assert snapshot()["Project"] == before


def test_a_refusal_exits_1_with_the_reason_and_message() -> None:
    synced_run("s", keys(0, 10))
    run = synced_run("s", keys(0, 2))
    error = command_error("cleanup_old_projects", "--run", run.pk)
    assert error.returncode == 1
    assert str(error).startswith("cleanup refused: too_many_deletions: would delete 8 of 10")
    assert Project.objects.count() == 10


def test_force_overrides_and_says_so() -> None:
    synced_run("s", keys(0, 10))
    run = synced_run("s", keys(0, 2))
    out, _ = run_command("cleanup_old_projects", "--run", run.pk, "--force")
    assert "removed 8 project(s). Forced: a guard was overridden." in out
    assert RunState.objects.get(run=run).cleanup_forced


def test_dry_run_prints_the_plan_and_writes_nothing() -> None:
    synced_run("s", keys(0, 10))
    run = synced_run("s", keys(0, 7))
    before = snapshot()
    out, _ = run_command("cleanup_old_projects", "--scope", "s", "--dry-run")
    assert out == (
        f"Dry run for run {run.pk} (scope 's'): 3 project(s) to remove "
        "(first keys: p007, p008, p009).\n"
    )
    assert snapshot() == before


def test_a_dry_run_that_would_refuse_exits_1_and_writes_nothing() -> None:
    synced_run("s", keys(0, 10))
    run = synced_run("s", [])
    before = snapshot()
    out, err = StringIO(), StringIO()
    with pytest.raises(CommandError) as caught:
        call_command("cleanup_old_projects", "--run", run.pk, "--dry-run", stdout=out, stderr=err)
    assert caught.value.returncode == 1
    assert str(caught.value).startswith("a cleanup would be refused: empty_run: ")
    assert "10 project(s) to remove" in out.getvalue()
    assert snapshot() == before


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--run", "x", "--scope", "s"],
        ["--run", "missing"],
        ["--run", "has space"],
        ["--scope", "empty-scope"],
        ["--scope", " bad"],
    ],
    ids=[
        "neither",
        "both",
        "unknown-run",
        "bad-run-id",
        "scope-without-runs",
        "bad-scope",
    ],
)
def test_usage_errors_exit_2_and_delete_nothing(args: list[str]) -> None:
    synced_run("s", keys(0, 10))
    synced_run("s", keys(0, 9))
    before = snapshot()
    error = command_error("cleanup_old_projects", *args)
    assert error.returncode == 2
    assert snapshot() == before


def _database_url() -> str:
    settings = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{settings['NAME']}"
    host = settings["HOST"] or "127.0.0.1"
    return f"postgres://{settings['USER']}@{host}:{settings['PORT'] or 5432}/{settings['NAME']}"


def manage(*args: str) -> subprocess.CompletedProcess[str]:
    """The command as an operator runs it: a process, with its real exit code and stderr."""
    env = {**os.environ, "DATABASE_URL": _database_url()}
    env.pop("TEST_DATABASE_NAME", None)
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


@pytest.mark.django_db(transaction=True)
def test_exit_codes_and_stderr_from_a_real_process() -> None:
    synced_run("s", keys(0, 10))
    run = services.create_run("s")
    services.flush_projects(run, [])
    services.complete_run(run)

    refused = manage("cleanup_old_projects", "--run", run.pk)
    unknown = manage("cleanup_old_projects", "--run", "missing")
    neither = manage("cleanup_old_projects")
    bad_type = manage("fail_stale_runs", "--older-than", "soon")

    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr.startswith("CommandError: cleanup refused: empty_run: ")
    assert (unknown.returncode, unknown.stderr) == (2, "CommandError: No run with id 'missing'.\n")
    assert neither.returncode == 2
    assert "exactly one of --run RUN_ID or --scope SCOPE" in neither.stderr
    assert bad_type.returncode == 2
    assert "'soon' is not a number of seconds" in bad_type.stderr
    assert Project.objects.count() == 10


# fail_stale_runs


def test_fail_stale_runs_command() -> None:
    stale, fresh = services.create_run("a"), services.create_run("b")
    age(stale, 120)
    age(fresh, 30)
    out, _ = run_command("fail_stale_runs", "--older-than", "60")
    assert out == "Marked 1 stale run(s) failed.\n"
    assert RunState.objects.get(run=stale).status == "failed"
    out, _ = run_command("fail_stale_runs")
    assert out == "Marked 0 stale run(s) failed.\n"


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_older_than_must_be_a_positive_number(value: str) -> None:
    parser = shell_parser(fail_stale_runs.Command(), "fail_stale_runs")
    with pytest.raises(SystemExit) as caught:
        parser.parse_args(["--older-than", value])
    assert caught.value.code == 2


# sync_projects, the main job


def sync(*args: str) -> str:
    out, _ = run_command("sync_projects", "--scope", "demo", *args)
    return out


def sync_failing(*args: str) -> tuple[CommandError, str]:
    out = StringIO()
    with pytest.raises(CommandError) as caught:
        call_command("sync_projects", "--scope", "demo", *args, stdout=out, stderr=StringIO())
    return caught.value, out.getvalue()


def test_sync_creates_then_updates_everything() -> None:
    first = sync()
    assert first.count("  page ") == 5
    assert "page 5: 100 project(s) flushed (100 created, 0 updated), 500 so far" in first
    assert "completed; flush succeeded, 500 seen (500 created, 0 updated), 500 confirmed." in first
    assert "Cleanup: removed 0 project(s)" in first
    assert first.endswith("Scope 'demo' holds 500 project(s).\n")

    second = sync("--page-size", "250")
    assert second.count("  page ") == 2  # no empty third page
    assert "500 seen (0 created, 500 updated), 500 confirmed." in second


def test_sync_removes_what_the_source_dropped() -> None:
    sync()
    out = sync("--remove", "5")
    assert "Cleanup: removed 5 project(s) no longer in the source." in out
    assert "Scope 'demo' holds 495 project(s)." in out
    run = services.latest_run("demo")
    assert run is not None
    removed = [
        row["key"]
        for event in RunEvent.objects.filter(run=run, type="projects.removed")
        for row in event.payload["rows"]
    ]
    assert removed == [f"proj-{n:04d}" for n in range(496, 501)]


def test_sync_failure_demo_loses_nothing() -> None:
    sync()
    before = snapshot()["Project"]

    error, out = sync_failing("--fail-after", "250")

    assert error.returncode == 1
    assert str(error) == "sync incomplete: flush failed; run failed; cleanup refused (flush_failed)"
    assert "  page 3: FLUSH FAILED: " in out
    assert "source connection lost after 250 projects" in out
    assert "failed (flush_failed: SourceFailed: source connection lost after 250 projects)" in out
    assert "Cleanup refused: flush_failed: " in out
    assert "Scope 'demo' holds 500 project(s). Nothing was deleted." in out
    # Pages 1-2 were re-stamped by the failed run, page 3 rolled back; no row lost or changed.
    after = snapshot()["Project"]
    assert len(after) == len(before) == 500
    strip = {"last_seen_run_id", "updated_at"}

    def content(rows: list[Any]) -> list[Any]:
        return [tuple(item for item in row if item[0] not in strip) for row in rows]

    assert content(after) == content(before)


def test_sync_of_an_empty_source_is_refused() -> None:
    sync()
    error, out = sync_failing("--empty")
    assert error.returncode == 1
    assert "flush succeeded, 0 seen" in out
    assert "Cleanup refused: empty_run: " in out
    assert Project.objects.filter(scope="demo").count() == 500


def test_sync_refuses_a_mass_deletion() -> None:
    sync()
    error, out = sync_failing("--remove", "300")
    assert "Cleanup refused: too_many_deletions: would delete 300 of 500" in out
    assert Project.objects.filter(scope="demo").count() == 500
    assert error.returncode == 1


def test_the_sample_source_is_500_distinct_projects() -> None:
    import json

    projects = json.loads(SAMPLE_SOURCE.read_text(encoding="utf-8"))
    assert len(projects) == len({project["key"] for project in projects}) == 500
    assert all(set(project) == {"key", "name", "data"} for project in projects)


@pytest.mark.parametrize("args", [["--page-size", "0"], ["--remove", "-1"], ["--fail-after", "x"]])
def test_sync_argument_errors(args: list[str]) -> None:
    with pytest.raises(CommandError, match="Error: argument"):
        call_command("sync_projects", *args)
    assert not Project.objects.exists()
