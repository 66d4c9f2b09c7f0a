"""The outbox relay: delivers each run's events, at least once and in seq order.

How a pass works (``drain_outbox_once``):

1. **Claim** (one short transaction): pick runs that have pending events (found through the
   partial index ``runs_app_event_pending``), are not blocked, whose backoff is over and whose
   lease is free or expired; give them a fresh lease token, ``leased_by`` and ``lease_until``
   computed with the database's clock. PostgreSQL locks only the outbox rows, with
   ``FOR UPDATE SKIP LOCKED`` (appenders lock the run row and never wait for a relay; relays
   skip each other's rows); SQLite claims with one ``UPDATE ... RETURNING`` statement.
2. **Read** each claimed run's pending events (``seq >= next_seq``), in seq order, up to the batch
   size. No transaction: events below ``Run.last_seq`` never change.
3. **Publish** one run's messages per ``publish()`` call, outside any transaction.
4. **Acknowledge** (one short transaction, fenced by the lease token): advance ``next_seq``, set
   ``published_at`` on exactly those events, reset attempts and backoff, clear the lease. A relay
   whose lease expired and was taken over changes nothing (0 rows).

A failed publish keeps the events pending and sets a backoff (``attempts`` + 1, ``last_error``,
``next_attempt_at``); at ``MAX_ATTEMPTS`` the run is blocked until ``retry_outbox`` or
``skip_outbox_event``. Other runs keep draining.

At least once: a relay killed between publish and ack leaves its lease to expire
(``LEASE_SECONDS``); another relay then republishes from ``next_seq``, so at most that batch is
delivered twice, in order. ``LEASE_SECONDS`` must exceed the slowest publish of one batch; a relay
renews the leases it holds between batches, so under normal operation nothing is published twice.

Invariant kept by every write here: events with ``seq < next_seq`` have ``published_at`` (or
``skipped_at``) set, written in the transaction that advanced ``next_seq``; events with
``seq >= next_seq`` are pending.

Called inside a caller's ``atomic()`` (a Django ``TestCase``, the ``runs_outbox`` fixture in a
``django_db`` test) everything still works: claim and ack become savepoints and the publish runs
inside the caller's transaction. That is for tests; a production relay runs in autocommit mode.
No function here starts a thread or runs in the background: draining is always an explicit call.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from django.db import (
    InterfaceError,
    OperationalError,
    close_old_connections,
    connections,
    transaction,
)
from django.db.models import DateTimeField, Exists, ExpressionWrapper, F, OuterRef, Q, QuerySet
from django.db.models.functions import Now

from .conf import runs_settings
from .exceptions import InvalidInput, OutboxNotBlocked, RunNotFound
from .models import Run, RunEvent, RunOutbox
from .notify import OutboxListener, notify_outbox
from .publishers import Message, Publisher, close_publisher, load_publisher
from .services.db import connection_for_write, db_alias, is_postgresql, table
from .services.events import insert_events
from .services.validation import PreparedEvent, error_text, run_id_of, validate_run_id

logger = logging.getLogger("runs_app.relay")

# Reconnection backoff of the loop after a database error (PostgreSQL restarting...).
RECONNECT_MIN_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 30.0

# Monotonic clock used to decide when to renew leases; a module attribute so a test can move it.
monotonic = time.monotonic


@dataclass(frozen=True)
class DrainResult:
    """What one or more passes did. ``failed_runs``: runs whose publish failed (their events stay
    pending), in the order of the failures; ``runs_touched``: runs claimed."""

    published: int = 0
    failed_runs: tuple[str, ...] = ()
    runs_touched: int = 0

    def __add__(self, other: DrainResult) -> DrainResult:
        return DrainResult(
            self.published + other.published,
            self.failed_runs + other.failed_runs,
            self.runs_touched + other.runs_touched,
        )


@dataclass
class ClaimedRun:
    run_id: str
    next_seq: int
    attempts: int
    renewed_at: float  # our monotonic clock when its lease was last set


@dataclass
class Claim:
    """Leases taken by one claim: one token for all its runs (unique to this claim)."""

    token: uuid.UUID
    runs: list[ClaimedRun] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Public API


def drain_outbox_once(
    *,
    publisher: Publisher | None = None,
    batch_size: int | None = None,
    run_id: str | None = None,
    max_messages: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> DrainResult:
    """One pass: claim up to ``batch_size`` runs, publish up to ``batch_size`` pending events of
    each (one ``publish()`` call per run, seq order), acknowledge each run that succeeded.

    Args:
        publisher: the publisher instance; None builds the configured ``PUBLISHER`` (closed again
            at the end of the call).
        batch_size: events per run and runs per claim (default ``DRAIN_BATCH_SIZE``).
        run_id: only this run.
        max_messages: publish at most this many messages in this pass.
        should_stop: checked before each run; when it returns True the pass stops after the
            batch in hand (acknowledged) and releases the leases it has not used.

    Returns:
        ``DrainResult``; ``runs_touched == 0`` means nothing was claimable right now.

    A database error propagates (the leases this pass holds expire after ``LEASE_SECONDS``).
    """
    size = _positive("batch_size", batch_size, runs_settings.DRAIN_BATCH_SIZE)
    budget = None if max_messages is None else _positive("max_messages", max_messages, 1)
    only = None if run_id is None else [validate_run_id(run_id)]
    with _publisher_for_call(publisher) as active:
        claim = claim_runs(size if budget is None else min(size, budget), run_ids=only)
        return _drain_claim(claim, active, size, budget, should_stop, loop=False)


def drain_outbox_for_run(
    run: Run | str, *, publisher: Publisher | None = None, batch_size: int | None = None
) -> DrainResult:
    """Drain one run until nothing is pending or a publish fails, ignoring its backoff (not its
    blocked state, nor another relay's live lease). Batch after batch under one lease, renewed
    by each acknowledgement. For tests and tools.

    Raises ``RunNotFound``.
    """
    run_id = run_id_of(run)
    if not RunOutbox.objects.using(db_alias()).filter(run_id=run_id).exists():
        raise RunNotFound(run_id)
    size = _positive("batch_size", batch_size, runs_settings.DRAIN_BATCH_SIZE)
    with _publisher_for_call(publisher) as active:
        claim = claim_runs(1, run_ids=[run_id], ignore_backoff=True)
        return _drain_claim(claim, active, size, None, None, loop=True)


def retry_outbox(run: Run | str) -> None:
    """Make a run claimable now: clear ``blocked_at``, ``attempts``, the backoff and any lease
    (``last_error`` stays, as history), and wake the listening relays. One transaction. A relay
    still publishing that run finds its acknowledgement fenced off, so at most its batch is
    delivered again.

    Raises ``RunNotFound``.
    """
    run_id = run_id_of(run)
    alias = db_alias()
    with transaction.atomic(using=alias):
        updated = (
            RunOutbox.objects.using(alias)
            .filter(run_id=run_id)
            .update(
                blocked_at=None,
                attempts=0,
                next_attempt_at=None,
                lease_token=None,
                lease_until=None,
                leased_by="",
            )
        )
        if updated:
            notify_outbox()  # the relays may pick it up now, not at their next poll
    if not updated:
        raise RunNotFound(run_id)


def skip_outbox_event(run: Run | str) -> RunEvent:
    """Skip the event at the head of a blocked run and unblock the run.

    One transaction (nested in the caller's): lock the outbox row, mark the head event
    ``skipped_at``, advance ``next_seq`` past it, clear the blocked state and backoff, and append
    an ``outbox.skipped`` event (seq, type and last error of the skipped event) that the relay
    delivers like any other. Returns the skipped event.

    Raises ``RunNotFound``, ``OutboxNotBlocked`` (also when nothing is pending).
    """
    run_id = run_id_of(run)
    alias = db_alias()
    with transaction.atomic(using=alias):
        try:
            outbox = (
                RunOutbox.objects.using(alias).select_for_update(of=("self",)).get(run_id=run_id)
            )
        except RunOutbox.DoesNotExist:
            raise RunNotFound(run_id) from None
        head = RunEvent.objects.using(alias).filter(run_id=run_id, seq=outbox.next_seq).first()
        if outbox.blocked_at is None or head is None:
            raise OutboxNotBlocked(run_id)
        RunEvent.objects.using(alias).filter(pk=head.pk).update(skipped_at=Now())
        RunOutbox.objects.using(alias).filter(run_id=run_id).update(
            next_seq=head.seq + 1,
            attempts=0,
            next_attempt_at=None,
            blocked_at=None,
            lease_token=None,
            lease_until=None,
            leased_by="",
        )
        insert_events(
            run_id,
            [
                PreparedEvent(
                    "outbox.skipped",
                    {
                        "seq": head.seq,
                        "type": head.type,
                        "attempts": outbox.attempts,
                        "last_error": outbox.last_error,
                    },
                )
            ],
            allow_closed=True,
        )
        head.refresh_from_db(using=alias)  # inside: a failure here rolls the skip back too
    return head


def prune_outbox(older_than: float | dt.timedelta, *, batch_size: int | None = None) -> int:
    """Delete events published more than ``older_than`` (seconds or timedelta) ago; return how
    many. Never an unpublished or skipped event, never one at or above its run's ``next_seq``.

    Deletes in batches of ``batch_size`` (default ``CLEANUP_BATCH_SIZE``), each one statement in
    its own short transaction, so the relay and appenders are never held up for long.
    """
    if isinstance(older_than, dt.timedelta):
        age = older_than
    elif isinstance(older_than, int | float) and not isinstance(older_than, bool):
        age = dt.timedelta(seconds=older_than)
    else:
        raise InvalidInput(
            "older_than", f"must be seconds or a timedelta, not {type(older_than).__name__}"
        )
    if age < dt.timedelta(0):
        raise InvalidInput("older_than", "must not be negative", limit=0)
    size = _positive("batch_size", batch_size, runs_settings.CLEANUP_BATCH_SIZE)
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


# ---------------------------------------------------------------------------------------------
# Loops used by the drain_outbox command (and the runs_outbox test fixture)


def drain_until_idle(
    *,
    publisher: Publisher,
    batch_size: int | None = None,
    run_id: str | None = None,
    max_messages: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_pass: Callable[[DrainResult], None] | None = None,
) -> DrainResult:
    """Pass after pass until nothing is claimable right now (or ``max_messages`` is reached,
    or ``should_stop`` says so). Runs whose publish failed wait for their backoff, so they are
    not claimable again at once; a failing run is retried within the call only once its backoff
    is over, and stops being claimable when blocked."""
    total = DrainResult()
    while max_messages is None or total.published < max_messages:
        if should_stop is not None and should_stop():
            break
        result = drain_outbox_once(
            publisher=publisher,
            batch_size=batch_size,
            run_id=run_id,
            max_messages=None if max_messages is None else max_messages - total.published,
            should_stop=should_stop,
        )
        total += result
        if on_pass is not None and result.runs_touched:
            on_pass(result)
        if not result.published and not result.failed_runs:
            break  # nothing claimable (or nothing left to do for what was claimed)
    return total


def run_relay(
    *,
    publisher: Publisher,
    stop: threading.Event,
    batch_size: int | None = None,
    run_id: str | None = None,
    interval: float | None = None,
    max_messages: int | None = None,
    on_pass: Callable[[DrainResult], None] | None = None,
) -> DrainResult:
    """The relay loop: drain until idle, wait for work (``interval`` seconds, default
    ``POLL_INTERVAL``), again, until ``stop`` is set (or ``max_messages`` were published).

    When ``stop`` is set mid-pass, the batch in hand is published and acknowledged, the unused
    leases are released, and the loop returns. A database error (PostgreSQL restarting, a
    dropped connection) closes the connections and retries after a growing wait (0.5 s .. 30 s);
    the leases of the interrupted pass expire and another pass takes them over.

    On PostgreSQL with ``NOTIFY`` on, the wait listens on ``NOTIFY_CHANNEL`` over a connection
    of its own (see :mod:`runs_app.notify`), closed when the loop returns: a committed event
    wakes the loop at once, and the interval is the polling fallback.
    """
    wait = runs_settings.POLL_INTERVAL if interval is None else interval
    total = DrainResult()
    reconnect_delay = RECONNECT_MIN_SECONDS
    # LISTENing before the first pass: what commits after its claim wakes the next wait.
    listener = OutboxListener.for_relay()
    try:
        while not stop.is_set():
            # Drops connections that the database closed or that outlived CONN_MAX_AGE.
            close_old_connections()
            remaining = None if max_messages is None else max_messages - total.published
            try:
                result = drain_until_idle(
                    publisher=publisher,
                    batch_size=batch_size,
                    run_id=run_id,
                    max_messages=remaining,
                    should_stop=stop.is_set,
                    on_pass=on_pass,
                )
            except (OperationalError, InterfaceError) as exc:
                logger.warning(
                    "database unavailable (%s); retrying in %.1f s", exc, reconnect_delay
                )
                _close_connections()
                stop.wait(reconnect_delay)
                reconnect_delay = min(reconnect_delay * 2, RECONNECT_MAX_SECONDS)
                continue
            reconnect_delay = RECONNECT_MIN_SECONDS
            total += result
            if max_messages is not None and total.published >= max_messages:
                break
            if not stop.is_set():
                wait_for_work(stop, wait, listener)
    finally:
        if listener is not None:
            listener.close()
    return total


def wait_for_work(
    stop: threading.Event, timeout: float, listener: OutboxListener | None = None
) -> None:
    """The relay's idle wait: return after ``timeout`` seconds, as soon as ``stop`` is set, or,
    with a ``listener`` (PostgreSQL, ``NOTIFY`` on), as soon as new events are committed."""
    if listener is None:
        stop.wait(timeout)
    else:
        listener.wait(stop, timeout)


# ---------------------------------------------------------------------------------------------
# Claim, acknowledge, fail, renew, release


def claim_runs(
    limit: int, *, run_ids: Sequence[str] | None = None, ignore_backoff: bool = False
) -> Claim:
    """Lease up to ``limit`` claimable runs (see the module docstring), in run id order.

    One short transaction: PostgreSQL ``SELECT ... FOR UPDATE OF outbox SKIP LOCKED`` then one
    ``UPDATE``; SQLite one ``UPDATE ... WHERE run_id IN (SELECT ... LIMIT n) RETURNING`` (the only
    writer while it runs). Nothing else happens inside it.
    """
    alias = db_alias()
    token = uuid.uuid4()
    lease = dt.timedelta(seconds=float(runs_settings.LEASE_SECONDS))
    holder = f"{socket.gethostname()}:{os.getpid()}"[:200]
    candidates = _claimable(run_ids, ignore_backoff=ignore_backoff)
    if not candidates.exists():
        # An idle relay polls with this read alone: no write transaction (on SQLite, no write
        # lock taken from the application) when there is nothing to claim.
        return Claim(token, [])
    with transaction.atomic(using=alias):
        if is_postgresql():
            rows = list(
                candidates.select_for_update(skip_locked=True, of=("self",)).values_list(
                    "run_id", "next_seq", "attempts"
                )[:limit]
            )
            if rows:
                RunOutbox.objects.using(alias).filter(run_id__in=[row[0] for row in rows]).update(
                    lease_token=token, leased_by=holder, lease_until=_db_now_plus(lease)
                )
        else:
            rows = _claim_returning(candidates[:limit], token, holder, lease)
    claimed_at = monotonic()
    runs = sorted(
        (ClaimedRun(str(rid), int(seq), int(att), claimed_at) for rid, seq, att in rows),
        key=lambda run: run.run_id,
    )
    return Claim(token, runs)


def _claimable(run_ids: Sequence[str] | None, *, ignore_backoff: bool) -> QuerySet[RunOutbox]:
    # Driven by the small partial index of pending events, not by a scan of every outbox: the
    # DISTINCT lets PostgreSQL walk that index in run order (an index-only scan) and look each
    # run's outbox up by key, stopping at the LIMIT; without it the planner prefers a merge join
    # that reads the whole outbox table.
    pending = RunEvent.objects.filter(published_at__isnull=True, skipped_at__isnull=True)
    if run_ids is not None:
        pending = pending.filter(run_id__in=run_ids)
    # The EXISTS (one probe of the (run, seq) unique index) keeps the claim exact: a run is
    # claimed only when an event at or above its cursor exists, so a pass that claims a run
    # always has something to publish.
    at_cursor = RunEvent.objects.filter(run_id=OuterRef("run_id"), seq__gte=OuterRef("next_seq"))
    queryset = RunOutbox.objects.using(db_alias()).filter(
        Q(lease_until__isnull=True) | Q(lease_until__lte=Now()),
        Exists(at_cursor),
        run_id__in=pending.order_by().values("run_id").distinct(),
        blocked_at__isnull=True,
    )
    if not ignore_backoff:
        queryset = queryset.filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=Now()))
    return queryset.order_by("run_id")


def _claim_returning(
    candidates: QuerySet[RunOutbox], token: uuid.UUID, holder: str, lease: dt.timedelta
) -> list[tuple[Any, ...]]:
    """SQLite: one statement, so two relays can never claim the same run. Raw SQL because the
    ORM has no ``UPDATE ... RETURNING``; the candidate subquery is the ORM's own SQL."""
    connection = connection_for_write()
    subquery, params = candidates.values("run_id").query.sql_with_params()
    lease_sql, lease_params = _compile(_db_now_plus(lease))
    token_value = RunOutbox._meta.get_field("lease_token").get_db_prep_value(token, connection)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table(RunOutbox)} SET lease_token = %s, leased_by = %s,"
            f" lease_until = {lease_sql} WHERE run_id IN ({subquery})"
            " RETURNING run_id, next_seq, attempts",
            [token_value, holder, *lease_params, *params],
        )
        return list(cursor.fetchall())


