"""The outbox relay: delivers each run's events, at least once and in seq order.

How a pass works (``drain_outbox_once``):

1. **Claim** (one short transaction): pick runs that have pending events (found through the
   partial index ``runs_app_event_pending``), are not blocked, whose backoff is over and whose
   lease is free or expired; give them a fresh lease token, ``leased_by`` and ``lease_until``
   computed with the database's clock, in one ``UPDATE ... RETURNING`` statement. PostgreSQL
   locks only the outbox rows, with ``FOR UPDATE SKIP LOCKED`` (appenders lock the run row and
   never wait for a relay; relays skip each other's rows).
2. **Read** the pending events (``seq >= next_seq``) of all claimed runs in one query, up to the
   batch size per run, in seq order. No transaction: events below ``Run.last_seq`` never change.
3. **Publish** one run's messages per ``publish()`` call, outside any transaction; a failure
   belongs to that run alone.
4. **Acknowledge** all runs that published in one short transaction of two set-based statements,
   fenced per run by the lease token and the cursor: advance ``next_seq``, set ``published_at``
   on exactly those events, reset attempts and backoff, clear the lease. A relay whose lease
   expired and was taken over changes nothing for that run (0 rows); the other runs of its claim
   are acknowledged. A pass costs a constant number of statements and two commits (claim, ack)
   whatever the number of runs and events it handles.

A failed publish keeps the events pending and sets a backoff (``attempts`` + 1, ``last_error``,
``next_attempt_at``); at ``MAX_ATTEMPTS`` the run is blocked until ``retry_outbox`` or
``skip_outbox_event``. Other runs keep draining.

At least once: a relay killed between publish and ack leaves its leases to expire
(``LEASE_SECONDS``); another relay then republishes from ``next_seq``, so at most the claim in
hand (up to ``DRAIN_BATCH_SIZE`` runs of up to ``DRAIN_BATCH_SIZE`` events each) is delivered
twice, each run in order: the unit of possible duplication is one claim. ``LEASE_SECONDS`` must
exceed the slowest publish of one run's batch: when a pass is half-way to its leases' expiry, it
acknowledges the batches in hand and renews the leases of the runs still to do, so under normal
operation nothing is published twice. A stop request (SIGTERM) finishes and acknowledges the
batches in hand and gives back the leases not used.

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
from collections.abc import Callable, Collection, Iterator, Sequence
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
from django.db.models import (
    BigIntegerField,
    Case,
    DateTimeField,
    Exists,
    ExpressionWrapper,
    F,
    OuterRef,
    Q,
    QuerySet,
    Value,
    When,
    Window,
)
from django.db.models.functions import Now, RowNumber

from .conf import runs_settings
from .db import connection_for_write, db_alias, is_postgresql, table
from .exceptions import InvalidInput, OutboxNotBlocked, RunNotFound
from .models import Run, RunEvent, RunOutbox
from .notify import OutboxListener, notify_outbox
from .publishers import Message, Publisher, close_publisher, load_publisher
from .services.events import insert_events
from .services.validation import (
    PreparedEvent,
    error_text,
    run_id_of,
    validate_duration,
    validate_run_id,
)

logger = logging.getLogger("runs_app.relay")

# Reconnection backoff of the loop after a database error (PostgreSQL restarting...).
RECONNECT_MIN_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 30.0

# The outbox fields of a lease; every release (ack, failure, retry, skip, unused) clears them all.
NO_LEASE: dict[str, Any] = {"lease_token": None, "lease_until": None, "leased_by": ""}

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
    each (one ``publish()`` call per run, seq order), acknowledge the runs that succeeded (one
    transaction for all of them).

    Args:
        publisher: the publisher instance; None builds the configured ``PUBLISHER`` (closed again
            at the end of the call).
        batch_size: events per run and runs per claim (default ``DRAIN_BATCH_SIZE``).
        run_id: only this run.
        max_messages: publish at most this many messages in this pass.
        should_stop: checked before each run; when it returns True the pass stops, acknowledges
            the batches in hand and releases the leases it has not used.

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
            .update(blocked_at=None, attempts=0, next_attempt_at=None, **NO_LEASE)
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
            next_seq=head.seq + 1, attempts=0, next_attempt_at=None, blocked_at=None, **NO_LEASE
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
    age = validate_duration("older_than", older_than, allow_zero=True)
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

    One short transaction holding one ``UPDATE ... WHERE run_id IN (SELECT ... LIMIT n)
    RETURNING`` statement; on PostgreSQL the subquery locks the outbox rows it picks with
    ``FOR UPDATE OF outbox SKIP LOCKED`` (relays skip each other's rows), on SQLite the statement
    is the only writer while it runs. Nothing else happens inside it.
    """
    alias = db_alias()
    token = uuid.uuid4()
    lease = dt.timedelta(seconds=float(runs_settings.LEASE_SECONDS))
    holder = f"{socket.gethostname()}:{os.getpid()}"[:200]
    candidates = _claimable(run_ids, ignore_backoff=ignore_backoff)
    if is_postgresql():
        # An idle PostgreSQL relay polls with the claim itself: with nothing to claim it locks
        # and writes nothing, so a separate "anything to do?" read would only add a query.
        candidates = candidates.select_for_update(skip_locked=True, of=("self",))
    elif not candidates.exists():
        # An idle SQLite relay polls with this read alone: no write lock taken from the
        # application when there is nothing to claim.
        return Claim(token, [])
    with transaction.atomic(using=alias):
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
    """One statement, so two relays can never claim the same run. Raw SQL because the ORM has
    no ``UPDATE ... RETURNING``; the candidate subquery (with its row locks on PostgreSQL) is the
    ORM's own SQL."""
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
    """Publish and acknowledge what ``claim`` leased: per pass one read of every run's pending
    events, one ``publish()`` per run, then one acknowledgement for all runs that published.
    ``loop`` (one run, ``drain_outbox_for_run``): passes again while a run fills its batch."""

    def stopping() -> bool:
        return budget == 0 or (should_stop is not None and should_stop())

    published = 0
    failed: list[str] = []
    release: list[str] = []  # leased, nothing to publish or never reached: given back at the end
    runs = list(claim.runs)
    while runs:
        limit = size if budget is None else min(size, budget)
        batches = read_claimed([(run.run_id, run.next_seq) for run in runs], limit)
        in_hand: list[tuple[ClaimedRun, list[Message]]] = []  # published, not acknowledged yet
        again: list[ClaimedRun] = []
        for index, run in enumerate(runs):
            if stopping():
                release.extend(other.run_id for other in runs[index:])
                break
            if monotonic() - run.renewed_at >= float(runs_settings.LEASE_SECONDS) / 2:
                # Half-way to expiry: acknowledge what is in hand (clearing those leases), then
                # renew the leases of the runs still to do, so a long pass never outlives them.
                published += _acknowledge_in_hand(claim, in_hand, again, limit, loop, stopping)
                in_hand = []
                if run.run_id not in _renew_rest(claim, runs[index:]):
                    continue  # taken over by another relay: not ours to publish or release
            messages = batches.get(run.run_id, [])
            if budget is not None:
                messages = messages[:budget]
            if not messages:
                release.append(run.run_id)
                continue
            try:
                publisher.publish(messages)
            except Exception as exc:
                record_failure(claim, run, exc)
                failed.append(run.run_id)
                continue
            if budget is not None:
                budget -= len(messages)
            in_hand.append((run, messages))
        published += _acknowledge_in_hand(claim, in_hand, again, limit, loop, stopping)
        runs = again
    if release:
        release_leases(claim, release)
    return DrainResult(published, tuple(failed), len(claim.runs))


