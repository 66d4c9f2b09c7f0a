"""Errors raised by runs_app. Every error is a ``RunsError``; catch that to catch them all."""

from __future__ import annotations

from typing import Any, Literal

CleanupRefusalReason = Literal[
    "flush_failed",
    "run_not_completed",
    "not_flushed",
    "superseded",
    "empty_run",
    "too_many_deletions",
]

#: Refusal reasons in the order cleanup checks them (the first that applies wins).
CLEANUP_REFUSAL_REASONS: tuple[CleanupRefusalReason, ...] = (
    "flush_failed",
    "run_not_completed",
    "not_flushed",
    "superseded",
    "empty_run",
    "too_many_deletions",
)


class RunsError(Exception):
    """Base class of every runs_app error. Not raised directly."""


class RunAlreadyExists(RunsError):
    """A run with this id exists already (``create_run``, or ``ensure_run`` with another scope)."""

    def __init__(self, run_id: str, message: str | None = None) -> None:
        self.run_id = run_id
        super().__init__(message or f"A run with id {run_id!r} already exists.")


class RunNotFound(RunsError):
    """No run has this id."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"No run with id {run_id!r}.")


class RunClosed(RunsError):
    """The run is completed or failed: callers may not write to it any more."""

    def __init__(self, run_id: str, status: str) -> None:
        self.run_id = run_id
        self.status = status
        super().__init__(f"Run {run_id!r} is {status}; it accepts no more writes.")


class RunInProgress(RunsError):
    """Another run of the same scope is still active."""

    def __init__(self, scope: str, active_run_id: str) -> None:
        self.scope = scope
        self.active_run_id = active_run_id
        super().__init__(
            f"Scope {scope!r} already has an active run ({active_run_id!r}); "
            "complete or fail it first."
        )


class InvalidInput(RunsError, ValueError):
    """Bad input, refused before anything is written. ``field`` names it, ``limit`` the rule."""

    def __init__(self, field: str, message: str, *, limit: Any = None) -> None:
        self.field = field
        self.limit = limit
        super().__init__(f"{field}: {message}")


class InvalidEvent(InvalidInput):
    """An event (its type or payload) is malformed."""


class FlushFailed(RunsError):
    """A flush of projects failed; the run's flush ledger says ``failed``. Chained to the cause."""

    def __init__(self, run_id: str, message: str) -> None:
        self.run_id = run_id
        super().__init__(f"Flush of run {run_id!r} failed: {message}")


class CleanupRefused(RunsError):
    """Cleanup refused to delete anything. ``reason`` is a code from ``CLEANUP_REFUSAL_REASONS``."""

    def __init__(self, reason: CleanupRefusalReason, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}")


class PublisherError(RunsError):
    """The configured publisher (``RUNS_APP['PUBLISHER']``) cannot be imported or built."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"Publisher {path!r}: {message}")


class OutboxNotBlocked(RunsError):
    """``skip_outbox_event`` was called on a run whose outbox is not blocked."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(
            f"The outbox of run {run_id!r} is not blocked; only the head event of a blocked "
            "outbox can be skipped."
        )
