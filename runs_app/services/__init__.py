"""The functional API of runs_app. Import from here: ``from runs_app import services``.

Each function owns its transaction and nests inside the caller's (see each docstring).
Delivering the outbox is not a service: it is the relay's job (:mod:`runs_app.relay`), which is
built on these services and never imported by them.
"""

from __future__ import annotations

from .cleanup import CleanupResult, safe_cleanup, safe_cleanup_old_projects
from .events import append_events, list_events
from .flush import FlushResult, FlushSession, flush, flush_projects
from .outbox import prune_outbox, retry_outbox, skip_outbox_event
from .restore import RestoreResult, restore_cleanup
from .runs import (
    complete_run,
    create_run,
    ensure_run,
    fail_run,
    fail_stale_runs,
    get_run,
    heartbeat,
    latest_run,
    track_run,
)
from .source_state import SourceState, source_state
from .tombstones import PurgeResult, purge_tombstones
from .validation import Event

__all__ = [
    "CleanupResult",
    "Event",
    "FlushResult",
    "FlushSession",
    "PurgeResult",
    "RestoreResult",
    "SourceState",
    "append_events",
    "complete_run",
    "create_run",
    "ensure_run",
    "fail_run",
    "fail_stale_runs",
    "flush",
    "flush_projects",
    "get_run",
    "heartbeat",
    "latest_run",
    "list_events",
    "prune_outbox",
    "purge_tombstones",
    "restore_cleanup",
    "retry_outbox",
    "safe_cleanup",
    "safe_cleanup_old_projects",
    "skip_outbox_event",
    "source_state",
    "track_run",
]