def _acknowledge_in_hand(
    claim: Claim,
    in_hand: Sequence[tuple[ClaimedRun, list[Message]]],
    again: list[ClaimedRun],
    limit: int,
    loop: bool,
    stopping: Callable[[], bool],
) -> int:
    """Acknowledge the published batches in hand (one transaction); return how many messages
    that recorded. In ``loop`` mode a run that filled its batch keeps its lease (renewed) and is
    appended to ``again`` for the next pass."""
    if not in_hand:
        return 0
    stop = stopping()
    keep = {run.run_id for run, messages in in_hand if loop and not stop and len(messages) == limit}
    acked = acknowledge_batches(
        claim.token,
        [(run.run_id, messages[0].seq, messages[-1].seq) for run, messages in in_hand],
        keep_lease=keep,
    )
    now = monotonic()
    count = 0
    for run, messages in in_hand:
        if run.run_id not in acked:
            logger.warning(
                "lease of run %s lost before its acknowledgement: %d message(s) will be "
                "published again (LEASE_SECONDS=%s is shorter than the publish took)",
                run.run_id,
                len(messages),
                runs_settings.LEASE_SECONDS,
            )
            continue
        count += len(messages)
        run.next_seq = messages[-1].seq + 1
        run.attempts = 0
        run.renewed_at = now
        if run.run_id in keep:
            again.append(run)
    return count


