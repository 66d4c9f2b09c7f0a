"""Testing helpers for projects that use runs_app: a pytest plugin (entry point ``runs_app``).

``MemoryPublisher`` keeps the messages it is given, in order. The ``runs_outbox`` fixture
installs one as the configured publisher for the test and drains on demand::

    @pytest.mark.django_db
    def test_sync_announces_the_run(runs_outbox):
        run = services.create_run("sync")
        services.append_events(run, [{"type": "project.seen", "payload": {"key": "a"}}])

        messages = runs_outbox.drain()

        assert [m.type for m in messages] == ["run.started", "project.seen"]

Nothing drains in the background: events stay pending until the test calls ``drain()``, so one
test never sees another's messages.

This module touches no model and no database when imported (pytest imports plugins before
Django is set up); the relay is imported inside ``drain()``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from .publishers import Message

INSTALLED_PUBLISHER = "runs_app.testing.installed_publisher"


class MemoryPublisher:
    """Keeps every published message in ``messages``, in publish order. Set ``fail_with`` to an
    exception to make ``publish`` raise it (to test retries and blocked runs)."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.fail_with: BaseException | None = None

    def publish(self, messages: Sequence[Message]) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.messages.extend(messages)

    def clear(self) -> None:
        self.messages.clear()


def installed_publisher(instance: MemoryPublisher) -> MemoryPublisher:
    """A "publisher class" for ``RUNS_APP['PUBLISHER']`` that returns the instance given in
    ``PUBLISHER_OPTIONS``: code that builds the configured publisher gets the fixture's own."""
    return instance


class RunsOutbox:
    """What the ``runs_outbox`` fixture gives a test."""

    def __init__(self, publisher: MemoryPublisher) -> None:
        self.publisher = publisher

    @property
    def messages(self) -> list[Message]:
        """Every message published during the test so far, in order."""
        return list(self.publisher.messages)

    def drain(self, *, run_id: str | None = None, batch_size: int | None = None) -> list[Message]:
        """Drain until nothing is claimable right now; return the messages this call published,
        in publish order (each run's in seq order). Needs database access (``django_db``)."""
        from .relay import drain_until_idle

        before = len(self.publisher.messages)
        drain_until_idle(publisher=self.publisher, batch_size=batch_size, run_id=run_id)
        return self.publisher.messages[before:]


@pytest.fixture
def runs_outbox() -> Iterator[RunsOutbox]:
    """A ``RunsOutbox`` whose ``MemoryPublisher`` is also the configured ``PUBLISHER`` for the
    test, so ``drain_outbox_once()`` or ``call_command("drain_outbox", "--once")`` publish to it
    too (and fail with it, when ``runs_outbox.publisher.fail_with`` is set)."""
    from django.test import override_settings

    from .conf import user_settings
    from .relay.claim import claim_order

    claim_order.reset()  # the relay's rotation starts from the lowest run id in every test
    publisher = MemoryPublisher()
    configured: Any = user_settings()
    base = dict(configured) if isinstance(configured, dict) else {}
    runs_app = {
        **base,
        "PUBLISHER": INSTALLED_PUBLISHER,
        "PUBLISHER_OPTIONS": {"instance": publisher},
    }
    with override_settings(RUNS_APP=runs_app):
        yield RunsOutbox(publisher)
