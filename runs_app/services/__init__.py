"""The functional API of runs_app. Import from here: ``from runs_app import services``.

Each function owns its transaction and nests inside the caller's (see each docstring).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .cleanup import CleanupResult, safe_cleanup_old_projects
from .events import append_events, list_events
from .flush import FlushResult, FlushSession, flush, flush_projects
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

if TYPE_CHECKING:
    from ..relay import (
        DrainResult,
        drain_outbox_for_run,
        drain_outbox_once,
        prune_outbox,
        retry_outbox,
        skip_outbox_event,
    )

# The relay (runs_app.relay) is built on these services, so it is re-exported lazily: importing
# it here eagerly would make "import runs_app.relay" circular.
_RELAY_NAMES = frozenset(
    {
        "DrainResult",
        "drain_outbox_for_run",
        "drain_outbox_once",
        "prune_outbox",
        "retry_outbox",
        "skip_outbox_event",
    }
)


def __getattr__(name: str) -> Any:
    if name in _RELAY_NAMES:
        from .. import relay

        return getattr(relay, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CleanupResult",
    "DrainResult",
    "Event",
    "FlushResult",
    "FlushSession",
    "append_events",
    "complete_run",
    "create_run",
    "drain_outbox_for_run",
    "drain_outbox_once",
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
    "retry_outbox",
    "safe_cleanup_old_projects",
    "skip_outbox_event",
    "track_run",
]
