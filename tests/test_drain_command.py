"""The drain_outbox and prune_outbox commands: output, exit codes, bad arguments, loop mode."""

from __future__ import annotations

import datetime as dt
import io
import signal
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from runs_app import relay, services
from runs_app.models import RunEvent, RunOutbox
from runs_app.testing import MemoryPublisher, RunsOutbox
from tests.relay_helpers import (
    assert_cursor_invariant,
    manage,
    mid_batch,
    read_deliveries,
    relay_env,
    seed_runs,
    start_relay,
    stop_all,
    wait_until,
)


def drain(*args: str) -> str:
    out = io.StringIO()
    call_command("drain_outbox", *args, stdout=out)
    return out.getvalue()


def make_run(name: str, events: int = 0) -> None:
    services.create_run(name, run_id=name, events=[{"type": "step"}] * events)


@pytest.mark.django_db
def test_once_drains_everything_and_reports(runs_outbox: RunsOutbox) -> None:
    make_run("a", 2)
    make_run("b", 1)

    output = drain("--once", "--batch-size", "2", "-v", "2")

    assert [(m.run_id, m.seq) for m in runs_outbox.messages] == [
        ("a", 1),
        ("a", 2),
        ("b", 1),
        ("b", 2),
        ("a", 3),
    ]
    lines = output.splitlines()
    assert lines == [
        "pass 1: 2 run(s), 4 message(s) published",
        "pass 2: 1 run(s), 1 message(s) published",
        "drain_outbox: 5 message(s) published in 2 pass(es) (3 run batch(es)); "
        "0 failed publish(es).",
    ]
    assert drain("--once", "-v", "0") == ""
    assert len(runs_outbox.messages) == 5


@pytest.mark.django_db
def test_once_exits_1_when_a_publish_fails(runs_outbox: RunsOutbox) -> None:
    make_run("a", 1)
    runs_outbox.publisher.fail_with = RuntimeError("broker down")
    with pytest.raises(CommandError) as raised:
        drain("--once")
    assert raised.value.returncode == 1
    assert "1 publish(es) failed (runs: a)" in str(raised.value)
    assert RunOutbox.objects.get(run_id="a").attempts == 1
    assert not RunEvent.objects.filter(published_at__isnull=False).exists()