def _renew_rest(claim: Claim, rest: Sequence[ClaimedRun]) -> set[str]:
    """Renew the leases of ``rest`` (the runs of the pass still to do); return those still ours."""
    held = renew_leases(claim.token, [run.run_id for run in rest])
    now = monotonic()
    for run in rest:
        if run.run_id in held:
            run.renewed_at = now
    return held


# PostgreSQL reads each run's batch with a LATERAL subquery: one index range scan of (run, seq)
# per run, stopping at the batch size whatever the run's backlog. The ORM cannot say LATERAL.
_READ_POSTGRESQL = """
SELECT c.run_id, r.scope, e.seq, e.type, e.payload, e.created_at
FROM unnest(%s::text[], %s::bigint[]) AS c(run_id, next_seq)
JOIN {run} r ON r.id = c.run_id
CROSS JOIN LATERAL (
    SELECT seq, type, payload, created_at FROM {event}
    WHERE run_id = c.run_id AND seq >= c.next_seq
    ORDER BY seq LIMIT %s
) e
ORDER BY c.run_id, e.seq
"""


def read_claimed(runs: Sequence[tuple[str, int]], limit: int) -> dict[str, list[Message]]:
    """Up to ``limit`` events with ``seq >= next_seq`` of each ``(run_id, next_seq)``, in seq
    order, as messages keyed by run id (runs with nothing pending are absent). One query for all
    runs, outside any transaction: committed events below ``Run.last_seq`` never change.

    PostgreSQL: a LATERAL join (raw SQL, see ``_READ_POSTGRESQL``). SQLite (no LATERAL): the ORM
    with ``row_number() OVER (PARTITION BY run ORDER BY seq) <= limit`` over the runs' events at
    or above their cursor (one ``CASE run_id`` gives each run its own ``next_seq``); it ranks every
    pending event of those runs, which is fine at SQLite's scale.
    """
    if not runs:
        return {}
    alias = db_alias()
    rows: list[tuple[Any, ...]]
    if is_postgresql():
        connection = connection_for_write()
        payload = RunEvent._meta.get_field("payload")
        with connection.cursor() as cursor:
            cursor.execute(
                _READ_POSTGRESQL.format(run=table(Run), event=table(RunEvent)),
                [[run_id for run_id, _ in runs], [seq for _, seq in runs], limit],
            )
            rows = [
                (
                    run_id,
                    scope,
                    seq,
                    kind,
                    payload.from_db_value(data, payload.cached_col, connection),
                    created,
                )
                for run_id, scope, seq, kind, data, created in cursor.fetchall()
            ]
    else:
        rank = Window(RowNumber(), partition_by=[F("run_id")], order_by=F("seq").asc())
        rows = list(
            RunEvent.objects.using(alias)
            .filter(
                run_id__in=[run_id for run_id, _ in runs],
                seq__gte=Case(
                    *(When(run_id=run_id, then=Value(seq)) for run_id, seq in runs),
                    output_field=BigIntegerField(),
                ),
            )
            .annotate(rank=rank)
            .filter(rank__lte=limit)
            .order_by("run_id", "seq")
            .values_list("run_id", "run__scope", "seq", "type", "payload", "created_at")
        )
    batches: dict[str, list[Message]] = {}
    for run_id, scope, seq, event_type, data, created_at in rows:
        batches.setdefault(run_id, []).append(
            Message(
                id=f"{run_id}:{seq}",
                run_id=run_id,
                scope=scope,
                seq=seq,
                type=event_type,
                payload=data,
                occurred_at=created_at,
            )
        )
    return batches


def read_pending(run_id: str, next_seq: int, limit: int) -> list[Message]:
    """``read_claimed`` for one run."""
    return read_claimed([(run_id, next_seq)], limit).get(run_id, [])


