"""Testing helpers for projects that use runs_app, with pytest or with ``django.test.TestCase``.

``MemoryPublisher`` keeps the messages it is given, in order. ``memory_outbox()`` installs one as
the configured publisher and gives a ``RunsOutbox`` that drains on demand; the pytest fixture
``runs_outbox`` (``runs_app.pytest_plugin``, loaded by pytest through this module's entry point)
and ``RunsOutboxMixin`` for ``TestCase`` classes are both that context manager::

    @pytest.mark.django_db
    def test_sync_announces_the_run(runs_outbox):
        run = services.create_run("sync")
        services.append_events(run, [{"type": "project.seen", "payload": {"key": "a"}}])

        messages = runs_outbox.drain()

        assert [m.type for m in messages] == ["run.started", "project.seen"]


    class SyncTests(RunsOutboxMixin, TestCase):
        def test_sync_announces_the_run(self):
            services.create_run("sync")
            self.assertEqual([m.type for m in self.runs_outbox.drain()], ["run.started"])

Nothing drains in the background: events stay pending until the test calls ``drain()``, so one
test never sees another's messages.

This module imports neither pytest (a project testing with ``manage.py test`` need not install
it) nor any model, and touches no database when imported (pytest imports plugins before Django
is set up); the relay is imported inside ``drain()``, Django's test tools inside
``memory_outbox()``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .publishers import Message

if TYPE_CHECKING:
    from unittest import TestCase as _TestCaseBase
else:
    _TestCaseBase = object

#: pytest loads this module through the ``pytest11`` entry point ``runs_app``; the fixtures live
#: in a module of their own, because they need pytest and this one must not.
pytest_plugins = ["runs_app.pytest_plugin"]

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
    ``PUBLISHER_OPTIONS``: code that builds the configured publisher gets the test's own."""
    return instance


class RunsOutbox:
    """What ``memory_outbox()``, the ``runs_outbox`` fixture and ``RunsOutboxMixin`` give a
    test."""

    def __init__(self, publisher: MemoryPublisher) -> None:
        self.publisher = publisher

    @property
    def messages(self) -> list[Message]:
        """Every message published during the test so far, in order."""
        return list(self.publisher.messages)

    def drain(self, *, run_id: str | None = None, batch_size: int | None = None) -> list[Message]:
        """Drain until nothing is claimable right now; return the messages this call published,
        in publish order (each run's in seq order). Needs database access (``django_db``, or a
        ``TestCase``)."""
        from .relay import drain_until_idle

        before = len(self.publisher.messages)
        drain_until_idle(publisher=self.publisher, batch_size=batch_size, run_id=run_id)
        return self.publisher.messages[before:]


@contextmanager
def memory_outbox() -> Iterator[RunsOutbox]:
    """While the block runs, a fresh ``MemoryPublisher`` is the configured ``PUBLISHER`` (the
    other ``RUNS_APP`` settings as they were), so ``drain_outbox_once()`` or
    ``call_command("drain_outbox", "--once")`` publish to it too (and fail with it, when
    ``publisher.fail_with`` is set); the relay's rotation starts from the lowest run id. The
    settings are restored when the block ends."""
    from django.test import override_settings

    from .conf import user_settings
    from .relay.claim import claim_order

    claim_order.reset()
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


class RunsOutboxMixin(_TestCaseBase):
    """For ``django.test.TestCase`` (or ``TransactionTestCase``) classes: each test gets
    ``self.runs_outbox``, a ``memory_outbox()`` entered in ``setUp`` and left after the test.
    List it before the ``TestCase`` base: ``class MyTests(RunsOutboxMixin, TestCase)``."""

    runs_outbox: RunsOutbox

    def setUp(self) -> None:
        super().setUp()
        self.runs_outbox = self.enterContext(memory_outbox())
