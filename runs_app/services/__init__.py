"""The functional API of runs_app. Import from here: ``from runs_app import services``.

Each function owns its transaction and nests inside the caller's (see each docstring).
"""

from .events import append_events, list_events
from .runs import complete_run, create_run, ensure_run, fail_run, get_run, heartbeat
from .validation import Event

__all__ = [
    "Event",
    "append_events",
    "complete_run",
    "create_run",
    "ensure_run",
    "fail_run",
    "get_run",
    "heartbeat",
    "list_events",
]
