"""The data model: a Run, its state ledger (and one per model it flushed), its outbox cursor, its
events, and the built-in tracked model, Project.

Rows are written by :mod:`runs_app.services`, which keeps them consistent with each other (a run
always has its state, its outbox row and its ``run.started`` event). Write through the services.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.utils import timezone

from .statuses import (
    CleanupMode,
    CleanupStatus,
    FlushMode,
    FlushSessionStatus,
    FlushStatus,
    RunStatus,
)
from .tracking import SoftDeleteTrackedModel, TrackedModel

__all__ = [
    "CleanupMode",
    "CleanupStatus",
    "FlushMode",
    "FlushSessionStatus",
    "FlushStatus",
    "Project",
    "Run",
    "RunEvent",
    "RunFlushSession",
    "RunModelState",
    "RunOutbox",
    "RunState",
    "RunStatus",
    "SoftDeleteTrackedModel",
    "TrackedModel",
]

RUN_ID_MAX_LENGTH = 64
SCOPE_MAX_LENGTH = 200
EVENT_TYPE_MAX_LENGTH = 100
PROJECT_KEY_MAX_LENGTH = 255
PROJECT_NAME_MAX_LENGTH = 255


def empty_object() -> dict[str, Any]:
    return {}


class Run(models.Model):
    """One execution of a job. Its id is a string chosen by the caller or a uuid4 hex."""

    id = models.CharField(primary_key=True, max_length=RUN_ID_MAX_LENGTH)
    scope = models.CharField(max_length=SCOPE_MAX_LENGTH, default="default")
    metadata = models.JSONField(default=empty_object, blank=True)
    # Per-run event counter: the seq of the newest event. Bumped with a row lock by append_events.
    last_seq = models.PositiveBigIntegerField(default=0)
    # Creation order, independent of clocks: "newer run" compares ordinals, never timestamps.
    # Increasing within a scope (creation is serialised per scope); on PostgreSQL drawn from a
    # sequence, so two scopes never wait on each other for it.
    ordinal = models.PositiveBigIntegerField(unique=True, editable=False)
    # Set in the transaction that completes or fails the run. It lives on this row, the one
    # every writer locks first, so an append that waited for a closing transaction re-reads it
    # on the row version that transaction committed and refuses (see services.events).
    # db_default too: rows inserted by raw SQL (a bulk import, a fixture) need not name it.
    closed = models.BooleanField(default=False, db_default=False, editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    # The W3C trace context (traceparent, tracestate) of the span that created the run, when
    # there was one (OpenTelemetry): its messages carry it, so a consumer's trace joins the job's.
    trace_context = models.JSONField(default=empty_object, blank=True, editable=False)

    state: RunState
    outbox: RunOutbox
    # model_states, flush_sessions, events: reverse accessors of the models below.

    class Meta:
        ordering = ["-ordinal"]
        indexes = [models.Index(fields=["scope", "ordinal"], name="runs_app_run_scope_ordinal")]

    def __str__(self) -> str:
        return f"{self.scope}/{self.id}"


class Ledger(models.Model):
    """The flush and cleanup ledger a run keeps in total (``RunState``) and per model it
    flushed (``RunModelState``): one definition of their fields."""

    # Flush ledger.
    flush_status = models.CharField(
        max_length=16, choices=FlushStatus.choices, default=FlushStatus.NOT_STARTED
    )
    rows_seen = models.PositiveBigIntegerField(default=0)
    rows_created = models.PositiveBigIntegerField(default=0)
    rows_updated = models.PositiveBigIntegerField(default=0)
    rows_confirmed = models.PositiveBigIntegerField(default=0)

    # Cleanup ledger.
    cleanup_status = models.CharField(
        max_length=16, choices=CleanupStatus.choices, default=CleanupStatus.NOT_RUN
    )
    cleanup_reason = models.CharField(max_length=32, blank=True, default="")
    cleanup_message = models.TextField(blank=True, default="")
    rows_removed = models.PositiveBigIntegerField(default=0)
    cleanup_forced = models.BooleanField(default=False)
    cleanup_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True


class RunState(Ledger):
    """A run's lifecycle and ledgers (flush and cleanup). One per run."""

    run = models.OneToOneField(
        Run, on_delete=models.CASCADE, primary_key=True, related_name="state"
    )
    # Copied from the run so the database can enforce one active run per scope.
    scope = models.CharField(max_length=SCOPE_MAX_LENGTH)
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.ACTIVE)
    error = models.TextField(blank=True, default="")
    started_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(default=timezone.now)

    # The flush ledger's error and time (its status and counts: Ledger).
    flush_error = models.TextField(blank=True, default="")
    flushed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["scope"],
                condition=Q(status="active"),
                name="runs_app_one_active_run_per_scope",
            ),
        ]
        indexes = [models.Index(fields=["status", "heartbeat_at"], name="runs_app_state_stale")]

    def __str__(self) -> str:
        return f"{self.run_id}: {self.status}"

    @property
    def flush_succeeded(self) -> bool | None:
        """True when the flush succeeded, None when it never started, False otherwise."""
        if self.flush_status == FlushStatus.NOT_STARTED:
            return None
        return self.flush_status == FlushStatus.SUCCEEDED