def _drain_claim(
    claim: Claim,
    publisher: Publisher,
    size: int,
    budget: int | None,
    should_stop: Callable[[], bool] | None,
    *,
    loop: bool,
) -> DrainResult:
    published = 0
    failed: list[str] = []
    done: set[str] = set()
    for run in claim.runs:
        if (should_stop is not None and should_stop()) or budget == 0:
            break
        done.add(run.run_id)
        while True:
            if not _hold_lease(claim, run):
                break
            limit = size if budget is None else min(size, budget)
            messages = read_pending(run.run_id, run.next_seq, limit)
            if not messages:
                release_leases(claim, [run.run_id])
                break
            try:
                publisher.publish(messages)
            except Exception as exc:
                record_failure(claim, run, exc)
                failed.append(run.run_id)
                break
            if budget is not None:
                budget -= len(messages)
            more = (
                loop
                and len(messages) == limit
                and budget != 0
                and not (should_stop is not None and should_stop())
            )
            if not acknowledge(claim.token, run.run_id, messages, keep_lease=more):
                logger.warning(
                    "lease of run %s lost before its acknowledgement: %d message(s) will be "
                    "published again (LEASE_SECONDS=%s is shorter than the publish took)",
                    run.run_id,
                    len(messages),
                    runs_settings.LEASE_SECONDS,
                )
                break
            published += len(messages)
            run.next_seq = messages[-1].seq + 1
            run.attempts = 0
            run.renewed_at = monotonic()
            if not more:
                break
    unused = [run.run_id for run in claim.runs if run.run_id not in done]
    if unused:
        release_leases(claim, unused)
    return DrainResult(published, tuple(failed), len(claim.runs))


