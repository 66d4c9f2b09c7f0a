"""The statuses of runs and their ledgers, shared by the models and the queries over them."""

from __future__ import annotations

from django.db import models


class RunStatus(models.TextChoices):
    ACTIVE = "active", "active"
    COMPLETED = "completed", "completed"
    FAILED = "failed", "failed"


class FlushStatus(models.TextChoices):
    NOT_STARTED = "not_started", "not started"
    IN_PROGRESS = "in_progress", "in progress"
    SUCCEEDED = "succeeded", "succeeded"
    FAILED = "failed", "failed"


class CleanupStatus(models.TextChoices):
    NOT_RUN = "not_run", "not run"
    IN_PROGRESS = "in_progress", "in progress"
    REFUSED = "refused", "refused"
    DONE = "done", "done"
    # The cleanup ran, then ``restore_cleanup`` put its rows back: it is not run again.
    RESTORED = "restored", "restored"


class CleanupMode(models.TextChoices):
    """How a tracked model's cleanup removes a row (``sync_cleanup``)."""

    DELETE = "delete", "delete"  # the row is deleted; its columns stay in the audit events
    SOFT = "soft", "soft"  # the row stays, with a tombstone (deleted_at, deleted_by_run, ...)


class FlushMode(models.TextChoices):
    """How a run read its source for a tracked model (``services.flush(..., incremental=)``)."""

    FULL = "full", "full"  # the whole source: rows it did not see are gone from the source
    # Only what changed since the last completed run's cursor: rows it did not read may exist.
    INCREMENTAL = "incremental", "incremental"


class FlushSessionStatus(models.TextChoices):
    OPEN = "open", "open"
    SUCCEEDED = "succeeded", "succeeded"
    FAILED = "failed", "failed"
