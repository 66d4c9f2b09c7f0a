"""The pytest fixtures of runs_app: ``runs_outbox``. pytest loads this module through
``runs_app.testing`` (the ``pytest11`` entry point ``runs_app``); it is the only module of
runs_app that imports pytest. See ``runs_app.testing`` for what the fixture gives."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .testing import RunsOutbox, memory_outbox


@pytest.fixture
def runs_outbox() -> Iterator[RunsOutbox]:
    """A ``RunsOutbox`` whose ``MemoryPublisher`` is also the configured ``PUBLISHER`` for the
    test, so ``drain_outbox_once()`` or ``call_command("drain_outbox", "--once")`` publish to it
    too (and fail with it, when ``runs_outbox.publisher.fail_with`` is set)."""
    with memory_outbox() as outbox:
        yield outbox