def _hold_lease(claim: Claim, run: ClaimedRun) -> bool:
    """True while the run's lease is ours. Renews the leases of the claim's runs still to do
    when this one is half-way to expiry (so a long pass never outlives its leases)."""
    lease = float(runs_settings.LEASE_SECONDS)
    if monotonic() - run.renewed_at < lease / 2:
        return True
    pending = [other for other in claim.runs if other.run_id >= run.run_id]
    held = renew_leases(claim.token, [other.run_id for other in pending])
    now = monotonic()
    for other in pending:
        if other.run_id in held:
            other.renewed_at = now
    return run.run_id in held


def read_pending(run_id: str, next_seq: int, limit: int) -> list[Message]:
    """Up to ``limit`` events with ``seq >= next_seq``, in seq order, as messages. One query,
    outside any transaction: committed events below ``Run.last_seq`` never change."""
    rows = (
        RunEvent.objects.using(db_alias())
        .filter(run_id=run_id, seq__gte=next_seq)
        .order_by("seq")
        .values_list("seq", "type", "payload", "created_at", "run__scope")[:limit]
    )
    return [
        Message(
            id=f"{run_id}:{seq}",
            run_id=run_id,
            scope=scope,
            seq=seq,
            type=event_type,
            payload=payload,
            occurred_at=created_at,
        )
        for seq, event_type, payload, created_at, scope in rows
    ]