def acknowledge_batches(
    token: uuid.UUID,
    batches: Sequence[tuple[str, int, int]],
    *,
    keep_lease: Collection[str] = (),
) -> set[str]:
    """Record published batches ``(run_id, first_seq, last_seq)`` (each contiguous from the run's
    ``next_seq``) as delivered; return the run ids acknowledged.

    One short transaction, two set-based statements whatever the number of runs:

    1. ``UPDATE outbox ... FROM (VALUES ...)``, fenced per run by the lease token and the cursor
       (``next_seq = first_seq``): advance ``next_seq``, reset attempts and backoff, clear the
       lease, or renew it for the runs in ``keep_lease``. ``RETURNING`` says which runs it
       changed: a run whose lease was taken over (or whose cursor moved) changes nothing.
    2. ``UPDATE event SET published_at ... FROM (VALUES ...)`` for exactly the (run, seq range)
       pairs of the runs statement 1 returned; the outbox rows it updated stay locked until
       commit, so no other relay can claim them in between.

    Raw SQL: the ORM has neither ``UPDATE ... FROM`` nor ``RETURNING`` on an update (a ``Case``
    per run would need a third statement to learn which runs matched). PostgreSQL and SQLite
    (3.35+) both speak this SQL and name ``VALUES`` columns ``column1``, ``column2``...
    """
    if not batches:
        return set()
    alias = db_alias()
    connection = connection_for_write()
    outbox, event = table(RunOutbox), table(RunEvent)
    now_sql, now_params = _compile(Now())
    lease_sql, lease_params = _compile(
        _db_now_plus(dt.timedelta(seconds=float(runs_settings.LEASE_SECONDS)))
    )
    token_value = RunOutbox._meta.get_field("lease_token").get_db_prep_value(token, connection)
    keep = set(keep_lease)
    values = ", ".join(["(%s, %s, %s, %s)"] * len(batches))
    params: list[Any] = list(lease_params)
    for run_id, first, last in batches:
        params += [run_id, first, last, int(run_id in keep)]
    params.append(token_value)
    with transaction.atomic(using=alias), connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {outbox} SET next_seq = a.column3 + 1, attempts = 0, last_error = '',"
            " next_attempt_at = NULL,"
            f" lease_until = CASE WHEN a.column4 = 1 THEN {lease_sql} ELSE NULL END,"
            " lease_token = CASE WHEN a.column4 = 1 THEN lease_token ELSE NULL END,"
            " leased_by = CASE WHEN a.column4 = 1 THEN leased_by ELSE '' END"
            f" FROM (VALUES {values}) AS a"
            f" WHERE {outbox}.run_id = a.column1 AND {outbox}.lease_token = %s"
            f" AND {outbox}.next_seq = a.column2"
            f" RETURNING {outbox}.run_id",
            params,
        )
        acked = {str(run_id) for (run_id,) in cursor.fetchall()}
        marked = [batch for batch in batches if batch[0] in acked]
        if marked:
            cursor.execute(
                f"UPDATE {event} SET published_at = {now_sql}"
                f" FROM (VALUES {', '.join(['(%s, %s, %s)'] * len(marked))}) AS a"
                f" WHERE {event}.run_id = a.column1"
                f" AND {event}.seq >= a.column2 AND {event}.seq <= a.column3"
                f" AND {event}.published_at IS NULL AND {event}.skipped_at IS NULL",
                [*now_params, *(value for batch in marked for value in batch)],
            )
    return acked


def acknowledge(
    token: uuid.UUID, run_id: str, messages: Sequence[Message], *, keep_lease: bool = False
) -> bool:
    """``acknowledge_batches`` for one run's ``messages``: True if acknowledged."""
    batch = (run_id, messages[0].seq, messages[-1].seq)
    return bool(acknowledge_batches(token, [batch], keep_lease=[run_id] if keep_lease else ()))


def record_failure(claim: Claim, run: ClaimedRun, error: BaseException) -> bool:
    """After a failed publish: ``attempts`` + 1, ``last_error``, a backoff from the database's
    clock, the lease cleared; blocked at ``MAX_ATTEMPTS``. One statement, fenced by the lease.
    Returns whether the run is now blocked."""
    attempts = run.attempts + 1
    blocked = attempts >= runs_settings.MAX_ATTEMPTS
    delay = dt.timedelta(seconds=backoff_seconds(attempts))
    alias = db_alias()
    with transaction.atomic(using=alias):
        recorded = (
            RunOutbox.objects.using(alias)
            .filter(run_id=run.run_id, lease_token=claim.token)
            .update(
                attempts=attempts,
                last_error=error_text(f"{type(error).__name__}: {error}"),
                next_attempt_at=None if blocked else _db_now_plus(delay),
                blocked_at=Now() if blocked else None,
                **NO_LEASE,
            )
        )
    if not recorded:
        logger.warning(
            "publish failed for run %s, but its lease was taken over: the relay that holds it "
            "now retries (failure not recorded): %s",
            run.run_id,
            error,
        )
        return False
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
            .update(**NO_LEASE)
        )


# ---------------------------------------------------------------------------------------------
# Helpers


def _db_now_plus(delta: dt.timedelta) -> ExpressionWrapper[Any]:
    """The database's clock plus ``delta``: leases and backoffs never depend on this host's."""
    return ExpressionWrapper(Now() + delta, output_field=DateTimeField())


def _compile(expression: Any) -> tuple[str, list[Any]]:
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