@pytest.mark.django_db
def test_run_and_max_messages(runs_outbox: RunsOutbox) -> None:
    make_run("a", 3)
    make_run("b", 3)
    drain("--once", "--run", "b")
    assert {m.run_id for m in runs_outbox.messages} == {"b"}
    drain("--once", "--max-messages", "3", "--batch-size", "2")
    assert len(runs_outbox.messages) == 4 + 3
    assert RunOutbox.objects.get(run_id="a").next_seq == 4
    assert not RunOutbox.objects.filter(lease_token__isnull=False).exists()
    assert_cursor_invariant()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "0"], "argument --batch-size: '0' must be a positive integer"),
        (["--batch-size", "x"], "argument --batch-size: 'x' is not an integer"),
        (["--max-messages", "-2"], "argument --max-messages: '-2' must be a positive integer"),
        (["--interval", "0"], "argument --interval: '0' must be a positive number"),
        (["--interval", "nan"], "argument --interval: 'nan' must be a positive number"),
        (["--interval", "soon"], "argument --interval: 'soon' is not a number"),
        (["--unknown"], "unrecognized arguments: --unknown"),
    ],
)
def test_bad_arguments_are_refused(args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        drain("--once", *args)


@pytest.mark.django_db
def test_bad_run_ids_exit_2() -> None:
    for run_id, message in (("a b", "--run: must not contain whitespace"), ("nope", "no run")):
        with pytest.raises(CommandError, match=message) as raised:
            drain("--once", "--run", run_id)
        assert raised.value.returncode == 2


@pytest.mark.django_db
def test_prune_outbox_command() -> None:
    make_run("a", 2)
    relay.drain_outbox_for_run("a", publisher=MemoryPublisher())
    RunEvent.objects.filter(seq__lte=2).update(published_at=timezone.now() - dt.timedelta(hours=1))
    out = io.StringIO()
    call_command("prune_outbox", "--older-than", "60", stdout=out)
    assert out.getvalue() == "prune_outbox: deleted 2 published event(s) older than 60 s.\n"
    assert list(RunEvent.objects.values_list("seq", flat=True)) == [3]
    for bad in ("0", "-1", "x"):
        with pytest.raises(CommandError, match="argument --older-than"):
            call_command("prune_outbox", "--older-than", bad)
    with pytest.raises(CommandError, match="the following arguments are required: --older-than"):
        call_command("prune_outbox")


# --- real processes -------------------------------------------------------------------------


# transaction=True: a test transaction would hold SQLite's write lock, and Django 6 runs the
# JSONField database check (a write transaction in IMMEDIATE mode) when a command starts.
@pytest.mark.django_db(transaction=True)
def test_exit_status_2_for_bad_arguments_on_the_command_line() -> None:
    for args, message in (
        (["drain_outbox", "--batch-size", "0"], "--batch-size: '0' must be a positive integer"),
        (["drain_outbox", "--interval", "-1"], "--interval: '-1' must be a positive number"),
        (["drain_outbox", "--run", "a b"], "--run: must not contain whitespace"),
        (["prune_outbox"], "the following arguments are required: --older-than"),
        (["prune_outbox", "--older-than", "0"], "--older-than: '0' must be a positive number"),
    ):
        done = manage(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr, (args, done.stderr)


@pytest.mark.django_db(transaction=True)
def test_exit_status_of_once_and_of_a_bad_publisher(tmp_path: Path) -> None:
    seed_runs(2, 3, prefix="x")
    failing = manage(
        "drain_outbox", "--once", env=relay_env(tmp_path, RELAY_TEST_FAIL_RUNS="x-00001")
    )
    assert failing.returncode == 1, failing.stderr
    assert "publish(es) failed (runs: x-00001)" in failing.stderr
    assert RunOutbox.objects.get(run_id="x-00001").attempts >= 1

    services.retry_outbox("x-00001")
    fine = manage("drain_outbox", "--once", env=relay_env(tmp_path))
    assert fine.returncode == 0, fine.stderr
    assert "drain_outbox: 3 message(s) published" in fine.stdout
    assert sorted((d.run_id, d.seq) for d in read_deliveries(tmp_path)) == [
        (run, seq) for run in ("x-00000", "x-00001") for seq in (1, 2, 3)
    ]


@pytest.mark.django_db(transaction=True)
def test_a_publisher_that_cannot_be_built_stops_the_command_before_any_claim(
    tmp_path: Path,
) -> None:
    seed_runs(1, 1, prefix="x")
    env = relay_env(tmp_path, RELAY_TEST_PUBLISHER="tests.sample_publishers.Broken")
    done = manage("drain_outbox", "--once", env=env)
    assert done.returncode == 1
    assert "runs_app.E021" in done.stderr
    skipped = manage("drain_outbox", "--once", "--skip-checks", env=env)
    assert skipped.returncode == 1
    assert "CommandError: Publisher 'tests.sample_publishers.Broken'" in skipped.stderr
    assert not RunOutbox.objects.filter(lease_token__isnull=False).exists()
    assert RunOutbox.objects.get(run_id="x-00000").attempts == 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_loop_mode_stops_on_signal_after_acknowledging_the_batch_in_hand(
    tmp_path: Path, sig: signal.Signals
) -> None:
    env = relay_env(tmp_path, RELAY_TEST_DELAY="0.1", RELAY_TEST_BATCH_SIZE="5")
    relay = start_relay(tmp_path, "-v", "2", env=env)
    try:
        # Started idle: it polls, and picks up events committed after it started.
        seed_runs(3, 9, prefix="loop")
        wait_until(lambda: mid_batch(tmp_path, relay.pid), 60, "the relay to be mid-batch")
        assert relay.stop(sig) == 0, relay.output()
    finally:
        stop_all([relay])
    delivered = {(d.run_id, d.seq) for d in read_deliveries(tmp_path)}
    published = set(
        RunEvent.objects.filter(published_at__isnull=False).values_list("run_id", "seq")
    )
    assert delivered == published  # the batch in hand was finished and acknowledged
    assert published == {("loop-00000", seq) for seq in range(1, 6)}
    assert not RunOutbox.objects.filter(lease_token__isnull=False).exists()
    assert_cursor_invariant()
    output = relay.output()
    assert "pass 1:" in output
    assert f"drain_outbox: {len(published)} message(s) published" in output