def acknowledge(
    token: uuid.UUID, run_id: str, messages: Sequence[Message], *, keep_lease: bool = False
) -> bool:
    """Record ``messages`` (a published, contiguous batch from ``next_seq``) as delivered.

    One short transaction: the fenced ``UPDATE`` of the outbox row (lease token and ``next_seq``
    must still match: a relay whose lease was taken over changes nothing and gets False), then
    ``published_at`` on exactly those events. ``keep_lease`` renews the lease for the next batch
    instead of clearing it.
    """
    alias = db_alias()
    first, last = messages[0].seq, messages[-1].seq
    lease: dict[str, Any] = (
        {"lease_until": _db_now_plus(dt.timedelta(seconds=float(runs_settings.LEASE_SECONDS)))}
        if keep_lease
        else {"lease_token": None, "lease_until": None, "leased_by": ""}
    )
    with transaction.atomic(using=alias):
        updated = (
            RunOutbox.objects.using(alias)
            .filter(run_id=run_id, lease_token=token, next_seq=first)
            .update(next_seq=last + 1, attempts=0, last_error="", next_attempt_at=None, **lease)
        )
        if not updated:
            return False
        RunEvent.objects.using(alias).filter(
            run_id=run_id,
            seq__gte=first,
            seq__lte=last,
            published_at__isnull=True,
            skipped_at__isnull=True,
        ).update(published_at=Now())
    return True


