"""Errors raised by runs_app. Every error is a ``RunsError``; catch that to catch them all."""

from __future__ import annotations

from typing import Any, Literal

CleanupRefusalReason = Literal[
    "flush_failed",
    "run_not_completed",
    "not_flushed",
    "incremental_run",
    "superseded",
    "empty_run",
    "too_many_deletions",
    "rows_referenced",
    "cleanup_restored",
    "approval_exceeded",
    "nothing_withheld",
]

#: Refusal reasons in the order cleanup checks them (the first that applies wins).
CLEANUP_REFUSAL_REASONS: tuple[CleanupRefusalReason, ...] = (
    "flush_failed",
    "run_not_completed",
    "not_flushed",
    "incremental_run",
    "cleanup_restored",
    "superseded",
    "empty_run",
    "too_many_deletions",
)

#: Refusals that are the design working, not a problem to report: an incremental run never
#: cleans up (health checks do not count them as failures).
CLEANUP_EXPECTED_REFUSALS: tuple[CleanupRefusalReason, ...] = ("incremental_run",)

#: Refusals of an approval (``safe_cleanup(..., approve=N)``) once the guards above passed or
#: were the withheld ones: the run has no withheld plan, or the plan grew past the approval.
CLEANUP_APPROVAL_REFUSALS: tuple[CleanupRefusalReason, ...] = (
    "nothing_withheld",
    "approval_exceeded",
)

#: A refusal met while deleting, after the guards passed: a batch's DELETE hit a row that
#: another table still references (a PROTECT or database-level foreign key). That batch rolled
#: back; the batches before it stay done and audited.
CLEANUP_DELETION_REFUSALS: tuple[CleanupRefusalReason, ...] = ("rows_referenced",)


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
        self.message = message
        self.limit = limit
        super().__init__(f"{field}: {message}")


class InvalidEvent(InvalidInput):
    """An event (its type or payload) is malformed."""


class FlushFailed(RunsError):
    """A flush of projects failed; the run's flush ledger says ``failed``. Chained to the cause."""

    def __init__(self, run_id: str, message: str) -> None:
        self.run_id = run_id
        super().__init__(f"Flush of run {run_id!r} failed: {message}")


class FlushEnded(FlushFailed):
    """A flush was started on a run whose flush had ended already (it succeeded).

    Raised by ``flush_projects`` and ``flush`` (the session). A source read page by page must
    write every page through one session; a second flush of an active run means the first one
    did not see the whole source, so the run's flush is recorded as failed (it can no longer
    complete) and no row is written."""

    def __init__(self, run_id: str) -> None:
        FlushFailed.__init__(
            self,
            run_id,
            "its flush had ended already (one flush per run). A source read page by page "
            "writes every page through one session: "
            "`with services.flush(run) as flush: flush.write(page)`; the run can no longer "
            "complete",
        )


class FlushInTransaction(RunsError):
    """A flush session was opened inside a transaction (the caller's ``atomic()``).

    A session commits ``in_progress`` when it opens and records its own failure when it ends,
    which a transaction of the caller's could roll back. Open the session outside any
    transaction; its ``write()`` calls may run inside your own ``atomic()`` blocks."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(
            f"Flush of run {run_id!r}: open the flush session (or call flush_projects) outside "
            "any transaction, so its in_progress mark and its failure commit whatever your "
            "transaction does; write pages inside your own atomic() blocks if you need to."
        )


class CleanupRefused(RunsError):
    """Cleanup refused to delete anything. ``reason`` is a code from ``CLEANUP_REFUSAL_REASONS``."""

    def __init__(self, reason: CleanupRefusalReason, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}")


RestoreRefusalReason = Literal[
    "cleanup_not_run", "cleanup_refused", "audit_missing", "rows_unrestorable"
]


class RestoreRefused(RunsError):
    """``restore_cleanup`` had nothing it could put back; nothing was written. ``reason``:
    ``cleanup_not_run`` (the run's cleanup of the model never ran), ``cleanup_refused`` (it was
    refused: it removed nothing), ``audit_missing`` (rows were deleted but their audit events
    are gone, pruned from the outbox), ``rows_unrestorable`` (the audited rows no longer fit the
    table: a column added since without a default, a constraint added since)."""

    def __init__(self, reason: RestoreRefusalReason, message: str) -> None:
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
