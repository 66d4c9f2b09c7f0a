"""The functional API of runs_app. Import from here: ``from runs_app import services``.

Each function owns its transaction and nests inside the caller's (see each docstring).
"""

from .cleanup import CleanupResult, safe_cleanup_old_projects
from .events import append_events, list_events
from .flush import FlushResult, flush_projects
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
from .validation import Event

__all__ = [
    "CleanupResult",
    "Event",
    "FlushResult",
    "append_events",
    "complete_run",
    "create_run",
    "ensure_run",
    "fail_run",
    "fail_stale_runs",
    "flush_projects",
    "get_run",
    "heartbeat",
    "latest_run",
    "list_events",
    "safe_cleanup_old_projects",
    "track_run",
]