class RunFlushSession(models.Model):
    """One flush session of a run (``services.flush``): a worker writing (part of) the source.

    The run-level ledger (``RunState.flush_status``) summarises them: ``in_progress`` while one
    is open, ``succeeded`` when every one closed cleanly, ``failed`` (sticky) once one failed.
    ``batches`` counts the batches this session committed; the session compares it with the
    batches it wrote when it closes, so a batch rolled back by the caller's transaction is
    noticed and fails the session.
    """

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="flush_sessions")
    # The model flushed, as "app_label.model_name".
    model = models.CharField(max_length=100, default="runs_app.project")
    status = models.CharField(
        max_length=16, choices=FlushSessionStatus.choices, default=FlushSessionStatus.OPEN
    )
    error = models.TextField(blank=True, default="")
    batches = models.PositiveBigIntegerField(default=0)
    rows_seen = models.PositiveBigIntegerField(default=0)
    rows_created = models.PositiveBigIntegerField(default=0)
    rows_updated = models.PositiveBigIntegerField(default=0)
    opened_at = models.DateTimeField(default=timezone.now)
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["run", "id"]
        indexes = [
            models.Index(
                fields=["run"],
                condition=Q(status="open"),
                name="runs_app_flushsession_open",
            ),
        ]

    def __str__(self) -> str:
        return f"flush session {self.pk} of {self.run_id}: {self.status}"


class RunModelState(Ledger):
    """A run's ledger for one tracked model it flushed (or tried to clean up): the per-model
    lines under the run-level summary on ``RunState``.

    ``flush_status`` is the model's: ``in_progress`` while a session of this model is open,
    ``succeeded`` when they all closed cleanly, ``failed`` once one failed. Counts: rows the
    run's flushes of this model upserted (``seen`` = ``created`` + ``updated``), confirmed by
    completion, removed by cleanup. The cleanup fields are this model's cleanup's outcome.
    """

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="model_states")
    model = models.CharField(max_length=100)  # "app_label.model_name"

    # How this run's cleanup removed rows (the model's sync_cleanup when it ran): a restore
    # undoes it the same way, whatever the model declares by then.
    cleanup_mode = models.CharField(
        max_length=8, choices=CleanupMode.choices, default=CleanupMode.DELETE
    )
    # Tombstoned rows this run's flush listed again, and so revived (soft models).
    rows_revived = models.PositiveBigIntegerField(default=0)
    # Rows this run's cleanup left in place because the grace period had not run out for them.
    rows_waiting = models.PositiveBigIntegerField(default=0)

    # The plan of a cleanup withheld for empty_run or too_many_deletions, for an operator to
    # approve (``safe_cleanup(..., approve=N)``), and who approved what.
    withheld_count = models.PositiveBigIntegerField(null=True, blank=True)
    withheld_keys = models.JSONField(default=list, blank=True)
    approved_by = models.CharField(max_length=150, blank=True, default="")
    approved_count = models.PositiveBigIntegerField(null=True, blank=True)
    approved_at = models.DateTimeField(null=True, blank=True)

    # The undo of this run's cleanup (``restore_cleanup``).
    rows_restored = models.PositiveBigIntegerField(default=0)
    restore_conflicts = models.PositiveBigIntegerField(default=0)
    restored_by = models.CharField(max_length=150, blank=True, default="")
    restored_at = models.DateTimeField(null=True, blank=True)

    # Tombstones of this run's soft cleanup deleted for good (``purge_tombstones``).
    rows_purged = models.PositiveBigIntegerField(default=0)

    # Incremental source state. ``flush_mode``: how the run read its source for the model
    # (a run with one incremental session is incremental: its cleanup is refused).
    # ``cursor``: where the source stands after what the run wrote (``write(rows, cursor=)``),
    # committed with the batch it belongs to; NULL when the run set none. The next run starts
    # from the cursor of the newest *completed* run of the scope that has one: a failed run's
    # cursor is never a starting point.
    flush_mode = models.CharField(max_length=16, choices=FlushMode.choices, default=FlushMode.FULL)
    cursor = models.JSONField(null=True, blank=True, default=None)
    cursor_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["run", "id"]
        verbose_name = "run model state"
        constraints = [
            models.UniqueConstraint(fields=["run", "model"], name="runs_app_modelstate_run_model"),
        ]

    def __str__(self) -> str:
        return f"{self.run_id} / {self.model}: {self.flush_status}"


