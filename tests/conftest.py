"""Suite-wide pytest configuration.

- Tests marked ``postgresql`` skip on SQLite, with a reason.
- ``RUNS_APP_FORBID_SKIPS=1`` (set by .ci/run for the PostgreSQL pass) turns any skip into a
  failure of the session, so a PostgreSQL pass can never silently test less.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pytest
from django.db import connection

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from tests.factories import AdminStory


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if connection.vendor == "postgresql":
        return
    skip = pytest.mark.skip(
        reason=f"marked postgresql (needs PostgreSQL); this pass runs on {connection.vendor}"
    )
    for item in items:
        if "postgresql" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("RUNS_APP_FORBID_SKIPS") != "1":
        return
    reporter: Any = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped:
        reporter.write_line(
            f"RUNS_APP_FORBID_SKIPS=1 but {skipped} test(s) skipped: failing the run.", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _fresh_claim_order() -> None:
    """Every test's first claim starts from the lowest run id (the relay's rotation position is
    per process)."""
    from runs_app.relay.claim import claim_order

    claim_order.reset()


@pytest.fixture
def admin_story() -> AdminStory:
    """One run in each state an operator meets, made with the factories' traits (see
    ``tests.factories.admin_story``); for the admin tests."""
    from tests import factories  # after Django's set-up, like every model import here

    return factories.admin_story()


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    """The spans finished during the test, from an OpenTelemetry SDK tracer provider installed
    for this test only (the API sets its global provider once per process, so the test swaps
    the module's global and pytest restores it)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    return exporter
