"""``manage.py runs_status``: text and JSON, thresholds at and over their limits, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, connections
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from runs_app import inspection, services
from runs_app.management.commands.runs_status import Command
from runs_app.models import CleanupStatus, Run, RunEvent, RunOutbox, RunState
from tests import scenarios
from tests.tracked_app.models import Device, Membership

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[1]


def status(*argv: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    """Run the command as ``manage.py runs_status ARGV`` would (argument parsing, CommandError
    to stderr and exit code), in this process so that it sees the test's data.

    run_from_argv closes every connection when it ends; that would end the test's transaction,
    so only that is disabled."""
    monkeypatch.setattr(connections, "close_all", lambda: None)
    out, err = StringIO(), StringIO()
    command = Command(stdout=out, stderr=err)
    try:
        command.run_from_argv(["manage.py", "runs_status", *argv])
    except SystemExit as exit:
        code = exit.code
        assert isinstance(code, int)
        return code, out.getvalue(), err.getvalue()
    return 0, out.getvalue(), err.getvalue()


def as_json(*argv: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, dict[str, Any]]:
    code, out, _ = status("--json", *argv, monkeypatch=monkeypatch)
    return code, json.loads(out)


def age_pending_events(run_id: str, seconds: float) -> None:
    RunEvent.objects.filter(run_id=run_id).update(
        created_at=timezone.now() - timedelta(seconds=seconds)
    )


def make_stale(run_id: str) -> None:
    RunState.objects.filter(run_id=run_id).update(heartbeat_at=timezone.now() - timedelta(hours=2))


def test_no_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = status(monkeypatch=monkeypatch)
    assert (code, err) == (0, "")
    assert "No runs." in out and out.rstrip().endswith("OK")
    code, data = as_json(monkeypatch=monkeypatch)
    assert code == 0
    assert data["scopes"] == []
    assert data["outbox"] == {
        "pending_events": 0,
        "runs_with_pending": 0,
        "oldest_pending_age_seconds": None,
        "blocked_runs": 0,
        "held_leases": 0,
    }
    assert data["ok"] is True and data["exceeded"] == []


def test_text_shows_the_latest_run_of_each_scope_and_the_outbox(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scenarios.completed_run("gamma", "gamma-1")
    scenarios.failed_flush_run("gamma", "gamma-2")  # the latest of gamma
    scenarios.completed_run("beta", "beta-1", removed=3)
    scenarios.hold_lease(scenarios.active_run("alpha", "alpha-1"))

    code, out, err = status(monkeypatch=monkeypatch)

    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == [
        "scope",
        "latest",
        "run",
        "status",
        "age",
        "flush",
        "seen",
        "created",
        "updated",
        "removed",
        "cleanup",
        "runs",
    ]
    assert lines[1].split()[:3] == ["alpha", "alpha-1", "active"]
    beta = lines[2].split()
    assert beta[:3] == ["beta", "beta-1", "completed"]
    assert beta[-7:] == ["succeeded", "120", "20", "100", "3", "done", "1"]
    gamma = lines[3].split()
    assert gamma[:3] == ["gamma", "gamma-2", "failed"]
    assert gamma[-3:] == ["refused:", "flush_failed", "2"]
    assert "  pending events      7 in 4 run(s)" in lines  # started + closed events, alpha's 1
    assert "  blocked runs        0" in lines
    assert "  held leases         1" in lines
    assert "  stale runs          0" in lines
    # No threshold given: exit 0, but never a bare OK over a failed latest run.
    assert lines[-1] == (
        "OK (no threshold exceeded), but 1 scope(s) whose latest run failed or whose cleanup "
        "was refused: gamma (--max-failed 0 exits 1 then)"
    )


def test_json_has_the_same_facts(monkeypatch: pytest.MonkeyPatch) -> None:
    scenarios.completed_run("beta", "beta-1", removed=3)
    blocked = scenarios.active_run("delta", "delta-1")
    scenarios.block_outbox(blocked)
    age_pending_events("delta-1", 120)
    make_stale("delta-1")

    code, data = as_json(monkeypatch=monkeypatch)

    assert code == 0
    assert [item["scope"] for item in data["scopes"]] == ["beta", "delta"]
    beta = data["scopes"][0]
    assert beta["run_id"] == "beta-1"
    assert beta["status"] == "completed" and beta["stale"] is False
    assert (beta["flush_status"], beta["rows_seen"], beta["rows_removed"]) == ("succeeded", 120, 3)
    assert (beta["cleanup_status"], beta["cleanup_reason"], beta["runs"]) == ("done", "", 1)
    assert data["scopes"][1]["stale"] is True
    outbox = data["outbox"]
    assert outbox["pending_events"] == 3 and outbox["runs_with_pending"] == 2
    assert outbox["blocked_runs"] == 1 and outbox["held_leases"] == 0
    assert 120 <= outbox["oldest_pending_age_seconds"] < 3600
    assert data["stale_runs"] == 1
    assert data["thresholds"] == {
        "max_lag": None,
        "max_blocked": None,
        "max_stale": None,
        "max_age": None,
        "max_failed": None,
    }
    assert data["failed_checks"] == [] and beta["problems"] == []
    assert beta["last_completed_at"] is not None and beta["last_completed_age_seconds"] < 60
    assert data["scopes"][1]["last_completed_at"] is None  # delta never completed


def test_scope_option_restricts_every_fact(monkeypatch: pytest.MonkeyPatch) -> None:
    scenarios.block_outbox(scenarios.active_run("alpha", "alpha-1"))
    scenarios.completed_run("beta", "beta-1")
    code, data = as_json("--scope", "beta", monkeypatch=monkeypatch)
    assert code == 0
    assert [item["scope"] for item in data["scopes"]] == ["beta"]
    assert data["outbox"]["blocked_runs"] == 0
    assert data["outbox"]["pending_events"] == 2


def test_delivered_events_are_not_pending(monkeypatch: pytest.MonkeyPatch) -> None:
    run = scenarios.completed_run("beta", "beta-1")
    RunEvent.objects.filter(run=run, seq=1).update(published_at=timezone.now())
    RunOutbox.objects.filter(run=run).update(next_seq=2)
    age_pending_events("beta-1", 0)
    code, data = as_json(monkeypatch=monkeypatch)
    assert (code, data["outbox"]["pending_events"]) == (0, 1)


@pytest.mark.parametrize(
    ("option", "at_limit", "over_limit"),
    [("--max-blocked", "2", "1"), ("--max-stale", "2", "1")],
)
def test_count_thresholds_at_and_over_the_limit(
    monkeypatch: pytest.MonkeyPatch, option: str, at_limit: str, over_limit: str
) -> None:
    for index in range(2):
        run = scenarios.active_run(f"s{index}", f"r{index}")
        scenarios.block_outbox(run)
        make_stale(run.pk)

    code, out, err = status(option, at_limit, monkeypatch=monkeypatch)
    assert (code, err) == (0, "")
    assert out.rstrip().endswith("OK")

    code, out, err = status(option, over_limit, monkeypatch=monkeypatch)
    assert code == 1
    assert f"> {option} 1" in err and err.startswith("CommandError: ")
    assert "EXCEEDED: 2 " in out

    code, data = as_json(option, over_limit, monkeypatch=monkeypatch)
    assert code == 1
    assert data["ok"] is False and len(data["exceeded"]) == 1


def test_lag_threshold_over_and_under_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    scenarios.active_run("alpha", "alpha-1")
    age_pending_events("alpha-1", 600)
    assert status("--max-lag", "3600", monkeypatch=monkeypatch)[0] == 0
    code, out, err = status("--max-lag", "300", monkeypatch=monkeypatch)
    assert code == 1 and "> --max-lag 300s" in err and "EXCEEDED: delivery lag" in out
    # Nothing pending: no lag, whatever the limit.
    RunOutbox.objects.filter(run_id="alpha-1").update(next_seq=2)
    assert status("--max-lag", "0", monkeypatch=monkeypatch)[0] == 0


def test_thresholds_are_strictly_greater() -> None:
    """At the limit exactly is healthy (the clock cannot be pinned through the command, so the
    comparison itself is checked on fixed facts)."""

    def facts(lag: float, blocked: int, stale: int) -> inspection.Health:
        return inspection.Health(
            checked_at=timezone.now(),
            scopes=[],
            outbox=inspection.OutboxHealth(
                pending_events=1,
                runs_with_pending=1,
                oldest_pending_age_seconds=lag,
                blocked_runs=blocked,
                held_leases=0,
            ),
            stale_runs=stale,
        )

    limits = {"max_lag": 60.0, "max_blocked": 2, "max_stale": 3}
    assert Command.exceeded(facts(60.0, 2, 3), limits) == []
    assert len(Command.exceeded(facts(60.001, 2, 3), limits)) == 1
    assert len(Command.exceeded(facts(60.0, 3, 3), limits)) == 1
    assert len(Command.exceeded(facts(60.0, 2, 4), limits)) == 1
    assert len(Command.exceeded(facts(61, 3, 4), limits)) == 3


@override_settings(RUNS_APP={"RUN_STALE_AFTER": 60})
def test_stale_follows_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    scenarios.active_run("alpha", "alpha-1")
    RunState.objects.filter(run_id="alpha-1").update(
        heartbeat_at=timezone.now() - timedelta(seconds=120)
    )
    assert as_json(monkeypatch=monkeypatch)[1]["stale_runs"] == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-lag", "-1"],
        ["--max-lag", "soon"],
        ["--max-lag", "nan"],
        ["--max-blocked", "1.5"],
        ["--max-stale", "-2"],
        ["--max-age", "-1"],
        ["--max-age", "0"],
        ["--max-age", "soon"],
        ["--max-age", "inf"],
        ["--max-failed", "-1"],
        ["--max-failed", "1.5"],
        ["--max-fail", "1"],  # abbreviations are refused
        ["--frobnicate"],
        ["--scope", ""],
        ["--scope", "x" * 201],
        ["--scope", "nowhere"],
    ],
)
def test_usage_errors_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    scenarios.active_run("alpha", "alpha-1")
    code, out, err = status(*argv, monkeypatch=monkeypatch)
    assert code == 2
    assert out == ""
    message = err + capsys.readouterr().err  # argparse writes to sys.stderr
    assert "error" in message.lower() or "scope" in message
    if argv[0] in ("--max-age", "--max-failed"):
        assert f"{argv[0]}: {argv[1]!r}" in message  # names the option and the value


def test_call_command_raises_command_error_with_the_exit_code() -> None:
    scenarios.block_outbox(scenarios.active_run("alpha", "alpha-1"))
    out = StringIO()
    with pytest.raises(CommandError) as raised:
        call_command("runs_status", "--max-blocked", "0", stdout=out)
    assert raised.value.returncode == 1
    assert "EXCEEDED" in out.getvalue()


def test_a_real_process_exits_2_on_a_bad_argument() -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "runs_status", "--max-blocked", "many"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        check=False,
    )
    assert result.returncode == 2
    assert "--max-blocked: 'many' is not an integer" in result.stderr


def test_health_costs_the_same_queries_for_3_or_30_runs() -> None:
    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            facts = inspection.health()
        assert facts.scopes
        return len(captured)

    for index in range(3):
        scenarios.block_outbox(scenarios.active_run(f"s{index}", f"r{index}"))
    few = queries()
    for index in range(3, 30):
        scenarios.completed_run(f"s{index % 5 + 3}", f"r{index}")
    assert queries() == few == 6  # with the per-model lines of the latest runs


def test_the_latest_runs_per_model_lines_are_shown_under_the_summary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = services.create_run("fleet")
    with services.flush(run, Device) as flush:
        flush.write(
            [{"uid": uuid.UUID(int=1), "name": "d1"}, {"uid": uuid.UUID(int=2), "name": "d2"}]
        )
    with services.flush(run, Membership, incremental=True) as flush:
        flush.write([{"repo_id": 1, "login": "ada", "role": "admin"}], cursor={"since": 7})
    services.complete_run(run)

    code, out, _ = status(monkeypatch=monkeypatch)

    assert code == 0
    lines = out.splitlines()
    start = lines.index("per model (latest run of each scope)")
    assert lines[start + 1].split() == [
        "scope",
        "model",
        "flush",
        "seen",
        "created",
        "updated",
        "confirmed",
        "removed",
        "cleanup",
    ]
    assert lines[start + 2].split() == [
        "fleet",
        "tracked_app.device",
        "succeeded",
        "2",
        "2",
        "0",
        "2",
        "0",
        "not_run",
    ]
    assert lines[start + 3].split()[:5] == [
        "fleet",
        "tracked_app.membership",
        "succeeded",
        "(incremental)",
        "1",
    ]
    code, out, _ = status("--json", monkeypatch=monkeypatch)
    (scope,) = json.loads(out)["scopes"]
    assert [line["model"] for line in scope["models"]] == [
        "tracked_app.device",
        "tracked_app.membership",
    ]
    assert scope["models"][0]["rows_confirmed"] == 2
    assert [(line["flush_mode"], line["cursor"]) for line in scope["models"]] == [
        ("full", None),
        ("incremental", {"since": 7}),
    ]


def finished_ago(run_id: str, seconds: float) -> None:
    RunState.objects.filter(run_id=run_id).update(
        finished_at=timezone.now() - timedelta(seconds=seconds)
    )


def test_max_age_flags_scopes_whose_last_completed_run_is_old_or_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scenarios.completed_run("alpha", "alpha-1")
    finished_ago("alpha-1", 7200)
    scenarios.active_run("alpha", "alpha-2")  # the latest run of alpha: not completed yet
    scenarios.completed_run("beta", "beta-1")
    scenarios.active_run("gamma", "gamma-1")  # gamma never completed a run

    code, out, err = status("--max-age", "3600", monkeypatch=monkeypatch)

    assert code == 1
    assert err.startswith("CommandError: 2 scope(s) without a completed run within --max-age 3600s")
    assert "alpha (last completed 2h 00m ago), gamma (no completed run)" in err
    assert "EXCEEDED: 2 scope(s)" in out

    code, data = as_json("--max-age", "3600", monkeypatch=monkeypatch)
    assert code == 1 and data["ok"] is False
    assert data["failed_checks"] == ["max_age"] and data["thresholds"]["max_age"] == 3600
    assert {item["scope"]: item["problems"] for item in data["scopes"]} == {
        "alpha": ["max_age"],
        "beta": [],
        "gamma": ["max_age"],
    }
    alpha = data["scopes"][0]
    assert alpha["run_id"] == "alpha-2" and 7200 <= alpha["last_completed_age_seconds"] < 7260

    assert status("--max-age", "3600", "--scope", "beta", monkeypatch=monkeypatch)[0] == 0
    RunState.objects.filter(run_id="gamma-1").delete()
    Run.objects.filter(pk="gamma-1").delete()
    assert status("--max-age", "10800", monkeypatch=monkeypatch)[0] == 0


def test_max_failed_flags_a_failed_latest_run_or_a_refused_cleanup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scenarios.failed_flush_run("alpha", "alpha-1")
    scenarios.completed_run("alpha", "alpha-2")  # alpha recovered: its latest run completed
    scenarios.completed_run("beta", "beta-1")
    scenarios.failed_flush_run("gamma", "gamma-1")
    refused = scenarios.completed_run("delta", "delta-1")
    RunState.objects.filter(run=refused).update(
        cleanup_status=CleanupStatus.REFUSED, cleanup_reason="too_many_deletions"
    )
    # An incremental run's refusal is the design working, not a failure.
    incremental = scenarios.completed_run("epsilon", "epsilon-1")
    RunState.objects.filter(run=incremental).update(
        cleanup_status=CleanupStatus.REFUSED, cleanup_reason="incremental_run"
    )

    # Without the threshold the exit code stays 0, as documented; the last line says why not OK.
    code, out, _ = status(monkeypatch=monkeypatch)
    assert code == 0
    assert out.rstrip().endswith("refused: delta, gamma (--max-failed 0 exits 1 then)")

    code, out, err = status("--max-failed", "0", monkeypatch=monkeypatch)
    assert code == 1
    assert (
        "2 scope(s) with a failed run or refused cleanup > --max-failed 0: "
        "delta (cleanup refused: too_many_deletions), gamma (run failed)"
    ) in err
    assert out.splitlines()[-1].startswith("EXCEEDED: 2 scope(s) with a failed run")

    code, data = as_json("--max-failed", "0", "--max-age", "3600", monkeypatch=monkeypatch)
    assert code == 1
    assert data["failed_checks"] == ["max_age", "max_failed"]  # gamma never completed a run
    problems = {item["scope"]: item["problems"] for item in data["scopes"]}
    assert problems == {
        "alpha": [],
        "beta": [],
        "delta": ["max_failed"],
        "epsilon": [],
        "gamma": ["max_age", "max_failed"],
    }

    assert status("--max-failed", "2", monkeypatch=monkeypatch)[0] == 0  # at the limit
    assert status("--max-failed", "0", "--scope", "beta", monkeypatch=monkeypatch)[0] == 0


def test_every_exceeded_threshold_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    scenarios.failed_flush_run("alpha", "alpha-1")
    scenarios.block_outbox(scenarios.active_run("beta", "beta-1"))
    age_pending_events("beta-1", 600)
    argv = ["--max-lag", "60", "--max-blocked", "0", "--max-age", "60", "--max-failed", "0"]
    code, data = as_json(*argv, monkeypatch=monkeypatch)
    assert code == 1
    assert data["failed_checks"] == ["max_lag", "max_blocked", "max_age", "max_failed"]
    assert len(data["exceeded"]) == 4
    problems = {item["scope"]: item["problems"] for item in data["scopes"]}
    assert problems == {"alpha": ["max_age", "max_failed"], "beta": ["max_age"]}


def test_max_age_at_and_over_the_limit() -> None:
    """Strictly greater than the limit, on fixed facts (the clock cannot be pinned)."""

    def facts(*ages: float | None) -> inspection.Health:
        scopes = [
            inspection.ScopeHealth(
                scope=f"s{index}",
                run_id=f"r{index}",
                status="completed",
                started_at=timezone.now(),
                finished_at=timezone.now(),
                age_seconds=0.0,
                stale=False,
                flush_status="succeeded",
                rows_seen=0,
                rows_created=0,
                rows_updated=0,
                rows_removed=0,
                cleanup_status="not_run",
                cleanup_reason="",
                runs=1,
                last_completed_at=None if age is None else timezone.now(),
                last_completed_age_seconds=age,
                models=[],
            )
            for index, age in enumerate(ages)
        ]
        outbox = inspection.OutboxHealth(
            pending_events=0,
            runs_with_pending=0,
            oldest_pending_age_seconds=None,
            blocked_runs=0,
            held_leases=0,
        )
        return inspection.Health(
            checked_at=timezone.now(), scopes=scopes, outbox=outbox, stale_runs=0
        )

    limits = {"max_age": 60.0}
    assert Command.exceeded(facts(60.0, 0.0), limits) == []
    (found,) = Command.exceeded(facts(60.0, 60.001, None), limits)
    assert (found.check, found.scopes) == ("max_age", ("s1", "s2"))
    assert Command.exceeded(facts(61), {"max_age": None}) == []  # not given: not checked
