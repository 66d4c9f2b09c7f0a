"""Runs in every state an operator meets, for the admin, runs_status and browser tests.

Runs are created through the services; the ledger and outbox fields that other services fill
(flush, cleanup, relay) are set directly, as those services would leave them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

from django.contrib.auth.models import Permission, User
from django.utils import timezone

from runs_app import services
from runs_app.models import (
    CleanupStatus,
    FlushStatus,
    Project,
    Run,
    RunEvent,
    RunOutbox,
    RunState,
)

SCRIPT = "<script>alert('x')</script>"
ESCAPED_SCRIPT = "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;"


@dataclass
class Story:
    active: Run
    completed: Run
    failed_flush: Run
    blocked: Run
    big: Run


def active_run(scope: str, run_id: str) -> Run:
    return services.create_run(scope, run_id=run_id)


def completed_run(scope: str, run_id: str, *, removed: int = 0) -> Run:
    run = services.create_run(scope, run_id=run_id)
    RunState.objects.filter(run=run).update(
        flush_status=FlushStatus.SUCCEEDED,
        flushed_at=timezone.now(),
        rows_seen=120,
        rows_created=20,
        rows_updated=100,
        rows_confirmed=120,
    )
    services.complete_run(run)
    if removed:
        RunState.objects.filter(run=run).update(
            cleanup_status=CleanupStatus.DONE, rows_removed=removed, cleanup_at=timezone.now()
        )
    return run


def failed_flush_run(scope: str, run_id: str) -> Run:
    """A run whose flush failed (so completing it failed it) and whose cleanup refused."""
    run = services.create_run(scope, run_id=run_id)
    RunState.objects.filter(run=run).update(
        flush_status=FlushStatus.FAILED, flush_error=f"source timed out {SCRIPT}", rows_seen=40
    )
    services.complete_run(run)  # fail-safe: becomes "failed" with the flush error
    RunState.objects.filter(run=run).update(
        cleanup_status=CleanupStatus.REFUSED,
        cleanup_reason="flush_failed",
        cleanup_message="The run's flush failed: deleting unseen projects could lose data.",
        cleanup_at=timezone.now(),
    )
    return run


def block_outbox(run: Run, *, attempts: int = 10, error: str = f"broker down {SCRIPT}") -> None:
    now = timezone.now()
    RunOutbox.objects.filter(run=run).update(
        attempts=attempts,
        last_error=error,
        next_attempt_at=now + timedelta(minutes=10),
        blocked_at=now - timedelta(minutes=5),
    )


def hold_lease(run: Run, seconds: float = 60) -> None:
    RunOutbox.objects.filter(run=run).update(
        lease_token=uuid.uuid4(),
        lease_until=timezone.now() + timedelta(seconds=seconds),
        leased_by="relay-host:4242",
    )


def fill_events(run: Run, total: int) -> None:
    """Events up to seq ``total``, bulk-inserted (fast), with the run's counter kept in step."""
    run.refresh_from_db(fields=["last_seq"])
    first = run.last_seq + 1
    count = total - run.last_seq
    RunEvent.objects.bulk_create(
        RunEvent(run=run, seq=seq, type="project.seen", payload={"key": f"p-{seq}"})
        for seq in range(first, first + count)
    )
    run.last_seq = first + count - 1
    Run.objects.filter(pk=run.pk).update(last_seq=run.last_seq)


def story() -> Story:
    """One run in each state: active, completed, failed flush + refused cleanup, blocked
    outbox (with a ``<script>`` in a payload and in the delivery error), 1,000 events."""
    active = active_run("alpha", "run-active")
    completed = completed_run("beta", "run-completed", removed=3)
    failed = failed_flush_run("gamma", "run-failed-flush")
    blocked = services.create_run(
        "delta",
        run_id="run-blocked",
        events=[{"type": "project.seen", "payload": {"name": SCRIPT, "key": "k1"}}],
    )
    block_outbox(blocked)
    big = completed_run("epsilon", "run-big")
    fill_events(big, 1000)
    hold_lease(big)
    Project.objects.create(
        scope="gamma", key="p-1", name=SCRIPT, data={"html": SCRIPT}, last_seen_run=failed
    )
    return Story(active, completed, failed, blocked, big)


def make_staff(username: str, *codenames: str) -> User:
    """A staff user holding only these runs_app permissions ("view_run", ...)."""
    user = User.objects.create_user(username, password="pw", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="runs_app", codename__in=codenames)
    )
    return user
