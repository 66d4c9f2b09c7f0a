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


class FlushSessionStatus(models.TextChoices):
    OPEN = "open", "open"
    SUCCEEDED = "succeeded", "succeeded"
    FAILED = "failed", "failed"
