"""Messages, their CloudEvents envelope, the built-in publishers, loading one, check E021."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings

from runs_app import checks
from runs_app.exceptions import PublisherError, RunsError
from runs_app.publishers import (
    LoggingPublisher,
    Message,
    Publisher,
    SignalPublisher,
    load_publisher,
)
from runs_app.signals import message_published
from runs_app.testing import MemoryPublisher
from tests.sample_publishers import WithOptions


def message(seq: int = 3, **overrides: Any) -> Message:
    values: dict[str, Any] = {
        "id": f"run-1:{seq}",
        "run_id": "run-1",
        "scope": "billing",
        "seq": seq,
        "type": "invoice.sent",
        "payload": {"amount": 12, "items": ["a"]},
        "occurred_at": dt.datetime(2025, 1, 31, 12, 0, 0, 123456, tzinfo=dt.UTC),
    }
    values.update(overrides)
    return Message(**values)


def test_message_is_an_immutable_value() -> None:
    first = message()
    assert first == message()
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.seq = 4  # type: ignore[misc]


def test_cloudevent_structured_mode() -> None:
    event = message().as_cloudevent()
    assert event == {
        "specversion": "1.0",
        "id": "run-1:3",
        "source": "/runs_app/billing",
        "type": "invoice.sent",
        "subject": "run-1",
        "time": "2025-01-31T12:00:00.123456Z",
        "datacontenttype": "application/json",
        "data": {"amount": 12, "items": ["a"]},
    }
    json.dumps(event)  # JSON-ready as it is
    event["data"]["items"].append("b")
    assert message().payload == {"amount": 12, "items": ["a"]}


def test_cloudevent_time_is_utc_rfc3339() -> None:
    paris = dt.timezone(dt.timedelta(hours=1))
    at_paris = message(occurred_at=dt.datetime(2025, 1, 1, 13, 0, tzinfo=paris))
    assert at_paris.as_cloudevent()["time"] == "2025-01-01T12:00:00Z"
    naive = message(occurred_at=dt.datetime(2025, 1, 1, 12, 0))
    assert naive.as_cloudevent()["time"] == "2025-01-01T12:00:00Z"


def test_logging_publisher_logs_one_line_per_message(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="runs_app.publishers"):
        LoggingPublisher().publish([message(1), message(2)])
    assert [record.name for record in caplog.records] == ["runs_app.publishers"] * 2
    assert caplog.records[0].getMessage().startswith("published run-1:1 invoice.sent")
    with caplog.at_level(logging.DEBUG, logger="runs_app.publishers"):
        caplog.clear()
        LoggingPublisher(level="WARNING").publish([message()])
    assert [record.levelno for record in caplog.records] == [logging.WARNING]
    with pytest.raises(ValueError):
        LoggingPublisher(level="LOUD")


def test_signal_publisher_sends_one_signal_per_message() -> None:
    received: list[Message] = []

    def receiver(sender: Any, message: Message, **kwargs: Any) -> None:
        received.append(message)

    message_published.connect(receiver)
    try:
        SignalPublisher().publish([message(1), message(2)])
    finally:
        message_published.disconnect(receiver)
    assert [m.seq for m in received] == [1, 2]


def test_a_failing_signal_receiver_fails_the_publish() -> None:
    def receiver(sender: Any, **kwargs: Any) -> None:
        raise RuntimeError("consumer down")

    message_published.connect(receiver)
    try:
        with pytest.raises(RuntimeError, match="consumer down"):
            SignalPublisher().publish([message()])
    finally:
        message_published.disconnect(receiver)


def test_builtins_satisfy_the_protocol() -> None:
    for publisher in (LoggingPublisher(), SignalPublisher(), MemoryPublisher()):
        assert isinstance(publisher, Publisher)


def test_load_publisher_builds_the_configured_class() -> None:
    assert isinstance(load_publisher(), LoggingPublisher)
    with override_settings(
        RUNS_APP={
            "PUBLISHER": "tests.sample_publishers.WithOptions",
            "PUBLISHER_OPTIONS": {"url": "amqp://x"},
        }
    ):
        built = load_publisher()
    assert isinstance(built, WithOptions) and built.url == "amqp://x"


@pytest.mark.parametrize(
    ("path", "options", "needle"),
    [
        ("runs_app.publishers.Nope", {}, "cannot be imported"),
        ("nowhere.Publisher", {}, "cannot be imported"),
        ("tests.sample_publishers.WithOptions", {}, "cannot be built"),
        ("tests.sample_publishers.WithOptions", {"url": "x", "bad": 1}, "cannot be built"),
        ("tests.sample_publishers.Broken", {}, "ConnectionError: would have connected"),
        ("tests.sample_publishers.NoPublish", {}, "without a publish(messages) method"),
        ("runs_app.publishers.logger", {}, "not a class or a callable"),
    ],
)
def test_load_publisher_errors(path: str, options: dict[str, Any], needle: str) -> None:
    with pytest.raises(PublisherError) as raised:
        load_publisher(path, options)
    assert isinstance(raised.value, RunsError)
    assert raised.value.path == path
    assert path in str(raised.value) and needle in str(raised.value)

    with override_settings(RUNS_APP={"PUBLISHER": path, "PUBLISHER_OPTIONS": options}):
        errors = checks.check_publisher()
        assert [error.id for error in errors] == ["runs_app.E021"]
        assert needle in errors[0].msg
        assert "PUBLISHER_OPTIONS" in errors[0].hint
        # The command refuses before claiming anything.
        with pytest.raises(CommandError, match=r"runs_app\.E021"):
            call_command("drain_outbox", "--once")


def test_e021_is_silent_when_fine_or_reported_elsewhere() -> None:
    assert checks.check_publisher() == []
    with override_settings(RUNS_APP={"PUBLISHER": 42}):
        assert checks.check_publisher() == []  # E009 reports it
    with override_settings(RUNS_APP={"PUBLISHER_OPTIONS": []}):
        assert checks.check_publisher() == []  # E010 reports it
    with override_settings(RUNS_APP=[]):
        assert checks.check_publisher() == []  # E001 reports it


def test_e021_is_registered() -> None:
    from django.core.checks import run_checks

    with override_settings(RUNS_APP={"PUBLISHER": "nowhere.Publisher"}):
        # databases=[]: the static checks only (Django 6 would also query every database).
        assert "runs_app.E021" in [error.id for error in run_checks(databases=[])]