def record_failure(claim: Claim, run: ClaimedRun, error: BaseException) -> bool:
    """After a failed publish: ``attempts`` + 1, ``last_error``, a backoff from the database's
    clock, the lease cleared; blocked at ``MAX_ATTEMPTS``. One statement, fenced by the lease.
    Returns whether the run is now blocked."""
    attempts = run.attempts + 1
    blocked = attempts >= runs_settings.MAX_ATTEMPTS
    delay = dt.timedelta(seconds=backoff_seconds(attempts))
    alias = db_alias()
    with transaction.atomic(using=alias):
        RunOutbox.objects.using(alias).filter(run_id=run.run_id, lease_token=claim.token).update(
            attempts=attempts,
            last_error=error_text(f"{type(error).__name__}: {error}"),
            next_attempt_at=None if blocked else _db_now_plus(delay),
            blocked_at=Now() if blocked else None,
            lease_token=None,
            lease_until=None,
            leased_by="",
        )
    if blocked:
        logger.error(
            "outbox of run %s blocked after %d failed attempts: %s", run.run_id, attempts, error
        )
    else:
        logger.warning(
            "publish failed for run %s (attempt %d, retry in %.1f s): %s",
            run.run_id,
            attempts,
            delay.total_seconds(),
            error,
        )
    return blocked