class RunOutbox(models.Model):
    """A run's delivery cursor: events with ``seq >= next_seq`` are pending, in seq order."""

    run = models.OneToOneField(
        Run, on_delete=models.CASCADE, primary_key=True, related_name="outbox"
    )
    next_seq = models.PositiveBigIntegerField(default=1)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")
    # Null means "no backoff": claimable as soon as there are pending events.
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    lease_token = models.UUIDField(null=True, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)
    leased_by = models.CharField(max_length=200, blank=True, default="")
    blocked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "run outbox"
        verbose_name_plural = "run outboxes"

    def __str__(self) -> str:
        return f"outbox of {self.run_id} (next seq {self.next_seq})"


# An event still waiting for the relay: neither published nor skipped. The one definition of
# "pending", shared by ``RunEvent.objects.pending()`` and the partial index the relay's claim
# walks (its condition must stay exactly this Q, or a migration follows).
PENDING_EVENT = Q(published_at__isnull=True, skipped_at__isnull=True)


class RunEventQuerySet(models.QuerySet["RunEvent"]):
    def pending(self) -> RunEventQuerySet:
        """Events not published nor skipped yet (matches the partial index
        ``runs_app_event_pending``). Delivery order is ``seq`` from the run's ``next_seq``."""
        return self.filter(PENDING_EVENT)


class RunEvent(models.Model):
    """One event of a run, numbered by ``seq`` (1, 2, 3, ... without gaps)."""

    # No index of its own: the (run, seq) unique index leads with the run, so it serves every
    # lookup by run (and the foreign key's checks). A separate one (two on PostgreSQL, with the
    # varchar_pattern_ops copy) doubled the index entries each acknowledgement writes: marking
    # an event published rewrites its row, and every index of the table gets a new entry.
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="events", db_index=False)
    seq = models.PositiveBigIntegerField()
    type = models.CharField(max_length=EVENT_TYPE_MAX_LENGTH)
    payload = models.JSONField(default=empty_object, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    published_at = models.DateTimeField(null=True, blank=True)
    skipped_at = models.DateTimeField(null=True, blank=True)

    objects = RunEventQuerySet.as_manager()

    class Meta:
        ordering = ["run", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["run", "seq"], name="runs_app_event_run_seq"),
        ]
        indexes = [
            # Small: only events still waiting for the relay. Finds runs with work to do.
            models.Index(
                fields=["run", "seq"],
                condition=PENDING_EVENT,
                name="runs_app_event_pending",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.run_id}#{self.seq} {self.type}"


def json_object(value: Any) -> None:
    """A ``Project.data`` value must be a JSON object (a mapping), not a list or a scalar."""
    if not isinstance(value, dict):
        raise ValidationError(
            "must be a JSON object, not %(type)s", params={"type": type(value).__name__}
        )


class Project(TrackedModel):
    """The built-in tracked model: an item of a scope, unique by (scope, key), with a name and
    free-form JSON ``data``. Stamped with the last run that saw it (see ``TrackedModel``)."""

    scope = models.CharField(max_length=SCOPE_MAX_LENGTH)
    key = models.CharField(max_length=PROJECT_KEY_MAX_LENGTH)
    name = models.CharField(max_length=PROJECT_NAME_MAX_LENGTH)
    data = models.JSONField(default=empty_object, blank=True, validators=[json_object])

    sync_key = ("key",)
    sync_scope = "scope"
    sync_name = "projects"

    class Meta:
        ordering = ["scope", "key"]
        constraints = [
            models.UniqueConstraint(fields=["scope", "key"], name="runs_app_project_scope_key"),
        ]
        indexes = [
            models.Index(fields=["scope", "last_seen_run"], name="runs_app_project_seen"),
        ]

    def __str__(self) -> str:
        return f"{self.scope}/{self.key}"
