"""Operating the outbox: retry a run's delivery now, skip what blocks it, prune what was
delivered. Plain services (they own their transactions and nest in the caller's); the relay that
delivers events lives in :mod:`runs_app.relay` and is built on them, never the other way round.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.db import transaction
from django.db.models import DateTimeField, ExpressionWrapper, F
from django.db.models.functions import Now

from ..conf import runs_settings
from ..db import db_alias
from ..exceptions import OutboxNotBlocked, RunNotFound
from ..models import Run, RunEvent, RunOutbox
from ..notify import notify_outbox
from ..tracing import traced
from .events import insert_events
from .validation import (
    PreparedEvent,
    run_id_of,
    validate_actor,
    validate_duration,
    validate_positive_int,
)

# The outbox fields of a lease; every release (ack, failure, retry, skip, unused) clears them all.
NO_LEASE: dict[str, Any] = {"lease_token": None, "lease_until": None, "leased_by": ""}


@traced("retry_outbox")
def retry_outbox(run: Run | str, *, actor: str | None = None) -> None:
    """Make a run claimable now: clear ``blocked_at``, ``attempts``, the backoff and any lease
    (``last_error`` stays, as history), and wake the listening relays. One transaction. A relay
    still publishing that run finds its acknowledgement fenced off, so at most its batch is
    delivered again.

    ``actor``: who asked (an operator's name, e.g. the admin user's username). When given, the
    retry is recorded as an ``outbox.retried`` event ``{"actor": ...}`` in the same transaction
    (delivered like any other); without it nothing but the outbox row changes.

    Raises ``RunNotFound``, ``InvalidInput`` (``actor``).
    """
    run_id = run_id_of(run)
    actor = validate_actor(actor)
    alias = db_alias()
    with transaction.atomic(using=alias):
        updated = (
            RunOutbox.objects.using(alias)
            .filter(run_id=run_id)
            .update(blocked_at=None, attempts=0, next_attempt_at=None, **NO_LEASE)
        )
        if updated:
            if actor is not None:
                retried = PreparedEvent("outbox.retried", {"actor": actor})
                insert_events(run_id, [retried], allow_closed=True)
            notify_outbox()  # the relays may pick it up now, not at their next poll
    if not updated:
        raise RunNotFound(run_id)


@traced("skip_outbox_event")
def skip_outbox_event(run: Run | str, *, actor: str | None = None) -> RunEvent | None:
    """Skip what blocks a blocked run and unblock it: its head event, or a gap.

    One transaction (nested in the caller's): lock the outbox row, then

    - head event present (at ``next_seq``): mark it ``skipped_at`` and advance ``next_seq`` past
      it; returns the skipped event;
    - head event missing (a gap: events deleted behind the services' back; the relay blocks
      such a run with "gap: event seq N is missing"): move ``next_seq`` to the next existing
      event (or past the run's last seq when none is left); returns None;

    clear the blocked state and backoff, and append an ``outbox.skipped`` event (the skipped
    seq, type and last error; for a gap ``"gap": [first, last]``, the missing seqs) that the relay
    delivers like any other. ``actor``: who asked (an operator's name), added to that event's
    payload as ``"actor"`` when given.

    Raises ``RunNotFound``, ``OutboxNotBlocked`` (also when nothing is pending), ``InvalidInput``
    (``actor``).
    """
    run_id = run_id_of(run)
    actor = validate_actor(actor)
    alias = db_alias()
    with transaction.atomic(using=alias):
        try:
            outbox = (
                RunOutbox.objects.using(alias)
                .select_for_update(of=("self",))
                .select_related("run")
                .get(run_id=run_id)
            )
        except RunOutbox.DoesNotExist:
            raise RunNotFound(run_id) from None
        events = RunEvent.objects.using(alias).filter(run_id=run_id)
        head = events.filter(seq=outbox.next_seq).first()
        if outbox.blocked_at is None or (head is None and outbox.next_seq > outbox.run.last_seq):
            raise OutboxNotBlocked(run_id)
        detail: dict[str, Any] = {"attempts": outbox.attempts, "last_error": outbox.last_error}
        if head is not None:
            RunEvent.objects.using(alias).filter(pk=head.pk).update(skipped_at=Now())
            next_seq = head.seq + 1
            detail = {"seq": head.seq, "type": head.type, **detail}
        else:
            after = (
                events.filter(seq__gt=outbox.next_seq)
                .order_by("seq")
                .values_list("seq", flat=True)
                .first()
            )
            next_seq = after if after is not None else outbox.run.last_seq + 1
            detail = {"seq": outbox.next_seq, "type": "", "gap": [outbox.next_seq, next_seq - 1]}
            detail.update(attempts=outbox.attempts, last_error=outbox.last_error)
        if actor is not None:
            detail["actor"] = actor
        RunOutbox.objects.using(alias).filter(run_id=run_id).update(
            next_seq=next_seq, attempts=0, next_attempt_at=None, blocked_at=None, **NO_LEASE
        )
        insert_events(run_id, [PreparedEvent("outbox.skipped", detail)], allow_closed=True)
        if head is not None:
            head.refresh_from_db(using=alias)  # inside: a failure here rolls the skip back too
    return head


@traced("prune_outbox")
def prune_outbox(older_than: float | dt.timedelta, *, batch_size: int | None = None) -> int:
    """Delete events published more than ``older_than`` (seconds or timedelta) ago; return how
    many. Never an unpublished or skipped event, never one at or above its run's ``next_seq``.

    Deletes in batches of ``batch_size`` (default ``CLEANUP_BATCH_SIZE``), each one statement in
    its own short transaction, so the relay and appenders are never held up for long.
    """
    age = validate_duration("older_than", older_than, allow_zero=True)
    size = validate_positive_int("batch_size", batch_size, runs_settings.CLEANUP_BATCH_SIZE)
    alias = db_alias()
    cutoff = ExpressionWrapper(Now() - age, output_field=DateTimeField())
    prunable = RunEvent.objects.using(alias).filter(
        published_at__isnull=False, published_at__lt=cutoff, seq__lt=F("run__outbox__next_seq")
    )
    deleted = 0
    while True:
        ids = list(prunable.order_by().values_list("pk", flat=True)[:size])
        if not ids:
            return deleted
        # One DELETE per transaction. The conditions are repeated, so a row that changed since
        # the SELECT would be kept.
        with transaction.atomic(using=alias):
            count, _ = prunable.filter(pk__in=ids).delete()
        deleted += count
        if len(ids) < size:
            return deleted