def backoff_seconds(attempts: int) -> float:
    """Delay before attempt ``attempts + 1``: exponential (base, 2 base, 4 base...) capped at
    ``RETRY_MAX_SECONDS``, with jitter in the upper half so relays do not retry in lockstep.
    Always within ``[RETRY_BASE_SECONDS, RETRY_MAX_SECONDS]``."""
    base = float(runs_settings.RETRY_BASE_SECONDS)
    ceiling = float(runs_settings.RETRY_MAX_SECONDS)
    top = min(ceiling, base * 2.0 ** min(max(attempts - 1, 0), 64))
    return random.uniform(max(base, top / 2), top)


def renew_leases(token: uuid.UUID, run_ids: Sequence[str]) -> set[str]:
    """Extend the leases still held under ``token``; return the run ids still ours."""
    alias = db_alias()
    held = RunOutbox.objects.using(alias).filter(run_id__in=run_ids, lease_token=token)
    with transaction.atomic(using=alias):
        renewed = held.update(
            lease_until=_db_now_plus(dt.timedelta(seconds=float(runs_settings.LEASE_SECONDS)))
        )
    if renewed == len(run_ids):
        return set(run_ids)
    return set(held.values_list("run_id", flat=True))


def release_leases(claim: Claim, run_ids: Sequence[str]) -> int:
    """Give back leases we did not use (fenced: never someone else's)."""
    alias = db_alias()
    with transaction.atomic(using=alias):
        return (
            RunOutbox.objects.using(alias)
            .filter(run_id__in=run_ids, lease_token=claim.token)
            .update(lease_token=None, lease_until=None, leased_by="")
        )


# ---------------------------------------------------------------------------------------------
# Helpers


def _db_now_plus(delta: dt.timedelta) -> ExpressionWrapper[Any]:
    """The database's clock plus ``delta``: leases and backoffs never depend on this host's."""
    return ExpressionWrapper(Now() + delta, output_field=DateTimeField())


def _compile(expression: ExpressionWrapper[Any]) -> tuple[str, list[Any]]:
    query = RunOutbox.objects.using(db_alias()).all().query
    compiler = query.get_compiler(db_alias())
    sql, params = compiler.compile(expression.resolve_expression(query))
    return sql, list(params)


def _positive(name: str, value: Any, default: Any) -> int:
    value = default if value is None else value
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidInput(name, f"must be a positive integer, not {value!r}", limit=1)
    return value


@contextmanager
def _publisher_for_call(publisher: Publisher | None) -> Iterator[Publisher]:
    if publisher is not None:
        yield publisher
        return
    built = load_publisher()
    try:
        yield built
    finally:
        close_publisher(built)


def _close_connections() -> None:
    for connection in connections.all(initialized_only=True):
        try:
            connection.close()
        except Exception:  # a connection the server already dropped may fail to close
            logger.debug("closing a broken connection failed", exc_info=True)


__all__ = [
    "DrainResult",
    "drain_outbox_for_run",
    "drain_outbox_once",
    "drain_until_idle",
    "prune_outbox",
    "retry_outbox",
    "run_relay",
    "skip_outbox_event",
    "wait_for_work",
]
